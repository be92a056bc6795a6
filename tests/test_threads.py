"""The thread pool never changes result bits, its controls validate their input, and BLAS is
kept single-threaded safely when several Python threads call sparsegrid at once."""

import re
import subprocess
import sys
import threading

import numpy as np
import pytest

import sparsegrid as sg
from sparsegrid import cpu
from sparsegrid.cpu import threads

from reference import blas_limited, conv_problem, conv_step

try:
    import threadpoolctl
except ImportError:  # the ctypes fallback is what the library uses then
    threadpoolctl = None

_ctypes_controllers = threads._from_ctypes  # tests below monkeypatch the module's name


def _blas_threads():
    """Thread count of each loaded BLAS, read independently of sparsegrid's cached state."""
    if threadpoolctl is not None:
        return [info["num_threads"] for info in threadpoolctl.threadpool_info()
                if info["user_api"] == "blas"]
    return [c.get() for c in _ctypes_controllers()]


_blas_limited = blas_limited


def _openblas_loaded():
    with open("/proc/self/maps") as maps:
        return re.search(r"openblas\S*\.so", maps.read()) is not None


@pytest.fixture
def restore_threads():
    before = sg.get_num_threads()
    blas_before = _blas_threads()
    yield
    sg.set_num_threads(before)
    threads._reset_blas_controllers()  # rediscover (a test may have hidden threadpoolctl)
    assert _blas_threads() == blas_before


@pytest.fixture(scope="module")
def problem():
    # Big enough that the plan runs on the pool and that a multi-threaded BLAS would split
    # the weight-gradient reductions (which would change the bits).
    return conv_problem(20240611, (60, 60, 60), 32, 0.25)


def _run(x, weight, grad):
    """Forward and backward (through autodiff) of a submanifold conv, and a strided conv."""
    z = sg.conv(x, weight[:8], None, 2, 2)
    return conv_step(x, weight, grad) + (np.asarray(z.features),)


def _assert_same_bits(expected, got, what):
    for a, b in zip(expected, got):
        assert np.array_equal(a, b), f"{what} changed the bits"


@pytest.fixture(scope="module")
def reference_bits(problem):
    before = sg.get_num_threads()
    sg.set_num_threads(1)
    try:
        return _run(*problem)
    finally:
        sg.set_num_threads(before)


def test_bits_identical_for_1_2_and_3_threads(problem, reference_bits, restore_threads):
    for n in (1, 2, 3):
        sg.set_num_threads(n)
        with _blas_limited(n):
            _assert_same_bits(reference_bits, _run(*problem), f"{n} threads")


def test_concurrent_callers_give_the_single_threaded_bits(problem, reference_bits,
                                                          restore_threads):
    sg.set_num_threads(2)
    with _blas_limited(2):  # a multi-threaded BLAS, which the kernels must not use
        blas_before = _blas_threads()
        start = threading.Barrier(2)
        results, errors = [[], []], []

        def caller(slot):
            try:
                start.wait()
                for _ in range(6):
                    results[slot].append(_run(*problem))
            except BaseException as error:  # pragma: no cover - reported below
                errors.append(error)

        workers = [threading.Thread(target=caller, args=(i,)) for i in range(2)]
        for w in workers:
            w.start()
        seen = []
        while any(w.is_alive() for w in workers):  # whenever sampled: 1 (inside) or before
            seen.append(_blas_threads())
            workers[0].join(0.005)
        for w in workers:
            w.join()
        assert not errors, errors
        assert _blas_threads() == blas_before
        assert all(s == blas_before or all(n == 1 for n in s) for s in seen), seen
    for slot in results:
        assert len(slot) == 6
        for got in slot:
            _assert_same_bits(reference_bits, got, "a concurrent caller")


class _FakeBlas:
    """A process-wide BLAS thread count that records every get/set."""

    def __init__(self, threads=4):
        self.threads, self.calls = threads, []

    def controller(self):
        return threads._Controller("fake", self._get, self._set)

    def _get(self):
        self.calls.append("get")
        return self.threads

    def _set(self, n):
        self.calls.append(("set", n))
        self.threads = n


@pytest.fixture
def fake_blas(monkeypatch):
    fake = _FakeBlas()
    monkeypatch.setitem(threads._blas, "controllers", (fake.controller(),))
    yield fake
    assert threads._blas["depth"] == 0


def test_nested_entries_restore_only_at_the_outermost_exit(fake_blas):
    with threads.blas_single_threaded():
        assert fake_blas.threads == 1 and fake_blas.calls == ["get", ("set", 1)]
        with threads.blas_single_threaded():
            with threads.blas_single_threaded():
                pass
            assert fake_blas.threads == 1
        assert fake_blas.threads == 1
        assert fake_blas.calls == ["get", ("set", 1)]  # inner entries cost no BLAS call
    assert fake_blas.threads == 4
    assert fake_blas.calls == ["get", ("set", 1), ("set", 4)]


def test_an_exception_inside_still_restores(fake_blas):
    with pytest.raises(KeyError):
        with threads.blas_single_threaded():
            with threads.blas_single_threaded():
                raise KeyError("inner")
    assert fake_blas.threads == 4 and threads._blas["depth"] == 0
    with threads.blas_single_threaded():  # and the count starts afresh
        assert fake_blas.threads == 1
    assert fake_blas.threads == 4


def test_the_last_thread_to_leave_restores(fake_blas):
    # Main enters first, another thread enters, main leaves: the other thread is still
    # inside, so BLAS stays at 1 until it leaves (the race of a save/restore per call).
    entered, main_left, seen = threading.Event(), threading.Event(), []

    def other():
        with threads.blas_single_threaded():
            entered.set()
            main_left.wait()
            seen.append(fake_blas.threads)
        seen.append(fake_blas.threads)

    with threads.blas_single_threaded():
        t = threading.Thread(target=other)
        t.start()
        entered.wait()
    assert fake_blas.threads == 1
    main_left.set()
    t.join()
    assert seen == [1, 4] and fake_blas.threads == 4


def test_already_single_threaded_blas_is_left_alone(fake_blas):
    fake_blas.threads = 1
    with threads.blas_single_threaded():
        pass
    assert fake_blas.calls == ["get"]


def test_parallel_map_runs_inside_one_entry(fake_blas, restore_threads):
    sg.set_num_threads(2)
    seen = cpu.parallel_map(lambda i: fake_blas.threads, range(50), [10_000] * 50)
    assert seen == [1] * 50 and fake_blas.threads == 4


def test_per_thread_blas_limits_are_set_in_every_pool_thread(monkeypatch, restore_threads):
    # OpenBLAS built with OpenMP, as threadpoolctl drives it, limits the calling thread only.
    local, default, calls = threading.local(), 4, []

    def get():
        return getattr(local, "n", default)

    def set_(n):
        calls.append(threading.current_thread().name)
        local.n = n

    controller = threads._Controller("per-thread fake", get, set_, per_thread=True)
    monkeypatch.setitem(threads._blas, "controllers", (controller,))
    sg.set_num_threads(2)
    barrier = threading.Barrier(2, timeout=10)

    def item(i):
        if i < 2:  # both threads take part: the caller and the helper each hold one of these
            barrier.wait()
        return get(), threading.current_thread().name

    seen = cpu.parallel_map(item, range(40), [10_000] * 40)
    assert {n for n, _ in seen} == {1}
    assert len({name for _, name in seen}) == 2
    assert get() == default  # the caller's limit was restored
    assert len(calls) == 4  # one limit and one restore in each thread


def test_fallback_without_threadpoolctl(monkeypatch, problem, reference_bits, restore_threads):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # `import threadpoolctl` fails
    threads._reset_blas_controllers()
    controllers = threads._blas_controllers()
    assert all(c.name.startswith("ctypes:") for c in controllers)
    if _openblas_loaded():
        assert controllers
    before = [c.get() for c in controllers]
    with threads.blas_single_threaded():
        assert all(c.get() == 1 for c in controllers)
    assert [c.get() for c in controllers] == before
    sg.set_num_threads(2)
    with _blas_limited(2):
        _assert_same_bits(reference_bits, _run(*problem), "the ctypes fallback")


def test_no_blas_found_changes_nothing(monkeypatch, restore_threads):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)
    monkeypatch.setattr(threads, "_from_ctypes", lambda: [])
    threads._reset_blas_controllers()
    assert threads._blas_controllers() == ()
    before = _blas_threads()
    with threads.blas_single_threaded():
        assert _blas_threads() == before
    sg.set_num_threads(2)
    assert cpu.parallel_map(lambda i: -i, range(30), [10_000] * 30) == [-i for i in range(30)]


def test_import_does_not_import_threadpoolctl():
    code = ("import importlib.util, sys, sparsegrid\n"
            "assert 'threadpoolctl' not in sys.modules, 'imported by import sparsegrid'\n"
            "sparsegrid.cpu.parallel_map(abs, [1, -2])\n"
            "installed = importlib.util.find_spec('threadpoolctl') is not None\n"
            "print('threadpoolctl' in sys.modules, installed)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == out[1]  # imported on first need (if installed)


def test_reset_refused_inside_an_entry(fake_blas):
    with threads.blas_single_threaded():
        with pytest.raises(RuntimeError, match="cannot reset"):
            threads._reset_blas_controllers()


def test_parallel_map_keeps_order(restore_threads):
    sg.set_num_threads(2)
    items = list(range(100))
    assert cpu.parallel_map(lambda i: i * i, items, [10_000] * 100) == [i * i for i in items]


def test_parallel_map_propagates_errors(restore_threads):
    sg.set_num_threads(2)

    def boom(i):
        if i == 7:
            raise RuntimeError("item 7")
        return i

    with pytest.raises(RuntimeError, match="item 7"):
        cpu.parallel_map(boom, range(20), [10_000] * 20)


def test_set_num_threads_while_the_pool_works(restore_threads):
    # Changing the thread count from inside a running parallel_map (as another Python thread
    # might) lets this call finish on its pool and the next calls use a new one.
    sg.set_num_threads(2)

    def item(i):
        if i == 0:
            sg.set_num_threads(3)
            assert cpu.parallel_map(lambda j: j + 1, range(10), [10_000] * 10) == \
                list(range(1, 11))
        return 2 * i

    assert cpu.parallel_map(item, range(30), [10_000] * 30) == [2 * i for i in range(30)]
    assert sg.get_num_threads() == 3
    assert cpu.parallel_map(lambda i: i, range(30), [10_000] * 30) == list(range(30))


def test_a_replaced_pool_serves_its_users_until_they_leave(restore_threads):
    sg.set_num_threads(2)
    pool = threads._acquire_pool()
    try:
        sg.set_num_threads(3)  # formerly shut the pool down under its user's feet
        assert pool.executor.submit(lambda: 42).result() == 42
    finally:
        threads._release_pool(pool)
    with pytest.raises(RuntimeError):  # its last user left: now it is shut down
        pool.executor.submit(lambda: 0)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_set_num_threads_rejects(bad):
    with pytest.raises(ValueError, match="n must be a positive int"):
        sg.set_num_threads(bad)


def test_set_num_threads_accepts_numpy_ints(restore_threads):
    sg.set_num_threads(np.int64(2))
    assert sg.get_num_threads() == 2 and type(sg.get_num_threads()) is int
