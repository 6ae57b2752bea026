"""Run the follow-up sweep now (the same work Celery beat does daily)."""

from django.core.management.base import BaseCommand

from followup.sweep import followup_sweep


class Command(BaseCommand):
    help = "Evaluate every patient whose follow-up date has come; open/resolve/escalate alerts."

    def handle(self, *args, **options) -> None:
        stats = followup_sweep()
        self.stdout.write(
            f"Evaluated {stats.evaluated}; opened {stats.opened}, escalated {stats.escalated}, "
            f"resolved {stats.resolved}; errors {stats.errors}."
        )
