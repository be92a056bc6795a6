"""sparsegrid.nn normalisation, activation and dropout layers against direct NumPy
formulas.

Deliberate deviations from SCN (docs/differences_from_scn.md): Dropout is inverted (SCN
scales by 1 - p in evaluation); MeanOnlyBNLeakyReLU differentiates through the batch mean
(SCN detaches it); BatchNorm running variance from one site uses the biased variance (SCN
divides by 0).
"""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref
import sparsegrid as sg
import sparsegrid.nn as scn
from nn_helpers import SHAPES, close, sparse, values, w64
from sparsegrid.autodiff import Tensor


def leaky(y, leakiness):
    return np.where(y > 0, y, leakiness * y)


# --------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, leakiness", [
    (lambda: scn.BatchNormalization(4), 1.0),
    (lambda: scn.BatchNormReLU(4), 0.0),
    (lambda: scn.BatchNormLeakyReLU(4), 0.333),
    (lambda: scn.BatchNormLeakyReLU(4, leakiness=0.1), 0.1),
    (lambda: scn.BatchNormalization(4, leakiness=0.2, momentum=0.9, eps=1e-3), 0.2),
])
def test_batch_norm_train_and_eval(rng, make, leakiness):
    bn = make()
    bn.weight.data[:] = rng.uniform(0.5, 2, 4)
    bn.bias.data[:] = rng.standard_normal(4)
    x = sparse(rng, SHAPES[2], channels=4, batch=3)
    x = x.with_features((x.features * 3 + 1).astype(np.float32))
    f = np.asarray(x.features, np.float64)
    mean, var = f.mean(axis=0), f.var(axis=0)
    y = bn(x)
    assert y.sites is x.sites
    expected = ref.batch_norm(f, w64(bn.weight), w64(bn.bias), mean, var, bn.eps, leakiness)
    close(y.features, expected)
    # SCN's convention: running = momentum * running + (1 - momentum) * batch statistic,
    # the running variance unbiased.
    m = bn.momentum
    close(bn.running_mean, (1 - m) * mean, 1e-6)
    close(bn.running_var, m + (1 - m) * f.var(axis=0, ddof=1), 1e-6)
    bn(x)
    close(bn.running_mean, (1 - m) * mean * (1 + m), 1e-6)
    bn.eval()
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    y = bn(x)
    expected = ref.batch_norm(f, w64(bn.weight), w64(bn.bias), rm, rv, bn.eps, leakiness)
    close(y.features, expected)
    np.testing.assert_array_equal(bn.running_mean, rm)    # eval leaves the statistics alone


def test_batch_norm_edge_cases():
    bn = scn.BatchNormalization(2)
    empty = sg.SparseTensor(np.zeros((0, 2), np.float32), np.zeros((0, 3), np.int32), (4, 4), 1)
    assert bn(empty).n_active == 0
    np.testing.assert_array_equal(bn.running_mean, 0)
    # One site: deliberate deviation, the update uses the biased variance 0 (SCN: 0 / 0).
    one = sg.SparseTensor(np.array([[2.0, -4.0]], np.float32), np.array([[0, 1, 1]]), (4, 4))
    close(bn(one).features, [[0.0, 0.0]])
    close(bn.running_mean, [0.02, -0.04], 1e-6)
    close(bn.running_var, [0.99, 0.99], 1e-6)
    with pytest.raises(ValueError, match="expects 3 input channels"):
        scn.BatchNormalization(3)(one)


def test_batch_norm_elu(rng):
    seq = scn.BatchNormELU(3)
    assert isinstance(seq, scn.Sequential) and len(seq) == 2
    assert isinstance(seq[0], scn.BatchNormalization) and isinstance(seq[1], scn.ELU)
    assert seq[0].momentum == 0.9 and seq[0].leakiness == 1
    x = sparse(rng, SHAPES[2], channels=3)
    f = np.asarray(x.features, np.float64)
    y = seq(x)
    normed = (f - f.mean(0)) / np.sqrt(f.var(0) + 1e-4)
    close(y.features, np.where(normed > 0, normed, np.expm1(normed)))
    close(seq[0].running_mean, 0.1 * f.mean(0), 1e-6)


@pytest.mark.parametrize("leakiness", [1, 0.2, 0])
def test_mean_only_bn_leaky_relu(rng, leakiness):
    layer = scn.MeanOnlyBNLeakyReLU(3, leakiness=leakiness)
    layer.bias.data[:] = rng.standard_normal(3)
    x = sparse(rng, SHAPES[2], channels=3)
    f = np.asarray(x.features, np.float64)
    y = layer(x)
    close(y.features, leaky(f - f.mean(0) + w64(layer.bias), leakiness))
    close(layer.running_mean, 0.01 * f.mean(0), 1e-6)
    layer.eval()
    y = layer(x)
    close(y.features, leaky(f - 0.01 * f.mean(0) + w64(layer.bias), leakiness))
    no_bias = scn.MeanOnlyBNLeakyReLU(3, affine=False)
    assert no_bias.bias is None
    close(no_bias(x).features, f - f.mean(0))


def test_mean_only_bn_differentiates_the_mean_unlike_scn(rng):
    # Deliberate deviation: SCN computes the mean under no_grad (gradient G); here the
    # batch mean is part of the graph, so d sum(out * G) / dx = G - mean_rows(G).
    x = sparse(rng, SHAPES[2], channels=3, dtype=np.float64)
    layer = scn.MeanOnlyBNLeakyReLU(3).double()
    features = Tensor(x.features, requires_grad=True)
    out = layer(x.with_features(features)).features
    g = rng.standard_normal(out.shape)
    out.backward(g)
    close(features.grad, g - g.mean(axis=0), 1e-12)
    close(layer.bias.grad, g.sum(axis=0), 1e-12)


@pytest.mark.parametrize("groups, channels", [(2, 6), (1, 4), (4, 4)])
def test_sparse_group_norm(rng, groups, channels):
    x = sparse(rng, SHAPES[2], channels=channels, batch=4, empty=(2,))
    x = x.with_features((x.features * 2 + rng.standard_normal(channels)).astype(np.float32))
    layer = scn.SparseGroupNorm(groups, channels)
    layer.weight.data[:] = rng.uniform(0.5, 2, channels)
    layer.bias.data[:] = rng.standard_normal(channels)
    y = layer(x)
    assert y.sites is x.sites
    f = np.asarray(x.features, np.float64)
    expected = np.zeros_like(f)
    per = channels // groups
    for b in range(x.batch_size):
        rows = np.flatnonzero(x.indices[:, 0] == b)
        for g in range(groups if len(rows) else 0):
            cols = slice(g * per, (g + 1) * per)
            block = f[rows, cols]
            expected[rows, cols] = (block - block.mean()) / np.sqrt(block.var() + 1e-5)
    close(y.features, expected * w64(layer.weight) + w64(layer.bias))
    with pytest.raises(ValueError, match="must divide"):
        scn.SparseGroupNorm(4, 6)


# --------------------------------------------------------------------------------------
# activations and dropout
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer, formula", [
    (scn.Sigmoid(), lambda v: 1 / (1 + np.exp(-v))),
    (scn.Tanh(), np.tanh),
    (scn.ReLU(), lambda v: np.maximum(v, 0)),
    (scn.ELU(), lambda v: np.where(v > 0, v, np.exp(v) - 1)),
    (scn.SELU(), lambda v: 1.0507009873554805 * np.where(v > 0, v, 1.6732632423543772
                                                          * (np.exp(v) - 1))),
    (scn.LeakyReLU(), lambda v: np.where(v > 0, v, v / 3)),
    (scn.LeakyReLU(0.05), lambda v: np.where(v > 0, v, 0.05 * v)),
])
def test_activations(rng, layer, formula):
    x = sparse(rng, SHAPES[3], channels=3)
    x = x.with_features((x.features * 3).astype(np.float32))
    y = layer(x)
    # one kind of output: Tensor features (recording nothing: no input needs a gradient)
    assert y.sites is x.sites and isinstance(y.features, Tensor)
    assert not y.features.requires_grad and y.features._inputs == ()
    close(y.features, formula(np.asarray(x.features, np.float64)), 1e-6)


def test_dropout_is_inverted_in_training_and_identity_in_eval(rng):
    # Deliberate deviation: inverted dropout (SCN multiplies by Bernoulli(1 - p) in
    # training and by 1 - p in evaluation; the expected output is the same).
    x = sparse(rng, (30, 30), channels=8, density=0.5)
    for p in (0.25, 0.6):
        y = scn.Dropout(p)(x)
        f, out = x.features, values(y)
        kept = out != 0
        np.testing.assert_allclose(out[kept], f[kept] / (1 - p), rtol=1e-6)
        assert abs((~kept).mean() - p) < 0.03
    layer = scn.Dropout(0.5)
    assert not np.array_equal(values(layer(x)), values(layer(x)))   # a new mask per call
    scn.manual_seed(5)
    first = values(layer(x))
    scn.manual_seed(5)
    np.testing.assert_array_equal(values(layer(x)), first)
    layer.eval()
    # identity: the same sites and values (plain features come back as a Tensor)
    assert layer(x).sites is x.sites and layer(x).features.data is x.features
    t = layer(x)
    assert layer(t) is t and scn.Dropout(0)(t) is t
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        scn.Dropout(1.0)


def test_batchwise_dropout_shares_one_mask_per_channel(rng):
    x = sparse(rng, (8, 8), channels=400, density=0.5)
    p = 0.3
    y = scn.BatchwiseDropout(p)(x)
    f, out = np.asarray(x.features, np.float64), values(y)
    dropped = np.all(out == 0, axis=0)
    np.testing.assert_allclose(out[:, ~dropped], f[:, ~dropped] / (1 - p), rtol=1e-6)
    assert abs(dropped.mean() - p) < 0.08
    assert 0 < dropped.sum() < 400
    layer = scn.BatchwiseDropout(p).eval()
    assert layer(x).features.data is x.features
