"""The thread pool never changes result bits, and its controls validate their input."""

import numpy as np
import pytest

import sparsegrid as sg
from sparsegrid import cpu
from sparsegrid.functional import conv_plan

from reference import random_sites


@pytest.fixture
def restore_threads():
    before = sg.get_num_threads()
    blas = cpu.threads._find_blas_controls()
    blas_before = blas[0]() if blas else None
    yield blas
    sg.set_num_threads(before)
    if blas:
        blas[1](blas_before)


def _run(x, weight, grad):
    y = sg.submanifold_conv(x, weight)
    rb = x.grid.submanifold(x.sites, 3)
    gf, gw = cpu.conv_backward(grad, x.features, weight, rb.in_idx, rb.out_idx, rb.offset_ptr,
                               rb.identity_offset, transposed_plan=conv_plan(rb.transpose(), cpu))
    z = sg.conv(x, weight[:8], None, 2, 2)
    return y.features, gf, gw, z.features


def test_bits_identical_for_1_2_and_3_threads(rng, restore_threads):
    # Big enough that the plan runs on the pool and that a multi-threaded BLAS would split
    # the weight-gradient reductions (which would change the bits).
    shape, c = (60, 60, 60), 32
    indices = random_sites(rng, shape, 1, density=0.25)
    x = sg.SparseTensor(rng.standard_normal((len(indices), c)).astype(np.float32), indices,
                        shape)
    weight = rng.standard_normal((27, c, c)).astype(np.float32)
    grad = rng.standard_normal((len(indices), c)).astype(np.float32)
    results = {}
    blas = restore_threads
    for n in (1, 2, 3):
        sg.set_num_threads(n)
        if blas:  # as a process started with OPENBLAS_NUM_THREADS=n would have it
            blas[1](n)
        results[n] = _run(x, weight, grad)
    for n in (2, 3):
        for a, b in zip(results[1], results[n]):
            assert np.array_equal(a, b), f"{n} threads changed the bits"


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


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_set_num_threads_rejects(bad):
    with pytest.raises(ValueError, match="n must be a positive int"):
        sg.set_num_threads(bad)


def test_set_num_threads_accepts_numpy_ints(restore_threads):
    sg.set_num_threads(np.int64(2))
    assert sg.get_num_threads() == 2 and type(sg.get_num_threads()) is int
