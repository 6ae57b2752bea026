"""CDS Hooks service (https://cds-hooks.hl7.org/2.0/): a ``patient-view`` card for patients with
an unresolved follow-up alert, so the EHR shows it in the chart.

The EHR calls with a Feed bearer token. ``context.patientId`` is matched against the patient's
identifiers with system ``CDS_PATIENT_ID_SYSTEM`` (the EHR's patient id namespace); a
``prefetch.patient`` Patient resource's identifiers are also tried.
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from config.ratelimit import RateLimited, feed_from_request
from registry.labels import rule_label
from registry.models import OPEN_ALERT_STATUSES, Alert, AuditAction, PatientIdentifier
from registry.selectors import index_procedure
from registry.side_effects import Actor, audit_record
from registry.timeutil import clinic_today

SERVICE_ID = "vbq-followup"
SUGGESTED_ACTION = {
    "high-vbq-untreated-60d": "Consider starting anti-osteoporosis therapy (e.g. a "
    "bisphosphonate or denosumab) or refer to the fracture-liaison service.",
    "secondary-fracture": "Secondary fragility fracture without therapy: refer to the "
    "fracture-liaison service and consider anti-osteoporosis therapy.",
    "vbq-missing": "No VBQ score yet: obtain the pre-procedure lumbar MRI for scoring.",
}


@login_not_required
@require_GET
def discovery(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"services": [{
        "hook": "patient-view",
        "id": SERVICE_ID,
        "title": "VBQ follow-up after vertebroplasty",
        "description": "Shows open follow-up alerts (high VBQ without therapy, secondary "
        "fracture, missing VBQ) from the VBQ Registry.",
        "prefetch": {"patient": "Patient/{{context.patientId}}"},
    }]})


@csrf_exempt
@login_not_required
@require_POST
def patient_view(request: HttpRequest) -> JsonResponse:
    try:
        feed = feed_from_request(request)
    except RateLimited as exc:
        response = JsonResponse({"error": "too many failed token attempts"}, status=429)
        response["Retry-After"] = str(exc.retry_after_seconds)
        return response
    if feed is None:
        return JsonResponse({"error": "a valid bearer token is required"}, status=401)
    try:
        body = json.loads(request.body or b"{}")
        context = body["context"]
        patient_ref = str(context["patientId"])
    except (ValueError, KeyError, TypeError):
        return JsonResponse({"error": "body must be a CDS Hooks request with "
                                      "context.patientId"}, status=400)
    candidates = [(settings.CDS_PATIENT_ID_SYSTEM, patient_ref)]
    prefetch_patient = (body.get("prefetch") or {}).get("patient") or {}
    for ident in prefetch_patient.get("identifier", []) if isinstance(prefetch_patient, dict) \
            else []:
        if isinstance(ident, dict) and ident.get("system") and ident.get("value"):
            candidates.append((ident["system"], str(ident["value"])))
    identifier = None
    for system, value in candidates:
        identifier = PatientIdentifier.objects.filter(system=system, value=value).first()
        if identifier:
            break
    if identifier is None:
        return JsonResponse({"cards": []})
    patient = identifier.patient
    cards: list[dict[str, Any]] = []
    index = index_procedure(patient=patient)
    for alert in Alert.objects.filter(patient=patient, status__in=OPEN_ALERT_STATUSES):
        days = (clinic_today() - index.performed_on).days if index else None
        basis = (f"{alert.vbq_threshold_field} threshold" if alert.vbq_threshold_field
                 else "default threshold, field strength unknown")
        vbq = f"VBQ {alert.vbq_value:.2f} (high ≥ {alert.vbq_threshold:g}, {basis}). " \
            if alert.vbq_value is not None and alert.vbq_threshold is not None else ""
        cards.append({
            "uuid": f"vbq-alert-{alert.pk}",
            "summary": "Fracture risk after vertebroplasty: follow-up needed"[:140],
            "indicator": "critical" if alert.escalation_level else "warning",
            "detail": f"{rule_label(alert.rule_id)}. {vbq}{days} days since the index "
                      f"procedure. {alert.reason}. "
                      f"{SUGGESTED_ACTION.get(alert.rule_id, '')}",
            "source": {"label": "VBQ Registry", "url": f"{settings.SITE_URL}/worklist/"},
        })
    audit_record(actor=Actor(feed_id=feed.pk, via="cds-hooks"), action=AuditAction.READ,
                 object_type="Patient", object_id=str(patient.pk), patient_id=patient.pk,
                 detail={"cards": len(cards)})
    return JsonResponse({"cards": cards})
