"""sparsegrid.nn convolution, pooling and neighbourhood layers against independent
references.

Every layer runs on random sparse inputs (1-D to 3-D) and is compared with the dense
references of ``reference.py`` (sums of shifted / strided slices of zero-filled NumPy
arrays) or with brute-force loops over a dict of sites; never with the code path under test.
Covers submanifold, strided, transposed and full convolutions, max / average pooling and
unpooling, network-in-network, ShapeContext, permutohedral convolutions and randomized
strides.

Deliberate deviation from SCN (docs/differences_from_scn.md): MaxPooling returns the true
maximum (SCN clamps at 0).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import reference as ref
import sparsegrid as sg
import sparsegrid.nn as scn
from nn_helpers import SHAPES, close, dense, sparse, values, w64
from sparsegrid import functional as F
from sparsegrid.coords import kernel_offsets, permutohedral_basis, permutohedral_offsets


def site_dict(x):
    """{(batch, x1, ..., xD): row}."""
    return {tuple(site): row for row, site in enumerate(x.indices.tolist())}


# --------------------------------------------------------------------------------------
# convolutions
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("f, groups", [(3, 1), (2, 1), (3, 2), ("mixed", 1)])
def test_submanifold_convolution(rng, d, f, groups):
    filter_size = (3, 2, 1)[:d] if f == "mixed" else (f,) * d
    x = sparse(rng, SHAPES[d], channels=4, batch=3, empty=(1,))
    layer = scn.SubmanifoldConvolution(d, 4, 6, filter_size if f == "mixed" else f, True,
                                       groups=groups)
    layer.bias.data[:] = rng.standard_normal(6)
    y = layer(x)
    assert y.sites is x.sites and y.grid is x.grid
    expected = ref.submanifold_conv(dense(x), w64(layer.weight), filter_size, (1,) * d)
    close(y.features, ref.at_sites(expected, x.indices) + w64(layer.bias))
    assert scn.ValidConvolution is scn.SubmanifoldConvolution


def strided_input(rng, d, f, s, out=(4, 3, 3), channels=3, batch=2):
    shape = tuple((o - 1) * s + f for o in out[:d])
    return sparse(rng, shape, channels=channels, batch=batch, density=0.3)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("f, s, groups", [(3, 2, 1), (2, 2, 1), (2, 1, 1), (3, 2, 3)])
def test_convolution(rng, d, f, s, groups):
    x = strided_input(rng, d, f, s, channels=3)
    layer = scn.Convolution(d, 3, 6, f, s, True, groups=groups)
    layer.bias.data[:] = rng.standard_normal(6)
    y = layer(x)
    occupancy = ref.strided_occupancy(ref.occupancy(x.indices, x.batch_size, x.spatial_shape),
                                      (f,) * d, (s,) * d)
    np.testing.assert_array_equal(y.indices, ref.active_sites(occupancy))
    assert y.spatial_shape == occupancy.shape[1:] and y.grid is x.grid
    expected = ref.strided_conv(dense(x), w64(layer.weight), (f,) * d, (s,) * d)
    close(y.features, ref.at_sites(expected, y.indices) + w64(layer.bias))


def test_convolution_size_must_fit(rng):
    x = sparse(rng, (8, 7))
    with pytest.raises(ValueError, match="sizes that fit"):
        scn.Convolution(2, 3, 4, 3, 2, False)(x)
    with pytest.raises(ValueError, match="expects 5 input channels"):
        scn.Convolution(2, 5, 4, 2, 1, False)(x)
    with pytest.raises(ValueError, match="is 3-D"):
        scn.SubmanifoldConvolution(3, 3, 4, 3, False)(x)
    with pytest.raises(TypeError, match="SparseTensor"):
        scn.SubmanifoldConvolution(2, 3, 4, 3, False)(x.features)
    with pytest.raises(ValueError, match="groups"):
        scn.SubmanifoldConvolution(2, 3, 4, 3, False, groups=2)


def test_dtype_mismatch_names_the_cure(rng):
    conv = scn.SubmanifoldConvolution(2, 3, 4, 3, False)
    x = sparse(rng, (5, 5), channels=3, dtype=np.float64)
    with pytest.raises(TypeError, match=r"\.double\(\)"):
        conv(x)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("f, s", [(3, 2), (2, 2)])
def test_deconvolution_after_convolution(rng, d, f, s):
    x = strided_input(rng, d, f, s, channels=3)
    down = scn.Convolution(d, 3, 5, f, s, False)
    up = scn.Deconvolution(d, 5, 2, f, s, True)
    up.bias.data[:] = rng.standard_normal(2)
    y = down(x)
    z = up(y)
    assert z.sites is x.sites and z.grid is x.grid     # the finer tensor's sites and rows
    expected = ref.transposed_conv(dense(y), w64(up.weight), (f,) * d, (s,) * d)
    close(z.features, ref.at_sites(expected, x.indices) + w64(up.bias))


def test_deconvolution_without_matching_convolution_raises(rng):
    x = strided_input(rng, 2, 3, 2)
    with pytest.raises(ValueError, match="no strided op made them"):
        scn.Deconvolution(2, 3, 3, 3, 2, False)(x)
    y = scn.Convolution(2, 3, 3, 3, 2, False)(x)
    with pytest.raises(ValueError, match="filter_size=.3, 3., stride=.2, 2."):
        scn.Deconvolution(2, 3, 3, 2, 2, False)(y)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("f, s", [(2, 2), (3, 1), (3, 2)])
def test_full_convolution(rng, d, f, s):
    x = sparse(rng, (4, 3, 3)[:d], channels=3, density=0.4)
    layer = scn.FullConvolution(d, 3, 4, f, s, True)
    layer.bias.data[:] = rng.standard_normal(4)
    y = layer(x)
    occupancy = ref.transposed_occupancy(ref.occupancy(x.indices, x.batch_size,
                                                       x.spatial_shape), (f,) * d, (s,) * d)
    np.testing.assert_array_equal(y.indices, ref.active_sites(occupancy))
    assert y.grid is not x.grid     # new sites: a new grid, as SCN's new Metadata
    expected = ref.transposed_conv(dense(x), w64(layer.weight), (f,) * d, (s,) * d)
    close(y.features, ref.at_sites(expected, y.indices) + w64(layer.bias))
    assert scn.TransposeConvolution is scn.FullConvolution


# --------------------------------------------------------------------------------------
# pooling and network-in-network
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("f, s", [(3, 2), (2, 2)])
@pytest.mark.parametrize("drop", [0, 1])
def test_max_and_average_pooling(rng, d, f, s, drop):
    x = strided_input(rng, d, f, s, channels=3)
    occ = ref.occupancy(x.indices, x.batch_size, x.spatial_shape)
    y = scn.MaxPooling(d, f, s, drop)(x)
    sites = ref.active_sites(ref.strided_occupancy(occ, (f,) * d, (s,) * d))
    np.testing.assert_array_equal(y.indices, sites)
    # Deliberate deviation: the true maximum of the active inputs (SCN: max(0, that)).
    expected = ref.max_pool(dense(x), occ, (f,) * d, (s,) * d)[:, drop:]
    close(y.features, ref.at_sites(expected, sites))
    a = scn.AveragePooling(d, f, s, drop)(x)
    assert a.sites is y.sites      # one cached rulebook for both (as SCN)
    expected = ref.sum_pool(dense(x), (f,) * d, (s,) * d)[:, drop:] / f ** d   # SCN: / volume
    close(a.features, ref.at_sites(expected, sites))


def test_max_pooling_of_negative_values_is_negative_unlike_scn():
    x = sg.SparseTensor(np.array([[-3.0], [-1.0], [-2.0]], np.float32),
                        np.array([[0, 0, 0], [0, 0, 1], [0, 3, 3]]), (4, 4))
    y = scn.MaxPooling(2, 2, 2)(x)
    np.testing.assert_array_equal(values(y), [[-1.0], [-2.0]])   # SCN would give 0, 0


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("f, s", [(3, 2), (2, 2)])
def test_unpooling_after_pooling(rng, d, f, s):
    x = strided_input(rng, d, f, s, channels=3)
    coarse = scn.MaxPooling(d, f, s)(x)
    fine = scn.UnPooling(d, f, s)(coarse)
    assert fine.sites is x.sites
    # Each fine site receives the sum over its coarse parents (a copy when f == s).
    expected = ref.unpool(dense(coarse), (f,) * d, (s,) * d)
    close(fine.features, ref.at_sites(expected, x.indices))
    dropped = scn.UnPooling(d, f, s, 2)(coarse)
    close(dropped.features, ref.at_sites(expected, x.indices)[:, 2:])


def test_network_in_network(rng):
    x = sparse(rng, SHAPES[3], channels=4)
    layer = scn.NetworkInNetwork(4, 3, True)
    layer.bias.data[:] = rng.standard_normal(3)
    y = layer(x)
    assert y.sites is x.sites
    close(y.features, np.asarray(x.features, np.float64) @ w64(layer.weight) + w64(layer.bias))
    with pytest.raises(ValueError, match="expects 5 input channels"):
        scn.NetworkInNetwork(5, 3)(x)


# --------------------------------------------------------------------------------------
# neighbourhoods: ShapeContext and permutohedral lattices
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("d, f", [(1, 3), (2, 3), (2, (3, 2)), (3, 3)])
def test_shape_context(rng, d, f):
    x = sparse(rng, SHAPES[d], channels=2, density=0.5)
    layer = scn.ShapeContext(d, 2, f)
    filter_size = f if isinstance(f, tuple) else (f,) * d
    k = math.prod(filter_size)
    assert layer.nOut == 2 * k and list(layer.parameters()) == []
    y = layer(x)
    assert y.sites is x.sites and y.n_channels == 2 * k
    sites = site_dict(x)
    # Output block k is the neighbour at offset delta_k - f // 2 (SCN order), or 0.
    offsets = kernel_offsets(filter_size) - np.asarray(filter_size) // 2
    expected = np.zeros((x.n_active, 2 * k))
    for row, (b, *c) in enumerate(x.indices.tolist()):
        for j, off in enumerate(offsets.tolist()):
            other = sites.get((b, *np.add(c, off).tolist()))
            if other is not None:
                expected[row, 2 * j:2 * j + 2] = x.features[other]
    np.testing.assert_array_equal(values(y), expected.astype(np.float32))


@pytest.mark.parametrize("d", [1, 2, 3])
def test_permutohedral_offsets_are_the_lattice_neighbours(d):
    offsets = permutohedral_offsets(d)
    a, a_inv = permutohedral_basis(d)
    assert offsets.shape == (d * d + d + 1, d)
    assert not offsets[0].any()
    assert len({tuple(o) for o in offsets.tolist()}) == len(offsets)
    assert {tuple(o) for o in offsets.tolist()} == {tuple(o) for o in (-offsets).tolist()}
    np.testing.assert_allclose(np.linalg.norm(offsets[1:] @ a, axis=1), 1, atol=1e-12)
    np.testing.assert_allclose(a @ a.T, (np.eye(d) + 1) / 2, atol=1e-12)   # 60 degrees
    np.testing.assert_allclose(a @ a_inv, np.eye(d), atol=1e-12)
    assert scn.permutohedral_basis is permutohedral_basis
    # Weight k belongs to offset k: the order is part of the checkpoint format (SCN's
    # table, first axis fastest; see permutohedral_offsets). 2-D: SCN's kernel uses the
    # centre in slots 0 and 3 and never (0, -1); ours puts (0, -1) in slot 3, every other
    # slot as SCN's (so SCN weights land on SCN's offsets).
    expected = {1: [[0], [-1], [1]],
                2: [[0, 0], [1, -1], [-1, 0], [0, -1], [1, 0], [-1, 1], [0, 1]],
                3: [[0, 0, 0], [0, 0, -1], [1, 0, -1], [0, 1, -1], [0, -1, 0], [1, -1, 0],
                    [-1, 0, 0], [1, 0, 0], [-1, 1, 0], [0, 1, 0], [0, -1, 1], [-1, 0, 1],
                    [0, 0, 1]]}
    if d in expected:
        assert offsets.tolist() == expected[d]


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_permutohedral_submanifold_convolution(rng, d, groups):
    x = sparse(rng, SHAPES[d], channels=4, density=0.5)
    layer = scn.PermutohedralSubmanifoldConvolution(d, 4, 6, True, groups=groups)
    layer.bias.data[:] = rng.standard_normal(6)
    y = layer(x)
    assert y.sites is x.sites
    weight = ref.expand_groups(w64(layer.weight))
    sites = site_dict(x)
    expected = np.tile(w64(layer.bias), (x.n_active, 1))
    for row, (b, *c) in enumerate(x.indices.tolist()):
        for k, off in enumerate(permutohedral_offsets(d).tolist()):
            other = sites.get((b, *np.add(c, off).tolist()))
            if other is not None:
                expected[row] += x.features[other].astype(np.float64) @ weight[k]
    close(y.features, expected)


# --------------------------------------------------------------------------------------
# randomized strides
# --------------------------------------------------------------------------------------
def window_starts(shape, f, s, seed):
    """Per axis, the window starts a seeded randomized op uses: read from the rulebook of
    the same draw on a grid with every site active (the draw depends only on the sizes)."""
    d = len(shape)
    full = np.argwhere(np.ones(shape, bool))
    indices = np.concatenate([np.zeros((len(full), 1), np.int64), full], axis=1)
    probe = sg.SparseTensor(np.zeros((len(full), 1)), indices, shape)
    rulebook, sites = probe.grid.randomized_strided(probe.sites, f, s,
                                                    np.random.default_rng(seed))
    rows_in, rows_out = rulebook.pairs(0)      # offset 0: input = window start
    starts = []
    for axis in range(d):
        out_coord = sites.indices[rows_out, 1 + axis]
        in_coord = probe.indices[rows_in, 1 + axis]
        n_out = sites.spatial_shape[axis]
        start = np.full(n_out, -1)
        start[out_coord] = in_coord
        starts.append(start)
    return starts


def window_reference(x, starts, f, weight=None, pool="conv"):
    """Brute force over windows: {output site: value} of a conv (weight (K, Cin, Cout)),
    max pooling or the list of (input row, output site, offset) memberships."""
    d = x.dimension
    memberships = []
    for row, (b, *c) in enumerate(x.indices.tolist()):
        choices = []
        for axis in range(d):
            choices.append([(o, c[axis] - st) for o, st in enumerate(starts[axis])
                            if 0 <= c[axis] - st < f])
        for combo in np.ndindex(*[len(ch) for ch in choices]):
            out = tuple(choices[a][j][0] for a, j in enumerate(combo))
            taps = [choices[a][j][1] for a, j in enumerate(combo)]
            k = int(np.ravel_multi_index(taps, (f,) * d))
            memberships.append((row, (b, *out), k))
    return memberships


def check_starts(starts, in_shape, f, s):
    for start, size in zip(starts, in_shape):
        steps = np.diff(start)
        assert start[0] == 0 and start[-1] == size - f
        assert set(steps.tolist()) <= {s - 1, s, s + 1}
        third = len(steps) // 3
        assert (steps == s - 1).sum() == third and (steps == s + 1).sum() == third


@pytest.mark.parametrize("d, out_shape, f, s", [(1, (10,), 3, 2), (2, (7, 5), 3, 2),
                                               (2, (6, 7), 4, 3), (3, (4, 4, 5), 3, 2)])
def test_randomized_stride_convolution_train(rng, d, out_shape, f, s):
    in_shape = tuple((o - 1) * s + f for o in out_shape)
    x = sparse(rng, in_shape, channels=3, density=0.35)
    layer = scn.RandomizedStrideConvolution(d, 3, 4, f, s, True)
    layer.bias.data[:] = rng.standard_normal(4)
    scn.manual_seed(11)
    y = layer(x)
    starts = window_starts(in_shape, f, s, 11)
    check_starts(starts, in_shape, f, s)
    members = window_reference(x, starts, f)
    assert {row for row, _, _ in members} == set(range(x.n_active))   # f > s: all covered
    out_sites = sorted({site for _, site, _ in members})
    np.testing.assert_array_equal(y.indices, np.array(out_sites).reshape(-1, d + 1))
    assert y.spatial_shape == out_shape
    assert (y.indices[:, 1:] < np.array(out_shape)).all() and (y.indices >= 0).all()
    position = {site: i for i, site in enumerate(out_sites)}
    weight = w64(layer.weight)
    expected = np.tile(w64(layer.bias), (len(out_sites), 1))
    for row, site, k in members:
        expected[position[site]] += x.features[row].astype(np.float64) @ weight[k]
    close(y.features, expected)
    # The rulebook: every pair is one membership; unique inputs and outputs per offset.
    rulebook, sites = x.grid.randomized_strided(x.sites, f, s, np.random.default_rng(11))
    np.testing.assert_array_equal(sites.indices, y.indices)
    pairs = set()
    for k in range(rulebook.n_offsets):
        rows_in, rows_out = rulebook.pairs(k)
        assert len(set(rows_in.tolist())) == len(rows_in)
        assert len(set(rows_out.tolist())) == len(rows_out)
        pairs |= {(i, tuple(sites.indices[o]), k) for i, o in zip(rows_in.tolist(),
                                                                   rows_out.tolist())}
    assert pairs == set(members)
    # A Deconvolution goes back through the same windows, onto the input's sites.
    up = scn.Deconvolution(d, 4, 2, f, s, False)
    z = up(y)
    assert z.sites is x.sites
    back = np.zeros((x.n_active, 2))
    for row, site, k in members:
        back[row] += values(y)[position[site]] @ w64(up.weight)[k]
    close(z.features, back)


def test_randomized_stride_deconvolution_is_the_exact_adjoint(rng):
    x = sparse(rng, (13, 11), channels=3, dtype=np.float64, density=0.4)
    w = rng.standard_normal((9, 3, 4))
    y = F.randomized_conv(x, w, None, 3, 2, np.random.default_rng(3))
    g = rng.standard_normal((y.n_active, 4))
    back = F.deconv(y.with_features(g), np.ascontiguousarray(w.transpose(0, 2, 1)), None, 3, 2)
    np.testing.assert_allclose(np.sum(y.features * g), np.sum(x.features * back.features),
                               rtol=1e-12)


def test_randomized_stride_draws_differ_and_eval_is_plain(rng):
    x = sparse(rng, (15, 15), channels=2, density=0.3)
    layer = scn.RandomizedStrideConvolution(2, 2, 3, 3, 2, False)
    starts = [window_starts((15, 15), 3, 2, seed) for seed in range(4)]
    assert any(not np.array_equal(starts[0][0], other[0]) for other in starts[1:])
    outputs = []
    for seed in (0, 1):
        scn.manual_seed(seed)
        outputs.append(layer(x))
    assert not (np.array_equal(outputs[0].indices, outputs[1].indices)
                and np.array_equal(outputs[0].features, outputs[1].features))
    layer.eval()
    plain = F.conv(x, layer.weight.data, None, 3, 2)
    y = layer(x)
    assert y.sites is plain.sites
    np.testing.assert_array_equal(values(y), plain.features)
    pool = scn.RandomizedStrideMaxPooling(2, 3, 2).eval()
    np.testing.assert_array_equal(values(pool(x)), F.max_pool(x, 3, 2).features)


@pytest.mark.parametrize("d, out_shape", [(1, (9,)), (2, (6, 7)), (3, (4, 5, 4))])
def test_randomized_stride_max_pooling_train(rng, d, out_shape):
    f, s = 3, 2
    in_shape = tuple((o - 1) * s + f for o in out_shape)
    x = sparse(rng, in_shape, channels=3, density=0.35)
    layer = scn.RandomizedStrideMaxPooling(d, f, s)
    scn.manual_seed(4)
    y = layer(x)
    starts = window_starts(in_shape, f, s, 4)
    check_starts(starts, in_shape, f, s)
    members = window_reference(x, starts, f)
    assert {row for row, _, _ in members} == set(range(x.n_active))
    out_sites = sorted({site for _, site, _ in members})
    np.testing.assert_array_equal(y.indices, np.array(out_sites).reshape(-1, d + 1))
    position = {site: i for i, site in enumerate(out_sites)}
    expected = np.full((len(out_sites), 3), -np.inf)
    for row, site, _ in members:
        expected[position[site]] = np.maximum(expected[position[site]], x.features[row])
    close(y.features, expected)
    # UnPooling sends each coarse value back to every input of its window.
    fine = scn.UnPooling(d, f, s)(y)
    assert fine.sites is x.sites
    back = np.zeros((x.n_active, 3))
    for row, site, _ in members:
        back[row] += values(y)[position[site]]
    close(fine.features, back)


def test_randomized_stride_with_filter_not_larger_than_stride_is_not_randomised(rng):
    # Steps of s + 1 between windows of size f <= s would leave inputs in no window, so
    # such filters keep the plain windows (as strides of 1 do).
    x = sparse(rng, (12, 12), channels=2, density=0.4)
    scn.manual_seed(0)
    y = scn.RandomizedStrideMaxPooling(2, 2, 2)(x)
    plain = F.max_pool(x, 2, 2)
    np.testing.assert_array_equal(y.indices, plain.indices)
    np.testing.assert_array_equal(values(y), plain.features)
