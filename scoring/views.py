"""Clinic pages of the scoring app: VBQ review (slice image, ROIs, accept / reject / correct),
the needs-review queue, VBQ job status and the DICOM upload page.

URLs carry only database ids (result id, patient UUID), never names or MRNs. Every page that
shows a patient's data writes a ``read`` AuditEvent; every review action is audited by
``scoring.review``.
"""

from __future__ import annotations

import json
import logging

from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from registry.models import AuditAction, Patient
from registry.side_effects import Actor, audit_record
from scoring import review
from scoring.fractured import pending_recompute
from scoring.identity import HELD_PREFIX
from scoring.models import ImagingStudy, VbqResult
from scoring.trust import result_is_trusted, threshold_of, untrusted_reason
from scoring.uploads import IDENTITY_OVERRIDE_REASONS

logger = logging.getLogger(__name__)
REVIEW_PERM = "registry.review_vbq"
PHI_PERM = "registry.view_identified_data"


def _actor(request: HttpRequest) -> Actor:
    return Actor(user_id=request.user.pk, via="ui")


def _result(result_id: int) -> VbqResult:
    return get_object_or_404(
        VbqResult.objects.select_related("patient", "series__study", "reviewer"), pk=result_id)


def _float_param(request: HttpRequest, name: str) -> float | None:
    try:
        return float(request.GET[name])
    except (KeyError, ValueError):
        return None


@require_GET
@permission_required(PHI_PERM, raise_exception=True)
def review_queue(request: HttpRequest) -> HttpResponse:
    """The needs-review queue. Reviewers (``registry.review_vbq``: clinicians, admins) open each
    result from it; coordinators see it read-only (who waits and why, a link to the patient,
    the held received studies) to chase a reviewer: judging a VBQ stays a clinician's act."""
    page = Paginator(review.review_queue(), 25).get_page(request.GET.get("page"))
    for result in page:
        pending = pending_recompute(result.qc_flags)
        result.why = untrusted_reason(result) or (
            f"fractured levels: {pending['message']}" if pending else "")
    # received studies held (C-STORE: the DICOM patient does not match the registry's)
    held = ImagingStudy.objects.filter(record_status="active",
                                       link_reason__startswith=HELD_PREFIX).order_by(
        "-created_at")[:25]
    return render(request, "scoring/queue.html", {"page": page, "held": held})


@require_GET
@permission_required(REVIEW_PERM, raise_exception=True)
def review_page(request: HttpRequest, result_id: int) -> HttpResponse:
    result = _result(result_id)
    audit_record(actor=_actor(request), action=AuditAction.READ, object_type="VbqResult",
                 object_id=str(result.pk), patient_id=result.patient_id)
    levels = {lv.level: lv for lv in result.levels.all()}
    level_names = sorted({*review.ROI_LEVELS, *levels}, key=review.level_order)
    viewer: dict = {"error": ""}
    try:
        series = review.load_series(result)
    except review.ReviewError as exc:
        viewer["error"] = exc.messages[0]
    else:
        mid = review.chosen_slice(result, series)
        n, rows, cols = series.pixels.shape
        centre, width = review.default_window(series.pixels[mid])
        viewer.update({
            "result_id": result.pk, "login_url": reverse("login"),
            "image_url": reverse("vbq-review-image", args=[result.pk]),
            "preview_url": reverse("vbq-review-preview", args=[result.pk]),
            "save_url": reverse("vbq-review-save", args=[result.pk]),
            "rows": rows, "cols": cols, "slice": mid,
            "slice_min": max(0, mid - review.SLICE_SCROLL),
            "slice_max": min(n - 1, mid + review.SLICE_SCROLL),
            "window_centre": round(centre), "window_width": round(width),
            "spacing_mm": list(series.pixel_spacing_mm),
            "rois": review.stored_rois(result),
            "fractured": list(result.fractured_levels or []),
        })
    history = (VbqResult.objects.filter(series_id=result.series_id).exclude(pk=result.pk)
               .select_related("reviewer").order_by("-queued_at", "-pk")[:10]
               if result.series_id else [])
    return render(request, "scoring/review.html", {
        "result": result, "patient": result.patient,
        "level_rows": [(name, levels.get(name), name in review.VBQ_LEVELS or name == "csf")
                       for name in level_names],
        "level_names": level_names, "vbq_levels": review.VBQ_LEVELS,
        "counts": result_is_trusted(result), "not_counting": untrusted_reason(result),
        "threshold": threshold_of(result.field_strength_t),
        "viewer": viewer, "reasons": review.REJECT_REASONS, "history": history,
        "qc_flags": result.qc_flags or [],
    })


@require_GET
@permission_required(PHI_PERM, raise_exception=True)
def review_image(request: HttpRequest, result_id: int) -> HttpResponse:
    """The slice as PNG: ``?slice=`` (chosen slice ±2), ``&wc=&ww=`` window, ``&overlay=1``."""
    result = _result(result_id)
    try:
        series = review.load_series(result)
        mid = review.chosen_slice(result, series)
        wanted = request.GET.get("slice", "")
        index = int(wanted) if wanted.lstrip("-").isdigit() else mid
        if abs(index - mid) > review.SLICE_SCROLL:
            return HttpResponse("slice outside the reviewable range", status=400,
                                content_type="text/plain")
        rois = review.stored_rois(result) if request.GET.get("overlay") == "1" else None
        png = review.render_png(series, slice_index=index, centre=_float_param(request, "wc"),
                                width=_float_param(request, "ww"), rois=rois)
    except review.ReviewError as exc:
        return HttpResponse(exc.messages[0], status=404, content_type="text/plain")
    response = HttpResponse(png, content_type="image/png")
    response["Cache-Control"] = "private, no-store"  # patient images stay off shared disks
    return response


def _json_body(request: HttpRequest) -> dict:
    try:
        body = json.loads(request.body or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise review.ReviewError("the request body is not JSON", code="json") from exc
    if not isinstance(body, dict):
        raise review.ReviewError("the request body must be a JSON object", code="json")
    return body


def _rois_from(request: HttpRequest, result: VbqResult) -> tuple[dict, list[str], str]:
    body = _json_body(request)
    series = review.load_series(result)
    n, rows, cols = series.pixels.shape
    rois = review.parse_rois(body.get("rois"), n_slices=n, shape=(rows, cols))
    fractured = review.parse_levels(body.get("fractured_levels") or [])
    return rois, fractured, str(body.get("note", ""))[:400]


@require_POST
@permission_required(REVIEW_PERM, raise_exception=True)
def review_preview(request: HttpRequest, result_id: int) -> JsonResponse:
    """Recompute with the posted ROIs and answer the VBQ; nothing is saved."""
    result = _result(result_id)
    try:
        rois, fractured, _ = _rois_from(request, result)
        measurement = review.review_preview(result=result, rois=rois,
                                            fractured_levels=fractured)
    except review.ReviewError as exc:
        return JsonResponse({"error": exc.messages[0]}, status=400)
    return JsonResponse({**review.measurement_summary(measurement),
                         "on_save": review.save_outcome(result=result,
                                                        measurement=measurement)})


@require_POST
@permission_required(REVIEW_PERM, raise_exception=True)
def review_save(request: HttpRequest, result_id: int) -> JsonResponse:
    """Recompute with the posted ROIs and save a new manual result with the reviewer."""
    result = _result(result_id)
    try:
        rois, fractured, note = _rois_from(request, result)
        new = review.review_save_corrected(result=result, rois=rois, fractured_levels=fractured,
                                           actor=_actor(request), note=note)
    except review.ReviewError as exc:
        return JsonResponse({"error": exc.messages[0]}, status=400)
    if new.review_status == VbqResult.Review.ACCEPTED:
        messages.success(request, f"Saved corrected result {new.pk} (revision {new.revision}), "
                                  "accepted: the follow-up uses it.")
    else:
        messages.warning(request, f"Saved corrected result {new.pk} (revision {new.revision}) "
                                  "to the needs-review queue: "
                                  f"{untrusted_reason(new)}. It moves no alert until a "
                                  "reviewer accepts it.")
    return JsonResponse({"id": new.pk, "url": reverse("vbq-review", args=[new.pk]),
                         "review_status": new.review_status,
                         "vbq_all_levels": new.vbq_all_levels,
                         "vbq_excluding_fractured": new.vbq_excluding_fractured}, status=201)


@require_POST
@permission_required(REVIEW_PERM, raise_exception=True)
def review_action(request: HttpRequest, result_id: int, action: str) -> HttpResponse:
    """Form posts: accept, reject (coded reason), fractured (levels)."""
    result = _result(result_id)
    actor = _actor(request)
    try:
        if action in {"accept", "reject"}:
            review.review_decide(result=result, decision=action, actor=actor,
                                 reason=request.POST.get("reason", ""),
                                 note=request.POST.get("note", "").strip())
            messages.success(request, f"Result {result.pk}: {action}ed.")
        elif action == "fractured":
            review.review_mark_fractured(result=result, levels=request.POST.getlist("levels"),
                                         actor=actor)
            messages.success(request, f"Result {result.pk}: fractured levels saved.")
        else:
            return HttpResponse("Unknown action", status=404)
    except review.ReviewError as exc:
        messages.error(request, f"Result {result.pk}: {exc.messages[0]}")
    if request.headers.get("Accept") == "application/json":
        # the review page's script posts the form itself (to keep it through an expired
        # session) and then opens this URL, where the message above is shown
        return JsonResponse({"url": reverse("vbq-review", args=[result.pk])})
    return redirect("vbq-review", result_id=result.pk)


@require_GET
@permission_required(PHI_PERM, raise_exception=True)
def job_list(request: HttpRequest) -> HttpResponse:
    """VBQ jobs, newest first; the table refreshes itself from ``/api/imaging/jobs/``."""
    status = request.GET.get("status", "")
    qs = VbqResult.objects.select_related("patient").order_by("-queued_at", "-pk")
    if status in VbqResult.Status.values:
        qs = qs.filter(status=status)
    else:
        status = ""
    jobs = list(qs[:50])
    for job in jobs:
        job.run_seconds = ((job.finished_at - job.started_at).total_seconds()
                           if job.started_at and job.finished_at else None)
    return render(request, "scoring/jobs.html", {
        "jobs": jobs, "status": status, "statuses": VbqResult.Status.choices,
        "api_url": reverse("api-vbq-job-list"),
    })


@require_GET
@permission_required(PHI_PERM, raise_exception=True)
def upload_page(request: HttpRequest, patient_id: str) -> HttpResponse:
    patient = get_object_or_404(Patient, pk=patient_id)
    audit_record(actor=_actor(request), action=AuditAction.READ, object_type="Patient",
                 object_id=str(patient.pk), patient_id=patient.pk,
                 detail={"page": "dicom-upload"})
    return render(request, "scoring/upload.html", {
        "patient": patient,
        "upload_url": reverse("api-dicom-upload", args=[patient.pk]),
        "override_reasons": IDENTITY_OVERRIDE_REASONS,
        "jobs_url": reverse("vbq-jobs"),
    })
