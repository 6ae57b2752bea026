"""Roles as Django groups with explicit permissions (kept in sync after every migrate).

- clinician: identified patient data, alerts, VBQ review, reports.
- coordinator: identified patient data, alerts, reports (works the worklist).
- qi_analyst: aggregate, de-identified reports only; no patient pages.
- feed: an EHR interface account: submit FHIR, nothing in the UI.
- admin: everything above plus the audit report (superusers use the Django admin).
"""

from __future__ import annotations

from typing import Any

CLINICIAN = "clinician"
COORDINATOR = "coordinator"
QI_ANALYST = "qi_analyst"
FEED = "feed"
ADMIN = "admin"

ROLE_PERMISSIONS: dict[str, list[str]] = {
    CLINICIAN: [
        "registry.view_identified_data",
        "registry.view_reports",
        "registry.export_identified_cohort",
        "registry.work_alerts",
        "registry.review_vbq",
    ],
    COORDINATOR: [
        "registry.view_identified_data",
        "registry.view_reports",
        "registry.export_identified_cohort",
        "registry.work_alerts",
    ],
    QI_ANALYST: ["registry.view_reports"],
    FEED: ["registry.submit_fhir"],
    ADMIN: [
        "registry.view_identified_data",
        "registry.view_reports",
        "registry.export_identified_cohort",
        "registry.work_alerts",
        "registry.review_vbq",
        "registry.view_audit",
    ],
}
ROLES = tuple(ROLE_PERMISSIONS)


def ensure_roles(**_kwargs: Any) -> None:
    """Create the role groups and set exactly their permissions (idempotent)."""
    from django.contrib.auth.models import Group, Permission

    for role, perm_names in ROLE_PERMISSIONS.items():
        group, _ = Group.objects.get_or_create(name=role)
        perms = []
        for name in perm_names:
            app_label, codename = name.split(".")
            perm = Permission.objects.filter(
                content_type__app_label=app_label, codename=codename
            ).first()
            if perm is not None:
                perms.append(perm)
        group.permissions.set(perms)
