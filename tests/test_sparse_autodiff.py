"""Every sparse op is differentiable through autodiff Tensors: float64 finite differences,
and the dense reference's vector-Jacobian product (reference.py) for a convolution on a
tensor whose features were replaced."""

import numpy as np
import pytest

import sparsegrid as sg
from sparsegrid import autodiff as ad
from sparsegrid.autodiff import Tensor

import reference as ref
from reference import random_sites


def base_tensor(rng, shape=(6, 5, 4), batch=2, channels=3):
    indices = random_sites(rng, shape, batch, density=0.35, empty_batches=())
    return sg.SparseTensor(rng.standard_normal((len(indices), channels)), indices, shape)


def on(x, features):
    """The same sites and grid with new (Tensor) features."""
    return x.with_features(features)


def weight(rng, k, cin, cout):
    return rng.standard_normal((k, cin, cout))


OPS = {
    "submanifold": (lambda x, w, b: sg.submanifold_conv(x, w, b, 3), 27),
    "submanifold_even_dilated": (lambda x, w, b: sg.submanifold_conv(x, w, b, 2, 2), 8),
    "conv": (lambda x, w, b: sg.conv(x, w, b, 2, 2), 8),
    "full_conv": (lambda x, w, b: sg.full_conv(x, w, b, 2, 1), 8),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_convolutions(rng, name):
    op, k = OPS[name]
    x = base_tensor(rng, shape=(6, 6, 4))
    ad.check_gradients(lambda f, w, b: op(on(x, f), w, b).features,
                       [x.features, weight(rng, k, 3, 2), rng.standard_normal(2)])


def test_deconvolution_and_grouped_weights(rng):
    x = base_tensor(rng, shape=(6, 6, 4))
    down = sg.conv(x, weight(rng, 8, 3, 4), None, 2, 2)

    def deconv(f, w):
        return sg.deconv(on(down, f), w, None, 2, 2).features

    ad.check_gradients(deconv, [down.features, weight(rng, 8, 4, 2)])
    grouped = rng.standard_normal((27, 3, 1, 2))
    ad.check_gradients(lambda f, w: sg.submanifold_conv(on(x, f), w, None, 3).features,
                       [x.features, grouped])


@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("drop", [0, 1])
def test_pooling(rng, pool, drop):
    x = base_tensor(rng, shape=(6, 6, 5))
    op = sg.max_pool if pool == "max" else sg.avg_pool
    ad.check_gradients(lambda f: op(on(x, f), 3, 1, n_features_to_drop=drop).features,
                       [x.features])


def test_unpool(rng):
    x = base_tensor(rng, shape=(6, 6, 4))
    coarse = sg.avg_pool(x, 2, 2)
    ad.check_gradients(lambda f: sg.unpool(on(coarse, f), 2, 2).features, [coarse.features])


def test_network_in_network(rng):
    x = base_tensor(rng)
    ad.check_gradients(lambda f, w, b: sg.network_in_network(on(x, f), w, b).features,
                       [x.features, rng.standard_normal((3, 4)), rng.standard_normal(4)])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("leakiness", [1.0, 0.333])
def test_batch_norm(rng, training, leakiness):
    x = base_tensor(rng)
    mean, var = rng.standard_normal(3), rng.uniform(0.5, 2, 3)

    def bn(f, w, b):
        return sg.batch_norm(on(x, f), w, b, mean.copy(), var.copy(), training=training,
                             leakiness=leakiness).features

    ad.check_gradients(bn, [x.features, rng.uniform(0.5, 2, 3), rng.standard_normal(3)])


@pytest.mark.parametrize("mode", ["max", "mean", "sum"])
def test_global_pool(rng, mode):
    x = base_tensor(rng)
    ad.check_gradients(lambda f: sg.global_pool(on(x, f), mode), [x.features])


@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4, "max"])
def test_input_and_output_layer(rng, mode):
    indices = random_sites(rng, (5, 5), 2, density=0.5)
    if mode != 0:
        indices = np.concatenate([indices, indices[:7]])  # duplicates
    features = rng.standard_normal((len(indices), 3))
    ad.check_gradients(lambda f: sg.input_layer(indices, f, (5, 5), mode=mode)[0].features,
                       [features])
    x, input_map = sg.input_layer(indices, features, (5, 5), mode=mode)
    ad.check_gradients(lambda f: sg.output_layer(on(x, f), input_map), [x.features])


def test_dense_conversions(rng):
    x = base_tensor(rng)
    ad.check_gradients(lambda f: sg.to_dense(on(x, f)), [x.features])
    # from_dense's sites depend on which entries are non-zero, so differentiate it where the
    # site set stays fixed: through to_dense of the active values.
    ad.check_gradients(lambda f: sg.from_dense(sg.to_dense(on(x, f))).features, [x.features])


def test_network_of_ops_trains_a_step(rng):
    """A small chain; gradients reach every parameter and match finite differences."""
    x = base_tensor(rng, shape=(6, 6, 6))
    w1, w2 = weight(rng, 27, 3, 4), weight(rng, 8, 4, 2)

    def net(f, a, b):
        h = sg.submanifold_conv(on(x, f), a, None, 3)
        h = sg.batch_norm(h, leakiness=0.0)
        h = sg.conv(h, b, None, 2, 2)
        return ad.sum(sg.global_pool(h, "mean") ** 2)

    ad.check_gradients(net, [x.features, w1, w2])


def test_plain_arrays_in_plain_arrays_out_tensors_in_tensors_out(rng):
    """The one rule: an op returns a Tensor when an input is a Tensor (recording only when
    a gradient is wanted), a plain array when every input is a plain array."""
    x = base_tensor(rng)
    y = sg.submanifold_conv(x, weight(rng, 27, 3, 2))
    assert isinstance(y.features, np.ndarray)
    with ad.no_grad():
        t = sg.submanifold_conv(on(x, Tensor(x.features, requires_grad=True)),
                                weight(rng, 27, 3, 2))
    assert isinstance(t.features, Tensor) and not t.features.requires_grad
    assert t.features._inputs == (), "no_grad: no graph"
    frozen = sg.submanifold_conv(on(x, Tensor(x.features)), Tensor(weight(rng, 27, 3, 2)))
    assert isinstance(frozen.features, Tensor) and not frozen.features.requires_grad
    assert frozen.features._inputs == (), "no input requires a gradient: no graph"
    live = sg.submanifold_conv(on(x, Tensor(x.features, requires_grad=True)),
                               weight(rng, 27, 3, 2))
    assert live.features.requires_grad and live.features._inputs != ()


def dense_submanifold_vjp(x, features, w, grad_out, filter_size=3):
    """The dense reference's gradients of sum(grad_out * submanifold_conv(x, w)) at x's
    sites: (features (N, Cin), weight) on the zero-filled grid, no rulebook, no kernel."""
    d = x.dimension
    grad_in, grad_w = ref.submanifold_conv_vjp(
        ref.to_dense(features, x.indices, x.batch_size, x.spatial_shape), w,
        ref.to_dense(grad_out, x.indices, x.batch_size, x.spatial_shape),
        (filter_size,) * d, (1,) * d)
    return ref.at_sites(grad_in, x.indices), grad_w


def test_features_can_be_replaced_keeping_the_grid(rng):
    x = base_tensor(rng)
    rulebook = x.grid.submanifold(x.sites, 3)
    f = Tensor(x.features, requires_grad=True)
    x.features = f
    w = Tensor(weight(rng, 27, 3, 2), requires_grad=True)
    y = sg.submanifold_conv(x, w)
    assert x.grid.submanifold(x.sites, 3) is rulebook
    g = rng.standard_normal((x.n_active, 2))
    y.features.backward(g)
    # The replaced features and the weight get the dense reference's gradients (through
    # the cached rulebook).
    grad_f, grad_w = dense_submanifold_vjp(x, f.data, w.data, g)
    assert np.abs(grad_f).max() > 0.1 and np.abs(grad_w).max() > 0.1
    np.testing.assert_allclose(f.grad, grad_f, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(w.grad, grad_w, rtol=1e-10, atol=1e-12)


def test_only_weight_requires_grad(rng):
    x = base_tensor(rng)
    w = Tensor(weight(rng, 27, 3, 2), requires_grad=True)
    g = rng.standard_normal((x.n_active, 2))
    sg.submanifold_conv(x, w).features.backward(g)
    assert isinstance(x.features, np.ndarray), "plain input features: nothing recorded"
    _, expected = dense_submanifold_vjp(x, x.features, w.data, g)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(w.grad, expected, rtol=1e-10, atol=1e-12)


def test_strided_conv_with_uncovered_rows(rng):
    """stride > filter leaves input rows in no window; backward and deconv must cope."""
    indices = np.c_[np.zeros(29 * 29, np.int32), np.argwhere(np.ones((29, 29)))]
    x = sg.SparseTensor(rng.standard_normal((len(indices), 2)), indices, (29, 29))
    ad.check_gradients(lambda f, w: sg.conv(on(x, f), w, None, 2, 3).features,
                       [x.features, weight(rng, 4, 2, 3)])
    coarse = sg.conv(x, weight(rng, 4, 2, 3), None, 2, 3)
    out = sg.deconv(coarse, weight(rng, 4, 3, 2), None, 2, 3)
    uncovered = (indices[:, 1] % 3 == 2) | (indices[:, 2] % 3 == 2)
    assert np.all(out.features[uncovered] == 0) and np.any(out.features[~uncovered] != 0)


def test_empty_tensor_grouped_and_dense(rng):
    empty = sg.SparseTensor(np.zeros((0, 3)), np.zeros((0, 3), np.int32), (4, 4))
    assert sg.submanifold_conv(empty, np.ones((9, 3, 1, 1))).features.shape == (0, 3)
    assert sg.from_dense(np.zeros((0, 2, 4, 4))).n_active == 0
