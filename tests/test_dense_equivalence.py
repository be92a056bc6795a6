"""Every sparse convolution / pooling equals the dense operation on the zero-filled grid.

Each op runs on random float64 and float32 sparse tensors in 1-D to 4-D and is compared
with the independent dense references of ``reference.py`` (always evaluated in float64, on
the same float32-representable inputs for float32 runs) restricted to the active output
sites: the output SITE SET is checked exactly (submanifold ops keep their input's rows; ops
that create sites return exactly the dense occupancy, rows sorted by (batch, x1, ..., xD)),
the output dtype is the input's, and the VALUES to ~1e-10 relative in float64, to the
float32 tolerance below in float32. Also sparse <-> dense round trips, global pooling, the
input layer (all modes, duplicate rows) and batch normalisation against direct formulas.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import reference as ref
import sparsegrid as sg

# float64: the sparse kernels and the dense reference add the same products in different
# orders; 1e-10 relative leaves ~5e5 ulps of room and still catches any wrong or missing term.
RTOL, ATOL = 1e-10, 1e-12
# float32: the op rounds in float32, the reference is float64 arithmetic on the very same
# (float32) inputs and weights, so the difference is the op's own rounding. Every value
# checked is a sum of n terms of size O(1) (standard-normal features times standard-normal
# weights): n = filter volume x input channels per group (+1 for the bias) for a
# convolution, the window volume for pooling, the rows of a sample / of the batch / of a
# site for global pooling / batch-norm statistics / input-layer merging. Rounding the
# partial sums costs ~sqrt(n) * eps * |terms| typically and n * eps * sum |terms| at worst;
# we allow F32_ATOL_PER_TERM * n absolute (4 eps per term, linear in n: well above the
# typical sqrt(n) growth -- the largest case, a 4-D 3^4 filter over 4 channels, n = 325,
# allows 1.5e-4 against an observed error of 2e-5 -- yet a wrong or missing term, of size
# O(1), is >1e3 times larger) plus F32_RTOL relative (8 eps: a few roundings of the result
# itself, for large values such as deconvolutions of convolutions). Measured over the whole
# file, the largest float32 error was 0.16 of this allowance.
F32_EPS = float(np.finfo(np.float32).eps)    # 1.19e-07
F32_RTOL = 8 * F32_EPS
F32_ATOL_PER_TERM = 4 * F32_EPS
DTYPES = {"float64": np.float64, "float32": np.float32}
DIMS = (1, 2, 3, 4)
CHANNELS = 4

# Submanifold ops keep the spatial size: small, non-cubic shapes per dimension.
SUBMANIFOLD_SHAPES = {1: (9,), 2: (7, 8), 3: (5, 6, 5), 4: (4, 5, 4, 5)}
# Strided ops: the OUTPUT shape per dimension; the input is (out - 1) * s + f, which divides.
STRIDED_OUT_SHAPES = {1: (5,), 2: (3, 4), 3: (3, 2, 3), 4: (2, 2, 2, 2)}


@pytest.fixture(params=list(DTYPES))
def dtype(request):
    """The features' dtype: every value test runs in float64 and in float32."""
    return DTYPES[request.param]


def tolerance(dtype, n_terms=1):
    """(rtol, atol) for values that are sums of ``n_terms`` O(1) terms (see F32_* above)."""
    if np.dtype(dtype) == np.float32:
        return F32_RTOL, F32_ATOL_PER_TERM * n_terms
    return RTOL, ATOL


def close(actual, expected, dtype=np.float64, n_terms=1):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == dtype, (actual.dtype, dtype)
    rtol, atol = tolerance(dtype, n_terms)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def per_axis(value, d):
    return tuple(value) if isinstance(value, tuple) else (value,) * d


def strided_input_shape(d, filter_size, stride):
    return tuple((o - 1) * s + f
                 for o, f, s in zip(STRIDED_OUT_SHAPES[d], filter_size, stride))


def make_tensor(rng, spatial_shape, case="batches", channels=CHANNELS, density=0.25,
                dtype=np.float64):
    """A SparseTensor (standard-normal features of ``dtype``) with shuffled rows.

    ``case``: 'batches' (6 samples, 0, 3 and 5 empty: leading, middle and trailing gaps and
    two adjacent populated samples), 'full' (every site of 2 samples active), 'single' (one
    site, in sample 1 of 3), 'empty' (0 sites, batch_size 2).
    """
    d = len(spatial_shape)
    if case == "batches":
        batch_size = 6
        indices = ref.random_sites(rng, spatial_shape, batch_size, density,
                                   empty_batches=(0, 3, 5))
    elif case == "full":
        batch_size = 2
        indices = ref.random_sites(rng, spatial_shape, batch_size, density=1.0)
    elif case == "single":
        batch_size = 3
        coords = [int(rng.integers(0, n)) for n in spatial_shape]
        indices = np.array([[1, *coords]], np.int32)
    elif case == "empty":
        batch_size = 2
        indices = np.zeros((0, 1 + d), np.int32)
    else:
        raise ValueError(case)
    features = rng.standard_normal((len(indices), channels)).astype(dtype)
    return sg.SparseTensor(features, indices, spatial_shape, batch_size)


def dense_of(x):
    """The zero-filled grid in float64 (the references compute in float64)."""
    return ref.to_dense(x.features.astype(np.float64), x.indices, x.batch_size,
                        x.spatial_shape)


def occupancy_of(x):
    return ref.occupancy(x.indices, x.batch_size, x.spatial_shape)


def random_weight(rng, n_offsets, cin, cout, groups=1, dtype=np.float64):
    if groups == 1:
        return rng.standard_normal((n_offsets, cin, cout)).astype(dtype)
    return rng.standard_normal((n_offsets, groups, cin // groups, cout // groups)).astype(dtype)


def random_bias(rng, cout, dtype):
    return rng.standard_normal(cout).astype(dtype)


def conv_terms(weight, bias):
    """Products summed per output value: filter volume x input channels per group (+ bias)."""
    return weight.shape[0] * weight.shape[-2] + (bias is not None)


def check_output(out, indices, features, spatial_shape, batch_size, new_sites, dtype=np.float64,
                 n_terms=1):
    """The exact site set (and row order), the spatial shape, the dtype and the values."""
    assert out.indices.dtype == np.int32
    assert out.indices.shape == indices.shape, (out.indices.shape, indices.shape)
    np.testing.assert_array_equal(out.indices, indices)
    if new_sites:
        assert ref.is_lexsorted(out.indices)
    assert out.spatial_shape == tuple(spatial_shape)
    assert out.batch_size == batch_size
    close(out.features, features, dtype, n_terms)


# --- submanifold convolution ------------------------------------------------------------

# (groups, bias, Cin, Cout)
SUBMANIFOLD_VARIANTS = {"plain": (1, False, 3, 5), "groups2+bias": (2, True, 4, 6),
                        "groups3": (3, False, 3, 6)}


def _submanifold_params():
    params = []
    for d in DIMS:
        # Per-axis sizes mixing odd and even (odd first and even first).
        per_axis_filters = [4, 5] if d == 1 else [(4, 1, 3, 2)[:d], (3, 2, 1, 3)[:d]]
        filters = [1, 2, 3] + per_axis_filters
        dilations = [1, 2] + ([(1, 2, 2, 1)[:d]] if d > 1 else [])
        for f in filters:
            for dil in dilations:
                params.append((d, f, dil))
    return params


def run_submanifold(rng, x, filter_size, dilation, groups=1, bias=False, cout=5):
    """(output, float64 expected values, terms per value)."""
    d, dtype = x.dimension, x.features.dtype
    f, dil = per_axis(filter_size, d), per_axis(dilation, d)
    weight = random_weight(rng, math.prod(f), x.n_channels, cout, groups, dtype)
    b = random_bias(rng, cout, dtype) if bias else None
    out = sg.submanifold_conv(x, weight, b, filter_size, dilation)
    expected = ref.at_sites(ref.submanifold_conv(dense_of(x), weight.astype(np.float64), f,
                                                 dil), x.indices)
    if b is not None:
        expected = expected + b.astype(np.float64)
    return out, expected, conv_terms(weight, b)


@pytest.mark.parametrize("variant", list(SUBMANIFOLD_VARIANTS))
@pytest.mark.parametrize("d,filter_size,dilation", _submanifold_params())
def test_submanifold_conv(rng, d, filter_size, dilation, variant, dtype):
    groups, bias, cin, cout = SUBMANIFOLD_VARIANTS[variant]
    x = make_tensor(rng, SUBMANIFOLD_SHAPES[d], channels=cin, dtype=dtype)
    out, expected, terms = run_submanifold(rng, x, filter_size, dilation, groups, bias, cout)
    check_output(out, x.indices, expected, x.spatial_shape, x.batch_size, new_sites=False,
                 dtype=dtype, n_terms=terms)


@pytest.mark.parametrize("case", ["full", "single", "empty"])
@pytest.mark.parametrize("filter_size", [2, 3])
@pytest.mark.parametrize("d", DIMS)
def test_submanifold_conv_site_cases(rng, d, filter_size, case, dtype):
    x = make_tensor(rng, SUBMANIFOLD_SHAPES[d], case, dtype=dtype)
    out, expected, terms = run_submanifold(rng, x, filter_size, 1, bias=True)
    check_output(out, x.indices, expected, x.spatial_shape, x.batch_size, new_sites=False,
                 dtype=dtype, n_terms=terms)


# --- strided, transposed and pooling ops ------------------------------------------------

def _strided_sites(x, f, s):
    return ref.active_sites(ref.strided_occupancy(occupancy_of(x), f, s))


def _strided_shape(x, f, s):
    return tuple((n - fi) // si + 1 for n, fi, si in zip(x.spatial_shape, f, s))


# The runners below return (output, expected sites, float64 expected values, spatial
# shape, whether the op creates sites, terms summed per value).
def _conv_weights(rng, x, k, cin, cout, groups, bias):
    dtype = x.features.dtype
    weight = random_weight(rng, k, cin, cout, groups, dtype)
    return weight, (random_bias(rng, cout, dtype) if bias else None)


def _plus_bias(expected, b):
    return expected if b is None else expected + b.astype(np.float64)


def run_conv(rng, x, f, s, groups=1, bias=True, drop=0):
    cout = 6
    weight, b = _conv_weights(rng, x, math.prod(f), x.n_channels, cout, groups, bias)
    out = sg.conv(x, weight, b, f, s)
    sites = _strided_sites(x, f, s)
    expected = ref.at_sites(ref.strided_conv(dense_of(x), weight.astype(np.float64), f, s),
                            sites)
    return (out, sites, _plus_bias(expected, b), _strided_shape(x, f, s), True,
            conv_terms(weight, b))


def run_deconv(rng, x, f, s, groups=1, bias=True, drop=0):
    coarse_channels, cout = 4, 6
    k = math.prod(f)
    down = random_weight(rng, k, x.n_channels, coarse_channels, dtype=x.features.dtype)
    y = sg.conv(x, down, None, f, s)
    weight, b = _conv_weights(rng, x, k, coarse_channels, cout, groups, bias)
    out = sg.deconv(y, weight, b, f, s)
    # The reference starts from the op's own coarse tensor y (its float32 values, if so).
    expected = ref.at_sites(ref.transposed_conv(dense_of(y), weight.astype(np.float64), f, s),
                            x.indices)
    # Deconvolution returns the finer tensor's sites and rows (not re-sorted).
    return (out, x.indices, _plus_bias(expected, b), x.spatial_shape, False,
            conv_terms(weight, b))


def run_full_conv(rng, x, f, s, groups=1, bias=True, drop=0):
    cout = 6
    weight, b = _conv_weights(rng, x, math.prod(f), x.n_channels, cout, groups, bias)
    out = sg.full_conv(x, weight, b, f, s)
    sites = ref.active_sites(ref.transposed_occupancy(occupancy_of(x), f, s))
    expected = ref.at_sites(ref.transposed_conv(dense_of(x), weight.astype(np.float64), f, s),
                            sites)
    shape = tuple((n - 1) * si + fi for n, fi, si in zip(x.spatial_shape, f, s))
    return out, sites, _plus_bias(expected, b), shape, True, conv_terms(weight, b)


def run_max_pool(rng, x, f, s, groups=1, bias=True, drop=0):
    out = sg.max_pool(x, f, s, drop)
    sites = _strided_sites(x, f, s)
    expected = ref.at_sites(ref.max_pool(dense_of(x)[:, drop:], occupancy_of(x), f, s), sites)
    return out, sites, expected, _strided_shape(x, f, s), True, 1     # a maximum is exact


def run_avg_pool(rng, x, f, s, groups=1, bias=True, drop=0):
    out = sg.avg_pool(x, f, s, drop)
    sites = _strided_sites(x, f, s)
    expected = ref.at_sites(ref.sum_pool(dense_of(x)[:, drop:], f, s), sites) / math.prod(f)
    return out, sites, expected, _strided_shape(x, f, s), True, math.prod(f)


def run_unpool(rng, x, f, s, groups=1, bias=True, drop=0):
    y = sg.max_pool(x, f, s)
    out = sg.unpool(y, f, s, drop)
    expected = ref.at_sites(ref.unpool(dense_of(y)[:, drop:], f, s), x.indices)
    return out, x.indices, expected, x.spatial_shape, False, math.prod(f)


RUNNERS = {"conv": run_conv, "deconv": run_deconv, "full_conv": run_full_conv,
           "max_pool": run_max_pool, "avg_pool": run_avg_pool, "unpool": run_unpool}
FILTER_STRIDES = [(f, s) for f in (1, 2, 3) for s in (1, 2, 3)]


def _run_and_check(kind, rng, x, f, s, **options):
    out, sites, expected, shape, new_sites, terms = RUNNERS[kind](rng, x, f, s, **options)
    check_output(out, sites, expected, shape, x.batch_size, new_sites, x.features.dtype, terms)
    return out


def _input_shape(kind, d, f, s):
    # full_conv accepts any input size; give it the small submanifold shapes.
    return SUBMANIFOLD_SHAPES[d] if kind == "full_conv" else strided_input_shape(d, f, s)


@pytest.mark.parametrize("f,s", FILTER_STRIDES)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("kind", list(RUNNERS))
def test_strided_family(rng, kind, d, f, s, dtype):
    f, s = (f,) * d, (s,) * d
    x = make_tensor(rng, _input_shape(kind, d, f, s), density=0.2, dtype=dtype)
    _run_and_check(kind, rng, x, f, s)


@pytest.mark.parametrize("d", (2, 3, 4))
@pytest.mark.parametrize("kind", list(RUNNERS))
def test_strided_family_per_axis_sizes(rng, kind, d, dtype):
    """Different filter sizes and strides per axis; grouped weights; dropped channels."""
    f, s = (2, 3, 1, 3)[:d], (2, 1, 3, 2)[:d]
    x = make_tensor(rng, _input_shape(kind, d, f, s), density=0.2, dtype=dtype)
    _run_and_check(kind, rng, x, f, s, groups=2, drop=1)


@pytest.mark.parametrize("case", ["full", "single", "empty"])
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("kind", list(RUNNERS))
def test_strided_family_site_cases(rng, kind, d, case, dtype):
    f, s = (3,) * d, (2,) * d
    x = make_tensor(rng, _input_shape(kind, d, f, s), case, dtype=dtype)
    _run_and_check(kind, rng, x, f, s, bias=False)


@pytest.mark.parametrize("d", DIMS)
def test_max_pool_is_not_clamped_at_zero(rng, d, dtype):
    """All-negative features: the pooled maximum is negative (SCN would clamp to 0)."""
    f, s = (2,) * d, (2,) * d
    x = make_tensor(rng, strided_input_shape(d, f, s), dtype=dtype)
    x = x.with_features(-np.abs(x.features) - dtype(0.5))
    out = _run_and_check("max_pool", rng, x, f, s)
    assert out.n_active > 0 and (out.features < -0.5 + 1e-15).all()


# --- sparse <-> dense ------------------------------------------------------------------

@pytest.mark.parametrize("case", ["batches", "full", "single", "empty"])
@pytest.mark.parametrize("d", DIMS)
def test_to_dense(rng, d, case, dtype):
    x = make_tensor(rng, SUBMANIFOLD_SHAPES[d], case, dtype=dtype)
    expected = dense_of(x)
    for dense in (sg.to_dense(x), x.to_dense()):
        assert dense.shape == (x.batch_size, x.n_channels, *x.spatial_shape)
        assert dense.dtype == dtype
        np.testing.assert_array_equal(dense, expected)


@pytest.mark.parametrize("d", DIMS)
def test_from_dense(rng, d, dtype):
    """Active where ANY channel is non-zero; rows sorted; trailing empty samples kept."""
    shape = SUBMANIFOLD_SHAPES[d]
    batch_size, channels = 3, 3
    dense = rng.standard_normal((batch_size, channels, *shape)).astype(dtype)
    dense *= rng.random((batch_size, 1, *shape)) < 0.3           # inactive sites
    dense *= rng.random((batch_size, channels, *shape)) < 0.6    # some zero channels
    dense[-1] = 0.0                                              # an empty trailing sample
    x = sg.from_dense(dense)
    sites = ref.active_sites(np.any(dense != 0, axis=1))
    assert len(sites) > 0
    assert x.indices.dtype == np.int32
    assert x.indices.shape == sites.shape
    np.testing.assert_array_equal(x.indices, sites)
    assert x.spatial_shape == shape and x.batch_size == batch_size
    assert x.features.dtype == dtype
    np.testing.assert_array_equal(x.features, ref.at_sites(dense, sites))
    np.testing.assert_array_equal(sg.to_dense(x), dense)


@pytest.mark.parametrize("case", ["batches", "single", "empty"])
@pytest.mark.parametrize("d", DIMS)
def test_sparse_dense_sparse_round_trip(rng, d, case, dtype):
    x = make_tensor(rng, SUBMANIFOLD_SHAPES[d], case, dtype=dtype)
    y = sg.from_dense(sg.to_dense(x))
    assert y.features.dtype == dtype
    order = np.lexsort(x.indices.T[::-1]) if len(x) else np.zeros(0, np.int64)
    assert y.indices.shape == x.indices.shape
    np.testing.assert_array_equal(y.indices, x.indices[order])
    np.testing.assert_array_equal(y.features, x.features[order])
    assert y.spatial_shape == x.spatial_shape and y.batch_size == x.batch_size


def test_from_dense_drops_all_zero_rows(rng):
    x = make_tensor(rng, (6, 7))
    features = x.features.copy()
    features[:3] = 0.0
    x = x.with_features(features)
    y = sg.from_dense(sg.to_dense(x))
    assert len(y) == len(x) - 3
    kept = {tuple(r) for r in x.indices[3:].tolist()}
    assert {tuple(r) for r in y.indices.tolist()} == kept


# --- global pooling ---------------------------------------------------------------------

@pytest.mark.parametrize("case", ["batches", "single", "empty"])
@pytest.mark.parametrize("mode", ["max", "mean", "sum"])
@pytest.mark.parametrize("d", (1, 3))
def test_global_pool(rng, d, mode, case, dtype):
    x = make_tensor(rng, SUBMANIFOLD_SHAPES[d], case, dtype=dtype)
    if case == "batches":  # all-negative features: 'max' is the true maximum, not 0
        x = x.with_features(-np.abs(x.features))
    out = sg.global_pool(x, mode)
    expected = ref.global_pool(x.features.astype(np.float64), x.indices, x.batch_size, mode)
    assert out.shape == (x.batch_size, x.n_channels)
    rows_per_sample = max(1, int(np.bincount(x.indices[:, 0], minlength=1).max()))
    close(out, expected, dtype, rows_per_sample)
    empty = np.setdiff1d(np.arange(x.batch_size), x.indices[:, 0])
    assert len(empty) > 0
    np.testing.assert_array_equal(out[empty], 0.0)


# --- input layer ------------------------------------------------------------------------

MODE_NAMES = {0: "unique", 1: "first", 2: "last", 3: "sum", 4: "mean"}


def _rows_with_duplicates(rng, spatial_shape, batch_size):
    base = ref.random_sites(rng, spatial_shape, batch_size, 0.3, empty_batches=(1,))
    rows = base[rng.integers(0, len(base), size=3 * len(base))]
    assert len(np.unique(rows, axis=0)) < len(rows)
    return rows


@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4, "unique", "first", "last", "sum", "mean",
                                  "max"])
@pytest.mark.parametrize("d", DIMS)
def test_input_layer(rng, d, mode, dtype):
    name = MODE_NAMES.get(mode, mode)
    shape, batch_size = SUBMANIFOLD_SHAPES[d], 3
    rows = _rows_with_duplicates(rng, shape, batch_size)
    features = rng.standard_normal((len(rows), 3)).astype(dtype)
    if name == "unique":
        with pytest.raises(ValueError):
            sg.input_layer(rows, features, shape, batch_size, mode=mode)
        # Without duplicates mode 'unique' just sorts the rows.
        rows = np.unique(rows, axis=0)
        rows = rows[rng.permutation(len(rows))]
        features = rng.standard_normal((len(rows), 3)).astype(dtype)
    x, input_map = sg.input_layer(rows, features, shape, batch_size, mode=mode)
    sites, merged, row_site, kept = ref.input_layer(rows, features.astype(np.float64), name)
    assert x.indices.dtype == np.int32
    np.testing.assert_array_equal(x.indices, sites)
    assert x.spatial_shape == shape and x.batch_size == batch_size
    per_site = int(np.bincount(row_site).max())       # rows merged into one site
    close(x.features, merged, dtype, per_site)
    np.testing.assert_array_equal(input_map.segment_ids, row_site)
    back = sg.output_layer(x, input_map)
    if name in ("first", "last"):
        expected = np.zeros_like(features)
        expected[kept] = merged
    else:
        expected = merged[row_site]
    close(back, expected, dtype, per_site)


# --- batch normalisation ----------------------------------------------------------------

@pytest.mark.parametrize("affine", ["none", "weight", "weight+bias"])
@pytest.mark.parametrize("leakiness", [1.0, 0.0, 0.333])
@pytest.mark.parametrize("momentum", [0.9, 0.99])
def test_batch_norm(rng, momentum, leakiness, affine, dtype):
    x = make_tensor(rng, (6, 7), channels=3)
    x = x.with_features((x.features * np.array([0.5, 2.0, 3.0])
                         + np.array([1.0, -2.0, 0.0])).astype(dtype))
    f = x.features.astype(np.float64)          # the float64 reference's view
    weight = rng.uniform(0.5, 2.0, 3).astype(dtype) if affine != "none" else None
    bias = rng.standard_normal(3).astype(dtype) if affine == "weight+bias" else None
    w64, b64 = [None if v is None else v.astype(np.float64) for v in (weight, bias)]
    eps = 1e-4
    running_mean0 = rng.standard_normal(3).astype(dtype)
    running_var0 = rng.uniform(0.5, 2.0, 3).astype(dtype)
    m0, v0 = running_mean0.astype(np.float64), running_var0.astype(np.float64)
    n = len(f)                                 # the statistics sum over every row

    running_mean, running_var = running_mean0.copy(), running_var0.copy()
    out = sg.batch_norm(x, weight, bias, running_mean, running_var, training=True,
                        momentum=momentum, eps=eps, leakiness=leakiness)
    np.testing.assert_array_equal(out.indices, x.indices)
    expected = ref.batch_norm(f, w64, b64, f.mean(0), f.var(0), eps, leakiness)
    linear = ref.batch_norm(f, w64, b64, f.mean(0), f.var(0), eps, 1.0)
    assert (linear < 0).any() and (linear > 0).any()  # the activation has work to do
    close(out.features, expected, dtype, n)
    close(running_mean, momentum * m0 + (1 - momentum) * f.mean(0), dtype, n)
    close(running_var, momentum * v0 + (1 - momentum) * f.var(0, ddof=1), dtype, n)

    running_mean, running_var = running_mean0.copy(), running_var0.copy()
    out = sg.batch_norm(x, weight, bias, running_mean, running_var, training=False,
                        momentum=momentum, eps=eps, leakiness=leakiness)
    expected = ref.batch_norm(f, w64, b64, m0, v0, eps, leakiness)
    close(out.features, expected, dtype, 4)    # (x - mean) / sqrt(var + eps) * w + b
    np.testing.assert_array_equal(running_mean, running_mean0)
    np.testing.assert_array_equal(running_var, running_var0)


# --- larger, nearly dense regions ----------------------------------------------------------
# Big enough that many output rows share one neighbourhood pattern, so the kernels' grouped
# (im2col / blocked) fast paths run, not only the per-offset loop.

DENSE_REGION_SHAPES = {2: (16, 16), 3: (6, 6, 6)}


@pytest.mark.parametrize("kind", ["submanifold3", "submanifold2", "conv", "deconv",
                                  "full_conv"])
@pytest.mark.parametrize("d", (2, 3))
def test_nearly_dense_regions(rng, d, kind, dtype):
    shape = DENSE_REGION_SHAPES[d]
    indices = ref.random_sites(rng, shape, 2, density=0.9)
    x = sg.SparseTensor(rng.standard_normal((len(indices), 3)).astype(dtype), indices, shape, 2)
    if kind.startswith("submanifold"):
        out, expected, terms = run_submanifold(rng, x, int(kind[-1]), 1, bias=True)
        check_output(out, x.indices, expected, x.spatial_shape, x.batch_size, new_sites=False,
                     dtype=dtype, n_terms=terms)
    else:
        _run_and_check(kind, rng, x, (2,) * d, (2,) * d)
