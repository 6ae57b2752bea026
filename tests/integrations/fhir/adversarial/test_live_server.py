"""The FHIR endpoint under a real gunicorn (docker/gunicorn.conf.py) on a free 127.0.0.1
port, against the test PostgreSQL database:

- bounded hypothesis run of hostile requests (mutated bundles, bytes, encodings, media
  types, paths, methods): never a 5xx, and a refused transaction changes no row count;
- a ``Transfer-Encoding: chunked`` body is read (gunicorn sets ``wsgi.input_terminated``);
- a worker whose memory a request left above ``GUNICORN_MAX_WORKER_MEMORY_MB`` is recycled
  and the server goes on answering.

Bounded by ``FUZZ_LIVE_EXAMPLES`` (default 150) and ``FUZZ_LIVE_SECONDS`` (default 120).
SYNTHETIC data only."""

from __future__ import annotations

import copy
import gzip
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.feeds import feed_create
from tests.conftest import ROOT, test_database_url
from tests.integrations.fhir.adversarial.helpers import (
    FHIR,
    bundle,
    counts,
    imaging,
    medication,
    patient,
    procedure,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

EXAMPLES = int(os.environ.get("FUZZ_LIVE_EXAMPLES", "150"))
SECONDS = float(os.environ.get("FUZZ_LIVE_SECONDS", "120"))


class Gunicorn:
    def __init__(self, tmp: Path, **env: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"gunicorn-{self.port}.log"
        self.env = {**os.environ, "DATABASE_URL": test_database_url(), "DEBUG": "false",
                    "SECRET_KEY": "s" * 64, "ALLOWED_HOSTS": "127.0.0.1",
                    "VAR_DIR": str(tmp), "LOG_LEVEL": "WARNING", "WEB_CONCURRENCY": "2",
                    "GUNICORN_TIMEOUT": "30", **env}
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "wb") as handle:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "--config", "docker/gunicorn.conf.py",
                 "--bind", f"127.0.0.1:{self.port}", "--access-logfile", "/dev/null",
                 "config.wsgi:application"],
                cwd=ROOT, env=self.env, stdout=handle, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if requests.get(f"{self.url}/fhir/metadata", timeout=30).ok:
                    return
            except requests.RequestException:
                time.sleep(0.3)
        raise AssertionError("gunicorn did not start: " + self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture
def server(transactional_db, tmp_path) -> Iterator[Gunicorn]:
    gunicorn = Gunicorn(tmp_path)
    gunicorn.start()
    yield gunicorn
    gunicorn.stop()


@pytest.fixture
def bearer(transactional_db) -> str:
    return feed_create(name="live-ehr")[1]


# --- hypothesis: hostile requests -------------------------------------------------------------
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=80),
    st.sampled_from(["\u0000", "\ud800", "x" * 300, "9999-12-31T23:00:00-12:00",
                     "0001-01-01T00:00:00+14:00", "2023-02-29", "urn:vbq-registry:feed:x:Patient",
                     "#nope", "Patient/..", "DELETE", "a" * 65, "'; DROP TABLE x; --",
                     "urn:uuid:5e1f0000-0000-4000-8000-000000000000", "banana"]),
)
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3)
                      | st.dictionaries(st.text(max_size=10), c, max_size=3), max_leaves=8)
TEMPLATES = [
    lambda: bundle("transaction", patient(), procedure(), medication()),
    lambda: bundle("batch", patient(), procedure(), imaging()),
    lambda: bundle("transaction", patient(), imaging()),
    lambda: patient(),
    lambda: procedure(),
]


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _set(doc, path, value):
    if not path:
        return value
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return doc


@st.composite
def documents(draw):
    doc = copy.deepcopy(draw(st.sampled_from(TEMPLATES))())
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        doc = _set(doc, path, draw(VALUES))
    return doc


@st.composite
def hostile_requests(draw):
    doc = draw(documents())
    resource_type = doc.get("resourceType") if isinstance(doc, dict) else None
    path = draw(st.sampled_from(["/fhir", f"/fhir/{resource_type}", "/fhir/Patient",
                                 "/fhir/Patient?identifier=a%7Cb", "/fhir/Patient/p1",
                                 "/fhir/Procedure/1", "/fhir/metadata", "/fhir/x/y/z",
                                 "/fhir/Patient?identifier=x%00"]))
    method = draw(st.sampled_from(["POST", "POST", "POST", "PUT", "GET", "DELETE", "PATCH"]))
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    raw = text.encode(errors="surrogatepass")  # (a lone surrogate: bytes that are not UTF-8)
    mutation = draw(st.sampled_from(["none", "none", "truncate", "nul", "bytes", "utf16",
                                     "gzip", "bad-gzip", "bom", "dup-key", "deep"]))
    headers = {"Content-Type": draw(st.sampled_from(
        [FHIR, FHIR, "application/json", "text/plain", f"{FHIR}; charset=latin-1", ""]))}
    if mutation == "truncate":
        raw = raw[: draw(st.integers(min_value=0, max_value=len(raw)))]
    elif mutation == "nul":
        at = draw(st.integers(min_value=0, max_value=len(raw)))
        raw = raw[:at] + b"\x00" + raw[at:]
    elif mutation == "bytes":
        raw += draw(st.binary(max_size=40))
    elif mutation == "utf16":
        raw = text.encode("utf-16", errors="surrogatepass")
        headers["Content-Type"] += draw(st.sampled_from(["", "; charset=utf-16"]))
    elif mutation == "gzip":
        raw = gzip.compress(raw)
        headers["Content-Encoding"] = "gzip"
    elif mutation == "bad-gzip":
        headers["Content-Encoding"] = draw(st.sampled_from(["gzip", "deflate", "br"]))
    elif mutation == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif mutation == "dup-key":
        raw = raw.replace(b'"resourceType"', b'"resourceType": "Patient", "resourceType"', 1)
    elif mutation == "deep":
        raw = b'{"resourceType": "Bundle", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    if draw(st.booleans()):
        headers["If-None-Exist"] = draw(st.sampled_from(
            ["identifier=a|b", "identifier=SYN", "_id=1", "identifier=\u00e9", ""]))
    return method, path, headers, raw


def test_hostile_requests_against_a_live_gunicorn_never_answer_5xx(server, bearer):
    end = time.monotonic() + SECONDS
    seen: list[tuple[str, str, int]] = []
    session = requests.Session()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(hostile_requests())
    def run(request):
        if time.monotonic() > end:
            return  # bounded in time as well as in count
        method, path, headers, raw = request
        before = counts()
        response = session.request(method, server.url + path, data=raw, timeout=30,
                                   headers={**headers, "Authorization": f"Bearer {bearer}"})
        seen.append((method, path, response.status_code))
        assert response.status_code < 500, (method, path, headers, raw[:300],
                                            response.text[:500])
        if response.status_code >= 400 and path == "/fhir" and method == "POST":
            assert counts() == before, (raw[:300], response.text[:300])  # no partial write
        if response.status_code >= 400:
            assert response.headers["Content-Type"].startswith(FHIR), response.text[:200]
            assert response.json()["resourceType"] == "OperationOutcome"

    run()
    assert len(seen) >= min(EXAMPLES, 30), len(seen)
    print(f"{len(seen)} hostile requests, statuses: "
          f"{sorted({s for _, _, s in seen})}")
    assert requests.get(f"{server.url}/fhir/metadata", timeout=10).status_code == 200


def test_a_chunked_body_is_read_under_gunicorn(server, bearer):
    body = json.dumps(bundle("transaction", patient("SYN-CHUNKED"))).encode()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)

    def chunks():
        for at in range(0, len(body), 64):
            yield body[at:at + 64]

    connection.request("POST", "/fhir", body=chunks(), encode_chunked=True,
                       headers={"Content-Type": FHIR, "Authorization": f"Bearer {bearer}",
                                "Transfer-Encoding": "chunked"})
    response = connection.getresponse()
    payload = response.read()
    assert response.status == 200, payload[:500]
    assert json.loads(payload)["entry"][0]["response"]["status"] == "201 Created"
    from registry.models import PatientIdentifier

    assert PatientIdentifier.objects.filter(value="SYN-CHUNKED").exists()


def test_a_worker_over_its_memory_cap_is_recycled_and_the_server_goes_on(
        transactional_db, tmp_path, bearer):
    gunicorn = Gunicorn(tmp_path, GUNICORN_MAX_WORKER_MEMORY_MB="1", WEB_CONCURRENCY="1",
                        LOG_LEVEL="INFO")
    gunicorn.start()
    try:
        big = bundle("transaction", patient("SYN-BIG", text={
            "status": "generated",
            "div": '<div xmlns="http://www.w3.org/1999/xhtml">' + "SYNTHETIC " * 200_000
                   + "</div>"}))
        for _ in range(2):
            response = requests.post(f"{gunicorn.url}/fhir", data=json.dumps(big), timeout=60,
                                     headers={"Content-Type": FHIR,
                                              "Authorization": f"Bearer {bearer}"})
            assert response.status_code == 200, response.text[:300]
    finally:
        gunicorn.stop()
    assert "recycled after this request" in gunicorn.log.read_text()
