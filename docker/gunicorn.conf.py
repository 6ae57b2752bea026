"""Gunicorn settings for the registry web process (compose and systemd installs).

Environment: ``GUNICORN_BIND`` (default 0.0.0.0:8000), ``WEB_CONCURRENCY`` (workers, default
2 x CPU + 1, at most 8), ``GUNICORN_TIMEOUT`` (seconds, default 60: a large FHIR bundle).
"""

import multiprocessing
import os

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")  # all interfaces: inside a container
workers = int(os.environ.get("WEB_CONCURRENCY", min(8, multiprocessing.cpu_count() * 2 + 1)))
threads = int(os.environ.get("GUNICORN_THREADS", "1"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "60"))
graceful_timeout = 30
keepalive = 5
max_requests = 2000  # recycle workers slowly; bounds any leak
max_requests_jitter = 200
accesslog = "-"
errorlog = "-"
# %(U)s is the path WITHOUT the query string: searches (?q=) may carry names; never log them.
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms'
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
