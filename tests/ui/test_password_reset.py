"""Password reset by email: the link in the email sets a new password once."""

import re

import pytest
from django.core import mail
from django.core.cache import cache
from django.urls import reverse

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _empty_cache():
    cache.clear()  # the rate-limit counters live in the cache
    yield
    cache.clear()


def test_a_user_resets_the_password_through_the_emailed_link_once(client, role_user, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    user = role_user("coordinator")
    user.email = "coordinator@example.org"
    user.save()
    assert b"Forgot your password?" in client.get(reverse("login")).content
    response = client.post(reverse("password_reset"), {"email": "coordinator@example.org"})
    assert response.status_code == 302
    assert len(mail.outbox) == 1
    link = re.search(r"https?://[^/]+(/accounts/reset/\S+/)", mail.outbox[0].body).group(1)
    form = client.get(link, follow=True)
    assert b"Choose a new password" in form.content
    new = "another-long-password-42"
    done = client.post(form.redirect_chain[-1][0], {"new_password1": new, "new_password2": new})
    assert done.status_code == 302
    assert client.login(username=user.username, password=new)
    client.logout()
    assert b"does not work" in client.get(link, follow=True).content


def test_an_unknown_address_gets_the_same_answer_and_no_email(client, db, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    response = client.post(reverse("password_reset"), {"email": "nobody@example.org"})
    assert response.status_code == 302
    assert response["Location"] == reverse("password_reset_done")
    assert mail.outbox == []


def test_reset_requests_for_one_address_are_limited_and_send_no_more_email(
        client, role_user, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.PASSWORD_RESET_RATE_LIMIT = 2
    user = role_user("coordinator")
    user.email = "coordinator@example.org"
    user.save()
    for _ in range(2):
        ok = client.post(reverse("password_reset"), {"email": "Coordinator@example.org"})
        assert ok.status_code == 302
    assert len(mail.outbox) == 2
    refused = client.post(reverse("password_reset"), {"email": "coordinator@example.org"})
    assert refused.status_code == 429
    assert int(refused["Retry-After"]) > 0
    assert b"Too many reset requests" in refused.content
    assert len(mail.outbox) == 2  # nothing sent over the limit
    # Another address from the same client is still served (until the per-IP limit).
    other = client.post(reverse("password_reset"), {"email": "someone-else@example.org"})
    assert other.status_code == 302


def test_the_limit_does_not_tell_known_from_unknown_addresses(client, role_user, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.PASSWORD_RESET_RATE_LIMIT = 1
    user = role_user("coordinator")
    user.email = "known@example.org"
    user.save()
    answers = {}
    for address in ("known@example.org", "unknown@example.org"):
        answers[address] = [client.post(reverse("password_reset"), {"email": address}).status_code
                            for _ in range(2)]
    assert answers["known@example.org"] == answers["unknown@example.org"] == [302, 429]


def test_one_client_cycling_addresses_hits_the_per_ip_limit(client, db, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.PASSWORD_RESET_RATE_LIMIT = 1
    codes = [client.post(reverse("password_reset"), {"email": f"user{i}@example.org"}).status_code
             for i in range(5)]
    assert codes == [302, 302, 302, 302, 429]  # 4 x the per-address limit per IP
