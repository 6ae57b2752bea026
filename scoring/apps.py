from django.apps import AppConfig


class ScoringConfig(AppConfig):
    name = "scoring"
    verbose_name = "VBQ scoring"

    def ready(self) -> None:
        # The registry core announces writes (registry.events); scoring reacts.
        from scoring import receivers

        receivers.connect()
