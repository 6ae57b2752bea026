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
from django.contrib.auth.middleware import LoginRequiredMiddleware
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import resolve_url

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


class ScriptAwareLoginRequiredMiddleware(LoginRequiredMiddleware):
    """Django's ``LoginRequiredMiddleware``, except that a request sent by a page script
    (header ``X-Requested-With: fetch``, as ``static/js/worklist.js`` sends) whose session has
    ended gets ``401`` JSON with the login URL instead of a redirect to the login page, which
    a script would follow and read as HTML. The page then asks the user to log in again and
    keeps what they typed. Browsers navigating still get the redirect."""

    def handle_no_permission(self, request: HttpRequest, view_func: Callable) -> HttpResponse:
        if request.headers.get("X-Requested-With") == "fetch":
            return JsonResponse(
                {"error": "session-ended",
                 "detail": "Your session has ended: log in again.",
                 "login_url": resolve_url(self.get_login_url(view_func))},
                status=401)
        return super().handle_no_permission(request, view_func)
