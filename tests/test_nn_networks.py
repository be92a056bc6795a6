"""sparsegrid.nn network builders: SparseVggNet, SparseResNet, UNet, FullyConvolutionalNet.

The module trees are checked against SCN's networkArchitectures.py (types, constructor
arguments, state_dict keys, parameter counts worked out by hand), then every builder runs
on a small sparse input: the output's channels, spatial size and site set are checked, the
blocks' wiring is checked against the layers applied one by one, and a small network of each
kind passes a float64 finite-difference gradient check.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref
import sparsegrid.nn as scn
from sparsegrid import functional as F
from sparsegrid.autodiff import Tensor, ops
from nn_helpers import check_module_gradients, close, dense, sparse, values, w64


def describe(module):
    """A compact, comparable description of a module tree."""
    name = type(module).__name__
    if isinstance(module, (scn.Sequential, scn.ConcatTable)):
        return (name, [describe(m) for m in module])
    if isinstance(module, scn.SubmanifoldConvolution):
        return ("SubM", module.nIn, module.nOut, module.filter_size[0])
    if isinstance(module, (scn.Convolution, scn.Deconvolution)):
        return (name[:6], module.nIn, module.nOut, module.filter_size[0],
                module.filter_stride[0])
    if isinstance(module, (scn.MaxPooling, scn.UnPooling)):
        return (name, module.pool_size[0], module.pool_stride[0])
    if isinstance(module, scn.BatchNormalization):
        return (name, module.nPlanes, module.leakiness)
    if isinstance(module, scn.NetworkInNetwork):
        return ("NIN", module.nIn, module.nOut)
    return (name,)


def n_parameters(model):
    return sum(p.data.size for p in model.parameters())


def bnr(n):
    return ("BatchNormReLU", n, 0.0)


def subm(a, b):
    return ("SubM", a, b, 3)


def conv(a, b, f=3, s=2):
    return ("Convol", a, b, f, s)


def deconv(a, b, f=3, s=2):
    return ("Deconv", a, b, f, s)


# --------------------------------------------------------------------------------------
# SparseVggNet
# --------------------------------------------------------------------------------------
def test_vgg_codes_build_scn_modules():
    # Transcribed from SCN's SparseVggNet (networkArchitectures.py).
    plus1 = ("Sequential", [conv(5, 2), bnr(2), subm(2, 2), bnr(2), deconv(2, 2)])
    plus2 = ("Sequential", [conv(5, 3), bnr(3), subm(3, 3), bnr(3), conv(3, 3), bnr(3),
                            subm(3, 3), bnr(3), deconv(3, 3), bnr(3), subm(3, 3), bnr(3),
                            deconv(3, 3)])
    plus3 = ("Sequential", [conv(5, 4), bnr(4), subm(4, 4), bnr(4), conv(4, 4), bnr(4),
                            subm(4, 4), bnr(4), conv(4, 4), bnr(4), subm(4, 4), bnr(4),
                            deconv(4, 4), bnr(4), subm(4, 4), bnr(4), deconv(4, 4), bnr(4),
                            subm(4, 4), bnr(4), deconv(4, 4)])
    cases = [
        (["MP"], [("MaxPooling", 3, 2)]),
        ([["MP", 2, 1]], [("MaxPooling", 2, 1)]),
        (["C3/2"], [conv(5, 5), bnr(5)]),
        ([["C3/2", 7]], [conv(5, 7), bnr(7)]),
        ([["C", 7]], [subm(5, 7), bnr(7)]),
        ([["C", 6, 2]], [("ConcatTable", [subm(5, 6), plus1]), ("JoinTable",), bnr(8)]),
        ([["C", 6, 2, 3]], [("ConcatTable", [subm(5, 6), plus1, plus2]), ("JoinTable",),
                            bnr(11)]),
        ([["C", 6, 2, 3, 4]], [("ConcatTable", [subm(5, 6), plus1, plus2, plus3]),
                               ("JoinTable",), bnr(15)]),
    ]
    for layers, expected in cases:
        assert describe(scn.SparseVggNet(2, 5, layers)) == ("Sequential", expected), layers
    with pytest.raises(ValueError, match="unknown layer code"):
        scn.SparseVggNet(2, 5, [["X", 3]])


def test_vgg_parameter_count():
    # SubM 1->8 (72) + BN (16) + [SubM 8->8 (576) | Conv 576, BN 16, SubM 576, BN 16,
    # Deconv 576] + BN 16 (32).
    net = scn.SparseVggNet(2, 1, [["C", 8], ["C", 8, 8]])
    assert n_parameters(net) == 72 + 16 + 576 + 576 + 16 + 576 + 16 + 576 + 32


def test_vgg_every_code_runs(rng):
    layers = [["C", 4], ["C", 4, 2], ["C", 4, 2, 2], ["C", 4, 2, 2, 2], "MP", ["C3/2", 6],
              "C3/2", ["MP", 2, 1]]
    scn.manual_seed(0)
    net = scn.SparseVggNet(2, 3, layers)
    x = sparse(rng, (31, 23), channels=3, batch=2, density=0.12)
    planes, outputs, history = 3, None, []
    for module in net:
        y = module(outputs if isinstance(module, scn.JoinTable) else x)
        if isinstance(module, scn.ConcatTable):
            outputs = y
            # Every branch of a VGG+ block comes back onto the block input's sites.
            assert all(o.sites is x.sites for o in outputs)
            assert [o.n_channels for o in outputs] == [4] + [2] * (len(outputs) - 1)
            expected = ref.submanifold_conv(dense(x), w64(module[0].weight), (3, 3), (1, 1))
            close(outputs[0].features, ref.at_sites(expected, x.indices))
            continue
        if isinstance(module, scn.MaxPooling):
            f, s = module.pool_size[0], module.pool_stride[0]
            assert y.spatial_shape == tuple((n - f) // s + 1 for n in x.spatial_shape)
        if isinstance(module, (scn.BatchNormalization, scn.MaxPooling)):
            history.append((y.n_channels, y.spatial_shape))
        x = y
        planes = y.n_channels
    assert history == [(4, (31, 23)), (6, (31, 23)), (8, (31, 23)), (10, (31, 23)),
                       (10, (15, 11)), (6, (7, 5)), (6, (3, 2)), (6, (2, 1))]
    assert planes == 6 and x.spatial_shape == (2, 1)
    assert net.input_spatial_size(np.array([2, 1])).tolist() == [31, 23]
    out = net(sparse(rng, (31, 23), channels=3, batch=2, density=0.12))
    assert out.n_channels == 6 and out.spatial_shape == (2, 1)
    assert np.all(values(out) >= 0)                               # ends with BNReLU


def test_vgg_plus_block_values(rng):
    # The block's output is BNReLU(JoinTable(SubM(x), branch(x))): recompute it from the
    # functional ops with the network's own weights.
    scn.manual_seed(1)
    net = scn.SparseVggNet(2, 2, [["C", 3, 2]])
    x = sparse(rng, (9, 9), channels=2, density=0.4)
    branch = net[0][1]
    a = F.submanifold_conv(x, net[0][0].weight.data, None, 3)
    b = F.conv(x, branch[0].weight.data, None, 3, 2)
    b = F.batch_norm(b, branch[1].weight.data, branch[1].bias.data, None, None, True,
                     leakiness=0)
    b = F.submanifold_conv(b, branch[2].weight.data, None, 3)
    b = F.batch_norm(b, branch[3].weight.data, branch[3].bias.data, None, None, True,
                     leakiness=0)
    b = F.deconv(b, branch[4].weight.data, None, 3, 2)
    joined = np.concatenate([a.features, b.features], axis=1).astype(np.float64)
    expected = ref.batch_norm(joined, 1, 0, joined.mean(0), joined.var(0), 1e-4, 0)
    y = net(x)
    assert y.sites is x.sites and y.n_channels == 5
    close(y.features, expected, 1e-4)


def test_hello_world_network():
    net = scn.Sequential().add(
        scn.SparseVggNet(2, 1, [["C", 8], ["C", 8], ["MP", 3, 2], ["C", 16], ["C", 16],
                                ["MP", 3, 2], ["C", 24], ["C", 24], ["MP", 3, 2]])
    ).add(scn.SubmanifoldConvolution(2, 24, 32, 3, False)).add(
        scn.BatchNormReLU(32)).add(scn.SparseToDense(2, 32))
    size = net.input_spatial_size(np.array([10, 10]))
    assert size.tolist() == [87, 87]
    msg = [" X   X  XXX  X    X    XX  ", " X   X  X    X    X   X  X ",
           " XXXXX  XX   X    X   X  X ", " X   X  X    X    X   X  X ",
           " X   X  XXX  XXX  XXX  XX  "]
    coords = [[y, x, b] for b in range(2) for y, line in enumerate(msg)
              for x, c in enumerate(line) if c == "X"]
    x = scn.InputLayer(2, size)([np.array(coords), np.ones((len(coords), 1), np.float32)])
    out = net(x)
    assert out.shape == (2, 32, 10, 10)
    assert np.all(values(out) >= 0) and values(out).any()


# --------------------------------------------------------------------------------------
# SparseResNet
# --------------------------------------------------------------------------------------
def test_resnet_structure_and_parameter_count():
    net = scn.SparseResNet(2, 4, [["b", 4, 1, 1], ["b", 8, 2, 2], ["b", 6, 1, 1]])
    assert describe(net) == ("Sequential", [
        bnr(4),
        ("ConcatTable", [("Sequential", [subm(4, 4), bnr(4), subm(4, 4)]), ("Identity",)]),
        ("AddTable",),
        bnr(4),
        ("ConcatTable", [("Sequential", [conv(4, 8), bnr(8), subm(8, 8)]), conv(4, 8)]),
        ("AddTable",),
        ("ConcatTable", [("Sequential", [bnr(8), subm(8, 8), bnr(8), subm(8, 8)]),
                         ("Identity",)]),
        ("AddTable",),
        bnr(8),
        ("ConcatTable", [("Sequential", [subm(8, 6), bnr(6), subm(6, 6)]), ("NIN", 8, 6)]),
        ("AddTable",),
        bnr(6),
    ])
    small = scn.SparseResNet(2, 4, [["b", 4, 1, 1], ["b", 8, 2, 2]])
    # 8 + (144 + 8 + 144) + 8 + (288 + 16 + 576 + 288) + (16 + 576 + 16 + 576) + 16
    assert n_parameters(small) == 2680
    assert list(small.state_dict())[:6] == ["0.weight", "0.bias", "0.running_mean",
                                            "0.running_var", "1.0.0.weight", "1.0.1.weight"]
    with pytest.raises(ValueError, match="basic blocks"):
        scn.SparseResNet(2, 4, [["x", 4, 1, 1]])


def test_resnet_runs_with_strides_one_and_two(rng):
    scn.manual_seed(2)
    net = scn.SparseResNet(2, 3, [["b", 4, 2, 1], ["b", 6, 1, 2], ["b", 8, 1, 2]])
    x = sparse(rng, (15, 15), channels=3, density=0.25)
    y = net(x)
    assert y.n_channels == 8 and y.spatial_shape == (3, 3)
    assert net.input_spatial_size(np.array([3, 3])).tolist() == [15, 15]
    # The first group keeps the input's sites (stride 1).
    assert net[:3](x).sites is x.sites
    # A stride-2 group: residual and shortcut land on the same sites and are added.
    h = net[:6](x)
    outs = net[6](h)
    assert outs[0].sites is outs[1].sites
    close(net[7](outs).features, values(outs[0]) + values(outs[1]))
    assert np.all(values(y) >= 0)


# --------------------------------------------------------------------------------------
# UNet and FullyConvolutionalNet
# --------------------------------------------------------------------------------------
def bnl(n, leakiness):
    return ("BatchNormLeakyReLU", n, leakiness)


def test_unet_structure_and_parameter_counts():
    net = scn.UNet(2, 1, [4, 8], leakiness=0.1)
    assert describe(net) == ("Sequential", [
        ("Sequential", [bnl(4, 0.1), subm(4, 4)]),
        ("ConcatTable", [("Identity",), ("Sequential", [
            bnl(4, 0.1), conv(4, 8, 2, 2),
            ("Sequential", [("Sequential", [bnl(8, 0.1), subm(8, 8)])]),
            bnl(8, 0.1), deconv(8, 4, 2, 2)])]),
        ("JoinTable",),
        ("Sequential", [bnl(8, 0.1), subm(8, 4)]),
    ])
    assert n_parameters(scn.UNet(2, 1, [4, 8])) == 152 + 872 + 304
    assert n_parameters(scn.UNet(2, 1, [4, 8], n_input_planes=3)) == 114 + 872 + 304
    residual = scn.UNet(2, 1, [4, 8], residual_blocks=True)
    assert describe(residual[-2]) == ("ConcatTable", [
        ("NIN", 8, 4), ("Sequential", [bnl(8, 0), subm(8, 4), bnl(4, 0), subm(4, 4)])])
    assert n_parameters(residual) == 304 + 1464 + 488
    keys = list(scn.UNet(2, 1, [4, 8]).state_dict())
    assert keys[:5] == ["0.0.weight", "0.0.bias", "0.0.running_mean", "0.0.running_var",
                        "0.1.weight"]
    assert "1.1.2.0.1.weight" in keys and keys[-1] == "3.1.weight"


@pytest.mark.parametrize("residual", [False, True])
def test_unet_keeps_the_input_sites(rng, residual):
    scn.manual_seed(3)
    net = scn.UNet(3, 2, [4, 6, 8], residual_blocks=residual, leakiness=0.2,
                   n_input_planes=2)
    leaks = {m.leakiness for m in net.modules() if isinstance(m, scn.BatchNormalization)}
    assert leaks == {0.2}
    first_bn = next(m for m in net.modules() if isinstance(m, scn.BatchNormalization))
    assert first_bn.nPlanes == 2
    x = sparse(rng, (8, 8, 8), channels=2, density=0.06)
    y = net(x)
    assert y.sites is x.sites and y.n_channels == 4
    assert np.isfinite(values(y)).all() and values(y).std() > 0


def test_unet_other_downsampling(rng):
    net = scn.UNet(2, 1, [3, 5, 7], downsample=[3, 2])
    x = sparse(rng, (15, 7), channels=3, density=0.3)
    y = net(x)
    assert y.sites is x.sites and y.n_channels == 3
    convs = [m for m in net.modules() if isinstance(m, scn.Convolution)]
    assert [(c.filter_size, c.filter_stride) for c in convs] == [((3, 3), (2, 2))] * 2


@pytest.mark.parametrize("residual", [False, True])
def test_fully_convolutional_net(rng, residual):
    net = scn.FullyConvolutionalNet(2, 2, [3, 4, 5], residual_blocks=residual,
                                    downsample=[3, 2])
    x = sparse(rng, (15, 15), channels=3, density=0.3)
    y = net(x)
    assert y.sites is x.sites and y.n_channels == 3 + 4 + 5
    unpools = [m for m in net.modules() if isinstance(m, scn.UnPooling)]
    assert len(unpools) == 2 and unpools[0].pool_size == (3, 3)
    assert not any(isinstance(m, scn.Deconvolution) for m in net.modules())
    # Wiring of the top level: [its blocks' output h | UnPooling(level below(h))].
    split = len(net) - 2                                          # after the reps blocks
    assert isinstance(net[split], scn.ConcatTable) and isinstance(net[-1], scn.JoinTable)
    h = net[:split](x)
    down = net[split][1]
    coarse = down[:-1](h)
    assert coarse.n_channels == 4 + 5 and coarse.spatial_shape == (7, 7)
    expected = ref.unpool(dense(coarse), (3, 3), (2, 2))          # sum over parents
    close(values(y)[:, :3], values(h))
    close(values(y)[:, 3:], ref.at_sites(expected, x.indices), 1e-4)


def test_fully_convolutional_parameter_count():
    net = scn.FullyConvolutionalNet(2, 1, [4, 8])
    assert describe(net) == ("Sequential", [
        ("Sequential", [bnr(4), subm(4, 4)]),
        ("ConcatTable", [("Identity",), ("Sequential", [
            bnr(4), conv(4, 8, 2, 2), ("Sequential", [("Sequential", [bnr(8), subm(8, 8)])]),
            ("UnPooling", 2, 2)])]),
        ("JoinTable",),
    ])
    assert n_parameters(net) == 152 + 8 + 128 + 592


# --------------------------------------------------------------------------------------
# Gradients and determinism of whole networks
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, shape", [
    (lambda: scn.UNet(2, 1, [2, 3], residual_blocks=True, leakiness=0.1), (6, 6)),
    (lambda: scn.SparseResNet(2, 2, [["b", 2, 1, 1], ["b", 3, 1, 2]]), (7, 7)),
    (lambda: scn.SparseVggNet(2, 2, [["C", 2, 1], "MP"]), (7, 7)),
    (lambda: scn.FullyConvolutionalNet(2, 1, [2, 2]), (6, 6)),
])
def test_network_gradients(rng, make, shape):
    scn.manual_seed(4)
    check_module_gradients(make(), sparse(rng, shape, channels=2, density=0.4))


def test_network_is_deterministic(rng):
    x = sparse(rng, (8, 8, 8), channels=2, density=0.08)

    def run():
        scn.manual_seed(9)
        net = scn.Sequential(scn.SubmanifoldConvolution(3, 2, 4, 3, False),
                             scn.UNet(3, 1, [4, 6, 8], residual_blocks=True),
                             scn.BatchNormReLU(4), scn.Linear(4, 3))
        features = Tensor(x.features, requires_grad=True)
        out = net(x.with_features(features)).features
        ops.sum(ops.mul(out, out)).backward()
        return [out.data, features.grad] + [p.grad for p in net.parameters()]

    a, b = run(), run()
    assert len(a) == len(b) and all(u.tobytes() == v.tobytes() for u, v in zip(a, b))
