"""Error pages (403, 404, 500) in the clinic's layout, with navigation and a way back.

403 and 404 render with the request (the navigation shows what the user's roles allow, and
"Back" goes to the page they came from when it is on this site). 500 renders with no request
context at all: no session, user or database query, because the error may be the database
itself; it links to the home page only.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseForbidden,
    HttpResponseNotFound,
    HttpResponseServerError,
)
from django.template import loader
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.csrf import requires_csrf_token


def _back_url(request: HttpRequest) -> str:
    """The Referer's path when it is on this site (never another site's URL), else ""."""
    referer = request.META.get("HTTP_REFERER", "")
    if not referer or not url_has_allowed_host_and_scheme(
            referer, allowed_hosts={request.get_host()}, require_https=request.is_secure()):
        return ""
    parts = urlsplit(referer)
    back = parts.path + (f"?{parts.query}" if parts.query else "")
    return "" if back == request.get_full_path() else back


@requires_csrf_token
def permission_denied(request: HttpRequest, exception: Exception | None = None
                      ) -> HttpResponse:
    html = loader.render_to_string("403.html", {"back_url": _back_url(request)}, request)
    return HttpResponseForbidden(html)


@requires_csrf_token
def page_not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    html = loader.render_to_string("404.html", {"back_url": _back_url(request)}, request)
    return HttpResponseNotFound(html)


@requires_csrf_token
def server_error(request: HttpRequest) -> HttpResponse:
    html = loader.get_template("500.html").render({})  # no request: no session, no database
    return HttpResponseServerError(html)
