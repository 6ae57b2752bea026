"""Load the SYNTHETIC demo cohort (no real patient, ever)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction

from registry.demo import (
    SYNTHETIC_MRN_SYSTEM,
    DemoPatient,
    generate_demo_cohort,
)
from registry.models import Patient
from registry.side_effects import Actor
from registry.timeutil import clinic_today

ACTOR = Actor(via="command")


class Command(BaseCommand):
    help = "Create a synthetic demo cohort (default 60 patients shaped like Kadri et al. 2025)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--patients", type=int, default=60)
        parser.add_argument("--seed", type=int, default=2025)
        parser.add_argument(
            "--if-empty", action="store_true", help="Do nothing if any patient exists"
        )
        parser.add_argument(
            "--phantoms", type=int, default=0,
            help="Write a SYNTHETIC MRI phantom for this many patients into the local DICOM "
                 "store and queue real VBQ jobs for them (the worker scores them)",
        )

    def handle(self, *args, **options) -> None:
        if options["if_empty"] and Patient.objects.exists():
            self.stdout.write("Registry is not empty; demo cohort not loaded.")
            return
        cohort = generate_demo_cohort(
            options["patients"], seed=options["seed"], today=clinic_today()
        )
        for demo in cohort:
            load_demo_patient_via_fhir(demo)
        self.stdout.write(self.style.SUCCESS(
            f"Loaded {len(cohort)} SYNTHETIC patients through FHIR ingestion."))
        if options["phantoms"]:
            jobs = [job for demo in demo_phantom_patients(cohort, options["phantoms"])
                    for job in write_demo_phantom(demo)]
            self.stdout.write(self.style.SUCCESS(
                f"Wrote SYNTHETIC MRI phantoms and queued {len(jobs)} VBQ job(s)."))


def demo_phantom_patients(cohort: list[DemoPatient], count: int) -> list[DemoPatient]:
    """Patients whose demo VBQ is clearly high or clearly normal (at least 0.3 from the
    threshold), alternating groups, so a few percent of measurement difference between the
    phantom and the demo value never moves a patient across the threshold."""
    high = [d for d in cohort if d.vbq_excluding_fractured >= 3.3 and d.vbq_all_levels >= 3.3]
    normal = [d for d in cohort if d.vbq_excluding_fractured <= 2.7 and d.vbq_all_levels <= 2.7]
    mixed = [d for pair in zip(high, normal, strict=False) for d in pair]
    return mixed[:count]


def write_demo_phantom(demo: DemoPatient) -> list[int]:
    """Write a SYNTHETIC sagittal T1 phantom whose marrow/CSF ratio matches the patient's demo
    VBQ as the series the demo ImagingStudy announced, then queue its VBQ job through the
    normal pipeline (``vbq_jobs_create``). Returns the queued job ids."""
    from django.conf import settings

    from scoring.engine.phantom import make_phantom
    from scoring.models import ImagingSeries
    from scoring.services import vbq_jobs_create

    seed = int(demo.key[4:])
    lumbar = demo.index_level if demo.index_level in ("L1", "L2", "L3", "L4") else None
    fractured = (lumbar,) if lumbar else ()
    target = demo.vbq_all_levels
    phantom = make_phantom(seed, marrow_csf_ratio=target, fractured=fractured)
    # The true VBQ lands a few percent off the ratio (per-level spread, bias field): rescale once.
    phantom = make_phantom(seed, fractured=fractured,
                           marrow_csf_ratio=target * target / phantom.truth["vbq_all_levels"])
    series = ImagingSeries.objects.select_related("study").get(
        series_instance_uid=f"2.25.{seed + 10**12}.1")
    for ds in phantom.datasets:
        ds.StudyInstanceUID = series.study.study_instance_uid
        ds.SeriesInstanceUID = series.series_instance_uid
        ds.PatientID = demo.key
        ds.MagneticFieldStrength = demo.field_strength_t
    folder = settings.DICOM_STORAGE_ROOT / "demo" / series.series_instance_uid
    phantom.write(folder)
    ImagingSeries.objects.filter(pk=series.pk).update(local_path=str(folder))
    return vbq_jobs_create(study=series.study)


@transaction.atomic
def load_demo_patient_via_fhir(demo: DemoPatient) -> Patient:
    """Send the patient's transaction bundle through the FHIR ingestion path (as the demo EHR
    feed), then add the demo VBQ value, which no FHIR resource carries yet."""
    from integrations.fhir.context import Context
    from integrations.fhir.demo import demo_bundle
    from integrations.fhir.ingest import process_transaction
    from registry.feeds import feed_create
    from registry.models import Feed
    from registry.selectors import patient_get_by_identifier
    from scoring.models import ImagingSeries, VbqResult

    feed = Feed.objects.filter(name="synthetic-demo-ehr").first() or feed_create(
        name="synthetic-demo-ehr")[0]
    ctx = Context(feed_name=feed.name, actor=Actor(feed_id=feed.pk, via="fhir"))
    process_transaction(demo_bundle(demo), ctx, feed.allows)
    patient = patient_get_by_identifier(system=SYNTHETIC_MRN_SYSTEM, value=demo.key)
    assert patient is not None  # noqa: S101 - the bundle above created it
    Patient.objects.filter(pk=patient.pk).update(
        is_synthetic=True, care_team="fracture-liaison", bmi_kg_m2=demo.bmi,
        last_contact_on=demo.last_contact)
    series = ImagingSeries.objects.get(series_instance_uid=f"2.25.{int(demo.key[4:]) + 10**12}.1")
    ImagingSeries.objects.filter(pk=series.pk).update(field_strength_t=demo.field_strength_t,
                                                      orientation="sagittal")
    VbqResult.objects.update_or_create(
        series=series, algorithm_version="demo", source=VbqResult.Source.IMPORTED, revision=0,
        defaults={
            "patient": patient, "status": VbqResult.Status.SUCCEEDED,
            "review_status": VbqResult.Review.ACCEPTED,
            "vbq_all_levels": demo.vbq_all_levels,
            "vbq_excluding_fractured": demo.vbq_excluding_fractured, "confidence": 1.0,
            "fractured_levels": [demo.index_level] if demo.index_level.startswith("L") else [],
            "field_strength_t": demo.field_strength_t,
            "measurement": {"synthetic": True, "note": "SYNTHETIC demo value, not computed"},
        },
    )
    return patient
