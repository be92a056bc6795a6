"""Deterministic thread parallelism for the NumPy kernels.

NumPy releases the GIL inside fancy indexing, arithmetic and BLAS calls, so Python threads
run the kernels' gathers, GEMMs and scatters concurrently. Work is only ever split into
units whose arithmetic does not depend on the thread count (a convolution plan's block of
output rows, a fixed chunk of a weight gradient's pairs): units either write disjoint
output rows, or return partial results that the caller adds in a fixed order. Results are therefore bit-identical for every thread count.

The thread count is ``SPARSEGRID_NUM_THREADS`` if set, else the number of CPUs this
process may use; :func:`set_num_threads` changes it at run time. Changing it while other
Python threads are inside :func:`parallel_map` is safe: they finish on the pool they
started with, which is shut down once its last user leaves.

BLAS is kept single-threaded while the kernels work (:func:`blas_single_threaded`): a
multi-threaded BLAS may split a GEMM's reduction across its threads, which changes the
rounding, and it would oversubscribe the cores next to our own pool. The BLAS libraries
are found once, on first need, with ``threadpoolctl`` when it is installed (it is imported
only then, never by ``import sparsegrid``), else by looking for OpenBLAS among the loaded
libraries and calling its ``openblas_set_num_threads`` through ctypes; if neither finds a
BLAS, nothing is changed. A process-wide, lock-protected count of active entries makes this
safe when several Python threads call sparsegrid at once: the first entry sets BLAS to one
thread, the last exit restores the previous count.
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


def _threads_locked():
    """The thread count; the caller holds ``_lock``."""
    if _state["threads"] is None:
        _state["threads"] = _default_threads()
    return _state["threads"]


def get_num_threads():
    """Number of threads the CPU kernels use."""
    threads = _state["threads"]
    if threads is None:
        with _lock:
            threads = _threads_locked()
    return threads


def set_num_threads(n):
    """Use ``n`` threads in the CPU kernels (results do not depend on it).

    Safe while other Python threads run kernels: calls already in :func:`parallel_map`
    finish on the old pool, which shuts down when the last of them leaves; later calls use
    a new pool of the new size.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}")
    with _lock:
        _state["threads"] = int(n)
        old, _state["pool"] = _state["pool"], None
        if old is not None:
            old.retired = True
            idle = old.users == 0
    if old is not None and idle:
        old.executor.shutdown(wait=False)


class _Pool:
    """An executor with the number of :func:`parallel_map` calls currently using it."""

    __slots__ = ("executor", "threads", "users", "retired")

    def __init__(self, threads):
        self.executor = ThreadPoolExecutor(threads - 1, thread_name_prefix="sparsegrid")
        self.threads = threads
        self.users = 0
        self.retired = False


def _acquire_pool():
    """The current pool (created on first use), counted as used until :func:`_release_pool`."""
    with _lock:
        pool = _state["pool"]
        if pool is None:
            pool = _state["pool"] = _Pool(max(2, _threads_locked()))
        pool.users += 1
        return pool


def _release_pool(pool):
    with _lock:
        pool.users -= 1
        done = pool.retired and pool.users == 0
    if done:  # set_num_threads replaced it while we used it: we were its last user
        pool.executor.shutdown(wait=False)


# --- BLAS thread control --------------------------------------------------------------------

class _Controller:
    """Cheap get/set of one BLAS library's thread count.

    ``per_thread``: the limit applies to the calling thread only (OpenBLAS built with OpenMP,
    as threadpoolctl drives it), so every thread that calls BLAS must set it for itself.
    """

    __slots__ = ("name", "get", "set", "per_thread")

    def __init__(self, name, get, set, per_thread=False):
        self.name, self.get, self.set, self.per_thread = name, get, set, per_thread

    def __repr__(self):
        return f"_Controller({self.name!r}, per_thread={self.per_thread})"


def _from_threadpoolctl(threadpoolctl):
    controllers = []
    for lib in threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers:
        try:
            if not isinstance(lib.get_num_threads(), int):
                continue  # the library does not report its thread count: cannot restore it
        except Exception:  # pragma: no cover - a library threadpoolctl cannot drive
            continue
        # threadpoolctl >= 3.8 lets only one Python thread at a time (the "controlling
        # thread") change a process-wide OpenBLAS limit and silently ignores the others.
        # Our own calls are serialised by _blas_lock, so hand control back after each one;
        # should another thread hold it (a threadpool_limits block running elsewhere), take it.
        release = getattr(type(lib), "clear_controlling_thread", None)
        per_thread = (release is not None and getattr(lib, "internal_api", None) == "openblas"
                      and getattr(lib, "threading_layer", None) == "openmp")

        def set_threads(n, lib=lib, release=release):
            lib.set_num_threads(n)
            if release is None:
                return
            release()
            if lib.get_num_threads() != n:
                release(force=True)
                lib.set_num_threads(n)
                release()

        name = f"threadpoolctl:{lib.internal_api}:{lib.filepath}"
        controllers.append(_Controller(name, lib.get_num_threads, set_threads, per_thread))
    return controllers


def _from_ctypes():
    """OpenBLAS (or scipy-openblas) among the libraries this process loaded, via ctypes."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", maps.read())))
    except OSError:  # pragma: no cover - not Linux
        return []
    controllers = []
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
                getter.argtypes = []
                setter.restype = None
                setter.argtypes = [ctypes.c_int]
                controllers.append(_Controller(f"ctypes:{path}", getter, setter))
                break
    return controllers


def _discover_blas():
    try:
        import threadpoolctl
    except ImportError:
        return tuple(_from_ctypes())
    return tuple(_from_threadpoolctl(threadpoolctl))


_blas_lock = threading.Lock()
# controllers: None until discovered; depth: active entries (all threads); saved: the
# (controller, count) pairs the first entry changed, restored by the last exit.
_blas = {"controllers": None, "depth": 0, "saved": ()}
_blas_local = threading.local()  # per-thread depth and saved pairs for per-thread limits


def _blas_controllers():
    """The BLAS controllers, discovered on first call and cached (process-wide)."""
    controllers = _blas["controllers"]
    if controllers is None:
        with _blas_lock:
            if _blas["controllers"] is None:
                _blas["controllers"] = _discover_blas()
            controllers = _blas["controllers"]
    return controllers


def _reset_blas_controllers():
    """Forget the discovered controllers (for tests); only while no entry is active."""
    with _blas_lock:
        if _blas["depth"]:
            raise RuntimeError("cannot reset the BLAS controllers inside blas_single_threaded()")
        _blas["controllers"] = None


def _limit(controllers):
    """Set each controller to 1 thread; the (controller, previous) pairs that changed."""
    saved = []
    try:
        for c in controllers:
            before = c.get()
            if before != 1:
                c.set(1)
                saved.append((c, before))
    except BaseException:
        _restore(saved)
        raise
    return saved


def _restore(saved):
    for c, before in reversed(saved):
        c.set(before)


def _enter_blas(controllers):
    shared = [c for c in controllers if not c.per_thread]
    if shared:
        with _blas_lock:
            if _blas["depth"] == 0:
                _blas["saved"] = _limit(shared)
            _blas["depth"] += 1
    if len(shared) != len(controllers):
        try:
            _enter_thread_blas(controllers)
        except BaseException:
            if shared:
                _exit_shared_blas()
            raise


def _exit_blas(controllers):
    try:
        if any(c.per_thread for c in controllers):
            _exit_thread_blas()
    finally:
        if not all(c.per_thread for c in controllers):
            _exit_shared_blas()


def _exit_shared_blas():
    with _blas_lock:
        _blas["depth"] -= 1
        if _blas["depth"] == 0:
            saved, _blas["saved"] = _blas["saved"], ()
            _restore(saved)


def _enter_thread_blas(controllers):
    depth = getattr(_blas_local, "depth", 0)
    if depth == 0:
        _blas_local.saved = _limit([c for c in controllers if c.per_thread])
    _blas_local.depth = depth + 1


def _exit_thread_blas():
    _blas_local.depth -= 1
    if _blas_local.depth == 0:
        saved, _blas_local.saved = _blas_local.saved, ()
        _restore(saved)


@contextlib.contextmanager
def blas_single_threaded():
    """Keep every BLAS library single-threaded inside the block; safe across Python threads.

    The BLAS thread count is process-wide, so the protocol is a reference count under one
    process-wide lock: the first entry (from any Python thread) remembers each library's
    thread count and sets it to 1; further entries, nested or from other threads, only
    increment the count; the last exit restores the remembered counts, also when the block
    raises. So no thread can restore a multi-threaded BLAS while another thread's kernels
    still run. Threads of sparsegrid's pool work inside their caller's entry.

    The libraries are found once, on first use, with ``threadpoolctl`` when it is installed
    (imported only then), else OpenBLAS through ctypes; afterwards an entry or exit costs a
    lock and, at the outermost level, one get/set call per library. When no BLAS is found
    the block changes nothing. Code outside sparsegrid that changes the BLAS thread count
    while a block is active defeats it (the change stands until the last exit).
    """
    controllers = _blas_controllers()
    if not controllers:
        yield
        return
    _enter_blas(controllers)
    try:
        yield
    finally:
        _exit_blas(controllers)


_single_threaded_blas = blas_single_threaded  # former private name


def parallel_map(fn, items, sizes=None, min_work=20_000):
    """``[fn(item) for item in items]``, evaluated on the thread pool, results in order.

    The calling thread and ``threads - 1`` pool threads take items from one queue, largest
    ``sizes`` first. Each item is computed the same way whichever thread runs it, so the
    results do not depend on the thread count. Below ``min_work`` total size the items run
    serially, where the pool's overhead would exceed its gain. When an item raises, no new
    items start; the call returns (raises) only once no pool thread works for it any more.

    BLAS is kept single-threaded throughout, serial or not (:func:`blas_single_threaded`): a
    multi-threaded BLAS may split the reduction of ``x.T @ g`` across its threads, which
    changes the rounding.
    """
    items = list(items)
    n = len(items)
    sizes = [1] * n if sizes is None else list(sizes)
    threads = get_num_threads()
    with blas_single_threaded():
        if threads == 1 or n < 2 or sum(sizes) < min_work:
            return [fn(item) for item in items]
        order = sorted(range(n), key=lambda i: -sizes[i])
        claim = itertools.count()
        results = [None] * n
        failed = []

        def work():
            try:
                for j in iter(lambda: next(claim), None):
                    if j >= n or failed:
                        return
                    results[order[j]] = fn(items[order[j]])
            except BaseException:
                failed.append(True)
                raise

        controllers = _blas_controllers()
        if any(c.per_thread for c in controllers):  # each pool thread limits its own BLAS
            def helper_work():
                _enter_thread_blas(controllers)
                try:
                    work()
                finally:
                    _exit_thread_blas()
        else:
            helper_work = work

        pool = _acquire_pool()
        try:
            helpers = [pool.executor.submit(helper_work)
                       for _ in range(min(pool.threads, n) - 1)]
            try:
                work()
            finally:
                # Helpers that have not started would find no item left: cancel them (this
                # also avoids waiting on a pool busy with other callers); wait for the rest,
                # so none still computes after this call (and its BLAS entry) ends.
                errors = []
                for helper in helpers:
                    if not helper.cancel():
                        error = helper.exception()
                        if error is not None:
                            errors.append(error)
            if errors:
                raise errors[0]
        finally:
            _release_pool(pool)
        return results
