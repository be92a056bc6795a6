"""sparsegrid as a JAX function (sparsegrid.interop.jax): values and gradients equal to
sparsegrid alone, JAX's own finite differences agree, jit works, buffers stay right."""

import copy

import numpy as np
import pytest

from optional import require

jax = require("jax", "the JAX bridge")
jax.config.update("jax_enable_x64", True)   # float64 finite differences

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import sparsegrid as sg  # noqa: E402
import sparsegrid.nn as scn  # noqa: E402
from sparsegrid.autodiff import Tensor  # noqa: E402
from sparsegrid.interop import jax as sgjax  # noqa: E402


def sites(rng, n=60, size=6, dim=3, channels=3):
    idx = np.unique(np.c_[rng.integers(0, 2, (n, 1)), rng.integers(0, size, (n, dim))], axis=0)
    return sg.SparseTensor(rng.standard_normal((len(idx), channels)), idx, (size,) * dim)


def network(dim=3):
    return scn.Sequential(scn.SubmanifoldConvolution(dim, 3, 8, 3, False), scn.BatchNormReLU(8),
                          scn.Convolution(dim, 8, 4, 2, 2, True),
                          scn.Deconvolution(dim, 4, 5, 2, 2, False)).double()


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_values_and_gradients_equal_sparsegrid_alone(rng, dim):
    x = sites(rng, dim=dim)
    net = network(dim)
    ref = copy.deepcopy(net)
    f = sgjax.function(net, x)
    params = sgjax.parameters(net)
    weights = rng.standard_normal(f.output_sites.features.shape)

    def loss(p, features):
        return jnp.sum(f(p, features) * weights)

    value, (g_params, g_features) = jax.value_and_grad(loss, argnums=(0, 1))(
        params, jnp.asarray(x.features))
    leaf = Tensor(x.features.copy(), requires_grad=True)
    out = ref(x.with_features(leaf))
    out.features.backward(weights)
    np.testing.assert_allclose(float(value), float((out.features.data * weights).sum()),
                               rtol=1e-12)
    np.testing.assert_allclose(np.asarray(g_features), leaf.grad, rtol=1e-6, atol=1e-12)
    for name, p in ref.named_parameters():
        np.testing.assert_allclose(np.asarray(g_params[name]), p.grad, rtol=1e-6,
                                   atol=1e-12, err_msg=name)
    # one forward callback updated the running statistics once, as sparsegrid alone did
    for (name, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        np.testing.assert_allclose(a, b, rtol=1e-12, err_msg=name)
    assert f.output_sites.spatial_shape == out.spatial_shape


def test_jax_finite_differences_and_jit(rng):
    x = sites(rng, n=30, size=4)
    net = network().eval()
    f = sgjax.function(net, x)
    params = sgjax.parameters(net)
    features = jnp.asarray(x.features)
    check_grads(f, (params, features), order=1, modes=["rev"], eps=1e-6)
    eager = jax.grad(lambda p, v: jnp.sum(f(p, v) ** 2), argnums=1)(params, features)
    jitted = jax.jit(jax.grad(lambda p, v: jnp.sum(f(p, v) ** 2), argnums=1))(params,
                                                                              features)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))


def test_training_with_jax_and_loading_back(rng):
    x = sites(rng, n=50, size=6)
    net = scn.Sequential(scn.SubmanifoldConvolution(3, 3, 4, 3, True)).double()
    f = sgjax.function(net, x)
    params = sgjax.parameters(net)
    truth = {k: jnp.asarray(rng.standard_normal(v.shape) * 0.3) for k, v in params.items()}
    target = f(truth, jnp.asarray(x.features))        # reachable: a linear layer
    loss = jax.jit(lambda p: jnp.mean((f(p, jnp.asarray(x.features)) - target) ** 2))
    start = float(loss(params))
    for _ in range(20):
        g = jax.grad(loss)(params)
        params = {k: v - 0.1 * g[k] for k, v in params.items()}
    assert float(loss(params)) < 0.5 * start
    sgjax.load_parameters(net, params)
    np.testing.assert_allclose(net(x).features.data, np.asarray(f(params, x.features)),
                               rtol=1e-12)


def test_dense_output(rng):
    x = sites(rng, n=30, size=4)
    net = scn.Sequential(scn.SubmanifoldConvolution(3, 3, 2, 3, False),
                         scn.SparseToDense(3, 2)).double()
    f = sgjax.function(net, x)
    assert f.output_sites is None
    out = f(sgjax.parameters(net), jnp.asarray(x.features))
    assert out.shape == (2, 2, 4, 4, 4)
    np.testing.assert_allclose(np.asarray(out), net(x).data, rtol=1e-12)


def test_refusals(rng):
    x = sites(rng, n=20, size=4)
    net = network()
    f = sgjax.function(net, x)
    params = sgjax.parameters(net)
    with pytest.raises(KeyError, match="parameter names"):
        f({k: v for k, v in list(params.items())[1:]}, jnp.asarray(x.features))
    with pytest.raises(ValueError, match="features must have shape"):
        f(params, jnp.ones((3, 3)))
    with pytest.raises(TypeError, match="sparsegrid.nn.Module"):
        sgjax.function(lambda t: t, x)
    with pytest.raises(ValueError, match="shape"):
        sgjax.load_parameters(net, {**params, "0.weight": jnp.ones((2, 2))})
    dropout = scn.Sequential(scn.SubmanifoldConvolution(3, 3, 2, 3, False),
                             scn.Dropout(0.5)).double()
    g = sgjax.function(dropout, x)
    with pytest.raises(Exception, match="Dropout"):
        jax.grad(lambda p: jnp.sum(g(p, jnp.asarray(x.features))))(sgjax.parameters(dropout))


def test_running_statistics_update_once_per_call_under_jit(rng):
    """Training-mode batch norm under jax.jit, with a loss linear in the output (a pure
    callback could be dropped there): the statistics move exactly as sparsegrid alone."""
    x = sites(rng, n=40, size=4)
    net = network()
    ref = copy.deepcopy(net)
    f = sgjax.function(net, x)
    params = sgjax.parameters(net)
    grad = jax.jit(jax.grad(lambda p, v: jnp.sum(2.0 * f(p, v))))
    for _ in range(3):
        grad(params, jnp.asarray(x.features))
        ref(x)
    for (name, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        np.testing.assert_allclose(a, b, rtol=1e-12, err_msg=name)
