"""Every sparse convolution / pooling equals the dense operation on the zero-filled grid.

Each op runs on random float64 sparse tensors in 1-D to 4-D and is compared with the
independent dense references of ``reference.py`` restricted to the active output sites:
the output SITE SET is checked exactly (submanifold ops keep their input's rows; ops that
create sites return exactly the dense occupancy, rows sorted by (batch, x1, ..., xD)), and
the VALUES to ~1e-10 relative. Also sparse <-> dense round trips, global pooling, the input
layer (all modes, duplicate rows) and batch normalisation against direct formulas.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import reference as ref
import sparsegrid as sg

RTOL, ATOL = 1e-10, 1e-12
DIMS = (1, 2, 3, 4)
CHANNELS = 4

# Submanifold ops keep the spatial size: small, non-cubic shapes per dimension.
SUBMANIFOLD_SHAPES = {1: (9,), 2: (7, 8), 3: (5, 6, 5), 4: (4, 5, 4, 5)}
# Strided ops: the OUTPUT shape per dimension; the input is (out - 1) * s + f, which divides.
STRIDED_OUT_SHAPES = {1: (5,), 2: (3, 4), 3: (3, 2, 3), 4: (2, 2, 2, 2)}


def close(actual, expected):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def per_axis(value, d):
    return tuple(value) if isinstance(value, tuple) else (value,) * d


def strided_input_shape(d, filter_size, stride):
    return tuple((o - 1) * s + f
                 for o, f, s in zip(STRIDED_OUT_SHAPES[d], filter_size, stride))


def make_tensor(rng, spatial_shape, case="batches", channels=CHANNELS, density=0.25):
    """A float64 SparseTensor with shuffled rows.

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
    features = rng.standard_normal((len(indices), channels))
    return sg.SparseTensor(features, indices, spatial_shape, batch_size)


def dense_of(x):
    return ref.to_dense(x.features, x.indices, x.batch_size, x.spatial_shape)


def occupancy_of(x):
    return ref.occupancy(x.indices, x.batch_size, x.spatial_shape)


def random_weight(rng, n_offsets, cin, cout, groups=1):
    if groups == 1:
        return rng.standard_normal((n_offsets, cin, cout))
    return rng.standard_normal((n_offsets, groups, cin // groups, cout // groups))


def check_output(out, indices, features, spatial_shape, batch_size, new_sites):
    """The exact site set (and row order), the spatial shape and the values of ``out``."""
    assert out.indices.dtype == np.int32
    assert out.indices.shape == indices.shape, (out.indices.shape, indices.shape)
    np.testing.assert_array_equal(out.indices, indices)
    if new_sites:
        assert ref.is_lexsorted(out.indices)
    assert out.spatial_shape == tuple(spatial_shape)
    assert out.batch_size == batch_size
    assert out.features.dtype == np.float64
    close(out.features, features)


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
    d = x.dimension
    f, dil = per_axis(filter_size, d), per_axis(dilation, d)
    weight = random_weight(rng, math.prod(f), x.n_channels, cout, groups)
    b = rng.standard_normal(cout) if bias else None
    out = sg.submanifold_conv(x, weight, b, filter_size, dilation)
    expected = ref.at_sites(ref.submanifold_conv(dense_of(x), weight, f, dil), x.indices)
    if b is not None:
        expected = expected + b
    return out, expected


@pytest.mark.parametrize("variant", list(SUBMANIFOLD_VARIANTS))
@pytest.mark.parametrize("d,filter_size,dilation", _submanifold_params())
def test_submanifold_conv(rng, d, filter_size, dilation, variant):
    groups, bias, cin, cout = SUBMANIFOLD_VARIANTS[variant]
    x = make_tensor(rng, SUBMANIFOLD_SHAPES[d], channels=cin)
    out, expected = run_submanifold(rng, x, filter_size, dilation, groups, bias, cout)
    check_output(out, x.indices, expected, x.spatial_shape, x.batch_size, new_sites=False)


@pytest.mark.parametrize("case", ["full", "single", "empty"])
@pytest.mark.parametrize("filter_size", [2, 3])
@pytest.mark.parametrize("d", DIMS)
def test_submanifold_conv_site_cases(rng, d, filter_size, case):
    x = make_tensor(rng, SUBMANIFOLD_SHAPES[d], case)
    out, expected = run_submanifold(rng, x, filter_size, 1, bias=True)
    check_output(out, x.indices, expected, x.spatial_shape, x.batch_size, new_sites=False)


# --- strided, transposed and pooling ops ------------------------------------------------

def _strided_sites(x, f, s):
    return ref.active_sites(ref.strided_occupancy(occupancy_of(x), f, s))


def _strided_shape(x, f, s):
    return tuple((n - fi) // si + 1 for n, fi, si in zip(x.spatial_shape, f, s))


def run_conv(rng, x, f, s, groups=1, bias=True, drop=0):
    cout = 6
    weight = random_weight(rng, math.prod(f), x.n_channels, cout, groups)
    b = rng.standard_normal(cout) if bias else None
    out = sg.conv(x, weight, b, f, s)
    sites = _strided_sites(x, f, s)
    expected = ref.at_sites(ref.strided_conv(dense_of(x), weight, f, s), sites)
    if b is not None:
        expected = expected + b
    return out, sites, expected, _strided_shape(x, f, s), True


def run_deconv(rng, x, f, s, groups=1, bias=True, drop=0):
    coarse_channels, cout = 4, 6
    k = math.prod(f)
    y = sg.conv(x, random_weight(rng, k, x.n_channels, coarse_channels), None, f, s)
    weight = random_weight(rng, k, coarse_channels, cout, groups)
    b = rng.standard_normal(cout) if bias else None
    out = sg.deconv(y, weight, b, f, s)
    expected = ref.at_sites(ref.transposed_conv(dense_of(y), weight, f, s), x.indices)
    if b is not None:
        expected = expected + b
    # Deconvolution returns the finer tensor's sites and rows (not re-sorted).
    return out, x.indices, expected, x.spatial_shape, False


def run_full_conv(rng, x, f, s, groups=1, bias=True, drop=0):
    cout = 6
    weight = random_weight(rng, math.prod(f), x.n_channels, cout, groups)
    b = rng.standard_normal(cout) if bias else None
    out = sg.full_conv(x, weight, b, f, s)
    sites = ref.active_sites(ref.transposed_occupancy(occupancy_of(x), f, s))
    expected = ref.at_sites(ref.transposed_conv(dense_of(x), weight, f, s), sites)
    if b is not None:
        expected = expected + b
    shape = tuple((n - 1) * si + fi for n, fi, si in zip(x.spatial_shape, f, s))
    return out, sites, expected, shape, True


def run_max_pool(rng, x, f, s, groups=1, bias=True, drop=0):
    out = sg.max_pool(x, f, s, drop)
    sites = _strided_sites(x, f, s)
    expected = ref.at_sites(ref.max_pool(dense_of(x)[:, drop:], occupancy_of(x), f, s), sites)
    return out, sites, expected, _strided_shape(x, f, s), True


def run_avg_pool(rng, x, f, s, groups=1, bias=True, drop=0):
    out = sg.avg_pool(x, f, s, drop)
    sites = _strided_sites(x, f, s)
    expected = ref.at_sites(ref.sum_pool(dense_of(x)[:, drop:], f, s), sites) / math.prod(f)
    return out, sites, expected, _strided_shape(x, f, s), True


def run_unpool(rng, x, f, s, groups=1, bias=True, drop=0):
    y = sg.max_pool(x, f, s)
    out = sg.unpool(y, f, s, drop)
    expected = ref.at_sites(ref.unpool(dense_of(y)[:, drop:], f, s), x.indices)
    return out, x.indices, expected, x.spatial_shape, False


RUNNERS = {"conv": run_conv, "deconv": run_deconv, "full_conv": run_full_conv,
           "max_pool": run_max_pool, "avg_pool": run_avg_pool, "unpool": run_unpool}
FILTER_STRIDES = [(f, s) for f in (1, 2, 3) for s in (1, 2, 3)]


def _run_and_check(kind, rng, x, f, s, **options):
    out, sites, expected, shape, new_sites = RUNNERS[kind](rng, x, f, s, **options)
    check_output(out, sites, expected, shape, x.batch_size, new_sites)
    return out


def _input_shape(kind, d, f, s):
    # full_conv accepts any input size; give it the small submanifold shapes.
    return SUBMANIFOLD_SHAPES[d] if kind == "full_conv" else strided_input_shape(d, f, s)


@pytest.mark.parametrize("f,s", FILTER_STRIDES)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("kind", list(RUNNERS))
def test_strided_family(rng, kind, d, f, s):
    f, s = (f,) * d, (s,) * d
    x = make_tensor(rng, _input_shape(kind, d, f, s), density=0.2)
    _run_and_check(kind, rng, x, f, s)


@pytest.mark.parametrize("d", (2, 3, 4))
@pytest.mark.parametrize("kind", list(RUNNERS))
def test_strided_family_per_axis_sizes(rng, kind, d):
    """Different filter sizes and strides per axis; grouped weights; dropped channels."""
    f, s = (2, 3, 1, 3)[:d], (2, 1, 3, 2)[:d]
    x = make_tensor(rng, _input_shape(kind, d, f, s), density=0.2)
    _run_and_check(kind, rng, x, f, s, groups=2, drop=1)


@pytest.mark.parametrize("case", ["full", "single", "empty"])
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("kind", list(RUNNERS))
def test_strided_family_site_cases(rng, kind, d, case):
    f, s = (3,) * d, (2,) * d
    x = make_tensor(rng, _input_shape(kind, d, f, s), case)
    _run_and_check(kind, rng, x, f, s, bias=False)


@pytest.mark.parametrize("d", DIMS)
def test_max_pool_is_not_clamped_at_zero(rng, d):
    """All-negative features: the pooled maximum is negative (SCN would clamp to 0)."""
    f, s = (2,) * d, (2,) * d
    x = make_tensor(rng, strided_input_shape(d, f, s))
    x = x.with_features(-np.abs(x.features) - 0.5)
    out = _run_and_check("max_pool", rng, x, f, s)
    assert out.n_active > 0 and (out.features < -0.5 + 1e-15).all()


# --- sparse <-> dense ------------------------------------------------------------------

@pytest.mark.parametrize("case", ["batches", "full", "single", "empty"])
@pytest.mark.parametrize("d", DIMS)
def test_to_dense(rng, d, case):
    x = make_tensor(rng, SUBMANIFOLD_SHAPES[d], case)
    expected = dense_of(x)
    for dense in (sg.to_dense(x), x.to_dense()):
        assert dense.shape == (x.batch_size, x.n_channels, *x.spatial_shape)
        assert dense.dtype == np.float64
        np.testing.assert_array_equal(dense, expected)


@pytest.mark.parametrize("d", DIMS)
def test_from_dense(rng, d):
    """Active where ANY channel is non-zero; rows sorted; trailing empty samples kept."""
    shape = SUBMANIFOLD_SHAPES[d]
    batch_size, channels = 3, 3
    dense = rng.standard_normal((batch_size, channels, *shape))
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
    np.testing.assert_array_equal(x.features, ref.at_sites(dense, sites))
    np.testing.assert_array_equal(sg.to_dense(x), dense)


@pytest.mark.parametrize("case", ["batches", "single", "empty"])
@pytest.mark.parametrize("d", DIMS)
def test_sparse_dense_sparse_round_trip(rng, d, case):
    x = make_tensor(rng, SUBMANIFOLD_SHAPES[d], case)
    y = sg.from_dense(sg.to_dense(x))
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
def test_global_pool(rng, d, mode, case):
    x = make_tensor(rng, SUBMANIFOLD_SHAPES[d], case)
    if case == "batches":  # all-negative features: 'max' is the true maximum, not 0
        x = x.with_features(-np.abs(x.features))
    out = sg.global_pool(x, mode)
    expected = ref.global_pool(x.features, x.indices, x.batch_size, mode)
    assert out.shape == (x.batch_size, x.n_channels)
    close(out, expected)
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
def test_input_layer(rng, d, mode):
    name = MODE_NAMES.get(mode, mode)
    shape, batch_size = SUBMANIFOLD_SHAPES[d], 3
    rows = _rows_with_duplicates(rng, shape, batch_size)
    features = rng.standard_normal((len(rows), 3))
    if name == "unique":
        with pytest.raises(ValueError):
            sg.input_layer(rows, features, shape, batch_size, mode=mode)
        # Without duplicates mode 'unique' just sorts the rows.
        rows = np.unique(rows, axis=0)
        rows = rows[rng.permutation(len(rows))]
        features = rng.standard_normal((len(rows), 3))
    x, input_map = sg.input_layer(rows, features, shape, batch_size, mode=mode)
    sites, merged, row_site, kept = ref.input_layer(rows, features, name)
    assert x.indices.dtype == np.int32
    np.testing.assert_array_equal(x.indices, sites)
    assert x.spatial_shape == shape and x.batch_size == batch_size
    close(x.features, merged)
    np.testing.assert_array_equal(input_map.segment_ids, row_site)
    back = sg.output_layer(x, input_map)
    if name in ("first", "last"):
        expected = np.zeros_like(features)
        expected[kept] = merged
    else:
        expected = merged[row_site]
    close(back, expected)


# --- batch normalisation ----------------------------------------------------------------

@pytest.mark.parametrize("affine", ["none", "weight", "weight+bias"])
@pytest.mark.parametrize("leakiness", [1.0, 0.0, 0.333])
@pytest.mark.parametrize("momentum", [0.9, 0.99])
def test_batch_norm(rng, momentum, leakiness, affine):
    x = make_tensor(rng, (6, 7), channels=3)
    x = x.with_features(x.features * np.array([0.5, 2.0, 3.0]) + np.array([1.0, -2.0, 0.0]))
    f = x.features
    weight = rng.uniform(0.5, 2.0, 3) if affine != "none" else None
    bias = rng.standard_normal(3) if affine == "weight+bias" else None
    eps = 1e-4
    running_mean0, running_var0 = rng.standard_normal(3), rng.uniform(0.5, 2.0, 3)

    running_mean, running_var = running_mean0.copy(), running_var0.copy()
    out = sg.batch_norm(x, weight, bias, running_mean, running_var, training=True,
                        momentum=momentum, eps=eps, leakiness=leakiness)
    np.testing.assert_array_equal(out.indices, x.indices)
    expected = ref.batch_norm(f, weight, bias, f.mean(0), f.var(0), eps, leakiness)
    linear = ref.batch_norm(f, weight, bias, f.mean(0), f.var(0), eps, 1.0)
    assert (linear < 0).any() and (linear > 0).any()  # the activation has work to do
    close(out.features, expected)
    close(running_mean, momentum * running_mean0 + (1 - momentum) * f.mean(0))
    close(running_var, momentum * running_var0 + (1 - momentum) * f.var(0, ddof=1))

    running_mean, running_var = running_mean0.copy(), running_var0.copy()
    out = sg.batch_norm(x, weight, bias, running_mean, running_var, training=False,
                        momentum=momentum, eps=eps, leakiness=leakiness)
    expected = ref.batch_norm(f, weight, bias, running_mean0, running_var0, eps, leakiness)
    close(out.features, expected)
    np.testing.assert_array_equal(running_mean, running_mean0)
    np.testing.assert_array_equal(running_var, running_var0)


# --- larger, nearly dense regions ----------------------------------------------------------
# Big enough that many output rows share one neighbourhood pattern, so the kernels' grouped
# (im2col / blocked) fast paths run, not only the per-offset loop.

DENSE_REGION_SHAPES = {2: (16, 16), 3: (6, 6, 6)}


@pytest.mark.parametrize("kind", ["submanifold3", "submanifold2", "conv", "deconv",
                                  "full_conv"])
@pytest.mark.parametrize("d", (2, 3))
def test_nearly_dense_regions(rng, d, kind):
    shape = DENSE_REGION_SHAPES[d]
    indices = ref.random_sites(rng, shape, 2, density=0.9)
    x = sg.SparseTensor(rng.standard_normal((len(indices), 3)), indices, shape, 2)
    if kind.startswith("submanifold"):
        out, expected = run_submanifold(rng, x, int(kind[-1]), 1, bias=True)
        check_output(out, x.indices, expected, x.spatial_shape, x.batch_size, new_sites=False)
    else:
        _run_and_check(kind, rng, x, (2,) * d, (2,) * d)
