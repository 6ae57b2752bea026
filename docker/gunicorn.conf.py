"""Gunicorn settings for the registry web process (compose and systemd installs).

Environment: ``GUNICORN_BIND`` (default 0.0.0.0:8000), ``WEB_CONCURRENCY`` (workers, default
2 x CPU + 1, at most 8), ``GUNICORN_TIMEOUT`` (seconds, default 60: a large FHIR bundle),
``GUNICORN_MAX_REQUESTS`` (default 1000, with a jitter of a tenth) and
``GUNICORN_MAX_WORKER_MEMORY_MB`` (default 400; 0 = no cap).

Workers are recycled so that memory a large body took is given back: after
``max_requests`` requests (the jitter staggers the restarts), and after any request that
leaves the worker's resident memory above ``GUNICORN_MAX_WORKER_MEMORY_MB`` (``post_request``:
the worker finishes that request and exits gracefully, the arbiter starts a fresh one). A
30 MB FHIR body leaves CPython's allocator holding a few hundred MB that it does not return
to the system; a fresh worker starts at ~200 MB.
"""

import multiprocessing
import os

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")  # all interfaces: inside a container
workers = int(os.environ.get("WEB_CONCURRENCY", min(8, multiprocessing.cpu_count() * 2 + 1)))
threads = int(os.environ.get("GUNICORN_THREADS", "1"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "60"))
graceful_timeout = 30
keepalive = 5
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "1000"))  # bounds any leak
max_requests_jitter = max_requests // 10
max_worker_memory_mb = int(os.environ.get("GUNICORN_MAX_WORKER_MEMORY_MB", "400"))
accesslog = "-"
errorlog = "-"
# %(U)s is the path WITHOUT the query string: searches (?q=) may carry names; never log them.
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms'
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")


def _resident_mb() -> float:
    """This process's resident memory now (Linux ``/proc``; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def post_request(worker, req, environ, resp):  # type: ignore[no-untyped-def]
    """Recycle a worker whose memory a request left above ``max_worker_memory_mb``."""
    if not max_worker_memory_mb:
        return
    resident = _resident_mb()
    if resident > max_worker_memory_mb:
        worker.log.info("worker %s holds %.0f MB (cap %s MB): recycled after this request",
                        worker.pid, resident, max_worker_memory_mb)
        worker.alive = False
