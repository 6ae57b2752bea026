"""DICOMweb client to the PACS (dicomweb-client): QIDO-RS to find series, WADO-RS to fetch.

Errors are classified for the job's retry policy: ``TransientFetchError`` (PACS unreachable,
timeouts, HTTP 5xx/429) is retried with backoff; ``PermanentFetchError`` (404, other 4xx, an
empty series) is not.

Only CONFIGURED endpoints are ever contacted (``fetch_study_series``): the DICOMweb address a
feed records on an ImagingStudy (FHIR ``Endpoint.address``) is provenance, data sent by the
feed, never a destination by itself, and the PACS credentials go to ``PACS_DICOMWEB_URL``
only.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from django.conf import settings
from pydicom.dataset import Dataset


class FetchError(Exception):
    pass


class TransientFetchError(FetchError):
    """Worth retrying later."""


class PermanentFetchError(FetchError):
    """Retrying will not help."""


_local = threading.local()


def _client(base_url: str, username: str = "", password: str = "",
            timeout: float = 30) -> DICOMwebClient:
    """One client (and so one HTTP session: its connections are kept alive between jobs) per
    PACS endpoint and credentials, per thread and process (a forked child builds its own)."""
    key = (os.getpid(), base_url, username, password, timeout)
    clients = getattr(_local, "clients", None)
    if clients is None:
        clients = _local.clients = {}
    client = clients.get(key)
    if client is None:
        client = clients[key] = _new_client(base_url, username, password, timeout)
    return client


def _new_client(base_url: str, username: str, password: str,
                timeout: float) -> DICOMwebClient:
    session = requests.Session()
    # requests re-reads the environment (proxies, no_proxy, CA bundle) and ~/.netrc on EVERY
    # request when ``trust_env`` is on: a measurable share of a worker's CPU per series
    # fetched (docs/benchmarks.md). The same settings are read once here, when the worker
    # first talks to this endpoint; a change needs a worker restart, as any setting does.
    session.proxies.update(requests.utils.get_environ_proxies(base_url))
    ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if ca_bundle:
        session.verify = ca_bundle
    session.trust_env = False
    netrc = None if username else requests.utils.get_netrc_auth(base_url)
    if netrc:  # credentials in ~/.netrc, as requests would have found them per request
        session.auth = netrc
    if username:
        session.auth = (username, password)
    client = DICOMwebClient(url=base_url.rstrip("/"), session=session, timeout=timeout)
    # No in-request retry loop: the Celery task retries transient errors with its own backoff,
    # so a worker is never blocked for half a minute on a PACS that is down.
    client.set_http_retry_params(retry=False)
    return client


def _classify(exc: Exception) -> FetchError:
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status >= 500 or status == 429:
            return TransientFetchError(f"PACS answered HTTP {status}")
        return PermanentFetchError(f"PACS answered HTTP {status}")
    if isinstance(exc, requests.ConnectionError | requests.Timeout):
        return TransientFetchError(f"PACS unreachable ({type(exc).__name__})")
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        # the connection was lost in the middle of the answer: the PACS or the network, not
        # the data; the same request can succeed later
        return TransientFetchError("the PACS connection broke during the transfer")
    return PermanentFetchError(f"{type(exc).__name__}: {str(exc)[:200]}")


def fetch_series(base_url: str, study_uid: str, series_uid: str, *, username: str = "",
                 password: str = "") -> list[Dataset]:
    """All instances of one series as pydicom Datasets (WADO-RS).

    Read with ``iter_series`` (the client's streamed retrieval: the body comes off the socket
    in ``chunk_size`` pieces, 1 MB by default) rather than ``retrieve_series``, which makes
    requests assemble the body from 10 kB reads (about a fifth of the fetch's CPU less:
    docs/benchmarks.md). The whole series is still parsed here, inside the
    ``try``, so a corrupt instance or a connection lost half-way raises a typed error, as
    before; an abandoned stream closes its connection instead of returning it to the pool
    half-read."""
    try:
        datasets = list(_client(base_url, username, password).iter_series(study_uid,
                                                                           series_uid))
    except Exception as exc:  # requests / dicomweb-client errors, malformed multipart
        raise _classify(exc) from exc
    if not datasets:
        raise PermanentFetchError("the PACS returned no instance for this series")
    return datasets


def configured_endpoint(recorded: str = "") -> tuple[str, str, str]:
    """(base URL, username, password) to fetch a study whose recorded endpoint is
    ``recorded``: that endpoint only if it is one of ``PACS_DICOMWEB_ALLOWED_URLS`` (the
    site's further PACS, contacted without the PACS credentials), else ``PACS_DICOMWEB_URL``
    with ``PACS_DICOMWEB_USERNAME`` / ``PASSWORD`` ("" when no PACS is configured). An
    address a feed sent is never contacted because it was sent."""
    main = settings.PACS_DICOMWEB_URL.strip().rstrip("/")
    chosen = (recorded or "").strip().rstrip("/")
    others = {url.strip().rstrip("/") for url in settings.PACS_DICOMWEB_ALLOWED_URLS}
    if chosen and chosen != main and chosen in others:
        return chosen, "", ""
    return main, settings.PACS_DICOMWEB_USERNAME, settings.PACS_DICOMWEB_PASSWORD


def fetch_study_series(recorded_endpoint: str, study_uid: str, series_uid: str
                       ) -> list[Dataset]:
    """``fetch_series`` from the configured endpoint for a study (``configured_endpoint``);
    ``PermanentFetchError`` when no PACS is configured."""
    base, username, password = configured_endpoint(recorded_endpoint)
    if not base:
        raise PermanentFetchError("no PACS is configured (PACS_DICOMWEB_URL) and the series "
                                  "has no local copy")
    return fetch_series(base, study_uid, series_uid, username=username, password=password)


def search_series(base_url: str, study_uid: str, **auth: Any) -> list[dict[str, Any]]:
    """QIDO-RS series of a study (DICOM JSON)."""
    try:
        return list(_client(base_url, **auth).search_for_series(study_uid))
    except Exception as exc:
        raise _classify(exc) from exc


def store_instances(base_url: str, datasets: list[Dataset], *, username: str = "",
                    password: str = "") -> None:
    """Store instances in the PACS (STOW-RS, one multipart request).

    Raises ``TransientFetchError`` (PACS unreachable, HTTP 5xx/429: the outbox retries) or
    ``PermanentFetchError`` (other 4xx, or an answer that lists a failed instance in its
    Failed SOP Sequence). An instance the PACS already holds (the same SOP Instance UID) is
    not an error: the PACS keeps its copy."""
    try:
        answer = _client(base_url, username, password).store_instances(datasets)
    except Exception as exc:
        raise _classify(exc) from exc
    failed = getattr(answer, "FailedSOPSequence", None) or []
    if failed:
        reasons = sorted({str(getattr(item, "FailureReason", "?")) for item in failed})
        raise PermanentFetchError(
            f"the PACS refused {len(failed)} instance(s) (failure reason {', '.join(reasons)})")
