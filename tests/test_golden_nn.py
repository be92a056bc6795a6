"""Every SCN golden file reproduced through ``sparsegrid.nn`` layers and autodiff.

test_golden_scn.py checks the functional ops and backward kernels against the files; this
file runs what an SCN user writes instead: ``scn.InputLayer`` fed SCN's batch-LAST
coordinates, the SCN-named layer with SCN-layout weights loaded by ``load_state_dict``
(convolutions take SCN's (K, G, Cin/G, Cout/G)), ``.features.backward(grad_out)``, and the
gradients read from the leaves: the input features (in the file's row order, because the
InputLayer's backward returns them per input row) and ``layer.weight.grad`` /
``layer.bias.grad``. Outputs are matched by coordinate through
``get_spatial_locations()`` (SCN's form). Tolerances and deliberate deviations are those of
test_golden_scn.py, whose helpers this file reuses.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import sparsegrid.nn as scn
from sparsegrid.autodiff import Tensor

from test_golden_scn import (BN_TOL, GOLDEN_FILES, Golden, assert_close, golden_windows,
                             match_sites, to_ours)


def leaf(values):
    return Tensor(np.ascontiguousarray(values), requires_grad=True)


def scn_input(g, coords_key="in_coords", feats_key="in_feats", spatial=None, mode=0):
    """SCN's way in: InputLayer([coords with batch last, features]); returns (tensor, leaf)."""
    coords = g[coords_key]
    if spatial is None:
        spatial = coords[:, :-1].max(axis=0) + 1
    features = leaf(g[feats_key])
    return scn.InputLayer(2, spatial, mode=mode)([coords, features]), features


def by_coordinate(out, g, key="out_coords"):
    """Golden row of each of our output rows (coordinates compared in SCN's form)."""
    ours = out.get_spatial_locations()
    assert ours.dtype == np.int64 and ours.shape[1] == 3
    return match_sites(to_ours(ours), g[key], g.name)


def load(layer, weight=None, bias=None):
    state = {}
    if weight is not None:
        state["weight"] = weight
    if bias is not None:
        state["bias"] = bias
    layer.load_state_dict(state)
    return layer


def check_conv_grads(g, layer, features_leaf, expected_rows=None):
    grad_in = features_leaf.grad
    expected = g["grad_in"] if expected_rows is None else g["grad_in"][expected_rows]
    assert_close(grad_in, expected, f"{g.name}: grad w.r.t. input features")
    expected_w = g["grad_weight_scn"]
    ours_w = layer.weight.grad
    assert_close(ours_w.reshape(expected_w.shape), expected_w, f"{g.name}: grad weight")
    assert_close(layer.bias.grad, g["grad_bias"], f"{g.name}: grad bias")


def run_conv_layer(g, layer, x, features_leaf, expected_rows=None):
    load(layer, g["weight_scn"], g["bias"])
    out = layer(x)
    p = by_coordinate(out, g)
    assert tuple(out.spatial_size) == g.ints("spatial_size_out")
    assert_close(out.features.data, g["out_feats"][p], f"{g.name}: output features")
    out.features.backward(g["grad_out"][p])
    check_conv_grads(g, layer, features_leaf, expected_rows)


def case_submanifold(g):
    f = g.ints("filter_size")
    weight = g["weight_scn"]
    k, groups, cin_g, cout_g = weight.shape
    x, features = scn_input(g, spatial=g["spatial_size_in"])
    layer = scn.SubmanifoldConvolution(2, cin_g * groups, cout_g * groups, f, True, groups)
    g.ignore("weight_kio", "SCN layout loaded instead (test_golden_scn covers both)")
    g.ignore("grad_weight_kio", "compared in SCN's layout")
    g.ignore("kernel_offsets", "geometry checked in test_golden_scn")
    g.ignore("stride", "submanifold")
    g.ignore("groups", "read from the weight's shape")
    run_conv_layer(g, layer, x, features)


def case_strided(g, layer_class):
    f, s = g.ints("filter_size"), g.ints("stride")
    weight = g["weight_scn"]
    x, features = scn_input(g, spatial=g["spatial_size_in"])
    layer = layer_class(2, weight.shape[2], weight.shape[3], f, s, True)
    for key in ("weight_kio", "grad_weight_kio", "kernel_offsets", "groups"):
        g.ignore(key, "covered in test_golden_scn")
    run_conv_layer(g, layer, x, features)


def coarse_through_nn(g, down):
    """Deviation 3 of test_golden_scn: the coarse input comes from the matching strided
    layer on the finer sites; its features are then replaced as SCN users do
    (``x.features = ...``) by the golden ones, placed by coordinate."""
    fine_coords = g["out_coords"]
    fine = scn.InputLayer(2, g["spatial_size_out"], mode=0)(
        [fine_coords, np.zeros((len(fine_coords), 1), np.float32)])
    coarse = down(fine)
    assert tuple(coarse.spatial_size) == g.ints("spatial_size_in")
    p = by_coordinate(coarse, g, key="in_coords")
    features = leaf(g["in_feats"][p])
    coarse.features = features
    return coarse, features, p


def case_deconv(g):
    f, s = g.ints("filter_size"), g.ints("stride")
    weight = g["weight_scn"]
    down = scn.Convolution(2, 1, weight.shape[2], f, s, False)
    coarse, features, p = coarse_through_nn(g, down)
    layer = scn.Deconvolution(2, weight.shape[2], weight.shape[3], f, s, True)
    for key in ("weight_kio", "grad_weight_kio", "kernel_offsets", "groups"):
        g.ignore(key, "covered in test_golden_scn")
    run_conv_layer(g, layer, coarse, features, expected_rows=p)


def case_pool(g, layer_class):
    f, s = g.ints("filter_size"), g.ints("stride")
    g.ignore("kernel_offsets", "geometry checked in test_golden_scn")
    g.ignore("groups", "pooling has no groups")
    x, features = scn_input(g, spatial=g["spatial_size_in"])
    out = layer_class(2, f, s)(x)
    assert tuple(out.spatial_size) == g.ints("spatial_size_out")
    p = by_coordinate(out, g)
    if layer_class is scn.MaxPooling:
        return check_maxpool(g, out, features, p, s)
    assert_close(out.features.data, g["out_feats"][p], f"{g.name}: output features")
    out.features.backward(g["grad_out"][p])
    assert_close(features.grad, g["grad_in"], f"{g.name}: grad w.r.t. input features")


def check_maxpool(g, out, features, p, s):
    """Deviation 1: ours is the true maximum, SCN max(0, true max); gradients compared
    where every window of an input entry is positive with a unique arg-max."""
    golden = g["out_feats"][p]
    ours = out.features.data
    positive = golden > 0
    np.testing.assert_array_equal(ours[positive], golden[positive])
    assert (ours[~positive] <= 0).all()
    out.features.backward(g["grad_out"][p])
    windows = golden_windows(g, s)
    present = windows >= 0
    values = np.where(present[:, :, None], g["in_feats"][np.maximum(windows, 0)], -np.inf)
    true_max = values.max(axis=1)
    good = (true_max > 0) & ((values == true_max[:, None, :]).sum(axis=1) == 1)
    comparable = np.ones(g["in_feats"].shape, bool)
    for k in range(windows.shape[1]):
        np.logical_and.at(comparable, windows[present[:, k], k], good[present[:, k]])
    assert comparable.mean() > 0.5
    assert_close(features.grad[comparable], g["grad_in"][comparable],
                 f"{g.name}: grad w.r.t. input features (comparable entries)")


def case_unpool(g):
    f, s = g.ints("filter_size"), g.ints("stride")
    g.ignore("kernel_offsets", "geometry checked in test_golden_scn")
    g.ignore("groups", "pooling has no groups")
    coarse, features, p_in = coarse_through_nn(g, scn.AveragePooling(2, f, s))
    out = scn.UnPooling(2, f, s)(coarse)
    assert tuple(out.spatial_size) == g.ints("spatial_size_out")
    p = by_coordinate(out, g)
    assert_close(out.features.data, g["out_feats"][p], f"{g.name}: output features")
    out.features.backward(g["grad_out"][p])
    assert_close(features.grad, g["grad_in"][p_in], f"{g.name}: grad w.r.t. input features")


def case_inputlayer(g):
    mode = int(re.search(r"mode(\d)$", g.name).group(1))
    features = leaf(g["feats"])
    x = scn.InputLayer(2, g["spatial_size"], mode=mode)([g["coords"], features])
    p = by_coordinate(x, g)
    assert_close(x.features.data, g["out_feats"][p], f"{g.name}: merged features")
    x.features.backward(g["grad_out"][p])
    assert_close(features.grad, g["grad_in"], f"{g.name}: grad w.r.t. input rows")
    # OutputLayer on the input layer's sites, from a fresh leaf.
    site_features = leaf(x.features.data)
    x.features = site_features
    rows = scn.OutputLayer(2)(x)
    assert_close(rows.data, g["outputlayer_out"], f"{g.name}: OutputLayer forward")
    rows.backward(g["outputlayer_grad_out"])
    assert_close(site_features.grad, g["outputlayer_grad_in"][p],
                 f"{g.name}: OutputLayer backward")


def case_batchnorm(g):
    training = bool(g["train"])
    eps, momentum, leakiness = float(g["eps"]), float(g["momentum"]), float(g["leakiness"])
    channels = g["in_feats"].shape[1]
    layer = scn.BatchNormalization(channels, eps, momentum, True, leakiness)
    layer.load_state_dict({"weight": g["weight"], "bias": g["bias"],
                           "running_mean": g["running_mean_before"],
                           "running_var": g["running_var_before"]})
    layer.train(training)
    x, features = scn_input(g)
    q = match_sites(x.indices, g["in_coords"], "input")
    out = layer(x)
    assert_close(out.features.data, g["out_feats"][q], f"{g.name}: output", rtol=BN_TOL,
                 atol=BN_TOL)
    state = layer.state_dict()
    for key in ("running_mean", "running_var"):
        assert_close(state[key], g[f"{key}_after"], f"{g.name}: {key} after")
        if not training:
            np.testing.assert_array_equal(state[key], g[f"{key}_before"])
    out.features.backward(g["grad_out"][q])
    if training:
        assert_close(features.grad, g["grad_in"], f"{g.name}: grad w.r.t. input features")
        assert_close(layer.weight.grad, g["grad_weight"], f"{g.name}: grad weight")
        assert_close(layer.bias.grad, g["grad_bias"], f"{g.name}: grad bias")
    else:  # deviation 4: SCN cannot backpropagate in eval mode; closed form instead
        scale = g["weight"] / np.sqrt(g["running_var_before"].astype(np.float64) + eps)
        y = (g["in_feats"] - g["running_mean_before"]) * scale + g["bias"]
        slope = np.where(y > 0, 1.0, leakiness)
        assert_close(features.grad, g["grad_out"] * slope * scale,
                     f"{g.name}: eval grad w.r.t. input")


def case_networkinnetwork(g):
    weight = g["weight"]
    layer = load(scn.NetworkInNetwork(weight.shape[0], weight.shape[1], True), weight,
                 g["bias"])
    x, features = scn_input(g)
    q = match_sites(x.indices, g["in_coords"], "input")
    out = layer(x)
    assert_close(out.features.data, g["out_feats"][q], f"{g.name}: output")
    out.features.backward(g["grad_out"][q])
    assert_close(features.grad, g["grad_in"], f"{g.name}: grad w.r.t. input features")
    assert_close(layer.weight.grad, g["grad_weight"], f"{g.name}: grad weight")
    assert_close(layer.bias.grad, g["grad_bias"], f"{g.name}: grad bias")


def case_sparsetodense(g):
    x, features = scn_input(g, spatial=g["spatial_size"])
    dense = scn.SparseToDense(2, features.shape[1])(x)
    np.testing.assert_array_equal(dense.data, g["out_dense"])
    dense.backward(g["grad_out"])
    np.testing.assert_array_equal(features.grad, g["grad_in"])


HANDLERS = [
    (r"2d_inputlayer_mode[0-4]", case_inputlayer),
    (r"2d_subm_.*", case_submanifold),
    (r"2d_conv_f\d_s\d", lambda g: case_strided(g, scn.Convolution)),
    (r"2d_fullconv_f\d_s\d", lambda g: case_strided(g, scn.FullConvolution)),
    (r"2d_deconv_f\d_s\d", case_deconv),
    (r"2d_maxpool_f\d_s\d", lambda g: case_pool(g, scn.MaxPooling)),
    (r"2d_avgpool_f\d_s\d", lambda g: case_pool(g, scn.AveragePooling)),
    (r"2d_unpool_f\d_s\d", case_unpool),
    (r"2d_(bn|bnrelu|bnleaky)_(train|eval)", case_batchnorm),
    (r"2d_sparsetodense", case_sparsetodense),
    (r"2d_networkinnetwork", case_networkinnetwork),
]


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=[p.stem for p in GOLDEN_FILES])
def test_golden_through_nn(path):
    found = [h for pattern, h in HANDLERS if re.fullmatch(pattern, path.stem)]
    assert len(found) == 1, f"no single nn case handles {path.name}"
    g = Golden(path)
    found[0](g)
    assert not g.unread(), f"{path.name}: keys not checked: {g.unread()}"
