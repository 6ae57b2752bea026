"""Shared builders for follow-up tests (SYNTHETIC patients)."""

import datetime as dt

from registry.models import Patient
from registry.timeutil import clinic_today, start_of_clinic_day
from scoring.models import VbqResult
from tests.factories import PatientFactory, ProcedureFactory


def high_vbq_patient(days_since_procedure: int = 70, vbq: float = 3.6, **patient_kw) -> Patient:
    """A patient whose index procedure was ``days_since_procedure`` clinic days ago, with an
    accepted VBQ result and no therapy, marked due for the sweep today."""
    patient = PatientFactory(**patient_kw)
    day = clinic_today() - dt.timedelta(days=days_since_procedure)
    ProcedureFactory(patient=patient, performed_at=start_of_clinic_day(day)
                     + dt.timedelta(hours=10))
    VbqResult.objects.create(patient=patient, algorithm_version="test", source="imported",
                             status="succeeded", review_status="accepted", vbq_all_levels=vbq,
                             vbq_excluding_fractured=vbq)
    Patient.objects.filter(pk=patient.pk).update(followup_next_check_on=clinic_today())
    patient.refresh_from_db()
    return patient
