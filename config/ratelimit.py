"""Fixed-window rate limits in the Django cache (Redis in production, local memory otherwise).

Three users today:

- the login view (``config.auth_views.RateLimitedLoginView``): failed attempts per client IP +
  username, and per client IP alone;
- the password-reset view (``config.auth_views.RateLimitedPasswordResetView``): every request
  is counted (success or not, so the answer never tells whether the address has an account),
  per client IP + address and per client IP alone; over the limit no email is sent;
- bearer-token feeds: call :func:`feed_authenticate_limited` instead of
  ``registry.feeds.feed_authenticate``. Failed token checks are counted per client IP; over
  the limit it raises :class:`RateLimited` *before* looking at the token, so guessing tokens is
  throttled. Answer that with HTTP 429 and ``Retry-After: <retry_after_seconds>``.

Keys are SHA-256 hashes, so usernames and IPs never sit in the cache in clear.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest

from registry.feeds import feed_authenticate

if TYPE_CHECKING:
    from registry.models import Feed


class RateLimited(Exception):
    """Too many attempts; retry after ``retry_after_seconds``."""

    def __init__(self, retry_after_seconds: int) -> None:
        super().__init__(f"rate limited; retry after {retry_after_seconds} s")
        self.retry_after_seconds = retry_after_seconds


@dataclass(frozen=True)
class Window:
    count: int
    limit: int
    retry_after_seconds: int

    @property
    def exceeded(self) -> bool:
        return self.count >= self.limit


def _key(scope: str, parts: tuple[str, ...], window_seconds: int) -> tuple[str, int]:
    bucket = int(time.time()) // window_seconds
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]
    retry_after = window_seconds - int(time.time()) % window_seconds
    return f"rl:{scope}:{bucket}:{digest}", retry_after


def peek(scope: str, *parts: str, limit: int, window_seconds: int) -> Window:
    """The current count without changing it."""
    key, retry_after = _key(scope, parts, window_seconds)
    return Window(int(cache.get(key, 0)), limit, retry_after)


def hit(scope: str, *parts: str, limit: int, window_seconds: int) -> Window:
    """Count one event and return the window after counting it."""
    key, retry_after = _key(scope, parts, window_seconds)
    if cache.add(key, 1, timeout=window_seconds + 1):
        return Window(1, limit, retry_after)
    try:
        count = cache.incr(key)
    except ValueError:  # expired between add() and incr()
        cache.add(key, 1, timeout=window_seconds + 1)
        count = 1
    return Window(int(count), limit, retry_after)


def reset(scope: str, *parts: str, window_seconds: int) -> None:
    key, _ = _key(scope, parts, window_seconds)
    cache.delete(key)


def client_ip(request: HttpRequest) -> str:
    """The client address; behind our TLS proxy, the last hop it appended to X-Forwarded-For."""
    if settings.SECURE_PROXY_SSL_HEADER:
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
        hops = [h.strip() for h in forwarded.split(",") if h.strip()]
        if hops:
            return hops[-1]
    return request.META.get("REMOTE_ADDR", "") or "unknown"


def login_blocked(*, ip: str, username: str) -> Window | None:
    """The exceeded window if this IP (+username) may not try to log in now, else ``None``."""
    window_seconds = settings.LOGIN_RATE_WINDOW_SECONDS
    for scope, parts, limit in (
        ("login-user", (ip, username.lower()), settings.LOGIN_RATE_LIMIT),
        ("login-ip", (ip,), settings.LOGIN_RATE_LIMIT * 4),
    ):
        window = peek(scope, *parts, limit=limit, window_seconds=window_seconds)
        if window.exceeded:
            return window
    return None


def login_failed(*, ip: str, username: str) -> None:
    window_seconds = settings.LOGIN_RATE_WINDOW_SECONDS
    hit("login-user", ip, username.lower(), limit=settings.LOGIN_RATE_LIMIT,
        window_seconds=window_seconds)
    hit("login-ip", ip, limit=settings.LOGIN_RATE_LIMIT * 4, window_seconds=window_seconds)


def password_reset_hit(*, ip: str, email: str) -> Window | None:
    """Count one password-reset request; the exceeded window if it must be refused, else None.

    Every request counts, whether or not the address belongs to an account, so the limit itself
    reveals nothing. Limits: ``PASSWORD_RESET_RATE_LIMIT`` per IP + address and four times that
    per IP, per ``PASSWORD_RESET_RATE_WINDOW_SECONDS``.
    """
    window_seconds = settings.PASSWORD_RESET_RATE_WINDOW_SECONDS
    limit = settings.PASSWORD_RESET_RATE_LIMIT
    blocked = None
    for scope, parts, scope_limit in (
        ("reset-email", (ip, email.strip().lower()), limit),
        ("reset-ip", (ip,), limit * 4),
    ):
        window = hit(scope, *parts, limit=scope_limit, window_seconds=window_seconds)
        if window.count > scope_limit and blocked is None:  # this request is over the limit
            blocked = window
    return blocked


def feed_authenticate_limited(*, token: str, ip: str) -> Feed | None:
    """``registry.feeds.feed_authenticate`` behind a per-IP limit on failed attempts.

    Returns the active Feed or ``None`` (bad token: answer 401). Raises :class:`RateLimited`
    when this IP has failed ``FEED_AUTH_FAILURE_LIMIT`` times in the current window.
    """

    window_seconds = settings.FEED_AUTH_WINDOW_SECONDS
    limit = settings.FEED_AUTH_FAILURE_LIMIT
    window = peek("feed-auth", ip, limit=limit, window_seconds=window_seconds)
    if window.exceeded:
        raise RateLimited(window.retry_after_seconds)
    feed = feed_authenticate(token=token)
    if feed is None:
        hit("feed-auth", ip, limit=limit, window_seconds=window_seconds)
    return feed


def bearer_token(request: HttpRequest) -> str:
    """The token of an ``Authorization: Bearer <token>`` header, or ``""``."""
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else ""


def feed_from_request(request: HttpRequest) -> Feed | None:
    """The active Feed of the request's bearer token, or ``None``; raises :class:`RateLimited`.

    Drop-in for views: ``feed = feed_from_request(request)``; answer ``None`` with 401 and
    ``RateLimited`` with 429 + ``Retry-After: exc.retry_after_seconds``. A request without a
    token is not counted as a failed guess.
    """
    token = bearer_token(request)
    if not token:
        return None
    return feed_authenticate_limited(token=token, ip=client_ip(request))
