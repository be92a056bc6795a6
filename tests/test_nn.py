"""sparsegrid.nn: SCN-named modules checked against independent references.

Every layer runs on random sparse inputs (1-D to 3-D) and is compared with the dense
references of ``reference.py`` (sums of shifted / strided slices of zero-filled NumPy
arrays), with brute-force loops over a dict of sites, or with direct NumPy formulas; never
with the code path under test. Module mechanics (registration, PyTorch/SCN state_dict keys,
modes, dtypes, loading SCN checkpoints) and finite-difference gradients of layers and small
networks are covered too. Network builders are in test_nn_networks.py.

Deliberate deviations from SCN (docs/differences_from_scn.md) are stated where tested:
MaxPooling returns the true maximum (SCN clamps at 0); Dropout is inverted (SCN scales by
1 - p in evaluation); MeanOnlyBNLeakyReLU differentiates through the batch mean (SCN
detaches it); BatchNorm running variance from one site uses the biased variance (SCN divides
by 0); InputLayer validates coordinates (SCN does not) and sorts its output rows.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest

import reference as ref
import sparsegrid as sg
import sparsegrid.nn as scn
from conftest import GOLDEN
from sparsegrid import functional as F
from sparsegrid.autodiff import Tensor, check_gradients, no_grad, ops
from sparsegrid.autodiff.core import data_of
from sparsegrid.coords import kernel_offsets, permutohedral_basis, permutohedral_offsets

SHAPES = {1: (11,), 2: (7, 6), 3: (5, 4, 5)}
TOL = 2e-5   # float32 layers against float64 references


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def sparse(rng, shape, channels=3, batch=2, density=0.35, dtype=np.float32, empty=()):
    """A SparseTensor on random sites (rows shuffled) with standard-normal features."""
    indices = ref.random_sites(rng, shape, batch, density, empty_batches=empty)
    features = rng.standard_normal((len(indices), channels)).astype(dtype)
    return sg.SparseTensor(features, indices, shape, batch)


def dense(x):
    """Zero-filled float64 (B, C, *S) array of a SparseTensor (pure-Python scatter)."""
    return ref.to_dense(values(x), x.indices, x.batch_size, x.spatial_shape)


def values(x):
    """float64 features of a SparseTensor (or the array of a Tensor / array)."""
    return np.asarray(data_of(x.features if isinstance(x, sg.SparseTensor) else x), np.float64)


def close(actual, expected, tol=TOL):
    actual = values(actual)
    assert actual.shape == np.shape(expected), (actual.shape, np.shape(expected))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol)


def w64(param):
    return np.asarray(param.data, np.float64)


def site_dict(x):
    """{(batch, x1, ..., xD): row}."""
    return {tuple(site): row for row, site in enumerate(x.indices.tolist())}


def param_slots(model):
    return [(m, name) for _, m in model.named_modules() for name in m._parameters]


@contextlib.contextmanager
def using(model, tensors):
    """Run ``model`` with its parameters replaced by ``tensors`` (for check_gradients)."""
    slots = param_slots(model)
    saved = [getattr(m, name) for m, name in slots]
    for (m, name), t in zip(slots, tensors):
        object.__setattr__(m, name, t)
    try:
        yield
    finally:
        for (m, name), p in zip(slots, saved):
            object.__setattr__(m, name, p)


def check_module_gradients(model, x, output=lambda y: y.features):
    """Finite differences (float64) w.r.t. the input features and every parameter."""
    model.double()
    x = x.with_features(np.asarray(x.features, np.float64))
    params = [np.array(getattr(m, name).data) for m, name in param_slots(model)]
    assert params, "no parameters to check"

    def fn(features, *ps):
        with using(model, ps):
            return output(model(x.with_features(features)))

    return check_gradients(fn, [x.features, *params])


def leaky(y, leakiness):
    return np.where(y > 0, y, leakiness * y)


# --------------------------------------------------------------------------------------
# 1. Module mechanics
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


def golden(name):
    with np.load(GOLDEN / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


def by_coordinate(coords, feats):
    return {tuple(c): f for c, f in zip(coords.tolist(), feats)}


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


# --------------------------------------------------------------------------------------
# 2. Initialisation as SCN
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# 3. Layers against independent references
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("f, groups", [(3, 1), (2, 1), (3, 2), ("mixed", 1)])
def test_submanifold_convolution(rng, d, f, groups):
    filter_size = (3, 2, 1)[:d] if f == "mixed" else (f,) * d
    x = sparse(rng, SHAPES[d], channels=4, batch=3, empty=(1,))
    layer = scn.SubmanifoldConvolution(d, 4, 6, filter_size if f == "mixed" else f, True,
                                       groups=groups)
    layer.bias.data[:] = rng.standard_normal(6)
    y = layer(x)
    assert y.sites is x.sites and y.grid is x.grid
    expected = ref.submanifold_conv(dense(x), w64(layer.weight), filter_size, (1,) * d)
    close(y.features, ref.at_sites(expected, x.indices) + w64(layer.bias))
    assert scn.ValidConvolution is scn.SubmanifoldConvolution


def strided_input(rng, d, f, s, out=(4, 3, 3), channels=3, batch=2):
    shape = tuple((o - 1) * s + f for o in out[:d])
    return sparse(rng, shape, channels=channels, batch=batch, density=0.3)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("f, s, groups", [(3, 2, 1), (2, 2, 1), (2, 1, 1), (3, 2, 3)])
def test_convolution(rng, d, f, s, groups):
    x = strided_input(rng, d, f, s, channels=3)
    layer = scn.Convolution(d, 3, 6, f, s, True, groups=groups)
    layer.bias.data[:] = rng.standard_normal(6)
    y = layer(x)
    occupancy = ref.strided_occupancy(ref.occupancy(x.indices, x.batch_size, x.spatial_shape),
                                      (f,) * d, (s,) * d)
    np.testing.assert_array_equal(y.indices, ref.active_sites(occupancy))
    assert y.spatial_shape == occupancy.shape[1:] and y.grid is x.grid
    expected = ref.strided_conv(dense(x), w64(layer.weight), (f,) * d, (s,) * d)
    close(y.features, ref.at_sites(expected, y.indices) + w64(layer.bias))


def test_convolution_size_must_fit(rng):
    x = sparse(rng, (8, 7))
    with pytest.raises(ValueError, match="sizes that fit"):
        scn.Convolution(2, 3, 4, 3, 2, False)(x)
    with pytest.raises(ValueError, match="expects 5 input channels"):
        scn.Convolution(2, 5, 4, 2, 1, False)(x)
    with pytest.raises(ValueError, match="is 3-D"):
        scn.SubmanifoldConvolution(3, 3, 4, 3, False)(x)
    with pytest.raises(TypeError, match="SparseTensor"):
        scn.SubmanifoldConvolution(2, 3, 4, 3, False)(x.features)
    with pytest.raises(ValueError, match="groups"):
        scn.SubmanifoldConvolution(2, 3, 4, 3, False, groups=2)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("f, s", [(3, 2), (2, 2)])
def test_deconvolution_after_convolution(rng, d, f, s):
    x = strided_input(rng, d, f, s, channels=3)
    down = scn.Convolution(d, 3, 5, f, s, False)
    up = scn.Deconvolution(d, 5, 2, f, s, True)
    up.bias.data[:] = rng.standard_normal(2)
    y = down(x)
    z = up(y)
    assert z.sites is x.sites and z.grid is x.grid     # the finer tensor's sites and rows
    expected = ref.transposed_conv(dense(y), w64(up.weight), (f,) * d, (s,) * d)
    close(z.features, ref.at_sites(expected, x.indices) + w64(up.bias))


def test_deconvolution_without_matching_convolution_raises(rng):
    x = strided_input(rng, 2, 3, 2)
    with pytest.raises(ValueError, match="no strided op made them"):
        scn.Deconvolution(2, 3, 3, 3, 2, False)(x)
    y = scn.Convolution(2, 3, 3, 3, 2, False)(x)
    with pytest.raises(ValueError, match="filter_size=.3, 3., stride=.2, 2."):
        scn.Deconvolution(2, 3, 3, 2, 2, False)(y)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("f, s", [(2, 2), (3, 1), (3, 2)])
def test_full_convolution(rng, d, f, s):
    x = sparse(rng, (4, 3, 3)[:d], channels=3, density=0.4)
    layer = scn.FullConvolution(d, 3, 4, f, s, True)
    layer.bias.data[:] = rng.standard_normal(4)
    y = layer(x)
    occupancy = ref.transposed_occupancy(ref.occupancy(x.indices, x.batch_size,
                                                       x.spatial_shape), (f,) * d, (s,) * d)
    np.testing.assert_array_equal(y.indices, ref.active_sites(occupancy))
    assert y.grid is not x.grid     # new sites: a new grid, as SCN's new Metadata
    expected = ref.transposed_conv(dense(x), w64(layer.weight), (f,) * d, (s,) * d)
    close(y.features, ref.at_sites(expected, y.indices) + w64(layer.bias))
    assert scn.TransposeConvolution is scn.FullConvolution


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("f, s", [(3, 2), (2, 2)])
@pytest.mark.parametrize("drop", [0, 1])
def test_max_and_average_pooling(rng, d, f, s, drop):
    x = strided_input(rng, d, f, s, channels=3)
    occ = ref.occupancy(x.indices, x.batch_size, x.spatial_shape)
    y = scn.MaxPooling(d, f, s, drop)(x)
    sites = ref.active_sites(ref.strided_occupancy(occ, (f,) * d, (s,) * d))
    np.testing.assert_array_equal(y.indices, sites)
    # Deliberate deviation: the true maximum of the active inputs (SCN: max(0, that)).
    expected = ref.max_pool(dense(x), occ, (f,) * d, (s,) * d)[:, drop:]
    close(y.features, ref.at_sites(expected, sites))
    a = scn.AveragePooling(d, f, s, drop)(x)
    assert a.sites is y.sites      # one cached rulebook for both (as SCN)
    expected = ref.sum_pool(dense(x), (f,) * d, (s,) * d)[:, drop:] / f ** d   # SCN: / volume
    close(a.features, ref.at_sites(expected, sites))


def test_max_pooling_of_negative_values_is_negative_unlike_scn():
    x = sg.SparseTensor(np.array([[-3.0], [-1.0], [-2.0]], np.float32),
                        np.array([[0, 0, 0], [0, 0, 1], [0, 3, 3]]), (4, 4))
    y = scn.MaxPooling(2, 2, 2)(x)
    np.testing.assert_array_equal(y.features, [[-1.0], [-2.0]])   # SCN would give 0, 0


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("f, s", [(3, 2), (2, 2)])
def test_unpooling_after_pooling(rng, d, f, s):
    x = strided_input(rng, d, f, s, channels=3)
    coarse = scn.MaxPooling(d, f, s)(x)
    fine = scn.UnPooling(d, f, s)(coarse)
    assert fine.sites is x.sites
    # Each fine site receives the sum over its coarse parents (a copy when f == s).
    expected = ref.unpool(dense(coarse), (f,) * d, (s,) * d)
    close(fine.features, ref.at_sites(expected, x.indices))
    dropped = scn.UnPooling(d, f, s, 2)(coarse)
    close(dropped.features, ref.at_sites(expected, x.indices)[:, 2:])


def test_network_in_network(rng):
    x = sparse(rng, SHAPES[3], channels=4)
    layer = scn.NetworkInNetwork(4, 3, True)
    layer.bias.data[:] = rng.standard_normal(3)
    y = layer(x)
    assert y.sites is x.sites
    close(y.features, np.asarray(x.features, np.float64) @ w64(layer.weight) + w64(layer.bias))
    with pytest.raises(ValueError, match="expects 5 input channels"):
        scn.NetworkInNetwork(5, 3)(x)


# -- normalisation ----------------------------------------------------------------------
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


# -- activations and dropout ----------------------------------------------------------------
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
    assert y.sites is x.sites and isinstance(y.features, np.ndarray)
    close(y.features, formula(np.asarray(x.features, np.float64)), 1e-6)


def test_dropout_is_inverted_in_training_and_identity_in_eval(rng):
    # Deliberate deviation: inverted dropout (SCN multiplies by Bernoulli(1 - p) in
    # training and by 1 - p in evaluation; the expected output is the same).
    x = sparse(rng, (30, 30), channels=8, density=0.5)
    for p in (0.25, 0.6):
        y = scn.Dropout(p)(x)
        f, out = x.features, y.features
        kept = out != 0
        np.testing.assert_allclose(out[kept], f[kept] / (1 - p), rtol=1e-6)
        assert abs((~kept).mean() - p) < 0.03
    layer = scn.Dropout(0.5)
    assert not np.array_equal(layer(x).features, layer(x).features)   # a new mask per call
    scn.manual_seed(5)
    first = layer(x).features
    scn.manual_seed(5)
    np.testing.assert_array_equal(layer(x).features, first)
    layer.eval()
    assert layer(x) is x
    assert scn.Dropout(0)(x) is x
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        scn.Dropout(1.0)


def test_batchwise_dropout_shares_one_mask_per_channel(rng):
    x = sparse(rng, (8, 8), channels=400, density=0.5)
    p = 0.3
    y = scn.BatchwiseDropout(p)(x)
    f, out = np.asarray(x.features, np.float64), np.asarray(y.features, np.float64)
    dropped = np.all(out == 0, axis=0)
    np.testing.assert_allclose(out[:, ~dropped], f[:, ~dropped] / (1 - p), rtol=1e-6)
    assert abs(dropped.mean() - p) < 0.08
    assert 0 < dropped.sum() < 400
    layer = scn.BatchwiseDropout(p).eval()
    assert layer(x) is x


# -- conversions and sparsification -----------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2, 3])
def test_sparse_to_dense_and_back(rng, d):
    x = sparse(rng, SHAPES[d], channels=3, batch=3, empty=(1,))
    out = scn.SparseToDense(d, 3)(x)
    assert out.shape == (3, 3, *SHAPES[d])
    np.testing.assert_array_equal(out, dense(x).astype(np.float32))
    back = scn.DenseToSparse(d)(out)
    order = np.lexsort(x.indices.T[::-1])
    np.testing.assert_array_equal(back.indices, x.indices[order])
    np.testing.assert_array_equal(back.features, x.features[order])
    assert back.spatial_shape == SHAPES[d] and back.batch_size == 3
    with pytest.raises(ValueError, match="expects 4 input channels"):
        scn.SparseToDense(d, 4)(x)
    with pytest.raises(ValueError, match="expects a"):
        scn.DenseToSparse(d + 1)(out)


def test_add_coords(rng):
    x = sparse(rng, (5, 9), channels=2)
    y = scn.AddCoords()(x)
    assert y.sites is x.sites and y.n_channels == 4
    np.testing.assert_array_equal(y.features[:, :2], x.features)
    expected = np.stack([x.indices[:, 1] / 2 - 1, x.indices[:, 2] / 4 - 1], axis=1)
    close(y.features[:, 2:], expected, 1e-7)
    corners = sg.SparseTensor(np.ones((2, 1), np.float32), [[0, 0, 0], [0, 4, 8]], (5, 9))
    np.testing.assert_array_equal(scn.AddCoords()(corners).features[:, 1:],
                                  [[-1, -1], [1, 1]])


@pytest.mark.parametrize("activation", [None, "sigmoid", "fakeGradHardSigmoid"])
def test_sparsify(rng, activation):
    x = sparse(rng, (8, 7), channels=3, batch=2, density=0.5)
    layer = scn.Sparsify(2, 3, activation)
    nin = layer.net if activation is None else layer.net[0]
    nin.bias.data[:] = 0.1
    score = np.asarray(x.features, np.float64) @ w64(nin.weight) + 0.1
    mask = {None: score, "sigmoid": 1 / (1 + np.exp(-score)),
            "fakeGradHardSigmoid": (score > 0).astype(np.float64)}[activation]
    keep = score[:, 0] > 0           # mask > 0.5 (activation) or > 0 (none): the same sites
    assert 0 < keep.sum() < x.n_active
    y = layer(x)
    close(y.mask, mask[:, 0], 1e-6)   # (N,), as SCN
    np.testing.assert_array_equal(y.indices, x.indices[keep])   # relative order kept
    np.testing.assert_array_equal(y.features, x.features[keep])
    assert y.grid is not x.grid and y.spatial_shape == x.spatial_shape
    # The new site set is usable: a submanifold convolution only sees kept neighbours.
    conv = scn.SubmanifoldConvolution(2, 3, 2, 3, False)
    expected = ref.submanifold_conv(dense(y), w64(conv.weight), (3, 3), (1, 1))
    close(conv(y).features, ref.at_sites(expected, y.indices))
    with pytest.raises(ValueError, match="activation"):
        scn.Sparsify(2, 3, "relu")


def test_sparsify_dropping_everything_gives_an_empty_usable_tensor(rng):
    x = sparse(rng, (6, 6), channels=2)
    layer = scn.Sparsify(2, 2)
    layer.net.bias.data[:] = -1e3
    y = layer(x)
    assert y.n_active == 0 and y.mask.shape == (x.n_active,)
    assert scn.SubmanifoldConvolution(2, 2, 3, 3, True)(y).features.shape == (0, 3)


def test_sparsify_fcs(rng):
    x = sparse(rng, SHAPES[3], channels=3)
    y = scn.SparsifyFCS(3)(x)
    keep = x.features[:, 0] > 0
    np.testing.assert_array_equal(y.indices, x.indices[keep])
    np.testing.assert_array_equal(y.features, x.features[keep])
    assert y.grid is not x.grid


@pytest.mark.parametrize("d, f", [(1, 3), (2, 3), (2, (3, 2)), (3, 3)])
def test_shape_context(rng, d, f):
    x = sparse(rng, SHAPES[d], channels=2, density=0.5)
    layer = scn.ShapeContext(d, 2, f)
    filter_size = f if isinstance(f, tuple) else (f,) * d
    k = math.prod(filter_size)
    assert layer.nOut == 2 * k and list(layer.parameters()) == []
    y = layer(x)
    assert y.sites is x.sites and y.n_channels == 2 * k
    sites = site_dict(x)
    # Output block k is the neighbour at offset delta_k - f // 2 (SCN order), or 0.
    offsets = kernel_offsets(filter_size) - np.asarray(filter_size) // 2
    expected = np.zeros((x.n_active, 2 * k))
    for row, (b, *c) in enumerate(x.indices.tolist()):
        for j, off in enumerate(offsets.tolist()):
            other = sites.get((b, *np.add(c, off).tolist()))
            if other is not None:
                expected[row, 2 * j:2 * j + 2] = x.features[other]
    np.testing.assert_array_equal(y.features, expected.astype(np.float32))


@pytest.mark.parametrize("d", [1, 2, 3])
def test_permutohedral_offsets_are_the_lattice_neighbours(d):
    offsets = permutohedral_offsets(d)
    a, a_inv = permutohedral_basis(d)
    assert offsets.shape == (d * d + d + 1, d)
    assert not offsets[0].any()
    assert len({tuple(o) for o in offsets.tolist()}) == len(offsets)
    assert {tuple(o) for o in offsets.tolist()} == {tuple(o) for o in (-offsets).tolist()}
    np.testing.assert_allclose(np.linalg.norm(offsets[1:] @ a, axis=1), 1, atol=1e-12)
    np.testing.assert_allclose(a @ a.T, (np.eye(d) + 1) / 2, atol=1e-12)   # 60 degrees
    np.testing.assert_allclose(a @ a_inv, np.eye(d), atol=1e-12)
    assert scn.permutohedral_basis is permutohedral_basis
    # Weight k belongs to offset k: the order is part of the checkpoint format (SCN's
    # table, first axis fastest; see permutohedral_offsets). 2-D: SCN's kernel uses the
    # centre in slots 0 and 3 and never (0, -1); ours puts (0, -1) in slot 3, every other
    # slot as SCN's (so SCN weights land on SCN's offsets).
    expected = {1: [[0], [-1], [1]],
                2: [[0, 0], [1, -1], [-1, 0], [0, -1], [1, 0], [-1, 1], [0, 1]],
                3: [[0, 0, 0], [0, 0, -1], [1, 0, -1], [0, 1, -1], [0, -1, 0], [1, -1, 0],
                    [-1, 0, 0], [1, 0, 0], [-1, 1, 0], [0, 1, 0], [0, -1, 1], [-1, 0, 1],
                    [0, 0, 1]]}
    if d in expected:
        assert offsets.tolist() == expected[d]


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_permutohedral_submanifold_convolution(rng, d, groups):
    x = sparse(rng, SHAPES[d], channels=4, density=0.5)
    layer = scn.PermutohedralSubmanifoldConvolution(d, 4, 6, True, groups=groups)
    layer.bias.data[:] = rng.standard_normal(6)
    y = layer(x)
    assert y.sites is x.sites
    weight = ref.expand_groups(w64(layer.weight))
    sites = site_dict(x)
    expected = np.tile(w64(layer.bias), (x.n_active, 1))
    for row, (b, *c) in enumerate(x.indices.tolist()):
        for k, off in enumerate(permutohedral_offsets(d).tolist()):
            other = sites.get((b, *np.add(c, off).tolist()))
            if other is not None:
                expected[row] += x.features[other].astype(np.float64) @ weight[k]
    close(y.features, expected)


# -- randomized strides ---------------------------------------------------------------------
def window_starts(shape, f, s, seed):
    """Per axis, the window starts a seeded randomized op uses: read from the rulebook of
    the same draw on a grid with every site active (the draw depends only on the sizes)."""
    d = len(shape)
    full = np.argwhere(np.ones(shape, bool))
    indices = np.concatenate([np.zeros((len(full), 1), np.int64), full], axis=1)
    probe = sg.SparseTensor(np.zeros((len(full), 1)), indices, shape)
    rulebook, sites = probe.grid.randomized_strided(probe.sites, f, s,
                                                    np.random.default_rng(seed))
    rows_in, rows_out = rulebook.pairs(0)      # offset 0: input = window start
    starts = []
    for axis in range(d):
        out_coord = sites.indices[rows_out, 1 + axis]
        in_coord = probe.indices[rows_in, 1 + axis]
        n_out = sites.spatial_shape[axis]
        start = np.full(n_out, -1)
        start[out_coord] = in_coord
        starts.append(start)
    return starts


def window_reference(x, starts, f, weight=None, pool="conv"):
    """Brute force over windows: {output site: value} of a conv (weight (K, Cin, Cout)),
    max pooling or the list of (input row, output site, offset) memberships."""
    d = x.dimension
    memberships = []
    for row, (b, *c) in enumerate(x.indices.tolist()):
        choices = []
        for axis in range(d):
            choices.append([(o, c[axis] - st) for o, st in enumerate(starts[axis])
                            if 0 <= c[axis] - st < f])
        for combo in np.ndindex(*[len(ch) for ch in choices]):
            out = tuple(choices[a][j][0] for a, j in enumerate(combo))
            taps = [choices[a][j][1] for a, j in enumerate(combo)]
            k = int(np.ravel_multi_index(taps, (f,) * d))
            memberships.append((row, (b, *out), k))
    return memberships


def check_starts(starts, in_shape, f, s):
    for start, size in zip(starts, in_shape):
        steps = np.diff(start)
        assert start[0] == 0 and start[-1] == size - f
        assert set(steps.tolist()) <= {s - 1, s, s + 1}
        third = len(steps) // 3
        assert (steps == s - 1).sum() == third and (steps == s + 1).sum() == third


@pytest.mark.parametrize("d, out_shape, f, s", [(1, (10,), 3, 2), (2, (7, 5), 3, 2),
                                               (2, (6, 7), 4, 3), (3, (4, 4, 5), 3, 2)])
def test_randomized_stride_convolution_train(rng, d, out_shape, f, s):
    in_shape = tuple((o - 1) * s + f for o in out_shape)
    x = sparse(rng, in_shape, channels=3, density=0.35)
    layer = scn.RandomizedStrideConvolution(d, 3, 4, f, s, True)
    layer.bias.data[:] = rng.standard_normal(4)
    scn.manual_seed(11)
    y = layer(x)
    starts = window_starts(in_shape, f, s, 11)
    check_starts(starts, in_shape, f, s)
    members = window_reference(x, starts, f)
    assert {row for row, _, _ in members} == set(range(x.n_active))   # f > s: all covered
    out_sites = sorted({site for _, site, _ in members})
    np.testing.assert_array_equal(y.indices, np.array(out_sites).reshape(-1, d + 1))
    assert y.spatial_shape == out_shape
    assert (y.indices[:, 1:] < np.array(out_shape)).all() and (y.indices >= 0).all()
    position = {site: i for i, site in enumerate(out_sites)}
    weight = w64(layer.weight)
    expected = np.tile(w64(layer.bias), (len(out_sites), 1))
    for row, site, k in members:
        expected[position[site]] += x.features[row].astype(np.float64) @ weight[k]
    close(y.features, expected)
    # The rulebook: every pair is one membership; unique inputs and outputs per offset.
    rulebook, sites = x.grid.randomized_strided(x.sites, f, s, np.random.default_rng(11))
    np.testing.assert_array_equal(sites.indices, y.indices)
    pairs = set()
    for k in range(rulebook.n_offsets):
        rows_in, rows_out = rulebook.pairs(k)
        assert len(set(rows_in.tolist())) == len(rows_in)
        assert len(set(rows_out.tolist())) == len(rows_out)
        pairs |= {(i, tuple(sites.indices[o]), k) for i, o in zip(rows_in.tolist(),
                                                                   rows_out.tolist())}
    assert pairs == set(members)
    # A Deconvolution goes back through the same windows, onto the input's sites.
    up = scn.Deconvolution(d, 4, 2, f, s, False)
    z = up(y)
    assert z.sites is x.sites
    back = np.zeros((x.n_active, 2))
    for row, site, k in members:
        back[row] += values(y)[position[site]] @ w64(up.weight)[k]
    close(z.features, back)


def test_randomized_stride_deconvolution_is_the_exact_adjoint(rng):
    x = sparse(rng, (13, 11), channels=3, dtype=np.float64, density=0.4)
    w = rng.standard_normal((9, 3, 4))
    y = F.randomized_conv(x, w, None, 3, 2, np.random.default_rng(3))
    g = rng.standard_normal((y.n_active, 4))
    back = F.deconv(y.with_features(g), np.ascontiguousarray(w.transpose(0, 2, 1)), None, 3, 2)
    np.testing.assert_allclose(np.sum(y.features * g), np.sum(x.features * back.features),
                               rtol=1e-12)


def test_randomized_stride_draws_differ_and_eval_is_plain(rng):
    x = sparse(rng, (15, 15), channels=2, density=0.3)
    layer = scn.RandomizedStrideConvolution(2, 2, 3, 3, 2, False)
    starts = [window_starts((15, 15), 3, 2, seed) for seed in range(4)]
    assert any(not np.array_equal(starts[0][0], other[0]) for other in starts[1:])
    outputs = []
    for seed in (0, 1):
        scn.manual_seed(seed)
        outputs.append(layer(x))
    assert not (np.array_equal(outputs[0].indices, outputs[1].indices)
                and np.array_equal(outputs[0].features, outputs[1].features))
    layer.eval()
    plain = F.conv(x, layer.weight.data, None, 3, 2)
    y = layer(x)
    assert y.sites is plain.sites
    np.testing.assert_array_equal(values(y), plain.features)
    pool = scn.RandomizedStrideMaxPooling(2, 3, 2).eval()
    np.testing.assert_array_equal(pool(x).features, F.max_pool(x, 3, 2).features)


@pytest.mark.parametrize("d, out_shape", [(1, (9,)), (2, (6, 7)), (3, (4, 5, 4))])
def test_randomized_stride_max_pooling_train(rng, d, out_shape):
    f, s = 3, 2
    in_shape = tuple((o - 1) * s + f for o in out_shape)
    x = sparse(rng, in_shape, channels=3, density=0.35)
    layer = scn.RandomizedStrideMaxPooling(d, f, s)
    scn.manual_seed(4)
    y = layer(x)
    starts = window_starts(in_shape, f, s, 4)
    check_starts(starts, in_shape, f, s)
    members = window_reference(x, starts, f)
    assert {row for row, _, _ in members} == set(range(x.n_active))
    out_sites = sorted({site for _, site, _ in members})
    np.testing.assert_array_equal(y.indices, np.array(out_sites).reshape(-1, d + 1))
    position = {site: i for i, site in enumerate(out_sites)}
    expected = np.full((len(out_sites), 3), -np.inf)
    for row, site, _ in members:
        expected[position[site]] = np.maximum(expected[position[site]], x.features[row])
    close(y.features, expected)
    # UnPooling sends each coarse value back to every input of its window.
    fine = scn.UnPooling(d, f, s)(y)
    assert fine.sites is x.sites
    back = np.zeros((x.n_active, 3))
    for row, site, _ in members:
        back[row] += values(y)[position[site]]
    close(fine.features, back)


def test_randomized_stride_with_filter_not_larger_than_stride_is_not_randomised(rng):
    # Steps of s + 1 between windows of size f <= s would leave inputs in no window, so
    # such filters keep the plain windows (as strides of 1 do).
    x = sparse(rng, (12, 12), channels=2, density=0.4)
    scn.manual_seed(0)
    y = scn.RandomizedStrideMaxPooling(2, 2, 2)(x)
    plain = F.max_pool(x, 2, 2)
    np.testing.assert_array_equal(y.indices, plain.indices)
    np.testing.assert_array_equal(y.features, plain.features)


# -- input and output layers -----------------------------------------------------------------
def scn_rows(rng, shape, batch, n_rows, channels=2, duplicates=True):
    """Rows in SCN's form: coordinates (N, D + 1) with the batch LAST, with repeats."""
    sites = ref.random_sites(rng, shape, batch, density=0.4)
    picks = rng.integers(0, len(sites), n_rows) if duplicates else rng.permutation(len(sites))
    batch_first = sites[picks]
    coords = np.concatenate([batch_first[:, 1:], batch_first[:, :1]], axis=1).astype(np.int64)
    return coords, rng.standard_normal((len(picks), channels)).astype(np.float32), batch_first


@pytest.mark.parametrize("mode, name", [(0, "unique"), (1, "first"), (2, "last"), (3, "sum"),
                                        (4, "mean"), ("max", "max"), ("first", "first")])
def test_input_layer_modes_with_scn_coordinates(rng, mode, name):
    coords, feats, batch_first = scn_rows(rng, (6, 5), 3, 40, duplicates=mode != 0)
    layer = scn.InputLayer(2, (6, 5), mode=mode)
    assert layer.mode == name
    x = layer([coords, feats])
    sites, merged, row_site, kept = ref.input_layer(batch_first, feats.astype(np.float64),
                                                    name)
    np.testing.assert_array_equal(x.indices, sites)
    np.testing.assert_allclose(x.features, merged, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(x.get_spatial_locations(),
                                  np.concatenate([sites[:, 1:], sites[:, :1]], axis=1))
    assert x.spatial_shape == (6, 5) and x.batch_size == batch_first[:, 0].max() + 1
    # OutputLayer: every row gets its site's features; with 'first'/'last' only the kept row.
    rows = scn.OutputLayer(2)(x)
    expected = np.asarray(x.features)[row_site]
    if name in ("first", "last"):
        chosen = np.zeros(len(coords), bool)
        chosen[kept] = True
        expected = np.where(chosen[:, None], expected, 0)
    np.testing.assert_array_equal(rows, expected)
    if name == "unique":
        np.testing.assert_array_equal(rows, feats)    # the round trip restores row order


@pytest.mark.parametrize("mode", range(5))
def test_input_and_output_layer_reproduce_scn(mode):
    g = golden(f"2d_inputlayer_mode{mode}")
    x = scn.InputLayer(2, g["spatial_size"], mode=mode)([g["coords"], g["feats"]])
    ours = by_coordinate(x.get_spatial_locations(), x.features)
    theirs = by_coordinate(g["out_coords"], g["out_feats"])
    assert ours.keys() == theirs.keys()
    for site, value in theirs.items():
        np.testing.assert_allclose(ours[site], value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scn.OutputLayer(2)(x), g["outputlayer_out"], rtol=1e-5,
                               atol=1e-6)


def test_input_layer_without_batch_column_and_batch_size(rng):
    coords = np.array([[3, 1], [0, 0], [3, 1], [2, 4]])
    feats = np.arange(8, dtype=np.float32).reshape(4, 2)
    x = scn.InputLayer(2, 5)([coords, feats])
    np.testing.assert_array_equal(x.indices, [[0, 0, 0], [0, 2, 4], [0, 3, 1]])
    np.testing.assert_array_equal(x.features, [[2, 3], [6, 7], [0 + 4, 1 + 5]])   # mode 3
    assert x.batch_size == 1
    np.testing.assert_array_equal(x.get_spatial_locations()[:, 2], 0)
    # batch_size is a lower bound (SCN): empty trailing samples are allowed.
    with_batch = np.array([[1, 1, 0], [2, 2, 1]])
    y = scn.InputLayer(2, 5)([with_batch, feats[:2], 4])
    assert y.batch_size == 4
    assert scn.InputLayer(2, 5)([with_batch, feats[:2], 1]).batch_size == 2
    assert scn.InputLayer(2, 5)(scn.InputLayerInput(coords, feats)).n_active == 3
    empty = scn.InputLayer(2, 5)([np.zeros((0, 3), np.int64), np.zeros((0, 2), np.float32), 2])
    assert empty.n_active == 0 and empty.batch_size == 2


def test_input_layer_1d_and_3d():
    coords = np.array([[4, 1], [2, 0], [4, 1]])
    x = scn.InputLayer(1, 6, mode=4)([coords, np.array([[1.0], [2.0], [5.0]], np.float32)])
    np.testing.assert_array_equal(x.indices, [[0, 2], [1, 4]])
    np.testing.assert_array_equal(x.features, [[2.0], [3.0]])
    coords3 = np.array([[1, 2, 3, 0], [0, 0, 0, 1]])
    y = scn.InputLayer(3, (2, 3, 4))([coords3, np.ones((2, 1), np.float32)])
    np.testing.assert_array_equal(y.indices, [[0, 1, 2, 3], [1, 0, 0, 0]])


@pytest.mark.parametrize("coords, error, match", [
    ([[0, 5, 0]], ValueError, r"outside \[0, spatial_shape\[1\] = 5\)"),
    ([[5, 0, 0]], ValueError, r"outside \[0, spatial_shape\[0\] = 5\)"),
    ([[0, -1, 0]], ValueError, "outside"),
    ([[0, 0, -1]], ValueError, "batch index is -1"),
    ([[0, 0, 0, 0]], ValueError, r"\(N, 2\) or \(N, 3\)"),
    ([[0]], ValueError, r"\(N, 2\) or \(N, 3\)"),
    ([[0.0, 1.0, 0.0]], TypeError, "integer"),
])
def test_input_layer_rejects_bad_coordinates(coords, error, match):
    with pytest.raises(error, match=match):
        scn.InputLayer(2, 5)([np.array(coords), np.ones((len(coords), 1), np.float32)])


def test_input_layer_other_errors():
    with pytest.raises(ValueError, match=r"rows 0 and 2 are the same site"):
        scn.InputLayer(2, 5, mode=0)([np.array([[1, 1], [2, 2], [1, 1]]),
                                      np.ones((3, 1), np.float32)])
    with pytest.raises(ValueError, match="mode"):
        scn.InputLayer(2, 5, mode=5)
    with pytest.raises(ValueError, match="mode"):
        scn.InputLayer(2, 5, mode="median")
    with pytest.raises(TypeError, match=r"\[coords, features\]"):
        scn.InputLayer(2, 5)(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="rows"):
        scn.InputLayer(2, 5)([np.array([[1, 1]]), np.ones((2, 1), np.float32)])


def test_output_layer_needs_the_input_layer_sites(rng):
    coords, feats, _ = scn_rows(rng, (8, 8), 2, 20)
    x = scn.InputLayer(2, 8)([coords, feats])
    # Down and back up again: the input layer's sites, so the OutputLayer applies.
    y = scn.Deconvolution(2, 2, 2, 2, 2, False)(scn.Convolution(2, 2, 2, 2, 2, False)(x))
    assert scn.OutputLayer(2)(y).shape == (20, 2)
    with pytest.raises(ValueError, match="InputLayer"):
        scn.OutputLayer(2)(sparse(rng, (8, 8), channels=2))
    with pytest.raises(ValueError):
        scn.OutputLayer(2)(scn.MaxPooling(2, 2, 2)(x))


def test_output_layer_rejects_other_sites_with_the_same_count():
    # Four sites in four different 2x2 cells: the pooled tensor has as many sites as the
    # input but is not on the input's sites; mapping it back row by row would be silently
    # wrong.
    coords = np.array([[0, 0, 0], [2, 3, 0], [5, 1, 0], [7, 7, 0]])
    x = scn.InputLayer(2, 8)([coords, np.ones((4, 1), np.float32)])
    pooled = scn.MaxPooling(2, 2, 2)(x)
    assert pooled.n_active == x.n_active
    with pytest.raises(ValueError, match="InputLayer"):
        scn.OutputLayer(2)(pooled)


def bl_batch(rng, shape=(5, 6), b=3, length=7, channels=2):
    """Padded coords (B, L, D) with -1 rows and duplicates, features (B, L, C)."""
    coords = rng.integers(0, 3, (b, length, len(shape)))       # a small range: duplicates
    pad = rng.random((b, length)) < 0.3
    pad[1] = True                                                # an empty sample
    coords[pad] = -1
    coords[0, 2] = (-1, 4)                                       # first coordinate < 0: empty
    coords[2, 3] = coords[2, 5] = coords[0, 4] = coords[0, 6] = (1, 1)   # duplicates
    feats = rng.standard_normal((b, length, channels)).astype(np.float32)
    return coords, feats


def bl_reference_rows(coords):
    valid = np.flatnonzero(coords[:, :, 0].reshape(-1) >= 0)
    batch = valid // coords.shape[1]
    return valid, np.concatenate([batch[:, None], coords.reshape(-1, coords.shape[2])[valid]],
                                 axis=1)


@pytest.mark.parametrize("mode, name", [(1, "last"), (2, "first"), (3, "sum"), (4, "mean")])
def test_bl_input_and_output_layers(rng, mode, name):
    # BL layers: mode 1 keeps the LAST duplicate, 2 the FIRST (as SCN; the opposite of
    # InputLayer's measured behaviour).
    coords, feats = bl_batch(rng)
    layer = scn.BLInputLayer(2, (5, 6), mode)
    assert layer.mode == name
    x = layer([coords, feats])
    valid, rows = bl_reference_rows(coords)
    flat = feats.reshape(-1, feats.shape[2]).astype(np.float64)
    sites, merged, row_site, kept = ref.input_layer(rows, flat[valid], name)
    assert len(sites) < len(rows)                                # duplicates were merged
    np.testing.assert_array_equal(x.indices, sites)
    np.testing.assert_allclose(x.features, merged, rtol=1e-6, atol=1e-6)
    assert x.batch_size == 3
    out = scn.BLOutputLayer(2)(x)
    assert out.shape == feats.shape
    expected = np.zeros(flat.shape)
    per_row = np.asarray(x.features, np.float64)[row_site]
    if name in ("first", "last"):
        chosen = np.zeros(len(valid), bool)
        chosen[kept] = True
        per_row = np.where(chosen[:, None], per_row, 0)
    expected[valid] = per_row
    np.testing.assert_allclose(out, expected.reshape(feats.shape), rtol=1e-6)
    np.testing.assert_array_equal(out[1], 0)


def test_bl_layers_errors(rng):
    coords, feats = bl_batch(rng)
    with pytest.raises(ValueError, match=r"\(B, L, 2\)"):
        scn.BLInputLayer(2, 5)([coords[:, :, :1], feats])
    with pytest.raises(ValueError, match="features must have shape"):
        scn.BLInputLayer(2, 5)([coords, feats[:, :3]])
    bad = coords.copy()
    bad[0, 0] = (1, -2)                                          # first >= 0: a real row
    with pytest.raises(ValueError, match="outside"):
        scn.BLInputLayer(2, 5)([bad, feats])
    with pytest.raises(ValueError, match="BLInputLayer"):
        scn.BLOutputLayer(2)(sparse(rng, (5, 6), channels=2))


# -- dense heads and global pooling ------------------------------------------------------------
def test_linear_and_flatten(rng):
    lin = scn.Linear(6, 3)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    close(lin(x), x.astype(np.float64) @ w64(lin.weight).T + w64(lin.bias))
    s = sparse(rng, (5, 5), channels=6)
    close(lin(s).features, np.asarray(s.features, np.float64) @ w64(lin.weight).T
          + w64(lin.bias))
    assert scn.Linear(6, 3, bias=False).bias is None
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        lin(np.zeros((4, 5), np.float32))
    images = rng.standard_normal((2, 3, 4, 5))
    np.testing.assert_array_equal(scn.Flatten()(images).data, images.reshape(2, 60))


@pytest.mark.parametrize("layer, mode", [(scn.GlobalMaxPooling(), "max"),
                                         (scn.GlobalAveragePooling(), "mean"),
                                         (scn.GlobalSumPooling(), "sum")])
def test_global_pooling(rng, layer, mode):
    x = sparse(rng, SHAPES[2], channels=3, batch=4, empty=(2,))
    close(layer(x), ref.global_pool(np.asarray(x.features, np.float64), x.indices, 4, mode))


# --------------------------------------------------------------------------------------
# 4. Containers and spatial sizes
# --------------------------------------------------------------------------------------
def test_concat_join_add_tables(rng):
    x = sparse(rng, SHAPES[2], channels=3)
    a, b = scn.NetworkInNetwork(3, 2), scn.NetworkInNetwork(3, 2)
    outputs = scn.ConcatTable(a, b, scn.Identity())(x)
    assert isinstance(outputs, list) and len(outputs) == 3 and outputs[2] is x
    fa, fb = np.asarray(x.features, np.float64) @ w64(a.weight), \
        np.asarray(x.features, np.float64) @ w64(b.weight)
    joined = scn.JoinTable()(outputs)
    assert joined.sites is x.sites
    close(joined.features, np.concatenate([fa, fb, x.features], axis=1))
    close(scn.AddTable()(outputs[:2]).features, fa + fb)
    table = scn.ConcatTable().add(a).add(b)
    assert len(table) == 2 and table[1] is b and list(table) == [a, b]


def test_join_and_add_tables_check_their_inputs(rng):
    x = sparse(rng, SHAPES[2], channels=3)
    other = sparse(rng, SHAPES[2], channels=3)
    with pytest.raises(ValueError, match="same sites"):
        scn.JoinTable()([x, other])
    with pytest.raises(ValueError, match="same sites"):
        scn.AddTable()([x, other])
    with pytest.raises(ValueError, match=r"equal channel counts; got \[2, 3\]"):
        scn.AddTable()([x, scn.NetworkInNetwork(3, 2)(x)])
    with pytest.raises(TypeError, match="list"):
        scn.JoinTable()(x)
    with pytest.raises(TypeError, match="not a SparseTensor"):
        scn.AddTable()([x, x.features])
    # Equal sites in a different tensor (same rows) are accepted.
    twin = sg.SparseTensor(x.features, x.indices, x.spatial_shape, x.batch_size)
    close(scn.AddTable()([x, twin]).features, 2 * np.asarray(x.features, np.float64))


def test_sequential_editing(rng):
    a, b, c = scn.ReLU(), scn.Tanh(), scn.Sigmoid()
    seq = scn.Sequential(a)
    assert seq.add(b) is seq and seq.append(c) is seq
    assert list(seq) == [a, b, c] and len(seq) == 3 and seq[-1] is c
    d = scn.ELU()
    assert seq.insert(1, d) is seq
    assert list(seq) == [a, d, b, c]
    assert [name for name, _ in seq.named_children()] == ["0", "1", "2", "3"]
    seq.insert(-1, scn.SELU())
    assert [type(m).__name__ for m in seq] == ["ReLU", "ELU", "Tanh", "SELU", "Sigmoid"]
    with pytest.raises(IndexError):
        seq.insert(9, scn.ReLU())
    with pytest.raises(TypeError, match="Module"):
        seq.add(lambda t: t)
    part = seq[1:3]
    assert isinstance(part, scn.Sequential) and list(part) == [d, b]
    assert len(seq) == 5                                         # slicing copies nothing
    joined = seq + scn.Sequential(scn.ReLU(), scn.Tanh())
    assert len(joined) == 7 and len(seq) == 5 and joined[0] is a
    assert len(seq + scn.ReLU()) == 6
    x = sparse(rng, SHAPES[1], channels=2)
    expected = 1 / (1 + np.exp(-np.tanh(np.maximum(x.features.astype(np.float64), 0))))
    close(scn.Sequential(a, b, c)(x).features, expected, 1e-6)
    # Keys after insert are renumbered (SCN/PyTorch naming).
    net = scn.Sequential(scn.NetworkInNetwork(2, 2)).insert(0, scn.BatchNormalization(2))
    assert list(net.state_dict())[:2] == ["0.weight", "0.bias"]
    assert list(net.state_dict())[-1] == "1.weight"


def test_input_spatial_size():
    assert list(scn.Convolution(2, 1, 1, 3, 2, False).input_spatial_size(np.array([5, 4]))) \
        == [11, 9]
    assert list(scn.Convolution(2, 1, 1, (3, 2), (2, 1), False).input_spatial_size(5)) == [11, 6]
    assert list(scn.MaxPooling(3, 3, 2).input_spatial_size(4)) == [9, 9, 9]
    assert list(scn.AveragePooling(1, 2, 2).input_spatial_size([3])) == [6]
    assert list(scn.Deconvolution(2, 1, 1, 3, 2, False).input_spatial_size([11, 9])) == [5, 4]
    assert list(scn.FullConvolution(1, 1, 1, 2, 2, False).input_spatial_size([8])) == [4]
    with pytest.raises(ValueError, match="no input size"):
        scn.Deconvolution(2, 1, 1, 3, 2, False).input_spatial_size([10, 9])
    # UnPooling: the inverse of the op (SCN returns (o - 1) s + f here, which is wrong).
    assert list(scn.UnPooling(2, 3, 2).input_spatial_size([11, 9])) == [5, 4]
    assert scn.SubmanifoldConvolution(2, 1, 1, 3, False).input_spatial_size(7) == 7
    assert scn.BatchNormReLU(3).input_spatial_size(7) == 7
    seq = scn.Sequential(scn.Convolution(2, 1, 1, 2, 2, False), scn.MaxPooling(2, 3, 2),
                         scn.SubmanifoldConvolution(2, 1, 1, 3, False))
    assert list(seq.input_spatial_size(np.array([4, 4]))) == [18, 18]
    # ConcatTable delegates to its first branch.
    table = scn.ConcatTable(scn.MaxPooling(2, 3, 2), scn.Identity())
    assert list(table.input_spatial_size([4, 4])) == [9, 9]


# --------------------------------------------------------------------------------------
# 5. Gradients (float64 finite differences)
# --------------------------------------------------------------------------------------
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
    check_module_gradients(net, x)


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


# --------------------------------------------------------------------------------------
# 6. Determinism
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
    assert isinstance(y.features, np.ndarray), "inference under no_grad: plain arrays"
    z = net(x)
    assert z.features.requires_grad and z.features._inputs != ()
    np.testing.assert_array_equal(values(y), values(z))


# --------------------------------------------------------------------------------------
# Review fixes: silent traps turned into errors
# --------------------------------------------------------------------------------------
def test_assigning_an_array_to_a_parameter_raises():
    conv = scn.SubmanifoldConvolution(2, 3, 4, 3, True)
    with pytest.raises(TypeError, match="parameter 'weight'"):
        conv.weight = np.zeros((9, 3, 4), np.float32)
    assert list(conv.state_dict()) == ["weight", "bias"]
    conv.bias = None                                   # removing a parameter is allowed
    assert list(conv.state_dict()) == ["weight"]


def test_sequential_slices_keep_their_keys():
    net = scn.Sequential(scn.NetworkInNetwork(2, 3), scn.ReLU(), scn.NetworkInNetwork(3, 4))
    assert list(net[1:].state_dict()) == ["2.weight"]
    assert net[2] is list(net)[2]


def test_transposed_input_spatial_size_must_be_exact():
    assert scn.UnPooling(2, 3, 2).input_spatial_size(np.array([9, 9])).tolist() == [4, 4]
    with pytest.raises(ValueError, match="multiple of the stride"):
        scn.UnPooling(2, 3, 2).input_spatial_size(np.array([10, 10]))


def test_losses_refuse_broadcasting_shapes(rng):
    scores, targets = rng.standard_normal((5, 1)), rng.random(5)
    with pytest.raises(ValueError, match="same shape"):
        ops.mse_loss(scores, targets)
    with pytest.raises(ValueError, match="same shape"):
        ops.binary_cross_entropy_with_logits(scores, targets)


def test_dtype_mismatch_names_the_cure(rng):
    conv = scn.SubmanifoldConvolution(2, 3, 4, 3, False)
    x = sparse(rng, (5, 5), channels=3, dtype=np.float64)
    with pytest.raises(TypeError, match=r"\.double\(\)"):
        conv(x)


# --------------------------------------------------------------------------------------
# SCN's helpers: append_tensors, compare_sparse, functional Join/Add, VerboseIdentity
# --------------------------------------------------------------------------------------
def test_append_tensors_concatenates_batches(rng):
    a, b = sparse(rng, (5, 6), batch=2), sparse(rng, (5, 6), batch=3, empty=(1,))
    joined = scn.append_tensors([a, b])
    assert joined.batch_size == 5
    expected = np.concatenate([dense(a), dense(b)], axis=0)
    np.testing.assert_array_equal(dense(joined), expected)
    with pytest.raises(ValueError, match="tensor 1"):
        scn.append_tensors([a, sparse(rng, (5, 7))])
    fa, fb = a.features.astype(np.float64), b.features.astype(np.float64)
    check_gradients(lambda f, g: scn.append_tensors(
        [a.with_features(f), b.with_features(g)]).features, [fa, fb])


def test_compare_sparse_is_the_mean_squared_difference_over_the_union(rng):
    x = sparse(rng, (6, 6), batch=2, dtype=np.float64)
    y = sparse(rng, (6, 6), batch=2, dtype=np.float64)
    dx, dy = dense(x), dense(y)
    union = ((np.abs(dx).sum(axis=1) > 0) | (np.abs(dy).sum(axis=1) > 0)).sum()
    expected = ((dx - dy) ** 2).sum() / union
    assert abs(float(data_of(scn.compare_sparse(x, y))) - expected) < 1e-12
    check_gradients(lambda f, g: scn.compare_sparse(x.with_features(f), y.with_features(g)),
                    [x.features, y.features])


def test_functional_tables_and_verbose_identity(rng, capsys):
    x = sparse(rng, (5, 5), channels=2)
    y = x.with_features(x.features * 2)
    close(scn.concatenate_feature_planes([x, y]).features,
          np.concatenate([values(x), values(y)], axis=1))
    close(scn.add_feature_planes([x, y]).features, 3 * values(x))
    assert scn.VerboseIdentity()(x) is x
    assert "SparseTensor(" in capsys.readouterr().out


def test_checkpointed_sequential_gives_the_same_values_and_gradients(rng):
    x0 = sparse(rng, (9, 9), channels=3, dtype=np.float64)

    def run(cls):
        scn.manual_seed(1)
        net = cls(scn.SubmanifoldConvolution(2, 3, 4, 3, True), scn.BatchNormLeakyReLU(4),
                  scn.Dropout(0.3), scn.Convolution(2, 4, 5, 3, 2, False)).double()
        scn.manual_seed(5)                                  # the same dropout masks
        leaf = Tensor(np.array(x0.features), requires_grad=True)
        y = net(x0.with_features(leaf))
        ops.sum(ops.mul(y.features, y.features)).backward()
        return y, leaf.grad, [p.grad for p in net.parameters()]

    plain, checkpointed = run(scn.Sequential), run(scn.CheckpointedSequential)
    np.testing.assert_array_equal(values(plain[0]), values(checkpointed[0]))
    np.testing.assert_array_equal(plain[1], checkpointed[1])
    for a, b in zip(plain[2], checkpointed[2]):
        np.testing.assert_array_equal(a, b)
    # Nothing of the inner layers is kept for the backward pass: one recorded node.
    scn.manual_seed(1)
    net = scn.CheckpointedSequential(scn.SubmanifoldConvolution(2, 3, 4, 3, True),
                                     scn.ReLU()).double()
    y = net(x0.with_features(Tensor(np.array(x0.features), requires_grad=True)))
    assert all(not getattr(t, "_inputs", ()) for t in y.features._inputs)
