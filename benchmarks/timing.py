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


# --------------------------------------------------------------------------
# Device timers: one interface, CUDA events on a GPU, perf_counter on the host
# --------------------------------------------------------------------------


class HostTimer:
    """Times ``fn()`` with ``time.perf_counter`` (the CPU rehearsal of a GPU benchmark).

    ``times_ms(fn, repeat, warmup)`` runs ``fn`` ``warmup`` times untimed, then ``repeat``
    (at least one) timed calls, and returns their durations in milliseconds. ``sync`` is
    called after every call, so a device's queued work is counted where one is given.
    """

    kind = "perf_counter"

    def __init__(self, sync=None):
        self._sync = sync or (lambda: None)

    def times_ms(self, fn, repeat, warmup=2):
        for _ in range(max(0, int(warmup))):
            fn()
        self._sync()
        times = []
        for _ in range(max(1, int(repeat))):
            start = time.perf_counter()
            fn()
            self._sync()
            times.append(1e3 * (time.perf_counter() - start))
        return times

    def median_ms(self, fn, repeat, warmup=2):
        """The median of :meth:`times_ms`."""
        return statistics.median(self.times_ms(fn, repeat, warmup))

    def times_after_setup_ms(self, setup, fn, repeat, warmup=2):
        """Like :meth:`times_ms`, timing only ``fn(setup())``: ``setup`` runs untimed
        before each call (a backward pass timed without its forward)."""
        for _ in range(max(0, int(warmup))):
            fn(setup())
        times = []
        for _ in range(max(1, int(repeat))):
            state = setup()
            self._sync()
            start = time.perf_counter()
            fn(state)
            self._sync()
            times.append(1e3 * (time.perf_counter() - start))
        return times


class EventTimer(HostTimer):
    """Times ``fn()`` with a pair of device events around each call (CuPy's or torch's).

    ``events`` is ``cupy.cuda`` (``Event``, ``get_elapsed_time``) or ``torch.cuda``
    (``Event(enable_timing=True)``, ``elapsed_time``). Both record on the current
    stream; sparsegrid and spconv both launch on the legacy default stream unless told
    otherwise, so either library's events time either library's work. The stop event is
    waited on after every call (a host synchronisation between calls, as in training
    loops that read a loss), so the calls do not overlap.
    """

    def __init__(self, events, library):
        super().__init__()
        if library not in ("cupy", "torch"):
            raise ValueError(f"EventTimer: library must be 'cupy' or 'torch'; got {library!r}")
        self._events, self._library = events, library
        self.kind = f"{library} CUDA events"

    def _pair(self):
        if self._library == "torch":
            return (self._events.Event(enable_timing=True),
                    self._events.Event(enable_timing=True))
        return self._events.Event(), self._events.Event()

    def _elapsed(self, start, stop):
        if self._library == "torch":
            return start.elapsed_time(stop)
        return self._events.get_elapsed_time(start, stop)

    def times_ms(self, fn, repeat, warmup=2):
        for _ in range(max(0, int(warmup))):
            fn()
        start, stop = self._pair()
        times = []
        for _ in range(max(1, int(repeat))):
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(float(self._elapsed(start, stop)))
        return times

    def times_after_setup_ms(self, setup, fn, repeat, warmup=2):
        for _ in range(max(0, int(warmup))):
            fn(setup())
        start, stop = self._pair()
        times = []
        for _ in range(max(1, int(repeat))):
            state = setup()
            start.record()
            fn(state)
            stop.record()
            stop.synchronize()
            times.append(float(self._elapsed(start, stop)))
        return times
