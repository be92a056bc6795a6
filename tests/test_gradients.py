"""Backward kernels against float64 central finite differences, and adjointness.

Every check uses a scalar loss ``sum(forward(...) * G)`` with a fixed random ``G``: its
gradient with respect to each differentiable argument must equal what the backward kernel
returns for ``grad_out = G``. Inputs are chosen so that the forward map is differentiable
at them (distinct values for max reductions, no pre-activation at 0 for leaky activations).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import reference as ref
import sparsegrid as sg
from sparsegrid import cpu


# every test here runs on each available kernel set; ``kern`` is that set's module
pytestmark = pytest.mark.usefixtures("bind_kernels")
kern = None

EPS = 1e-6
RTOL, ATOL = 1e-6, 1e-8


def assert_gradient(analytic, loss, at):
    numeric = ref.numerical_gradient(loss, at, eps=EPS)
    assert analytic is not None
    assert analytic.shape == numeric.shape, (analytic.shape, numeric.shape)
    assert np.abs(numeric).max() > 1e-3  # the check is not comparing zeros with zeros
    np.testing.assert_allclose(analytic, numeric, rtol=RTOL, atol=ATOL)


def make_tensor(rng, spatial_shape, batch_size=2, channels=3, density=0.35):
    indices = ref.random_sites(rng, spatial_shape, batch_size, density)
    features = rng.standard_normal((len(indices), channels))
    return sg.SparseTensor(features, indices, spatial_shape, batch_size)


def distinct_values(rng, shape, gap=0.01):
    """Values pairwise at least ``gap`` apart (no ties, far beyond EPS), random order."""
    n = math.prod(shape)
    return (rng.permutation(n) * gap + rng.uniform(0, gap / 10, n) - n * gap / 2).reshape(shape)


def random_weight(rng, n_offsets, cin, cout, groups=1):
    if groups == 1:
        return rng.standard_normal((n_offsets, cin, cout))
    return rng.standard_normal((n_offsets, groups, cin // groups, cout // groups))


def fitting_shape(out_shape, filter_size, stride):
    """The input size whose strided output is ``out_shape``: (out - 1) * s + f."""
    return tuple((o - 1) * stride + filter_size for o in out_shape)


# --- rulebooks of every kind --------------------------------------------------------------

def rulebook_case(rng, kind, d=2, channels=2):
    """``(rulebook, x)``: a rulebook of the given kind and a tensor on its input sites."""
    if kind.startswith("submanifold"):
        shape = {1: (9,), 2: (5, 6), 3: (4, 4, 3), 4: (3, 3, 3, 3)}[d]
        x = make_tensor(rng, shape, channels=channels)
        filter_size, dilation = {"submanifold_odd": (3, 1), "submanifold_even": (2, 1),
                                 "submanifold_dilated": (3, 2), "submanifold_grouped": (3, 1),
                                 "submanifold_per_axis": ((3, 2, 1, 2)[:d], 1)}[kind]
        return x.grid.submanifold(x.sites, filter_size, dilation), x
    if kind in ("strided", "strided_f2", "transposed"):
        filter_size, stride = (2, 2) if kind == "strided_f2" else (3, 2)
        shape = fitting_shape({1: (5,), 2: (3, 2), 3: (2, 2, 1), 4: (1, 2, 1, 1)}[d],
                              filter_size, stride)
        fine = make_tensor(rng, shape, channels=channels)
        rulebook, coarse_sites = fine.grid.strided(fine.sites, filter_size, stride)
        if kind != "transposed":
            return rulebook, fine
        coarse = sg.SparseTensor._on(rng.standard_normal((len(coarse_sites), channels)),
                                     coarse_sites, fine.grid)
        transposed, _ = coarse.grid.transposed(coarse.sites, filter_size, stride)
        return transposed, coarse
    if kind == "full":
        shape = {1: (5,), 2: (3, 4), 3: (3, 2, 3), 4: (2, 2, 2, 2)}[d]
        x = make_tensor(rng, shape, channels=channels, density=0.3)
        rulebook, _, _ = x.grid.full(x.sites, 2, 2 if d < 3 else 1)
        return rulebook, x
    raise ValueError(kind)


# (rulebook kind, groups)
CONV_CASES = [("submanifold_odd", 1), ("submanifold_even", 1), ("submanifold_dilated", 1),
              ("submanifold_grouped", 2), ("submanifold_per_axis", 1), ("strided", 1),
              ("strided", 2), ("strided_f2", 1), ("transposed", 1), ("transposed", 2),
              ("full", 1), ("full", 2)]


def without_identity(rulebook):
    """The same pairs with no identity offset declared (the kernels gather it like any)."""
    return sg.Rulebook(rulebook.in_idx, rulebook.out_idx, rulebook.offset_ptr, rulebook.n_in,
                       rulebook.n_out, rulebook.filter_size, stride=rulebook.stride,
                       dilation=rulebook.dilation, kind=rulebook.kind, identity_offset=-1)


def conv_forward(features, weight, rulebook, bias=None):
    return kern.conv_forward(features, weight, rulebook, bias)


@pytest.mark.parametrize("kind,groups", CONV_CASES)
def test_conv_backward(rng, kind, groups):
    cin, cout = (4, 6) if groups > 1 else (2, 3)
    rulebook, x = rulebook_case(rng, kind, channels=cin)
    assert rulebook.n_pairs > 0
    if kind == "submanifold_odd":
        assert rulebook.identity_offset >= 0  # the kernels' identity shortcut is exercised
    weight = random_weight(rng, rulebook.n_offsets, cin, cout, groups)
    features = x.features
    grad_out = rng.standard_normal((rulebook.n_out, cout))
    grad_features, grad_weight = kern.conv_backward(grad_out, features, weight, rulebook)
    assert_gradient(grad_features,
                    lambda f: np.sum(conv_forward(f, weight, rulebook) * grad_out), features)
    assert_gradient(grad_weight,
                    lambda w: np.sum(conv_forward(features, w, rulebook) * grad_out), weight)


def test_conv_backward_need_flags(rng):
    rulebook, x = rulebook_case(rng, "submanifold_odd")
    weight = random_weight(rng, rulebook.n_offsets, 2, 3)
    grad_out = rng.standard_normal((rulebook.n_out, 3))
    args = (grad_out, x.features, weight, rulebook)
    both = kern.conv_backward(*args)
    only_features = kern.conv_backward(*args, need_weight=False)
    only_weight = kern.conv_backward(*args, need_features=False)
    assert only_features[1] is None and only_weight[0] is None
    np.testing.assert_array_equal(only_features[0], both[0])
    np.testing.assert_array_equal(only_weight[1], both[1])


@pytest.mark.parametrize("kind", ["submanifold_odd", "strided", "full"])
def test_conv_bias_gradient_is_grad_out_sum(rng, kind):
    rulebook, x = rulebook_case(rng, kind)
    weight = random_weight(rng, rulebook.n_offsets, 2, 3)
    bias = rng.standard_normal(3)
    grad_out = rng.standard_normal((rulebook.n_out, 3))
    assert_gradient(grad_out.sum(0),
                    lambda b: np.sum(conv_forward(x.features, weight, rulebook, b) * grad_out),
                    bias)


def test_identity_offset_is_only_a_shortcut(rng):
    """With and without the identity shortcut, forward and backward agree."""
    rulebook, x = rulebook_case(rng, "submanifold_odd")
    assert rulebook.identity_offset >= 0
    weight = random_weight(rng, rulebook.n_offsets, 2, 3)
    bias = rng.standard_normal(3)
    np.testing.assert_allclose(conv_forward(x.features, weight, rulebook, bias),
                               conv_forward(x.features, weight, without_identity(rulebook),
                                            bias),
                               rtol=1e-12, atol=1e-12)
    grad_out = rng.standard_normal((rulebook.n_out, 3))
    common = (grad_out, x.features, weight)
    with_shortcut = kern.conv_backward(*common, rulebook)
    without = kern.conv_backward(*common, without_identity(rulebook))
    for a, b in zip(with_shortcut, without):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


# --- the CPU plan: output-row blocks of a bounded number of pairs -------------------------

@pytest.fixture
def block_pairs(monkeypatch):
    """Set the CPU plan's block size (pairs per block of output rows) for fresh rulebooks."""
    from sparsegrid.cpu import conv as cpu_conv

    def set_size(n):
        monkeypatch.setattr(cpu_conv, "_BLOCK_PAIRS", n)
    return set_size


@pytest.mark.parametrize("pairs", [1, 3, 7, 50])
@pytest.mark.parametrize("kind", ["submanifold_odd", "submanifold_even", "submanifold_dilated",
                                  "strided", "transposed", "full"])
@pytest.mark.parametrize("d", (2, 3))
def test_conv_blocks_forward_and_backward(rng, kind, d, pairs, block_pairs):
    """Any block size gives the per-offset sum (dense reference) and exact gradients."""
    rulebook, x = rulebook_case(rng, kind, d=d)
    weight, bias = random_weight(rng, rulebook.n_offsets, 2, 3), rng.standard_normal(3)
    expected = ref.rulebook_conv(x.features, weight, rulebook, bias)
    block_pairs(pairs)
    fresh = without_identity(rulebook) if kind == "full" else sg.Rulebook(
        rulebook.in_idx, rulebook.out_idx, rulebook.offset_ptr, rulebook.n_in, rulebook.n_out,
        rulebook.filter_size, stride=rulebook.stride, dilation=rulebook.dilation,
        kind=rulebook.kind, identity_offset=rulebook.identity_offset)
    plan = kern.prepare_conv(fresh)
    if pairs < 50 and kern is cpu:
        assert len(plan.blocks) > 1   # several blocks run (the CPU plan's own blocks)
    np.testing.assert_allclose(conv_forward(x.features, weight, fresh, bias), expected,
                               rtol=1e-12, atol=1e-12)
    grad_out = rng.standard_normal((rulebook.n_out, 3))
    grad_features, grad_weight = kern.conv_backward(grad_out, x.features, weight, fresh)
    assert_gradient(grad_features, lambda f: np.sum(conv_forward(f, weight, fresh) * grad_out),
                    x.features)
    assert_gradient(grad_weight,
                    lambda w: np.sum(conv_forward(x.features, w, fresh) * grad_out), weight)


def test_conv_rows_without_pairs_and_empty_rulebooks(rng, block_pairs):
    """Output rows with no pair get exactly the bias; a rulebook with no rows at all works."""
    in_idx = np.array([0, 1, 2, 0, 1, 2], np.int32)
    out_idx = np.array([0, 1, 2, 0, 1, 2], np.int32)
    ptr = np.array([0, 3, 6], np.int64)
    n_out = 6  # rows 3, 4, 5 have no pairs
    weight, bias = rng.standard_normal((2, 2, 3)), rng.standard_normal(3)
    features = rng.standard_normal((3, 2))
    for pairs in (1, 2, 8192):
        block_pairs(pairs)
        rulebook = sg.Rulebook(in_idx, out_idx, ptr, 3, n_out, (2,), kind="strided")
        out = conv_forward(features, weight, rulebook, bias)
        np.testing.assert_array_equal(out[3:], np.broadcast_to(bias, (3, 3)))
        np.testing.assert_allclose(out, ref.rulebook_conv(features, weight, rulebook, bias),
                                   rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(conv_forward(features, weight, rulebook)[3:], 0)
    empty = sg.Rulebook(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(3, np.int64),
                        0, 0, (2,), kind="strided")
    assert conv_forward(np.zeros((0, 2)), weight, empty, bias).shape == (0, 3)
    no_pairs = sg.Rulebook(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(3, np.int64),
                           2, 4, (2,), kind="strided")
    np.testing.assert_array_equal(conv_forward(np.ones((2, 2)), weight, no_pairs, bias),
                                  np.broadcast_to(bias, (4, 3)))
    grad_features, grad_weight = kern.conv_backward(np.ones((4, 3)), np.ones((2, 2)), weight,
                                                   no_pairs)
    np.testing.assert_array_equal(grad_features, 0)
    np.testing.assert_array_equal(grad_weight, 0)


# --- adjointness: conv_backward's feature gradient is the transposed convolution ----------

ADJOINT_KINDS = ["submanifold_odd", "submanifold_even", "submanifold_dilated",
                 "submanifold_grouped", "strided", "transposed", "full"]


def _swap_weight_axes(weight):
    return np.swapaxes(weight, -1, -2)


@pytest.mark.parametrize("d", (1, 2, 3, 4))
@pytest.mark.parametrize("kind", ADJOINT_KINDS)
def test_conv_adjoint(rng, kind, d):
    cin, cout = (4, 6) if kind == "submanifold_grouped" else (3, 2)
    rulebook, x = rulebook_case(rng, kind, d=d, channels=cin)
    assert rulebook.n_pairs > 0
    weight = random_weight(rng, rulebook.n_offsets, cin, cout,
                           groups=2 if kind == "submanifold_grouped" else 1)
    y = rng.standard_normal((rulebook.n_out, cout))
    transposed = rulebook.transpose()
    assert (transposed.n_in, transposed.n_out) == (rulebook.n_out, rulebook.n_in)
    adjoint_y = conv_forward(y, _swap_weight_axes(weight), transposed)
    grad_features, _ = kern.conv_backward(y, x.features, weight, rulebook, need_weight=False)
    np.testing.assert_allclose(grad_features, adjoint_y, rtol=1e-12, atol=1e-12)
    lhs = np.vdot(y, conv_forward(x.features, weight, rulebook))
    rhs = np.vdot(adjoint_y, x.features)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12)


@pytest.mark.parametrize("n_in,n_out,n_offsets", [(7, 5, 4), (12, 12, 9), (3, 10, 6)])
def test_conv_adjoint_synthetic_rulebook(rng, n_in, n_out, n_offsets):
    """A rulebook that no builder makes: random pairs, outputs and inputs unique per offset."""
    in_parts, out_parts = [], []
    for _ in range(n_offsets):
        m = int(rng.integers(0, min(n_in, n_out) + 1))
        in_parts.append(rng.choice(n_in, m, replace=False))
        out_parts.append(rng.choice(n_out, m, replace=False))
    offset_ptr = np.concatenate([[0], np.cumsum([len(p) for p in in_parts])]).astype(np.int64)
    rulebook = sg.Rulebook(np.concatenate(in_parts).astype(np.int32),
                           np.concatenate(out_parts).astype(np.int32), offset_ptr, n_in,
                           n_out, (n_offsets,), kind="strided")
    weight = rng.standard_normal((n_offsets, 3, 2))
    x = rng.standard_normal((n_in, 3))
    y = rng.standard_normal((n_out, 2))
    adjoint_y = conv_forward(y, _swap_weight_axes(weight), rulebook.transpose())
    grad_features, grad_weight = kern.conv_backward(y, x, weight, rulebook)
    np.testing.assert_allclose(grad_features, adjoint_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.vdot(y, conv_forward(x, weight, rulebook)),
                               np.vdot(adjoint_y, x), rtol=1e-12)
    assert_gradient(grad_weight, lambda w: np.sum(conv_forward(x, w, rulebook) * y), weight)


# --- sum pooling, average pooling, unpooling ------------------------------------------------

def rule_sum(features, rulebook):
    return kern.rule_sum(features, rulebook)


@pytest.mark.parametrize("kind", ["strided", "strided_f2", "transposed", "submanifold_even",
                                  "full"])
def test_rule_sum_gradient_is_rule_sum_of_transpose(rng, kind):
    rulebook, x = rulebook_case(rng, kind)
    grad_out = rng.standard_normal((rulebook.n_out, x.n_channels))
    assert_gradient(rule_sum(grad_out, rulebook.transpose()),
                    lambda f: np.sum(rule_sum(f, rulebook) * grad_out), x.features)


@pytest.mark.parametrize("filter_size,stride", [(2, 2), (3, 2), (3, 1)])
def test_avg_pool_and_unpool_gradients(rng, filter_size, stride):
    """avg_pool's gradient is rule_sum over the transposed rulebook / K; unpool's is avg's
    rulebook itself (unpooling is the transpose of sum pooling)."""
    x = make_tensor(rng, fitting_shape((3, 2), filter_size, stride))
    rulebook, _ = x.grid.strided(x.sites, filter_size, stride)
    volume = filter_size ** 2
    pooled = sg.avg_pool(x, filter_size, stride)
    grad_pooled = rng.standard_normal(pooled.features.shape)
    assert_gradient(rule_sum(grad_pooled, rulebook.transpose()) / volume,
                    lambda f: np.sum(sg.avg_pool(x.with_features(f), filter_size,
                                                 stride).features * grad_pooled),
                    x.features)
    grad_fine = rng.standard_normal(x.features.shape)
    assert_gradient(rule_sum(grad_fine, rulebook),
                    lambda f: np.sum(sg.unpool(pooled.with_features(f), filter_size,
                                               stride).features * grad_fine),
                    pooled.features)


# --- max pooling ------------------------------------------------------------------------------

def max_pool_forward(features, rulebook):
    return kern.max_pool_forward(features, rulebook)


@pytest.mark.parametrize("filter_size,stride", [(2, 2), (3, 2), (3, 1), (1, 2)])
@pytest.mark.parametrize("d", (1, 2, 3))
def test_max_pool_backward(rng, d, filter_size, stride):
    shape = fitting_shape({1: (6,), 2: (3, 3), 3: (2, 2, 1)}[d], filter_size, stride)
    x = make_tensor(rng, shape)
    features = distinct_values(rng, x.features.shape)
    rulebook, _ = x.grid.strided(x.sites, filter_size, stride)
    out, argmax = max_pool_forward(features, rulebook)
    grad_out = rng.standard_normal(out.shape)
    grad = kern.max_pool_backward(grad_out, argmax, rulebook.n_in)
    assert_gradient(grad, lambda f: np.sum(max_pool_forward(f, rulebook)[0] * grad_out),
                    features)


def test_max_pool_ties_go_to_the_earliest_kernel_offset():
    # 1-D, filter 2, stride 2. Rows are listed in reverse coordinate order, so the earliest
    # kernel offset (coordinate 0) is row 1 and not row 0.
    indices = np.array([[0, 1], [0, 0], [0, 3], [0, 2]], np.int32)
    features = np.array([[5.0, 1.0], [5.0, 2.0], [-1.0, 3.0], [-1.0, 3.0]])
    x = sg.SparseTensor(features, indices, (4,))
    rulebook, sites = x.grid.strided(x.sites, 2, 2)
    np.testing.assert_array_equal(sites.indices, [[0, 0], [0, 1]])
    out, argmax = max_pool_forward(features, rulebook)
    np.testing.assert_array_equal(out, [[5.0, 2.0], [-1.0, 3.0]])
    np.testing.assert_array_equal(argmax, [[1, 1], [3, 3]])
    grad_out = np.array([[10.0, 20.0], [30.0, 40.0]])
    grad = kern.max_pool_backward(grad_out, argmax, rulebook.n_in)
    np.testing.assert_array_equal(grad, [[0, 0], [10, 20], [0, 0], [30, 40]])


def test_max_pool_ties_2d_earliest_offset_wins():
    # One 2x2 window: offsets 0..3 at (0,0), (0,1), (1,0), (1,1). Offset 0 is lower; offsets
    # 1 and 3 tie for the maximum in channel 0, offsets 2 and 3 in channel 1.
    indices = np.array([[0, 1, 1], [0, 1, 0], [0, 0, 1], [0, 0, 0]], np.int32)
    features = np.array([[7.0, 4.0],    # (1,1): offset 3
                         [0.0, 4.0],    # (1,0): offset 2
                         [7.0, -3.0],   # (0,1): offset 1
                         [-2.0, -5.0]])  # (0,0): offset 0
    x = sg.SparseTensor(features, indices, (2, 2))
    rulebook, _ = x.grid.strided(x.sites, 2, 2)
    out, argmax = max_pool_forward(features, rulebook)
    np.testing.assert_array_equal(out, [[7.0, 4.0]])
    np.testing.assert_array_equal(argmax, [[2, 1]])
    grad = kern.max_pool_backward(np.array([[1.5, 2.5]]), argmax, rulebook.n_in)
    np.testing.assert_array_equal(grad, [[0, 0], [0, 2.5], [1.5, 0], [0, 0]])


# --- segment reductions -----------------------------------------------------------------------

@pytest.mark.parametrize("sorted_ids", [False, True])
@pytest.mark.parametrize("mode", ["sum", "mean", "max", "first", "last"])
def test_segment_reduce_backward(rng, mode, sorted_ids):
    n_rows, n_segments = 23, 7
    segment_ids = rng.integers(0, n_segments, n_rows)
    segment_ids[segment_ids == 4] = 5            # segment 4 stays empty
    if sorted_ids:
        segment_ids = np.sort(segment_ids)
    values = distinct_values(rng, (n_rows, 3))
    out, chosen = kern.segment_reduce(values, segment_ids, n_segments, mode)
    grad_out = rng.standard_normal(out.shape)
    grad = kern.segment_reduce_backward(grad_out, segment_ids, n_segments, mode, chosen, n_rows)
    assert_gradient(
        grad,
        lambda v: np.sum(kern.segment_reduce(v, segment_ids, n_segments, mode)[0] * grad_out),
        values)


# --- batch normalisation ----------------------------------------------------------------------

@pytest.mark.parametrize("affine", ["none", "weight", "bias", "weight+bias"])
@pytest.mark.parametrize("leakiness", [1.0, 0.0, 0.333])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_backward(rng, training, leakiness, affine):
    n, channels, eps = 17, 3, 1e-4
    weight = rng.uniform(0.5, 2.0, channels) if "weight" in affine else None
    bias = rng.standard_normal(channels) if "bias" in affine else None
    running_mean, running_var = rng.standard_normal(channels), rng.uniform(0.5, 2, channels)

    def statistics(x):
        return kern.batch_norm_statistics(x) if training else (running_mean, running_var)

    def forward(x, w, b):
        mean, var = statistics(x)
        return kern.batch_norm_forward(x, mean, var, w, b, eps, leakiness)

    while True:  # keep every pre-activation well away from the kink at 0
        x = rng.standard_normal((n, channels)) * [0.5, 2.0, 1.0] + [1.0, -1.0, 0.0]
        pre = kern.batch_norm_forward(x, *statistics(x), weight, bias, eps, 1.0)
        if np.abs(pre).min() > 1e-3:
            break
    assert (pre < 0).any() and (pre > 0).any()
    grad_out = rng.standard_normal((n, channels))
    mean, var = statistics(x)
    grad_x, grad_weight, grad_bias = kern.batch_norm_backward(
        grad_out, x, mean, var, weight, bias, eps, leakiness, training)
    assert_gradient(grad_x, lambda v: np.sum(forward(v, weight, bias) * grad_out), x)
    if weight is None:
        assert grad_weight is None
    else:
        assert_gradient(grad_weight, lambda w: np.sum(forward(x, w, bias) * grad_out), weight)
    if bias is None:
        assert grad_bias is None
    else:
        assert_gradient(grad_bias, lambda b: np.sum(forward(x, weight, b) * grad_out), bias)


# --- dense conversion and network-in-network --------------------------------------------------

@pytest.mark.parametrize("d", (1, 2, 3))
def test_scatter_gather_adjoint(rng, d):
    shape = {1: (7,), 2: (4, 5), 3: (3, 3, 2)}[d]
    x = make_tensor(rng, shape, channels=2, density=0.4)
    batch_size = x.batch_size
    features = x.features
    dense = rng.standard_normal((batch_size, 2, *shape))
    scattered = kern.scatter_to_dense(features, x.indices, batch_size, shape)
    gathered = kern.gather_from_dense(dense, x.indices)
    np.testing.assert_allclose(np.vdot(scattered, dense), np.vdot(features, gathered),
                               rtol=1e-12)
    assert_gradient(gathered,
                    lambda f: np.sum(kern.scatter_to_dense(f, x.indices, batch_size, shape)
                                     * dense), features)
    grad_rows = rng.standard_normal(features.shape)
    assert_gradient(kern.scatter_to_dense(grad_rows, x.indices, batch_size, shape),
                    lambda v: np.sum(kern.gather_from_dense(v, x.indices) * grad_rows), dense)


def test_network_in_network_gradients(rng):
    x = make_tensor(rng, (5, 6), channels=3)
    weight, bias = rng.standard_normal((3, 4)), rng.standard_normal(4)
    grad_out = rng.standard_normal((len(x), 4))

    def loss(f, w, b):
        return np.sum(sg.network_in_network(x.with_features(f), w, b).features * grad_out)

    # NetworkInNetwork is a 1-offset convolution over the identity rulebook.
    rows = np.arange(len(x), dtype=np.int32)
    ptr = np.array([0, len(x)], np.int64)
    identity = sg.Rulebook(rows, rows, ptr, len(x), len(x), (1,), identity_offset=0)
    grad_features, grad_weight = kern.conv_backward(grad_out, x.features, weight[None], identity)
    assert_gradient(grad_features, lambda f: loss(f, weight, bias), x.features)
    assert_gradient(grad_weight[0], lambda w: loss(x.features, w, bias), weight)
    assert_gradient(grad_out.sum(0), lambda b: loss(x.features, weight, b), bias)
    np.testing.assert_allclose(grad_features, grad_out @ weight.T, rtol=1e-12, atol=1e-12)


def test_conv_without_scipys_private_sparse_routine(rng, monkeypatch):
    """When SciPy's compiled csc_matvecs cannot be found, the public csc_matrix product
    gives the same result."""
    from sparsegrid.cpu import conv as cpu_conv
    rulebook, x = rulebook_case(rng, "submanifold_odd")
    weight, bias = random_weight(rng, rulebook.n_offsets, 2, 3), rng.standard_normal(3)
    fast = conv_forward(x.features, weight, rulebook, bias)
    monkeypatch.setitem(cpu_conv._state, "matvecs", None)
    monkeypatch.setitem(cpu_conv._state, "looked", True)
    slow = conv_forward(x.features, weight, rulebook, bias)
    np.testing.assert_allclose(slow, fast, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(slow, ref.rulebook_conv(x.features, weight, rulebook, bias),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pairs", [1, 4, 8192])
def test_conv_blocks_of_unsorted_rulebooks(rng, pairs, block_pairs):
    """Pairs whose output rows do not increase within an offset (user-made rulebooks, or
    sites not in key order) take the sorting path of the plan: same sums, any block size."""
    from sparsegrid.cpu import conv as cpu_conv
    n_in, n_out, n_offsets = 30, 25, 7
    in_parts, out_parts = [], []
    for _ in range(n_offsets):
        m = int(rng.integers(5, n_out))
        in_parts.append(rng.choice(n_in, m, replace=False))
        out_parts.append(rng.choice(n_out, m, replace=False))    # not increasing
    ptr = np.concatenate([[0], np.cumsum([len(p) for p in in_parts])]).astype(np.int64)
    out_idx = np.concatenate(out_parts).astype(np.int32)
    assert not cpu_conv._rows_sorted_per_offset(out_idx, ptr)
    block_pairs(pairs)
    rulebook = sg.Rulebook(np.concatenate(in_parts).astype(np.int32), out_idx, ptr, n_in,
                           n_out, (n_offsets,), kind="strided")
    weight, bias = rng.standard_normal((n_offsets, 3, 2)), rng.standard_normal(2)
    x = rng.standard_normal((n_in, 3))
    np.testing.assert_allclose(conv_forward(x, weight, rulebook, bias),
                               ref.rulebook_conv(x, weight, rulebook, bias),
                               rtol=1e-12, atol=1e-12)
    grad_out = rng.standard_normal((n_out, 2))
    grad_x, grad_w = kern.conv_backward(grad_out, x, weight, rulebook)
    assert_gradient(grad_x, lambda f: np.sum(conv_forward(f, weight, rulebook) * grad_out), x)
    assert_gradient(grad_w, lambda w: np.sum(conv_forward(x, w, rulebook) * grad_out), weight)


def _sorted_tensor(rng, shape, channels=2, dtype=np.float64):
    """A tensor whose rows are in key order, as every site set sparsegrid makes (input
    layers, strided outputs): its rulebooks take the plan's sort-free path."""
    indices = ref.random_sites(rng, shape, 2, density=0.4)
    indices = indices[np.lexsort(indices.T[::-1])]
    return sg.SparseTensor(rng.standard_normal((len(indices), channels)).astype(dtype),
                           indices, shape)


@pytest.mark.parametrize("pairs", [1, 5, 64, 8192])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("filter_size", [3, 2])
def test_conv_blocks_on_key_ordered_sites(rng, pairs, groups, filter_size, block_pairs):
    """The path every real scene takes: sites in key order (each offset's output rows
    increase, so the plan needs no sort), the identity offset, several blocks."""
    from sparsegrid.cpu import conv as cpu_conv
    block_pairs(pairs)
    x = _sorted_tensor(rng, (6, 5, 4), channels=4)
    assert x.sites.order is None
    rulebook = x.grid.submanifold(x.sites, filter_size)
    assert cpu_conv._rows_sorted_per_offset(rulebook.out_idx, rulebook.offset_ptr)
    assert (rulebook.identity_offset >= 0) == (filter_size == 3)
    plan = kern.prepare_conv(rulebook)
    if pairs < 64 and kern is cpu:
        assert len(plan.blocks) > 1
    weight = random_weight(rng, rulebook.n_offsets, 4, 6, groups)
    bias = rng.standard_normal(6)
    np.testing.assert_allclose(conv_forward(x.features, weight, rulebook, bias),
                               ref.rulebook_conv(x.features, weight, rulebook, bias),
                               rtol=1e-12, atol=1e-12)
    grad_out = rng.standard_normal((rulebook.n_out, 6))
    grad_x, grad_w = kern.conv_backward(grad_out, x.features, weight, rulebook)
    # both gradients against the exact per-offset sums (finite differences over this many
    # pairs carry ~1e-8 of noise): the feature gradient is the transposed convolution
    np.testing.assert_allclose(
        grad_x, ref.rulebook_conv(grad_out, np.swapaxes(weight, -1, -2), rulebook.transpose()),
        rtol=1e-11, atol=1e-11)
    # the weight gradient against the exact per-offset sums (finite differences over this
    # many pairs carry ~1e-8 of noise)
    full = np.stack([x.features[rulebook.pairs(k)[0]].T @ grad_out[rulebook.pairs(k)[1]]
                     for k in range(rulebook.n_offsets)])
    if groups > 1:
        ci, co = 4 // groups, 6 // groups
        full = np.stack([full[:, g * ci:(g + 1) * ci, g * co:(g + 1) * co]
                         for g in range(groups)], axis=1)
    np.testing.assert_allclose(grad_w, full, rtol=1e-11, atol=1e-11)
    sums = kern.rule_sum(x.features, rulebook)
    np.testing.assert_allclose(sums, ref.rulebook_conv(
        x.features, np.broadcast_to(np.eye(4), (rulebook.n_offsets, 4, 4)), rulebook),
        rtol=1e-12, atol=1e-12)


def test_conv_float32_and_any_memory_layout(rng):
    """float32 results within float32 rounding of float64; Fortran-ordered or strided
    features and transposed-view weights give the same bits as contiguous copies."""
    x = _sorted_tensor(rng, (6, 6, 5), channels=8)
    rulebook = x.grid.submanifold(x.sites, 3)
    weight = random_weight(rng, 27, 8, 8)
    f32, w32 = x.features.astype(np.float32), weight.astype(np.float32)
    out32 = conv_forward(f32, w32, rulebook)
    assert out32.dtype == np.float32
    exact = conv_forward(x.features, weight, rulebook)
    np.testing.assert_allclose(out32, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
    fortran = np.asfortranarray(f32)
    strided = np.repeat(f32, 2, axis=1)[:, ::2]
    view = np.swapaxes(np.ascontiguousarray(np.swapaxes(w32, 1, 2)), 1, 2)
    for features, w in ((fortran, w32), (strided, w32), (f32, view)):
        np.testing.assert_array_equal(conv_forward(features, w, rulebook), out32)
    grad_out = rng.standard_normal(out32.shape).astype(np.float32)
    expected = kern.conv_backward(grad_out, f32, w32, rulebook)
    for got in (kern.conv_backward(np.asfortranarray(grad_out), fortran, view, rulebook),):
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)


def _rulebook(in_idx, out_idx, ptr, n_in, n_out, identity=-1):
    return sg.Rulebook(np.asarray(in_idx, np.int32), np.asarray(out_idx, np.int32),
                       np.asarray(ptr, np.int64), n_in, n_out, (len(ptr) - 1,),
                       kind="strided" if identity < 0 else "submanifold",
                       identity_offset=identity)


@pytest.mark.parametrize("rulebook,message", [
    (lambda: _rulebook([0, 9], [0, 1], [0, 2], 4, 2), r"in_idx must hold rows in \[0, 4\)"),
    (lambda: _rulebook([0, -1], [0, 1], [0, 2], 4, 2), r"in_idx must hold rows in \[0, 4\)"),
    (lambda: _rulebook([0, 1], [0, 5], [0, 2], 4, 2), r"out_idx must hold rows in \[0, 2\)"),
    (lambda: _rulebook([0, 1], [0, 1], [0, 1], 4, 2), "offset_ptr must rise"),
    (lambda: _rulebook([1, 0, 2], [1, 0, 2], [0, 3], 3, 3, identity=0),
     "must pair every row with itself"),
    (lambda: _rulebook([0, 1], [0, 1], [0, 2], 3, 2, identity=0), "needs n_in == n_out"),
])
def test_conv_refuses_broken_rulebooks(rulebook, message):
    """A rulebook from outside (Rulebook(...) or Rulebook.load) that breaks the kernels'
    invariants raises before any work, instead of clipping rows or racing blocks."""
    rb = rulebook()
    with pytest.raises(ValueError, match=message):
        conv_forward(np.ones((rb.n_in, 2)), np.ones((rb.n_offsets, 2, 1)), rb)


def test_conv_refuses_features_of_the_wrong_length():
    rb = _rulebook([0, 1], [0, 1], [0, 2], 4, 2)
    with pytest.raises(ValueError, match=r"features must have shape \(4, C\)"):
        conv_forward(np.ones((3, 2)), np.ones((1, 2, 1)), rb)
    with pytest.raises(ValueError, match=r"grad_out must have shape \(2, C\)"):
        kern.conv_backward(np.ones((3, 1)), np.ones((4, 2)), np.ones((1, 2, 1)), rb)
    with pytest.raises(ValueError, match=r"features must have shape \(4, C\)"):
        kern.rule_sum(np.ones((5, 2)), rb)


def test_broken_rulebooks_are_refused_through_their_transpose_too():
    """The check runs once per rulebook-and-transpose pair, whichever is planned first."""
    broken = _rulebook([0, 9], [0, 1], [0, 2], 4, 2)
    with pytest.raises(ValueError, match=r"must hold rows in \[0, 4\); got values in \[0, 9\]"):
        kern.conv_backward(np.ones((2, 1)), np.ones((4, 2)), np.ones((1, 2, 1)), broken)
    with pytest.raises(ValueError, match=r"must hold rows in \[0, 4\)"):
        conv_forward(np.ones((2, 2)), np.ones((1, 2, 1)), broken.transpose())
