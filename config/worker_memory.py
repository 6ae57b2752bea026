"""glibc malloc settings for the Celery worker processes (``WORKER_MALLOC_TUNING``).

A VBQ job allocates and frees the same few large blocks for every series: the WADO-RS body and
its parts, each instance's pixel bytes, the engine's float32 slices. glibc serves a block above
its mmap threshold (128 kB at start, raised only as such blocks are freed) with a fresh
``mmap`` and returns it with ``munmap``, and gives the free top of the heap back to the system
past its trim threshold; the next series then touches new pages, one page fault each (about
1,900 minor page faults per job in ``bench/imaging_pipeline.py``; figures: docs/benchmarks.md).

``tune_malloc`` keeps such blocks in the heap and the freed memory in the process between jobs
(mmap threshold 32 MiB, trim threshold 128 MiB; blocks above 32 MiB, a very large series, still
come and go with mmap). The cost is memory the worker holds on to: up to 128 MiB of free space
at the top of its heap is not given back, and blocks of 128 kB-32 MiB now come from the heap,
where freed space below a live block is reused by later jobs but not returned to the system
(a long-running worker's resident size settles at its largest jobs' working set; measured by
``bench/imaging_pipeline.py --cpu``: peak RSS per worker). Each thread of a ``threads`` pool has
its own arena with its own free memory. A deployment that must bound a worker's memory sets
Celery's ``--max-memory-per-child`` (prefork) or turns this off. The same effect as the
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables, applied by the
worker itself so every way of starting it (``make worker``, docker, a test) gets it. A C library
without ``mallopt`` (musl, macOS) is left as it is. Only the workers are tuned: the web and
DICOM receiver processes allocate little.
"""

from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's own upper bound for the dynamic threshold
TRIM_THRESHOLD_BYTES = 128 * 1024 * 1024


def tune_malloc() -> bool:
    """Apply the settings above to this process; ``True`` if glibc accepted both."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        logger.info("malloc tuning skipped: this C library has no mallopt")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mmap_ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    trim_ok = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))  # each on its own
    if not (mmap_ok and trim_ok):
        logger.warning("malloc tuning refused by the C library (mmap threshold %s, trim "
                       "threshold %s)", mmap_ok, trim_ok)
    return mmap_ok and trim_ok
