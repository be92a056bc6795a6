"""sparsegrid.nn layers are initialised as SCN's: weight shapes, dtypes and the
distributions of convolution, network-in-network, permutohedral, normalisation and linear
layers."""

from __future__ import annotations

import math

import numpy as np
import pytest

import sparsegrid.nn as scn


def assert_normal(values, std, rel=0.03):
    values = np.asarray(values, np.float64).reshape(-1)
    assert abs(values.mean()) < 4 * std / math.sqrt(values.size)
    assert abs(values.std() / std - 1) < rel, (values.std(), std)


@pytest.mark.parametrize("cls, args, groups", [
    (scn.SubmanifoldConvolution, (3, 64, 48, 3, True), 1),
    (scn.SubmanifoldConvolution, (3, 64, 48, 3, True), 4),
    (scn.Convolution, (2, 96, 64, 4, 2, True), 1),
    (scn.Deconvolution, (2, 96, 64, 3, 2, True), 2),
    (scn.FullConvolution, (3, 32, 64, 2, 2, True), 1),
    (scn.RandomizedStrideConvolution, (2, 64, 64, 3, 2, True), 1),
])
def test_convolution_init(cls, args, groups):
    scn.manual_seed(0)
    layer = cls(*args, groups=groups)
    dimension, n_in, n_out, f = args[:4]
    k = f ** dimension
    expected_shape = (k, n_in, n_out) if groups == 1 else (k, groups, n_in // groups,
                                                           n_out // groups)
    assert layer.weight.shape == expected_shape and layer.weight.dtype == np.float32
    assert_normal(layer.weight.data, math.sqrt(2.0 * groups / (n_in * k)))
    np.testing.assert_array_equal(layer.bias.data, np.zeros(n_out, np.float32))


def test_no_bias_means_no_bias_parameter():
    layer = scn.SubmanifoldConvolution(2, 3, 4, 3, False)
    assert layer.bias is None and [n for n, _ in layer.named_parameters()] == ["weight"]


def test_network_in_network_and_permutohedral_init():
    scn.manual_seed(0)
    nin = scn.NetworkInNetwork(256, 128, True)
    assert nin.weight.shape == (256, 128)
    assert_normal(nin.weight.data, math.sqrt(2 / 256))
    np.testing.assert_array_equal(nin.bias.data, 0)
    assert scn.NetworkInNetwork(3, 4).bias is None          # SCN's default: no bias
    # SCN's PermutohedralSubmanifoldConvolution: std sqrt(2 / (nIn * K)) with no groups
    # factor, K = d^2 + d + 1.
    for groups in (1, 4):
        perm = scn.PermutohedralSubmanifoldConvolution(3, 128, 128, False, groups=groups)
        assert perm.weight.shape[0] == 13
        assert_normal(perm.weight.data, math.sqrt(2 / (128 * 13)))


def test_norm_layer_init():
    for bn in (scn.BatchNormalization(5), scn.BatchNormReLU(5), scn.BatchNormLeakyReLU(5)):
        np.testing.assert_array_equal(bn.weight.data, np.ones(5, np.float32))
        np.testing.assert_array_equal(bn.bias.data, np.zeros(5, np.float32))
        np.testing.assert_array_equal(bn.running_mean, np.zeros(5, np.float32))
        np.testing.assert_array_equal(bn.running_var, np.ones(5, np.float32))
        assert bn.eps == 1e-4 and bn.momentum == 0.99
    assert scn.BatchNormalization(5).leakiness == 1
    assert scn.BatchNormReLU(5).leakiness == 0
    assert scn.BatchNormLeakyReLU(5).leakiness == 0.333
    assert scn.BatchNormalization(5, affine=False).weight is None
    only = scn.MeanOnlyBNLeakyReLU(4)
    assert list(only.state_dict()) == ["bias", "running_mean"]
    gn = scn.SparseGroupNorm(2, 6)
    np.testing.assert_array_equal(gn.weight.data, 1)
    np.testing.assert_array_equal(gn.bias.data, 0)


def test_linear_init_is_pytorch_uniform():
    scn.manual_seed(0)
    lin = scn.Linear(400, 300)
    bound = 1 / math.sqrt(400)
    assert lin.weight.shape == (300, 400) and lin.bias.shape == (300,)   # torch's layout
    assert np.abs(lin.weight.data).max() <= bound and np.abs(lin.bias.data).max() <= bound
    # uniform on [-b, b]: std b / sqrt(3)
    assert abs(lin.weight.data.std() / (bound / math.sqrt(3)) - 1) < 0.02
