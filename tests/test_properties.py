"""Hypothesis property tests on random small site sets in 1-4 D.

Features and weights in the permutation tests are small integers stored as float64, so every
sum is exact whatever the summation order: results must then match bit for bit.
"""

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsegrid as sg

import reference

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# largest output size per axis by dimension, to keep grids small
_MAX_OUT = {1: 7, 2: 4, 3: 3, 4: 2}


@st.composite
def site_sets(draw, shape=None, max_sites=40):
    """(indices int32 shuffled, spatial_shape, batch_size, seed)."""
    if shape is None:
        d = draw(st.integers(1, 4))
        shape = tuple(draw(st.integers(1, {1: 12, 2: 6, 3: 4, 4: 3}[d])) for _ in range(d))
    batch = draw(st.integers(1, 3))
    cells = math.prod(shape) * batch
    n = draw(st.integers(0, min(cells, max_sites)))
    flat = draw(st.lists(st.integers(0, cells - 1), min_size=n, max_size=n, unique=True))
    coords = np.stack(np.unravel_index(np.array(flat, np.int64), (batch, *shape)), axis=1) \
        if n else np.zeros((0, len(shape) + 1), np.int64)
    seed = draw(st.integers(0, 2**32 - 1))
    return coords.astype(np.int32), shape, batch, seed


@st.composite
def strided_cases(draw):
    """Sites plus (filter, stride) that divide the spatial size exactly."""
    d = draw(st.integers(1, 4))
    f = tuple(draw(st.integers(1, 3)) for _ in range(d))
    s = tuple(draw(st.integers(1, 3)) for _ in range(d))
    m = tuple(draw(st.integers(1, _MAX_OUT[d])) for _ in range(d))
    shape = tuple((mi - 1) * si + fi for mi, si, fi in zip(m, s, f))
    sites = draw(site_sets(shape=shape))
    return sites, f, s


@st.composite
def submanifold_cases(draw):
    sites = draw(site_sets())
    d = len(sites[1])
    f = tuple(draw(st.integers(1, 4)) for _ in range(d))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(d))
    return sites, f, dil


def _int_features(rng, n, c):
    return rng.integers(-4, 5, size=(n, c)).astype(np.float64)


def _tensor(indices, shape, batch, features):
    return sg.SparseTensor(features, indices, shape, batch_size=batch)


def _check_unique_per_offset(rb):
    for k in range(rb.n_offsets):
        i, o = rb.pairs(k)
        assert len(np.unique(o)) == len(o)
        assert len(np.unique(i)) == len(i)


def _lex_sorted(indices):
    rows = [tuple(r) for r in indices.tolist()]
    return all(a < b for a, b in zip(rows, rows[1:]))


def _triples(rb):
    ks = np.repeat(np.arange(rb.n_offsets), rb.counts())
    return set(zip(ks.tolist(), rb.in_idx.tolist(), rb.out_idx.tolist()))


# --------------------------------------------------------------------------- structure
@SETTINGS
@given(submanifold_cases())
def test_submanifold_outputs_unique_per_offset(case):
    (idx, shape, batch, seed), f, dil = case
    x = _tensor(idx, shape, batch, np.ones((len(idx), 1)))
    rb = x.grid.submanifold(x.sites, f, dil)
    assert rb.n_offsets == math.prod(f)
    _check_unique_per_offset(rb)


@SETTINGS
@given(strided_cases())
def test_strided_and_full_outputs_unique_per_offset(case):
    (idx, shape, batch, seed), f, s = case
    x = _tensor(idx, shape, batch, np.ones((len(idx), 1)))
    rb, coarse = x.grid.strided(x.sites, f, s)
    _check_unique_per_offset(rb)
    full_rb, fine, _ = x.grid.full(x.sites, f, s)
    _check_unique_per_offset(full_rb)
    assert full_rb.counts().tolist() == [len(idx)] * math.prod(f)


@SETTINGS
@given(strided_cases())
def test_transposed_rulebook_is_swapped_pairs(case):
    (idx, shape, batch, seed), f, s = case
    x = _tensor(idx, shape, batch, np.ones((len(idx), 1)))
    rb, coarse = x.grid.strided(x.sites, f, s)
    trb, fine = x.grid.transposed(coarse, f, s)
    assert fine is x.sites
    assert _triples(trb) == {(k, o, i) for k, i, o in _triples(rb)}
    assert (trb.n_in, trb.n_out) == (rb.n_out, rb.n_in)
    assert _triples(rb.transpose().transpose()) == _triples(rb)


# --------------------------------------------------------------------------- row order
@SETTINGS
@given(strided_cases())
def test_new_site_sets_are_lexicographically_sorted(case):
    (idx, shape, batch, seed), f, s = case
    rng = np.random.default_rng(seed)
    x = _tensor(idx, shape, batch, rng.standard_normal((len(idx), 2)).astype(np.float32))
    for y in (sg.conv(x, rng.standard_normal((math.prod(f), 2, 3)).astype(np.float32),
                      filter_size=f, stride=s),
              sg.max_pool(x, f, s), sg.avg_pool(x, f, s),
              sg.full_conv(x, np.ones((math.prod(f), 2, 1), np.float32), filter_size=f,
                           stride=s)):
        assert y.indices.dtype == np.int32
        assert _lex_sorted(y.indices)
        assert len(y.features) == len(y.indices)
    # and they are exactly the active windows of the dense reference
    y = sg.max_pool(x, f, s)
    occ = reference.strided_occupancy(reference.occupancy(idx, batch, shape), f, s)
    expected = np.argwhere(occ)
    np.testing.assert_array_equal(y.indices, expected.reshape(-1, len(shape) + 1))


@SETTINGS
@given(submanifold_cases())
def test_submanifold_keeps_sites_and_row_order(case):
    (idx, shape, batch, seed), f, dil = case
    rng = np.random.default_rng(seed)
    x = _tensor(idx, shape, batch, rng.standard_normal((len(idx), 2)))
    y = sg.submanifold_conv(x, rng.standard_normal((math.prod(f), 2, 3)), filter_size=f,
                            dilation=dil)
    assert y.sites is x.sites and y.grid is x.grid
    assert y.indices is x.indices
    np.testing.assert_array_equal(y.indices, idx)  # the user's row order, unchanged
    assert y.spatial_shape == shape and y.batch_size == batch
    assert y.features.shape == (len(idx), 3)


# --------------------------------------------------------------------------- permutation
@SETTINGS
@given(submanifold_cases(), st.data())
def test_submanifold_conv_permutes_with_input_rows(case, data):
    (idx, shape, batch, seed), f, dil = case
    rng = np.random.default_rng(seed)
    perm = np.array(data.draw(st.permutations(range(len(idx)))), np.int64)
    feats = _int_features(rng, len(idx), 2)
    w = rng.integers(-3, 4, size=(math.prod(f), 2, 2)).astype(np.float64)
    b = rng.integers(-3, 4, size=2).astype(np.float64)
    y = sg.submanifold_conv(_tensor(idx, shape, batch, feats), w, b, f, dil)
    yp = sg.submanifold_conv(_tensor(idx[perm], shape, batch, feats[perm]), w, b, f, dil)
    np.testing.assert_array_equal(yp.indices, idx[perm])
    np.testing.assert_array_equal(yp.features, y.features[perm])
    # and both equal the dense reference at the sites
    dense = reference.to_dense(feats, idx, batch, shape)
    ref = reference.submanifold_conv(dense, w, f, dil)
    occ = reference.occupancy(idx, batch, shape)
    ref = np.where(occ[:, None], ref, 0)
    np.testing.assert_array_equal(y.features, reference.at_sites(ref, idx) + b)


@SETTINGS
@given(strided_cases(), st.data())
def test_strided_conv_independent_of_input_row_order(case, data):
    (idx, shape, batch, seed), f, s = case
    rng = np.random.default_rng(seed)
    perm = np.array(data.draw(st.permutations(range(len(idx)))), np.int64)
    feats = _int_features(rng, len(idx), 2)
    w = rng.integers(-3, 4, size=(math.prod(f), 2, 3)).astype(np.float64)
    x, xp = _tensor(idx, shape, batch, feats), _tensor(idx[perm], shape, batch, feats[perm])
    y, yp = sg.conv(x, w, None, f, s), sg.conv(xp, w, None, f, s)
    np.testing.assert_array_equal(yp.indices, y.indices)
    np.testing.assert_array_equal(yp.features, y.features)
    for op in (sg.max_pool, sg.avg_pool):
        a, b = op(x, f, s), op(xp, f, s)
        np.testing.assert_array_equal(b.indices, a.indices)
        np.testing.assert_array_equal(b.features, a.features)
    # deconvolution returns to each input's own row order
    d, dp = sg.deconv(y, w.transpose(0, 2, 1).copy(), None, f, s), \
        sg.deconv(yp, w.transpose(0, 2, 1).copy(), None, f, s)
    np.testing.assert_array_equal(dp.indices, idx[perm])
    np.testing.assert_array_equal(dp.features, d.features[perm])


# --------------------------------------------------------------------------- determinism
def _run_all(idx, shape, batch, feats, weights, f, s, dil):
    x = _tensor(idx, shape, batch, feats)
    w_sub, w_str = weights
    out = []
    y = sg.submanifold_conv(x, w_sub, None, f, dil)
    out.append(y.features)
    c = sg.conv(x, w_str, None, f, s)
    out += [c.indices, c.features]
    out.append(sg.deconv(c, w_str.transpose(0, 2, 1).copy(), None, f, s).features)
    m = sg.max_pool(x, f, s)
    out += [m.indices, m.features, sg.unpool(m, f, s).features, sg.avg_pool(x, f, s).features]
    full = sg.full_conv(x, w_str, None, f, s)
    out += [full.indices, full.features]
    out.append(sg.batch_norm(y).features)
    return out


@SETTINGS
@given(strided_cases(), st.sampled_from([np.float32, np.float64]))
def test_ops_are_bit_deterministic(case, dtype):
    (idx, shape, batch, seed), f, s = case
    rng = np.random.default_rng(seed)
    k = math.prod(f)
    dil = tuple(1 + (i % 2) for i in range(len(shape)))
    feats = rng.standard_normal((len(idx), 5)).astype(dtype)
    weights = (rng.standard_normal((k, 5, 4)).astype(dtype),
               rng.standard_normal((k, 5, 5)).astype(dtype))
    first = _run_all(idx, shape, batch, feats, weights, f, s, dil)
    # same inputs, tensors and grids rebuilt from scratch (fresh copies of every array)
    second = _run_all(idx.copy(), tuple(shape), batch, feats.copy(),
                      tuple(w.copy() for w in weights), f, s, dil)
    # and once more on the same tensor (cached rulebooks)
    x = _tensor(idx, shape, batch, feats)
    a = sg.submanifold_conv(x, weights[0], None, f, dil)
    b = sg.submanifold_conv(x, weights[0], None, f, dil)
    assert np.array_equal(a.features, b.features)
    assert len(first) == len(second)
    for u, v in zip(first, second):
        assert u.dtype == v.dtype
        assert np.array_equal(u, v)
