"""Whole ops and networks on the GPU against the same on the CPU: every functional op and
a few SCN networks, forward and backward, from the same inputs.

Each case runs on the CPU and on ``'cuda'`` (the ``gpu_device`` fixture: a real GPU where
CuPy sees one, and everywhere the host emulator of CuPy, so CI runs the whole library on
emulated device arrays). Outputs, site sets and gradients are compared with the CPU's
(site sets exactly, float64 values to 1e-9); every case must produce non-zero gradients on
the CPU, so no comparison below can be vacuous.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref
import sparsegrid as sg
import sparsegrid.functional as F
import sparsegrid.nn as scn
from sparsegrid import autodiff as ad
from sparsegrid import backend

def _case_inputs(seed, d=3, channels=3):
    rng = np.random.default_rng(seed)
    shape = (9, 7, 7, 5)[:d]
    idx = ref.random_sites(rng, shape, 2, 0.3)
    features = rng.standard_normal((len(idx), channels))
    return rng, idx, shape, features


def _weights(rng, *shape):
    return rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))


def _ops(d):
    k3, k2 = 3 ** d, 2 ** d
    return {
        "submanifold_conv": (lambda x, w: F.submanifold_conv(x, w[0], w[1], 3),
                             lambda r: [_weights(r, k3, 3, 4), r.standard_normal(4)]),
        "submanifold_conv_even": (lambda x, w: F.submanifold_conv(x, w[0], None, 2),
                                  lambda r: [_weights(r, k2, 3, 4)]),
        "conv_k2s2": (lambda x, w: F.conv(x, w[0], w[1], 3, 2),
                      lambda r: [_weights(r, k3, 3, 4), r.standard_normal(4)]),
        "deconv": (lambda x, w: F.deconv(F.conv(x, w[0], None, 3, 2), w[1], None, 3, 2),
                   lambda r: [_weights(r, k3, 3, 4), _weights(r, k3, 4, 2)]),
        "full_conv": (lambda x, w: F.full_conv(x, w[0], w[1], 2, 2),
                      lambda r: [_weights(r, k2, 3, 2), r.standard_normal(2)]),
        "max_pool": (lambda x, w: F.max_pool(x, 3, 2), lambda r: []),
        "avg_pool": (lambda x, w: F.avg_pool(x, 3, 2), lambda r: []),
        "unpool": (lambda x, w: F.unpool(F.max_pool(x, 3, 2), 3, 2), lambda r: []),
        "batch_norm_relu": (lambda x, w: F.batch_norm(x, w[0], w[1], training=True,
                                                      leakiness=0.0),
                            lambda r: [r.standard_normal(3), r.standard_normal(3)]),
        "group_norm": (lambda x, w: F.group_norm(x, 3, w[0], w[1]),
                       lambda r: [r.standard_normal(3), r.standard_normal(3)]),
        "network_in_network": (lambda x, w: F.network_in_network(x, w[0], w[1]),
                               lambda r: [_weights(r, 3, 5), r.standard_normal(5)]),
        "global_max": (lambda x, w: F.global_pool(x, "max"), lambda r: []),
        "global_mean": (lambda x, w: F.global_pool(x, "mean"), lambda r: []),
        "to_dense": (lambda x, w: F.to_dense(x), lambda r: []),
    }


OPS = _ops(3)


def _run(device, name, seed, d=3):
    """Outputs (numpy) and gradients of one op on one device, from seeded host inputs."""
    rng, idx, shape, features = _case_inputs(seed, d)
    op, make_weights = _ops(d)[name]
    weights = [ad.Tensor(backend.to_device(w, device), requires_grad=True)
               for w in make_weights(rng)]
    f = ad.Tensor(backend.to_device(features, device), requires_grad=True)
    x = sg.SparseTensor(f, backend.to_device(idx, device), shape, batch_size=2)
    out = op(x, weights)
    result = {}
    if isinstance(out, sg.SparseTensor):
        result["indices"] = backend.to_numpy(out.indices)
        values = out.features
    else:
        values = out
    data = values.data if isinstance(values, ad.Tensor) else values
    result["out"] = backend.to_numpy(data)
    probe = np.random.default_rng(seed + 1).standard_normal(data.shape)
    loss = ad.sum(values * ad.Tensor(backend.to_device(probe, device)))
    loss.backward()
    result["grad_features"] = backend.to_numpy(f.grad)
    for i, w in enumerate(weights):
        result[f"grad_w{i}"] = backend.to_numpy(w.grad)
    return result


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_runs_and_differentiates_on_the_cpu(name):
    """The harness's cases are sound: outputs finite, every gradient present and non-zero."""
    result = _run("cpu", name, 11)
    for key, value in result.items():
        assert np.isfinite(value).all(), (name, key)
        if key.startswith("grad"):
            assert np.abs(value).max() > 0, (name, key)


def _compare(cpu, gpu, name):
    assert cpu.keys() == gpu.keys()
    for key in cpu:
        assert cpu[key].shape == gpu[key].shape, (name, key)
        if key == "indices":
            np.testing.assert_array_equal(gpu[key], cpu[key], err_msg=f"{name} {key}")
        else:
            np.testing.assert_allclose(gpu[key], cpu[key], rtol=1e-9, atol=1e-10,
                                       err_msg=f"{name} {key}")


@pytest.mark.parametrize("d", [1, 2, 3, 4])
@pytest.mark.parametrize("name", sorted(OPS))
def test_op_on_the_gpu_is_the_cpus(name, d, gpu_device):
    _compare(_run("cpu", name, 5 + d, d), _run(gpu_device, name, 5 + d, d), name)


@pytest.mark.parametrize("mode", ["unique", "first", "last", "sum", "mean", "max"])
def test_input_and_output_layers_on_the_gpu(mode, gpu_device):
    rng = np.random.default_rng(3)
    idx = ref.random_sites(rng, (6, 7, 5), 2, 0.4)
    if mode != "unique":
        idx = np.concatenate([idx, idx[rng.integers(0, len(idx), 40)]])
    features = rng.standard_normal((len(idx), 3))
    results = []
    for device in ("cpu", gpu_device):
        f = ad.Tensor(backend.to_device(features, device), requires_grad=True)
        x, input_map = F.input_layer(backend.to_device(idx, device), f, (6, 7, 5), 2, mode)
        back = F.output_layer(x, input_map)
        ad.sum(back * back).backward()
        results.append({"indices": backend.to_numpy(x.indices),
                        "out": backend.to_numpy(x.features.data),
                        "back": backend.to_numpy(back.data),
                        "grad_features": backend.to_numpy(f.grad)})
    _compare(*results, mode)


def _network():
    return scn.Sequential().add(
        scn.SubmanifoldConvolution(3, 2, 8, 3, False)).add(
        scn.BatchNormReLU(8)).add(
        scn.MaxPooling(3, 2, 2)).add(
        scn.SubmanifoldConvolution(3, 8, 8, 3, False)).add(
        scn.BatchNormLeakyReLU(8, leakiness=0.1)).add(
        scn.Deconvolution(3, 8, 4, 2, 2, True)).add(
        scn.SparseToDense(3, 4))


def test_a_network_trains_the_same_on_both_devices(gpu_device):
    """Forward, backward and three SGD steps of a small SCN network: CPU and GPU agree."""
    rng = np.random.default_rng(0)
    idx = ref.random_sites(rng, (10, 10, 10), 2, 0.15)
    features = rng.standard_normal((len(idx), 2))
    target = rng.standard_normal((2, 4, 10, 10, 10))
    losses = {}
    for device in ("cpu", gpu_device):
        scn.manual_seed(0)
        model = _network().double().to(device)
        optimizer = scn.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        history = []
        for _ in range(3):
            x = sg.SparseTensor(backend.to_device(features, device),
                                backend.to_device(idx, device), (10, 10, 10), batch_size=2)
            out = model(x)
            loss = ad.mse_loss(out, ad.Tensor(backend.to_device(target, device)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(float(backend.to_numpy(loss.data)))
        losses[device] = history
    np.testing.assert_allclose(losses[gpu_device], losses["cpu"], rtol=1e-9)


def test_getitem_gradient_with_repeated_indices_on_the_gpu(gpu_device):
    """Autodiff's getitem accumulates repeated indices without float atomics on CuPy
    (a deterministic segment sum): the same gradient as NumPy's add.at."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((6, 4))
    rows = rng.integers(0, 6, 25)
    cols = rng.integers(0, 4, 25)
    probe = rng.standard_normal(25)
    grads = []
    for device in ("cpu", gpu_device):
        t = ad.Tensor(backend.to_device(x, device), requires_grad=True)
        picked = ad.getitem(t, (backend.to_device(rows, device), backend.to_device(cols, device)))
        ad.sum(picked * ad.Tensor(backend.to_device(probe, device))).backward()
        grads.append(backend.to_numpy(t.grad))
        t2 = ad.Tensor(backend.to_device(x, device), requires_grad=True)
        ad.sum(ad.getitem(t2, backend.to_device(rows, device)) ** 2).backward()
        grads.append(backend.to_numpy(t2.grad))
    np.testing.assert_allclose(grads[2], grads[0], rtol=1e-12)
    np.testing.assert_allclose(grads[3], grads[1], rtol=1e-12)
    assert np.abs(grads[0]).max() > 0


def test_dropout_on_the_gpu_draws_its_mask_on_the_device(gpu_device):
    """Inverted dropout on device arrays: a device mask, reproducible from the seed,
    the expected keep rate, and a gradient through the same mask."""
    x = backend.to_device(np.ones((4000, 8)), gpu_device)
    outs = []
    for _ in range(2):
        t = ad.Tensor(x, requires_grad=True)
        y = ad.dropout(t, 0.25, True, np.random.default_rng(5))
        ad.sum(y).backward()
        outs.append((backend.to_numpy(y.data), backend.to_numpy(t.grad)))
    (y, g), (y2, _) = outs
    np.testing.assert_array_equal(y, y2)
    assert set(np.unique(y)) <= {0.0, 1 / 0.75}
    assert abs((y == 0).mean() - 0.25) < 0.02
    np.testing.assert_array_equal(g, y)


def test_concatenate_gradient_on_the_gpu(gpu_device):
    a = ad.Tensor(backend.to_device(np.ones((2, 3)), gpu_device), requires_grad=True)
    b = ad.Tensor(backend.to_device(np.ones((4, 3)), gpu_device), requires_grad=True)
    ad.sum(ad.concatenate([a, b]) * 2.0).backward()
    np.testing.assert_array_equal(backend.to_numpy(a.grad), np.full((2, 3), 2.0))
    np.testing.assert_array_equal(backend.to_numpy(b.grad), np.full((4, 3), 2.0))
