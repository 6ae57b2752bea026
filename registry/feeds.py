"""EHR feeds: an API client with a hashed bearer token and its allowed resource types."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Sequence

from django.db import transaction
from django.utils import timezone

from registry.models import (
    AuditAction,
    Feed,
)
from registry.side_effects import SYSTEM_ACTOR, Actor, audit_record


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@transaction.atomic
def feed_create(
    *, name: str, allowed_resource_types: Sequence[str] = (), actor: Actor = SYSTEM_ACTOR
) -> tuple[Feed, str]:
    """Create an EHR feed. Returns ``(feed, token)``; the token is shown once, stored hashed."""
    token = "vbqf_" + secrets.token_urlsafe(32)
    feed = Feed.objects.create(
        name=name,
        token_hash=_hash_token(token),
        token_prefix=token[:12],
        allowed_resource_types=list(allowed_resource_types),
    )
    audit_record(actor=actor, action=AuditAction.CREATE, object_type="Feed", object_id=feed.pk)
    return feed, token


@transaction.atomic
def feed_rotate_token(*, feed: Feed, actor: Actor = SYSTEM_ACTOR) -> str:
    """Replace a feed's token; the old one stops working at once. Returns the new token."""
    token = "vbqf_" + secrets.token_urlsafe(32)
    feed.token_hash = _hash_token(token)
    feed.token_prefix = token[:12]
    feed.token_rotated_at = timezone.now()
    feed.save(update_fields=["token_hash", "token_prefix", "token_rotated_at"])
    audit_record(actor=actor, action=AuditAction.UPDATE, object_type="Feed", object_id=feed.pk)
    return token


def feed_authenticate(*, token: str) -> Feed | None:
    """Return the active feed for a bearer token, or ``None``: one query, on the token's
    SHA-256 (tokens are stored hashed). A caller receiving a payload calls this BEFORE reading
    it (``integrations.fhir.views``: a wrong token is refused unread)."""
    if not token:
        return None
    feed = Feed.objects.filter(token_hash=_hash_token(token), is_active=True).first()
    now = timezone.now()
    # ``last_used_at`` is kept to the minute: not one extra committed write per request.
    if feed is not None and (feed.last_used_at is None
                             or now - feed.last_used_at > dt.timedelta(seconds=60)):
        Feed.objects.filter(pk=feed.pk).update(last_used_at=now)
        feed.last_used_at = now
    return feed
