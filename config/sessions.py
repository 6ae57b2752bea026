"""Idle session timeout without a database write on every request.

``SESSION_SAVE_EVERY_REQUEST`` would give an exact idle timeout, but it writes (and commits)
the session row on every page view, the largest fixed cost of a page. Instead, an authenticated
session is re-saved, with a fresh expiry of ``SESSION_COOKIE_AGE``, at most once every
``SESSION_REFRESH_SECONDS``: a session expires between ``SESSION_COOKIE_AGE -
SESSION_REFRESH_SECONDS`` and ``SESSION_COOKIE_AGE`` after the user's last request.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse

REFRESHED_AT = "_vbq_refreshed_at"


class SessionRefreshMiddleware:
    """Place right after ``SessionMiddleware`` (and after authentication runs)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        user = getattr(request, "user", None)
        session = getattr(request, "session", None)
        if user is not None and session is not None and user.is_authenticated:
            now = int(time.time())
            if now - int(session.get(REFRESHED_AT, 0)) >= settings.SESSION_REFRESH_SECONDS:
                session[REFRESHED_AT] = now  # marks the session modified: saved, new expiry
        return response
