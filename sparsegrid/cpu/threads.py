"""Deterministic thread parallelism for the NumPy kernels.

NumPy releases the GIL inside fancy indexing, arithmetic and BLAS calls, so Python threads
run the kernels' gathers, GEMMs and scatters concurrently. Work is only ever split into
units whose arithmetic does not depend on the thread count (a whole group's GEMM, a whole
offset's GEMM): units either write disjoint output rows, or return partial results that the
caller adds in a fixed order. Results are therefore bit-identical for every thread count.

The thread count is ``SPARSEGRID_NUM_THREADS`` if set, else the number of CPUs this
process may use; :func:`set_num_threads` changes it at run time.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_lock = threading.Lock()
_state = {"threads": None, "pool": None}


def _default_threads():
    env = os.environ.get("SPARSEGRID_NUM_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"SPARSEGRID_NUM_THREADS must be a positive integer; got {env!r}")
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def get_num_threads():
    """Number of threads the CPU kernels use."""
    if _state["threads"] is None:
        _state["threads"] = _default_threads()
    return _state["threads"]


def set_num_threads(n):
    """Use ``n`` threads in the CPU kernels (results do not depend on it)."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}")
    with _lock:
        _state["threads"] = int(n)
        if _state["pool"] is not None:
            _state["pool"].shutdown(wait=False)
            _state["pool"] = None


def _pool():
    with _lock:
        if _state["pool"] is None:
            _state["pool"] = ThreadPoolExecutor(max(1, get_num_threads() - 1),
                                                thread_name_prefix="sparsegrid")
        return _state["pool"]


def _find_blas_controls():
    """(get, set) thread-count functions of the OpenBLAS that NumPy loaded, or None.

    Threads of our pool each call BLAS; a multi-threaded BLAS inside them oversubscribes
    the cores (OpenBLAS threads spin), so BLAS is kept single-threaded while the pool works.
    """
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", maps.read())))
    except OSError:  # pragma: no cover - not Linux
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:  # pragma: no cover
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""),
                               ("openblas", "64_"), ("openblas", "")):
            getter = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            setter = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if getter is not None and setter is not None:
                getter.restype = ctypes.c_int
                setter.argtypes = [ctypes.c_int]
                return getter, setter
    return None


@contextlib.contextmanager
def _single_threaded_blas():
    if "blas" not in _state:
        _state["blas"] = _find_blas_controls()
    controls = _state["blas"]
    if controls is None:
        yield
        return
    getter, setter = controls
    before = getter()
    if before > 1:
        setter(1)
    try:
        yield
    finally:
        if before > 1:
            setter(before)


def parallel_map(fn, items, sizes=None, min_work=20_000):
    """``[fn(item) for item in items]``, evaluated on the thread pool, results in order.

    The calling thread and ``threads - 1`` pool threads take items from one queue, largest
    ``sizes`` first. Each item is computed the same way whichever thread runs it, so the
    results do not depend on the thread count. Below ``min_work`` total size the items run
    serially, where the pool's overhead would exceed its gain.

    BLAS is kept single-threaded throughout, serial or not: a multi-threaded BLAS may split
    the reduction of ``x.T @ g`` across its threads, which changes the rounding.
    """
    items = list(items)
    n = len(items)
    sizes = [1] * n if sizes is None else list(sizes)
    threads = get_num_threads()
    with _single_threaded_blas():
        if threads == 1 or n < 2 or sum(sizes) < min_work:
            return [fn(item) for item in items]
        order = sorted(range(n), key=lambda i: -sizes[i])
        claim = itertools.count()
        results = [None] * n

        def work():
            for j in iter(lambda: next(claim), None):
                if j >= n:
                    return
                results[order[j]] = fn(items[order[j]])

        helpers = [_pool().submit(work) for _ in range(min(threads, n) - 1)]
        work()
        for helper in helpers:
            helper.result()
        return results
