"""The CUDA kernels against the NumPy kernels, contract function by contract function.

Runs on every non-CPU kernel set: ``emulated`` (the CUDA sources compiled for the host,
over NumPy: everywhere, CI included) and ``cuda`` (a real GPU, through a proxy that moves
NumPy inputs to the device and results back). Random inputs in 1-D to 4-D, odd and even
filters, dilations, empty inputs and single sites. Integer results (index queries,
rulebooks, new site sets, arg-max rows) must be identical; float results agree to 1e-5
relative in float32 (the GPU flushes denormals and fuses multiply-adds) and 1e-12 in
float64; running a kernel twice gives the same bits.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import reference as ref
from conftest import KernelSet, _backend_names
import sparsegrid as sg
from sparsegrid import cpu
from sparsegrid.coords import pack_keys
from sparsegrid.cuda import _compile


_GPU_SETS = [name for name in _backend_names() if name != "cpu"]


@pytest.fixture(params=_GPU_SETS)
def gpu(request):
    """sparsegrid.cuda: emulated on the host, and on a real GPU where one is visible."""
    kernel_set = KernelSet(request.param)
    previous = kernel_set.bind()
    yield kernel_set.module
    kernel_set.unbind(previous)


GEOMETRIES = [((17,), (3,), (1,)), ((9, 8), (3, 3), (1, 1)), ((9, 8), (2, 2), (1, 1)),
              ((9, 8), (3, 3), (2, 1)), ((6, 5, 7), (3, 3, 3), (1, 1, 1)),
              ((6, 5, 7), (2, 3, 2), (1, 1, 1)), ((4, 5, 3, 4), (3, 3, 3, 3), (1, 1, 1, 1)),
              ((5, 4, 4, 3), (3, 2, 1, 3), (1, 2, 1, 1))]
GEOMETRY_IDS = [f"{len(s)}d-f{''.join(map(str, f))}-d{''.join(map(str, d))}"
                for s, f, d in GEOMETRIES]

TOLERANCE = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-12)}


def _sites(rng, shape, batch_size=2, density=0.3, shuffled=True):
    idx = ref.random_sites(rng, shape, batch_size, density)
    if not shuffled:
        idx = idx[np.lexsort(idx.T[::-1])]
    return idx


def _order(indices, shape, batch_size):
    keys, _ = pack_keys(indices, shape, batch_size)
    order = cpu.build_index(keys)
    return keys, order


def _same(expected, got, what=""):
    if isinstance(expected, tuple):
        assert isinstance(got, tuple) and len(got) == len(expected), what
        for i, (e, g) in enumerate(zip(expected, got)):
            _same(e, g, f"{what}[{i}]")
        return
    if expected is None or isinstance(expected, (int, np.integer)):
        assert got == expected, (what, expected, got)
        return
    expected, got = np.asarray(expected), np.asarray(got)
    assert expected.dtype == got.dtype and expected.shape == got.shape, (
        what, expected.dtype, got.dtype, expected.shape, got.shape)
    if expected.dtype.kind == "f":
        np.testing.assert_allclose(got, expected, err_msg=what,
                                   **TOLERANCE[expected.dtype.type])
    else:
        np.testing.assert_array_equal(got, expected, err_msg=what)


def _identical(first, second):
    if isinstance(first, tuple):
        for a, b in zip(first, second):
            _identical(a, b)
    elif first is not None and not isinstance(first, (int, np.integer)):
        assert np.asarray(first).tobytes() == np.asarray(second).tobytes()


# -- coordinate index --------------------------------------------------------------------

def test_index_build_query_unique(gpu, rng):
    for n in (0, 1, 2, 50, 3000):
        keys = rng.integers(-50, 4 * n + 50, n).astype(np.int64)
        _same(cpu.build_index(keys), gpu.build_index(keys), f"build_index {n}")
        _same(cpu.unique_inverse(keys), gpu.unique_inverse(keys), f"unique_inverse {n}")
        order = cpu.build_index(keys)
        sorted_keys = keys if order is None else keys[order]
        _same(cpu.first_duplicate(sorted_keys, order), gpu.first_duplicate(sorted_keys, order))
        queries = rng.integers(-60, 4 * n + 60, (7, 5)).astype(np.int64)
        _same(cpu.query_index(sorted_keys, order, queries),
              gpu.query_index(sorted_keys, order, queries))
    distinct = np.unique(rng.integers(0, 10**12, 500)).astype(np.int64)
    assert gpu.build_index(distinct) is None
    assert gpu.first_duplicate(distinct, None) is None
    shuffled = rng.permutation(distinct)
    _same(cpu.unique_inverse(shuffled), gpu.unique_inverse(shuffled))


# -- rulebooks ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape,filter_size,dilation", GEOMETRIES, ids=GEOMETRY_IDS)
@pytest.mark.parametrize("shuffled", [True, False], ids=["shuffled", "key-order"])
def test_submanifold_rules_are_the_cpus(gpu, rng, shape, filter_size, dilation, shuffled):
    for density in (0.05, 0.4, 1.0):
        idx = _sites(rng, shape, 3, density, shuffled)
        _, order = _order(idx, shape, 3)
        args = (idx, order, shape, 3, filter_size, dilation)
        expected = cpu.submanifold_rules(*args)
        got = gpu.submanifold_rules(*args)
        _same(expected, got, f"density {density}")
        _identical(got, gpu.submanifold_rules(*args))


def test_rules_of_no_sites_and_one_site(gpu):
    for shape in [(5,), (4, 6), (3, 4, 5), (3, 3, 3, 3)]:
        d = len(shape)
        for idx in (np.zeros((0, d + 1), np.int32), np.array([[1] + [2] * d], np.int32)):
            _, order = _order(idx, shape, 2)
            for f in (3, 2):
                args = (idx, order, shape, 2, (f,) * d, (1,) * d)
                _same(cpu.submanifold_rules(*args), gpu.submanifold_rules(*args))
            strided = (idx, shape, 2, (2,) * d, (1,) * d, tuple(s - 1 for s in shape))
            _same(cpu.strided_rules(*strided), gpu.strided_rules(*strided))
            full = (idx, shape, 2, (2,) * d, (2,) * d, tuple(2 * s for s in shape))
            _same(cpu.full_rules(*full), gpu.full_rules(*full))


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_offset_rules_are_the_cpus(gpu, rng, d):
    shape = (6,) * d
    idx = _sites(rng, shape, 2, 0.3)
    _, order = _order(idx, shape, 2)
    for offsets in (sg.coords.permutohedral_offsets(d),
                    rng.integers(-2, 3, (9, d)),
                    np.zeros((0, d), np.int64)):
        args = (idx, order, shape, 2, offsets)
        _same(cpu.offset_rules(*args), gpu.offset_rules(*args))


def _strided_cases():
    rng = np.random.default_rng(3)
    for case in range(40):
        d = int(rng.integers(1, 5))
        f = tuple(int(v) for v in rng.integers(1, 5, d))
        s = tuple(int(v) for v in rng.integers(1, 4, d))
        shape = tuple(fi + si * int(rng.integers(0, 4)) for fi, si in zip(f, s))
        yield shape, f, s


@pytest.mark.parametrize("shape,f,s", list(_strided_cases()))
def test_strided_window_and_full_rules_are_the_cpus(gpu, rng, shape, f, s):
    out_shape = tuple((n - fi) // si + 1 for n, fi, si in zip(shape, f, s))
    idx = _sites(rng, shape, 2, float(rng.choice([0.05, 0.3, 1.0])))
    args = (idx, shape, 2, f, s, out_shape)
    _same(cpu.strided_rules(*args), gpu.strided_rules(*args), "strided")
    starts = [np.sort(rng.choice(n - fi + 1, size=int(rng.integers(1, n - fi + 2)),
                                 replace=False)).astype(np.int64) for n, fi in zip(shape, f)]
    window = (idx, shape, 2, f, starts, tuple(len(st) for st in starts))
    _same(cpu.window_rules(*window), gpu.window_rules(*window), "window")
    full_shape = tuple((n - 1) * si + fi for n, fi, si in zip(shape, f, s))
    full = (idx, shape, 2, f, s, full_shape)
    _same(cpu.full_rules(*full), gpu.full_rules(*full), "full")


# -- convolution, pooling ------------------------------------------------------------------

def _rulebooks(rng, d=3, batch_size=2):
    """A tensor and rulebooks of every kind on it: submanifold (odd, even), transposed,
    strided and its transpose (deconvolution), full."""
    shape = (7, 6, 5, 4)[:d]
    idx = _sites(rng, shape, batch_size, 0.35)
    x = sg.SparseTensor(np.zeros((len(idx), 1)), idx, shape, batch_size=batch_size)
    sub = x.grid.submanifold(x.sites, 3)
    books = {"submanifold": sub, "even": x.grid.submanifold(x.sites, 2),
             "transposed": sub.transpose()}
    filter_size = tuple(3 if n % 2 else 2 for n in shape)     # (n - f) / 2 + 1 exact
    strided, _ = x.grid.strided(x.sites, filter_size, 2)
    books["strided"] = strided
    books["deconvolution"] = strided.transpose()
    full_shape = tuple((n - 1) * 2 + 2 for n in shape)
    in_idx, out_idx, ptr, _ = cpu.full_rules(idx, shape, batch_size, (2,) * d, (2,) * d,
                                             full_shape)
    books["full"] = sg.Rulebook(in_idx, out_idx, ptr, len(idx), int(out_idx.max(initial=-1)) + 1,
                                (2,) * d, stride=(2,) * d, kind="full")
    return x, books


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("d", [1, 2, 3, 4])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv_forward_backward_are_the_cpus(gpu, rng, dtype, d, groups):
    x, books = _rulebooks(rng, d)
    for name, rb in books.items():
        cin, cout = 4, 6
        features = rng.standard_normal((rb.n_in, cin)).astype(dtype)
        if groups == 1:
            weight = rng.standard_normal((rb.n_offsets, cin, cout)).astype(dtype)
        else:
            weight = rng.standard_normal((rb.n_offsets, groups, cin // groups,
                                          cout // groups)).astype(dtype)
        bias = rng.standard_normal(cout).astype(dtype)
        grad_out = rng.standard_normal((rb.n_out, cout)).astype(dtype)
        for b in (bias, None):
            got = gpu.conv_forward(features, weight, rb, b)
            _same(cpu.conv_forward(features, weight, rb, b), got, name)
            _identical(got, gpu.conv_forward(features, weight, rb, b))
        _same(cpu.conv_backward(grad_out, features, weight, rb),
              gpu.conv_backward(grad_out, features, weight, rb), name)
        _same(cpu.rule_sum(features, rb), gpu.rule_sum(features, rb), name)
        _same(cpu.max_pool_forward(features, rb), gpu.max_pool_forward(features, rb), name)
        out, argmax = cpu.max_pool_forward(features, rb)
        _same(cpu.max_pool_backward(grad_out[:, :cin], argmax, rb.n_in),
              gpu.max_pool_backward(grad_out[:, :cin], argmax, rb.n_in), name)
    x64 = rng.standard_normal((37, 5)).astype(dtype)
    g64 = rng.standard_normal((37, 3)).astype(dtype)
    _same(cpu.rows_product(x64, g64), gpu.rows_product(x64, g64))


def test_max_pool_ties_infinities_and_nan(gpu):
    rb = sg.Rulebook(np.array([0, 1, 2, 3, 4], np.int32), np.array([0, 0, 1, 1, 2], np.int32),
                     np.array([0, 2, 5], np.int64), 5, 3, (2,), kind="strided")
    features = np.array([[1.0, -np.inf], [1.0, -np.inf], [np.nan, 2.0], [3.0, 2.0],
                         [-np.inf, np.nan]])
    # offset 0 holds pairs (0->0), (1->0); offset 1 holds (2->1), (3->1), (4->2)
    rb = sg.Rulebook(np.array([0, 2, 1, 3, 4], np.int32), np.array([0, 1, 0, 1, 2], np.int32),
                     np.array([0, 2, 5], np.int64), 5, 3, (2,), kind="strided")
    _same(cpu.max_pool_forward(features, rb), gpu.max_pool_forward(features, rb))


def test_conv_of_empty_rulebooks_and_rows_without_pairs(gpu, rng):
    weight = rng.standard_normal((2, 3, 4))
    empty = sg.Rulebook(np.zeros(0, np.int32), np.zeros(0, np.int32),
                        np.zeros(3, np.int64), 2, 5, (2,))
    features = rng.standard_normal((2, 3))
    bias = rng.standard_normal(4)
    _same(cpu.conv_forward(features, weight, empty, bias),
          gpu.conv_forward(features, weight, empty, bias))
    _same(cpu.conv_backward(np.ones((5, 4)), features, weight, empty),
          gpu.conv_backward(np.ones((5, 4)), features, weight, empty))
    _same(cpu.rule_sum(features, empty), gpu.rule_sum(features, empty))
    nothing = sg.Rulebook(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(3, np.int64),
                          0, 0, (2,))
    _same(cpu.conv_forward(np.zeros((0, 3)), weight, nothing),
          gpu.conv_forward(np.zeros((0, 3)), weight, nothing))


@pytest.mark.parametrize("message,rulebook", [
    ("offset_ptr", sg.Rulebook(np.array([0, 1], np.int32), np.array([0, 1], np.int32),
                               np.array([0, 1, 1], np.int64), 2, 2, (2,))),
    ("in_idx must hold rows", sg.Rulebook(np.array([0, 5], np.int32), np.array([0, 1], np.int32),
                                          np.array([0, 1, 2], np.int64), 2, 2, (2,))),
    ("identity_offset", sg.Rulebook(np.array([1, 0], np.int32), np.array([0, 1], np.int32),
                                    np.array([0, 2], np.int64), 2, 2, (1,),
                                    identity_offset=0)),
])
def test_conv_refuses_broken_rulebooks_as_the_cpu(gpu, message, rulebook):
    with pytest.raises(ValueError, match=message):
        gpu.conv_forward(np.ones((2, 1)), np.ones((rulebook.n_offsets, 1, 1)), rulebook)


# -- segment reductions, norms, dense ----------------------------------------------------

@pytest.mark.parametrize("mode", ["sum", "mean", "max", "first", "last"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_segment_reduce_is_the_cpus(gpu, rng, mode, dtype):
    # segments of one row, of a few, of exactly one 64-row chunk, and longer ones folded
    # from several chunks (global pooling)
    for n, n_segments, channels in [(0, 3, 2), (1, 1, 3), (40, 40, 2), (300, 17, 3),
                                    (200, 500, 1), (64, 1, 4), (65, 1, 2), (1000, 3, 2),
                                    (5000, 2, 3)]:
        ids = rng.integers(0, n_segments, n)
        if n == n_segments:
            ids = rng.permutation(n)
        values = rng.standard_normal((n, channels)).astype(dtype)
        if n > 5:
            values[rng.integers(0, n, 3), 0] = values[0, 0]        # ties
        expected = cpu.segment_reduce(values, ids, n_segments, mode)
        got = gpu.segment_reduce(values, ids, n_segments, mode)
        _same(expected, got, (mode, n))
        grad = rng.standard_normal((n_segments, channels)).astype(dtype)
        _same(cpu.segment_reduce_backward(grad, ids, n_segments, mode, expected[1], n),
              gpu.segment_reduce_backward(grad, ids, n_segments, mode, got[1], n), (mode, n))


def test_segment_max_with_nan_and_bad_ids(gpu):
    values = np.array([[1.0], [np.nan], [5.0], [np.nan], [2.0]])
    ids = np.array([0, 0, 0, 0, 1])
    _same(cpu.segment_reduce(values, ids, 2, "max"), gpu.segment_reduce(values, ids, 2, "max"))
    for bad, message in ((np.array([0, -1, 0, 0, 0]), ">= 0"), (np.array([0, 2, 0, 0, 0]),
                                                                 "below n_segments")):
        with pytest.raises(ValueError, match=message):
            gpu.segment_reduce(values, bad, 2, "sum")
    with pytest.raises(ValueError, match="mode must be one of"):
        gpu.segment_reduce(values, ids, 2, "median")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("leakiness", [1.0, 0.0, 0.333, -0.5])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_is_the_cpus(gpu, rng, dtype, leakiness, training):
    x = (rng.standard_normal((257, 5)) * 3 + 1).astype(dtype)
    weight = rng.standard_normal(5).astype(dtype)
    bias = rng.standard_normal(5).astype(dtype)
    mean, var = cpu.batch_norm_statistics(x)
    _same((mean, var), gpu.batch_norm_statistics(x))
    _same(cpu.batch_norm_statistics(x[:0]), gpu.batch_norm_statistics(x[:0]))
    for w, b in ((weight, bias), (None, None)):
        out = cpu.batch_norm_forward(x, mean, var, w, b, 1e-4, leakiness)
        _same(out, gpu.batch_norm_forward(x, mean, var, w, b, 1e-4, leakiness))
        grad = rng.standard_normal(x.shape).astype(dtype)
        for given in (None, out):
            _same(cpu.batch_norm_backward(grad, x, mean, var, w, b, 1e-4, leakiness, training,
                                          given),
                  gpu.batch_norm_backward(grad, x, mean, var, w, b, 1e-4, leakiness, training,
                                          given))


@pytest.mark.parametrize("d", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dense_conversions_are_the_cpus(gpu, rng, d, dtype):
    shape = (5, 4, 3, 4)[:d]
    idx = _sites(rng, shape, 3, 0.3)
    features = rng.standard_normal((len(idx), 3)).astype(dtype)
    dense = cpu.scatter_to_dense(features, idx, 3, shape)
    _same(dense, gpu.scatter_to_dense(features, idx, 3, shape))
    _same(cpu.gather_from_dense(dense, idx), gpu.gather_from_dense(dense, idx))
    _same(cpu.dense_active_sites(dense), gpu.dense_active_sites(dense))
    empty = np.zeros((0, d + 1), np.int32)
    _same(cpu.scatter_to_dense(features[:0], empty, 2, shape),
          gpu.scatter_to_dense(features[:0], empty, 2, shape))


# -- float16 -----------------------------------------------------------------------------

def test_float16_kernels_accumulate_in_float32(gpu, rng):
    """float16 data: convolution, sum/max pooling, segment reductions and dense conversion
    agree with the float32 computation on the same (float16-representable) values to
    float16 precision."""
    x, books = _rulebooks(rng, 3)
    rb = books["submanifold"]
    f16 = rng.standard_normal((rb.n_in, 8)).astype(np.float16)
    w16 = (rng.standard_normal((rb.n_offsets, 8, 8)) * 0.2).astype(np.float16)
    f32, w32 = f16.astype(np.float32), w16.astype(np.float32)
    out = gpu.conv_forward(f16, w16, rb)
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float32), cpu.conv_forward(f32, w32, rb),
                               rtol=2e-2, atol=2e-2)
    sums = gpu.rule_sum(f16, rb)
    np.testing.assert_allclose(sums.astype(np.float32), cpu.rule_sum(f32, rb), rtol=2e-3,
                               atol=2e-3)
    top, argmax = gpu.max_pool_forward(f16, rb)
    expected_top, expected_argmax = cpu.max_pool_forward(f32, rb)
    np.testing.assert_array_equal(top.astype(np.float32), expected_top)
    np.testing.assert_array_equal(argmax, expected_argmax)
    ids = rng.integers(0, 50, rb.n_in)
    for mode in ("sum", "mean", "max", "first", "last"):
        got, _ = gpu.segment_reduce(f16, ids, 50, mode)
        want, _ = cpu.segment_reduce(f32, ids, 50, mode)
        assert got.dtype == np.float16
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)
    dense = gpu.scatter_to_dense(f16, x.indices, 2, x.spatial_shape)
    np.testing.assert_array_equal(gpu.gather_from_dense(dense, x.indices), f16)


# -- the sources themselves --------------------------------------------------------------

def test_every_listed_kernel_is_called_and_every_call_is_listed():
    """Each name in SOURCES is launched somewhere in sparsegrid/cuda, and every kernel the
    Python code names is in SOURCES."""
    import pathlib
    folder = pathlib.Path(_compile.__file__).parent
    code = "\n".join(p.read_text() for p in folder.glob("*.py") if p.name != "_compile.py")
    # the fused kernel's names are spelled by _compile's ig_* helpers, called from there
    code += "".join(f'\n"{name}"' for name in
                    re.findall(r'return f"(\w+)<', (folder / "_compile.py").read_text()))
    listed = {re.sub(r"<.*", "", name) for names in _compile.SOURCES.values()
              for name in names}
    called = set(re.findall(r'"(\w+)[<"]', code)) & listed
    assert called == listed, listed - called
    for key, names in _compile.SOURCES.items():
        text = (_compile.KERNEL_DIR / _compile.source_file(key)).read_text()
        for base in {re.sub(r"<.*", "", n) for n in names}:
            assert re.search(rf"__global__ void (__launch_bounds__\(\w+\) )?{base}\(", text), (
                key, base)


def test_kernel_sources_keep_the_house_rules():
    """No atomics anywhere; no shared memory or block synchronisation outside the fused
    implicit-GEMM kernels (whose launch shape is fixed and whose sums still run in a fixed
    order): what makes the results independent of the launch."""
    for path in _compile.KERNEL_DIR.glob("*.cu*"):
        text = path.read_text()
        code = re.sub(r"//.*", "", text)
        words = ("atomic",) if path.name == "implicit_gemm.cu" else (
            "atomic", "__shared__", "__syncthreads", "__syncwarp", "_sync(")
        for word in words:
            assert word not in code, (path.name, word)


def test_cupy_names_used_exist_in_cupy():
    """Every ``cp.<name>`` the backend uses exists in the installed CuPy (CuPy imports
    without a GPU; CI installs it)."""
    import os
    import pathlib
    try:
        import cupy
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("CuPy is not installed")
    code = "\n".join(p.read_text() for p in pathlib.Path(_compile.__file__).parent.glob("*.py")
                     if p.name != "_runtime.py")       # the namespace itself
    names = set(re.findall(r"\bcp\.([A-Za-z_][\w.]*)", code))
    assert names
    for name in sorted(names):
        target = cupy
        for part in name.split("."):
            assert hasattr(target, part), f"cupy.{name} does not exist"
            target = getattr(target, part)


# -- host synchronisations -------------------------------------------------------------

def test_host_synchronisations_per_kernel(rng):
    """How often each kernel waits for the device (emulated: every read of device values,
    conversion to a Python scalar, boolean-mask index and call whose output size depends
    on the data is counted). A layer's kernels on a prepared rulebook read nothing back;
    builders read the sizes they must learn."""
    import cupy_emulator
    if not cupy_emulator.available():
        pytest.skip("no host C++ compiler")
    from sparsegrid import cuda
    from conftest import _rulebook_to_device
    x, books = _rulebooks(rng, 3)
    with cupy_emulator.installed() as cupy:
        dev = cupy.asarray
        rb = _rulebook_to_device(books["submanifold"])
        strided = _rulebook_to_device(books["strided"])
        for book in (rb, strided):        # plans built (a few reads each), then cached
            cuda.prepare_conv(book)
            cuda.prepare_conv(book.transpose())
        features = dev(rng.standard_normal((rb.n_in, 4)).astype(np.float32))
        weight = dev(rng.standard_normal((rb.n_offsets, 4, 4)).astype(np.float32))
        grad = dev(rng.standard_normal((rb.n_out, 4)).astype(np.float32))
        _, argmax = cuda.max_pool_forward(features, rb)
        mean, var = cuda.batch_norm_statistics(features)
        idx = dev(x.indices)
        _, order = _order(x.indices, x.spatial_shape, 2)
        keys = dev(pack_keys(x.indices, x.spatial_shape, 2)[0])
        rows = dev(np.arange(rb.n_in))
        image = dev(rng.standard_normal((2, 9, 8, 3)))
        blocks = dev(np.array([[0, 0, 0], [0, 1, 2], [1, 2, 1]], np.int32))
        stack = dev(rng.standard_normal((3, 4, 4, 3)))

        def count(call):
            cupy_emulator.syncs.clear()
            call()
            return list(cupy_emulator.syncs)

        layer_kernels = {
            "conv_forward": lambda: cuda.conv_forward(features, weight, rb),
            "conv_backward": lambda: cuda.conv_backward(grad, features, weight, rb),
            "rule_sum": lambda: cuda.rule_sum(features, strided),
            "max_pool_forward": lambda: cuda.max_pool_forward(features, strided),
            "max_pool_backward": lambda: cuda.max_pool_backward(grad, argmax, rb.n_in),
            "batch_norm": lambda: cuda.batch_norm_backward(
                grad, features, mean, var, None, None, 1e-4, 0.0, True,
                cuda.batch_norm_forward(features, mean, var, None, None, 1e-4, 0.0)),
            "dense": lambda: cuda.gather_from_dense(
                cuda.scatter_to_dense(features, idx, 2, x.spatial_shape), idx),
            "query_index": lambda: cuda.query_index(keys, None, keys),
            "segment_reduce_backward": lambda: cuda.segment_reduce_backward(
                grad, rows, rb.n_in, "mean", None, rb.n_in),
            "rows_product": lambda: cuda.rows_product(features, grad),
            "block_gather": lambda: cuda.block_gather(image, blocks, (4, 4), (-1, -1), (3, 3)),
            "block_scatter": lambda: cuda.block_scatter(
                stack, blocks, image, (4, 4), (-1, -1), (3, 3), True),
        }
        for name, call in layer_kernels.items():
            assert count(call) == [], name
        assert count(lambda: cuda.segment_reduce(features, rows % 7, 7, "max")) == [
            "asnumpy"]                                               # the ids' bounds
        dev_order = None if order is None else dev(order)
        assert count(lambda: cuda.submanifold_rules(idx, dev_order, x.spatial_shape, 2,
                                                    (3,) * 3, (1,) * 3)) == [
            "asnumpy", "flatnonzero"]
        assert count(lambda: cuda.strided_rules(idx, x.spatial_shape, 2, (3, 2, 3),
                                                (2, 2, 2), (3, 3, 2))) == [
            "flatnonzero", "flatnonzero"]
        assert count(lambda: cuda.unique_inverse(keys)) == ["flatnonzero"]
        assert count(lambda: cuda.build_index(keys)) == ["asnumpy"]
        assert count(lambda: cuda.dense_active_sites(dev(np.ones((1, 2, 3))))) == [
            "argwhere"]
        fresh = _rulebook_to_device(books["even"])
        assert count(lambda: cuda.prepare_conv(fresh)) == ["ndarray.get", "ndarray.get"]


def test_the_backend_reads_device_values_only_through_read():
    """``.get()`` and ``.item()`` of device arrays would be hidden synchronisations: the CUDA package reads device values through ``_runtime.read``."""
    import pathlib
    for path in pathlib.Path(_compile.__file__).parent.glob("*.py"):
        code = path.read_text()
        for word in (".get()", ".item()", "asnumpy("):
            if path.name == "_runtime.py" and word == "asnumpy(":
                continue
            assert word not in code.replace("_modules.get(", ""), (path.name, word)


def test_block_kernels_float16_and_float32_are_the_cpus(gpu, rng):
    """SBNet block gather/scatter kernels: float32 / float64 exactly the CPU's, float16
    added in float32 (not as 16-bit integers), overlaps in the CPU's order."""
    indices = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 1], [1, 2, 0]], np.int32)
    geometry = ((4, 5), (-1, -2), (3, 2))
    for dtype in (np.float64, np.float32, np.float16):
        x = rng.standard_normal((2, 9, 8, 3)).astype(dtype)
        blocks = rng.standard_normal((4, 4, 5, 3)).astype(dtype)
        ref = x.astype(np.float32) if dtype == np.float16 else x
        ref_blocks = blocks.astype(np.float32) if dtype == np.float16 else blocks
        gathered = gpu.block_gather(x, indices, *geometry)
        np.testing.assert_array_equal(gathered, cpu.block_gather(x, indices, *geometry))
        for add in (False, True):
            got = gpu.block_scatter(blocks, indices, x, *geometry, add)
            want = cpu.block_scatter(ref_blocks, indices, ref, *geometry, add)
            assert got.dtype == dtype
            if dtype == np.float16:
                np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)
            else:
                np.testing.assert_array_equal(got, want)


def test_rulebooks_of_other_integer_arrays_are_converted_not_reinterpreted(gpu, rng):
    x, books = _rulebooks(rng, 2)
    rb = books["strided"]
    wide = sg.Rulebook(rb.in_idx.astype(np.int64), rb.out_idx.astype(np.int64),
                       rb.offset_ptr, rb.n_in, rb.n_out, rb.filter_size, stride=rb.stride,
                       kind=rb.kind)
    features = rng.standard_normal((rb.n_in, 3))
    weight = rng.standard_normal((rb.n_offsets, 3, 2))
    _same(cpu.conv_forward(features, weight, rb), gpu.conv_forward(features, weight, wide))
    with pytest.raises(TypeError, match="weight must have the features' dtype"):
        gpu.conv_forward(features, weight.astype(np.float32), rb)
