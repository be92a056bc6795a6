"""SubmanifoldDcls / submanifold_dcls: sparse DCLS on the offsets its taps touch.

Checked against the dense DCLS convolution (sparsegrid.dcls.dcls_conv, padding
dks // 2) on the zero-filled grid read at the active sites -- exactly submanifold
semantics -- in 1-D/2-D/3-D, odd and even dilated sizes, every version, groups; float64
finite differences for features, weight, P (and SIG) at fractional positions; the
touched-offset count; the rulebook cache; the GPU path (gpu_device) against the CPU; bad
input; and the position-learning example.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import sparsegrid as sg
import sparsegrid.nn as nn
from sparsegrid import autodiff as ad
from sparsegrid import backend, dcls
from sparsegrid.autodiff.gradcheck import check_gradients
from sparsegrid.dcls_sparse import submanifold_dcls, touched_cells, touched_offsets

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPREAD = {"v0": False, "v1": False, "gauss": True, "max": True}
CASES = [((7,), (23,)), ((6,), (17,)), ((5, 5), (9, 8)), ((4, 7), (8, 10)),
         ((3, 5, 4), (6, 7, 5)), ((5, 5, 5), (6, 6, 6))]


def random_sparse(rng, shape, cin, n, batch=2, dtype=np.float64):
    flat = rng.choice(batch * int(np.prod(shape)), n, replace=False)
    coords = np.stack(np.unravel_index(flat, (batch,) + tuple(shape)), axis=1)
    features = rng.standard_normal((n, cin)).astype(dtype)
    return sg.SparseTensor(features, coords.astype(np.int32), shape, batch)


def fractional_positions(rng, sizes, shape):
    """P with every tap strictly between integers (bilinear kinks sit at integers)."""
    d = len(sizes)
    P = np.empty((d,) + shape)
    for axis, n in enumerate(sizes):
        lim = n // 2
        P[axis] = rng.integers(-lim, max(lim, 1), shape) + rng.uniform(0.15, 0.85, shape)
        P[axis] = np.clip(P[axis], -lim, lim)
    return P


def dense_reference(x, weight, P, SIG, bias, sizes, version, groups=1):
    dense = x.to_dense()
    out = dcls.dcls_conv(dense, weight, P, SIG, bias, sizes,
                         padding=tuple(n // 2 for n in sizes), groups=groups, version=version)
    out = np.asarray(out.data if isinstance(out, ad.Tensor) else out)
    idx = np.asarray(x.indices)
    return out[(idx[:, 0], slice(None)) + tuple(idx[:, 1 + d] for d in range(x.dimension))]


@pytest.mark.parametrize("version", ["v1", "v0", "max", "gauss"])
@pytest.mark.parametrize("sizes,shape", CASES)
def test_equals_dense_dcls_on_the_zero_filled_grid(sizes, shape, version, rng):
    cin, cout, kc = 3, 4, 2
    x = random_sparse(rng, shape, cin, 30)
    weight = rng.standard_normal((cout, cin, kc))
    P = fractional_positions(rng, sizes, (cout, cin, kc))
    SIG = rng.uniform(0, 1.5, P.shape) if SPREAD[version] else None
    bias = rng.standard_normal(cout)
    y = submanifold_dcls(x, weight, P, SIG, bias, sizes, version)
    assert y.features.shape == (x.n_active, cout)
    assert y.sites is x.sites
    np.testing.assert_allclose(y.features, dense_reference(x, weight, P, SIG, bias, sizes,
                                                           version), rtol=1e-10, atol=1e-12)


def test_groups_and_integer_and_edge_positions(rng):
    sizes = (6, 5)
    x = random_sparse(rng, (9, 9), 4, 35)
    weight = rng.standard_normal((6, 2, 3))
    # integer positions, the upper clamp limit of an even size (no mass inside) included
    P = rng.integers(-2, 3, (2, 6, 2, 3)).astype(np.float64)
    P[0, 0, 0, 0] = 3.0
    bias = rng.standard_normal(6)
    for version in ("v0", "v1"):
        y = submanifold_dcls(x, weight, P, None, bias, sizes, version, groups=2)
        np.testing.assert_allclose(y.features, dense_reference(x, weight, P, None, bias, sizes,
                                                               version, groups=2),
                                   rtol=1e-10, atol=1e-12)


def test_no_tap_inside_gives_the_bias(rng):
    x = random_sparse(rng, (12,), 2, 6)
    P = np.full((1, 3, 2, 1), 2.0)                  # n = 4: position 4, past the last cell
    bias = rng.standard_normal(3)
    assert len(touched_cells(P, None, 4, "v1")) == 0
    y = submanifold_dcls(x, rng.standard_normal((3, 2, 1)), P, None, bias, 4, "v1")
    np.testing.assert_allclose(y.features, np.broadcast_to(bias, (6, 3)))


def test_module_float32_matches_dense_and_has_dcls_parameters(rng):
    nn.manual_seed(3)
    layer = nn.SubmanifoldDcls(2, 3, 5, 4, (9, 7))
    assert layer.weight.shape == (5, 3, 4) and layer.P.shape == (2, 5, 3, 4)
    assert layer.SIG is None and layer.bias.shape == (5,)
    assert all(p.dtype == np.float32 for p in layer.parameters())
    bound = 1 / np.sqrt(3 * 4)
    assert np.abs(layer.weight.data).max() <= bound
    assert (np.abs(layer.P.data[0]) <= 4).all() and (np.abs(layer.P.data[1]) <= 3).all()
    assert set(layer.state_dict()) == {"weight", "P", "bias"}
    gauss = nn.SubmanifoldDcls(3, 2, 2, 3, 5, version="gauss", bias=False)
    assert np.all(gauss.SIG.data == np.float32(0.23)) and gauss.bias is None
    x = random_sparse(rng, (12, 11), 3, 40, dtype=np.float32)
    y = layer(x)
    assert y.features.dtype == np.float32
    ref = dense_reference(x, layer.weight.data, layer.P.data, None, layer.bias.data, (9, 7), "v1")
    np.testing.assert_allclose(y.features.data, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes,shape", [((7,), (15,)), ((5, 4), (7, 6)), ((3, 5, 3), (4, 5, 4))])
@pytest.mark.parametrize("version", ["v1", "v0"])
def test_gradients_features_weight_positions(sizes, shape, version, rng):
    cin, cout, kc = 2, 2, 2
    x = random_sparse(rng, shape, cin, 14, batch=1)
    weight = rng.standard_normal((cout, cin, kc))
    P = fractional_positions(rng, sizes, (cout, cin, kc))
    bias = rng.standard_normal(cout)

    def fn(features, w, p, b):
        t = sg.SparseTensor(features, x.indices, x.spatial_shape, x.batch_size)
        return submanifold_dcls(t, w, p, None, b, sizes, version).features

    check_gradients(fn, [np.asarray(x.features), weight, P, bias], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("version", ["max", "gauss"])
def test_gradients_with_spreads(version, rng):
    sizes, shape = (5, 6), (7, 7)
    x = random_sparse(rng, shape, 2, 16, batch=1)
    weight = rng.standard_normal((2, 2, 2))
    P = fractional_positions(rng, sizes, (2, 2, 2))
    SIG = rng.uniform(0.2, 1.2, P.shape) + 0.0137      # away from the 'max' kinks

    def fn(features, w, p, s):
        t = sg.SparseTensor(features, x.indices, x.spatial_shape, x.batch_size)
        return submanifold_dcls(t, w, p, s, None, sizes, version).features

    check_gradients(fn, [np.asarray(x.features), weight, P, SIG], rtol=1e-6, atol=1e-8)


def test_module_backward_reaches_every_parameter(rng):
    nn.manual_seed(0)
    layer = nn.SubmanifoldDcls(3, 2, 3, 2, 7, version="max")
    layer.SIG.data[...] = 0.4
    x = random_sparse(rng, (8, 8, 8), 2, 60, dtype=np.float32)
    loss = ad.mean(layer(x).features ** 2)
    loss.backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and np.abs(p.grad).max() > 0, name


def test_touched_offsets_are_few_for_bilinear_taps(rng):
    sizes = (9, 9, 9)
    P = fractional_positions(rng, sizes, (2, 2, 2))          # 8 taps
    cells = touched_cells(P, None, sizes, "v1")
    assert len(cells) <= 8 * 2 ** 3 < 729 // 10
    offsets = touched_offsets(P, None, sizes, "v1")
    assert offsets.shape == (len(cells), 3)
    assert (np.abs(offsets) <= 4).all()
    # every tap's 8 corners are there, and nothing else is
    q = P.reshape(3, -1) + 4
    expected = set()
    for tap in range(q.shape[1]):
        low = np.floor(q[:, tap]).astype(int)
        for corner in np.ndindex(2, 2, 2):
            expected.add(tuple(low + np.array(corner) - 4))
    assert {tuple(o) for o in offsets} == expected
    assert len(touched_cells(P, None, sizes, "gauss")) == 729
    sig = np.zeros_like(P)
    assert len(touched_cells(P, sig, sizes, "max")) < 729 // 10
    # the module: few taps in a 9^3 kernel -> a small rulebook
    nn.manual_seed(1)
    layer = nn.SubmanifoldDcls(3, 1, 1, 3, 9)
    assert len(layer.offsets()) <= 3 * 8


def test_rulebook_cache_reused_while_offsets_unchanged(rng):
    nn.manual_seed(2)
    layer = nn.SubmanifoldDcls(2, 2, 2, 2, 9)
    layer.P.data[...] = 0.5
    x = random_sparse(rng, (10, 10), 2, 30, dtype=np.float32)
    layer(x)
    cached = dict(x.grid._rulebooks)
    assert len(cached) == 1
    layer.P.data[...] = 0.25                    # new values, the same touched cells
    y = layer(layer(x))                         # derived tensors share the Grid
    assert y.grid is x.grid
    assert len(x.grid._rulebooks) == 1
    assert next(iter(x.grid._rulebooks.values())) is next(iter(cached.values()))
    layer.P.data[...] = 2.5                     # the taps moved to other cells
    layer(x)
    assert len(x.grid._rulebooks) == 1          # the new offsets replaced the old ones
    assert next(iter(x.grid._rulebooks.values())) is not next(iter(cached.values()))
    for step in range(5):                       # moving taps never pile up rulebooks
        layer.P.data[...] = -3.5 + step
        layer(x)
        assert len(x.grid._rulebooks) == 1


def test_gpu_matches_cpu(gpu_device, rng):
    nn.manual_seed(5)
    layer = nn.SubmanifoldDcls(2, 3, 4, 3, (7, 6))
    x = random_sparse(rng, (10, 9), 3, 35, dtype=np.float32)
    g = rng.standard_normal((35, 4)).astype(np.float32)
    results = []
    for device in ("cpu", gpu_device):
        layer.to(device)
        layer.zero_grad()
        features = ad.Tensor(backend.to_device(np.asarray(x.features), device),
                             requires_grad=True)
        t = sg.SparseTensor(features, backend.to_device(np.asarray(x.indices), device),
                            x.spatial_shape, x.batch_size)
        y = layer(t)
        assert backend.device_of(y.features.data) == backend.device_of(t.indices)
        y.features.backward(backend.to_device(g, device))
        results.append([backend.to_numpy(y.features.data), backend.to_numpy(features.grad)] +
                       [backend.to_numpy(p.grad) for p in layer.parameters()])
    layer.to("cpu")
    for cpu, gpu in zip(*results):
        np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-5)


def test_bad_input(rng):
    x = random_sparse(rng, (8, 8), 2, 10)
    w = rng.standard_normal((3, 2, 2))
    P = np.zeros((2, 3, 2, 2))
    with pytest.raises(TypeError, match="SparseTensor"):
        submanifold_dcls(np.zeros((10, 2)), w, P, None, None, 5)
    with pytest.raises(ValueError, match="D = 2"):
        submanifold_dcls(x, w, np.zeros((3, 3, 2, 2)), None, None, 5)
    with pytest.raises(ValueError, match="input channels"):
        submanifold_dcls(x, rng.standard_normal((3, 3, 2)), np.zeros((2, 3, 3, 2)), None,
                         None, 5)
    with pytest.raises(ValueError, match="version"):
        submanifold_dcls(x, w, P, None, None, 5, "bilinear")
    with pytest.raises(ValueError, match="outside the dilated kernel"):
        submanifold_dcls(x, w, np.full((2, 3, 2, 2), 3.0), None, None, 5)
    with pytest.raises(ValueError, match="dilated_kernel_size"):
        submanifold_dcls(x, w, P, None, None, (5, 5, 5))
    with pytest.raises(ValueError, match="positive"):
        submanifold_dcls(x, w, P, None, None, 0)
    with pytest.raises(ValueError, match="SIG"):
        submanifold_dcls(x, w, P, None, None, 5, "gauss")
    with pytest.raises(TypeError, match="dtype"):
        submanifold_dcls(x, w.astype(np.float32), P.astype(np.float32), None, None, 5)
    with pytest.raises(ValueError, match="bias"):
        submanifold_dcls(x, w, P, None, np.zeros(4), 5)
    with pytest.raises(ValueError, match="P must be"):
        submanifold_dcls(x, w, np.zeros((2, 3, 2, 3)), None, None, 5)
    layer = nn.SubmanifoldDcls(2, 3, 2, 2, 5)
    with pytest.raises(ValueError, match="input feature planes"):
        layer(random_sparse(rng, (8, 8), 2, 10, dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        layer(random_sparse(rng, (8,), 3, 5, dtype=np.float32))
    with pytest.raises(ValueError, match="version"):
        nn.SubmanifoldDcls(2, 3, 2, 2, 5, version="cubic")
    with pytest.raises(ValueError, match="dilated_kernel_size"):
        nn.SubmanifoldDcls(2, 3, 2, 2, (5, 5, 5))


def test_example_learns_the_positions(tmp_path):
    png = tmp_path / "kernel.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "dcls_positions.py"), "--steps", "150",
         "--png", str(png)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    def numbers(label):
        line = re.search(rf"^{label}:(.*)$", result.stdout, re.M).group(1)
        return np.array([float(v) for v in line.split()])
    true, learned = numbers("true positions"), numbers("learned positions")
    assert np.abs(learned - true).max() < 1.0, result.stdout
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and b"IEND" in data


def test_float32_position_just_below_an_integer_touches_the_cells_it_uses(rng):
    """A float32 P of -1e-8 rounds onto 0 in float32 (as construct_kernel computes it):
    the touched cells must be those of the rounded position, or the 'v0' position gradient
    (carried by the next cell up) is lost."""
    sizes = (15,)
    x = random_sparse(rng, (31,), 1, 12, batch=1, dtype=np.float32)
    weight = np.ones((1, 1, 1), np.float32)
    P = np.full((1, 1, 1, 1), -1e-8, np.float32)
    grads = []
    for sparse in (True, False):
        p = ad.Tensor(P.copy(), requires_grad=True)
        if sparse:
            out = submanifold_dcls(x, weight, p, None, None, sizes, "v0").features
        else:
            dense = dcls.dcls_conv(x.to_dense(), weight, p, None, None, sizes, padding=7,
                                   version="v0")
            idx = np.asarray(x.indices)
            out = ad.getitem(dense, (idx[:, 0], slice(None), idx[:, 1]))
        ad.sum(out * out).backward()
        grads.append(np.asarray(p.grad))
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
