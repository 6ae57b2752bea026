"""VBQ results as FHIR Observations (read at ``GET /fhir/Observation/<id>``).

The Observation carries both values as components (all levels / excluding fractured levels),
one component per measured level, the method and algorithm version, and ``derivedFrom`` the
ImagingStudy. Registered in ``integrations.fhir.read.READERS`` at import
(``IntegrationsConfig.ready`` imports it).
"""

from __future__ import annotations

from typing import Any

from integrations.fhir import read
from scoring.models import VbqResult

VBQ_CODE = {"system": "https://vbq-registry.example.org/fhir/CodeSystem/vbq",
            "code": "vbq-score", "display": "MRI vertebral bone quality (VBQ) score"}
STATUS = {"succeeded": "final", "needs_review": "preliminary", "failed": "cancelled",
          "queued": "registered", "running": "registered"}


def _component(code: str, display: str, value: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {"code": {"coding": [{"system": VBQ_CODE["system"], "code": code,
                                                "display": display}]}}
    if value is not None:
        out["valueQuantity"] = {"value": round(value, 4), "unit": "ratio",
                                "system": "http://unitsofmeasure.org", "code": "1"}
    else:
        out["dataAbsentReason"] = {"text": "not measured"}
    return out


def observation(pk: str) -> dict[str, Any] | None:
    if not pk.isdigit():
        return None
    result = (VbqResult.objects.select_related("series__study").prefetch_related("levels")
              .filter(pk=int(pk)).first())
    if result is None:
        return None
    status = "entered-in-error" if result.review_status == "rejected" else STATUS.get(
        result.status, "unknown")
    if result.review_status == "accepted":
        status = "final"
    body: dict[str, Any] = {
        "resourceType": "Observation", "id": str(result.pk), "status": status,
        "category": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "imaging"}]}],
        "code": {"coding": [VBQ_CODE]},
        "subject": {"reference": f"Patient/{result.patient_id}"},
        "method": {"text": f"VBQ engine {result.algorithm_version} ({result.source})"},
        "component": [
            _component("vbq-all-levels", "VBQ, L1–L4", result.vbq_all_levels),
            _component("vbq-excluding-fractured", "VBQ excluding fractured levels",
                       result.vbq_excluding_fractured),
            *[_component(f"median-si-{lv.level}", f"Median SI {lv.level}", lv.median_si)
              for lv in result.levels.all()],
        ],
    }
    if result.finished_at:
        body["effectiveDateTime"] = result.finished_at.isoformat()
    if result.series_id:
        body["derivedFrom"] = [{"reference": f"ImagingStudy/{result.series.study_id}"}]
    if result.qc_flags:
        body["note"] = [{"text": "; ".join(f"{f.get('code')}: {f.get('message')}"
                                           for f in result.qc_flags)[:1000]}]
    return body


read.READERS["Observation"] = observation
