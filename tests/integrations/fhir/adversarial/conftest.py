"""Fixtures of the adversarial FHIR suite: feeds (their tokens) and a request helper that
sends raw bytes with any header, as an attacker or a broken interface would."""

from __future__ import annotations

from typing import Any

import pytest

from registry.feeds import feed_create
from tests.integrations.fhir.adversarial.helpers import FHIR, encode


@pytest.fixture
def token(db) -> str:
    return feed_create(name="adv-ehr")[1]


@pytest.fixture
def other_token(db) -> str:
    return feed_create(name="other-ehr")[1]


@pytest.fixture
def send(client, token):
    """``send(method, path, body=None, content_type=FHIR, token=..., **headers)``: the
    request through Django's full stack (middleware, urls, views); headers as HTTP_* keys
    or plain names (``If-None-Exist``)."""

    def _send(method: str, path: str, body: Any = None, content_type: str | None = FHIR,
              bearer: str | None = None, **headers: str) -> Any:
        extra: dict[str, str] = {}
        for name, value in headers.items():
            key = name if name.isupper() and not name.startswith("-") else (
                "HTTP_" + name.upper().replace("-", "_"))
            extra[key] = value
        if bearer is None:
            bearer = token
        if bearer:
            extra["HTTP_AUTHORIZATION"] = f"Bearer {bearer}"
        data = encode(body) if body is not None else b""
        kwargs: dict[str, Any] = {}
        if content_type is not None:
            kwargs["content_type"] = content_type
            extra.setdefault("CONTENT_TYPE", content_type)  # (an empty body keeps it too)
        return client.generic(method, path, data, **kwargs, **extra)

    return _send
