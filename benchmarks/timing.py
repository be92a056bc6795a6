"""Timing helpers shared by the benchmarks (run by hand; see docs/performance.md).

``wall_times`` times ``fn()`` ``repeat`` times after optional warm-up, calling ``sync()``
after each call (a GPU's ``cuda.Device().synchronize``) so device work is counted;
``median_ms`` / ``best_ms`` reduce it. ``thread_env`` is the environment of a worker
process pinned to ``n`` threads (sparsegrid's pool and the BLAS libraries alike).
"""

from __future__ import annotations

import os
import statistics
import time

THREAD_VARIABLES = ("SPARSEGRID_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "MKL_NUM_THREADS")


def wall_times(fn, repeat, sync=None, warmup=True):
    """Seconds of each of ``repeat`` (at least one) calls of ``fn()``."""
    sync = sync or (lambda: None)
    if warmup:
        fn()
        sync()
    times = []
    for _ in range(max(1, int(repeat))):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def median_ms(fn, repeat, sync=None, warmup=True):
    """The median of :func:`wall_times`, in milliseconds."""
    return 1e3 * statistics.median(wall_times(fn, repeat, sync, warmup))


def best_ms(fn, repeat, sync=None, warmup=True):
    """The fastest of :func:`wall_times`, in milliseconds."""
    return 1e3 * min(wall_times(fn, repeat, sync, warmup))


def thread_env(n, base=None):
    """A copy of ``base`` (default ``os.environ``) with every thread count set to ``n``."""
    env = dict(os.environ if base is None else base)
    for name in THREAD_VARIABLES:
        env[name] = str(n)
    return env
