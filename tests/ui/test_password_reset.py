"""Password reset by email: the link in the email sets a new password once."""

import re

import pytest
from django.core import mail
from django.urls import reverse

pytestmark = pytest.mark.django_db


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
