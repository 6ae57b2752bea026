"""Login with a failed-attempt rate limit (see ``config.ratelimit``)."""

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
