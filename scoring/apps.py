from django.apps import AppConfig


class ScoringConfig(AppConfig):
    name = "scoring"
    verbose_name = "VBQ scoring"

    def ready(self) -> None:
        from scoring import fhir_observation  # noqa: F401 - registers the FHIR reader
