"""sparsegrid.nn.module: Module / Parameter mechanics, state_dict and determinism.

Registration order, PyTorch/SCN state_dict keys, train/eval modes, dtype conversion,
load_state_dict (strict and not, torch-like values), loading SCN checkpoints' weights into
layers (against SCN's outputs stored in tests/golden), repr, manual_seed and bit-exact
reproducibility, and inference under no_grad.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import sparsegrid.nn as scn
from nn_helpers import SHAPES, by_coordinate, golden, sparse, values
from sparsegrid.autodiff import Tensor, no_grad, ops


# --------------------------------------------------------------------------------------
# Module mechanics
# --------------------------------------------------------------------------------------
class Toy(scn.Module):
    def __init__(self):
        super().__init__()
        self.second = scn.Parameter(np.zeros(2, np.float32))
        self.first = scn.Parameter(np.ones(3, np.float32))
        self.register_buffer("stat", np.full(2, 7, np.float32))
        self.register_buffer("count", np.zeros(1, np.int64))
        self.child = scn.NetworkInNetwork(2, 3, True)
        self.plain = np.zeros(4, np.float32)   # neither parameter nor buffer


def test_registration_order_and_state_dict_layout():
    toy = Toy()
    assert [n for n, _ in toy.named_parameters()] == ["second", "first", "child.weight",
                                                      "child.bias"]
    assert [n for n, _ in toy.named_buffers()] == ["stat", "count"]
    # PyTorch order: a module's parameters, then its buffers, then its children.
    keys = ["second", "first", "stat", "count", "child.weight", "child.bias"]
    assert list(toy.state_dict()) == keys
    assert [n for n, _ in toy.named_modules()] == ["", "child"]
    assert [type(c).__name__ for c in toy.children()] == ["NetworkInNetwork"]
    # Re-assigning a buffer or a parameter keeps its kind and its place (as PyTorch).
    toy.stat = np.zeros(2, np.float32)
    toy.second = scn.Parameter(np.ones(2, np.float32))
    assert list(toy.state_dict()) == keys
    np.testing.assert_array_equal(toy.state_dict()["stat"], 0)
    np.testing.assert_array_equal(toy.state_dict()["second"], 1)
    # Replacing a parameter by something else drops it; so does deleting a child.
    toy.first = None
    assert [n for n, _ in toy.named_parameters()] == ["second", "child.weight", "child.bias"]
    del toy.child
    assert list(toy.state_dict()) == ["second", "stat", "count"]


def test_attribute_before_init_is_an_error():
    class Broken(scn.Module):
        def __init__(self):
            self.weight = scn.Parameter(np.zeros(1))

    with pytest.raises(AttributeError, match="Module.__init__"):
        Broken()


def test_shared_parameter_listed_once_but_saved_under_both_keys():
    nin = scn.NetworkInNetwork(2, 2)
    seq = scn.Sequential(nin, nin)
    assert [n for n, _ in seq.named_parameters()] == ["0.weight"]
    assert list(seq.state_dict()) == ["0.weight", "1.weight"]   # as torch's state_dict


def test_scn_key_names_of_a_vgg_plus_network():
    # SCN: Sequential[SubM, BNReLU, ConcatTable[SubM, Sequential[Conv, BNReLU, SubM,
    # BNReLU, Deconv]], JoinTable, BNReLU]; BN registers running_mean/var buffers first but
    # torch's state_dict lists a module's parameters before its buffers.
    net = scn.SparseVggNet(2, 1, [["C", 8], ["C", 8, 8]])
    bn = ["weight", "bias", "running_mean", "running_var"]
    expected = (["0.weight"] + [f"1.{k}" for k in bn] + ["2.0.weight", "2.1.0.weight"]
                + [f"2.1.1.{k}" for k in bn] + ["2.1.2.weight"] + [f"2.1.3.{k}" for k in bn]
                + ["2.1.4.weight"] + [f"4.{k}" for k in bn])
    assert list(net.state_dict()) == expected
    assert [n for n, _ in net.named_parameters()] == [
        k for k in expected if not k.endswith(("running_mean", "running_var"))]
    # Ungrouped weights are saved as (K, Cin, Cout) (SCN: (K, 1, Cin, Cout); loading
    # takes both, see test_loading_scn_conv_weights_reproduces_scn).
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    assert shapes["0.weight"] == (9, 1, 8)
    assert shapes["2.1.4.weight"] == (9, 8, 8)
    assert shapes["4.running_var"] == (16,)


def test_sparsify_keys_follow_scn():
    # SCN: self.net = Sequential(NIN, activation) with an activation, NIN alone without.
    assert list(scn.Sparsify(2, 4).state_dict()) == ["net.weight", "net.bias"]
    for activation in ("sigmoid", "fakeGradHardSigmoid"):
        assert list(scn.Sparsify(2, 4, activation).state_dict()) == ["net.0.weight",
                                                                     "net.0.bias"]


def test_train_eval_propagate_to_every_descendant():
    net = scn.SparseVggNet(2, 1, [["C", 4], ["C", 4, 4], "MP"])
    modules = list(net.modules())
    assert len(modules) > 8 and all(m.training for m in modules)
    assert net.eval() is net
    assert not any(m.training for m in modules)
    net[2].train()   # a sub-tree only
    assert all(m.training for m in net[2].modules())
    assert not net.training and not net[0].training
    net.train()
    assert all(m.training for m in modules)


def test_zero_grad(rng):
    net = scn.Sequential(scn.SubmanifoldConvolution(2, 3, 4, 3, True), scn.BatchNormReLU(4))
    x = sparse(rng, (6, 6))
    x = x.with_features(Tensor(x.features, requires_grad=True))
    ops.sum(net(x).features).backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_double_and_float_convert_parameters_and_buffers(rng):
    net = scn.Sequential(scn.SubmanifoldConvolution(2, 3, 4, 3, True), scn.BatchNormReLU(4),
                         scn.MeanOnlyBNLeakyReLU(4))
    before = net.state_dict()
    assert net.double() is net
    state = net.state_dict()
    assert all(v.dtype == np.float64 for v in state.values())
    for key in before:
        np.testing.assert_array_equal(state[key], before[key])
    x = sparse(rng, (6, 6), dtype=np.float64)
    assert net(x).features.dtype == np.float64
    with pytest.raises(TypeError, match="dtype"):
        net(sparse(rng, (6, 6)))                   # float32 input into a float64 model
    net.float()
    assert all(v.dtype == np.float32 for v in net.state_dict().values())
    assert net(sparse(rng, (6, 6))).features.dtype == np.float32
    toy = Toy().double()                                   # integer buffers stay integers
    assert toy.stat.dtype == np.float64 and toy.count.dtype == np.int64
    assert list(toy.state_dict()) == ["second", "first", "stat", "count", "child.weight",
                                      "child.bias"]


def test_state_dict_is_a_copy():
    net = scn.Sequential(scn.SubmanifoldConvolution(2, 2, 2, 3, True), scn.BatchNormReLU(2))
    state = net.state_dict()
    state["0.weight"][...] = 123
    state["1.running_mean"][...] = 5
    assert not np.any(net[0].weight.data == 123)
    np.testing.assert_array_equal(net[1].running_mean, 0)


def test_load_state_dict_round_trip(rng):
    scn.manual_seed(1)
    a = scn.Sequential(scn.SubmanifoldConvolution(2, 3, 4, 3, True), scn.BatchNormReLU(4),
                       scn.Convolution(2, 4, 2, 3, 2, False))
    scn.manual_seed(2)
    b = scn.Sequential(scn.SubmanifoldConvolution(2, 3, 4, 3, True), scn.BatchNormReLU(4),
                       scn.Convolution(2, 4, 2, 3, 2, False))
    a[1].running_mean[:] = rng.standard_normal(4)
    x = sparse(rng, (7, 7))
    a.eval(), b.eval()
    assert not np.allclose(values(a(x)), values(b(x)))
    source = a.state_dict()
    assert b.load_state_dict(source) == ([], [])
    np.testing.assert_array_equal(values(a(x)), values(b(x)))
    source["0.weight"][...] = 0        # the loaded arrays are copies
    assert np.any(b[0].weight.data != 0)


def test_load_state_dict_strict_errors():
    net = scn.Sequential(scn.SubmanifoldConvolution(2, 2, 3, 3, False), scn.BatchNormReLU(3))
    state = net.state_dict()
    missing = dict(state)
    del missing["1.running_var"]
    with pytest.raises(KeyError, match="1.running_var"):
        net.load_state_dict(missing)
    extra = dict(state, **{"2.weight": np.zeros(3)})
    with pytest.raises(KeyError, match="2.weight"):
        net.load_state_dict(extra)
    # Not strict: the rest is loaded and the lists come back.
    missing["0.weight"] = np.ones((9, 2, 3))
    assert net.load_state_dict(missing, strict=False) == (["1.running_var"], [])
    np.testing.assert_array_equal(net[0].weight.data, 1)
    assert net.load_state_dict(extra, strict=False) == ([], ["2.weight"])
    wrong = dict(state, **{"1.bias": np.zeros(4)})
    with pytest.raises(ValueError, match=r"'1\.bias'.*\(4,\)"):
        net.load_state_dict(wrong)
    with pytest.raises(ValueError, match=r"'0\.weight'"):
        net.load_state_dict(dict(state, **{"0.weight": np.zeros((8, 2, 3))}))


def test_load_state_dict_keeps_dtype_and_takes_torch_like_values():
    class FakeTorch:   # what load_state_dict sees of a CPU torch tensor
        def __init__(self, array):
            self.array = array

        def detach(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            return self.array

    bn = scn.BatchNormalization(3)
    state = {"weight": np.arange(3.0), "bias": np.ones(3), "running_mean": np.full(3, 2.0),
             "running_var": FakeTorch(np.full(3, 4.0))}
    bn.load_state_dict(state)
    assert bn.weight.data.dtype == np.float32 and bn.running_var.dtype == np.float32
    np.testing.assert_array_equal(bn.weight.data, [0, 1, 2])
    np.testing.assert_array_equal(bn.running_var, 4)


@pytest.mark.parametrize("case", ["2d_subm_f3", "2d_subm_f3_groups2", "2d_subm_f2_even"])
def test_loading_scn_conv_weights_reproduces_scn(case):
    """SCN checkpoints store (K, G, Cin/G, Cout/G) weights, (K, 1, Cin, Cout) ungrouped;
    loaded into our layer (fed SCN's batch-last coordinates) they give SCN's output."""
    g = golden(case)
    f = tuple(int(v) for v in g["filter_size"])
    cin, cout = g["in_feats"].shape[1], g["out_feats"].shape[1]
    layer = scn.SubmanifoldConvolution(2, cin, cout, f, True, groups=int(g["groups"]))
    layer.load_state_dict({"weight": g["weight_scn"], "bias": g["bias"]})
    if int(g["groups"]) == 1:
        assert layer.weight.shape == (math.prod(f), cin, cout)
        np.testing.assert_array_equal(layer.weight.data, g["weight_kio"])
    else:
        np.testing.assert_array_equal(layer.weight.data, g["weight_scn"])
    x = scn.InputLayer(2, g["spatial_size_in"], mode=0)([g["in_coords"], g["in_feats"]])
    y = layer(x)
    ours = by_coordinate(y.get_spatial_locations(), values(y))
    theirs = by_coordinate(g["out_coords"], g["out_feats"])
    assert ours.keys() == theirs.keys()
    scale = max(1.0, float(np.abs(g["out_feats"]).max()))
    for site, value in theirs.items():
        np.testing.assert_allclose(ours[site], value, rtol=1e-4, atol=1e-4 * scale)


def test_scn_batchnorm_checkpoint_and_momentum_reproduce_scn():
    g = golden("2d_bnrelu_train")
    bn = scn.BatchNormReLU(5)
    assert bn.momentum == g["momentum"] and bn.eps == g["eps"]
    bn.load_state_dict({"weight": g["weight"], "bias": g["bias"],
                        "running_mean": g["running_mean_before"],
                        "running_var": g["running_var_before"]})
    x = scn.InputLayer(2, 64, mode=0)([g["in_coords"], g["in_feats"]])
    y = bn(x)
    ours = by_coordinate(y.get_spatial_locations(), values(y))
    for site, value in by_coordinate(g["in_coords"], g["out_feats"]).items():
        np.testing.assert_allclose(ours[site], value, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_mean, g["running_mean_after"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var, g["running_var_after"], rtol=1e-5, atol=1e-6)


def test_repr_is_readable():
    net = scn.Sequential(scn.SubmanifoldConvolution(3, 1, 8, 3, False),
                         scn.ConcatTable(scn.Identity(), scn.Convolution(3, 8, 16, 2, 2, True,
                                                                         groups=2)),
                         scn.MaxPooling(3, 3, 2), scn.BatchNormLeakyReLU(8, leakiness=0.1))
    text = repr(net)
    lines = text.splitlines()
    assert lines[0] == "Sequential("
    assert lines[1] == "  (0): SubmanifoldConvolution(1->8, filter_size=3, bias=False)"
    assert "  (1): ConcatTable(" in lines
    assert "    (0): Identity()" in lines
    assert ("    (1): Convolution(8->16, filter_size=2, stride=2, groups=2, bias=True)"
            in lines)
    assert "  (2): MaxPooling(3, 3, 2)" in lines
    assert any(line.startswith("  (3): BatchNormLeakyReLU(8") and "leakiness=0.1" in line
               for line in lines)
    assert lines[-1] == ")"
    assert repr(scn.Convolution(2, 1, 2, (3, 2), (2, 1), False)).endswith(
        "filter_size=(3, 2), stride=(2, 1), bias=False)")
    assert repr(scn.InputLayer(2, 16, 4)) == "InputLayer(2, spatial_size=(16, 16), mode='mean')"


def test_manual_seed_makes_construction_reproducible():
    def build():
        return scn.Sequential(scn.SparseVggNet(2, 3, [["C", 8], "MP", ["C", 8, 4]]),
                              scn.Linear(8, 3))

    scn.manual_seed(42)
    a = build().state_dict()
    scn.manual_seed(42)
    b = build().state_dict()
    scn.manual_seed(43)
    c = build().state_dict()
    assert list(a) == list(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["0.0.weight"], c["0.0.weight"])
    assert scn.default_rng() is scn.default_rng()


def test_assigning_an_array_to_a_parameter_raises():
    conv = scn.SubmanifoldConvolution(2, 3, 4, 3, True)
    with pytest.raises(TypeError, match="parameter 'weight'"):
        conv.weight = np.zeros((9, 3, 4), np.float32)
    assert list(conv.state_dict()) == ["weight", "bias"]
    conv.bias = None                                   # removing a parameter is allowed
    assert list(conv.state_dict()) == ["weight"]


# --------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------
def test_same_seed_same_bits(rng):
    x = sparse(rng, (15, 15), channels=2, batch=2, density=0.3)

    def run():
        scn.manual_seed(123)
        net = scn.Sequential(scn.SubmanifoldConvolution(2, 2, 4, 3, True),
                             scn.BatchNormLeakyReLU(4), scn.Dropout(0.3),
                             scn.ConcatTable(scn.Identity(),
                                             scn.Sequential(
                                                 scn.RandomizedStrideMaxPooling(2, 3, 2),
                                                 scn.SubmanifoldConvolution(2, 4, 4, 3, False),
                                                 scn.UnPooling(2, 3, 2))),
                             scn.JoinTable(), scn.BatchwiseDropout(0.2),
                             scn.Convolution(2, 8, 3, 3, 2, False), scn.SparseToDense(2, 3))
        features = Tensor(x.features, requires_grad=True)
        out = net(x.with_features(features))
        ops.sum(ops.mul(out, out)).backward()
        return out.data, features.grad, [p.grad for p in net.parameters()], net.state_dict()

    a, b = run(), run()
    assert a[0].tobytes() == b[0].tobytes() and np.abs(a[0]).sum() > 0
    assert a[1].tobytes() == b[1].tobytes()
    assert all(ga.tobytes() == gb.tobytes() for ga, gb in zip(a[2], b[2]))
    assert all(a[3][k].tobytes() == b[3][k].tobytes() for k in a[3])


def test_inference_records_nothing(rng):
    net = scn.Sequential(scn.SubmanifoldConvolution(2, 3, 4, 3, True), scn.BatchNormReLU(4))
    x = sparse(rng, SHAPES[2])
    with no_grad():
        y = net(x)
    assert isinstance(y.features, Tensor) and not y.features.requires_grad, \
        "inference under no_grad: the same kind of object, recording nothing"
    assert y.features._inputs == ()
    z = net(x)
    assert z.features.requires_grad and z.features._inputs != ()
    np.testing.assert_array_equal(values(y), values(z))
