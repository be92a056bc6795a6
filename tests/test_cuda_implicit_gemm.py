"""The fused implicit-GEMM convolution (sparsegrid/cuda/implicit_gemm.py) against float64
NumPy, on every non-CPU kernel set (the host emulator everywhere; a real GPU where one is
visible). The emulator runs one host thread per CUDA thread and emulates ``mma.sync`` lane by
lane with the PTX fragment layouts, so these tests exercise the kernels' index arithmetic,
pipelining and epilogues; a GPU run checks the hardware agrees.

Tolerances (inputs drawn representable in the data type; S = sum over pairs of |x| |w|,
the float64 convolution of |x| with |w|):
  float16: |y - ref| <= 2^-11 |ref| + 2^-14 S  (products exact in float32, float32 sums,
           one rounding to float16; tensor cores align to the largest exponent and
           truncate, hence 2^-14 rather than the emulator's few 2^-24);
  TF32:    |y - ref| <= 2^-9 S + 2^-20 S      (inputs rounded to 10-bit mantissas).
"""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref
from conftest import KernelSet, _backend_names, _to_device
import sparsegrid as sg
from sparsegrid import cpu, neighbours
from sparsegrid.cuda import _compile, autotune

_GPU_SETS = [name for name in _backend_names() if name != "cpu"]
pytestmark = pytest.mark.skipif(not _GPU_SETS, reason="no emulator or GPU")


@pytest.fixture(params=_GPU_SETS)
def cp(request):
    kernel_set = KernelSet(request.param)
    kernel_set.bind()
    import cupy
    yield cupy
    kernel_set.unbind()


@pytest.fixture(autouse=True)
def settings(tmp_path, monkeypatch):
    """A private autotuner file; algorithm and TF32 settings restored after each test."""
    monkeypatch.setenv("SPARSEGRID_CACHE_DIR", str(tmp_path))
    autotune.clear()
    algorithm, tf32 = autotune.get_conv_algorithm(), autotune.get_tf32()
    yield
    autotune.set_conv_algorithm(algorithm)
    autotune.set_tf32(tf32)
    autotune.clear()


class _Launches:
    """The kernels launched inside the block, by name (the emulator records them; on a
    real GPU ``names`` is None and the checks that need it are skipped)."""

    def __init__(self, cp):
        self.emulated = bool(getattr(cp, "emulated", False))
        self.names = None

    def __enter__(self):
        if self.emulated:
            import cupy_emulator
            cupy_emulator.launches.clear()
        return self

    def __exit__(self, *exc):
        if self.emulated:
            import cupy_emulator
            self.names = [name for name, _ in cupy_emulator.launches]
        return False

    def any(self, text):
        return True if self.names is None else any(text in n for n in self.names)

    def none(self, text):
        return True if self.names is None else not any(text in n for n in self.names)


def _tensor(rng, shape, batch_size=1, density=0.3):
    idx = ref.random_sites(rng, shape, batch_size, density)
    return sg.SparseTensor(np.zeros((len(idx), 1)), idx, shape)


def _rulebook(kind, rng, shape, filter_size, batch_size=1, density=0.3):
    x = _tensor(rng, shape, batch_size, density)
    d = len(shape)
    if kind == "submanifold":
        return x.grid.submanifold(x.sites, (filter_size,) * d)
    rulebook, coarse = x.grid.strided(x.sites, (filter_size,) * d, (2,) * d)
    if kind == "strided":
        return rulebook
    return x.grid.transposed(coarse, (filter_size,) * d, (2,) * d)[0]


def _values(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _reference(x, w, rulebook, bias=None):
    b = None if bias is None else bias.astype(np.float64)
    y = cpu.conv_forward(x.astype(np.float64), w.astype(np.float64), rulebook, b)
    s = cpu.conv_forward(np.abs(x.astype(np.float64)), np.abs(w.astype(np.float64)), rulebook)
    return y, s


def _check(got, want, scale, dtype):
    got = got.astype(np.float64)
    if dtype == np.float16:
        bound = 2.0 ** -11 * np.abs(want) + 2.0 ** -14 * scale + 1e-30
    else:
        bound = (2.0 ** -9 + 2.0 ** -20) * scale + 1e-30
    excess = np.abs(got - want) - bound
    assert excess.max(initial=-1) <= 0, (np.abs(got - want).max(), bound.min())


CASES = [  # kind, shape, filter size, (Cin, Cout)
    ("submanifold", (9,), 3, (16, 24)),
    ("submanifold", (7, 6), 2, (40, 8)),        # even filter; Cin over two chunks
    ("submanifold", (6, 5, 6), 3, (16, 72)),    # Cout over two column tiles
    ("submanifold", (4, 3, 4, 3), 3, (8, 16)),  # 4-D, 81 offsets
    ("strided", (8, 8, 6), 2, (16, 32)),
    ("transposed", (8, 8, 6), 2, (32, 16)),
    ("submanifold", (6, 5, 6), 3, (3, 5)),      # channels of no 16-byte multiple
]
CASE_IDS = [f"{k}-{len(s)}d-f{f}-c{c[0]}x{c[1]}" for k, s, f, c in CASES]


@pytest.mark.parametrize("kind,shape,filter_size,channels", CASES, ids=CASE_IDS)
def test_forward_float16_matches_float64(cp, kind, shape, filter_size, channels):
    from sparsegrid.cuda import implicit_gemm
    rng = np.random.default_rng(len(shape) * 7 + filter_size)
    rulebook = _rulebook(kind, rng, shape, filter_size)
    cin, cout = channels
    x = _values(rng, (rulebook.n_in, cin), np.float16)
    w = _values(rng, (rulebook.n_offsets, cin, cout), np.float16, 0.3)
    b = _values(rng, (cout,), np.float16)
    want, scale = _reference(x, w, rulebook, b)
    device_rulebook = _to_device(rulebook)
    got = implicit_gemm.forward(cp.asarray(x), cp.asarray(w), device_rulebook,
                                cp.asarray(b)).get()
    assert got.dtype == np.float16 and got.shape == want.shape
    _check(got, want, scale + np.abs(b.astype(np.float64)), np.float16)


def test_tiles_give_the_same_bits_and_runs_repeat(cp):
    """Every tile shape computes each output with the same float32 sum in the same order
    (tiles skip only offsets none of their rows has): identical bits, run after run."""
    from sparsegrid.cuda import implicit_gemm
    rng = np.random.default_rng(3)
    rulebook = _to_device(_rulebook("submanifold", rng, (7, 6, 6), 3, batch_size=2))
    x = cp.asarray(_values(rng, (rulebook.n_in, 16), np.float16))
    w = cp.asarray(_values(rng, (27, 16, 16), np.float16, 0.3))
    outputs = [implicit_gemm.forward(x, w, rulebook, tile=tile).get()
               for tile in _compile.IG_TILES["sg_half"]]
    outputs.append(implicit_gemm.forward(x, w, rulebook).get())
    for out in outputs[1:]:
        np.testing.assert_array_equal(out.view(np.uint16), outputs[0].view(np.uint16))


def test_tf32_forward_and_float32_fallback(cp):
    from sparsegrid.cuda import implicit_gemm
    from sparsegrid import cuda
    rng = np.random.default_rng(5)
    rulebook = _rulebook("submanifold", rng, (6, 6, 5), 3)
    x = _values(rng, (rulebook.n_in, 12), np.float32)
    w = _values(rng, (27, 12, 20), np.float32, 0.3)
    want, scale = _reference(x, w, rulebook)
    device_rulebook = _to_device(rulebook)
    assert implicit_gemm.ineligible(cp.asarray(x), cp.asarray(w), device_rulebook)
    autotune.set_conv_algorithm("implicit_gemm")
    with _Launches(cp) as launched:
        exact = cuda.conv_forward(cp.asarray(x), cp.asarray(w), device_rulebook).get()
    assert launched.none("implicit_gemm")
    np.testing.assert_allclose(exact, want, rtol=1e-5, atol=1e-5)    # TF32 off: exact
    with autotune.tf32(), _Launches(cp) as launched:
        got = cuda.conv_forward(cp.asarray(x), cp.asarray(w), device_rulebook).get()
    assert launched.any("implicit_gemm_conv<float")
    _check(got, want, scale, np.float32)
    assert np.abs(got - want).max() > 0     # TF32 really rounded the inputs


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("kind,channels", [("submanifold", (16, 24)), ("strided", (8, 16)),
                                           ("submanifold", (5, 3))])
def test_gradients_match_float64(cp, dtype, kind, channels):
    """Feature gradient (the kernel over the transposed map) and weight gradient (split-K,
    summed in slice order) of the fused path against float64 NumPy."""
    from sparsegrid import cuda
    rng = np.random.default_rng(11)
    rulebook = _rulebook(kind, rng, (8, 6, 6), 3 if kind == "submanifold" else 2)
    cin, cout = channels
    x = _values(rng, (rulebook.n_in, cin), dtype)
    w = _values(rng, (rulebook.n_offsets, cin, cout), dtype, 0.3)
    g = _values(rng, (rulebook.n_out, cout), dtype)
    want_x, want_w = cpu.conv_backward(g.astype(np.float64), x.astype(np.float64),
                                       w.astype(np.float64), rulebook)
    abs_x, abs_w = cpu.conv_backward(np.abs(g.astype(np.float64)), np.abs(x.astype(np.float64)),
                                     np.abs(w.astype(np.float64)), rulebook)
    autotune.set_conv_algorithm("implicit_gemm")
    with autotune.tf32(dtype == np.float32), _Launches(cp) as launched:
        got_x, got_w = cuda.conv_backward(cp.asarray(g), cp.asarray(x), cp.asarray(w),
                                          _to_device(rulebook))
    assert all(launched.any(name + "<") for name in
               ("implicit_gemm_conv", "implicit_gemm_wgrad", "wgrad_reduce"))
    assert got_x.dtype == dtype and got_w.dtype == dtype
    _check(got_x.get(), want_x, abs_x, dtype)
    _check(got_w.get(), want_w, abs_w, dtype)


def test_weight_gradient_split_k_is_fixed_by_the_shapes(cp):
    """Many slices (a small slice size) and one slice give the same sums up to float32
    rounding; the same call twice gives the same bits."""
    from sparsegrid.cuda import implicit_gemm
    rng = np.random.default_rng(2)
    rulebook = _to_device(_rulebook("submanifold", rng, (8, 8, 6), 3, density=0.35))
    x = cp.asarray(_values(rng, (rulebook.n_in, 8), np.float16))
    g = cp.asarray(_values(rng, (rulebook.n_out, 8), np.float16))
    w = cp.asarray(_values(rng, (27, 8, 8), np.float16))
    one = implicit_gemm.weight_gradient(x, g, w, rulebook).get()
    previous = implicit_gemm.WGRAD_SLICE_ROWS
    implicit_gemm.WGRAD_SLICE_ROWS = 32
    try:
        per_slice, slices = implicit_gemm.wgrad_slices(
            neighbours.mask_order(rulebook).n_pad, 32, 27, 8, 8)
        assert slices > 1 and per_slice % 32 == 0
        many = implicit_gemm.weight_gradient(x, g, w, rulebook).get()
        again = implicit_gemm.weight_gradient(x, g, w, rulebook).get()
    finally:
        implicit_gemm.WGRAD_SLICE_ROWS = previous
    np.testing.assert_array_equal(many.view(np.uint16), again.view(np.uint16))
    np.testing.assert_allclose(many.astype(np.float32), one.astype(np.float32), rtol=2e-3,
                               atol=2e-3)


def test_activation_epilogue_and_empty_inputs(cp):
    from sparsegrid.cuda import implicit_gemm
    rng = np.random.default_rng(4)
    rulebook = _rulebook("submanifold", rng, (6, 6), 3)
    x = _values(rng, (rulebook.n_in, 8), np.float16)
    w = _values(rng, (9, 8, 8), np.float16, 0.3)
    b = _values(rng, (8,), np.float16)
    device_rulebook = _to_device(rulebook)
    args = (cp.asarray(x), cp.asarray(w), device_rulebook, cp.asarray(b))
    plain = implicit_gemm.forward(*args).get().astype(np.float32)
    relu = implicit_gemm.forward(*args, activation="relu").get().astype(np.float32)
    leaky = implicit_gemm.forward(*args, activation="leaky_relu", slope=0.125).get()
    np.testing.assert_array_equal(relu, np.maximum(plain, 0))
    np.testing.assert_allclose(leaky.astype(np.float32),
                               np.where(plain < 0, plain * 0.125, plain), rtol=1e-3)
    with pytest.raises(ValueError, match="activation"):
        implicit_gemm.forward(*args, activation="gelu")
    # a single site, no pairs but the centre; and no sites at all
    one = sg.SparseTensor(np.zeros((1, 1)), np.array([[0, 2, 2]]), (5, 5))
    single = _to_device(one.grid.submanifold(one.sites, (3, 3)))
    got = implicit_gemm.forward(cp.asarray(x[:1]), cp.asarray(w), single).get()
    np.testing.assert_allclose(got.astype(np.float64), x[:1].astype(np.float64)
                               @ w[4].astype(np.float64), rtol=2e-3, atol=1e-3)
    empty = sg.SparseTensor(np.zeros((0, 1)), np.zeros((0, 3), np.int64), (5, 5))
    none = _to_device(empty.grid.submanifold(empty.sites, (3, 3)))
    out = implicit_gemm.forward(cp.asarray(x[:0]), cp.asarray(w), none)
    assert out.shape == (0, 8)
    grad_w = implicit_gemm.weight_gradient(cp.asarray(x[:0]), out, cp.asarray(w), none)
    assert grad_w.shape == (9, 8, 8) and not grad_w.get().any()


def test_bad_arguments_raise_before_any_launch(cp):
    from sparsegrid.cuda import implicit_gemm
    rng = np.random.default_rng(13)
    rulebook = _to_device(_rulebook("submanifold", rng, (6, 6), 3))
    x = cp.asarray(_values(rng, (rulebook.n_in, 8), np.float16))
    w = cp.asarray(_values(rng, (9, 8, 4), np.float16))
    with pytest.raises(TypeError, match="bias must have the features' dtype"):
        implicit_gemm.forward(x, w, rulebook, cp.zeros(4, np.float32))
    with pytest.raises(ValueError, match="bias must have shape"):
        implicit_gemm.forward(x, w, rulebook, cp.zeros(5, np.float16))
    with pytest.raises(ValueError, match="weight must have shape"):
        implicit_gemm.forward(x, w[:8], rulebook)
    with pytest.raises(ValueError, match="weight must have shape"):
        implicit_gemm.forward(x[:, :4], w, rulebook)
    with pytest.raises(ValueError, match="features must have shape"):
        implicit_gemm.forward(x[:-1], w, rulebook)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        implicit_gemm.weight_gradient(x, x, w, rulebook)
    with pytest.raises(ValueError, match="tile must be one of"):
        implicit_gemm.forward(x, w, rulebook, tile=(32, 32, 32))


def test_non_finite_weights_reach_rows_of_the_same_tile(cp):
    """Documented behaviour: a row without offset k still multiplies a zero row by W[k],
    so an Inf in W[k] makes every row of a tile that uses offset k non-finite (gather-GEMM
    leaves the rows without offset k finite); rows of other tiles are untouched."""
    from sparsegrid.cuda import implicit_gemm
    rng = np.random.default_rng(14)
    rulebook = _rulebook("submanifold", rng, (24, 24), 3, density=0.25)
    k = 8                      # the most significant bit of the sorted masks
    x = _values(rng, (rulebook.n_in, 8), np.float16)
    w = _values(rng, (9, 8, 8), np.float16, 0.3)
    w[k, :, 0] = np.inf
    got = implicit_gemm.forward(cp.asarray(x), cp.asarray(w), _to_device(rulebook),
                                tile=(64, 64, 32)).get()
    order = neighbours.mask_order(rulebook)
    has_k = (rulebook.neighbor_map()[:, k] >= 0)[order.order]      # sorted rows
    tile_uses_k = np.zeros(order.n_pad // 64, bool)
    tile_uses_k[np.flatnonzero(has_k) // 64] = True
    in_such_tile = np.zeros(rulebook.n_out, bool)
    in_such_tile[order.order] = tile_uses_k[np.arange(rulebook.n_out) // 64]
    assert in_such_tile.any() and not in_such_tile.all()
    assert np.isfinite(got[~in_such_tile]).all()
    assert not np.isfinite(got[in_such_tile, 0]).any()


def test_misaligned_arrays_take_the_generic_kernel(cp):
    """A view that starts 2 bytes into an allocation cannot be copied 16 bytes at a time:
    the generic variant runs and the result is the same."""
    from sparsegrid.cuda import implicit_gemm
    rng = np.random.default_rng(6)
    rulebook = _to_device(_rulebook("submanifold", rng, (6, 6), 3))
    base = cp.asarray(_values(rng, (rulebook.n_in * 16 + 1,), np.float16))
    aligned = cp.ascontiguousarray(base[:-1]).reshape(rulebook.n_in, 16)
    shifted = base[1:].reshape(rulebook.n_in, 16)
    w = cp.asarray(_values(rng, (9, 16, 8), np.float16, 0.3))
    a = implicit_gemm.forward(cp.ascontiguousarray(base[1:]).reshape(rulebook.n_in, 16),
                              w, rulebook).get()
    assert implicit_gemm._aligned(aligned)
    assert not implicit_gemm._aligned(shifted)
    with _Launches(cp) as launched:
        b = implicit_gemm.forward(shifted, w, rulebook).get()
    assert launched.any(", false>")
    np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))


def test_bfloat16_kernel(cp):
    """The bfloat16 instantiation (bit patterns in uint16 arrays: CuPy has no bfloat16
    dtype, cupy#7527) against float64 on the bfloat16-rounded inputs."""
    from sparsegrid.cuda import implicit_gemm
    rng = np.random.default_rng(8)
    rulebook = _rulebook("submanifold", rng, (6, 6, 5), 3)
    device_rulebook = _to_device(rulebook)

    def bf16(a):       # round to nearest even, as bits
        u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)

    def value(bits):
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)

    x, w = bf16(rng.standard_normal((rulebook.n_in, 16))), bf16(
        rng.standard_normal((27, 16, 16)) * 0.3)
    want, scale = _reference(value(x), value(w), rulebook)
    order = neighbours.mask_order(device_rulebook)
    tile = (64, 64, 32)
    masks = order.tile_masks(64)
    out = cp.empty((rulebook.n_out, 16), dtype=np.uint16)
    kernel = _compile.function("implicit_gemm.cu:sg_bf16",
                               _compile.ig_conv_name("sg_bf16", tile, True))
    kernel((order.n_pad // 64, 1), (implicit_gemm.THREADS,), (
        cp.asarray(x), cp.asarray(w), cp.asarray(x), order.kmap, order.order, masks, out,
        np.int32(order.n_out), np.int32(order.n_pad), np.int32(27), np.int32(1),
        np.int32(16), np.int32(16), np.int32(0), np.int32(0), np.float32(0)))
    got = value(out.get())
    assert np.all(np.abs(got - want) <= 2.0 ** -8 * np.abs(want) + 2.0 ** -18 * scale)


def test_dispatch_falls_back_where_the_kernel_does_not_apply(cp):
    from sparsegrid import cuda
    from sparsegrid.cuda import implicit_gemm
    rng = np.random.default_rng(9)
    rulebook = _rulebook("submanifold", rng, (6, 6), 3)
    device_rulebook = _to_device(rulebook)
    x = cp.asarray(_values(rng, (rulebook.n_in, 8), np.float16))
    grouped = cp.asarray(_values(rng, (9, 2, 4, 4), np.float16))
    float64 = cp.asarray(_values(rng, (rulebook.n_in, 8), np.float64))
    autotune.set_conv_algorithm("implicit_gemm")
    assert "grouped" in implicit_gemm.ineligible(x, grouped, device_rulebook)
    assert "float64" in implicit_gemm.ineligible(float64, grouped[:, 0], device_rulebook)
    with _Launches(cp) as launched:
        cuda.conv_forward(x, grouped, device_rulebook)
        cuda.conv_forward(float64, cp.asarray(_values(rng, (9, 8, 8), np.float64)),
                          device_rulebook)
    assert launched.none("implicit_gemm")
    with pytest.raises(TypeError, match="does not apply"):
        implicit_gemm.forward(x, grouped, device_rulebook)
    big = sg.SparseTensor(np.zeros((3, 1)), np.array([[0, 1, 1, 1, 1], [0, 2, 2, 2, 2],
                                                      [0, 0, 3, 1, 2]]), (5, 5, 5, 5))
    wide = _to_device(big.grid.submanifold(big.sites, (5, 5, 5, 5)))     # 625 offsets
    assert "offsets" in implicit_gemm.ineligible(
        x[:3], cp.asarray(_values(rng, (625, 8, 8), np.float16)), wide)
    with pytest.raises(ValueError, match="algorithm"):
        autotune.set_conv_algorithm("fastest")
    with pytest.raises(TypeError, match="enabled"):
        autotune.set_tf32(1)


def test_gather_gemm_and_fused_agree_in_the_backend(cp):
    from sparsegrid import cuda
    rng = np.random.default_rng(10)
    rulebook = _rulebook("submanifold", rng, (6, 6, 5), 3)
    device_rulebook = _to_device(rulebook)
    x = _values(rng, (rulebook.n_in, 16), np.float16)
    w = _values(rng, (27, 16, 16), np.float16, 0.3)
    want, scale = _reference(x, w, rulebook)
    results = {}
    for algorithm in ("gather_gemm", "implicit_gemm"):
        with autotune.conv_algorithm(algorithm):
            results[algorithm] = cuda.conv_forward(cp.asarray(x), cp.asarray(w),
                                                   device_rulebook).get()
    _check(results["implicit_gemm"], want, scale, np.float16)
    # gather-GEMM rounds each offset's product to float16: a looser bound
    assert np.all(np.abs(results["gather_gemm"].astype(np.float64) - want)
                  <= 2.0 ** -10 * scale + 2.0 ** -11 * np.abs(want))


def test_autotuner_measures_once_and_remembers_on_disk(cp, tmp_path, monkeypatch):
    calls = []

    def measure(candidate):
        calls.append(candidate)
        return {"gather_gemm": 2.0, "implicit_gemm:64x64x32": 1.0}.get(candidate, 3.0)

    key = autotune.layer_key("forward", 1000, 9000, 16, 16, "float16", "test-gpu")
    candidates = ["gather_gemm", "implicit_gemm:64x32x32", "implicit_gemm:64x64x32"]
    assert autotune.choose(key, candidates, measure) == "implicit_gemm:64x64x32"
    assert len(calls) == 3
    assert autotune.choose(key, candidates, measure) == "implicit_gemm:64x64x32"
    assert len(calls) == 3                               # remembered
    autotune.clear()                                     # a new process: from the file
    assert autotune.choose(key, candidates, measure) == "implicit_gemm:64x64x32"
    assert len(calls) == 3
    assert (tmp_path / "autotune-v1.json").exists()
    assert autotune.choose(key, ["gather_gemm"], measure) == "gather_gemm"   # one choice
    assert key.startswith("forward|1024|9|16|16|float16|")
    autotune.clear(disk=True)
    assert not (tmp_path / "autotune-v1.json").exists()


def test_auto_mode_times_the_candidates_with_events(cp, monkeypatch):
    """The whole 'auto' path on the emulator, with CUDA events stood in by a host clock:
    each candidate runs, the choice is stored, and the layer's result is the chosen one's."""
    import time
    from sparsegrid import cuda

    class Event:
        def record(self):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

    if getattr(cp, "emulated", False):          # a real GPU has its own events
        monkeypatch.setattr(cp.cuda, "Event", Event, raising=False)
        monkeypatch.setattr(cp.cuda, "get_elapsed_time",
                            lambda a, b: (b.t - a.t) * 1e3, raising=False)
    rng = np.random.default_rng(12)
    rulebook = _rulebook("submanifold", rng, (5, 5, 4), 3)
    x_host = _values(rng, (rulebook.n_in, 8), np.float16)
    w_host = _values(rng, (27, 8, 8), np.float16, 0.3)
    autotune.set_conv_algorithm("auto")
    out = cuda.conv_forward(cp.asarray(x_host), cp.asarray(w_host), _to_device(rulebook))
    chosen = autotune.choices()
    assert len(chosen) == 1 and next(iter(chosen)).startswith("forward|")
    want, scale = _reference(x_host, w_host, rulebook)
    if next(iter(chosen.values())) == "gather_gemm":   # rounds each offset's product
        assert np.all(np.abs(out.get().astype(np.float64) - want)
                      <= 2.0 ** -10 * scale + 2.0 ** -11 * np.abs(want))
    else:
        _check(out.get(), want, scale, np.float16)


def _gray_rank(bits):
    """The rank of a Gray code given as bools, lowest bit first (Python integers)."""
    code = sum(1 << i for i, b in enumerate(bits) if b)
    rank = 0
    while code:
        rank ^= code
        code >>= 1
    return rank


@pytest.mark.parametrize("shape,filter_size", [((12, 12, 10), 3), ((5, 4, 5, 4), 3)])
def test_mask_order_and_pair_statistics(shape, filter_size):
    rng = np.random.default_rng(1)
    rulebook = _rulebook("submanifold", rng, shape, filter_size, density=0.15)
    k = rulebook.n_offsets
    order = neighbours.mask_order(rulebook)
    table = rulebook.neighbor_map()
    # the sorted map holds the same pairs, rows permuted
    np.testing.assert_array_equal(order.kmap[:, :rulebook.n_out].T, table[order.order])
    assert (order.kmap[:, rulebook.n_out:] == -1).all()
    assert sorted(order.order.tolist()) == list(range(rulebook.n_out))
    masks = (table >= 0)[order.order]
    ranks = [_gray_rank(row) for row in masks]       # 27 or 81 offsets: one or three words
    assert ranks == sorted(ranks)
    stats = neighbours.pair_statistics(rulebook, 32)
    assert stats["valid_pairs"] == rulebook.n_pairs
    assert stats["valid_pairs"] <= stats["computed_sorted"] <= stats["computed_unsorted"]
    assert stats["computed_unsorted"] <= -(-rulebook.n_out // 32) * 32 * k
    # a brute-force count of the sorted tiles
    padded = np.zeros((order.n_pad, k), bool)
    padded[:rulebook.n_out] = masks
    brute = sum(32 * int(padded[t:t + 32].any(axis=0).sum()) for t in range(0, order.n_pad, 32))
    assert stats["computed_sorted"] == brute
    words = order.tile_masks(64)
    bits = np.array([[(int(words[t, j // 32]) >> (j % 32)) & 1 for j in range(k)]
                     for t in range(order.n_pad // 64)], bool)
    np.testing.assert_array_equal(bits, padded.reshape(-1, 64, k).any(axis=1))
    with pytest.raises(ValueError, match="tile_rows"):
        neighbours.pair_statistics(rulebook, 48)


def test_tf32_setting_reaches_the_cublas_gemms_of_gather_gemm(cp, monkeypatch):
    """With TF32 on, gather-GEMM's float32 GEMMs switch cuBLAS to TF32 and back (a stand-in
    for CuPy's compute-type switch on the emulator, which has none)."""
    import types
    from sparsegrid import cuda
    if getattr(cp, "emulated", False):
        calls = []
        state = {"float32": 1}
        linalg = types.SimpleNamespace(
            COMPUTE_TYPE_TF32=7,
            get_compute_type=lambda dtype: state["float32"],
            set_compute_type=lambda dtype, value: (calls.append(value),
                                                   state.__setitem__("float32", value)))
        monkeypatch.setattr(cp, "_core", types.SimpleNamespace(_routines_linalg=linalg),
                            raising=False)
    rng = np.random.default_rng(15)
    rulebook = _to_device(_rulebook("submanifold", rng, (6, 6), 3))
    x = cp.asarray(_values(rng, (rulebook.n_in, 8), np.float32))
    w = cp.asarray(_values(rng, (9, 8, 8), np.float32))
    g = cp.asarray(_values(rng, (rulebook.n_out, 8), np.float32))
    with autotune.conv_algorithm("gather_gemm"):
        cuda.conv_forward(x, w, rulebook)
        if getattr(cp, "emulated", False):
            assert calls == []                             # TF32 off: untouched
        with autotune.tf32():
            cuda.conv_forward(x, w, rulebook)
            cuda.conv_backward(g, x, w, rulebook)
    if getattr(cp, "emulated", False):
        assert calls and calls[0::2] == [7] * (len(calls) // 2) and calls[1::2] == [1] * (
            len(calls) // 2) and state["float32"] == 1
