"""WADO-RS fetch (scoring/dicomweb.py) read as a stream: what the engine gets, and
what a bad body does to the kept-alive connection. SYNTHETIC data (phantoms).

The "PACS" serving a malformed body is a real HTTP/1.1 server on a local port (stdlib
``http.server``, keep-alive), because Orthanc will not store a part that is not DICOM.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from scoring.dicomweb import PermanentFetchError, TransientFetchError, fetch_series
from scoring.engine.phantom import make_phantom
from tests import orthanc as orthanc_mod

BOUNDARY = "vbq-test-boundary"


def _dicom_bytes(ds) -> bytes:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _multipart(parts: list[bytes]) -> bytes:
    body = b"".join(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + part + b"\r\n" for part in parts)
    return body + f"--{BOUNDARY}--\r\n".encode()


class _Pacs(ThreadingHTTPServer):
    """Serves ``bodies[series_uid]`` as a multipart/related WADO-RS answer; counts the TCP
    connections it accepted."""

    daemon_threads = True

    def __init__(self, bodies: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.bodies = bodies
        self.truncated: set[str] = set()  # series answered half, then the connection dropped
        self.connections = 0
        self.paths: list[str] = []  # request targets as received (absolute via a proxy)
        self.auth: list[str | None] = []  # Authorization headers as received

    def get_request(self):  # type: ignore[no-untyped-def]
        self.connections += 1
        return super().get_request()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dicom-web"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a PACS

    def do_GET(self) -> None:
        series_uid = self.path.rstrip("/").rsplit("/", 1)[-1]
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        self.server.auth.append(self.headers.get("Authorization"))  # type: ignore[attr-defined]
        body = self.server.bodies.get(series_uid)  # type: ignore[attr-defined]
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type",
                         f'multipart/related; type="application/dicom"; boundary={BOUNDARY}')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if series_uid in self.server.truncated:  # type: ignore[attr-defined]
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True  # the PACS or the network drops the connection
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
        pass


@pytest.fixture
def pacs() -> Iterator[_Pacs]:
    server = _Pacs({})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_part_that_is_not_dicom_is_a_permanent_error_and_the_connection_stays_usable(pacs):
    good = make_phantom(151, slices=5)
    # 1.4 MB, more than one 1 MB read: the bad first part fails the parse while the rest of
    # the body is still unread on the socket.
    bad = make_phantom(152, rows=256, cols=256, slices=11)
    good_uid, bad_uid = str(good.datasets[0].SeriesInstanceUID), str(
        bad.datasets[0].SeriesInstanceUID)
    parts = [_dicom_bytes(ds) for ds in bad.datasets]
    assert sum(map(len, parts)) > 1_200_000
    parts[0] = b"this is not a DICOM file " * 50
    pacs.bodies[bad_uid] = _multipart(parts)
    pacs.bodies[good_uid] = _multipart([_dicom_bytes(ds) for ds in good.datasets])

    study = str(good.datasets[0].StudyInstanceUID)
    assert len(fetch_series(pacs.url, study, good_uid)) == 5
    with pytest.raises(PermanentFetchError):
        fetch_series(pacs.url, study, bad_uid)
    # The stream abandoned half-read must not go back to the pool: the next fetch (same
    # cached client) reads a whole, correct series, on a fresh connection.
    again = fetch_series(pacs.url, study, good_uid)
    assert [str(ds.SOPInstanceUID) for ds in again] == [
        str(ds.SOPInstanceUID) for ds in good.datasets]
    assert pacs.connections == 2
    # A complete answer leaves its connection in the pool (kept alive between jobs).
    fetch_series(pacs.url, study, good_uid)
    assert pacs.connections == 2


@pytest.mark.orthanc
def test_fetched_instances_carry_the_stored_pixels_as_bytes(tmp_path):
    """The engine reads native pixels straight from ``PixelData`` when it is ``bytes`` (its
    fast path); the streamed read must hand it exactly the stored pixels, as bytes."""
    if not orthanc_mod.available():
        pytest.skip("Orthanc (Debian orthanc + orthanc-dicomweb) is not installed")
    server = orthanc_mod.Orthanc(tmp_path / "orthanc")
    server.start()
    try:
        phantom = make_phantom(153, slices=7)
        server.upload(phantom.datasets)
        ds = phantom.datasets[0]
        fetched = fetch_series(server.dicomweb, str(ds.StudyInstanceUID),
                               str(ds.SeriesInstanceUID))
    finally:
        server.stop()
    stored = {str(d.SOPInstanceUID): d.PixelData for d in phantom.datasets}
    assert {str(d.SOPInstanceUID) for d in fetched} == set(stored)
    for d in fetched:
        assert type(d.PixelData) is bytes
        assert d.PixelData == stored[str(d.SOPInstanceUID)]


def test_a_connection_dropped_during_the_answer_is_a_transient_error(pacs):
    """Half the series, then the connection is lost: the PACS or the network, not the data,
    so the job is retried (``TransientFetchError``), and the next fetch succeeds."""
    phantom = make_phantom(154, rows=256, cols=256, slices=11)
    uid = str(phantom.datasets[0].SeriesInstanceUID)
    study = str(phantom.datasets[0].StudyInstanceUID)
    pacs.bodies[uid] = _multipart([_dicom_bytes(ds) for ds in phantom.datasets])
    pacs.truncated.add(uid)
    with pytest.raises(TransientFetchError, match="broke during the transfer"):
        fetch_series(pacs.url, study, uid)
    pacs.truncated.clear()  # the PACS is back to normal
    assert len(fetch_series(pacs.url, study, uid)) == 11


def test_the_environment_proxy_is_used_though_it_is_read_once(pacs, monkeypatch):
    """The HTTP session reads proxies and the CA bundle from the environment once, when the
    worker first talks to an endpoint (``trust_env`` is off: re-reading os.environ on every
    request cost CPU per series). A proxy set in the environment must still carry the fetch:
    here the "PACS" host does not resolve, and only the proxy (the local server, which answers
    absolute request targets) can serve it."""
    phantom = make_phantom(155, slices=3)
    uid = str(phantom.datasets[0].SeriesInstanceUID)
    study = str(phantom.datasets[0].StudyInstanceUID)
    pacs.bodies[uid] = _multipart([_dicom_bytes(ds) for ds in phantom.datasets])
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    proxy = pacs.url.removesuffix("/dicom-web")
    monkeypatch.setenv("HTTP_PROXY", proxy)
    monkeypatch.setenv("http_proxy", proxy)
    base = "http://pacs-behind-proxy.invalid/dicom-web"
    assert len(fetch_series(base, study, uid)) == 3
    assert pacs.paths == [f"{base}/studies/{study}/series/{uid}"]


def test_netrc_credentials_are_still_sent(pacs, tmp_path, monkeypatch):
    """With no PACS username configured, credentials in a netrc file are used, as requests
    would find them (read once per endpoint now, not per request)."""
    import base64

    phantom = make_phantom(156, slices=3)
    uid = str(phantom.datasets[0].SeriesInstanceUID)
    study = str(phantom.datasets[0].StudyInstanceUID)
    pacs.bodies[uid] = _multipart([_dicom_bytes(ds) for ds in phantom.datasets])
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login vbq-reader password SYNTHETIC-secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    base = pacs.url.replace("/dicom-web", "/netrc-dicom-web")  # a client of its own
    assert len(fetch_series(base, study, uid)) == 3
    assert pacs.auth == ["Basic " + base64.b64encode(b"vbq-reader:SYNTHETIC-secret").decode()]
