"""The clinical registry's data model.

Invariants live in the database (unique identifiers, check constraints, and triggers for rules
that span tables such as "no procedure before birth"), not only in forms. Writes go through
``registry.services``; reads through ``registry.selectors``.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import F, Q

VERTEBRAL_LEVELS = [
    *(f"C{i}" for i in range(1, 8)),
    *(f"T{i}" for i in range(1, 13)),
    *(f"L{i}" for i in range(1, 6)),
    "S1",
]


class Sex(models.TextChoices):
    FEMALE = "female", "Female"
    MALE = "male", "Male"
    OTHER = "other", "Other"
    UNKNOWN = "unknown", "Unknown"


class Patient(models.Model):
    """A person in the registry. Identified by one or more (system, value) identifiers."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    family_name = models.CharField(max_length=200, blank=True)
    given_name = models.CharField(max_length=200, blank=True)
    birth_date = models.DateField(null=True, blank=True)
    sex = models.CharField(max_length=10, choices=Sex.choices, default=Sex.UNKNOWN)
    deceased_on = models.DateField(null=True, blank=True)
    last_contact_on = models.DateField(null=True, blank=True)
    bmi_kg_m2 = models.DecimalField(max_digits=4, decimal_places=1, null=True, blank=True)
    care_team = models.CharField(max_length=100, blank=True, db_index=True)
    is_synthetic = models.BooleanField(
        default=False, help_text="Synthetic (demo or test) patient, never a real person."
    )
    merged_into = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="merged_from"
    )
    followup_next_check_on = models.DateField(
        null=True,
        blank=True,
        help_text="Next date the follow-up rules can change without a new event (sweep key)",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [
            # The daily sweep reads only due patients: a partial index on the due date.
            models.Index(
                fields=["followup_next_check_on"],
                name="patient_followup_due_idx",
                condition=Q(followup_next_check_on__isnull=False),
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(deceased_on__isnull=True)
                | Q(birth_date__isnull=True)
                | Q(deceased_on__gte=F("birth_date")),
                name="patient_deceased_not_before_birth",
            ),
            models.CheckConstraint(
                condition=Q(bmi_kg_m2__isnull=True) | Q(bmi_kg_m2__gt=5, bmi_kg_m2__lt=100),
                name="patient_bmi_plausible",
            ),
            models.CheckConstraint(
                condition=~Q(merged_into=F("id")), name="patient_not_merged_into_self"
            ),
        ]
        permissions = [
            ("view_identified_data", "Can view identified patient data (PHI)"),
            ("view_reports", "Can view aggregate quality-improvement reports"),
            ("export_identified_cohort", "Can export the identified cohort table"),
            ("work_alerts", "Can acknowledge, assign, snooze and resolve alerts"),
            ("review_vbq", "Can review, accept, reject and correct VBQ results"),
            ("submit_fhir", "Can submit FHIR resources as an EHR feed"),
            ("view_audit", "Can view the audit report"),
        ]

    def __str__(self) -> str:  # ids only: __str__ ends up in logs and admin history
        return f"Patient {self.id}"

    @property
    def display_name(self) -> str:
        return ", ".join(p for p in (self.family_name, self.given_name) if p) or "(no name)"


class PatientIdentifier(models.Model):
    """A business identifier (e.g. MRN) of a patient; (system, value) is globally unique."""

    patient = models.ForeignKey(Patient, on_delete=models.CASCADE, related_name="identifiers")
    system = models.CharField(max_length=255)
    value = models.CharField(max_length=255)
    use = models.CharField(max_length=20, blank=True)
    type_code = models.CharField(max_length=20, blank=True, help_text="e.g. MR for an MRN")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["system", "value"], name="patient_identifier_unique"),
            models.CheckConstraint(
                condition=~Q(system="") & ~Q(value=""), name="patient_identifier_not_blank"
            ),
        ]

    def __str__(self) -> str:
        return f"Identifier {self.pk} of {self.patient_id}"


class RecordStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    ENTERED_IN_ERROR = "entered-in-error", "Entered in error"


class SourcedRecord(models.Model):
    """Base for clinical facts received from a source system under a business identifier."""

    identifier_system = models.CharField(max_length=255, blank=True)
    identifier_value = models.CharField(max_length=255, blank=True)
    record_status = models.CharField(
        max_length=20, choices=RecordStatus.choices, default=RecordStatus.ACTIVE
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        abstract = True


class ProcedureKind(models.TextChoices):
    VERTEBROPLASTY = "vertebroplasty", "Vertebroplasty"
    KYPHOPLASTY = "kyphoplasty", "Kyphoplasty"


class Procedure(SourcedRecord):
    """A vertebral augmentation. The patient's first active one is the index procedure."""

    patient = models.ForeignKey(Patient, on_delete=models.CASCADE, related_name="procedures")
    kind = models.CharField(max_length=20, choices=ProcedureKind.choices)
    code_system = models.CharField(max_length=255)
    code = models.CharField(max_length=50)
    code_display = models.CharField(max_length=255, blank=True)
    performed_at = models.DateTimeField()
    performed_on = models.DateField(help_text="Clinic-local date of performed_at")
    levels = models.JSONField(default=list, blank=True, help_text='Treated levels, e.g. ["L1"]')

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["identifier_system", "identifier_value"],
                condition=~Q(identifier_value=""),
                name="procedure_identifier_unique",
            ),
            models.CheckConstraint(
                condition=Q(kind__in=ProcedureKind.values), name="procedure_kind_valid"
            ),
        ]
        indexes = [models.Index(fields=["patient", "performed_on"])]

    def __str__(self) -> str:
        return f"Procedure {self.pk} ({self.kind})"


class FractureSite(models.TextChoices):
    VERTEBRAL = "vertebral", "Vertebral"
    HIP = "hip", "Hip"
    WRIST = "wrist", "Wrist / distal radius"
    HUMERUS = "humerus", "Proximal humerus"
    PELVIS = "pelvis", "Pelvis"
    RIB = "rib", "Rib"
    OTHER = "other", "Other"


class Fracture(SourcedRecord):
    """A fragility fracture diagnosis. Classified against the index procedure on read."""

    patient = models.ForeignKey(Patient, on_delete=models.CASCADE, related_name="fractures")
    site = models.CharField(max_length=20, choices=FractureSite.choices)
    vertebral_level = models.CharField(max_length=3, blank=True)
    code_system = models.CharField(max_length=255, blank=True)
    code = models.CharField(max_length=50, blank=True)
    code_display = models.CharField(max_length=255, blank=True)
    diagnosed_at = models.DateTimeField()
    diagnosed_on = models.DateField(help_text="Clinic-local date of diagnosed_at")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["identifier_system", "identifier_value"],
                condition=~Q(identifier_value=""),
                name="fracture_identifier_unique",
            ),
            models.CheckConstraint(
                condition=Q(site__in=FractureSite.values), name="fracture_site_valid"
            ),
            models.CheckConstraint(
                condition=Q(vertebral_level="")
                | Q(site=FractureSite.VERTEBRAL, vertebral_level__in=VERTEBRAL_LEVELS),
                name="fracture_level_only_for_vertebral",
            ),
        ]
        indexes = [models.Index(fields=["patient", "diagnosed_on"])]

    def __str__(self) -> str:
        return f"Fracture {self.pk} ({self.site})"


class ExposureKind(models.TextChoices):
    ORDER = "order", "Order (MedicationRequest)"
    DISPENSE = "dispense", "Dispense"
    ADMINISTRATION = "administration", "Administration"
    STATEMENT = "statement", "Statement"


class ExposureStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    COMPLETED = "completed", "Completed"
    STOPPED = "stopped", "Stopped"
    CANCELLED = "cancelled", "Cancelled"
    DECLINED = "declined", "Declined / not taken"
    UNKNOWN = "unknown", "Unknown"


class TherapyExposure(SourcedRecord):
    """An anti-osteoporosis medication event. ``agent`` is a key of ``registry.codes.AGENTS``."""

    patient = models.ForeignKey(Patient, on_delete=models.CASCADE, related_name="therapies")
    agent = models.CharField(max_length=40)
    kind = models.CharField(max_length=20, choices=ExposureKind.choices)
    status = models.CharField(
        max_length=20, choices=ExposureStatus.choices, default=ExposureStatus.ACTIVE
    )
    route = models.CharField(max_length=20, blank=True, help_text="oral | iv | sc")
    rxnorm_code = models.CharField(max_length=20, blank=True)
    atc_code = models.CharField(max_length=10, blank=True)
    start_on = models.DateField()
    end_on = models.DateField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["identifier_system", "identifier_value"],
                condition=~Q(identifier_value=""),
                name="therapy_identifier_unique",
            ),
            models.CheckConstraint(
                condition=Q(end_on__isnull=True) | Q(end_on__gte=F("start_on")),
                name="therapy_end_not_before_start",
            ),
            models.CheckConstraint(
                condition=Q(kind__in=ExposureKind.values), name="therapy_kind_valid"
            ),
        ]
        indexes = [models.Index(fields=["patient", "start_on"])]

    def __str__(self) -> str:
        return f"TherapyExposure {self.pk} ({self.agent})"


class Feed(models.Model):
    """An automated EHR client. Its bearer token is stored only as a SHA-256 hash."""

    name = models.CharField(max_length=100, unique=True)
    token_hash = models.CharField(max_length=64, unique=True)
    token_prefix = models.CharField(max_length=12, help_text="First characters, to recognise it")
    allowed_resource_types = models.JSONField(
        default=list, blank=True, help_text="Empty = every supported type"
    )
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    token_rotated_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"Feed {self.name}"

    def allows(self, resource_type: str) -> bool:
        return not self.allowed_resource_types or resource_type in self.allowed_resource_types


class AuditAction(models.TextChoices):
    READ = "read", "Read"
    CREATE = "create", "Create"
    UPDATE = "update", "Update"
    DELETE = "delete", "Delete"
    EXPORT = "export", "Export"
    LOGIN = "login", "Login"
    EXECUTE = "execute", "Execute"


class AuditEvent(models.Model):
    """Who read or changed which patient's data, when and how. Append-only; no PHI in detail."""

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    feed = models.ForeignKey(Feed, null=True, blank=True, on_delete=models.SET_NULL)
    action = models.CharField(max_length=10, choices=AuditAction.choices)
    patient = models.ForeignKey(
        Patient, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    object_type = models.CharField(max_length=50)
    object_id = models.CharField(max_length=64, blank=True)
    via = models.CharField(max_length=30, help_text="ui | api | fhir | admin | task | command")
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        indexes = [models.Index(fields=["patient", "at"])]

    def __str__(self) -> str:
        return f"AuditEvent {self.pk} {self.action} {self.object_type}"


class AlertStatus(models.TextChoices):
    OPEN = "open", "Open"
    ACKNOWLEDGED = "acknowledged", "Acknowledged"
    SNOOZED = "snoozed", "Snoozed"
    RESOLVED = "resolved", "Resolved"


OPEN_ALERT_STATUSES = [AlertStatus.OPEN, AlertStatus.ACKNOWLEDGED, AlertStatus.SNOOZED]


class Alert(models.Model):
    """A follow-up alert for the care team; at most one unresolved alert per (patient, rule)."""

    patient = models.ForeignKey(Patient, on_delete=models.CASCADE, related_name="alerts")
    rule_id = models.CharField(max_length=50)
    rule_version = models.PositiveIntegerField(default=1)
    status = models.CharField(max_length=15, choices=AlertStatus.choices, default="open")
    reason = models.CharField(max_length=300, help_text="Why the rule fired (no PHI)")
    vbq_value = models.FloatField(null=True, blank=True)
    vbq_threshold = models.FloatField(null=True, blank=True)
    vbq_threshold_field = models.CharField(
        max_length=10, blank=True, default="", db_default="",
        help_text="Field strength whose high-VBQ threshold applied ('1.5 T', '3 T'); empty: "
                  "the default threshold (field strength unknown)")
    escalation_level = models.PositiveSmallIntegerField(default=0)
    escalated_for_fracture = models.BooleanField(default=False)
    care_team = models.CharField(max_length=100, blank=True, db_index=True)
    assignee = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    opened_at = models.DateTimeField()
    due_on = models.DateField(null=True, blank=True)
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    snoozed_until = models.DateField(null=True, blank=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolution_reason = models.CharField(max_length=30, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["patient", "rule_id"],
                condition=Q(status__in=OPEN_ALERT_STATUSES),
                name="alert_one_unresolved_per_patient_rule",
            ),
            models.CheckConstraint(
                condition=~Q(status="resolved") | Q(resolved_at__isnull=False),
                name="alert_resolved_has_time",
            ),
        ]
        indexes = [models.Index(fields=["status", "due_on"])]

    def __str__(self) -> str:
        return f"Alert {self.pk} {self.rule_id} {self.status}"


class AlertEvent(models.Model):
    """History of an alert: every status change, assignment, escalation and note."""

    alert = models.ForeignKey(Alert, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(auto_now_add=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    action = models.CharField(max_length=20)
    from_status = models.CharField(max_length=15, blank=True)
    to_status = models.CharField(max_length=15, blank=True)
    note = models.TextField(blank=True)
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["at", "pk"]

    def __str__(self) -> str:
        return f"AlertEvent {self.pk} {self.action}"


class AlertDelivery(models.Model):
    """Outbox row: written in the same transaction as the alert, sent by a task with retries."""

    class Channel(models.TextChoices):
        IN_APP = "in-app", "In-app worklist"
        EMAIL = "email", "Email digest"
        FHIR = "fhir", "FHIR Communication"

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        SENDING = "sending", "Sending"
        SENT = "sent", "Sent"
        FAILED = "failed", "Failed (gave up)"

    alert = models.ForeignKey(Alert, on_delete=models.CASCADE, related_name="deliveries")
    channel = models.CharField(max_length=10, choices=Channel.choices)
    event = models.CharField(max_length=20, default="opened", help_text="opened | escalated")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField(db_index=True)
    claimed_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    idempotency_key = models.CharField(max_length=100, unique=True)

    class Meta:
        indexes = [models.Index(fields=["status", "next_attempt_at"])]

    def __str__(self) -> str:
        return f"AlertDelivery {self.pk} {self.channel} {self.status}"


class WorkerProbe(models.Model):
    """A round trip web → broker → worker → database, used by tests and ops checks."""

    sent_at = models.DateTimeField(auto_now_add=True)
    done_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True)

    def __str__(self) -> str:
        return f"WorkerProbe {self.pk}"
