"""A real Orthanc PACS (Debian ``orthanc`` + ``orthanc-dicomweb``) for tests: a plain process
with a temporary config and storage on free ports, stopped afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import requests

BINARY = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def available() -> bool:
    return os.path.exists(BINARY) and os.path.exists(PLUGIN)


@contextlib.contextmanager
def as_configured_pacs(server: Orthanc) -> Iterator[Orthanc]:
    """Make ``server`` the configured PACS (``PACS_DICOMWEB_URL``) in this process's settings
    and in the environment of the worker processes a test starts; restored afterwards (a
    study's recorded endpoint is provenance, never contacted)."""
    from django.conf import settings

    saved = os.environ.get("PACS_DICOMWEB_URL"), settings.PACS_DICOMWEB_URL
    os.environ["PACS_DICOMWEB_URL"] = settings.PACS_DICOMWEB_URL = server.dicomweb
    try:
        yield server
    finally:
        settings.PACS_DICOMWEB_URL = saved[1]
        if saved[0] is None:
            os.environ.pop("PACS_DICOMWEB_URL", None)
        else:
            os.environ["PACS_DICOMWEB_URL"] = saved[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    def __init__(self, workdir: Path, *, verbose: bool = False) -> None:
        self.workdir = workdir
        self.verbose = verbose  # logs every HTTP request: see ``requests_logged``
        self.http_port = _free_port()
        self.dicom_port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "VBQTEST", "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1, "ConcurrentJobs": 1, "HttpTimeout": 30,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config))
        self.log = open(self.workdir / "orthanc.log", "wb")  # noqa: SIM115 - closed in stop()
        flags = ["--verbose"] if self.verbose else []
        self.proc = subprocess.Popen([BINARY, *flags, str(path)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.dicomweb}/studies", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.2)
        raise RuntimeError((self.workdir / "orthanc.log").read_text()[-2000:])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "log", None):
            self.log.close()

    def requests_logged(self, method: str, path: str) -> int:
        """How many ``method path`` HTTP requests Orthanc logged (needs ``verbose=True``)."""
        needle = f"(http) {method} {path}".encode()
        return sum(line.rstrip().endswith(needle)
                   for line in (self.workdir / "orthanc.log").read_bytes().splitlines())

    def upload(self, datasets) -> None:
        """Store pydicom Datasets through Orthanc's REST API (POST /instances)."""
        import io

        for ds in datasets:
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            r = requests.post(f"{self.url}/instances", data=buffer.getvalue(), timeout=30)
            r.raise_for_status()
