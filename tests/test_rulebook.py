"""Coordinates, rulebook structure and completeness, Rulebook I/O, Grid caching, index query.

Completeness is checked against brute-force pure-Python enumerations of every geometrically
valid (offset, input row, output row) triple.
"""

import itertools

import numpy as np
import pytest

import sparsegrid as sg
from sparsegrid import coords
from sparsegrid.grid import Grid, Sites, random_window_starts
from sparsegrid.rulebook import Rulebook

from reference import random_sites


# every test here runs on each available kernel set; ``kern`` is that set's module
pytestmark = pytest.mark.usefixtures("bind_kernels")
kern = None


# --------------------------------------------------------------------------- helpers
def _tensor(rng, shape, batch_size=2, density=0.3, channels=1, dtype=np.float64):
    idx = random_sites(rng, shape, batch_size, density)
    feats = rng.standard_normal((len(idx), channels)).astype(dtype)
    return sg.SparseTensor(feats, idx, shape, batch_size=batch_size)


def _offsets(filter_size):
    return list(itertools.product(*[range(f) for f in filter_size]))


def _triples(rb):
    """Set of (k, in_row, out_row) of a rulebook."""
    ptr = rb.offset_ptr
    out = set()
    for k in range(rb.n_offsets):
        for i, o in zip(rb.in_idx[ptr[k]:ptr[k + 1]].tolist(),
                        rb.out_idx[ptr[k]:ptr[k + 1]].tolist()):
            out.add((k, i, o))
    return out


def _row_of(indices):
    return {tuple(r): n for n, r in enumerate(indices.tolist())}


def brute_submanifold(indices, filter_size, dilation):
    lookup = _row_of(indices)
    triples = set()
    for k, delta in enumerate(_offsets(filter_size)):
        for o, (b, *x) in enumerate(indices.tolist()):
            y = tuple(xi + (di - f // 2) * dl
                      for xi, di, f, dl in zip(x, delta, filter_size, dilation))
            i = lookup.get((b, *y))
            if i is not None:
                triples.add((k, i, o))
    return triples


def brute_strided(indices, filter_size, stride, out_shape):
    """Output sites (sorted) and triples of a strided op: input = output * stride + delta."""
    raw = []
    for k, delta in enumerate(_offsets(filter_size)):
        for i, (b, *x) in enumerate(indices.tolist()):
            o = []
            for xi, di, s, n in zip(x, delta, stride, out_shape):
                t = xi - di
                if t < 0 or t % s or t // s >= n:
                    break
                o.append(t // s)
            else:
                raw.append((k, i, (b, *o)))
    sites = sorted({site for _, _, site in raw})
    row = {s: n for n, s in enumerate(sites)}
    return sites, {(k, i, row[site]) for k, i, site in raw}


def brute_full(indices, filter_size, stride):
    raw = []
    for k, delta in enumerate(_offsets(filter_size)):
        for i, (b, *x) in enumerate(indices.tolist()):
            raw.append((k, i, (b, *[xi * s + di for xi, s, di in zip(x, stride, delta)])))
    sites = sorted({site for _, _, site in raw})
    row = {s: n for n, s in enumerate(sites)}
    return sites, {(k, i, row[site]) for k, i, site in raw}


def check_structure(rb, n_offsets):
    """offset_ptr monotone with K+1 entries; per offset, out rows unique and in rows unique."""
    assert rb.in_idx.dtype == np.int32 and rb.out_idx.dtype == np.int32
    assert rb.offset_ptr.dtype == np.int64
    assert rb.offset_ptr.shape == (n_offsets + 1,)
    assert rb.n_offsets == n_offsets
    assert rb.offset_ptr[0] == 0 and rb.offset_ptr[-1] == len(rb.in_idx) == len(rb.out_idx)
    assert np.all(np.diff(rb.offset_ptr) >= 0)
    np.testing.assert_array_equal(rb.counts(), np.diff(rb.offset_ptr))
    if rb.n_pairs:
        assert rb.in_idx.min() >= 0 and rb.in_idx.max() < rb.n_in
        assert rb.out_idx.min() >= 0 and rb.out_idx.max() < rb.n_out
    for k in range(n_offsets):
        i, o = rb.pairs(k)
        assert len(np.unique(o)) == len(o), f"offset {k}: repeated output row"
        assert len(np.unique(i)) == len(i), f"offset {k}: repeated input row"


def _lex_sorted(indices):
    if len(indices) < 2:
        return True
    keys = [tuple(r) for r in indices.tolist()]
    return all(a < b for a, b in zip(keys, keys[1:]))


# --------------------------------------------------------------------------- coords
def test_kernel_offsets_2x3():
    expected = [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    np.testing.assert_array_equal(sg.kernel_offsets((2, 3)), expected)


def test_kernel_offsets_3d_last_axis_fastest():
    off = sg.kernel_offsets((2, 3, 4))
    assert off.shape == (24, 3)
    expected = [[a, b, c] for a in range(2) for b in range(3) for c in range(4)]
    np.testing.assert_array_equal(off, expected)
    # index k = (a * 3 + b) * 4 + c
    np.testing.assert_array_equal(off @ np.array([12, 4, 1]), np.arange(24))


def test_submanifold_offsets_centred_and_dilated():
    off = coords.submanifold_offsets((3, 2), (2, 3))
    expected = [[(a - 1) * 2, (b - 1) * 3] for a in range(3) for b in range(2)]
    np.testing.assert_array_equal(off, expected)


@pytest.mark.parametrize("d", range(1, 11))
def test_pack_unpack_round_trip_and_order(rng, d):
    shape = tuple(int(s) for s in rng.integers(1, 6, size=d))
    batch = 3
    n = 200
    idx = np.concatenate([rng.integers(0, batch, (n, 1)),
                          rng.integers(0, shape, (n, d))], axis=1).astype(np.int32)
    keys, strides = coords.pack_keys(idx, shape, batch)
    assert keys.dtype == np.int64
    np.testing.assert_array_equal(coords.unpack_keys(keys, shape), idx)
    # key order == lexicographic (batch, x1, ..., xD) order
    lex = np.lexsort(idx.T[::-1])
    np.testing.assert_array_equal(np.sort(keys, kind="stable"), keys[lex])
    as_tuples = [tuple(r) for r in idx.tolist()]
    for a in range(0, n - 1, 7):
        b = a + 1
        assert (keys[a] < keys[b]) == (as_tuples[a] < as_tuples[b])
        assert (keys[a] == keys[b]) == (as_tuples[a] == as_tuples[b])


def test_pack_keys_extreme_corners_d10():
    shape = (2**6,) * 10  # 2**60 cells, 4 samples: 2**62 keys
    idx = np.array([[0] * 11, [3] + [63] * 10], np.int32)
    keys, _ = coords.pack_keys(idx, shape, 4)
    assert keys.tolist() == [0, 2**62 - 1]
    np.testing.assert_array_equal(coords.unpack_keys(keys, shape), idx)


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_pack_with_pad_never_collides(rng, d):
    shape = tuple(int(s) for s in rng.integers(1, 5, size=d))
    pad = tuple(int(p) for p in rng.integers(0, 3, size=d))
    batch = 2
    sites = [(b, *x) for b in range(batch) for x in itertools.product(*map(range, shape))]
    idx = np.array(sites, np.int32)
    keys, strides = coords.pack_keys(idx, shape, batch, pad)
    deltas = np.array(list(itertools.product(*[range(-p, p + 1) for p in pad])), np.int64)
    packed = deltas @ strides[1:]
    # every (site, delta) neighbour coordinate, including ones outside the grid
    neighbour_keys = (keys[:, None] + packed[None, :]).reshape(-1)
    neighbour_coords = (idx[:, None, :].astype(np.int64)
                        + np.concatenate([np.zeros((len(deltas), 1), np.int64), deltas],
                                         axis=1)[None]).reshape(-1, d + 1)
    by_key = {}
    for key, c in zip(neighbour_keys.tolist(), map(tuple, neighbour_coords.tolist())):
        assert by_key.setdefault(key, c) == c, f"key {key} for both {by_key[key]} and {c}"
    # an out-of-grid neighbour never gets the key of an in-grid site
    inside = np.all((neighbour_coords[:, 1:] >= 0) & (neighbour_coords[:, 1:] < shape), axis=1)
    site_keys = set(keys.tolist())
    assert not site_keys & set(neighbour_keys[~inside].tolist())
    assert set(neighbour_keys[inside].tolist()) == site_keys


# --------------------------------------------------------------------------- submanifold
SUBM_CASES = [
    # shape, filter, dilation
    ((17,), (3,), (1,)),
    ((17,), (4,), (1,)),
    ((17,), (3,), (3,)),
    ((7, 8), (3, 3), (1, 1)),
    ((7, 8), (2, 2), (1, 1)),
    ((7, 8), (3, 5), (1, 1)),
    ((7, 8), (2, 3), (1, 1)),
    ((7, 8), (3, 3), (2, 1)),
    ((7, 8), (3, 3), (1, 2)),
    ((7, 8), (1, 1), (1, 1)),
    ((7, 8), (5, 1), (1, 1)),
    ((5, 4, 6), (3, 3, 3), (1, 1, 1)),
    ((5, 4, 6), (2, 3, 4), (1, 2, 1)),
    ((5, 4, 6), (3, 3, 3), (2, 2, 2)),
    ((4, 3, 4, 3), (3, 2, 3, 3), (1, 1, 1, 1)),
    ((3, 4, 3, 3, 4), (3, 3, 3, 3, 3), (1, 1, 1, 1, 1)),
    ((3, 4, 3, 3, 4), (2, 2, 2, 2, 2), (1, 1, 2, 1, 1)),
]


def _subm_id(case):
    shape, f, dl = case
    return f"{len(shape)}d-f{'x'.join(map(str, f))}-d{'x'.join(map(str, dl))}"


@pytest.mark.parametrize("case", SUBM_CASES, ids=_subm_id)
def test_submanifold_rulebook(rng, case):
    shape, filter_size, dilation = case
    x = _tensor(rng, shape, density=0.4)
    rb = x.grid.submanifold(x.sites, filter_size, dilation)
    k_total = int(np.prod(filter_size))
    assert rb.kind == "submanifold" and not rb.transposed
    assert rb.n_in == rb.n_out == x.n_active
    assert rb.filter_size == filter_size and rb.dilation == dilation
    check_structure(rb, k_total)
    # geometry of every pair: input = output + (delta - f//2) * dilation, same batch
    offs = coords.submanifold_offsets(filter_size, dilation)
    idx = x.indices.astype(np.int64)
    for k in range(k_total):
        i, o = rb.pairs(k)
        np.testing.assert_array_equal(idx[i, 0], idx[o, 0])
        np.testing.assert_array_equal(idx[i, 1:], idx[o, 1:] + offs[k])
    # completeness
    assert _triples(rb) == brute_submanifold(x.indices, filter_size, dilation)
    # identity offset
    odd = all(f % 2 for f in filter_size)
    if odd:
        assert rb.identity_offset == k_total // 2
    if rb.identity_offset >= 0:
        assert np.all(offs[rb.identity_offset] == 0)
        i, o = rb.pairs(rb.identity_offset)
        np.testing.assert_array_equal(i, np.arange(x.n_active))
        np.testing.assert_array_equal(o, np.arange(x.n_active))


def test_submanifold_rulebook_empty_and_single(rng):
    for n in (0, 1):
        idx = np.zeros((n, 3), np.int32)
        x = sg.SparseTensor(np.ones((n, 1)), idx, (4, 4), batch_size=1)
        rb = x.grid.submanifold(x.sites, 3)
        check_structure(rb, 9)
        assert rb.n_pairs == n
        assert _triples(rb) == brute_submanifold(idx, (3, 3), (1, 1))


def test_submanifold_full_grid_pair_count():
    # every cell active: each offset pairs exactly the cells whose neighbour is inside
    shape = (5, 6)
    idx = np.array([(0, a, b) for a in range(5) for b in range(6)], np.int32)
    x = sg.SparseTensor(np.ones((30, 1)), idx, shape)
    rb = x.grid.submanifold(x.sites, (3, 3))
    expected = [(5 - abs(a - 1)) * (6 - abs(b - 1)) for a in range(3) for b in range(3)]
    assert rb.counts().tolist() == expected


# --------------------------------------------------------------------------- strided
STRIDED_CASES = [
    ((9,), (3,), (2,)),
    ((8,), (2,), (2,)),
    ((8,), (1,), (1,)),
    ((8, 6), (2, 2), (2, 2)),
    ((7, 9), (3, 3), (2, 2)),
    ((7, 7), (3, 2), (1, 5)),
    ((7, 6), (3, 3), (1, 1)),
    ((6, 6), (2, 2), (1, 1)),
    ((9, 7), (1, 1), (2, 2)),
    ((5, 7, 4), (3, 3, 2), (2, 2, 2)),
    ((6, 3, 5), (2, 3, 1), (2, 1, 2)),
    ((5, 4, 5, 3), (3, 2, 3, 1), (2, 2, 1, 1)),
    ((13,), (5,), (4,)),           # power-of-two stride 4 below the filter: two taps
    ((12, 10), (4, 2), (4, 4)),    # stride 4 with f = s and f < s
    ((10, 10), (6, 4), (4, 2)),
    ((4, 4, 3, 4, 3), (2, 2, 3, 2, 1), (2, 1, 1, 2, 1)),
]


def _strided_id(case):
    shape, f, s = case
    return f"{len(shape)}d-f{'x'.join(map(str, f))}-s{'x'.join(map(str, s))}"


@pytest.mark.parametrize("case", STRIDED_CASES, ids=_strided_id)
def test_strided_and_transposed_rulebook(rng, case):
    shape, filter_size, stride = case
    x = _tensor(rng, shape, batch_size=3, density=0.25)
    rb, out_sites = x.grid.strided(x.sites, filter_size, stride)
    k_total = int(np.prod(filter_size))
    out_shape = tuple((n - f) // s + 1 for n, f, s in zip(shape, filter_size, stride))
    assert out_sites.spatial_shape == out_shape
    assert out_sites.batch_size == x.batch_size
    assert rb.kind == "strided" and not rb.transposed and rb.identity_offset == -1
    assert rb.n_in == x.n_active and rb.n_out == len(out_sites)
    assert rb.stride == stride and rb.filter_size == filter_size
    check_structure(rb, k_total)
    out_idx = out_sites.indices
    assert out_idx.dtype == np.int32 and out_idx.shape == (len(out_sites), len(shape) + 1)
    assert _lex_sorted(out_idx)
    # geometry: input = output * stride + delta, same batch
    offs = sg.kernel_offsets(filter_size)
    fine = x.indices.astype(np.int64)
    coarse = out_idx.astype(np.int64)
    for k in range(k_total):
        i, o = rb.pairs(k)
        np.testing.assert_array_equal(fine[i, 0], coarse[o, 0])
        np.testing.assert_array_equal(fine[i, 1:], coarse[o, 1:] * np.array(stride) + offs[k])
    # completeness, and output sites are exactly the reachable ones
    sites, triples = brute_strided(x.indices, filter_size, stride, out_shape)
    assert [tuple(r) for r in out_idx.tolist()] == sites
    assert _triples(rb) == triples
    # every output has at least one input
    assert set(rb.out_idx.tolist()) == set(range(rb.n_out))

    # transposed: Deconvolution's rulebook, coarse -> fine
    trb, fine_sites = x.grid.transposed(out_sites, filter_size, stride)
    assert fine_sites is x.sites
    assert trb.transposed and trb.kind == "strided"
    assert trb.n_in == rb.n_out and trb.n_out == rb.n_in
    check_structure(trb, k_total)
    np.testing.assert_array_equal(trb.in_idx, rb.out_idx)
    np.testing.assert_array_equal(trb.out_idx, rb.in_idx)
    np.testing.assert_array_equal(trb.offset_ptr, rb.offset_ptr)
    for k in range(k_total):
        i, o = trb.pairs(k)  # i coarse, o fine: fine = coarse * stride + delta
        np.testing.assert_array_equal(fine[o, 1:], coarse[i, 1:] * np.array(stride) + offs[k])


# --------------------------------------------------------------------------- full
FULL_CASES = [
    ((5,), (3,), (2,)),
    ((4, 5), (2, 2), (2, 2)),
    ((4, 5), (3, 3), (1, 1)),
    ((4, 5), (3, 2), (2, 3)),
    ((3, 4, 3), (2, 3, 2), (2, 1, 2)),
    ((3, 3, 2, 3), (2, 2, 2, 2), (2, 2, 2, 2)),
]


@pytest.mark.parametrize("case", FULL_CASES, ids=_strided_id)
def test_full_rulebook(rng, case):
    shape, filter_size, stride = case
    x = _tensor(rng, shape, batch_size=2, density=0.3)
    rb, out_sites, new_grid = x.grid.full(x.sites, filter_size, stride)
    k_total = int(np.prod(filter_size))
    out_shape = tuple((n - 1) * s + f for n, f, s in zip(shape, filter_size, stride))
    assert out_sites.spatial_shape == out_shape
    assert isinstance(new_grid, Grid) and new_grid is not x.grid
    assert rb.kind == "full" and not rb.transposed
    assert rb.n_in == x.n_active and rb.n_out == len(out_sites)
    check_structure(rb, k_total)
    # every input activates all K children
    assert rb.counts().tolist() == [x.n_active] * k_total
    assert _lex_sorted(out_sites.indices)
    offs = sg.kernel_offsets(filter_size)
    coarse = x.indices.astype(np.int64)
    fine = out_sites.indices.astype(np.int64)
    for k in range(k_total):
        i, o = rb.pairs(k)
        np.testing.assert_array_equal(coarse[i, 0], fine[o, 0])
        np.testing.assert_array_equal(fine[o, 1:], coarse[i, 1:] * np.array(stride) + offs[k])
    sites, triples = brute_full(x.indices, filter_size, stride)
    assert [tuple(r) for r in out_sites.indices.tolist()] == sites
    assert _triples(rb) == triples


# --------------------------------------------------------------------------- neighbor map
@pytest.mark.parametrize("kind", ["submanifold", "strided", "transposed", "full"])
def test_neighbor_map_matches_pairs(rng, kind):
    x = _tensor(rng, (7, 7), density=0.4)
    if kind == "submanifold":
        rb = x.grid.submanifold(x.sites, 3)
    elif kind == "strided":
        rb, _ = x.grid.strided(x.sites, 3, 2)
    elif kind == "transposed":
        _, coarse = x.grid.strided(x.sites, 3, 2)
        rb, _ = x.grid.transposed(coarse, 3, 2)
    else:
        rb, _, _ = x.grid.full(x.sites, 3, 2)
    table = rb.neighbor_map()
    assert table.dtype == np.int32 and table.shape == (rb.n_out, rb.n_offsets)
    expected = np.full((rb.n_out, rb.n_offsets), -1, np.int32)
    for k, i, o in _triples(rb):
        expected[o, k] = i
    np.testing.assert_array_equal(table, expected)


# --------------------------------------------------------------------------- transpose / io
def test_transpose_swaps_and_is_involution(rng):
    x = _tensor(rng, (6, 7), density=0.4)
    rb = x.grid.submanifold(x.sites, (3, 2), (1, 2))
    t = rb.transpose()
    assert t.transposed and not rb.transposed
    np.testing.assert_array_equal(t.in_idx, rb.out_idx)
    np.testing.assert_array_equal(t.out_idx, rb.in_idx)
    np.testing.assert_array_equal(t.offset_ptr, rb.offset_ptr)
    assert (t.n_in, t.n_out) == (rb.n_out, rb.n_in)
    assert (t.filter_size, t.stride, t.dilation, t.kind, t.identity_offset) == \
        (rb.filter_size, rb.stride, rb.dilation, rb.kind, rb.identity_offset)
    tt = t.transpose()
    assert not tt.transposed
    for name in ("in_idx", "out_idx", "offset_ptr"):
        np.testing.assert_array_equal(getattr(tt, name), getattr(rb, name))
    assert (tt.n_in, tt.n_out, tt.filter_size, tt.stride, tt.dilation, tt.kind,
            tt.identity_offset) == (rb.n_in, rb.n_out, rb.filter_size, rb.stride, rb.dilation,
                                    rb.kind, rb.identity_offset)
    # strided: n_in != n_out
    srb, _ = x.grid.strided(x.sites, 2, (1, 1))
    st = srb.transpose()
    assert (st.n_in, st.n_out) == (srb.n_out, srb.n_in)
    assert _triples(st) == {(k, o, i) for k, i, o in _triples(srb)}


def _assert_same_rulebook(a, b):
    for name in ("in_idx", "out_idx", "offset_ptr"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y)
    for name in ("n_in", "n_out", "filter_size", "stride", "dilation", "kind",
                 "identity_offset", "transposed"):
        assert getattr(a, name) == getattr(b, name), name
        assert type(getattr(a, name)) is type(getattr(b, name)), name


@pytest.mark.parametrize("kind", ["submanifold", "strided_transposed", "full"])
def test_save_load_round_trip(rng, tmp_path, kind):
    x = _tensor(rng, (7, 9), density=0.4)
    if kind == "submanifold":
        rb = x.grid.submanifold(x.sites, 3, (2, 1))
    elif kind == "strided_transposed":
        rb = x.grid.strided(x.sites, 3, 2)[0].transpose()
    else:
        rb = x.grid.full(x.sites, (2, 3), (2, 1))[0]
    path = tmp_path / "rb.npz"
    rb.save(path)
    loaded = Rulebook.load(path)
    _assert_same_rulebook(rb, loaded)
    assert all(isinstance(v, int) for v in loaded.filter_size + loaded.stride + loaded.dilation)
    assert isinstance(loaded.kind, str)
    # readable with plain numpy.load, no pickle
    with np.load(path, allow_pickle=False) as data:
        np.testing.assert_array_equal(data["in_idx"], rb.in_idx)
        np.testing.assert_array_equal(data["out_idx"], rb.out_idx)
        np.testing.assert_array_equal(data["offset_ptr"], rb.offset_ptr)
        assert int(data["n_in"]) == rb.n_in and int(data["n_out"]) == rb.n_out
        assert tuple(data["filter_size"].tolist()) == rb.filter_size
        assert str(data["kind"]) == rb.kind
        assert bool(data["transposed"]) == rb.transposed


def test_save_load_empty(tmp_path):
    x = sg.SparseTensor(np.zeros((0, 1)), np.zeros((0, 3), np.int32), (4, 4))
    rb = x.grid.submanifold(x.sites, 3)
    rb.save(tmp_path / "e.npz")
    _assert_same_rulebook(rb, Rulebook.load(tmp_path / "e.npz"))


def test_save_load_same_path_without_suffix(rng, tmp_path):
    # load(path) must read what save(path) wrote, whatever the path's suffix
    x = _tensor(rng, (5, 5))
    rb = x.grid.submanifold(x.sites, 3)
    rb.save(tmp_path / "rulebook")
    _assert_same_rulebook(rb, Rulebook.load(tmp_path / "rulebook"))


def test_save_to_file_object(rng, tmp_path):
    x = _tensor(rng, (5, 5))
    rb = x.grid.submanifold(x.sites, 3)
    with open(tmp_path / "f.npz", "wb") as fh:
        rb.save(fh)
    _assert_same_rulebook(rb, Rulebook.load(tmp_path / "f.npz"))


# --------------------------------------------------------------------------- Grid caching
def test_grid_returns_cached_objects(rng):
    x = _tensor(rng, (8, 8))
    g = x.grid
    assert g.submanifold(x.sites, 3) is g.submanifold(x.sites, (3, 3))
    assert g.submanifold(x.sites, 3, 1) is g.submanifold(x.sites, 3, (1, 1))
    assert g.submanifold(x.sites, 3, 2) is not g.submanifold(x.sites, 3, 1)
    a, b = g.strided(x.sites, 2, 2), g.strided(x.sites, (2, 2), [2, 2])
    assert a[0] is b[0] and a[1] is b[1]
    f1, f2 = g.full(x.sites, 2, 2), g.full(x.sites, 2, 2)
    assert f1[0] is f2[0] and f1[1] is f2[1] and f1[2] is f2[2]
    t1, t2 = g.transposed(a[1], 2, 2), g.transposed(a[1], 2, 2)
    assert t1[0] is t2[0] and t1[1] is x.sites


def test_ops_share_rulebooks_through_grid(rng):
    x = _tensor(rng, (8, 8), channels=2)
    w3 = rng.standard_normal((9, 2, 2))
    w2 = rng.standard_normal((4, 2, 2))
    y1 = sg.submanifold_conv(x, w3, filter_size=3)
    y2 = sg.submanifold_conv(y1, w3, filter_size=3)
    assert y1.grid is x.grid and y2.grid is x.grid
    assert y1.sites is x.sites and y2.sites is x.sites
    n_cached = len(x.grid._rulebooks)
    c = sg.conv(x, w2, filter_size=2, stride=2)
    m = sg.max_pool(x, 2, 2)
    a = sg.avg_pool(x, 2, 2)
    assert c.sites is m.sites is a.sites
    assert len(x.grid._rulebooks) == n_cached + 1
    rb_conv = x.grid.strided(x.sites, 2, 2)[0]
    assert rb_conv is x.grid.strided(m.sites.producer[0], 2, 2)[0]
    assert m.sites.producer[3] is rb_conv and m.sites.producer[0] is x.sites
    # strided then transposed returns the original fine sites
    d = sg.deconv(c, w2, filter_size=2, stride=2)
    u = sg.unpool(m, 2, 2)
    assert d.sites is x.sites and u.sites is x.sites
    assert d.grid is x.grid


def test_different_paths_to_same_size_do_not_share_sites(rng):
    x = _tensor(rng, (8, 8), density=0.2)
    _, s22 = x.grid.strided(x.sites, 2, 2)
    _, s51 = x.grid.strided(x.sites, 5, 1)
    assert s22.spatial_shape == s51.spatial_shape == (4, 4)
    assert s22 is not s51
    assert s22.producer[1:3] == ((2, 2), (2, 2))
    assert s51.producer[1:3] == ((5, 5), (1, 1))
    # each deconvolves only with its own filter/stride, back to the same fine sites
    assert x.grid.transposed(s22, 2, 2)[1] is x.sites
    assert x.grid.transposed(s51, 5, 1)[1] is x.sites
    with pytest.raises(ValueError, match="Deconvolution"):
        x.grid.transposed(s22, 5, 1)
    with pytest.raises(ValueError, match="Deconvolution"):
        x.grid.transposed(s51, 2, 2)


def test_two_level_unpool_finds_each_level(rng):
    x = _tensor(rng, (16, 16), channels=1, density=0.1)
    p1 = sg.max_pool(x, 2, 2)
    p2 = sg.max_pool(p1, 2, 2)
    u2 = sg.unpool(p2, 2, 2)
    assert u2.sites is p1.sites
    assert sg.unpool(u2, 2, 2).sites is x.sites


def test_grid_clear_rebuilds_equal_rulebook(rng):
    x = _tensor(rng, (6, 6))
    rb = x.grid.submanifold(x.sites, 3)
    x.grid.clear()
    rb2 = x.grid.submanifold(x.sites, 3)
    assert rb2 is not rb
    _assert_same_rulebook(rb, rb2)


def test_full_conv_starts_new_grid(rng):
    x = _tensor(rng, (5, 5), channels=1)
    y = sg.full_conv(x, rng.standard_normal((4, 1, 1)), filter_size=2, stride=2)
    assert y.grid is not x.grid
    assert y.spatial_shape == (10, 10)


# --------------------------------------------------------------------------- index
@pytest.mark.parametrize("n", [0, 1, 2, 50, 1000])
def test_index_query_unsorted_keys(rng, n):
    keys = rng.choice(10 * n + 10, size=n, replace=False).astype(np.int64)
    order = kern.build_index(keys)
    sorted_keys = keys if order is None else keys[order]
    assert np.all(np.diff(sorted_keys) > 0)
    queries = rng.integers(-5, 10 * n + 15, size=(3, 40)).astype(np.int64)
    queries[0, :min(n, 40)] = keys[:min(n, 40)]
    rows = kern.query_index(sorted_keys, order, queries)
    assert rows.dtype == np.int32 and rows.shape == queries.shape
    where = {k: r for r, k in enumerate(keys.tolist())}
    expected = np.vectorize(lambda q: where.get(q, -1), otypes=[np.int32])(queries)
    np.testing.assert_array_equal(rows, expected)


def test_index_sorted_keys_need_no_permutation():
    keys = np.array([1, 4, 9, 10], np.int64)
    assert kern.build_index(keys) is None
    np.testing.assert_array_equal(kern.query_index(keys, None, np.array([10, 2, 1, 11])),
                                  [3, -1, 0, -1])


def test_index_extreme_keys():
    big = np.iinfo(np.int64).max - 1
    keys = np.array([big, 0, 5], np.int64)
    order = kern.build_index(keys)
    np.testing.assert_array_equal(
        kern.query_index(keys[order], order, np.array([big, np.iinfo(np.int64).max, 0, 5, -1])),
        [0, -1, 1, 2, -1])


def test_first_duplicate():
    keys = np.array([3, 3, 5], np.int64)
    assert kern.first_duplicate(keys, None) == (0, 1)
    assert kern.first_duplicate(np.array([1, 2, 3], np.int64), None) is None
    unsorted = np.array([7, 2, 9, 2], np.int64)
    order = kern.build_index(unsorted)
    assert kern.first_duplicate(unsorted[order], order) == (1, 3)


def test_sites_from_indices_unsorted_has_order(rng):
    idx = random_sites(rng, (6, 6), 2, 0.3)
    sites = Sites.from_indices(idx, (6, 6), 2)
    keys, _ = coords.pack_keys(idx, (6, 6), 2)
    assert sites.order is not None
    assert np.all(np.diff(keys[sites.order]) > 0)
    sorted_idx = idx[np.argsort(keys)]
    assert Sites.from_indices(sorted_idx, (6, 6), 2).order is None


def test_load_rejects_corrupt_rulebooks(tmp_path):
    x = sg.SparseTensor(np.ones((3, 1), np.float32), np.array([[0, 0, 0], [0, 0, 1], [0, 1, 1]]),
                        (2, 2))
    rulebook = x.grid.submanifold(x.sites, 3)
    fields = {name: getattr(rulebook, name) for name in
              ("in_idx", "out_idx", "offset_ptr", "n_in", "n_out", "filter_size", "stride",
               "dilation", "kind", "identity_offset", "transposed")}
    corruptions = {
        "rows outside": dict(in_idx=np.where(np.arange(rulebook.n_pairs) == 0, 7,
                                             rulebook.in_idx)),
        "negative": dict(out_idx=np.where(np.arange(rulebook.n_pairs) == 0, -1,
                                          rulebook.out_idx)),
        "offset_ptr has": dict(offset_ptr=rulebook.offset_ptr[:-1]),
        "partition": dict(offset_ptr=rulebook.offset_ptr[::-1]),
    }
    for message, change in corruptions.items():
        path = tmp_path / f"bad_{len(message)}.npz"
        np.savez(path, **{**{k: np.asarray(v) for k, v in fields.items()}, **change})
        with pytest.raises(ValueError, match="not a valid rulebook"):
            sg.Rulebook.load(path)


@pytest.mark.parametrize("n,high", [(0, 5), (1, 5), (7, 3), (1000, 50), (5000, 2**62),
                                    (3000, 2**22), (3000, 2**19)])
def test_unique_ranks_matches_numpy_unique(n, high):
    # small ranges take the marked-table path, wide ones the argsort path
    from sparsegrid.cpu.rules import unique_ranks
    rng = np.random.default_rng(n)
    keys = rng.integers(-high, high, n, dtype=np.int64)
    unique_keys, ranks = unique_ranks(keys)
    expect, inverse = np.unique(keys, return_inverse=True)
    assert unique_keys.dtype == np.int64 and ranks.dtype == np.int64
    np.testing.assert_array_equal(unique_keys, expect)
    np.testing.assert_array_equal(ranks, inverse.reshape(-1))
    np.testing.assert_array_equal(unique_keys[ranks], keys)


# --------------------------------------------------------------------------- strided rules
# The strided / window rule builders before they were vectorized (one pass per combination
# of per-axis taps, prod(ceil(f / s)) passes), kept verbatim as the reference: the builders
# must return the same arrays, bit for bit and in the same order.
def _loop_per_axis_taps(coords, filter_size, stride, out_shape):
    axes = []
    for d, (f, s, n_out) in enumerate(zip(filter_size, stride, out_shape)):
        f, s, x = int(f), int(s), coords[:, d]
        power = s & (s - 1) == 0
        first = x & (s - 1) if power else x % s
        choices = []
        for j in range(-(-f // s)):
            tap = first + j * s
            o = (x - tap) >> (s.bit_length() - 1) if power else (x - tap) // s
            valid = (o >= 0) & (o < n_out)
            if j * s + s > f:
                valid &= tap < f
            choices.append((valid, tap, o))
        axes.append(choices)
    return axes


def _loop_window_taps(coords, filter_size, starts):
    axes = []
    for d, (f, st) in enumerate(zip(filter_size, starts)):
        st = np.asarray(st, np.int64)
        n_out = len(st)
        cells = (st[:, None] + np.arange(f)).reshape(-1)
        outs = np.repeat(np.arange(n_out, dtype=np.int64), f)
        taps = np.tile(np.arange(f, dtype=np.int64), n_out)
        order = np.argsort(cells, kind="stable")
        cells, outs, taps = cells[order], outs[order], taps[order]
        size = int(max(coords[:, d].max(initial=0), cells.max(initial=0))) + 1
        first = np.searchsorted(cells, cells)
        slot = np.arange(len(cells)) - first
        width = int(slot.max(initial=-1)) + 1
        valid = np.zeros((size, width), bool)
        tap_table = np.zeros((size, width), np.int64)
        out_table = np.zeros((size, width), np.int64)
        valid[cells, slot] = True
        tap_table[cells, slot] = taps
        out_table[cells, slot] = outs
        c = coords[:, d]
        axes.append([(valid[c, j], tap_table[c, j], out_table[c, j]) for j in range(width)])
    return axes


def _loop_rules_from_taps(indices, axes, batch_size, filter_size, out_shape):
    import math

    from sparsegrid.coords import packing_strides, unpack_keys
    from sparsegrid.cpu.rules import unique_ranks

    out_strides = packing_strides(out_shape, batch_size)
    tap_strides = packing_strides(filter_size, 1)[1:]
    batch_key = indices[:, 0].astype(np.int64) * out_strides[0]
    rows_list, offset_list, key_list = [], [], []
    for choice in itertools.product(*[range(len(a)) for a in axes]):
        mask = axes[0][choice[0]][0]
        for d in range(1, len(choice)):
            mask = mask & axes[d][choice[d]][0]
        rows = np.flatnonzero(mask)
        every = len(rows) == len(mask)
        offset = np.zeros(len(rows), np.int64)
        key = batch_key.copy() if every else batch_key[rows]
        for d, j in enumerate(choice):
            _, tap, o = axes[d][j]
            offset += (tap if every else tap[rows]) * tap_strides[d]
            key += (o if every else o[rows]) * out_strides[d + 1]
        rows_list.append(rows)
        offset_list.append(offset)
        key_list.append(key)
    empty = np.zeros(0, np.int64)
    rows = np.concatenate(rows_list) if rows_list else empty
    offsets = np.concatenate(offset_list) if offset_list else empty
    keys = np.concatenate(key_list) if key_list else empty
    n_offsets = math.prod(filter_size)
    sort_keys = offsets.astype(np.uint16) if n_offsets <= 2**16 else offsets
    order = np.argsort(sort_keys, kind="stable")
    counts = np.bincount(offsets, minlength=n_offsets)
    bounds = np.cumsum(counts)[:-1]
    pairs_in = np.split(rows[order], bounds)
    out_keys = np.split(keys[order], bounds)
    # _finish_new_sites / _assemble
    counts = [len(p) for p in pairs_in]
    all_keys = np.concatenate(out_keys) if out_keys else np.zeros(0, np.int64)
    unique_keys, out_rows = unique_ranks(all_keys)
    pairs_out = np.split(out_rows, np.cumsum(counts)[:-1]) if counts else []
    counts = np.array([len(p) for p in pairs_in], np.int64)
    offset_ptr = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offset_ptr[1:])
    if len(pairs_in) == 0 or offset_ptr[-1] == 0:
        in_idx = np.zeros(0, np.int32)
        out_idx = in_idx.copy()
    else:
        in_idx = np.concatenate(pairs_in).astype(np.int32, copy=False)
        out_idx = np.concatenate(pairs_out).astype(np.int32, copy=False)
    return in_idx, out_idx, offset_ptr, unpack_keys(unique_keys, out_shape)


def loop_strided_rules(indices, spatial_shape, batch_size, filter_size, stride, out_shape):
    coords = indices[:, 1:].astype(np.int64)
    axes = _loop_per_axis_taps(coords, filter_size, stride, out_shape)
    return _loop_rules_from_taps(indices, axes, batch_size, filter_size, out_shape)


def loop_window_rules(indices, spatial_shape, batch_size, filter_size, starts, out_shape):
    coords = indices[:, 1:].astype(np.int64)
    axes = _loop_window_taps(coords, filter_size, starts)
    return _loop_rules_from_taps(indices, axes, batch_size, filter_size, out_shape)


def _assert_same_arrays(expected, got, what):
    assert len(expected) == len(got) == 4
    for name, a, b in zip(("in_idx", "out_idx", "offset_ptr", "out_indices"), expected, got):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, name, a.dtype, b.dtype,
                                                           a.shape, b.shape)
        assert np.array_equal(a, b), (what, name)


def _random_geometry(rng, max_dim=4, max_f=7, max_s=5, max_steps=4):
    d = int(rng.integers(1, max_dim + 1))
    f = tuple(int(v) for v in rng.integers(1, max_f + 1, d))
    s = tuple(int(v) for v in rng.integers(1, max_s + 1, d))
    shape = tuple(fi + si * int(rng.integers(0, max_steps + 1)) for fi, si in zip(f, s))
    out_shape = tuple((n - fi) // si + 1 for n, fi, si in zip(shape, f, s))
    return shape, f, s, out_shape


def _random_indices(rng, shape, batch_size):
    density = float(rng.choice([0.02, 0.1, 0.3, 1.0]))
    idx = random_sites(rng, shape, batch_size, density)
    if rng.random() < 0.2:                     # some batches, or everything, missing
        idx = idx[:int(rng.integers(0, len(idx) + 1))]
    return idx


def _random_starts(rng, shape, filter_size, stride):
    """Strictly increasing window starts per axis, the last window inside the grid."""
    starts = []
    for n, f, s in zip(shape, filter_size, stride):
        room = n - f + 1
        k = int(rng.integers(1, room + 1))
        starts.append(np.sort(rng.choice(room, size=k, replace=False)).astype(np.int64))
    return starts


def test_strided_rules_match_the_loop_reference(kernel_set):
    rules = kernel_set.module     # the kernel set's rule builders
    rng = np.random.default_rng(7)
    for case in range(400):
        shape, f, s, out_shape = _random_geometry(rng)
        batch_size = int(rng.integers(1, 4))
        idx = _random_indices(rng, shape, batch_size)
        args = (idx, shape, batch_size, f, s, out_shape)
        _assert_same_arrays(loop_strided_rules(*args), rules.strided_rules(*args),
                            (case, shape, f, s))


def test_window_rules_match_the_loop_reference(kernel_set):
    rules = kernel_set.module     # the kernel set's rule builders
    rng = np.random.default_rng(8)
    for case in range(400):
        shape, f, s, _ = _random_geometry(rng)
        batch_size = int(rng.integers(1, 4))
        idx = _random_indices(rng, shape, batch_size)
        starts = _random_starts(rng, shape, f, s)
        out_shape = tuple(len(st) for st in starts)
        args = (idx, shape, batch_size, f, starts, out_shape)
        _assert_same_arrays(loop_window_rules(*args), rules.window_rules(*args),
                            (case, shape, f, starts))


def test_randomized_strided_rulebook_matches_the_loop_reference(rng, kernel_set):
    # the Grid's randomized windows (steps s - 1, s, s + 1), as RandomizedStride* use them
    rules = kernel_set.module     # the kernel set's rule builders
    for shape, f, s in [((31, 29), (3, 3), (2, 2)), ((17, 13, 15), (3, 3, 3), (2, 2, 2)),
                        ((23,), (5,), (3,)), ((22, 19), (4, 4), (3, 3))]:
        x = _tensor(rng, shape, batch_size=2, density=0.2)
        seed = int(rng.integers(2**31))
        rb, sites = x.grid.randomized_strided(x.sites, f, s, np.random.default_rng(seed))
        out_shape = sites.spatial_shape
        starts = random_window_starts(f, s, out_shape, np.random.default_rng(seed))
        args = (x.indices, shape, 2, f, starts, out_shape)
        expected = loop_window_rules(*args)
        _assert_same_arrays(expected, rules.window_rules(*args), shape)
        _assert_same_arrays(expected, (rb.in_idx, rb.out_idx, rb.offset_ptr, sites.indices),
                            ("grid", shape))


@pytest.mark.parametrize("f,s", [((1,), (1,)), ((3, 2), (2, 2)), ((3, 3, 3), (1, 1, 1)),
                                 ((5, 4, 2, 3), (2, 3, 1, 1)), ((64, 64, 64), (1, 1, 1))],
                         ids=["1d", "2d", "3d", "4d", "3d-f64"])
def test_strided_and_window_rules_of_no_sites(kernel_set, f, s):
    rules = kernel_set.module     # the kernel set's rule builders
    shape = tuple(fi + 2 * si for fi, si in zip(f, s))
    out_shape = tuple((n - fi) // si + 1 for n, fi, si in zip(shape, f, s))
    idx = np.zeros((0, len(f) + 1), np.int32)
    k_total = int(np.prod(f))
    got = rules.strided_rules(idx, shape, 2, f, s, out_shape)
    small = k_total <= 4096     # the loop reference takes seconds over 64^3 windows
    if small:
        _assert_same_arrays(loop_strided_rules(idx, shape, 2, f, s, out_shape), got,
                            "strided")
    in_idx, out_idx, ptr, out_indices = got
    assert in_idx.dtype == out_idx.dtype == np.int32 and len(in_idx) == len(out_idx) == 0
    assert ptr.dtype == np.int64 and ptr.shape == (k_total + 1,) and not ptr.any()
    assert out_indices.dtype == np.int32 and out_indices.shape == (0, len(f) + 1)
    starts = [np.arange(0, n - fi + 1, si, dtype=np.int64) for n, fi, si in zip(shape, f, s)]
    got = rules.window_rules(idx, shape, 2, f, starts, out_shape)
    if small:
        _assert_same_arrays(loop_window_rules(idx, shape, 2, f, starts, out_shape), got,
                            "window")
    assert not got[2].any() and got[2].shape == (k_total + 1,) and len(got[0]) == 0


@pytest.mark.parametrize("shape", [(9,), (6, 7), (5, 3, 4), (3, 4, 2, 3)],
                         ids=lambda s: f"{len(s)}d")
def test_whole_grid_window(rng, shape):
    # A window as large as the grid (legal: one output per batch) sees every site once.
    x = _tensor(rng, shape, batch_size=3, density=0.3, channels=2)
    rb, out_sites = x.grid.strided(x.sites, shape, 1)
    k_total = int(np.prod(shape))
    assert out_sites.spatial_shape == (1,) * len(shape)
    check_structure(rb, k_total)
    batches = np.unique(x.indices[:, 0])
    np.testing.assert_array_equal(out_sites.indices[:, 0], batches)
    assert not out_sites.indices[:, 1:].any()
    sites, triples = brute_strided(x.indices, shape, (1,) * len(shape), (1,) * len(shape))
    assert [tuple(r) for r in out_sites.indices.tolist()] == sites
    assert _triples(rb) == triples
    if kern is sg.cpu:
        _assert_same_arrays(
            loop_strided_rules(x.indices, shape, 3, shape, (1,) * len(shape),
                               (1,) * len(shape)),
            (rb.in_idx, rb.out_idx, rb.offset_ptr, out_sites.indices), shape)
    # max pooling over the whole grid: the per-batch maximum of the features
    y = sg.max_pool(x, filter_size=shape, stride=1)
    feats = np.asarray(x.features)
    expected = np.stack([feats[x.indices[:, 0] == b].max(axis=0) for b in batches])
    np.testing.assert_array_equal(np.asarray(y.features), expected)


def _expected_window_counts(coords, filter_size, out_shape):
    """Per site, the number of windows (o <= x <= o + f - 1, 0 <= o < out) holding it."""
    count = np.ones(len(coords), np.int64)
    for d, (f, n_out) in enumerate(zip(filter_size, out_shape)):
        x = coords[:, d].astype(np.int64)
        low, high = np.maximum(x - f + 1, 0), np.minimum(x, n_out - 1)
        count *= np.maximum(high - low + 1, 0)
    return count


@pytest.mark.parametrize("grid,f", [((64, 64, 64), (64, 64, 64)),
                                    ((64, 64, 64), (60, 57, 64)),
                                    ((40, 40, 40), (33, 30, 35))])
def test_huge_filter_with_stride_1(rng, grid, f):
    # prod(f) kernel offsets and windows, few sites: the rules cost what their pairs cost
    # (the old loop over window combinations took seconds for a 64^3 window).
    idx = random_sites(rng, grid, 2, density=25 / np.prod(grid))
    x = sg.SparseTensor(rng.standard_normal((len(idx), 3)), idx, grid, batch_size=2)
    rb, out_sites = x.grid.strided(x.sites, f, 1)
    k_total = int(np.prod(f))
    out_shape = tuple(n - fi + 1 for n, fi in zip(grid, f))
    assert out_sites.spatial_shape == out_shape
    assert rb.n_offsets == k_total and rb.offset_ptr.shape == (k_total + 1,)
    in_idx, out_idx = np.asarray(rb.in_idx), np.asarray(rb.out_idx)
    ptr = np.asarray(rb.offset_ptr)
    counts = np.diff(ptr)
    assert (counts >= 0).all() and ptr[-1] == len(in_idx) == len(out_idx)
    # geometry of every pair: input = output + delta, delta the pair's offset
    k_of_pair = np.repeat(np.arange(k_total), counts)
    delta = np.stack(np.unravel_index(k_of_pair, f), axis=1)
    fine, coarse = x.indices.astype(np.int64), out_sites.indices.astype(np.int64)
    np.testing.assert_array_equal(fine[in_idx, 0], coarse[out_idx, 0])
    np.testing.assert_array_equal(fine[in_idx, 1:], coarse[out_idx, 1:] + delta)
    # completeness: each site is in as many pairs as windows hold it, each pair once
    np.testing.assert_array_equal(np.bincount(in_idx, minlength=len(idx)),
                                  _expected_window_counts(x.indices[:, 1:], f, out_shape))
    assert len(np.unique(k_of_pair * len(idx) + in_idx)) == len(in_idx)
    assert len(np.unique(k_of_pair * len(out_sites) + out_idx)) == len(in_idx)
    assert set(out_idx.tolist()) == set(range(len(out_sites)))
    assert _lex_sorted(out_sites.indices)
    if kern is sg.cpu:
        # within one offset the pairs are in input-row order
        for k in np.flatnonzero(counts > 1)[:50]:
            assert np.all(np.diff(in_idx[ptr[k]:ptr[k + 1]]) > 0)
    if f == grid:  # one output per batch: max pooling is the per-batch maximum
        y = sg.max_pool(x, filter_size=f, stride=1)
        feats = np.asarray(x.features)
        expected = np.stack([feats[idx[:, 0] == b].max(axis=0) for b in np.unique(idx[:, 0])])
        np.testing.assert_array_equal(np.asarray(y.features), expected)


def test_large_conv_filter_with_stride_1_matches_the_loop_reference(rng, kernel_set):
    rules = kernel_set.module     # the kernel set's rule builders
    grid, f = (24, 24, 24), (12, 12, 12)
    out_shape = tuple(n - fi + 1 for n, fi in zip(grid, f))
    idx = random_sites(rng, grid, 2, density=0.01)
    args = (idx, grid, 2, f, (1, 1, 1), out_shape)
    _assert_same_arrays(loop_strided_rules(*args), rules.strided_rules(*args), "f12")
    x = sg.SparseTensor(rng.standard_normal((len(idx), 2)), idx, grid, batch_size=2)
    w = rng.standard_normal((int(np.prod(f)), 2, 3))
    y = sg.conv(x, w, None, f, 1)
    assert y.features.shape == (len(y.indices), 3) and np.isfinite(y.features).all()
