"""Worker malloc tuning (config/worker_memory.py): large blocks freed by one job are reused by the
next without new page faults, and the worker applies it at start-up."""

import json
import os
import platform
import subprocess
import sys

import pytest
from celery.signals import worker_init, worker_process_init

from tests.conftest import ROOT

# One "job" allocates what a 256x256x11 series costs a worker (a 1.4 MB body, eleven 128 kB
# pixel buffers, float32 slices of 256 kB) and frees it all; the next job does the same.
_JOBS = """
import json, resource, sys
import numpy as np
if sys.argv[1] == "tuned":
    from config.worker_memory import tune_malloc
    assert tune_malloc()
def job():
    body = bytearray(1_457_250)
    parts = [bytes(body[i * 131_072:(i + 1) * 131_072]) for i in range(11)]
    slices = [np.frombuffer(p, np.uint16).reshape(256, 256).astype(np.float32) for p in parts]
    return sum(float(s[0, 0]) for s in slices)
job()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    job()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50))
"""


def _faults_per_job(mode: str) -> float:
    env = {key: value for key, value in os.environ.items()  # glibc's defaults, nothing preloaded
           if not key.startswith("MALLOC_") and key not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", _JOBS, mode], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**env, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    return float(json.loads(out.stdout))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc")
def test_tuned_malloc_reuses_a_jobs_freed_memory_without_page_faults():
    plain, tuned = _faults_per_job("plain"), _faults_per_job("tuned")
    # untuned glibc maps and unmaps the large blocks: hundreds of fresh pages per job
    assert plain > 200, plain
    assert tuned < plain / 10, (plain, tuned)


def test_the_worker_tunes_malloc_in_its_own_process_and_in_prefork_children(monkeypatch,
                                                                            settings):
    import config.celery as celery_config
    import config.worker_memory as worker_memory

    for signal in (worker_init, worker_process_init):
        assert any(receiver() is celery_config._tune_worker_malloc
                   for _, receiver in signal.receivers), signal
    calls = []
    monkeypatch.setattr(worker_memory, "tune_malloc", lambda: calls.append(1) or True)
    settings.WORKER_MALLOC_TUNING = True
    celery_config._tune_worker_malloc()
    settings.WORKER_MALLOC_TUNING = False
    celery_config._tune_worker_malloc()
    assert calls == [1]
