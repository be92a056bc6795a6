"""sparsegrid.nn.functional's losses and activations, and their Module forms (issue 13).

Three independent checks: closed forms written here in float64 NumPy (one-hot targets,
an explicit log-sum-exp, np.logaddexp for the log-sigmoid), torch.nn.functional itself
(every loss and option combination, values and gradients, in float64) where torch is
installed, and float64 finite differences (sparsegrid.autodiff.check_gradients) for
every differentiable input. Then edge cases, errors, the Module forms and the GPU path
(the host emulator or a real GPU: results equal the CPU's, and the only host reads are
the documented range checks).
"""

import itertools
import sys
import warnings

import numpy as np
import pytest

from optional import require

import sparsegrid.nn as nn
from sparsegrid import backend
from sparsegrid.autodiff import Tensor, check_gradients
from sparsegrid.nn import functional as F

REDUCTIONS = ["mean", "sum", "none"]
CLASS_SHAPES = [(7, 5), (3, 4, 6), (2, 3, 4, 2), (5,)]   # (N, C), (N, C, d1[, d2]), (C,)
ELEMENT_SHAPES = [(6,), (4, 3), (2, 3, 4)]


# -- references, written here in float64 ---------------------------------------------------
def ref_log_softmax(x, axis):
    """An explicit log-sum-exp."""
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def class_axis(shape):
    return 0 if len(shape) == 1 else 1


def classes_last(a, axis):
    """(M, C): one row per sample / position."""
    return np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis])


def ref_class_loss(log_probs, target, weight=None, ignore_index=-100, reduction="mean",
                   smoothing=0.0):
    """``-sum_c w_c q_nc log p_nc`` with ``q`` the one-hot (or probability) target mixed
    with the uniform distribution; 'mean' over the weights of the kept class-index
    targets, or over the number of samples for probabilities."""
    axis = class_axis(log_probs.shape)
    n_classes = log_probs.shape[axis]
    lp = classes_last(log_probs, axis)
    w = np.ones(n_classes) if weight is None else np.asarray(weight, np.float64)
    if np.shape(target) == log_probs.shape:                      # probabilities
        q = classes_last(np.asarray(target, np.float64), axis)
        keep = np.ones(len(lp), bool)
        denominator = float(len(lp))
        out_shape = log_probs.shape[:axis] + log_probs.shape[axis + 1:]
    else:
        y = np.asarray(target).reshape(-1)
        keep = y != ignore_index
        q = (np.arange(n_classes)[None, :] == y[:, None]).astype(np.float64)   # one-hot
        denominator = float(np.sum(w[np.where(keep, y, 0)] * keep))
        out_shape = np.shape(target)
    q = (1 - smoothing) * q + smoothing / n_classes
    losses = np.where(keep, -(lp * q * w[None, :]).sum(axis=1), 0.0).reshape(out_shape)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.float64(losses.sum()) / denominator


def ref_cross_entropy(x, target, **kwargs):
    return ref_class_loss(ref_log_softmax(x, class_axis(x.shape)), target, **kwargs)


def ref_reduce(losses, reduction):
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else (
        losses.mean() if losses.size else np.float64(np.nan))


def ref_bce(p, t, weight=None, reduction="mean"):
    losses = -(t * np.maximum(np.log(p), -100) + (1 - t) * np.maximum(np.log(1 - p), -100))
    return ref_reduce(losses * (1 if weight is None else weight), reduction)


def ref_bce_logits(x, t, weight=None, pos_weight=None, reduction="mean"):
    # -[pw t log s(x) + (1 - t) log(1 - s(x))], log s(x) = -logaddexp(0, -x)
    pw = 1 if pos_weight is None else pos_weight
    losses = pw * t * np.logaddexp(0, -x) + (1 - t) * np.logaddexp(0, x)
    return ref_reduce(losses * (1 if weight is None else weight), reduction)


def ref_regression(kind, x, t, reduction="mean", weight=None, beta=1.0):
    d = x - t
    if kind == "mse":
        losses = d ** 2
    elif kind == "l1" or beta == 0:
        losses = np.abs(d)
    else:
        losses = np.where(np.abs(d) < beta, 0.5 * d ** 2 / beta, np.abs(d) - 0.5 * beta)
    if weight is None:
        return ref_reduce(losses, reduction)
    losses = losses * weight
    return losses.sum() / weight.sum() if reduction == "mean" else ref_reduce(losses,
                                                                             reduction)


# -- random cases ---------------------------------------------------------------------------
def class_case(rng, shape, kind, ignore_index=-100, fraction_ignored=0.3):
    x = rng.standard_normal(shape) * 2
    axis = class_axis(shape)
    n_classes = shape[axis]
    if kind == "prob":
        return x, np.exp(ref_log_softmax(rng.standard_normal(shape), axis))
    t_shape = shape[:axis] + shape[axis + 1:]
    t = rng.integers(0, n_classes, size=t_shape)
    if ignore_index < 0:
        t = np.where(rng.random(t_shape) < fraction_ignored, ignore_index, t)
    return x, np.asarray(t, np.int64)


def weight_for(rng, n_classes):
    return rng.uniform(0.2, 2.0, n_classes)


def close(actual, expected, tol=1e-10):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol)


# -- closed forms ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", CLASS_SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_cross_entropy_class_indices_closed_form(shape, reduction, weighted, smoothing, rng):
    x, t = class_case(rng, shape, "index")
    w = weight_for(rng, shape[class_axis(shape)]) if weighted else None
    got = F.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=smoothing)
    assert isinstance(got, Tensor)
    close(got.data, ref_cross_entropy(x, t, weight=w, reduction=reduction,
                                      smoothing=smoothing))


@pytest.mark.parametrize("shape", CLASS_SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_cross_entropy_probabilities_closed_form(shape, reduction, weighted, smoothing, rng):
    x, p = class_case(rng, shape, "prob")
    w = weight_for(rng, shape[class_axis(shape)]) if weighted else None
    got = F.cross_entropy(x, p, weight=w, reduction=reduction, label_smoothing=smoothing)
    close(got.data, ref_cross_entropy(x, p, weight=w, reduction=reduction,
                                      smoothing=smoothing))


def test_cross_entropy_mean_divides_by_the_kept_weights(rng):
    """The weighted mean by hand: sum of w[y] * nll over the kept rows / sum of w[y]."""
    x = rng.standard_normal((4, 3))
    t = np.array([0, 2, -100, 2])
    w = np.array([0.5, 1.0, 3.0])
    lp = ref_log_softmax(x, 1)
    nll = [-w[0] * lp[0, 0], -w[2] * lp[1, 2], -w[2] * lp[3, 2]]
    close(F.cross_entropy(x, t, weight=w).data, sum(nll) / (w[0] + w[2] + w[2]))
    # ignore_index inside [0, C) ignores that class
    close(F.cross_entropy(x, np.array([0, 2, 1, 2]), weight=w, ignore_index=2).data,
          (-w[0] * lp[0, 0] - w[1] * lp[2, 1]) / (w[0] + w[1]))


def test_cross_entropy_gradient_closed_form(rng):
    """d mean / dx = keep * (softmax * sum_c w_c q_c - w q) / D."""
    x, t = class_case(rng, (9, 4), "index")
    w = weight_for(rng, 4)
    s = 0.2
    xt = Tensor(x.copy(), requires_grad=True)
    F.cross_entropy(xt, t, weight=w, label_smoothing=s).backward()
    keep = t != -100
    q = (1 - s) * (np.arange(4)[None, :] == t[:, None]) + s / 4
    softmax = np.exp(ref_log_softmax(x, 1))
    denominator = np.sum(w[np.where(keep, t, 0)] * keep)
    expected = keep[:, None] * (softmax * (w * q).sum(1, keepdims=True) - w * q) / denominator
    close(xt.grad, expected)


@pytest.mark.parametrize("shape", CLASS_SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_nll_loss_closed_form(shape, reduction, weighted, rng):
    x, t = class_case(rng, shape, "index")
    log_probs = ref_log_softmax(x, class_axis(shape))
    w = weight_for(rng, shape[class_axis(shape)]) if weighted else None
    close(F.nll_loss(log_probs, t, weight=w, reduction=reduction).data,
          ref_class_loss(log_probs, t, weight=w, reduction=reduction))
    # cross_entropy is nll_loss of log_softmax
    close(F.nll_loss(F.log_softmax(x, class_axis(shape)), t, weight=w,
                     reduction=reduction).data,
          F.cross_entropy(x, t, weight=w, reduction=reduction).data)


@pytest.mark.parametrize("shape", ELEMENT_SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_binary_losses_closed_form(shape, reduction, rng):
    x = rng.standard_normal(shape) * 3
    t = rng.random(shape)
    p = 1 / (1 + np.exp(-x))
    w = rng.uniform(0.5, 2, shape[-1:])
    pw = rng.uniform(0.5, 3, shape[-1:])
    close(F.binary_cross_entropy(p, t, reduction=reduction).data, ref_bce(p, t, None,
                                                                          reduction))
    close(F.binary_cross_entropy(p, t, weight=w, reduction=reduction).data,
          ref_bce(p, t, w, reduction))
    close(F.binary_cross_entropy_with_logits(x, t, reduction=reduction).data,
          ref_bce_logits(x, t, reduction=reduction))
    close(F.binary_cross_entropy_with_logits(x, t, weight=w, pos_weight=pw,
                                             reduction=reduction).data,
          ref_bce_logits(x, t, w, pw, reduction))


def test_binary_cross_entropy_clamps_its_logs_as_torch():
    p = np.array([0.0, 1.0, 1e-50, 0.5])
    t = np.array([0.3, 0.6, 0.2, 0.5])
    close(F.binary_cross_entropy(p, t, reduction="none").data,
          [0.3 * 100, 0.4 * 100, 0.2 * 100, np.log(2)])   # log(1e-50) < -100
    pt = Tensor(p, requires_grad=True)
    F.binary_cross_entropy(pt, t, reduction="sum").backward()
    close(pt.grad, [-0.3e12, 0.4e12, -0.2e12, 0.0])   # (p - t) / max(p (1 - p), 1e-12)


def test_binary_cross_entropy_with_logits_is_stable_for_huge_scores():
    x = np.array([1e4, -1e4, 1e4, -1e4, 800.0])
    t = np.array([1.0, 0.0, 0.0, 1.0, 0.25])
    got = F.binary_cross_entropy_with_logits(x, t, reduction="none").data
    close(got, [0.0, 0.0, 1e4, 1e4, 0.75 * 800])
    xt = Tensor(x, requires_grad=True)
    F.binary_cross_entropy_with_logits(xt, t, reduction="sum").backward()
    close(xt.grad, [0.0, 0.0, 1.0, -1.0, 0.75])          # sigmoid(x) - t
    assert np.isfinite(F.cross_entropy(np.array([[1e4, -1e4, 0.0]]), np.array([1])).data)


@pytest.mark.parametrize("kind,weighted", [("mse", False), ("mse", True), ("l1", False),
                                           ("l1", True), ("smooth_l1", False)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_regression_losses_closed_form(kind, reduction, weighted, rng):
    x = rng.standard_normal((5, 4)) * 2
    t = rng.standard_normal((5, 4))
    w = rng.uniform(0.1, 2, (5, 4)) if weighted else None
    if kind == "smooth_l1":                     # no weight: torch's has none
        for beta in (1.0, 0.4, 0.0):
            close(F.smooth_l1_loss(x, t, reduction=reduction, beta=beta).data,
                  ref_regression(kind, x, t, reduction, beta=beta))
        return
    function = F.mse_loss if kind == "mse" else F.l1_loss
    close(function(x, t, reduction=reduction, weight=w).data,
          ref_regression(kind, x, t, reduction, w))


def test_activations_closed_form(rng):
    x = rng.standard_normal((3, 4, 2)) * 3
    for dim in (0, 1, 2, -1):
        close(F.log_softmax(x, dim).data, ref_log_softmax(x, dim))
        close(F.softmax(x, dim).data, np.exp(ref_log_softmax(x, dim)))
    close(F.relu(x).data, np.maximum(x, 0))
    close(F.leaky_relu(x, 0.2).data, np.where(x > 0, x, 0.2 * x))
    close(F.elu(x, 0.7).data, np.where(x > 0, x, 0.7 * np.expm1(x)))
    close(F.selu(x).data, 1.0507009873554805 * np.where(x > 0, x, 1.6732632423543772 *
                                                        np.expm1(x)))
    close(F.sigmoid(x).data, 1 / (1 + np.exp(-x)))
    close(F.tanh(x).data, np.tanh(x))
    close(F.logsigmoid(x).data, -np.logaddexp(0, -x))
    close(F.softmax(np.array([1e4, 0.0]), 0).data, [1.0, 0.0])


def test_dropout():
    x = np.ones((200, 50))
    nn.manual_seed(3)
    a = F.dropout(x, 0.3).data
    nn.manual_seed(3)
    b = F.dropout(x, 0.3).data
    np.testing.assert_array_equal(a, b)                       # seeded by nn.manual_seed
    assert set(np.unique(a)) == {0.0, 1 / 0.7}
    assert abs((a == 0).mean() - 0.3) < 0.02
    np.testing.assert_array_equal(F.dropout(x, 0.3, training=False).data, x)
    np.testing.assert_array_equal(F.dropout(x, 1.0).data, 0 * x)
    np.testing.assert_array_equal(F.dropout(x, 0.0).data, x)
    with pytest.raises(ValueError, match="p must be"):
        F.dropout(x, 1.5)


# -- torch ----------------------------------------------------------------------------------
def _torch_and_ours(torch_fn, our_fn, arrays, differentiable, rng, tol=1e-10):
    """Run both on float64 copies of ``arrays``; compare values and the gradients of the
    ``differentiable`` positions under one random cotangent."""
    torch = require("torch")
    theirs = [torch.tensor(a, requires_grad=i in differentiable)
              if a.dtype.kind == "f" else torch.tensor(a) for i, a in enumerate(arrays)]
    ours = [Tensor(a.copy(), requires_grad=i in differentiable) if a.dtype.kind == "f"
            else a for i, a in enumerate(arrays)]
    expected = torch_fn(*theirs)
    got = our_fn(*ours)
    assert got.shape == tuple(expected.shape)
    close(got.data, expected.detach().numpy(), tol)
    if not differentiable:
        return
    cotangent = rng.standard_normal(got.shape)
    expected.backward(torch.tensor(cotangent))
    got.backward(cotangent)
    for i in differentiable:
        if theirs[i].grad is None:
            assert ours[i].grad is None or not np.any(ours[i].grad)
        else:
            close(ours[i].grad, theirs[i].grad.numpy(), tol)


CE_CASES = [c for c in itertools.product(CLASS_SHAPES, ["index", "prob"], [False, True],
                                         [-100, 2], REDUCTIONS, [0.0, 0.25])
            if not (c[1] == "prob" and c[3] >= 0)]


@pytest.mark.parametrize("shape,kind,weighted,ignore_index,reduction,smoothing", CE_CASES)
def test_cross_entropy_matches_torch(shape, kind, weighted, ignore_index, reduction,
                                     smoothing, rng):
    torch = require("torch")
    x, t = class_case(rng, shape, kind, ignore_index)
    n_classes = shape[class_axis(shape)]
    arrays = [x, t] + ([weight_for(rng, n_classes)] if weighted else [])
    kwargs = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing)
    # torch differentiates the weight only for probabilities (and so do we)
    differentiable = (0, 1, 2) if kind == "prob" else (0,)
    differentiable = tuple(i for i in differentiable if i < len(arrays))

    def theirs(x, t, w=None):
        return torch.nn.functional.cross_entropy(x, t, weight=w, **kwargs)

    def ours(x, t, w=None):
        return F.cross_entropy(x, t, weight=w, **kwargs)

    _torch_and_ours(theirs, ours, arrays, differentiable, rng)


@pytest.mark.parametrize("shape", CLASS_SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore_index", [-100, 1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_loss_matches_torch(shape, weighted, ignore_index, reduction, rng):
    torch = require("torch")
    x, t = class_case(rng, shape, "index", ignore_index)
    n_classes = shape[class_axis(shape)]
    arrays = [x, t] + ([weight_for(rng, n_classes)] if weighted else [])
    kwargs = dict(ignore_index=ignore_index, reduction=reduction)
    _torch_and_ours(lambda x, t, w=None: torch.nn.functional.nll_loss(x, t, w, **kwargs),
                    lambda x, t, w=None: F.nll_loss(x, t, w, **kwargs), arrays, (0,), rng)


def _element_weight(rng, shape, how):
    if how is None:
        return []
    return [rng.uniform(0.3, 2.0, shape[-1:] if how == "last" else shape)]


@pytest.mark.parametrize("shape", ELEMENT_SHAPES)
@pytest.mark.parametrize("weight", [None, "last", "full"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_binary_cross_entropy_matches_torch(shape, weight, reduction, rng):
    torch = require("torch")
    p = rng.uniform(0.02, 0.98, shape)
    t = rng.random(shape)
    arrays = [p, t] + _element_weight(rng, shape, weight)
    _torch_and_ours(
        lambda p, t, w=None: torch.nn.functional.binary_cross_entropy(p, t, w,
                                                                      reduction=reduction),
        lambda p, t, w=None: F.binary_cross_entropy(p, t, w, reduction=reduction),
        arrays, (0, 1), rng)


@pytest.mark.parametrize("shape", ELEMENT_SHAPES)
@pytest.mark.parametrize("weight", [None, "last", "full"])
@pytest.mark.parametrize("pos_weight", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_binary_cross_entropy_with_logits_matches_torch(shape, weight, pos_weight,
                                                        reduction, rng):
    torch = require("torch")
    x = rng.standard_normal(shape) * 4
    t = rng.random(shape)
    w = _element_weight(rng, shape, weight)
    pw = rng.uniform(0.3, 3.0, shape[-1:]) if pos_weight else None

    def theirs(x, t, w=None):
        return torch.nn.functional.binary_cross_entropy_with_logits(
            x, t, w, reduction=reduction,
            pos_weight=None if pw is None else torch.tensor(pw))

    def ours(x, t, w=None):
        return F.binary_cross_entropy_with_logits(x, t, w, reduction=reduction,
                                                  pos_weight=pw)

    _torch_and_ours(theirs, ours, [x, t] + w, (0, 1), rng)


REGRESSION = [("mse_loss", {}, False), ("mse_loss", {}, True), ("l1_loss", {}, False),
              ("l1_loss", {}, True), ("smooth_l1_loss", {"beta": 1.0}, False),
              ("smooth_l1_loss", {"beta": 0.3}, False), ("smooth_l1_loss", {"beta": 0.0}, False)]


@pytest.mark.parametrize("name,extra,weighted", REGRESSION)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_regression_losses_match_torch(name, extra, weighted, reduction, rng):
    torch = require("torch")
    x = rng.standard_normal((4, 5)) * 2
    t = rng.standard_normal((4, 5))
    kwargs = dict(extra, reduction=reduction)
    arrays = [x, t] + ([rng.uniform(0.1, 2, (4, 5))] if weighted else [])
    theirs = getattr(torch.nn.functional, name)
    ours = getattr(F, name)
    _torch_and_ours(lambda *a: theirs(a[0], a[1], weight=a[2], **kwargs) if len(a) == 3
                    else theirs(*a, **kwargs),
                    lambda *a: ours(a[0], a[1], weight=a[2], **kwargs) if len(a) == 3
                    else ours(*a, **kwargs),
                    arrays, (0, 1, 2)[:len(arrays)], rng)


ACTIVATIONS = [("softmax", (1,)), ("softmax", (0,)), ("softmax", (-1,)),
               ("log_softmax", (1,)), ("log_softmax", (2,)), ("relu", ()),
               ("leaky_relu", (0.1,)), ("elu", (0.5,)), ("selu", ()), ("sigmoid", ()),
               ("tanh", ()), ("logsigmoid", ())]


@pytest.mark.parametrize("name,args", ACTIVATIONS)
def test_activations_match_torch(name, args, rng):
    torch = require("torch")
    x = rng.standard_normal((3, 4, 5)) * 3
    _torch_and_ours(lambda x: getattr(torch.nn.functional, name)(x, *args),
                    lambda x: getattr(F, name)(x, *args), [x], (0,), rng)


def test_edge_cases_match_torch(rng):
    """Every target ignored (mean: nan, as torch), a single sample, an empty batch."""
    torch = require("torch")
    tf = torch.nn.functional
    x = rng.standard_normal((4, 3))
    for kwargs in ({}, {"weight": weight_for(rng, 3)}, {"label_smoothing": 0.2}):
        for reduction in REDUCTIONS:
            theirs_kwargs = {k: torch.tensor(v) if isinstance(v, np.ndarray) else v
                             for k, v in kwargs.items()}
            for t in (np.full(4, -100), np.array([2])):
                xs = x[:len(t)]
                _torch_and_ours(
                    lambda x, t: tf.cross_entropy(x, t, reduction=reduction,
                                                  **theirs_kwargs),
                    lambda x, t: F.cross_entropy(x, t, reduction=reduction, **kwargs),
                    [xs, t], (0,), rng)
    all_ignored = F.cross_entropy(x, np.full(4, -100))
    assert np.isnan(all_ignored.data)
    assert F.cross_entropy(x, np.full(4, -100), reduction="sum").data == 0
    np.testing.assert_array_equal(F.cross_entropy(x, np.full(4, -100), reduction="none").data,
                                  np.zeros(4))
    empty = np.zeros((0, 3))
    for reduction in REDUCTIONS:
        _torch_and_ours(lambda x, t: tf.cross_entropy(x, t, reduction=reduction),
                        lambda x, t: F.cross_entropy(x, t, reduction=reduction),
                        [empty, np.zeros(0, np.int64)], (), rng)
        _torch_and_ours(lambda x, t: tf.cross_entropy(x, t, reduction=reduction),
                        lambda x, t: F.cross_entropy(x, t, reduction=reduction),
                        [empty, empty.copy()], (), rng)
        for name in ("mse_loss", "l1_loss", "binary_cross_entropy",
                     "binary_cross_entropy_with_logits"):
            _torch_and_ours(lambda x, t: getattr(tf, name)(x, t, reduction=reduction),
                            lambda x, t: getattr(F, name)(x, t, reduction=reduction),
                            [np.zeros(0), np.zeros(0)], (), rng)


def test_deprecated_reduction_flags_match_torch(rng):
    torch = require("torch")
    x, t = class_case(rng, (5, 3), "index")
    for size_average, reduce in itertools.product([None, True, False], repeat=2):
        if size_average is None and reduce is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = torch.nn.functional.cross_entropy(torch.tensor(x), torch.tensor(t),
                                                         size_average=size_average,
                                                         reduce=reduce)
        with pytest.warns(UserWarning, match="deprecated"):
            got = F.cross_entropy(x, t, size_average=size_average, reduce=reduce)
        close(got.data, expected.numpy())


# -- finite differences ----------------------------------------------------------------------
@pytest.mark.parametrize("shape", CLASS_SHAPES)
def test_cross_entropy_gradients_finite_differences(shape, rng):
    x, t = class_case(rng, shape, "index")
    w = weight_for(rng, shape[class_axis(shape)])
    for reduction in REDUCTIONS:
        check_gradients(lambda x: F.cross_entropy(x, t, weight=w, reduction=reduction,
                                                  label_smoothing=0.3), [x])
        check_gradients(lambda x: F.nll_loss(x, t, weight=w, reduction=reduction), [x])
    x, p = class_case(rng, shape, "prob")
    check_gradients(lambda x, p, w: F.cross_entropy(x, p, weight=w, label_smoothing=0.1),
                    [x, p, w])


def test_binary_and_regression_gradients_finite_differences(rng):
    shape = (3, 4)
    p = rng.uniform(0.05, 0.95, shape)
    x = rng.standard_normal(shape) * 2
    t = rng.uniform(0.05, 0.95, shape)
    w = rng.uniform(0.5, 2.0, shape)
    pw = rng.uniform(0.5, 3.0, shape[-1:])
    check_gradients(lambda p, t, w: F.binary_cross_entropy(p, t, w), [p, t, w])
    check_gradients(lambda x, t, w, pw: F.binary_cross_entropy_with_logits(
        x, t, w, pos_weight=pw, reduction="none"), [x, t, w, pw])
    y = x + rng.choice([-1, 1], shape) * rng.uniform(0.05, 3, shape)   # |d| away from 0
    for reduction in REDUCTIONS:
        check_gradients(lambda x, y, w: F.mse_loss(x, y, weight=w, reduction=reduction),
                        [x, y, w])
        check_gradients(lambda x, y, w: F.l1_loss(x, y, weight=w, reduction=reduction),
                        [x, y, w])
        for beta in (1.0, 0.0):
            d = np.abs(x - y)
            assert np.all(np.abs(d - beta) > 1e-3)
            check_gradients(lambda x, y: F.smooth_l1_loss(x, y, reduction=reduction,
                                                          beta=beta), [x, y])


def test_activation_gradients_finite_differences(rng):
    x = rng.standard_normal((3, 5))
    x = np.where(np.abs(x) < 1e-3, 0.5, x)        # away from the kinks
    for fn in (lambda x: F.softmax(x, 1), lambda x: F.log_softmax(x, 0), F.relu,
               lambda x: F.leaky_relu(x, 0.1), lambda x: F.elu(x, 0.5), F.selu, F.sigmoid,
               F.tanh, F.logsigmoid):
        check_gradients(fn, [x])


# -- edge cases ------------------------------------------------------------------------------
def test_single_sample_and_unbatched(rng):
    x = rng.standard_normal(5)
    close(F.cross_entropy(x, np.array(3)).data, -ref_log_softmax(x, 0)[3])
    close(F.cross_entropy(x[None], np.array([3])).data, -ref_log_softmax(x, 0)[3])
    assert F.cross_entropy(x, np.array(3), reduction="none").shape == ()
    close(F.nll_loss(x, np.array(1), reduction="sum").data, -x[1])


def test_four_dimensional_input_is_per_position(rng):
    """(N, C, d1, d2) is the (N * d1 * d2, C) problem, positions flattened."""
    x, t = class_case(rng, (2, 3, 4, 5), "index")
    flat_x = np.moveaxis(x, 1, -1).reshape(-1, 3)
    w = weight_for(rng, 3)
    for reduction in ("mean", "sum"):
        close(F.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=0.1).data,
              F.cross_entropy(flat_x, t.reshape(-1), weight=w, reduction=reduction,
                              label_smoothing=0.1).data)
    assert F.cross_entropy(x, t, reduction="none").shape == (2, 4, 5)


def test_tensor_targets_float32_and_dtypes(rng):
    x, t = class_case(rng, (6, 4), "index")
    x32 = x.astype(np.float32)
    got = F.cross_entropy(Tensor(x32), Tensor(t.astype(np.int32)), weight=np.ones(4))
    assert got.dtype == np.float32
    close(got.data, ref_cross_entropy(x, t), 1e-5)
    close(F.cross_entropy(x, t.astype(np.uint8) if t.min() >= 0 else t).data,
          ref_cross_entropy(x, t))
    assert F.mse_loss(x32, x32 + 1).dtype == np.float32
    assert F.binary_cross_entropy_with_logits(x32, np.ones_like(x32)).dtype == np.float32


def test_loss_drives_a_training_step(rng):
    """What SCN scripts do: model output -> loss -> backward -> a parameter gradient."""
    linear = nn.Linear(4, 3)
    criterion = nn.CrossEntropyLoss(ignore_index=-100)
    x = rng.standard_normal((10, 4)).astype(np.float32)
    t = np.array([0, 1, 2, -100] * 2 + [1, 1])
    loss = criterion.forward(linear(Tensor(x)), t)
    loss.backward()
    assert linear.weight.grad is not None and np.any(linear.weight.grad)
    assert isinstance(loss.item(), float)


# -- errors ----------------------------------------------------------------------------------
def test_errors_name_the_argument(rng):
    x, t = class_case(rng, (4, 3), "index")
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        F.cross_entropy(x, np.zeros(5, np.int64))
    with pytest.raises(ValueError, match=r"target 3 at \(1,\) is not a class index in \[0, 3\)"):
        F.cross_entropy(x, np.array([0, 3, 1, 2]))
    with pytest.raises(ValueError, match=r"target -1 at \(2,\)"):
        F.nll_loss(x, np.array([0, 1, -1, 2]))
    with pytest.raises(ValueError, match=r"target 5 at \(0, 1, 0\)"):
        F.cross_entropy(np.zeros((2, 3, 2, 2)), np.array([[[0, 0], [5, 0]], [[0, 0], [0, 0]]]))
    with pytest.raises(TypeError, match="integer class indices"):
        F.cross_entropy(x, t.astype(np.float64))
    with pytest.raises(TypeError, match="input must be a floating"):
        F.cross_entropy(t, t)
    with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none'; got 'avg'"):
        F.cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="reduction must be"):
        F.mse_loss(x, x, reduction=None)
    with pytest.raises(ValueError, match="label_smoothing must be a finite number"):
        F.cross_entropy(x, t, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        F.cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(TypeError, match="ignore_index must be an integer"):
        F.cross_entropy(x, t, ignore_index=1.5)
    with pytest.raises(ValueError, match=r"weight must have one value per class, shape \(3,\)"):
        F.cross_entropy(x, t, weight=np.ones(4))
    with pytest.raises(ValueError, match="ignore_index must be negative"):
        F.cross_entropy(x, np.full((4, 3), 1 / 3), ignore_index=0)
    with pytest.raises(ValueError, match="not differentiable with respect to weight"):
        F.cross_entropy(x, t, weight=Tensor(np.ones(3), requires_grad=True))
    with pytest.raises(ValueError, match="no classes"):
        F.cross_entropy(np.zeros((2, 0)), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="0-d"):
        F.nll_loss(np.float64(1.0), np.array(0))
    p = rng.uniform(0.1, 0.9, (4, 3))
    with pytest.raises(ValueError, match="input must be a probability"):
        F.binary_cross_entropy(p + 1, p)
    with pytest.raises(ValueError, match="input must be a probability"):
        F.binary_cross_entropy(np.where(p > 0.5, np.nan, p), p)
    with pytest.raises(ValueError, match="target must be in"):
        F.binary_cross_entropy(p, p - 1)
    with pytest.raises(ValueError, match=r"target must have the input's shape \(4, 3\)"):
        F.binary_cross_entropy(p, p[:, :1])
    with pytest.raises(ValueError, match="target must have the input's shape"):
        F.binary_cross_entropy_with_logits(p, p[0])
    with pytest.raises(ValueError, match="pos_weight of shape"):
        F.binary_cross_entropy_with_logits(p, p, pos_weight=np.ones(4))
    with pytest.raises(ValueError, match="weight of shape"):
        F.binary_cross_entropy(p, p, weight=np.ones((2, 4, 3)))
    with pytest.raises(ValueError, match="losses do not broadcast"):
        F.mse_loss(p[:, :1], p[:, 0])
    with pytest.raises(ValueError, match="weight must have the input's shape"):
        F.l1_loss(p, p, weight=np.ones(3))
    with pytest.raises(ValueError, match="beta must be"):
        F.smooth_l1_loss(p, p, beta=-1)
    with pytest.raises(ValueError, match="dim must be in"):
        F.softmax(p, 2)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        close(F.softmax(p).data, np.exp(ref_log_softmax(p, 1)))


# -- Module forms ---------------------------------------------------------------------------
def test_modules_are_the_functional_forms(rng):
    x, t = class_case(rng, (6, 3, 2), "index")
    w = weight_for(rng, 3)
    log_probs = ref_log_softmax(x, 1)
    pairs = [
        (nn.CrossEntropyLoss(weight=w, ignore_index=-100, reduction="sum", label_smoothing=0.2),
         lambda: F.cross_entropy(x, t, w, reduction="sum", label_smoothing=0.2), (x, t)),
        (nn.NLLLoss(w, reduction="none"), lambda: F.nll_loss(log_probs, t, w, reduction="none"),
         (log_probs, t)),
    ]
    p, y = rng.uniform(0.1, 0.9, (5, 3)), rng.random((5, 3))
    ew, pw = rng.uniform(0.5, 2, 3), rng.uniform(0.5, 2, 3)
    pairs += [
        (nn.BCELoss(ew), lambda: F.binary_cross_entropy(p, y, ew), (p, y)),
        (nn.BCEWithLogitsLoss(ew, pos_weight=pw),
         lambda: F.binary_cross_entropy_with_logits(p, y, ew, pos_weight=pw), (p, y)),
        (nn.MSELoss(reduction="sum"), lambda: F.mse_loss(p, y, reduction="sum"), (p, y)),
        (nn.L1Loss(), lambda: F.l1_loss(p, y), (p, y)),
        (nn.SmoothL1Loss(beta=0.2), lambda: F.smooth_l1_loss(p, y, beta=0.2), (p, y)),
    ]
    for module, functional, args in pairs:
        np.testing.assert_array_equal(module(*args).data, functional().data)
        np.testing.assert_array_equal(module.forward(*args).data, functional().data)
        assert isinstance(module, nn.Module)
    assert repr(nn.CrossEntropyLoss()) == "CrossEntropyLoss()"


def test_module_weights_are_buffers(rng):
    w = weight_for(rng, 3)
    criterion = nn.CrossEntropyLoss(weight=w)
    assert list(criterion.state_dict()) == ["weight"]
    assert list(nn.CrossEntropyLoss().state_dict()) == []
    assert list(nn.BCEWithLogitsLoss(weight=w, pos_weight=w).state_dict()) == ["weight",
                                                                              "pos_weight"]
    assert list(nn.BCEWithLogitsLoss(pos_weight=w).state_dict()) == ["pos_weight"]
    assert criterion.cpu() is criterion
    assert criterion.float().weight.dtype == np.float32
    criterion.load_state_dict({"weight": np.array([1.0, 2.0, 3.0])})
    np.testing.assert_array_equal(criterion.weight, [1, 2, 3])


def test_module_constructor_arguments_are_checked():
    with pytest.raises(ValueError, match="reduction"):
        nn.CrossEntropyLoss(reduction="elementwise")
    with pytest.raises(ValueError, match="label_smoothing"):
        nn.CrossEntropyLoss(label_smoothing=-0.5)
    with pytest.raises(TypeError, match="ignore_index"):
        nn.NLLLoss(ignore_index="none")
    with pytest.raises(ValueError, match="beta"):
        nn.SmoothL1Loss(beta=-0.1)
    with pytest.raises(TypeError, match="weight must be a floating"):
        nn.BCELoss(weight=np.array([1, 2]))
    with pytest.warns(UserWarning, match="deprecated"):
        assert nn.MSELoss(size_average=False).reduction == "sum"
    with pytest.warns(UserWarning, match="deprecated"):
        assert nn.CrossEntropyLoss(reduce=False).reduction == "none"


def test_module_signatures_match_torch():
    torch = require("torch")
    import inspect
    for name in ("CrossEntropyLoss", "NLLLoss", "BCELoss", "BCEWithLogitsLoss", "MSELoss",
                 "L1Loss", "SmoothL1Loss"):
        ours = inspect.signature(getattr(nn, name).__init__).parameters
        theirs = inspect.signature(getattr(torch.nn, name).__init__).parameters
        assert [(p.name, p.default) for p in ours.values()] == \
               [(p.name, p.default) for p in theirs.values()], name
    for name in ("cross_entropy", "nll_loss", "binary_cross_entropy",
                 "binary_cross_entropy_with_logits", "mse_loss", "l1_loss", "smooth_l1_loss",
                 "softmax", "log_softmax", "relu", "leaky_relu", "elu", "selu", "dropout"):
        ours = inspect.signature(getattr(F, name)).parameters
        theirs = inspect.signature(getattr(torch.nn.functional, name)).parameters
        assert [p.name for p in ours.values()] == [p.name for p in theirs.values()], name
        assert [p.default for p in ours.values()] == [p.default for p in theirs.values()], \
            name


def test_port_rule_names():
    """``torch.nn.functional.X`` -> ``sparsegrid.nn.functional.X``; ``torch.nn.X`` ->
    ``sparsegrid.nn.X``."""
    assert nn.functional is F
    for name in ("CrossEntropyLoss", "NLLLoss", "BCELoss", "BCEWithLogitsLoss", "MSELoss",
                 "L1Loss", "SmoothL1Loss", "functional"):
        assert name in nn.__all__


# -- GPU ------------------------------------------------------------------------------------
def _emulator():
    return sys.modules["cupy_emulator"] if getattr(sys.modules["cupy"], "emulated", False) \
        else None


GPU_CALLS = [
    ("cross_entropy", lambda x, t, w, p: F.cross_entropy(x, t, weight=w,
                                                         label_smoothing=0.1), 1),
    ("cross_entropy probabilities", lambda x, t, w, p: F.cross_entropy(x, p, weight=w), 0),
    ("nll_loss", lambda x, t, w, p: F.nll_loss(x, t, reduction="none"), 1),
    ("binary_cross_entropy", lambda x, t, w, p: F.binary_cross_entropy(F.sigmoid(x), p), 1),
    ("binary_cross_entropy_with_logits",
     lambda x, t, w, p: F.binary_cross_entropy_with_logits(x, p, pos_weight=w), 0),
    ("mse_loss", lambda x, t, w, p: F.mse_loss(x, p), 0),
    ("smooth_l1_loss", lambda x, t, w, p: F.smooth_l1_loss(x, p, beta=0.5), 0),
    ("l1_loss", lambda x, t, w, p: F.l1_loss(x, p, reduction="sum"), 0),
    ("softmax", lambda x, t, w, p: F.softmax(x, 1), 0),
]


@pytest.mark.parametrize("name,call,reads", GPU_CALLS, ids=[c[0] for c in GPU_CALLS])
def test_gpu_matches_cpu(name, call, reads, gpu_device, rng):
    """Device arrays in, device arrays out, the CPU's values and gradients; the only host
    read is the documented range check (class indices, BCE probabilities)."""
    x, t = class_case(rng, (6, 3, 2), "index")
    _, p = class_case(rng, (6, 3, 2), "prob")
    w = weight_for(rng, 3).reshape(3, 1) if "logits" in name else weight_for(rng, 3)
    cpu_x = Tensor(x.copy(), requires_grad=True)
    cpu = call(cpu_x, t, w, p)
    g = rng.standard_normal(cpu.shape)
    cpu.backward(g)
    gpu_x = Tensor(backend.to_device(x, gpu_device), requires_grad=True)
    arrays = [backend.to_device(a, gpu_device) for a in (t, w, p, g)]
    emulator = _emulator()
    if emulator is not None:
        emulator.syncs.clear()
    gpu = call(gpu_x, *arrays[:3])
    gpu.backward(arrays[3])
    if emulator is not None:
        assert len(emulator.syncs) == reads, emulator.syncs
    assert backend.is_cupy_array(gpu.data) and backend.is_cupy_array(gpu_x.grad)
    np.testing.assert_allclose(backend.to_numpy(gpu.data), cpu.data, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(gpu_x.grad), cpu_x.grad, rtol=1e-12,
                               atol=1e-12)


def test_gpu_refuses_host_targets_and_moves_module_weights(gpu_device, rng):
    x, t = class_case(rng, (4, 3), "index")
    gx = backend.to_device(x, gpu_device)
    with pytest.raises(TypeError, match="target on cpu"):
        F.cross_entropy(gx, t)
    with pytest.raises(ValueError, match="target 7"):
        F.cross_entropy(gx, backend.to_device(np.array([0, 7, 1, 2]), gpu_device))
    criterion = nn.CrossEntropyLoss(weight=weight_for(rng, 3))
    with pytest.raises(TypeError, match="weight on cpu"):
        criterion(gx, backend.to_device(t, gpu_device))
    criterion.cuda()
    assert backend.is_cupy_array(criterion.weight)
    got = criterion(gx, backend.to_device(t, gpu_device))
    close(backend.to_numpy(got.data), criterion.cpu()(x, t).data, 1e-12)
