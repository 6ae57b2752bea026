from django.apps import AppConfig


class IntegrationsConfig(AppConfig):
    name = "integrations"
    verbose_name = "Integrations"

    def ready(self) -> None:
        # The scoring layer announces stored and reviewed results; the PACS export reacts.
        from integrations.dicom.export import on_vbq_result_ready
        from integrations.fhir import observation  # noqa: F401 - registers the FHIR reader
        from scoring.signals import vbq_result_ready

        vbq_result_ready.connect(on_vbq_result_ready, dispatch_uid="integrations.dicom.export")
