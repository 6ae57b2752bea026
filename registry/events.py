"""Domain events of the registry core: how a lower layer lets a higher one react.

The registry core (patients, procedures, fractures, therapy, audit) is imported by every other
layer and imports none of them (docs/architecture.md). When one of its writes must be followed
by work that belongs to a higher layer, it sends one of these signals, and that layer connects
its receiver in its ``AppConfig.ready`` (so the receivers are in place before any request or
task runs). Receivers run synchronously, in the sender's thread and transaction: what they
write commits or rolls back with the clinical write that caused it. An event that is sent only
after commit says so.

``tests/test_architecture.py`` checks that every event has its receiver once Django is set up:
an event nobody listens to would silently skip the work.
"""

from __future__ import annotations

from django.dispatch import Signal

#: A procedure was written (or moved between patients): it may be, or change, the patients'
#: index procedure. Keyword arguments: ``patient_ids`` (list). Receiver: scoring links the
#: patients' studies that are not linked yet.
procedures_recorded = Signal()

#: A fracture or procedure was written for these patients, or patients were merged: the
#: fractured levels of their VBQ results may change. Keyword arguments: ``patient_ids``
#: (list), ``actor``. Receiver: scoring recomputes the levels (audited; follow-up
#: re-evaluated).
fractured_levels_changed = Signal()

#: ``source`` is being merged into ``target`` (inside the merge's transaction, after the
#: registry's own records moved, before the identifiers move). Keyword arguments:
#: ``source``, ``target``. Receiver: scoring moves the source's imaging studies and results.
patient_merged = Signal()

#: AFTER COMMIT: these patients' follow-up decisions may have changed (they are already marked
#: due today, the sweep's safety net). Keyword arguments: ``patient_ids`` (sorted list of
#: str). Receiver: follow-up queues their re-evaluation.
followup_changed_committed = Signal()
