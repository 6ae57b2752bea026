"""An ImagingStudy's ``Endpoint.address`` is provenance, never a destination: a feed that
names a server of its own (here a real HTTP server on another 127.0.0.1 port) gets no
request from the worker or the review page, and never the PACS credentials. Only the
configured PACS is contacted (SYNTHETIC data)."""

from __future__ import annotations

import datetime as dt
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from registry.timeutil import clinic_today
from scoring.dicomweb import FetchError
from scoring.models import ImagingStudy, VbqResult
from scoring.review import ReviewError, series_source
from scoring.tasks import study_received, vbq_compute
from tests.integrations.fhir.adversarial.helpers import bundle, imaging, patient, procedure

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]


class _Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[str, str, str]] = []

    def _answer(self) -> None:
        type(self).seen.append((self.command, self.path,
                                self.headers.get("Authorization", "")))
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def attacker():
    """A real HTTP server on a free 127.0.0.1 port that records every request."""
    _Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", _Recorder.seen
    server.shutdown()
    server.server_close()


@pytest.fixture
def pacs_credentials(settings):
    settings.PACS_DICOMWEB_USERNAME = "syn-pacs-user"
    settings.PACS_DICOMWEB_PASSWORD = "syn-pacs-secret"
    return settings


def _ingest(send, address: str) -> VbqResult:
    index_day = clinic_today() - dt.timedelta(days=5)
    study_day = index_day - dt.timedelta(days=10)
    response = send("POST", "/fhir", bundle(
        "transaction", patient(),
        procedure(performed=f"{index_day.isoformat()}T10:00:00Z"),
        imaging(address=address, started=f"{study_day.isoformat()}T09:00:00Z")))
    assert response.status_code == 200, response.content
    study = ImagingStudy.objects.get()
    assert study.endpoint_url == address  # kept, as provenance
    study_received(study.pk)  # (the job queued after commit, run here in the test's transaction)
    return VbqResult.objects.get(series__study=study)


def _run(result_id: int) -> str:
    """The job, in this process: how it ended (a fetch error, a Retry, or its status)."""
    try:
        return str(vbq_compute(result_id).get("status"))
    except FetchError:
        return "FetchError"
    except Exception as exc:  # Celery's Retry (called directly, no worker)
        return type(exc).__name__


@pytest.mark.parametrize("configured", ["", "http://127.0.0.1:9/dicom-web"])
def test_the_worker_never_fetches_from_the_address_a_feed_sent(
        send, attacker, pacs_credentials, configured):
    address, seen = attacker
    pacs_credentials.PACS_DICOMWEB_URL = configured  # none, or a PACS that is down
    result = _ingest(send, address)
    outcome = _run(result.pk)
    assert outcome in {"FetchError", "Retry", "failed"}, outcome
    assert seen == []


def test_the_review_page_never_fetches_from_the_address_a_feed_sent(
        send, attacker, pacs_credentials):
    address, seen = attacker
    pacs_credentials.PACS_DICOMWEB_URL = ""
    result = _ingest(send, address)
    with pytest.raises(ReviewError):
        series_source(result)
    assert seen == []


def test_a_configured_further_endpoint_is_used_without_the_pacs_credentials(
        send, attacker, pacs_credentials):
    address, seen = attacker
    pacs_credentials.PACS_DICOMWEB_URL = "http://127.0.0.1:9/dicom-web"
    pacs_credentials.PACS_DICOMWEB_ALLOWED_URLS = [address]  # the site's own second PACS
    result = _ingest(send, address)
    with pytest.raises(ReviewError):
        series_source(result)  # it answers 404: no series there
    assert seen
    assert all(auth == "" for _, _, auth in seen)  # the PACS credentials never go there
