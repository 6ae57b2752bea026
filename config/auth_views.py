"""Login and password reset behind rate limits (see ``config.ratelimit``)."""

from __future__ import annotations

import logging

from django.contrib.auth import views as auth_views
from django.http import HttpRequest, HttpResponse

from config import ratelimit

logger = logging.getLogger(__name__)


class RateLimitedLoginView(auth_views.LoginView):
    """Django's LoginView; after too many failures from one IP (+username) it answers 429."""

    def post(self, request: HttpRequest, *args, **kwargs) -> HttpResponse:
        ip = ratelimit.client_ip(request)
        username = request.POST.get("username", "")[:150]
        window = ratelimit.login_blocked(ip=ip, username=username)
        if window is not None:
            logger.warning("login rate limit hit; retry in %s s", window.retry_after_seconds)
            # An unbound form: binding would run authenticate() and leak the answer.
            form = self.get_form_class()(request=request)
            context = self.get_context_data(form=form, rate_limited=True)
            response = self.render_to_response(context, status=429)
            response["Retry-After"] = str(window.retry_after_seconds)
            return response
        response = super().post(request, *args, **kwargs)
        if response.status_code == 200:  # the form was re-rendered: credentials rejected
            ratelimit.login_failed(ip=ip, username=username)
        return response


class RateLimitedPasswordResetView(auth_views.PasswordResetView):
    """Django's PasswordResetView (no account enumeration, one-time tokens); too many requests
    from one IP (+address) answer 429 and send no email, so the form cannot be used to flood a
    colleague's mailbox or the outgoing mail server."""

    def post(self, request: HttpRequest, *args, **kwargs) -> HttpResponse:
        window = ratelimit.password_reset_hit(
            ip=ratelimit.client_ip(request), email=request.POST.get("email", "")[:254])
        if window is not None:
            logger.warning("password reset rate limit hit; retry in %s s",
                           window.retry_after_seconds)
            form = self.get_form_class()()
            context = self.get_context_data(form=form, rate_limited=True)
            response = self.render_to_response(context, status=429)
            response["Retry-After"] = str(window.retry_after_seconds)
            return response
        return super().post(request, *args, **kwargs)
