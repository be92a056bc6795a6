"""The optional numba fast path (sparsegrid.cpu.jit) agrees with the NumPy path, gives the
same bits for any thread count, can be switched off, and is never imported by
``import sparsegrid``."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import sparsegrid as sg
from sparsegrid import autodiff as ad
from sparsegrid import cpu
from sparsegrid.autodiff import Tensor
from sparsegrid.autodiff.core import data_of
from sparsegrid.cpu import jit
from sparsegrid.functional import conv_plan

from reference import random_sites

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_import_sparsegrid_does_not_import_numba():
    code = ("import sparsegrid, sys; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('numba', 'llvmlite')]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_generated_kernels_up_to_date():
    path = pathlib.Path(jit.__file__).with_name("_jit_kernels.py")
    assert path.read_text() == jit.generate_source(), \
        "regenerate with: python -m sparsegrid.cpu.jit"


def test_set_jit_enabled_rejects():
    with pytest.raises(ValueError, match="True, False or None"):
        cpu.set_jit_enabled(1)


pytest.importorskip("numba")


@pytest.fixture
def jit_on():
    cpu.set_jit_enabled(True)
    yield
    cpu.set_jit_enabled(None)


@pytest.fixture
def restore_threads():
    before = sg.get_num_threads()
    yield
    sg.set_num_threads(before)


def _both_paths(run):
    """run() with the JIT, then with the NumPy path."""
    cpu.set_jit_enabled(True)
    try:
        fast = run()
        cpu.set_jit_enabled(False)
        slow = run()
    finally:
        cpu.set_jit_enabled(None)
    return fast, slow


def _close(a, b, dtype):
    tol = 1e-11 if dtype == np.float64 else 2e-5
    for u, v in zip(a, b):
        assert u.shape == v.shape and u.dtype == v.dtype
        np.testing.assert_allclose(u, v, rtol=tol, atol=tol)


def _tensor(rng, shape, channels, dtype, density=0.3, batch=2):
    indices = random_sites(rng, shape, batch, density=density)
    return sg.SparseTensor(rng.standard_normal((len(indices), channels)).astype(dtype),
                           indices, shape)


def _grads(op, x, w, b, dtype):
    """Output, feature, weight and bias gradients of sum(op(x) * G) through autodiff."""
    f = Tensor(x.features, requires_grad=True)
    wt = Tensor(w, requires_grad=True)
    bt = Tensor(b, requires_grad=True)
    y = op(x.with_features(f), wt, bt)
    g = np.random.default_rng(7).standard_normal(y.features.shape).astype(dtype)
    ad.sum(y.features * g).backward()
    return data_of(y.features), f.grad, wt.grad, bt.grad


CASES = {
    # name: (spatial shape, weight offsets, op)
    "1d_subm3": ((40,), 3, lambda x, w, b: sg.submanifold_conv(x, w, b, 3)),
    "2d_subm3": ((12, 11), 9, lambda x, w, b: sg.submanifold_conv(x, w, b, 3)),
    "2d_subm4_even": ((9, 10), 16, lambda x, w, b: sg.submanifold_conv(x, w, b, 4)),
    "3d_subm3": ((7, 6, 8), 27, lambda x, w, b: sg.submanifold_conv(x, w, b, 3)),
    "3d_subm2_dilated": ((7, 6, 8), 8, lambda x, w, b: sg.submanifold_conv(x, w, b, 2, 2)),
    "3d_subm5": ((6, 6, 6), 125, lambda x, w, b: sg.submanifold_conv(x, w, b, 5)),
    "4d_subm3": ((5, 4, 5, 4), 81, lambda x, w, b: sg.submanifold_conv(x, w, b, 3)),
    "3d_k2s2": ((8, 6, 8), 8, lambda x, w, b: sg.conv(x, w, b, 2, 2)),
    "3d_k3s2": ((9, 7, 9), 27, lambda x, w, b: sg.conv(x, w, b, 3, 2)),
    "3d_k2s2_deconv": ((8, 6, 8), 8,
                       lambda x, w, b: sg.deconv(sg.conv(x, w, None, 2, 2), w, b, 2, 2)),
    "2d_full": ((5, 6), 9, lambda x, w, b: sg.full_conv(x, w, b, 3, 2)),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_jit_matches_numpy(rng, case, dtype):
    shape, k, op = CASES[case]
    # channel counts that use the generated tiles, the generic tail and both together
    for cin, cout in ((3, 5), (8, 16), (4, 12)):
        x = _tensor(rng, shape, cin, dtype)
        w = (rng.standard_normal((k, cin, cout)) / np.sqrt(k * cin)).astype(dtype)
        if case == "3d_k2s2_deconv":
            w = (rng.standard_normal((k, cin, cin)) / np.sqrt(k * cin)).astype(dtype)
        b = rng.standard_normal(w.shape[-1]).astype(dtype)
        fast, slow = _both_paths(lambda: _grads(op, x, w, b, dtype))
        _close(fast, slow, dtype)


@pytest.mark.parametrize("n_sites", [0, 1])
def test_jit_empty_and_single_site(rng, n_sites, jit_on):
    shape = (5, 5, 5)
    indices = np.array([[0, 2, 3, 1]], np.int32)[:n_sites]
    x = sg.SparseTensor(rng.standard_normal((n_sites, 4)), indices, shape)
    w = rng.standard_normal((27, 4, 6))
    b = rng.standard_normal(6)
    fast, slow = _both_paths(lambda: _grads(
        lambda x, w, b: sg.submanifold_conv(x, w, b, 3), x, w, b, np.float64))
    _close(fast, slow, np.float64)
    if n_sites:
        np.testing.assert_allclose(fast[0], x.features @ w[13] + b, rtol=1e-13)


def test_grouped_weights_fall_back(rng):
    x = _tensor(rng, (6, 6, 6), 6, np.float64)
    w = rng.standard_normal((27, 2, 3, 4))
    fast, slow = _both_paths(lambda: sg.submanifold_conv(x, w).features)
    np.testing.assert_array_equal(fast, slow)


def test_jit_plan_is_used_and_switch_disables_it(rng):
    x = _tensor(rng, (6, 6, 6), 4, np.float32)
    rb = x.grid.submanifold(x.sites, 3)
    cpu.set_jit_enabled(True)
    try:
        assert cpu.jit_enabled()
        assert isinstance(conv_plan(rb, cpu), jit.JitPlan)
        cpu.set_jit_enabled(False)
        assert not cpu.jit_enabled()
        assert isinstance(conv_plan(rb, cpu), cpu.ConvPlan)
    finally:
        cpu.set_jit_enabled(None)


def test_environment_variable_disables_jit():
    code = ("import numpy as np, sparsegrid as sg, sys\n"
            "from sparsegrid import cpu\n"
            "x = sg.SparseTensor(np.ones((2, 3), np.float32), np.array([[0, 0, 0], [0, 1, 1]], "
            "np.int32), (3, 3))\n"
            "sg.submanifold_conv(x, np.ones((9, 3, 3), np.float32))\n"
            "assert not cpu.jit_enabled()\n"
            "assert 'numba' not in sys.modules, 'numba imported although SPARSEGRID_JIT=0'\n")
    env = dict(os.environ, SPARSEGRID_JIT="0")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr


def test_jit_bits_identical_for_1_2_3_threads(rng, jit_on, restore_threads):
    # several units of work (> jit.UNIT_ROWS rows) so the pool really splits the rows
    shape, c = (40, 40, 40), 24
    indices = random_sites(rng, shape, 1, density=0.2)
    x = sg.SparseTensor(rng.standard_normal((len(indices), c)).astype(np.float32), indices,
                        shape)
    w = rng.standard_normal((27, c, c)).astype(np.float32)
    grad = rng.standard_normal((len(indices), c)).astype(np.float32)
    rb = x.grid.submanifold(x.sites, 3)
    assert rb.n_out > 2 * jit.UNIT_ROWS
    results = {}
    for n in (1, 2, 3):
        sg.set_num_threads(n)
        y = sg.submanifold_conv(x, w)
        gf, gw = cpu.conv_backward(grad, x.features, w, rb.in_idx, rb.out_idx, rb.offset_ptr,
                                   rb.identity_offset,
                                   transposed_plan=conv_plan(rb.transpose(), cpu))
        results[n] = (y.features, gf, gw)
    assert isinstance(conv_plan(rb, cpu), jit.JitPlan)
    for n in (2, 3):
        for a, b in zip(results[1], results[n]):
            assert np.array_equal(a, b), f"{n} threads changed the bits"


def test_csr_plan_groups_pairs_by_output_row_in_offset_order(rng, jit_on):
    x = _tensor(rng, (7, 7), 1, np.float32, density=0.5)
    rb = x.grid.submanifold(x.sites, 3)
    plan = conv_plan(rb, cpu)
    table = rb.neighbor_map()
    for o in range(rb.n_out):
        lo, hi = plan.row_ptr[o], plan.row_ptr[o + 1]
        ks = np.flatnonzero(table[o] >= 0)
        np.testing.assert_array_equal(plan.offsets[lo:hi], ks)
        np.testing.assert_array_equal(plan.in_rows[lo:hi], table[o, ks])


# --- compiled weight gradient (jit.weight_gradient on the transposed rulebook's plan) ----

def _random_rulebook(rng, n_in, n_out, n_offsets, fill=0.4, empty=()):
    """Pairs offset by offset; within an offset each output row at most once (the
    rulebook's guarantee), input rows random. Offsets in ``empty`` get no pairs."""
    ins, outs, ptr = [], [], [0]
    for k in range(n_offsets):
        n = 0 if k in empty or n_out == 0 or n_in == 0 else rng.binomial(n_out, fill)
        rows = np.sort(rng.choice(n_out, size=n, replace=False)) if n else np.zeros(0, int)
        outs.append(rows)
        ins.append(rng.integers(0, max(n_in, 1), size=n))
        ptr.append(ptr[-1] + n)
    return (np.concatenate(ins).astype(np.int32), np.concatenate(outs).astype(np.int32),
            np.array(ptr, np.int64))


def _wgrad_numpy(x, g, in_idx, out_idx, ptr):
    cout = g.shape[1]
    w = np.zeros((len(ptr) - 1, x.shape[1], cout), x.dtype)
    cpu.set_jit_enabled(False)
    try:
        _, grad = cpu.conv_backward(g, x, w, in_idx, out_idx, ptr, -1, need_features=False)
    finally:
        cpu.set_jit_enabled(None)
    return grad


def _wgrad_compiled(x, g, in_idx, out_idx, ptr, method="compiled"):
    plan = jit.build_plan(out_idx, in_idx, ptr, len(x))   # the transposed rulebook's plan
    return jit.weight_gradient(x, g, in_idx, out_idx, ptr, -1, plan=plan, method=method)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cin, cout", [(3, 5), (8, 8), (7, 16), (16, 12), (13, 32), (6, 40),
                                       (5, 64), (4, 70)])
def test_compiled_weight_gradient_matches_numpy(rng, jit_on, dtype, cin, cout):
    # every generated tile width (64, 32, 16, 8), the generic tail, and input-channel
    # counts that leave remainders after the 6- and 8-row register tiles
    n_in, n_out = 300, 260
    in_idx, out_idx, ptr = _random_rulebook(rng, n_in, n_out, 27, empty=(3, 26))
    x = rng.standard_normal((n_in, cin)).astype(dtype)
    g = rng.standard_normal((n_out, cout)).astype(dtype)
    fast = _wgrad_compiled(x, g, in_idx, out_idx, ptr)
    assert fast.dtype == dtype and fast.shape == (27, cin, cout)
    _close([fast], [_wgrad_numpy(x, g, in_idx, out_idx, ptr)], dtype)
    assert not fast[3].any() and not fast[26].any()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_weight_gradient_on_real_rulebooks(rng, jit_on, case, dtype):
    # 1-D to 4-D submanifold, strided, transposed and full convolutions
    shape, k, op = CASES[case]
    x = _tensor(rng, shape, 8, dtype)
    rb = x.grid.submanifold(x.sites, round(k ** (1 / len(shape)))) \
        if "subm" in case and "even" not in case and "dilated" not in case else None
    if rb is None:
        return  # covered through autodiff by test_jit_matches_numpy
    g = rng.standard_normal((rb.n_out, 16)).astype(dtype)
    fast = jit.weight_gradient(x.features, g, rb.in_idx, rb.out_idx, rb.offset_ptr,
                               rb.identity_offset, plan=conv_plan(rb.transpose(), cpu))
    assert jit.wgrad_method(8, 16, conv_plan(rb.transpose(), cpu)) == "compiled"
    slow = _wgrad_numpy(x.features, g, rb.in_idx, rb.out_idx, rb.offset_ptr)
    _close([fast], [slow], dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compiled_weight_gradient_edge_cases(rng, jit_on, dtype):
    # a single pair
    x = rng.standard_normal((4, 3)).astype(dtype)
    g = rng.standard_normal((5, 8)).astype(dtype)
    in_idx, out_idx = np.array([2], np.int32), np.array([4], np.int32)
    ptr = np.array([0, 0, 1, 1], np.int64)
    fast = _wgrad_compiled(x, g, in_idx, out_idx, ptr)
    expected = np.zeros((3, 3, 8), dtype)
    expected[1] = np.outer(x[2], g[4])
    np.testing.assert_array_equal(fast, expected)  # one product per value: exact
    # no pairs at all, no rows, no channels
    for n_in, cin, cout in ((4, 3, 8), (0, 3, 8), (4, 0, 8), (4, 3, 0)):
        x = rng.standard_normal((n_in, cin)).astype(dtype)
        g = rng.standard_normal((5, cout)).astype(dtype)
        empty = np.zeros(0, np.int32)
        fast = _wgrad_compiled(x, g, empty, empty, np.zeros(4, np.int64))
        assert fast.shape == (3, cin, cout) and fast.dtype == dtype and not fast.any()
    with pytest.raises(ValueError, match="transposed JitPlan"):
        jit.weight_gradient(x, g, empty, empty, np.zeros(4, np.int64), -1, method="compiled")


def test_weight_gradient_method_rule():
    plan = jit.JitPlan(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int16), 27)
    assert jit.wgrad_method(64, 64, plan) == "compiled"
    assert jit.wgrad_method(16, 32, plan) == "compiled"
    assert jit.wgrad_method(128, 128, plan) == "compiled"
    assert jit.wgrad_method(128, 129, plan) == "blas"
    assert jit.wgrad_method(16, 16, None) == "blas"


@pytest.mark.parametrize("method", ["compiled", "blas"])
def test_weight_gradient_bits_identical_for_1_2_3_threads(rng, jit_on, restore_threads,
                                                          method):
    # several units of work (> jit.WGRAD_UNIT_ROWS input rows), two channel tiles
    n_in, n_out = 3 * jit.WGRAD_UNIT_ROWS + 100, 3 * jit.WGRAD_UNIT_ROWS
    in_idx, out_idx, ptr = _random_rulebook(rng, n_in, n_out, 27, fill=0.15, empty=(5,))
    x = rng.standard_normal((n_in, 32)).astype(np.float32)
    g = rng.standard_normal((n_out, 40)).astype(np.float32)
    results = {}
    for n in (1, 2, 3):
        sg.set_num_threads(n)
        results[n] = _wgrad_compiled(x, g, in_idx, out_idx, ptr, method=method)
    for n in (2, 3):
        assert np.array_equal(results[1], results[n]), f"{n} threads changed the bits"
    if method == "compiled":  # sums of ~3,700 float32 products: tolerance scaled to them
        slow = _wgrad_numpy(x, g, in_idx, out_idx, ptr)
        np.testing.assert_allclose(results[1], slow, rtol=0, atol=1e-5 * np.abs(slow).max())


# --- register tiles for 512- and 256-bit vectors (jit.FORWARD_TILES / WGRAD_TILES) -------

def _forward_numpy(x, w, b, in_idx, out_idx, ptr, n_out):
    out = np.tile(b, (n_out, 1)).astype(x.dtype)
    for k in range(len(ptr) - 1):
        s, e = ptr[k], ptr[k + 1]
        out[out_idx[s:e]] += x[in_idx[s:e]] @ w[k]   # each output row once per offset
    return out


def test_vector_bits_is_512_or_256():
    assert jit.vector_bits() in (512, 256)


@pytest.mark.parametrize("features,cpu_name,bits", [
    ("+avx2,+fma,+avx512f,+avx512bw", None, 512),
    ("+avx2,+fma,-avx512f", None, 256),
    ("+avx2,+fma,+avx512f", "haswell", 512),      # explicit features win over the name
    (None, "haswell", 256),
    (None, "generic", 256),
    (None, "skylake-avx512", 512),
    (None, "znver4", 512),
])
def test_vector_bits_follows_numbas_target(features, cpu_name, bits):
    # NUMBA_CPU_FEATURES, else NUMBA_CPU_NAME (a portable cache for AVX2 CPUs compiled on
    # an AVX-512 host must get the 16-register tiles), else the host
    assert jit._bits_for(features, cpu_name) == bits


def test_vector_bits_of_the_host():
    import llvmlite.binding as llvm
    host = "+avx512f" in llvm.get_host_cpu_features().flatten().split(",")
    assert jit._bits_for(None, None) == jit._bits_for(None, "host") == (512 if host else 256)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cin, cout", [(13, 123), (17, 59), (1, 8), (6, 3)])
def test_every_forward_tile_both_vector_widths(rng, dtype, cin, cout):
    # 123 = 64 + 32 + 16 + 8 + 3 and 59 = 32 + 16 + 8 + 3: every generated tile of both
    # tables and the generic tail; many rows per offset and block, so the R-row groups,
    # the single-row remainder and several blocks all run
    n_in, n_out = 700, 650
    in_idx, out_idx, ptr = _random_rulebook(rng, n_in, n_out, 27, empty=(4,))
    x = rng.standard_normal((n_in, cin)).astype(dtype)
    w = rng.standard_normal((27, cin, cout)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    plan = jit.build_plan(in_idx, out_idx, ptr, n_out)
    results = {bits: jit.forward(x, w, plan, b, bits=bits) for bits in (512, 256)}
    # the same fused multiply-adds in the same order: identical bits at either width
    assert np.array_equal(results[512], results[256])
    _close([results[512]], [_forward_numpy(x, w, b, in_idx, out_idx, ptr, n_out)], dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cout", [64, 96, 48, 24, 27, 5])
def test_every_weight_gradient_tile_both_vector_widths(rng, dtype, cout):
    # cout picks the register-tile width (64, 32, 16, 8, 8 + generic tail, generic only);
    # 29 input channels leave remainders after every row count of the tables
    n_in, n_out = 600, 550
    in_idx, out_idx, ptr = _random_rulebook(rng, n_in, n_out, 27, empty=(0, 13))
    x = rng.standard_normal((n_in, 29)).astype(dtype)
    g = rng.standard_normal((n_out, cout)).astype(dtype)
    plan = jit.build_plan(out_idx, in_idx, ptr, n_in)
    results = {bits: jit.weight_gradient(x, g, in_idx, out_idx, ptr, -1, plan=plan,
                                         method="compiled", bits=bits) for bits in (512, 256)}
    assert np.array_equal(results[512], results[256])
    _close([results[512]], [_wgrad_numpy(x, g, in_idx, out_idx, ptr)], dtype)


def test_every_generated_kernel_is_reachable():
    # every (width, lanes, rows) of the tables has a kernel in _jit_kernels.py, and the
    # channel counts of the two tests above select each of them
    kernels = jit._kernels()
    for table, name in ((jit.FORWARD_TILES, jit._forward_name),
                        (jit.WGRAD_TILES, jit._wgrad_name)):
        for tiles in table.values():
            for tile in tiles:
                assert callable(getattr(kernels, name(*tile)))
    for (bits, dtype), tiles in jit.FORWARD_TILES.items():
        chosen = {(width, lanes, rows) for cout in (123, 59)
                  for _, width, lanes, rows in jit.forward_tiles(cout, dtype, bits) if lanes}
        assert chosen == set(tiles), (bits, dtype)
    for (bits, dtype), tiles in jit.WGRAD_TILES.items():
        chosen = {jit._wgrad_split(cout, dtype, bits)[1] for cout in (64, 96, 48, 24, 27)}
        assert chosen == {jit._wgrad_name(*tile) for tile in tiles}, (bits, dtype)


def test_simd_operations_reject_wrong_types():
    import numba
    from numba.core.errors import TypingError

    from sparsegrid.cpu import _simd

    @numba.njit
    def load_1d(a):
        return _simd.load8(a, 0, 0)

    @numba.njit
    def store_mismatch(a):
        _simd.store8(a, 0, 0, _simd.splat16(a[0, 0]))

    @numba.njit
    def round_trip(a, s):
        _simd.store4(a, 1, 2, _simd.fma(_simd.splat4(s), _simd.load4(a, 0, 0),
                                        _simd.load4(a, 1, 2)))

    with pytest.raises((TypeError, TypingError), match="2-D float32 or float64"):
        load_1d(np.zeros(16, np.float32))
    with pytest.raises((TypeError, TypingError), match="store8"):
        store_mismatch(np.zeros((2, 16), np.float32))
    a = np.arange(16, dtype=np.float64).reshape(2, 8)
    expected = a.copy()
    expected[1, 2:6] = 3.0 * a[0, :4] + a[1, 2:6]
    round_trip(a, 3.0)
    np.testing.assert_array_equal(a, expected)


# --- compiled submanifold rulebook walk (the same arrays as the NumPy builder) -----------

def _subm_rules(indices, shape, filter_size, dilation, enabled, shuffle_rng=None):
    from sparsegrid.cpu.index import build_index
    from sparsegrid.cpu.rules import submanifold_rules
    from sparsegrid.coords import pack_keys

    batch = int(indices[:, 0].max()) + 1 if len(indices) else 1
    keys, _ = pack_keys(indices, shape, batch)
    order = build_index(keys)
    cpu.set_jit_enabled(enabled)
    try:
        return submanifold_rules(indices, order, shape, batch, filter_size, dilation)
    finally:
        cpu.set_jit_enabled(None)


@pytest.mark.parametrize("shape, filter_size, dilation", [
    ((40,), (3,), (1,)), ((40,), (4,), (1,)), ((17, 19), (3, 3), (1, 1)),
    ((17, 19), (2, 5), (1, 1)), ((17, 19), (3, 3), (2, 1)), ((9, 10, 11), (3, 3, 3), (1, 1, 1)),
    ((9, 10, 11), (5, 3, 3), (1, 1, 1)), ((9, 10, 11), (2, 2, 2), (1, 1, 1)),
    ((5, 6, 7, 8), (3, 3, 3, 3), (1, 1, 1, 1)), ((5, 6, 7, 8), (3, 2, 1, 4), (1, 2, 1, 1))])
@pytest.mark.parametrize("density", [0.02, 0.3, 1.0])
@pytest.mark.parametrize("shuffled", [False, True])
def test_compiled_submanifold_walk_gives_numpy_arrays(rng, shape, filter_size, dilation,
                                                      density, shuffled):
    indices = random_sites(rng, shape, 3, density=density)
    if shuffled:   # rows not in key order: the builder works through the sort permutation
        indices = indices[rng.permutation(len(indices))]
    fast = _subm_rules(indices, shape, filter_size, dilation, True)
    slow = _subm_rules(indices, shape, filter_size, dilation, False)
    assert len(fast) == len(slow) == 4 and fast[3] == slow[3]
    for a, b in zip(fast[:3], slow[:3]):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("indices", [np.zeros((1, 4), np.int32),
                                     np.array([[0, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]],
                                              np.int32)])
def test_compiled_submanifold_walk_single_sites(indices):
    for f in ((3, 3, 3), (2, 2, 2)):
        fast = _subm_rules(indices, (4, 4, 4), f, (1, 1, 1), True)
        slow = _subm_rules(indices, (4, 4, 4), f, (1, 1, 1), False)
        assert fast[3] == slow[3]
        for a, b in zip(fast[:3], slow[:3]):
            assert np.array_equal(a, b)


# --- max pooling and batch norm ---------------------------------------------------------

POOL_CASES = {
    # name: (spatial shape, filter, stride)
    "1d_k3s2": ((41,), 3, 2),
    "2d_k2s2": ((12, 10), 2, 2),
    "2d_k3s1": ((9, 8), 3, 1),
    "3d_k3s2": ((9, 7, 9), 3, 2),
    "4d_k2s2": ((6, 4, 6, 4), 2, 2),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", sorted(POOL_CASES))
def test_compiled_max_pool_gives_numpy_bits(rng, case, dtype):
    shape, f, s = POOL_CASES[case]
    indices = random_sites(rng, shape, 3, density=0.4, empty_batches=(1,))
    # small integers: many ties, which must go to the same (earliest-offset) input
    features = rng.integers(-3, 4, (len(indices), 5)).astype(dtype)
    x = sg.SparseTensor(features, indices, shape)
    rb, _ = x.grid.strided(x.sites, f, s)
    g = rng.standard_normal((rb.n_out, 5)).astype(dtype)

    def run():
        out, argmax = cpu.max_pool_forward(features, rb.in_idx, rb.out_idx, rb.offset_ptr,
                                           rb.n_out)
        grad = cpu.max_pool_backward(g, argmax, rb.in_idx, rb.out_idx, rb.offset_ptr, rb.n_in)
        return out, argmax, grad

    fast, slow = _both_paths(run)
    for a, b in zip(fast, slow):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    # independent check of the forward: the maximum of each output's inputs
    out, argmax, grad = fast
    for o in range(rb.n_out):
        rows = rb.in_idx[rb.out_idx == o]
        np.testing.assert_array_equal(out[o], features[rows].max(axis=0))
        np.testing.assert_array_equal(features[argmax[o], np.arange(5)], out[o])
    # the gradient of overlapping windows sums what each input won
    expect = np.zeros((rb.n_in, 5))
    for o in range(rb.n_out):
        for c in range(5):
            expect[argmax[o, c], c] += g[o, c]
    np.testing.assert_allclose(grad, expect.astype(dtype), rtol=1e-6)


def test_max_pool_of_minus_inf_inputs_sends_no_gradient():
    # an output whose inputs are all -inf has no arg-max: its gradient goes nowhere, on
    # both paths (the NumPy path once crashed in bincount on the -1)
    features = np.array([[-np.inf, 1.0], [-np.inf, 2.0], [3.0, 0.0]], np.float32)
    in_idx = np.array([0, 2, 1], np.int32)
    out_idx = np.array([0, 1, 0], np.int32)
    ptr = np.array([0, 2, 3], np.int64)
    g = np.ones((2, 2), np.float32)

    def run():
        out, argmax = cpu.max_pool_forward(features, in_idx, out_idx, ptr, 2)
        return out, argmax, cpu.max_pool_backward(g, argmax, in_idx, out_idx, ptr, 3)

    fast, slow = _both_paths(run)
    for a, b in zip(fast, slow):
        assert a.tobytes() == b.tobytes()
    out, argmax, grad = fast
    assert out[0, 0] == -np.inf and argmax[0, 0] == -1
    np.testing.assert_array_equal(argmax, [[-1, 1], [2, 2]])
    np.testing.assert_array_equal(grad, [[0, 0], [0, 1], [1, 1]])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("leakiness,use_out", [(1.0, True), (0.0, True), (0.333, True),
                                               (0.333, False), (-0.5, True), (0.0, False)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_compiled_batch_norm_backward_matches_numpy(rng, dtype, leakiness, use_out,
                                                     training, affine):
    n, c = 257, 7
    x = (rng.standard_normal((n, c)) * 3 + 1).astype(dtype)
    g = rng.standard_normal((n, c)).astype(dtype)
    weight = rng.uniform(0.5, 2, c).astype(dtype) if affine else None
    bias = rng.standard_normal(c).astype(dtype) if affine else None
    if training:
        mean, var = cpu.batch_norm_statistics(x)
    else:
        mean, var = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    out = cpu.batch_norm_forward(x, mean, var, weight, bias, 1e-4, leakiness)

    def run():
        gx, gw, gb = cpu.batch_norm_backward(g, x, mean, var, weight, bias, 1e-4, leakiness,
                                             training, out=out if use_out else None)
        return [v for v in (gx, gw, gb) if v is not None]

    fast, slow = _both_paths(run)
    assert len(fast) == len(slow) == (3 if affine else 1)
    tol = 1e-10 if dtype == np.float64 else 2e-4
    for a, b in zip(fast, slow):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("leakiness,use_out", [(-0.5, True), (0.2, False), (0.0, False)])
@pytest.mark.parametrize("training", [True, False])
def test_compiled_batch_norm_backward_masks_like_numpy_at_zero(rng, dtype, leakiness,
                                                               use_out, training):
    # pre-activations at (or one rounding from) zero: both paths must put each value on
    # the same side of the activation (the compiled kernel once fused x * scale + shift
    # into one rounding and flipped them)
    n, c = 400, 6
    mean = rng.standard_normal(c).astype(dtype)
    x = np.repeat(mean[None], n, axis=0)
    x[::3] += rng.standard_normal((len(x[::3]), c)).astype(dtype)   # some rows off zero
    g = rng.standard_normal((n, c)).astype(dtype)
    bias = np.zeros(c, dtype)
    weight = rng.uniform(0.5, 2, c).astype(dtype)
    if training:
        mean, var = cpu.batch_norm_statistics(x)
    else:
        var = rng.uniform(0.5, 2, c).astype(dtype)
    out = cpu.batch_norm_forward(x, mean, var, weight, bias, 1e-4, leakiness)

    def run():
        return cpu.batch_norm_backward(g, x, mean, var, weight, bias, 1e-4, leakiness,
                                       training, out=out if use_out else None)

    fast, slow = _both_paths(run)
    tol = 1e-10 if dtype == np.float64 else 2e-4
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


def test_compiled_batch_norm_backward_eval_with_infinite_input(jit_on):
    # running statistics: gx = k * g whatever x is (no 0 * inf = NaN)
    x = np.array([[np.inf, 1.0], [2.0, -np.inf]], np.float32)
    g = np.ones((2, 2), np.float32)
    mean, var = np.zeros(2, np.float32), np.ones(2, np.float32)
    gx, _, _ = cpu.batch_norm_backward(g, x, mean, var, None, None, 0.0, 1.0, False)
    np.testing.assert_array_equal(gx, np.ones((2, 2), np.float32))


def test_batch_norm_backward_keeps_numpy_dtype_rule_for_mixed_dtypes(rng):
    # float64 gradient into float32 features: the NumPy path's result dtype on both paths
    x = rng.standard_normal((5, 3)).astype(np.float32)
    g = rng.standard_normal((5, 3))
    mean, var = cpu.batch_norm_statistics(x)
    fast, slow = _both_paths(lambda: cpu.batch_norm_backward(g, x, mean, var, None, None,
                                                             1e-4, 1.0, True)[0])
    assert fast.dtype == slow.dtype == np.float64
    np.testing.assert_array_equal(fast, slow)


def test_max_pool_without_channels_on_both_paths(rng):
    indices = np.array([[0, 0, 0], [0, 1, 1], [0, 3, 2]], np.int32)
    x = sg.SparseTensor(np.ones((3, 0), np.float32), indices, (4, 4))
    rb, _ = x.grid.strided(x.sites, 2, 2)

    def run():
        out, argmax = cpu.max_pool_forward(x.features, rb.in_idx, rb.out_idx, rb.offset_ptr,
                                           rb.n_out)
        grad = cpu.max_pool_backward(np.ones((rb.n_out, 0), np.float32), argmax, rb.in_idx,
                                     rb.out_idx, rb.offset_ptr, rb.n_in)
        return out, argmax, grad

    for result in _both_paths(run):
        assert [a.shape for a in result] == [(rb.n_out, 0), (rb.n_out, 0), (3, 0)]


@pytest.mark.parametrize("leakiness", [1.0, 0.0, 0.2])
def test_compiled_batch_norm_gradient_by_finite_differences(rng, leakiness, jit_on):
    # float64 central differences of sum(batch_norm(x) * G) with the compiled backward
    x = _tensor(rng, (6, 5), 3, np.float64, density=0.5)
    weight = rng.uniform(0.5, 2, 3)
    bias = rng.standard_normal(3)
    G = rng.standard_normal((x.n_active, 3))

    def loss(f, w, b):
        y = sg.batch_norm(x.with_features(f), w, b, training=True, leakiness=leakiness)
        return ad.sum(y.features * G)

    f = Tensor(x.features.copy(), requires_grad=True)
    w = Tensor(weight.copy(), requires_grad=True)
    b = Tensor(bias.copy(), requires_grad=True)
    loss(f, w, b).backward()
    for param, grad, args in ((x.features, f.grad, 0), (weight, w.grad, 1), (bias, b.grad, 2)):
        numeric = np.zeros_like(param)
        for idx in np.ndindex(param.shape):
            values = [x.features.copy(), weight.copy(), bias.copy()]
            values[args][idx] += 1e-6
            up = data_of(loss(*values))
            values[args][idx] -= 2e-6
            down = data_of(loss(*values))
            numeric[idx] = (up - down) / 2e-6
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)
