"""Events of the scoring app for the layers above it (connected at start, in their
``AppConfig.ready``): scoring never imports them.

``vbq_result_ready`` is sent, with ``result_id``, inside the transaction that stores an
automatic result (``scoring.tasks.vbq_compute``) or records a reviewer's decision about one
(accepted, corrected, fractured levels set: ``scoring.review``). A receiver decides itself
whether the result is one it acts on (``integrations.dicom.export`` stores the result's SR and
overlay in the PACS), and must not fail the sender's transaction: it is the clinical write.
"""

from __future__ import annotations

from typing import Any

from django.dispatch import Signal

from scoring.models import VbqResult

vbq_result_ready = Signal()

#: Sent, with ``patient_id``, inside the transaction that stores an automatic result, once for
#: each patient the result concerns (its patient now, and the job's patient if the study moved
#: while it ran). Receiver: follow-up re-evaluates the patient in that transaction (the alert
#: a result opens or resolves commits with it) and never raises (a failed evaluation leaves
#: the patient due today, for the sweep).
patient_result_stored = Signal()


def result_ready(result_id: Any) -> None:
    """Tell the receivers that result ``result_id`` was stored or reviewed."""
    vbq_result_ready.send(sender=VbqResult, result_id=result_id)


def result_stored_for(patient_id: Any) -> None:
    """Tell the receivers that a result of patient ``patient_id`` was stored."""
    patient_result_stored.send(sender=VbqResult, patient_id=patient_id)
