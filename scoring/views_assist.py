"""The review page's "Place ROIs from one click" endpoint (kept apart from ``scoring.views``).

``POST /vbq/review/<id>/assist/`` with JSON ``{level, slice_index, row, col}``: the engine's
assisted path runs on the result's series and its ROIs are saved as a new pending result
(``scoring.assist.review_assist``); the answer names it and its review page (201), or gives
the reason nothing could be placed (400). Audited by ``scoring.assist``.
"""

from __future__ import annotations

import json

from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.views.decorators.http import require_POST

from registry.side_effects import Actor
from scoring.assist import review_assist
from scoring.engine import VbqMeasurement
from scoring.models import VbqResult
from scoring.review import ReviewError, measurement_summary

REVIEW_PERM = "registry.review_vbq"


@require_POST
@permission_required(REVIEW_PERM, raise_exception=True)
def review_assist_view(request: HttpRequest, result_id: int) -> JsonResponse:
    result = get_object_or_404(VbqResult.objects.select_related("series__study"),
                               pk=result_id)
    try:
        body = json.loads(request.body or b"{}")
    except (ValueError, UnicodeDecodeError):
        return JsonResponse({"error": "the request body is not JSON"}, status=400)
    try:
        new = review_assist(result=result, seed_data=body,
                            actor=Actor(user_id=request.user.pk, via="ui"))
    except ReviewError as exc:
        return JsonResponse({"error": exc.messages[0]}, status=400)
    messages.success(request, f"ROIs placed from one click: result {new.pk} (revision "
                     f"{new.revision}) waits for your review.")
    return JsonResponse({
        "id": new.pk, "url": reverse("vbq-review", args=[new.pk]),
        **measurement_summary(VbqMeasurement.from_dict(new.measurement)),
    }, status=201)
