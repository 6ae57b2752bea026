"""A FHIR request with a missing or wrong token is refused BEFORE its body is read.

Over a real socket to ``live_server``: the request announces a 3 MiB body (under the 4 MiB that
the former ``on_feed_authenticated`` path read before checking the token) and sends only its
first 64 KiB. A refusal must arrive while the rest is still unsent — a server that read the
body would wait for it and answer nothing. The control case (a valid token) shows that this
harness does see a server that reads the body: no answer until the whole body is sent.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from django.core.cache import cache

from integrations.models import InboundMessage
from registry.feeds import feed_create, feed_rotate_token
from registry.models import Feed

FHIR = "application/fhir+json"
ANNOUNCED = 3 * 1024 * 1024
SENT_FIRST = 64 * 1024


@pytest.fixture(autouse=True)
def _no_rate_limit_carried_over() -> Iterator[None]:
    cache.clear()  # the failed-token counters (per client IP) live in the cache
    yield
    cache.clear()


def _authorization(case: str, feed_tokens: dict[str, str]) -> str | None:
    return {
        "missing": None,
        "empty bearer": "Bearer ",
        "wrong scheme": f"Basic {feed_tokens['valid']}",
        "wrong token": "Bearer vbqf_" + "x" * 43,
        "rotated (old) token": f"Bearer {feed_tokens['old']}",
        "inactive feed": f"Bearer {feed_tokens['inactive']}",
    }[case]


def _tokens() -> dict[str, str]:
    _, valid = feed_create(name="socket-ehr")
    rotated, old = feed_create(name="rotated-ehr")
    feed_rotate_token(feed=rotated)
    inactive, inactive_token = feed_create(name="inactive-ehr")
    Feed.objects.filter(pk=inactive.pk).update(is_active=False)
    return {"valid": valid, "old": old, "inactive": inactive_token}


def _start_post(url: str, authorization: str | None) -> socket.socket:
    """Open a connection, send the head of a POST announcing ``ANNOUNCED`` bytes and the first
    ``SENT_FIRST`` of them."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    head = ["POST /fhir HTTP/1.1", f"Host: {parts.netloc}", f"Content-Type: {FHIR}",
            f"Content-Length: {ANNOUNCED}"]
    if authorization is not None:
        head.append(f"Authorization: {authorization}")
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + b" " * SENT_FIRST)
    return sock


def _response(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes]:
    sock.settimeout(timeout)
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, dict(response.getheaders()), response.read()


@pytest.mark.postgres
@pytest.mark.parametrize("case", ["missing", "empty bearer", "wrong scheme", "wrong token",
                                  "rotated (old) token", "inactive feed"])
def test_a_refused_token_is_answered_before_the_body_is_sent(live_server, transactional_db,
                                                             case):
    authorization = _authorization(case, _tokens())
    sock = _start_post(live_server.url, authorization)
    try:
        # ANNOUNCED - SENT_FIRST bytes are still unsent: only a server that did not wait for
        # the body can answer now
        status, headers, body = _response(sock, timeout=10)
    finally:
        sock.close()
    assert status == 401
    assert headers["Content-Type"].startswith(FHIR)
    outcome = json.loads(body)
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "security"
    assert InboundMessage.objects.count() == 0


@pytest.mark.postgres
def test_control_with_a_valid_token_the_server_waits_for_the_body(live_server,
                                                                  transactional_db):
    """The harness can fail: an authenticated request is read in full, so nothing is answered
    before the body is complete; then it is stored (rejected: not JSON) byte for byte."""
    tokens = _tokens()
    sock = _start_post(live_server.url, f"Bearer {tokens['valid']}")
    try:
        with pytest.raises(TimeoutError):
            _response(sock, timeout=1.5)
        sock.settimeout(10)
        sock.sendall(b" " * (ANNOUNCED - SENT_FIRST))
        response = http.client.HTTPResponse(sock)
        response.begin()
        status = response.status
        response.read()
    finally:
        sock.close()
    assert status == 400
    message = InboundMessage.objects.get()
    assert (message.size_bytes, message.outcome, message.status_code) == (
        ANNOUNCED, "rejected", 400)


class _CountingInput(io.RawIOBase):
    """``wsgi.input`` that counts the bytes the application reads from it."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        chunk = self._data.read(-1 if size is None else size)
        self.bytes_read += len(chunk)
        return chunk

    def readline(self, size: int | None = -1) -> bytes:
        line = self._data.readline(-1 if size is None else size)
        self.bytes_read += len(line)
        return line


@pytest.mark.django_db
@pytest.mark.parametrize("authorization", [None, "Bearer vbqf_wrong", "Basic dXNlcjpwdw=="])
def test_a_refused_request_reads_no_byte_of_its_body(client, authorization):
    """In process, with a spy as ``wsgi.input``: 401, zero bytes read, nothing stored."""
    feed_create(name="spy-ehr")
    payload = json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": []})
    spy = _CountingInput(payload.encode())
    extra = {"HTTP_AUTHORIZATION": authorization} if authorization else {}
    response = client.post("/fhir", data=payload, content_type=FHIR,
                           **{"wsgi.input": spy}, **extra)
    assert response.status_code == 401
    assert response.json()["resourceType"] == "OperationOutcome"
    assert spy.bytes_read == 0
    assert InboundMessage.objects.count() == 0


@pytest.mark.django_db
def test_a_throttled_request_reads_no_byte_of_its_body(client, settings):
    """Over the failed-token limit the answer is 429 + Retry-After, the body unread too; and
    the spy does count the body of an authenticated request."""
    settings.FEED_AUTH_FAILURE_LIMIT = 1
    _, token = feed_create(name="throttled-ehr")
    payload = json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": []})
    first = _CountingInput(payload.encode())
    assert client.post("/fhir", data=payload, content_type=FHIR, HTTP_AUTHORIZATION="Bearer x",
                       **{"wsgi.input": first}).status_code == 401
    spy = _CountingInput(payload.encode())
    response = client.post("/fhir", data=payload, content_type=FHIR,
                           HTTP_AUTHORIZATION=f"Bearer {token}", **{"wsgi.input": spy})
    assert response.status_code == 429
    assert response["Retry-After"]
    assert (first.bytes_read, spy.bytes_read) == (0, 0)
    assert InboundMessage.objects.count() == 0
    cache.clear()
    spy = _CountingInput(payload.encode())
    assert client.post("/fhir", data=payload, content_type=FHIR,
                       HTTP_AUTHORIZATION=f"Bearer {token}",
                       **{"wsgi.input": spy}).status_code == 200
    assert spy.bytes_read == len(payload)
