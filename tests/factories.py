"""factory-boy factories. Every patient they make is SYNTHETIC."""

from __future__ import annotations

import datetime as dt

import factory
from django.utils import timezone

from registry import codes
from registry.models import (
    Fracture,
    Patient,
    PatientIdentifier,
    Procedure,
    TherapyExposure,
)
from registry.timeutil import clinic_date

MRN_SYSTEM = "https://vbq-registry.example.org/fhir/sid/synthetic-mrn"


class PatientFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Patient
        skip_postgeneration_save = True

    family_name = "SYNTHETIC"
    given_name = factory.Sequence(lambda n: f"Test{n:04d}")
    birth_date = dt.date(1950, 3, 14)
    sex = "female"
    is_synthetic = True
    care_team = "fracture-liaison"

    @factory.post_generation
    def mrn(self, create, extracted, **kwargs):
        if create:
            PatientIdentifier.objects.create(
                patient=self,
                system=MRN_SYSTEM,
                value=extracted or f"SYN-T{self.pk.hex[:8].upper()}",
                type_code="MR",
            )


class ProcedureFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Procedure

    patient = factory.SubFactory(PatientFactory)
    kind = "vertebroplasty"
    code_system = codes.CPT
    code = "22511"
    performed_at = factory.LazyFunction(lambda: timezone.now() - dt.timedelta(days=90))
    performed_on = factory.LazyAttribute(lambda o: clinic_date(o.performed_at))
    levels = factory.LazyFunction(lambda: ["L1"])
    identifier_system = "https://ehr.example.org/procedure"
    identifier_value = factory.Sequence(lambda n: f"PROC-{n:06d}")


class FractureFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Fracture

    patient = factory.SubFactory(PatientFactory)
    site = "hip"
    code_system = codes.ICD10CM
    code = "S72.001A"
    diagnosed_at = factory.LazyFunction(lambda: timezone.now() - dt.timedelta(days=10))
    diagnosed_on = factory.LazyAttribute(lambda o: clinic_date(o.diagnosed_at))
    identifier_system = "https://ehr.example.org/condition"
    identifier_value = factory.Sequence(lambda n: f"COND-{n:06d}")


class TherapyExposureFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = TherapyExposure

    patient = factory.SubFactory(PatientFactory)
    agent = "alendronate"
    kind = "order"
    route = "oral"
    start_on = factory.LazyFunction(lambda: clinic_date(timezone.now()) - dt.timedelta(days=5))
    identifier_system = "https://ehr.example.org/medicationrequest"
    identifier_value = factory.Sequence(lambda n: f"MR-{n:06d}")
