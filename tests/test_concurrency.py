"""Two Python threads calling sparsegrid at once get the bits of serial calls.

The kernels keep BLAS at one thread while they run (a lock-protected count of callers in
``sparsegrid.cpu.threads``); a multi-threaded BLAS would split the GEMMs and reductions
and change the rounding. Before that count was lock-protected, two concurrent callers
could leave BLAS multi-threaded inside a kernel: 129-376 of 400 iterations differed. Each
test here runs a few hundred kernel calls from two threads with BLAS itself allowed two
threads and sparsegrid's pool at two, and compares every result bit for bit (exact
equality) with results computed serially.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import sparsegrid as sg
import sparsegrid.nn as scn
from sparsegrid import autodiff as ad

from reference import blas_limited, conv_problem, conv_step, random_sites

_blas_limited = blas_limited


@pytest.fixture
def two_threads():
    """sparsegrid's pool and BLAS at two threads for the test; both restored after."""
    before = sg.get_num_threads()
    sg.set_num_threads(2)
    try:
        with _blas_limited(2):
            yield
    finally:
        sg.set_num_threads(before)


def _in_threads(*jobs, timeout=120):
    """Run each job in its own thread, all released at once; returns their results in
    order, re-raising the first error."""
    start = threading.Barrier(len(jobs))
    results = [None] * len(jobs)
    errors = []

    def run(slot, job):
        try:
            start.wait()
            results[slot] = job()
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    workers = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout)
    assert not any(w.is_alive() for w in workers), "a worker thread hung"
    if errors:
        raise errors[0]
    return results


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def _count_mismatches(expected, got):
    """Number of iterations whose arrays are not all bit-identical to ``expected``."""
    return sum(not all(_same_bits(e, g) for e, g in zip(expected, one)) for one in got)


# --------------------------------------------------------------------------------------
# (a) submanifold convolution forward and backward
# --------------------------------------------------------------------------------------
def _conv_problem(seed):
    # ~8k sites, 16 channels: GEMMs of blocks of 8192 pairs, which a 2-thread BLAS
    # splits (it changes the bits from about 4000 x 16 rows on)
    return conv_problem(seed, (30, 30, 30), 16, 0.3)


_conv_step = conv_step


def test_submanifold_conv_forward_backward_in_two_threads(two_threads):
    problems = [_conv_problem(1), _conv_problem(2)]
    expected = [_conv_step(*p) for p in problems]     # serial
    iterations = 60

    def job(p):
        return lambda: [_conv_step(*p) for _ in range(iterations)]

    got = _in_threads(job(problems[0]), job(problems[1]))
    for e, g in zip(expected, got):
        assert len(g) == iterations
        assert _count_mismatches(e, g) == 0
    # and once more, both threads on the same problem (same grid, shared rulebook cache)
    got = _in_threads(job(problems[0]), job(problems[0]))
    for g in got:
        assert _count_mismatches(expected[0], g) == 0


# --------------------------------------------------------------------------------------
# (b) one UNet in eval mode shared by two threads
# --------------------------------------------------------------------------------------
def _unet_input(seed):
    rng = np.random.default_rng(seed)
    shape = (40, 40, 40)
    indices = random_sites(rng, shape, 2, density=0.12)
    return sg.SparseTensor(rng.standard_normal((len(indices), 16)).astype(np.float32),
                           indices, shape, batch_size=2)


def test_shared_unet_inference_in_two_threads(two_threads):
    scn.manual_seed(5)
    # 16 and 32 planes: with 8 and 16 the GEMMs are too small for OpenBLAS to split, so a
    # multi-threaded BLAS would not change the bits and the test could not see it
    net = scn.UNet(3, reps=1, nPlanes=[16, 32], residual_blocks=False)
    net.eval()
    # eval mode uses running statistics: give them non-trivial values first
    rng = np.random.default_rng(9)
    for m in net.modules():
        if isinstance(m, scn.BatchNormalization):
            m.running_mean[...] = rng.standard_normal(m.running_mean.shape) * 0.1
            m.running_var[...] = 1 + rng.random(m.running_var.shape)
    inputs = [_unet_input(11), _unet_input(12)]
    expected = [np.array(ad.core.data_of(net(x).features)) for x in inputs]   # serial
    iterations = 12

    def job(x):
        return lambda: [np.array(ad.core.data_of(net(x).features)) for _ in range(iterations)]

    got = _in_threads(job(inputs[0]), job(inputs[1]))
    for e, g in zip(expected, got):
        assert len(g) == iterations
        assert sum(not _same_bits(e, one) for one in g) == 0


# --------------------------------------------------------------------------------------
# (c) two independent models training in two threads
# --------------------------------------------------------------------------------------
def _train_setup(seed):
    scn.manual_seed(seed)
    model = scn.Sequential(
        scn.SubmanifoldConvolution(3, 4, 16, 3, False),
        scn.BatchNormReLU(16),
        scn.Convolution(3, 16, 16, 2, 2, False),
        scn.BatchNormReLU(16),
        scn.SubmanifoldConvolution(3, 16, 16, 3, True),
        scn.Deconvolution(3, 16, 8, 2, 2, False))
    rng = np.random.default_rng(seed)
    shape = (32, 32, 32)
    indices = random_sites(rng, shape, 2, density=0.12)
    x = sg.SparseTensor(rng.standard_normal((len(indices), 4)).astype(np.float32), indices,
                        shape, batch_size=2)
    target = rng.standard_normal((len(indices), 8)).astype(np.float32)
    return model, x, target


def _train(model, x, target, steps=4):
    optimizer = scn.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ad.mse_loss(model(x).features, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {k: np.array(ad.core.data_of(v)) for k, v in model.state_dict().items()}


def _state_equal(a, b):
    return list(a) == list(b) and all(_same_bits(a[k], b[k]) for k in a)


def test_two_models_training_in_two_threads(two_threads):
    serial = [_train(*_train_setup(s)) for s in (21, 22)]
    setups = [_train_setup(s) for s in (21, 22)]      # fresh models, same initial weights
    got = _in_threads(*[lambda s=s: _train(*s) for s in setups])
    for (losses, state), (g_losses, g_state) in zip(serial, got):
        assert losses == g_losses
        assert _state_equal(state, g_state)


# --------------------------------------------------------------------------------------
# (d) set_num_threads from a third thread while two threads compute
# --------------------------------------------------------------------------------------
def test_set_num_threads_from_a_third_thread(two_threads):
    problems = [_conv_problem(3), _conv_problem(4)]
    expected = [_conv_step(*p) for p in problems]
    done = threading.Event()
    changes, errors = [0], []

    def changer():
        counts = (1, 2, 3, 2)
        try:
            while not done.is_set():
                sg.set_num_threads(counts[changes[0] % len(counts)])
                changes[0] += 1
                done.wait(0.001)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    third = threading.Thread(target=changer)
    third.start()
    try:
        iterations = 50

        def job(p):
            return lambda: [_conv_step(*p) for _ in range(iterations)]

        got = _in_threads(job(problems[0]), job(problems[1]))
    finally:
        done.set()
        third.join(30)
    assert not third.is_alive()
    assert not errors, errors
    assert changes[0] > 10
    for e, g in zip(expected, got):
        assert len(g) == iterations
        assert _count_mismatches(e, g) == 0
