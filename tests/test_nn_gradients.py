"""Gradients of sparsegrid.nn layers and small networks against float64 central finite
differences (check_gradients), with respect to the input features and every parameter.
Network builders' gradients are in test_nn_networks.py."""

from __future__ import annotations

import numpy as np
import pytest

import sparsegrid.nn as scn
from nn_helpers import bl_batch, check_module_gradients, close, scn_rows, sparse, using
from sparsegrid import functional as F
from sparsegrid.autodiff import check_gradients, ops


def test_gradients_small_network(rng):
    scn.manual_seed(0)
    net = scn.Sequential(scn.SubmanifoldConvolution(2, 2, 3, 3, True),
                         scn.BatchNormLeakyReLU(3),
                         scn.Convolution(2, 3, 3, 3, 2, False),
                         scn.BatchNormalization(3, leakiness=0.2),
                         scn.SubmanifoldConvolution(2, 3, 2, 2, True, groups=1),
                         scn.Deconvolution(2, 2, 2, 3, 2, True),
                         scn.AddCoords(),
                         scn.NetworkInNetwork(4, 2, True))
    x = sparse(rng, (7, 7), channels=2, density=0.4)
    # The first convolution's bias feeds a training-mode batch norm, whose mean subtraction
    # removes any per-channel constant: its gradient is exactly zero (and checked to be).
    check_module_gradients(net, x, allow_zero=("0.bias",))


def test_gradients_vgg_plus_block_pooling_and_tables(rng):
    scn.manual_seed(1)
    net = scn.Sequential(scn.ConcatTable(scn.SubmanifoldConvolution(2, 2, 2, 3, False),
                                         scn.Sequential(scn.MaxPooling(2, 3, 2),
                                                        scn.NetworkInNetwork(2, 2, True),
                                                        scn.UnPooling(2, 3, 2))),
                         scn.AddTable(), scn.BatchNormReLU(2),
                         scn.ConcatTable(scn.Identity(), scn.Tanh()),
                         scn.JoinTable(), scn.Sigmoid())
    x = sparse(rng, (7, 7), channels=2, density=0.4)
    check_module_gradients(net, x)


@pytest.mark.parametrize("make", [
    lambda: scn.SparseGroupNorm(2, 4),
    lambda: scn.MeanOnlyBNLeakyReLU(4, leakiness=0.3),
    lambda: scn.Sequential(scn.ShapeContext(2, 4, 2), scn.NetworkInNetwork(16, 2, True)),
    lambda: scn.PermutohedralSubmanifoldConvolution(2, 4, 3, True),
    lambda: scn.Sequential(scn.NetworkInNetwork(4, 4, True), scn.SELU(), scn.ELU(),
                           scn.Tanh(), scn.LeakyReLU()),
    lambda: scn.FullConvolution(2, 4, 2, 2, 2, True),
    # BatchNorm backward in evaluation mode: supported here (SCN raises AssertionError).
    lambda: scn.Sequential(scn.RandomizedStrideConvolution(2, 4, 2, 3, 2, True).eval(),
                           scn.BatchNormReLU(2).eval()),
])
def test_gradients_layers(rng, make):
    x = sparse(rng, (7, 5), channels=4, batch=3, empty=(1,), density=0.4)
    check_module_gradients(make(), x)


def test_gradients_randomized_stride_train(rng):
    layer = scn.RandomizedStrideConvolution(2, 2, 2, 3, 2, True).double()
    x = sparse(rng, (9, 9), channels=2, density=0.4, dtype=np.float64)

    def fn(features, weight, bias):
        with using(layer, [weight, bias]):
            return F.randomized_conv(x.with_features(features), weight, bias, 3, 2,
                                     np.random.default_rng(8)).features

    check_gradients(fn, [x.features, layer.weight.data, layer.bias.data])


def test_gradients_input_output_and_bl_layers(rng):
    coords, feats, _ = scn_rows(rng, (5, 5), 2, 14, channels=2)
    conv = scn.SubmanifoldConvolution(2, 2, 2, 3, True).double()
    for mode in (1, 2, 3, 4):
        layer = scn.InputLayer(2, 5, mode)

        def fn(f, w, b, layer=layer):
            with using(conv, [w, b]):
                return scn.OutputLayer(2)(conv(layer([coords, f])))

        check_gradients(fn, [feats, conv.weight.data, conv.bias.data])
    bl_coords, bl_feats = bl_batch(rng)
    for mode in (1, 3, 4):
        bl = scn.BLInputLayer(2, (5, 6), mode)

        def fn(f, w, b, bl=bl):
            with using(conv, [w, b]):
                return scn.BLOutputLayer(2)(conv(bl([bl_coords, f])))

        check_gradients(fn, [bl_feats, conv.weight.data, conv.bias.data])


def test_gradients_sparse_to_dense_and_linear_head(rng):
    scn.manual_seed(3)
    net = scn.Sequential(scn.SubmanifoldConvolution(2, 2, 2, 3, False), scn.SparseToDense(2, 2),
                         scn.Flatten(), scn.Linear(2 * 16, 3))
    x = sparse(rng, (4, 4), channels=2, density=0.5)
    check_module_gradients(net, x, output=lambda y: y)
    lin = scn.Linear(5, 3).double()

    def dense_head(v, w, b):
        with using(lin, [w, b]):
            return lin(v)

    check_gradients(dense_head, [rng.standard_normal((4, 5)), lin.weight.data, lin.bias.data])


def test_gradients_global_pooling_and_dense_to_sparse(rng):
    x = sparse(rng, (5, 5), channels=3, batch=3, empty=(1,), dtype=np.float64)
    for mode in ("max", "mean", "sum"):
        check_gradients(lambda f, mode=mode: F.global_pool(x.with_features(f), mode),
                        [x.features])
    # Perturbing active entries only: the site set of DenseToSparse stays the same.
    check_gradients(lambda f: scn.DenseToSparse(2)(scn.SparseToDense(2, 3)(
        x.with_features(f))).features, [x.features])


@pytest.mark.parametrize("activation", ["sigmoid", None])
def test_gradients_through_sparsify_mask(rng, activation):
    layer = scn.Sparsify(2, 3, activation).double()
    nin = layer.net if activation is None else layer.net[0]
    x = sparse(rng, (6, 6), channels=3, density=0.5, dtype=np.float64)

    def fn(f, w, b):
        with using(layer, [w, b]):
            y = layer(x.with_features(f))
            kept = ops.reshape(ops.mul(y.features, y.features), (-1,))
            return ops.concatenate([kept, ops.reshape(y.mask, (-1,))], axis=0)

    scores = x.features @ nin.weight.data + nin.bias.data
    assert 0 < (scores > 0).sum() < x.n_active
    check_gradients(fn, [x.features, nin.weight.data, nin.bias.data])


def test_fake_grad_hard_sigmoid_is_straight_through(rng):
    layer = scn.Sparsify(2, 3, "fakeGradHardSigmoid").double()
    x = sparse(rng, (6, 6), channels=3, density=0.5, dtype=np.float64)
    y = layer(x)
    g = rng.standard_normal(y.mask.shape)
    y.mask.backward(g)
    nin = layer.net[0]
    close(nin.weight.grad, x.features.T @ g[:, None], 1e-12)   # d step / d score taken as 1
    close(nin.bias.grad, g.sum(keepdims=True), 1e-12)
