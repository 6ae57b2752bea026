"""Integrations with the outside world: FHIR (EHR feeds), DICOM (PACS), notifications."""
