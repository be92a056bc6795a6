"""sparsegrid.dcls (construct_kernel, dcls_conv, from_dcls_positions) and the DCLS layers
of sparsegrid.nn (ConstructKernel1d/2d/3d, Dcls1d/2d/3d).

The kernels are checked against an independent float64 reference written below from the
formulas alone: plain Python loops over every tap and every cell of the dilated kernel,
the full (non-separable) interpolation of each tap normalised by its sum over the whole
kernel -- not the per-axis profiles and GEMMs the library uses. The convolutions are
checked against sparsegrid.denseconv with the reference kernel; gradients against float64
central differences at fractional positions (bilinear gradients have kinks at integer
positions); the CuPy path (the ``gpu_device`` fixture) against NumPy's.
"""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np
import pytest

import sparsegrid.nn as nn
from sparsegrid import autodiff as ad
from sparsegrid import backend, dcls, denseconv
from sparsegrid.nn.optim import SGD

VERSIONS = ("v0", "v1", "gauss", "max")
SPREAD = {"v0": False, "v1": False, "gauss": True, "max": True}
SIZES = [(7,), (4,), (5, 5), (7, 3), (4, 9), (3, 5, 4), (5, 5, 5)]


# -- the independent reference -------------------------------------------------------------
def _interpolation(cell, q, sig, version):
    """The weight tap at position ``q`` (one float per axis) gives ``cell``, unnormalised."""
    if version == "gauss":
        exponent = 0.0
        for d in range(len(q)):
            exponent += ((cell[d] - q[d]) / (abs(sig[d]) + 0.27)) ** 2
        return math.exp(-0.5 * exponent)
    value = 1.0
    for d in range(len(q)):
        if version == "v0":
            low = math.floor(q[d])
            frac = q[d] - low
            value *= (1 - frac) if cell[d] == low else frac if cell[d] == low + 1 else 0.0
        elif version == "v1":
            value *= max(0.0, 1 - abs(cell[d] - q[d]))
        else:   # max
            value *= max(0.0, abs(sig[d]) + 1 - abs(cell[d] - q[d]))
    return value


def reference_kernel(weight, P, SIG, sizes, version, axis_of=None):
    """float64 ``(Cout, Cin/g, *sizes)``: for every tap, its interpolation at every cell,
    normalised over the kernel (all but 'v0'), times its weight, summed over taps.

    ``axis_of[d]`` is the kernel axis position ``d`` moves along (default: ``d``, this
    library's convention); dcls 0.1.1's 'v1' / 'gauss' / 'max' use ``D - 1 - d``, centred
    on ``sizes[d] // 2`` all the same."""
    weight, P = np.asarray(weight, np.float64), np.asarray(P, np.float64)
    SIG = None if SIG is None else np.asarray(SIG, np.float64)
    cout, cin_g, kc = weight.shape
    d_axes = len(sizes)
    axis_of = list(range(d_axes)) if axis_of is None else list(axis_of)
    kernel = np.zeros((cout, cin_g) + tuple(sizes))
    for o, c, k in itertools.product(range(cout), range(cin_g), range(kc)):
        q, sig = [0.0] * d_axes, [0.0] * d_axes
        for d in range(d_axes):
            q[axis_of[d]] = P[d, o, c, k] + sizes[d] // 2
            sig[axis_of[d]] = 0.0 if SIG is None else SIG[d, o, c, k]
        values = np.zeros(sizes)
        for cell in itertools.product(*[range(n) for n in sizes]):
            values[cell] = _interpolation(cell, q, sig, version)
        if version != "v0":
            values /= values.sum() + 1e-7
        kernel[o, c] += weight[o, c, k] * values
    return kernel


def _limits(sizes):
    return np.array([n // 2 for n in sizes], np.float64).reshape(-1, 1, 1, 1)


def random_parameters(rng, sizes, version, cout=3, cin_g=2, kc=4, fractional=False):
    """weight, P (inside the kernel) and SIG (None for v0 / v1), float64.

    ``fractional``: every position has a fractional part in [0.3, 0.45] and every |SIG|
    lies in [0.05, 0.15] with either sign, so no interpolation sits at a kink (integer
    positions, |t| = |SIG| + 1 for 'max', SIG = 0)."""
    d_axes = len(sizes)
    shape = (d_axes, cout, cin_g, kc)
    weight = rng.standard_normal((cout, cin_g, kc))
    lim = _limits(sizes)
    if fractional:
        base = np.floor(rng.uniform(-lim, lim, shape))
        P = np.minimum(base, lim - 1) + rng.uniform(0.3, 0.45, shape)
        SIG = rng.choice([-1.0, 1.0], shape) * rng.uniform(0.05, 0.15, shape)
        if version == "gauss":
            SIG = SIG * 4
    else:
        P = rng.uniform(-1, 1, shape) * lim
        SIG = rng.uniform(-0.7, 0.7, shape)
    return weight, P, (SIG if SPREAD[version] else None)


# -- construct_kernel against the reference ---------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("sizes", SIZES, ids=str)
def test_construct_kernel_matches_reference(version, sizes, rng):
    weight, P, SIG = random_parameters(rng, sizes, version)
    got = dcls.construct_kernel(weight, P, SIG, sizes, version)
    expected = reference_kernel(weight, P, SIG, sizes, version)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    assert got.shape == (3, 2) + sizes
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("version", VERSIONS)
def test_construct_kernel_outside_the_kernel(version, rng):
    """check_range=False: taps beyond the edges lose what falls outside ('v0' loses mass,
    the normalised versions renormalise what is left)."""
    sizes = (5, 4)
    weight, P, SIG = random_parameters(rng, sizes, version)
    P = P * 2.2                     # many positions beyond +-(n // 2), some past the edge
    assert np.abs(P).max() > 3
    with pytest.raises(ValueError, match="outside the dilated kernel"):
        dcls.construct_kernel(weight, P, SIG, sizes, version)
    got = dcls.construct_kernel(weight, P, SIG, sizes, version, check_range=False)
    np.testing.assert_allclose(got, reference_kernel(weight, P, SIG, sizes, version),
                               rtol=1e-12, atol=1e-13)


def test_float32_matches_reference(rng):
    for version in VERSIONS:
        weight, P, SIG = random_parameters(rng, (9, 6), version, cout=4, cin_g=3, kc=5)
        expected = reference_kernel(weight, P, SIG, (9, 6), version)
        f32 = [None if a is None else a.astype(np.float32) for a in (weight, P, SIG)]
        got = dcls.construct_kernel(*f32, (9, 6), version)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * np.abs(expected).max())


def test_each_position_moves_along_its_own_axis():
    """One tap, weight 1: P = (+2, -1) in a (7, 5) kernel lands on cell (3 + 2, 2 - 1) --
    upstream dcls 'v1' would put it on column 3 + 2 of a 5-wide axis, i.e. off the kernel."""
    weight = np.ones((1, 1, 1))
    P = np.array([2.0, -1.0]).reshape(2, 1, 1, 1)
    SIG = np.full_like(P, 0.2)
    for version in VERSIONS:
        kernel = dcls.construct_kernel(weight, P, SIG if SPREAD[version] else None, (7, 5),
                                       version)[0, 0]
        assert np.unravel_index(np.argmax(kernel), kernel.shape) == (5, 1), version
    kernel = dcls.construct_kernel(weight, P, None, (7, 5), "v1")[0, 0]
    expected = np.zeros((7, 5))
    expected[5, 1] = 1 / (1 + 1e-7)
    np.testing.assert_allclose(kernel, expected, rtol=1e-15, atol=0)
    # a half-cell shift along axis 1 only splits the tap between two columns of row 3
    P3 = np.array([0.0, 0.5, -1.25]).reshape(3, 1, 1, 1)
    kernel = dcls.construct_kernel(np.ones((1, 1, 1)), P3, None, (3, 5, 7), "v0")[0, 0]
    assert set(zip(*np.nonzero(kernel))) == {(1, 2, 1), (1, 2, 2), (1, 3, 1), (1, 3, 2)}
    np.testing.assert_allclose(kernel[1, 2:4, 1:3], [[0.5 * 0.25, 0.5 * 0.75],
                                                     [0.5 * 0.25, 0.5 * 0.75]], rtol=1e-15)


def test_v0_loses_the_mass_off_the_edge_and_v1_renormalises():
    weight = np.full((1, 1, 1), 2.0)
    P = np.array([2.25]).reshape(1, 1, 1, 1)          # q = 4.25 in a 5-cell kernel
    v0 = dcls.construct_kernel(weight, P, None, 5, "v0", check_range=False)
    v1 = dcls.construct_kernel(weight, P, None, 5, "v1", check_range=False)
    np.testing.assert_allclose(v0[0, 0], [0, 0, 0, 0, 2 * 0.75], rtol=1e-15)
    np.testing.assert_allclose(v1[0, 0], [0, 0, 0, 0, 2 * 0.75 / (0.75 + 1e-7)], rtol=1e-15)
    # an even size: P = +n // 2 is accepted by the range check, and has no mass inside
    P = np.array([2.0]).reshape(1, 1, 1, 1)
    np.testing.assert_array_equal(dcls.construct_kernel(weight, P, None, 4, "v1"), 0)


def test_v1_and_v0_agree_inside_and_ignore_sig(rng):
    weight, P, _ = random_parameters(rng, (7, 5), "v1")      # odd sizes: never off an edge
    v0 = dcls.construct_kernel(weight, P, None, (7, 5), "v0")
    v1 = dcls.construct_kernel(weight, P, np.ones_like(P), (7, 5), "v1")   # SIG ignored
    np.testing.assert_allclose(v1 * (1 + 1e-7), v0, rtol=1e-12, atol=1e-14)
    assert not np.allclose(v0, dcls.construct_kernel(weight, P + 0.1, None, (7, 5), "v0"))


def test_max_with_zero_spread_is_v1(rng):
    weight, P, _ = random_parameters(rng, (6, 5), "v1")
    np.testing.assert_allclose(
        dcls.construct_kernel(weight, P, np.zeros_like(P), (6, 5), "max"),
        dcls.construct_kernel(weight, P, None, (6, 5), "v1"), rtol=1e-13, atol=1e-15)


def test_an_int_dilated_size_means_every_axis(rng):
    weight, P, SIG = random_parameters(rng, (5, 5, 5), "gauss")
    np.testing.assert_array_equal(dcls.construct_kernel(weight, P, SIG, 5),
                                  dcls.construct_kernel(weight, P, SIG, (5, 5, 5)))


# -- gradients --------------------------------------------------------------------------------
def _kernel_fn(sizes, version, check_range=True):
    if SPREAD[version]:
        return lambda w, p, s: dcls.construct_kernel(w, p, s, sizes, version, check_range)
    return lambda w, p: dcls.construct_kernel(w, p, None, sizes, version, check_range)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("sizes", [(6,), (5, 4), (4, 7), (4, 3, 5)], ids=str)
def test_construct_kernel_gradients(version, sizes, rng):
    weight, P, SIG = random_parameters(rng, sizes, version, cout=2, cin_g=2, kc=3,
                                       fractional=True)
    inputs = [weight, P] + ([SIG] if SPREAD[version] else [])
    ad.check_gradients(_kernel_fn(sizes, version), inputs, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("version", VERSIONS)
def test_gradients_through_the_normaliser_off_the_edges(version, rng):
    """Taps partly outside the kernel (check_range=False): the normaliser's gradient."""
    sizes = (5, 4)
    weight, P, SIG = random_parameters(rng, sizes, version, cout=2, cin_g=1, kc=4,
                                       fractional=True)
    P[0, :, :, :2] += 2.0           # q in (4.3, 5.45): partly or wholly past the last row
    P[1, :, :, 2:] -= 2.0           # q in (-1.7, 0.45): partly before the first column
    inputs = [weight, P] + ([SIG] if SPREAD[version] else [])
    ad.check_gradients(_kernel_fn(sizes, version, check_range=False), inputs, rtol=1e-6,
                       atol=1e-8)


def test_bilinear_position_gradient_is_zero_at_integer_positions():
    weight = np.ones((1, 1, 2))
    P = np.array([[1.0, -2.0], [0.0, 1.0]]).reshape(2, 1, 1, 2)
    p = ad.Tensor(P, requires_grad=True)
    kernel = dcls.construct_kernel(ad.Tensor(weight), p, None, (5, 5), "v1")
    kernel.backward(np.random.default_rng(0).standard_normal(kernel.shape))
    np.testing.assert_array_equal(p.grad, 0)
    # a 'max' spread of exactly 0 (its initialisation) receives gradient 0, as in DCLS
    sig = ad.Tensor(np.zeros_like(P), requires_grad=True)
    kernel = dcls.construct_kernel(weight, P + 0.3, sig, (5, 5), "max")
    kernel.backward(np.ones(kernel.shape))
    np.testing.assert_array_equal(sig.grad, 0)


def test_only_requested_gradients_are_computed(rng):
    weight, P, SIG = random_parameters(rng, (5, 5), "gauss")
    p = ad.Tensor(P, requires_grad=True)
    w = ad.Tensor(weight)
    out = dcls.construct_kernel(w, p, SIG, (5, 5), "gauss")
    assert isinstance(out, ad.Tensor) and out.requires_grad
    ad.sum(out * out).backward()
    assert p.grad is not None and p.grad.shape == P.shape and w.grad is None
    with ad.no_grad():
        out = dcls.construct_kernel(ad.Tensor(weight, requires_grad=True), P, SIG, 5)
    assert isinstance(out, ad.Tensor) and not out.requires_grad


CONV_CASES = {
    "2d": dict(sizes=(7, 5), cin=4, cout=6, groups=1, stride=1, padding=(3, 2), spatial=(9, 8)),
    "2d-groups-stride": dict(sizes=(5, 6), cin=4, cout=6, groups=2, stride=(2, 1),
                             padding=(1, 3), spatial=(11, 9)),
    "depthwise": dict(sizes=(9, 9), cin=3, cout=6, groups=3, stride=1, padding=4,
                      spatial=(10, 12)),
    "1d": dict(sizes=(11,), cin=2, cout=3, groups=1, stride=2, padding=0, spatial=(23,)),
    "3d": dict(sizes=(3, 5, 4), cin=2, cout=2, groups=2, stride=(1, 2, 1), padding=(1, 2, 0),
               spatial=(5, 7, 6)),
    "same": dict(sizes=(4, 7), cin=2, cout=2, groups=1, stride=1, padding="same",
                 spatial=(8, 9)),
}


def _conv_case(name, version, rng, fractional=False):
    case = CONV_CASES[name]
    weight, P, SIG = random_parameters(rng, case["sizes"], version, cout=case["cout"],
                                       cin_g=case["cin"] // case["groups"], kc=3,
                                       fractional=fractional)
    x = rng.standard_normal((2, case["cin"]) + case["spatial"])
    bias = rng.standard_normal(case["cout"])
    return x, weight, P, SIG, bias, case


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_dcls_conv_matches_dense_conv_with_reference_kernel(name, version, rng):
    x, weight, P, SIG, bias, case = _conv_case(name, version, rng)
    got = dcls.dcls_conv(x, weight, P, SIG, bias, case["sizes"], case["stride"],
                         case["padding"], case["groups"], version)
    kernel = reference_kernel(weight, P, SIG, case["sizes"], version)
    expected = denseconv.conv(x, kernel, bias, stride=case["stride"], padding=case["padding"],
                              groups=case["groups"])
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-11)


def test_dcls_conv_channels_last(rng):
    x, weight, P, SIG, bias, case = _conv_case("2d", "gauss", rng)
    first = dcls.dcls_conv(x, weight, P, SIG, bias, case["sizes"], padding=case["padding"])
    last = dcls.dcls_conv(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), weight, P, SIG, bias,
                          case["sizes"], padding=case["padding"], layout="NHWC")
    np.testing.assert_allclose(last.transpose(0, 3, 1, 2), first, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("version", ["v1", "gauss"])
@pytest.mark.parametrize("name", ["2d-groups-stride", "depthwise", "1d", "3d"])
def test_dcls_conv_gradients(name, version, rng):
    x, weight, P, SIG, bias, case = _conv_case(name, version, rng, fractional=True)
    x = x[:1]

    def fn(x, w, p, b, s=None):
        return dcls.dcls_conv(x, w, p, s, b, case["sizes"], case["stride"], case["padding"],
                              case["groups"], version)

    inputs = [x, weight, P, bias] + ([SIG] if SPREAD[version] else [])
    ad.check_gradients(fn, inputs, rtol=1e-6, atol=1e-7)


# -- dcls 0.1.1's axis convention ---------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("sizes", [(5, 5), (7, 3), (3, 6), (5, 5, 5), (3, 5, 4)], ids=str)
def test_from_dcls_positions_reproduces_upstream(version, sizes, rng):
    weight, P, SIG = random_parameters(rng, sizes, version)
    d_axes = len(sizes)
    axis_of = range(d_axes) if version == "v0" else [d_axes - 1 - d for d in range(d_axes)]
    upstream = reference_kernel(weight, P, SIG, sizes, version, axis_of=axis_of)
    new_p, new_sig = dcls.from_dcls_positions(P, SIG, sizes, version)
    assert (new_sig is None) == (SIG is None)
    got = dcls.construct_kernel(weight, new_p, new_sig, sizes, version, check_range=False)
    np.testing.assert_allclose(got, upstream, rtol=1e-12, atol=1e-13)
    if version != "v0" and len(set(sizes)) == 1:       # square: just the axes reversed
        np.testing.assert_array_equal(new_p, P[::-1])
    if version != "v0" and len(set(sizes)) > 1:        # the convention really differs
        assert not np.allclose(dcls.construct_kernel(weight, P, SIG, sizes, version,
                                                     check_range=False), upstream)


# -- the modules --------------------------------------------------------------------------------
MODULES = {1: nn.Dcls1d, 2: nn.Dcls2d, 3: nn.Dcls3d}
CONSTRUCTS = {1: nn.ConstructKernel1d, 2: nn.ConstructKernel2d, 3: nn.ConstructKernel3d}


def test_module_parameters_and_initialisation():
    nn.manual_seed(0)
    layer = nn.Dcls2d(16, 32, 26, padding=(3, 4), dilated_kernel_size=(7, 9), groups=2)
    assert layer.version == "gauss"
    assert list(layer.state_dict()) == ["weight", "P", "SIG", "bias"]
    assert layer.weight.shape == (32, 8, 26)
    assert layer.P.shape == layer.SIG.shape == (2, 32, 8, 26)
    assert layer.bias.shape == (32,)
    for param in layer.parameters():
        assert param.dtype == np.float32 and param.requires_grad
    bound = 1 / math.sqrt(8 * 26)
    for values in (layer.weight.data, layer.bias.data):
        assert np.abs(values).max() <= bound and np.abs(values).max() > 0.9 * bound
    assert abs(layer.weight.data.std() - bound / math.sqrt(3)) < 0.03 * bound
    p = layer.P.data
    assert np.abs(p[0]).max() <= 3 and np.abs(p[1]).max() <= 4
    assert abs(p.std() - 0.5) < 0.02 and abs(p.mean()) < 0.02
    np.testing.assert_array_equal(layer.SIG.data, np.float32(0.23))
    # P ~ N(0, 0.5) is clamped (not redrawn) into a narrow kernel
    nn.manual_seed(1)
    narrow = nn.Dcls1d(8, 8, 40, dilated_kernel_size=3, version="max")
    frac_at_limit = np.mean(np.abs(narrow.P.data) == 1)
    assert 0.02 < frac_at_limit < 0.08          # P(|N(0, 0.5)| > 1) = 4.6%
    np.testing.assert_array_equal(narrow.SIG.data, 0)
    assert nn.Dcls3d(2, 2, 3, dilated_kernel_size=1).P.data.max() == 0


@pytest.mark.parametrize("version, bias, keys", [
    ("gauss", True, ["weight", "P", "SIG", "bias"]),
    ("max", False, ["weight", "P", "SIG"]),
    ("v1", True, ["weight", "P", "bias"]),
    ("v0", False, ["weight", "P"]),
])
def test_state_dict_keys(version, bias, keys):
    layer = nn.Dcls2d(4, 4, 5, dilated_kernel_size=5, bias=bias, version=version)
    assert list(layer.state_dict()) == keys
    assert (layer.SIG is None) == (version in ("v0", "v1"))
    other = nn.Dcls2d(4, 4, 5, dilated_kernel_size=5, bias=bias, version=version)
    other.load_state_dict(layer.state_dict())
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(other(x).data, layer(x).data)


def test_dcls_constructor_calls_positional_as_upstream():
    # dcls 0.1.1: (in, out, kernel_count, stride, padding, dilated_kernel_size, groups, bias,
    # padding_mode, version)
    layer = nn.Dcls2d(16, 32, 34, 1, 8, 17, 16, False, "zeros", "v1")
    assert (layer.stride, layer.padding, layer.dilated_kernel_size) == ((1, 1), (8, 8),
                                                                        (17, 17))
    assert (layer.groups, layer.bias, layer.version) == (16, None, "v1")
    assert layer.weight.shape == (32, 1, 34) and layer.P.shape == (2, 32, 1, 34)
    assert nn.Dcls2d(3, 3, 4, dilated_kernel_size=7, use_implicit_gemm=False).padding == (0, 0)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("version", VERSIONS)
def test_module_forward_matches_reference(d, version, rng):
    sizes = {1: (9,), 2: (7, 4), 3: (3, 5, 3)}[d]
    spatial = {1: (20,), 2: (9, 8), 3: (5, 6, 5)}[d]
    nn.manual_seed(3)
    layer = MODULES[d](4, 6, 5, stride=2 if d == 1 else 1, padding=tuple(n // 2 for n in sizes),
                       dilated_kernel_size=sizes, groups=2, version=version).double()
    layer.P.data[...] = rng.uniform(-1, 1, layer.P.shape) * _limits(sizes)
    x = rng.standard_normal((2, 4) + spatial)
    out = layer(x)
    assert isinstance(out, ad.Tensor) and out.dtype == np.float64
    kernel = reference_kernel(layer.weight.data, layer.P.data,
                              None if layer.SIG is None else layer.SIG.data, sizes, version)
    expected = denseconv.conv(x, kernel, layer.bias.data, stride=layer.stride,
                              padding=layer.padding, groups=2)
    np.testing.assert_allclose(out.data, expected, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(layer.construct_kernel().data, kernel, rtol=1e-12, atol=1e-13)
    # unbatched input, as torch's convolutions take it
    np.testing.assert_allclose(layer(x[1]).data, out.data[1], rtol=1e-12, atol=1e-12)


def test_module_backward_is_dcls_conv_backward(rng):
    nn.manual_seed(4)
    layer = nn.Dcls2d(3, 4, 6, padding=3, dilated_kernel_size=7).double()
    x = ad.Tensor(rng.standard_normal((2, 3, 8, 8)), requires_grad=True)
    g = rng.standard_normal((2, 4, 8, 8))
    layer(x).backward(g)
    leaves = [ad.Tensor(a.data.copy(), requires_grad=True)
              for a in (layer.weight, layer.P, layer.SIG, layer.bias)]
    x2 = ad.Tensor(x.data, requires_grad=True)
    dcls.dcls_conv(x2, leaves[0], leaves[1], leaves[2], leaves[3], 7, padding=3).backward(g)
    for param, leaf in zip((layer.weight, layer.P, layer.SIG, layer.bias), leaves):
        assert param.grad is not None and np.abs(param.grad).max() > 0
        np.testing.assert_allclose(param.grad, leaf.grad, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(x.grad, x2.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("version", VERSIONS)
def test_sgd_steps_reduce_the_loss(version):
    nn.manual_seed(0)
    teacher = nn.Dcls1d(2, 3, 3, padding=4, dilated_kernel_size=9, version=version)
    student = nn.Dcls1d(2, 3, 3, padding=4, dilated_kernel_size=9, version=version)
    x = np.random.default_rng(1).standard_normal((4, 2, 40)).astype(np.float32)
    target = teacher(x).data
    optimizer = SGD(student.parameters(), lr=0.5)
    start = student.P.data.copy()
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = ad.mse_loss(student(x), target)
        loss.backward()
        optimizer.step()
        student.clamp_parameters()
        losses.append(loss.item())
    assert losses[-1] < 0.15 * losses[0]
    assert all(b < a for a, b in zip(losses[:5], losses[1:6]))
    assert np.abs(student.P.data - start).max() > 0.05       # the positions learned too


def test_positions_alone_find_a_shifted_tap():
    """Only P trains: one Gaussian tap (spread 0.5 + 0.27) recovers the teacher's position
    1.7 cells away."""
    x = np.random.default_rng(2).standard_normal((2, 1, 64))
    teacher = nn.Dcls1d(1, 1, 1, padding=5, dilated_kernel_size=11, bias=False).double()
    teacher.weight.data[...] = 1.0
    teacher.P.data[...] = 2.3
    teacher.SIG.data[...] = 0.5
    student = nn.Dcls1d(1, 1, 1, padding=5, dilated_kernel_size=11, bias=False).double()
    student.weight.data[...] = 1.0
    student.P.data[...] = 0.6
    student.SIG.data[...] = 0.5
    target = teacher(x).data
    optimizer = SGD([student.P], lr=1.0)
    for _ in range(60):
        optimizer.zero_grad()
        ad.mse_loss(student(x), target).backward()
        optimizer.step()
        student.clamp_parameters()
    assert abs(float(student.P.data.ravel()[0]) - 2.3) < 1e-3


def test_clamp_parameters(rng):
    layer = nn.Dcls2d(2, 3, 4, padding=(2, 3), dilated_kernel_size=(5, 6), version="gauss")
    layer.SIG.data[...] = rng.uniform(-0.5, 0.5, layer.SIG.shape).astype(np.float32)
    assert (layer.SIG.data < 0).any()
    before = layer.construct_kernel().data
    identity = layer.P.data
    layer.clamp_parameters()
    assert layer.P.data is identity                              # in place
    assert (layer.SIG.data >= 0).all()
    np.testing.assert_array_equal(layer.construct_kernel().data, before)   # |SIG| folded
    wild = (rng.standard_normal(layer.P.shape) * 4).astype(np.float32)
    layer.P.data[...] = wild
    x = rng.standard_normal((1, 2, 7, 7)).astype(np.float32)
    with pytest.raises(ValueError, match=r"P\[\d\] must be in"):
        layer(x)
    layer.clamp_parameters()
    np.testing.assert_array_equal(layer.P.data[0], np.clip(wild[0], -2, 2))
    np.testing.assert_array_equal(layer.P.data[1], np.clip(wild[1], -3, 3))
    assert layer(x).shape == (1, 3, 7, 8)
    layer.P.data[...] = wild
    layer.check_range = False
    assert layer(x).shape == (1, 3, 7, 8)                         # unchecked, on request


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes(mode, rng):
    layer = nn.Dcls2d(2, 3, 4, padding=(2, 3), dilated_kernel_size=(5, 7), padding_mode=mode,
                      version="v1").double()
    x = ad.Tensor(rng.standard_normal((1, 2, 6, 7)), requires_grad=True)
    out = layer(x)
    numpy_mode = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}[mode]
    padded = np.pad(x.data, ((0, 0), (0, 0), (2, 2), (3, 3)), mode=numpy_mode)
    kernel = layer.construct_kernel().data
    np.testing.assert_allclose(out.data, denseconv.conv(padded, kernel, layer.bias.data),
                               rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(out.shape)
    out.backward(g)
    padded_t = ad.Tensor(padded, requires_grad=True)
    denseconv.conv(padded_t, kernel, layer.bias.data).backward(g)
    # the input gradient adds every padded copy back to its source
    expected = np.zeros_like(x.data)
    rows = np.pad(np.arange(6), 2, mode=numpy_mode)
    cols = np.pad(np.arange(7), 3, mode=numpy_mode)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            expected[:, :, r, c] += padded_t.grad[:, :, i, j]
    np.testing.assert_allclose(x.grad, expected, rtol=1e-12, atol=1e-12)


def test_construct_kernel_modules(rng):
    for d, sizes in ((1, (7,)), (2, (5, 4)), (3, (3, 3, 5))):
        module = CONSTRUCTS[d](6, 4, 2, 3, sizes, "max")
        weight, P, SIG = random_parameters(rng, sizes, "max", cout=6, cin_g=2, kc=3)
        np.testing.assert_allclose(module(weight, P, SIG),
                                   reference_kernel(weight, P, SIG, sizes, "max"),
                                   rtol=1e-12, atol=1e-13)
        assert list(module.state_dict()) == []
        with pytest.raises(ValueError, match="W must have shape"):
            module(weight[:, :1], P[:, :, :1], SIG[:, :, :1])


def test_load_dcls_state_dict_converts_positions(rng):
    sizes = (7, 5)
    layer = nn.Dcls2d(2, 2, 3, padding=(3, 2), dilated_kernel_size=sizes).double()
    weight, P, SIG = random_parameters(rng, sizes, "gauss", cout=2, cin_g=2, kc=3)
    upstream = {"weight": weight, "P": P, "SIG": SIG, "bias": np.zeros(2)}
    layer.check_range = False
    layer.load_dcls_state_dict(upstream)
    expected = reference_kernel(weight, P, SIG, sizes, "gauss", axis_of=[1, 0])
    np.testing.assert_allclose(layer.construct_kernel().data, expected, rtol=1e-12,
                               atol=1e-13)
    layer.load_state_dict(upstream)               # as is: this library's convention
    np.testing.assert_allclose(layer.construct_kernel().data,
                               reference_kernel(weight, P, SIG, sizes, "gauss"), rtol=1e-12,
                               atol=1e-13)


# -- CuPy ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_construct_kernel_on_the_gpu_is_the_cpus(version, gpu_device, rng):
    for sizes in ((6,), (7, 4), (3, 4, 5)):
        weight, P, SIG = random_parameters(rng, sizes, version, fractional=True)
        inputs = [weight, P] + ([SIG] if SPREAD[version] else [])
        g = rng.standard_normal((3, 2) + sizes)
        results = []
        for device in ("cpu", gpu_device):
            leaves = [ad.Tensor(backend.to_device(a, device), requires_grad=True)
                      for a in inputs]
            out = _kernel_fn(sizes, version)(*leaves)
            assert backend.device_of(out.data) == backend.device_of(leaves[0].data)
            out.backward(backend.to_device(g, device))
            results.append([backend.to_numpy(out.data)] +
                           [backend.to_numpy(leaf.grad) for leaf in leaves])
        for cpu, gpu in zip(*results):
            np.testing.assert_allclose(gpu, cpu, rtol=1e-12, atol=1e-12)
        # plain device arrays in, a plain device array out
        plain = dcls.construct_kernel(*[backend.to_device(a, gpu_device) for a in (weight, P)],
                                      None if SIG is None else backend.to_device(SIG, gpu_device),
                                      sizes, version)
        assert backend.is_cupy_array(plain)


def test_dcls2d_on_the_gpu_is_the_cpus(gpu_device, rng):
    nn.manual_seed(7)
    layer = nn.Dcls2d(4, 6, 5, stride=(1, 2), padding=(3, 2), dilated_kernel_size=(7, 5),
                      groups=2)
    x = rng.standard_normal((2, 4, 9, 10)).astype(np.float32)
    g = rng.standard_normal((2, 6, 9, 5)).astype(np.float32)
    results = []
    for device in ("cpu", gpu_device):
        layer.to(device)
        xt = ad.Tensor(backend.to_device(x, device), requires_grad=True)
        out = layer(xt)
        assert backend.device_of(out.data) == backend.device_of(xt.data)
        out.backward(backend.to_device(g, device))
        results.append([backend.to_numpy(out.data), backend.to_numpy(xt.grad)] +
                       [backend.to_numpy(p.grad) for p in layer.parameters()])
        layer.clamp_parameters()                     # runs on the device too
        layer.zero_grad()
        layer.to("cpu")
    for cpu, gpu in zip(*results):
        np.testing.assert_allclose(gpu, cpu, rtol=1e-5, atol=1e-5 * np.abs(cpu).max())
    with pytest.raises(TypeError, match="on cpu"):
        layer(backend.to_device(x, gpu_device))


def _emulator():
    return sys.modules["cupy_emulator"] if getattr(sys.modules["cupy"], "emulated", False) \
        else None


def test_gpu_host_reads(gpu_device, rng):
    """Only the range check reads the device (one flag); unchecked, a training step of a
    layer waits for nothing."""
    emulator = _emulator()
    if emulator is None:
        pytest.skip("host reads are counted by the emulator")
    weight, P, SIG = [backend.to_device(a, gpu_device)
                      for a in random_parameters(rng, (7, 5), "gauss")]
    emulator.syncs.clear()
    dcls.construct_kernel(weight, P, SIG, (7, 5))
    assert len(emulator.syncs) == 1
    layer = nn.Dcls2d(4, 6, 5, padding=(3, 2), dilated_kernel_size=(7, 5)).to(gpu_device)
    layer.check_range = False
    x = ad.Tensor(backend.to_device(rng.standard_normal((2, 4, 9, 8)).astype(np.float32),
                                    gpu_device), requires_grad=True)
    emulator.syncs.clear()
    out = layer(x)
    out.backward(ad.Tensor(out.data * 0 + 1))
    layer.clamp_parameters()
    assert emulator.syncs == []
    assert backend.is_cupy_array(layer.P.grad) and backend.is_cupy_array(x.grad)


def test_gpu_refuses_mixed_devices(gpu_device, rng):
    weight, P, SIG = random_parameters(rng, (5, 5), "gauss")
    with pytest.raises(TypeError, match="different libraries"):
        dcls.construct_kernel(backend.to_device(weight, gpu_device), P, SIG, 5)
    with pytest.raises(TypeError, match="different libraries"):
        dcls.dcls_conv(np.ones((1, 2, 6, 6)), backend.to_device(weight, gpu_device),
                       backend.to_device(P, gpu_device), backend.to_device(SIG, gpu_device),
                       None, 5)


# -- bad input ----------------------------------------------------------------------------------
def _bad_construct_calls():
    w = np.ones((2, 3, 4))
    P = np.zeros((2, 2, 3, 4))
    S = np.full_like(P, 0.2)
    ck = dcls.construct_kernel
    return [
        ("unknown version", lambda: ck(w, P, S, 5, "bilinear"), ValueError,
         r"version must be one of \('v0', 'v1', 'gauss', 'max'\); got 'bilinear'"),
        ("weight 2-D", lambda: ck(w[0], P, S, 5), ValueError, "weight must be"),
        ("weight not an array", lambda: ck([[1.0]], P, S, 5), TypeError,
         "weight must be a NumPy/CuPy array"),
        ("P wrong shape", lambda: ck(w, P[:, :1], S, 5), ValueError,
         r"P must be \(ndim, Cout, Cin/groups, kernel_count\) = \(ndim, 2, 3, 4\)"),
        ("P 3-D", lambda: ck(w, P[0], S, 5), ValueError, "P must be"),
        ("SIG wrong shape", lambda: ck(w, P, S[:1], 5), ValueError, "SIG must have P's shape"),
        ("SIG missing", lambda: ck(w, P, None, 5, "gauss"), ValueError, "needs SIG"),
        ("SIG missing for max", lambda: ck(w, P, None, 5, "max"), ValueError, "needs SIG"),
        ("too many sizes", lambda: ck(w, P, S, (5, 5, 5)), ValueError,
         "dilated_kernel_size must be an int or 2 ints"),
        ("zero size", lambda: ck(w, P, S, (5, 0)), ValueError,
         "dilated_kernel_size must be positive"),
        ("negative size", lambda: ck(w, P, S, -3), ValueError,
         "dilated_kernel_size must be positive"),
        ("float size", lambda: ck(w, P, S, 5.0), TypeError, "dilated_kernel_size must be"),
        ("dtype mismatch", lambda: ck(w, P.astype(np.float32), S, 5), TypeError,
         "P's dtype float32 differs from weight's float64"),
        ("SIG dtype", lambda: ck(w, P, S.astype(np.float32), 5), TypeError, "SIG's dtype"),
        ("integer weight", lambda: ck(w.astype(int), P, S, 5), TypeError,
         "weight must be float32 or float64"),
        ("P outside", lambda: ck(w, P + 2.5, S, 5), ValueError,
         r"P\[0\] must be in \[-2, 2\].*found 2\.5"),
        ("P outside one axis", lambda: ck(w, P + np.array([0, 3.0]).reshape(2, 1, 1, 1), S,
                                          (9, 5)), ValueError, r"P\[1\] must be in \[-2, 2\]"),
        ("P NaN", lambda: ck(w, P * np.nan, S, 5), ValueError, "outside the dilated kernel"),
        ("check_range not bool", lambda: ck(w, P, S, 5, "gauss", "yes"), TypeError,
         "check_range must be a bool"),
        ("empty weight", lambda: ck(w[:, :, :0], P[..., :0], S[..., :0], 5), ValueError,
         "non-zero sizes"),
        ("conv x dims", lambda: dcls.dcls_conv(np.ones((1, 6, 5)), w, P, S, None, 5),
         ValueError, "x must have 4 dimensions"),
        ("conv x dtype", lambda: dcls.dcls_conv(np.ones((1, 6, 5, 5), np.float32), w, P, S,
                                                None, 5), TypeError, "x's dtype float32"),
        ("conv groups", lambda: dcls.dcls_conv(np.ones((1, 6, 9, 9)), w, P, S, None, 5,
                                               groups=1), ValueError, "conv: x has 6 channels"),
        ("conv too small", lambda: dcls.dcls_conv(np.ones((1, 3, 4, 4)), w, P, S, None, 5),
         ValueError, "larger than the padded input"),
        ("from_dcls version", lambda: dcls.from_dcls_positions(P, S, 5, "v2"), ValueError,
         "version must be one of"),
    ]


@pytest.mark.parametrize("case", _bad_construct_calls(), ids=lambda c: c[0])
def test_bad_input_is_refused(case):
    _, call, error, message = case
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(version="v2"), ValueError, "version must be one of"),
    (dict(groups=3), ValueError, "must be divisible by groups"),
    (dict(dilated_kernel_size=0), ValueError, "dilated_kernel_size must be a positive int"),
    (dict(dilated_kernel_size=(5, 5, 5)), ValueError, "dilated_kernel_size must be an int or 2"),
    (dict(stride=0), ValueError, "stride must be a positive int"),
    (dict(padding=-1), ValueError, "padding must be a non-negative int"),
    (dict(padding="full"), ValueError, "padding must be an int, 2 ints, 'same' or 'valid'"),
    (dict(padding="same", stride=2), ValueError, "padding='same' needs stride 1"),
    (dict(padding_mode="mirror"), ValueError, "padding_mode must be one of"),
    (dict(kernel_count=0), ValueError, "kernel_count must be a positive int"),
    (dict(kernel_count=2.5), TypeError, "kernel_count must be a positive int"),
    (dict(bias="yes"), TypeError, "bias"),
])
def test_bad_module_arguments(kwargs, error, message):
    arguments = dict(in_channels=4, out_channels=6, kernel_count=5, dilated_kernel_size=5)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        nn.Dcls2d(**arguments)


def test_bad_module_input(rng):
    layer = nn.Dcls2d(4, 6, 5, dilated_kernel_size=5)
    with pytest.raises(ValueError, match=r"x must be \(N, C, S1, ..., S2\)"):
        layer(np.ones((4, 9), np.float32))
    with pytest.raises(ValueError, match="conv: x has 3 channels"):
        layer(np.ones((1, 3, 9, 9), np.float32))
    with pytest.raises(TypeError, match="x's dtype float64 differs from weight's float32"):
        layer(np.ones((1, 4, 9, 9)))
    with pytest.raises(ValueError, match="'reflect' needs padding < the input size"):
        nn.Dcls1d(1, 1, 2, padding=4, dilated_kernel_size=5,
                  padding_mode="reflect")(np.ones((1, 1, 4), np.float32))


# -- the construct-free path ------------------------------------------------------------------
FREE_CASES = {
    "1d": dict(sizes=(9,), x=(2, 4, 13), groups=1, stride=1, padding=4),
    "1d-stride": dict(sizes=(8,), x=(1, 2, 17), groups=2, stride=3, padding=2),
    "2d": dict(sizes=(7, 5), x=(2, 4, 9, 8), groups=1, stride=1, padding=(3, 2)),
    "2d-groups-stride": dict(sizes=(6, 9), x=(1, 4, 11, 12), groups=2, stride=(2, 1),
                             padding=(1, 4)),
    "2d-depthwise": dict(sizes=(11, 11), x=(2, 3, 12, 12), groups=3, stride=1,
                         padding=5, cout=6),
    "3d": dict(sizes=(5, 4, 3), x=(1, 2, 6, 5, 5), groups=1, stride=(1, 2, 1),
               padding=(2, 1, 1)),
}


def _free_case(rng, case, version, fractional=False, dtype=np.float64):
    c = FREE_CASES[case]
    cin, groups = c["x"][1], c["groups"]
    cout = c.get("cout", 4)
    weight, P, _ = random_parameters(rng, c["sizes"], version, cout=cout,
                                     cin_g=cin // groups, kc=3, fractional=fractional)
    x = rng.standard_normal(c["x"])
    bias = rng.standard_normal(cout)
    args = (c["sizes"], c["stride"], c["padding"], groups, version)
    return [a.astype(dtype) for a in (x, weight, P, bias)], args


@pytest.mark.parametrize("version", ("v0", "v1"))
@pytest.mark.parametrize("case", list(FREE_CASES))
def test_construct_free_equals_construct(case, version, rng):
    (x, weight, P, bias), (sizes, stride, padding, groups, version) = _free_case(
        rng, case, version)
    P[:, 0, 0, 0] = np.round(P[:, 0, 0, 0])           # an integer position too
    outs, grads = [], []
    for method in ("construct", "construct_free"):
        ts = [ad.Tensor(a, requires_grad=True) for a in (x, weight, P, bias)]
        out = dcls.dcls_conv(ts[0], ts[1], ts[2], None, ts[3], sizes, stride, padding,
                             groups, version, method=method)
        g = np.cos(np.arange(out.data.size)).reshape(out.shape)
        out.backward(g)
        outs.append(out.data)
        grads.append([t.grad for t in ts])
    scale = np.abs(outs[0]).max()
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-12, atol=1e-12 * scale)
    for free, built in zip(grads[1], grads[0]):
        np.testing.assert_allclose(free, built, rtol=1e-10, atol=1e-10 * np.abs(built).max())
    plain = dcls.dcls_conv(x, weight, P, None, bias, sizes, stride, padding, groups, version,
                           method="construct_free")          # arrays in, array out
    assert not isinstance(plain, ad.Tensor)
    np.testing.assert_allclose(plain, outs[0], rtol=1e-12, atol=1e-12 * scale)


@pytest.mark.parametrize("version", ("v0", "v1"))
@pytest.mark.parametrize("case", ["1d-stride", "2d-groups-stride", "3d"])
def test_construct_free_gradients(case, version, rng):
    (x, weight, P, bias), (sizes, stride, padding, groups, version) = _free_case(
        rng, case, version, fractional=True)

    def fn(x, w, p, b):
        return dcls.dcls_conv(x, w, p, None, b, sizes, stride, padding, groups, version,
                              method="construct_free")

    ad.check_gradients(fn, [x, weight, P, bias], rtol=1e-6, atol=1e-8)


def test_construct_free_channels_last_float32_and_off_kernel_taps(rng):
    (x, weight, P, bias), (sizes, stride, padding, groups, version) = _free_case(
        rng, "2d", "v1", dtype=np.float32)
    x_cl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    built = dcls.dcls_conv(x_cl, weight, P, None, bias, sizes, stride, padding, groups,
                           version, layout="NHWC", method="construct")
    free = dcls.dcls_conv(x_cl, weight, P, None, bias, sizes, stride, padding, groups,
                          version, layout="NHWC", method="construct_free")
    assert free.dtype == np.float32
    np.testing.assert_allclose(free, built, rtol=1e-5, atol=1e-5 * np.abs(built).max())
    far = P + 100                                        # every tap off the kernel
    out = dcls.dcls_conv(x, weight, far, None, bias, sizes, stride, padding, groups, "v0",
                         check_range=False, method="construct_free")
    np.testing.assert_allclose(out, np.broadcast_to(bias.reshape(1, -1, 1, 1), out.shape))


def test_auto_takes_construct_free_when_few_offsets_are_touched(rng, monkeypatch):
    sizes = (31, 31)
    weight = rng.standard_normal((2, 2, 3))
    P = np.zeros((2, 2, 2, 3))
    P[0, ..., 1], P[1, ..., 2] = 7, -9                   # 3 cells of 961
    assert dcls.touched_kernel_cells(P, sizes, "v1").tolist() == [[15, 6], [15, 15], [22, 15]]
    assert len(dcls.touched_kernel_cells(P, sizes, "v0")) == 12    # + the next cells (gradient)
    x = rng.standard_normal((1, 2, 33, 33))
    calls = []
    real = dcls._offset_conv
    monkeypatch.setattr(dcls, "_offset_conv", lambda *a: calls.append(1) or real(*a))
    auto = dcls.dcls_conv(x, weight, P, None, None, sizes, padding=15, version="v1")
    assert calls == [1]
    built = dcls.dcls_conv(x, weight, P, None, None, sizes, padding=15, version="v1",
                           method="construct")
    np.testing.assert_allclose(auto, built, rtol=1e-12, atol=1e-12)
    dense = rng.uniform(-15, 15, (2, 8, 8, 40))          # touches most cells: construct
    dcls.dcls_conv(rng.standard_normal((1, 8, 33, 33)), rng.standard_normal((8, 8, 40)),
                   dense, None, None, sizes, padding=15, version="v1")
    assert calls == [1]
    SIG = np.full_like(P, 0.2)
    dcls.dcls_conv(x, weight, P, SIG, None, sizes, padding=15, version="gauss")
    assert calls == [1]                                  # gauss: always construct


def test_method_errors(rng):
    weight, P, SIG = random_parameters(rng, (5, 5), "gauss")
    x = rng.standard_normal((1, 2, 6, 6))
    with pytest.raises(ValueError, match="method must be one of"):
        dcls.dcls_conv(x, weight, P, SIG, None, 5, method="im2col")
    with pytest.raises(ValueError, match="touches every cell"):
        dcls.dcls_conv(x, weight, P, SIG, None, 5, version="gauss", method="construct_free")
    with pytest.raises(ValueError, match="outside the dilated kernel"):
        dcls.dcls_conv(x, weight, P * 10, None, None, 5, version="v1",
                       method="construct_free")


@pytest.mark.parametrize("version", ("v0", "v1"))
def test_construct_free_on_the_gpu_is_the_cpus(version, gpu_device, rng):
    (x, weight, P, bias), (sizes, stride, padding, groups, version) = _free_case(
        rng, "2d-groups-stride", version, dtype=np.float32)
    results = []
    for device in ("cpu", gpu_device):
        ts = [ad.Tensor(backend.to_device(a, device), requires_grad=True)
              for a in (x, weight, P, bias)]
        out = dcls.dcls_conv(ts[0], ts[1], ts[2], None, ts[3], sizes, stride, padding,
                             groups, version, method="construct_free")
        assert backend.device_of(out.data) == backend.device_of(ts[0].data)
        out.backward(backend.to_device(np.ones(out.shape, np.float32), device))
        results.append([backend.to_numpy(out.data)] + [backend.to_numpy(t.grad) for t in ts])
    for cpu, gpu in zip(*results):
        np.testing.assert_allclose(gpu, cpu, rtol=1e-5, atol=1e-5 * np.abs(cpu).max())


# -- the older API (sparsegrid.nn.dcls_legacy) -------------------------------------------------
from sparsegrid.nn import dcls_legacy  # noqa: E402

SEED_CALLS = [
    dict(kernel_size=3, dilation=4, stride=2),
    dict(kernel_size=(3, 5), dilation=4, stride=(2, 1), padding=(4, 2)),
    dict(kernel_size=(3, 5), stride=(2, 1), padding=(4, 2), dilation=(3, 2)),
    dict(kernel_size=3, dilation=4, stride=2, gain=10),
]


@pytest.mark.parametrize("kwargs", SEED_CALLS, ids=str)
@pytest.mark.parametrize("cls", [dcls_legacy.Dcls2d, dcls_legacy.DclsConstruct2d])
def test_seed_calls_construct_and_train(cls, kwargs, rng):
    m = cls(16, 33, **kwargs)
    k = m.kernel_size
    assert m.weight.shape == (33, 16) + k and m.bias.shape == (33,)
    positions = (16,) + k if cls is dcls_legacy.Dcls2d else (33, 16) + k
    assert m.P_h.shape == m.P_w.shape == positions and m.P_h.data.dtype == np.float32
    assert sorted(m.state_dict()) == ["P_h", "P_w", "bias", "weight"]
    x = rng.standard_normal((2, 16, 20, 30)).astype(np.float32)
    out = m(x)
    expected = [(s + 2 * p - dl * (kk - 1) - 1) // st + 1 for s, p, dl, kk, st in zip(
        (20, 30), m.padding, m.dilation, k, m.stride)]
    assert out.shape == (2, 33) + tuple(expected) and out.data.dtype == np.float32
    # positions 0: exactly nn.Conv2d with this dilation
    plain = denseconv.conv(x, m.weight.data, m.bias.data, stride=m.stride,
                           padding=m.padding, dilation=m.dilation)
    np.testing.assert_allclose(out.data, plain, rtol=1e-5, atol=1e-5 * np.abs(plain).max())
    ad.mean(out * out).backward()
    assert m.P_h.grad.shape == positions and np.abs(m.P_w.grad).max() > 0
    SGD(m.parameters(), lr=0.1).step()
    m.clamp_parameters()
    assert np.abs(m(x).data - plain).max() > 0           # the taps moved


@pytest.mark.parametrize("d", [1, 2, 3])
def test_dilation_one_is_a_plain_convolution(d, rng):
    kernel = (3, 5, 2)[:d]
    x = rng.standard_normal((2, 4) + (7, 8, 6)[:d]).astype(np.float32)
    for cls in (getattr(dcls_legacy, f"DclsConstruct{d}d"),
                getattr(dcls_legacy, f"DclsIm2col{d}d")):
        m = cls(4, 6, kernel, padding=1, groups=2)
        ref = denseconv.conv(x, m.weight.data, m.bias.data, padding=1, groups=2)
        np.testing.assert_allclose(m(x).data, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        np.testing.assert_allclose(m(x[0]).data, ref[0], rtol=1e-5,
                                   atol=1e-5 * np.abs(ref).max())


def test_legacy_positions_gain_and_the_two_methods_agree(rng):
    m = dcls_legacy.DclsIm2col2d(4, 6, (3, 2), dilation=(3, 4), padding=(3, 2), gain=2.5)
    c = dcls_legacy.DclsConstruct2d(4, 6, (3, 2), dilation=(3, 4), padding=(3, 2),
                                    gain=2.5)
    assert m.dilated_kernel_size == (7, 5)
    m.P_h.data[...] = rng.uniform(-0.5, 0.5, m.P_h.shape)
    m.P_w.data[...] = rng.uniform(-0.5, 0.5, m.P_w.shape)
    c.load_state_dict({"weight": m.weight.data, "bias": m.bias.data,
                       "P_h": np.broadcast_to(m.P_h.data, c.P_h.shape).copy(),
                       "P_w": np.broadcast_to(m.P_w.data, c.P_w.shape).copy()})
    x = rng.standard_normal((2, 4, 9, 10)).astype(np.float32)
    np.testing.assert_allclose(m(x).data, c(x).data, rtol=1e-5, atol=1e-5)
    # tap (i, j) of filter (o, c) at (3 i + 2.5 P_h, 4 j + 2.5 P_w): the reference kernel
    kernel = c.construct_kernel().data.astype(np.float64)
    cout, cin = 6, 4
    P = np.stack([(np.arange(3).reshape(3, 1) * 3 + 2.5 * c.P_h.data - 3),
                  (np.arange(2).reshape(1, 2) * 4 + 2.5 * c.P_w.data - 2)])
    ref = reference_kernel(c.weight.data.reshape(cout, cin, 6), P.reshape(2, cout, cin, 6),
                           None, (7, 5), "v0")
    np.testing.assert_allclose(kernel, ref, rtol=1e-5, atol=1e-6)
    c.P_h.data[...] = 100
    c.clamp_parameters()
    rows = np.arange(3).reshape(3, 1) * 3 + 2.5 * c.P_h.data
    np.testing.assert_allclose(rows, 6, rtol=1e-6)       # the last cell, n - 1


def test_legacy_position_gradients(rng):
    m = dcls_legacy.DclsIm2col2d(2, 3, 2, dilation=3, padding=1, gain=2.0).double()
    x = rng.standard_normal((1, 2, 6, 7))
    base = rng.uniform(0.1, 0.2, m.P_h.shape)               # fractional positions

    def fn(p_h, p_w):
        m.P_h.data[...], m.P_w.data[...] = p_h, p_w
        return ad.sum(m(x) * np.cos(np.arange(90.0)).reshape(1, 3, 5, 6))

    def loss(p_h, p_w):
        return float(fn(p_h, p_w).data)

    out = fn(base, -base)
    out.backward()
    numeric = []
    for which in (0, 1):
        grad = np.zeros_like(base)
        for i in np.ndindex(base.shape):
            step = np.zeros_like(base)
            step[i] = 1e-6
            args = [base, -base]
            plus = list(args); plus[which] = args[which] + step
            minus = list(args); minus[which] = args[which] - step
            grad[i] = (loss(*plus) - loss(*minus)) / 2e-6
        numeric.append(grad)
    np.testing.assert_allclose(m.P_h.grad, numeric[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m.P_w.grad, numeric[1], rtol=1e-5, atol=1e-7)


def test_upstream_shaped_state_dict_loads(rng):
    m = dcls_legacy.DclsConstruct2d(16, 33, 3, dilation=4, stride=2)
    state = {"weight": rng.standard_normal((33, 16, 3, 3)).astype(np.float32),
             "bias": rng.standard_normal(33).astype(np.float32),
             "P_h": rng.uniform(-1, 1, (33, 16, 3, 3)).astype(np.float32),
             "P_w": rng.uniform(-1, 1, (33, 16, 3, 3)).astype(np.float32)}
    m.load_state_dict(state)
    np.testing.assert_array_equal(m.P_w.data, state["P_w"])
    im = dcls_legacy.Dcls2d(16, 33, 3, dilation=4, stride=2, gain=10)
    stacked = rng.uniform(-1, 1, (2, 16, 3, 3)).astype(np.float32)
    im.load_dcls_state_dict({"weight": state["weight"], "bias": state["bias"],
                             "P": stacked})
    np.testing.assert_array_equal(im.P_h.data, stacked[0])
    im.load_dcls_state_dict({"weight": state["weight"], "bias": state["bias"],
                             "P1": stacked[1], "P2": stacked[0]})
    np.testing.assert_array_equal(im.P_w.data, stacked[0])
    with pytest.raises((KeyError, ValueError)):
        im.load_state_dict({"weight": state["weight"], "bias": state["bias"],
                            "P_h": state["P_h"], "P_w": state["P_w"]})   # construct shapes


def test_legacy_names_and_bad_arguments():
    assert dcls_legacy.Dcls2d is dcls_legacy.DclsIm2col2d
    assert nn.DclsConstruct2d is dcls_legacy.DclsConstruct2d
    assert nn.Dcls2d is not dcls_legacy.Dcls2d                # dcls 0.1.1's stays
    assert dcls_legacy.DclsConstruct3d(2, 2, 3).state_dict().keys() >= {"P_d", "P_h", "P_w"}
    assert "P" in dcls_legacy.DclsIm2col1d(2, 2, 3).state_dict()
    assert dcls_legacy.Dcls2d(2, 2, 3, bias=False).bias is None
    with pytest.raises(ValueError, match="gain"):
        dcls_legacy.Dcls2d(2, 2, 3, gain=0)
    with pytest.raises(ValueError, match="divisible"):
        dcls_legacy.Dcls2d(3, 2, 3, groups=2)
    with pytest.raises(ValueError, match="kernel_size"):
        dcls_legacy.Dcls2d(2, 2, (3, 3, 3))


def test_legacy_on_the_gpu_is_the_cpus(gpu_device, rng):
    nn.manual_seed(3)
    m = dcls_legacy.Dcls2d(4, 6, (3, 2), dilation=(2, 3), padding=1, groups=2)
    m.P_h.data[...] = rng.uniform(-0.4, 0.4, m.P_h.shape)
    m.clamp_parameters()                             # the first row cannot move up
    x = rng.standard_normal((2, 4, 8, 9)).astype(np.float32)
    results = []
    for device in ("cpu", gpu_device):
        m.to(device)
        out = m(backend.to_device(x, device))
        ad.sum(out * out).backward()
        results.append([backend.to_numpy(out.data)] +
                       [backend.to_numpy(p.grad) for p in m.parameters()])
        m.clamp_parameters()
        m.zero_grad()
        m.to("cpu")
    for cpu, gpu in zip(*results):
        np.testing.assert_allclose(gpu, cpu, rtol=1e-4, atol=1e-5 * np.abs(cpu).max())
