"""Security response headers: Content-Security-Policy and Permissions-Policy.

The policy is strict: everything from our own origin, no inline ``<script>``, no ``eval``, no
framing, no plugins. Templates must load JavaScript from ``static/`` files and pass data through
``data-*`` attributes or ``{{ value|json_script:"id" }}`` (a JSON
``<script type="application/json">`` block, which CSP does not execute). A view that really
needs a different policy sets the response header itself; the middleware never overwrites it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse

logger = logging.getLogger(__name__)

DEFAULT_CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

# Swagger UI sets style attributes from JavaScript; its scripts still come from our origin only.
API_DOCS_CSP = DEFAULT_CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")

DEFAULT_PERMISSIONS_POLICY = ", ".join(
    f"{feature}=()"
    for feature in (
        "accelerometer",
        "camera",
        "display-capture",
        "geolocation",
        "gyroscope",
        "magnetometer",
        "microphone",
        "payment",
        "usb",
        "interest-cohort",
    )
)


def policy_for_path(path: str) -> str:
    """The Content-Security-Policy for a request path."""
    if path.startswith("/api/docs/"):
        return API_DOCS_CSP
    return getattr(settings, "CONTENT_SECURITY_POLICY", DEFAULT_CSP)


class SecurityHeadersMiddleware:
    """Add CSP and Permissions-Policy headers to every response that has none yet."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if "Content-Security-Policy" not in response:
            response["Content-Security-Policy"] = policy_for_path(request.path)
        if "Permissions-Policy" not in response:
            response["Permissions-Policy"] = getattr(
                settings, "PERMISSIONS_POLICY", DEFAULT_PERMISSIONS_POLICY
            )
        return response


class DatabaseUnavailableMiddleware:
    """Answer 503 + Retry-After (not 500) when the database connection fails mid-request.

    A PostgreSQL restart or failover breaks open connections: the request's transaction was
    rolled back, so nothing was half-written and the client may simply retry. FHIR clients get
    an OperationOutcome (``transient``), others a small JSON body.
    """

    RETRY_AFTER_SECONDS = 5

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        from django.db import InterfaceError, OperationalError
        from django.http import JsonResponse

        if not isinstance(exception, OperationalError | InterfaceError):
            return None
        logger.warning("database unavailable: %s", type(exception).__name__)
        if request.path.startswith("/fhir"):
            body = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "transient",
                           "diagnostics": "Database temporarily unavailable; retry."}],
            }
            response = JsonResponse(body, status=503, content_type="application/fhir+json")
        else:
            response = JsonResponse({"detail": "Database temporarily unavailable; retry."},
                                    status=503)
        response["Retry-After"] = str(self.RETRY_AFTER_SECONDS)
        return response
