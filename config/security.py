"""Security response headers: Content-Security-Policy and Permissions-Policy.

The policy is strict: everything from our own origin, no inline ``<script>``, no ``eval``, no
framing, no plugins. Templates must load JavaScript from ``static/`` files and pass data through
``data-*`` attributes or ``{{ value|json_script:"id" }}`` (a JSON
``<script type="application/json">`` block, which CSP does not execute). A view that really
needs a different policy sets the response header itself; the middleware never overwrites it.
"""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse

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
