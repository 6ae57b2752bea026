"""Who may use which URL: the expected permission matrix, as data.

``tests/deploy/test_permission_matrix.py`` walks EVERY pattern of the URL resolver and requests
it as each role (anonymous, clinician, coordinator, qi_analyst, feed, admin). A URL missing
from this file FAILS that test: when you add a URL, add a line here (append; keep it sorted by
area). Keys are the URL name (with namespace, e.g. ``"admin:index"``) or, for an unnamed
pattern, its route string. ``PREFIX_POLICIES`` covers whole areas (the Django admin).

What the test asserts, per (URL, role):
- every role, every URL: never a 5xx;
- ``allowed`` roles: not denied (not 401/403, not redirected to a login page);
- all other roles: denied: 401/403, a 302 to a login page, or 404;
- ``anonymous``: denied unless the URL is ``public`` (the allowlist: health checks, login,
  FHIR metadata, CDS discovery, static);
- ``identifying=True`` (shows names/MRNs/birth dates): qi_analyst is never allowed, and a
  200 GET on a path naming the fixture patient must append a ``read`` AuditEvent for it;
- roles without ``registry.view_identified_data`` never see a fixture patient's name or MRN
  in any response body, unless explicitly allowed on an identifying URL (a feed reading FHIR).

``methods`` lists the HTTP methods to probe (each with an empty body); the first one must be
one the view accepts. ``feed`` requests carry ``Authorization: Bearer <token>`` of a real Feed.
Path parameters are filled from ``SAMPLE_KWARGS`` (real fixture ids) or a dummy per converter.
"""

from __future__ import annotations

from dataclasses import dataclass

ANONYMOUS = "anonymous"
CLINICIAN = "clinician"
COORDINATOR = "coordinator"
QI_ANALYST = "qi_analyst"
FEED = "feed"
ADMIN = "admin"
ROLES = (ANONYMOUS, CLINICIAN, COORDINATOR, QI_ANALYST, FEED, ADMIN)
LOGGED_IN = frozenset({CLINICIAN, COORDINATOR, QI_ANALYST, FEED, ADMIN})
PHI_ROLES = frozenset({CLINICIAN, COORDINATOR, ADMIN})  # registry.view_identified_data
ALERT_ROLES = frozenset({CLINICIAN, COORDINATOR, ADMIN})  # registry.work_alerts
REPORT_ROLES = frozenset({CLINICIAN, COORDINATOR, QI_ANALYST, ADMIN})  # registry.view_reports
REVIEW_ROLES = frozenset({CLINICIAN, ADMIN})  # registry.review_vbq
AUDIT_ROLES = frozenset({ADMIN})  # registry.view_audit
FEED_ROLES = frozenset({FEED})  # registry.submit_fhir / bearer token


@dataclass(frozen=True)
class Rule:
    allowed: frozenset[str]
    identifying: bool = False
    public: bool = False
    methods: tuple[str, ...] = ("GET",)

    def __post_init__(self) -> None:
        if self.identifying and QI_ANALYST in self.allowed:
            raise ValueError("qi_analyst may never be allowed on patient-identifying URLs")


EVERYONE = frozenset(ROLES)


def public(methods: tuple[str, ...] = ("GET",)) -> Rule:
    return Rule(allowed=EVERYONE, public=True, methods=methods)


def phi(methods: tuple[str, ...] = ("GET",), roles: frozenset[str] = PHI_ROLES) -> Rule:
    return Rule(allowed=roles, identifying=True, methods=methods)


# Nobody in the six roles is staff: the admin site sends all of them to its login page.
ADMIN_SITE = Rule(allowed=frozenset(), identifying=True)

PREFIX_POLICIES: dict[str, Rule] = {
    "admin/": ADMIN_SITE,
}

URL_POLICY: dict[str, Rule] = {
    # --- operations / public allowlist
    "healthz": public(),
    "readyz": public(),
    "favicon": public(),
    "login": public(),
    "password_reset": public(),
    "password_reset_done": public(),
    "password_reset_confirm": public(),
    "password_reset_complete": public(),
    "logout": Rule(allowed=LOGGED_IN, methods=("POST",)),
    "admin:login": public(),
    "admin:logout": Rule(allowed=LOGGED_IN, methods=("POST",)),
    "home": Rule(allowed=LOGGED_IN),
    "ops-worker-probe": Rule(allowed=AUDIT_ROLES, methods=("POST",)),
    "ops-worker-probe-status": Rule(allowed=AUDIT_ROLES),
    "audit-event-list": Rule(allowed=AUDIT_ROLES),
    # --- API schema and docs (not PHI; still behind a login)
    "api-schema": Rule(allowed=LOGGED_IN),
    "api-docs": Rule(allowed=LOGGED_IN),
    # --- patients (identified)
    "patient-list": phi(),
    "patient-detail": phi(),
    # --- imaging API (identified)
    "api-vbq-job-list": phi(),
    "api-vbq-job-detail": phi(),
    "api-dicom-upload": phi(methods=("POST",)),
    # --- imaging and VBQ review pages (identified)
    "imaging-upload": phi(),
    "vbq-jobs": phi(),
    "vbq-review-queue": phi(),  # read-only without registry.review_vbq (coordinators)
    "vbq-review": phi(roles=REVIEW_ROLES),
    "vbq-review-image": phi(),
    "vbq-review-preview": phi(methods=("POST",), roles=REVIEW_ROLES),
    "vbq-review-save": phi(methods=("POST",), roles=REVIEW_ROLES),
    "vbq-review-action": phi(methods=("POST",), roles=REVIEW_ROLES),
    "vbq-review-assist": phi(methods=("POST",), roles=REVIEW_ROLES),
    # --- worklist page (identified)
    "worklist": phi(methods=("GET", "POST"), roles=ALERT_ROLES),
    "worklist-action": phi(methods=("POST",), roles=ALERT_ROLES),
    # --- alerts API (identified worklist)
    "api-alert-list": phi(roles=ALERT_ROLES),
    "api-alert-acknowledge": phi(methods=("POST",), roles=ALERT_ROLES),
    "api-alert-resolve": phi(methods=("POST",), roles=ALERT_ROLES),
    "api-alert-snooze": phi(methods=("POST",), roles=ALERT_ROLES),
    "api-alert-assign": phi(methods=("POST",), roles=ALERT_ROLES),
    "api-alert-note": phi(methods=("POST",), roles=ALERT_ROLES),
    "api-alert-reopen": phi(methods=("POST",), roles=ALERT_ROLES),
    # --- CDS Hooks (EHR, bearer token)
    "cds-discovery": public(),
    "cds-patient-view": phi(methods=("POST",), roles=FEED_ROLES),
    # --- FHIR (EHR feeds, bearer token; metadata is the public CapabilityStatement)
    "fhir-metadata": public(),
    "fhir-root": phi(methods=("POST",), roles=FEED_ROLES),
    "fhir-root-slash": phi(methods=("POST",), roles=FEED_ROLES),
    "fhir-type": phi(methods=("GET", "POST"), roles=FEED_ROLES),
    "fhir-instance": phi(methods=("GET", "PUT"), roles=FEED_ROLES),
    "fhir-not-found": public(),  # any other /fhir/... path: a 404 OperationOutcome, no data
    # --- QI reports (de-identified for qi_analyst)
    "report": Rule(allowed=REPORT_ROLES),
    "report-api": Rule(allowed=REPORT_ROLES),
    "report-summary": Rule(allowed=REPORT_ROLES),
    "report-cohort-csv": Rule(allowed=REPORT_ROLES),
    "report-plot": Rule(allowed=REPORT_ROLES),
}

# Real ids for path parameters, by parameter name: a callable of the fixture namespace
# (``ns.patient``, ``ns.alert``, ``ns.probe``, ``ns.feed``, ``ns.study``, ``ns.series``,
# ``ns.vbq_result``, ``ns.procedure``, ``ns.fracture``, ``ns.therapy``). Unknown names get a
# dummy for their converter (int 1, uuid of the fixture patient, slug/str "x", path "1").
SAMPLE_KWARGS: dict[str, object] = {
    "patient_id": lambda ns: ns.patient.pk,
    "alert_id": lambda ns: ns.alert.pk,
    "probe_id": lambda ns: ns.probe.pk,
    "feed_id": lambda ns: ns.feed.pk,
    "study_id": lambda ns: ns.study.pk,
    "series_id": lambda ns: ns.series.pk,
    "result_id": lambda ns: ns.vbq_result.pk,
    "vbq_result_id": lambda ns: ns.vbq_result.pk,
    "procedure_id": lambda ns: ns.procedure.pk,
    "fracture_id": lambda ns: ns.fracture.pk,
    "therapy_id": lambda ns: ns.therapy.pk,
    "object_id": lambda ns: "1",
    "resource_type": lambda ns: "Patient",
    "logical_id": lambda ns: ns.patient.pk,
    "app_label": lambda ns: "registry",
    "name": lambda ns: "km",
    "fmt": lambda ns: "svg",
}

# Identifying URLs that read a patient's data WITHOUT writing a ``read`` AuditEvent yet (a known
# gap, reported to the owner). When the view audits, the matrix test says so: remove it here.
KNOWN_UNAUDITED_READS: frozenset[str] = frozenset(
    {
    }
)
