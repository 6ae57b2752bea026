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

vbq_result_ready = Signal()


def result_ready(result_id: Any) -> None:
    """Tell the receivers that result ``result_id`` was stored or reviewed."""
    from scoring.models import VbqResult

    vbq_result_ready.send(sender=VbqResult, result_id=result_id)
