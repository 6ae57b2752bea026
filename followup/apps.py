from django.apps import AppConfig


class FollowupConfig(AppConfig):
    name = "followup"
    verbose_name = "Follow-up"

    def ready(self) -> None:
        # The registry core announces patients whose follow-up may have changed; follow-up
        # queues their re-evaluation (registry.events).
        from followup.sweep import reevaluate_in_transaction
        from followup.tasks import queue_reevaluation
        from registry import events
        from scoring import signals

        events.followup_changed_committed.connect(queue_reevaluation,
                                                  dispatch_uid="followup.reevaluate")
        # Scoring announces a stored result; follow-up re-evaluates its patient at once.
        signals.patient_result_stored.connect(reevaluate_in_transaction,
                                              dispatch_uid="followup.result_stored")
