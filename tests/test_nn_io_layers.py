"""sparsegrid.nn layers at the edges of a network: InputLayer / OutputLayer (SCN
coordinates, all modes, against dict-based merging and SCN's golden outputs), BLInputLayer /
BLOutputLayer, SparseToDense / DenseToSparse, AddCoords, Sparsify / SparsifyFCS, Linear /
Flatten and global pooling.

Deliberate deviation from SCN (docs/differences_from_scn.md): InputLayer validates
coordinates (SCN does not) and sorts its output rows.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref
import sparsegrid as sg
import sparsegrid.nn as scn
from nn_helpers import (SHAPES, bl_batch, by_coordinate, close, dense, golden, scn_rows,
                        sparse, values, w64)


# --------------------------------------------------------------------------------------
# input and output layers
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, name", [(0, "unique"), (1, "first"), (2, "last"), (3, "sum"),
                                        (4, "mean"), ("max", "max"), ("first", "first")])
def test_input_layer_modes_with_scn_coordinates(rng, mode, name):
    coords, feats, batch_first = scn_rows(rng, (6, 5), 3, 40, duplicates=mode != 0)
    layer = scn.InputLayer(2, (6, 5), mode=mode)
    assert layer.mode == name
    x = layer([coords, feats])
    sites, merged, row_site, kept = ref.input_layer(batch_first, feats.astype(np.float64),
                                                    name)
    np.testing.assert_array_equal(x.indices, sites)
    np.testing.assert_allclose(values(x), merged, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(x.get_spatial_locations(),
                                  np.concatenate([sites[:, 1:], sites[:, :1]], axis=1))
    assert x.spatial_shape == (6, 5) and x.batch_size == batch_first[:, 0].max() + 1
    # OutputLayer: every row gets its site's features; with 'first'/'last' only the kept row.
    rows = scn.OutputLayer(2)(x)
    expected = values(x)[row_site]
    if name in ("first", "last"):
        chosen = np.zeros(len(coords), bool)
        chosen[kept] = True
        expected = np.where(chosen[:, None], expected, 0)
    np.testing.assert_array_equal(values(rows), expected)
    if name == "unique":
        np.testing.assert_array_equal(values(rows), feats)    # the round trip restores row order


@pytest.mark.parametrize("mode", range(5))
def test_input_and_output_layer_reproduce_scn(mode):
    g = golden(f"2d_inputlayer_mode{mode}")
    x = scn.InputLayer(2, g["spatial_size"], mode=mode)([g["coords"], g["feats"]])
    ours = by_coordinate(x.get_spatial_locations(), values(x))
    theirs = by_coordinate(g["out_coords"], g["out_feats"])
    assert ours.keys() == theirs.keys()
    for site, value in theirs.items():
        np.testing.assert_allclose(ours[site], value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(values(scn.OutputLayer(2)(x)), g["outputlayer_out"], rtol=1e-5,
                               atol=1e-6)


def test_input_layer_without_batch_column_and_batch_size(rng):
    coords = np.array([[3, 1], [0, 0], [3, 1], [2, 4]])
    feats = np.arange(8, dtype=np.float32).reshape(4, 2)
    x = scn.InputLayer(2, 5)([coords, feats])
    np.testing.assert_array_equal(x.indices, [[0, 0, 0], [0, 2, 4], [0, 3, 1]])
    np.testing.assert_array_equal(values(x), [[2, 3], [6, 7], [0 + 4, 1 + 5]])   # mode 3
    assert x.batch_size == 1
    np.testing.assert_array_equal(x.get_spatial_locations()[:, 2], 0)
    # batch_size is a lower bound (SCN): empty trailing samples are allowed.
    with_batch = np.array([[1, 1, 0], [2, 2, 1]])
    y = scn.InputLayer(2, 5)([with_batch, feats[:2], 4])
    assert y.batch_size == 4
    assert scn.InputLayer(2, 5)([with_batch, feats[:2], 1]).batch_size == 2
    assert scn.InputLayer(2, 5)(scn.InputLayerInput(coords, feats)).n_active == 3
    empty = scn.InputLayer(2, 5)([np.zeros((0, 3), np.int64), np.zeros((0, 2), np.float32), 2])
    assert empty.n_active == 0 and empty.batch_size == 2


def test_input_layer_1d_and_3d():
    coords = np.array([[4, 1], [2, 0], [4, 1]])
    x = scn.InputLayer(1, 6, mode=4)([coords, np.array([[1.0], [2.0], [5.0]], np.float32)])
    np.testing.assert_array_equal(x.indices, [[0, 2], [1, 4]])
    np.testing.assert_array_equal(values(x), [[2.0], [3.0]])
    coords3 = np.array([[1, 2, 3, 0], [0, 0, 0, 1]])
    y = scn.InputLayer(3, (2, 3, 4))([coords3, np.ones((2, 1), np.float32)])
    np.testing.assert_array_equal(y.indices, [[0, 1, 2, 3], [1, 0, 0, 0]])


@pytest.mark.parametrize("coords, error, match", [
    ([[0, 5, 0]], ValueError, r"outside \[0, spatial_shape\[1\] = 5\)"),
    ([[5, 0, 0]], ValueError, r"outside \[0, spatial_shape\[0\] = 5\)"),
    ([[0, -1, 0]], ValueError, "outside"),
    ([[0, 0, -1]], ValueError, "batch index is -1"),
    ([[0, 0, 0, 0]], ValueError, r"\(N, 2\) or \(N, 3\)"),
    ([[0]], ValueError, r"\(N, 2\) or \(N, 3\)"),
    ([[0.0, 1.5, 0.0]], ValueError, r"row 0 has 1.5"),     # whole floats are accepted (SCN)
    ([[True, False, False]], TypeError, "integer"),
])
def test_input_layer_rejects_bad_coordinates(coords, error, match):
    with pytest.raises(error, match=match):
        scn.InputLayer(2, 5)([np.array(coords), np.ones((len(coords), 1), np.float32)])


def test_input_layer_other_errors():
    with pytest.raises(ValueError, match=r"rows 0 and 2 are the same site"):
        scn.InputLayer(2, 5, mode=0)([np.array([[1, 1], [2, 2], [1, 1]]),
                                      np.ones((3, 1), np.float32)])
    with pytest.raises(ValueError, match="mode"):
        scn.InputLayer(2, 5, mode=5)
    with pytest.raises(ValueError, match="mode"):
        scn.InputLayer(2, 5, mode="median")
    with pytest.raises(TypeError, match=r"\[coords, features\]"):
        scn.InputLayer(2, 5)(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="rows"):
        scn.InputLayer(2, 5)([np.array([[1, 1]]), np.ones((2, 1), np.float32)])


def test_output_layer_needs_the_input_layer_sites(rng):
    coords, feats, _ = scn_rows(rng, (8, 8), 2, 20)
    x = scn.InputLayer(2, 8)([coords, feats])
    # Down and back up again: the input layer's sites, so the OutputLayer applies.
    y = scn.Deconvolution(2, 2, 2, 2, 2, False)(scn.Convolution(2, 2, 2, 2, 2, False)(x))
    assert scn.OutputLayer(2)(y).shape == (20, 2)
    with pytest.raises(ValueError, match="InputLayer"):
        scn.OutputLayer(2)(sparse(rng, (8, 8), channels=2))
    with pytest.raises(ValueError):
        scn.OutputLayer(2)(scn.MaxPooling(2, 2, 2)(x))


def test_output_layer_rejects_other_sites_with_the_same_count():
    # Four sites in four different 2x2 cells: the pooled tensor has as many sites as the
    # input but is not on the input's sites; mapping it back row by row would be silently
    # wrong.
    coords = np.array([[0, 0, 0], [2, 3, 0], [5, 1, 0], [7, 7, 0]])
    x = scn.InputLayer(2, 8)([coords, np.ones((4, 1), np.float32)])
    pooled = scn.MaxPooling(2, 2, 2)(x)
    assert pooled.n_active == x.n_active
    with pytest.raises(ValueError, match="InputLayer"):
        scn.OutputLayer(2)(pooled)


def test_input_map_is_nn_state_not_grid_state(rng):
    # The input map lives in sparsegrid.nn (a weak table keyed by the grid), not on Grid.
    coords, feats, _ = scn_rows(rng, (8, 8), 2, 20)
    x = scn.InputLayer(2, 8)([coords, feats])
    assert not hasattr(x.grid, "input_map") and not hasattr(sg.Grid(), "input_map")
    assert not hasattr(x.grid, "input_sites") and not hasattr(x.grid, "bl_layout")
    assert scn.OutputLayer(2)(x).shape == (20, 2)


def _expected_rows(x, coords):
    """Mode 'sum' / 'mean' / 'max': every input row gets its site's features."""
    site = by_coordinate(x.get_spatial_locations(), values(x))
    return np.array([site[tuple(c)] for c in coords.tolist()])


def test_output_layer_finds_its_own_input_layer_when_two_alternate(rng):
    first, second = scn.InputLayer(2, 8, mode="sum"), scn.InputLayer(2, 8, mode="mean")
    conv = scn.SubmanifoldConvolution(2, 2, 3, 3, True)
    out = scn.OutputLayer(2)
    batches = [scn_rows(rng, (8, 8), 2, n)[:2] for n in (20, 13, 7)]
    made = []
    for i, (coords, feats) in enumerate(batches):           # first, second, first
        layer = first if i % 2 == 0 else second
        made.append((layer([coords, feats]), coords))
    for x, coords in reversed(made):                         # used in another order
        y = conv(x)
        rows = out(y)
        assert rows.shape == (len(coords), 3)
        np.testing.assert_array_equal(values(rows), _expected_rows(y, coords))
    # a BLInputLayer in between: OutputLayer applies to its tensor, BLOutputLayer only to it
    bl_coords, bl_feats = bl_batch(rng, shape=(8, 8))
    b = scn.BLInputLayer(2, 8, mode=3)([bl_coords, bl_feats])
    assert scn.BLOutputLayer(2)(b).shape == bl_feats.shape
    assert scn.OutputLayer(2)(b).shape == (int((bl_coords[:, :, 0] >= 0).sum()), 2)
    with pytest.raises(ValueError, match="BLOutputLayer needs a tensor on the sites made by "
                                         "a BLInputLayer"):
        scn.BLOutputLayer(2)(made[0][0])
    np.testing.assert_array_equal(values(out(made[0][0])),
                                  _expected_rows(made[0][0], batches[0][0]))


def test_input_records_live_as_long_as_their_grid(rng):
    import gc
    from sparsegrid.nn import layers
    gc.collect()
    before = len(layers._input_records)
    coords, feats, _ = scn_rows(rng, (8, 8), 2, 20)
    x = scn.InputLayer(2, 8)([coords, feats])
    y = scn.SubmanifoldConvolution(2, 2, 2, 3, False)(x)
    assert len(layers._input_records) == before + 1
    del x
    assert scn.OutputLayer(2)(y).shape == (20, 2)           # y shares (and keeps) the grid
    del y
    gc.collect()
    assert len(layers._input_records) == before


def bl_reference_rows(coords):
    valid = np.flatnonzero(coords[:, :, 0].reshape(-1) >= 0)
    batch = valid // coords.shape[1]
    return valid, np.concatenate([batch[:, None], coords.reshape(-1, coords.shape[2])[valid]],
                                 axis=1)


@pytest.mark.parametrize("mode, name", [(1, "last"), (2, "first"), (3, "sum"), (4, "mean")])
def test_bl_input_and_output_layers(rng, mode, name):
    # BL layers: mode 1 keeps the LAST duplicate, 2 the FIRST (as SCN; the opposite of
    # InputLayer's measured behaviour).
    coords, feats = bl_batch(rng)
    layer = scn.BLInputLayer(2, (5, 6), mode)
    assert layer.mode == name
    x = layer([coords, feats])
    valid, rows = bl_reference_rows(coords)
    flat = feats.reshape(-1, feats.shape[2]).astype(np.float64)
    sites, merged, row_site, kept = ref.input_layer(rows, flat[valid], name)
    assert len(sites) < len(rows)                                # duplicates were merged
    np.testing.assert_array_equal(x.indices, sites)
    np.testing.assert_allclose(values(x), merged, rtol=1e-6, atol=1e-6)
    assert x.batch_size == 3
    out = scn.BLOutputLayer(2)(x)
    assert out.shape == feats.shape
    expected = np.zeros(flat.shape)
    per_row = values(x)[row_site]
    if name in ("first", "last"):
        chosen = np.zeros(len(valid), bool)
        chosen[kept] = True
        per_row = np.where(chosen[:, None], per_row, 0)
    expected[valid] = per_row
    np.testing.assert_allclose(values(out), expected.reshape(feats.shape), rtol=1e-6)
    np.testing.assert_array_equal(values(out)[1], 0)


def test_bl_layers_errors(rng):
    coords, feats = bl_batch(rng)
    with pytest.raises(ValueError, match=r"\(B, L, 2\)"):
        scn.BLInputLayer(2, 5)([coords[:, :, :1], feats])
    with pytest.raises(ValueError, match="features must have shape"):
        scn.BLInputLayer(2, 5)([coords, feats[:, :3]])
    bad = coords.copy()
    bad[0, 0] = (1, -2)                                          # first >= 0: a real row
    with pytest.raises(ValueError, match="outside"):
        scn.BLInputLayer(2, 5)([bad, feats])
    with pytest.raises(ValueError, match="BLInputLayer"):
        scn.BLOutputLayer(2)(sparse(rng, (5, 6), channels=2))


# --------------------------------------------------------------------------------------
# conversions and sparsification
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2, 3])
def test_sparse_to_dense_and_back(rng, d):
    x = sparse(rng, SHAPES[d], channels=3, batch=3, empty=(1,))
    out = scn.SparseToDense(d, 3)(x)
    assert out.shape == (3, 3, *SHAPES[d])
    np.testing.assert_array_equal(values(out), dense(x).astype(np.float32))
    back = scn.DenseToSparse(d)(out)
    order = np.lexsort(x.indices.T[::-1])
    np.testing.assert_array_equal(back.indices, x.indices[order])
    np.testing.assert_array_equal(values(back), x.features[order])
    assert back.spatial_shape == SHAPES[d] and back.batch_size == 3
    with pytest.raises(ValueError, match="expects 4 input channels"):
        scn.SparseToDense(d, 4)(x)
    with pytest.raises(ValueError, match="expects a"):
        scn.DenseToSparse(d + 1)(out)


def test_add_coords(rng):
    x = sparse(rng, (5, 9), channels=2)
    y = scn.AddCoords()(x)
    assert y.sites is x.sites and y.n_channels == 4
    np.testing.assert_array_equal(values(y)[:, :2], x.features)
    expected = np.stack([x.indices[:, 1] / 2 - 1, x.indices[:, 2] / 4 - 1], axis=1)
    close(values(y)[:, 2:], expected, 1e-7)
    corners = sg.SparseTensor(np.ones((2, 1), np.float32), [[0, 0, 0], [0, 4, 8]], (5, 9))
    np.testing.assert_array_equal(values(scn.AddCoords()(corners))[:, 1:],
                                  [[-1, -1], [1, 1]])


@pytest.mark.parametrize("activation", [None, "sigmoid", "fakeGradHardSigmoid"])
def test_sparsify(rng, activation):
    x = sparse(rng, (8, 7), channels=3, batch=2, density=0.5)
    layer = scn.Sparsify(2, 3, activation)
    nin = layer.net if activation is None else layer.net[0]
    nin.bias.data[:] = 0.1
    score = np.asarray(x.features, np.float64) @ w64(nin.weight) + 0.1
    mask = {None: score, "sigmoid": 1 / (1 + np.exp(-score)),
            "fakeGradHardSigmoid": (score > 0).astype(np.float64)}[activation]
    keep = score[:, 0] > 0           # mask > 0.5 (activation) or > 0 (none): the same sites
    assert 0 < keep.sum() < x.n_active
    y = layer(x)
    close(y.mask, mask[:, 0], 1e-6)   # (N,), as SCN
    np.testing.assert_array_equal(y.indices, x.indices[keep])   # relative order kept
    np.testing.assert_array_equal(values(y), x.features[keep])
    assert y.grid is not x.grid and y.spatial_shape == x.spatial_shape
    # The new site set is usable: a submanifold convolution only sees kept neighbours.
    conv = scn.SubmanifoldConvolution(2, 3, 2, 3, False)
    expected = ref.submanifold_conv(dense(y), w64(conv.weight), (3, 3), (1, 1))
    close(conv(y).features, ref.at_sites(expected, y.indices))
    with pytest.raises(ValueError, match="activation"):
        scn.Sparsify(2, 3, "relu")


def test_sparsify_dropping_everything_gives_an_empty_usable_tensor(rng):
    x = sparse(rng, (6, 6), channels=2)
    layer = scn.Sparsify(2, 2)
    layer.net.bias.data[:] = -1e3
    y = layer(x)
    assert y.n_active == 0 and y.mask.shape == (x.n_active,)
    assert scn.SubmanifoldConvolution(2, 2, 3, 3, True)(y).features.shape == (0, 3)


def test_sparsify_fcs(rng):
    x = sparse(rng, SHAPES[3], channels=3)
    y = scn.SparsifyFCS(3)(x)
    keep = x.features[:, 0] > 0
    np.testing.assert_array_equal(y.indices, x.indices[keep])
    np.testing.assert_array_equal(values(y), x.features[keep])
    assert y.grid is not x.grid


# --------------------------------------------------------------------------------------
# dense heads and global pooling
# --------------------------------------------------------------------------------------
def test_linear_and_flatten(rng):
    lin = scn.Linear(6, 3)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    close(lin(x), x.astype(np.float64) @ w64(lin.weight).T + w64(lin.bias))
    s = sparse(rng, (5, 5), channels=6)
    close(lin(s).features, np.asarray(s.features, np.float64) @ w64(lin.weight).T
          + w64(lin.bias))
    assert scn.Linear(6, 3, bias=False).bias is None
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        lin(np.zeros((4, 5), np.float32))
    images = rng.standard_normal((2, 3, 4, 5))
    np.testing.assert_array_equal(scn.Flatten()(images).data, images.reshape(2, 60))


@pytest.mark.parametrize("layer, mode", [(scn.GlobalMaxPooling(), "max"),
                                         (scn.GlobalAveragePooling(), "mean"),
                                         (scn.GlobalSumPooling(), "sum")])
def test_global_pooling(rng, layer, mode):
    x = sparse(rng, SHAPES[2], channels=3, batch=4, empty=(2,))
    close(layer(x), ref.global_pool(np.asarray(x.features, np.float64), x.indices, 4, mode))
