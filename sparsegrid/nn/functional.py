"""``torch.nn.functional`` for sparsegrid: the losses and activations SCN scripts call.

The port rule (docs/porting_from_scn.md) maps ``torch.nn.functional.X`` to
``sparsegrid.nn.functional.X``, so these functions take torch's arguments, in torch's
order, with torch's defaults and results: ``cross_entropy`` (class indices or class
probabilities, ``weight``, ``ignore_index``, ``label_smoothing``), ``nll_loss``,
``binary_cross_entropy``, ``binary_cross_entropy_with_logits`` (``pos_weight``),
``mse_loss``, ``l1_loss``, ``smooth_l1_loss``, and the activations ``softmax``,
``log_softmax``, ``relu``, ``leaky_relu``, ``elu``, ``selu``, ``sigmoid``, ``tanh``,
``logsigmoid`` and ``dropout``. The Module forms (``CrossEntropyLoss`` ...) are in
:mod:`sparsegrid.nn.losses`.

Inputs are autodiff Tensors or NumPy / CuPy arrays (array-likes become NumPy arrays);
class-index targets are integer arrays or Tensors of integers. Every function returns an
autodiff :class:`~sparsegrid.autodiff.Tensor` (as :mod:`sparsegrid.autodiff.ops` does),
recording its backward pass when an input requires a gradient. Nothing loops over samples;
everything is written once with the inputs' array namespace, so CuPy arrays stay on their
GPU. Two checks read one flag back from a GPU (a host synchronisation): the class-index
range check of ``cross_entropy`` / ``nll_loss`` and the ``[0, 1]`` range check of
``binary_cross_entropy``. Nothing else synchronises.

Where sparsegrid differs from torch (each documented at the function, tested):
``mse_loss``, ``l1_loss`` and ``smooth_l1_loss`` refuse targets of another shape (torch
warns and broadcasts, which silently turns an (N, 1) prediction against (N,) targets into
an (N, N) loss); a negative ``label_smoothing`` is refused (torch accepts it); class-index
targets may be any integer dtype (torch: int64 or uint8); a ``weight`` of another floating
dtype is cast to the input's (torch raises); ``inplace=True`` is accepted but never
modifies the input (autodiff Tensors have no in-place operations: use the result);
``binary_cross_entropy``'s target gradient is that of the clamped loss it computes (torch
uses the unclamped ``-logit(input)``: the two differ only where ``input`` is within
``exp(-100)`` of 0 or 1).
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np

from .. import backend
from ..autodiff import ops
from ..autodiff.core import Tensor, data_of, is_grad_enabled, record
from . import module as _module

__all__ = [
    "binary_cross_entropy", "binary_cross_entropy_with_logits", "cross_entropy", "dropout",
    "elu", "l1_loss", "leaky_relu", "log_softmax", "logsigmoid", "mse_loss", "nll_loss",
    "relu", "selu", "sigmoid", "smooth_l1_loss", "softmax", "tanh",
]

_REDUCTIONS = ("mean", "sum", "none")


# -- arguments ------------------------------------------------------------------------------
def _reduction(reduction, size_average=None, reduce=None, stacklevel=3):
    """The reduction name, from ``reduction`` or torch's deprecated ``size_average`` /
    ``reduce`` pair (which, as in torch, override ``reduction`` with a warning)."""
    if size_average is not None or reduce is not None:
        size_average = True if size_average is None else bool(size_average)
        reduce = True if reduce is None else bool(reduce)
        name = "mean" if size_average and reduce else "sum" if reduce else "none"
        warnings.warn(f"size_average and reduce are deprecated (as in torch); use "
                      f"reduction={name!r} instead", UserWarning, stacklevel=stacklevel)
        return name
    if reduction == "elementwise_mean":
        warnings.warn("reduction='elementwise_mean' is deprecated (as in torch); use "
                      "reduction='mean' instead", UserWarning, stacklevel=stacklevel)
        return "mean"
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")
    return reduction


def _array(value):
    """The array inside a Tensor, an array as is, anything else through ``np.asarray``."""
    data = data_of(value)
    if hasattr(data, "dtype") and hasattr(data, "shape"):
        return data
    return np.asarray(data)


def _operand(value, name):
    """``(value, data)`` for a floating input: the Tensor (or array) and its array."""
    data = _array(value)
    if not isinstance(value, Tensor):
        value = data
    if data.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array or Tensor; got dtype "
                        f"{data.dtype}")
    return value, data


def _same_device(first_name, first, second_name, second):
    backend.require_same_device(first_name, first, second_name, second)


def _same_shape(x, t, function, name="target"):
    if tuple(t.shape) != tuple(x.shape):
        raise ValueError(f"{function}: {name} must have the input's shape {tuple(x.shape)}; "
                         f"got {tuple(t.shape)} (losses do not broadcast: reshape one)")


def _real(value, name, low=None, high=None):
    """``value`` as a finite float in ``[low, high]``; TypeError / ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or (low is not None and value < low) or \
            (high is not None and value > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a finite number {bounds}; got {value}")
    return value


def _ignore_index(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"ignore_index must be an integer; got {type(value).__name__}")
    return int(value)


def _cast(value, dtype):
    """``value`` converted to ``dtype``, differentiably (the gradient is cast back)."""
    data = data_of(value)
    if data.dtype == dtype:
        return value
    original = data.dtype
    return record(data.astype(dtype), (value,), lambda g: (g.astype(original),))


def _class_axis(x, function):
    if x.ndim == 0:
        raise ValueError(f"{function}: input must be (C,), (N, C) or (N, C, d1, ...); got a "
                         f"0-d array")
    axis = 0 if x.ndim == 1 else 1
    if x.shape[axis] == 0:
        raise ValueError(f"{function}: input has no classes (shape {tuple(x.shape)}, class "
                         f"axis {axis})")
    return axis


def _class_weight(weight, n_classes, x, function):
    """The per-class weight as a Tensor or array of the input's dtype, or None."""
    if weight is None:
        return None
    weight, w = _operand(weight, "weight")
    if tuple(w.shape) != (n_classes,):
        raise ValueError(f"{function}: weight must have one value per class, shape "
                         f"({n_classes},); got {tuple(w.shape)}")
    _same_device("input", x, "weight", w)
    return _cast(weight, x.dtype)


def _constant_class_weight(weight, n_classes, x, function):
    """As :func:`_class_weight`, for losses that, as in torch, cannot differentiate the
    weight: one that requires a gradient is refused rather than silently not updated."""
    if isinstance(weight, Tensor) and weight.requires_grad and is_grad_enabled():
        raise ValueError(f"{function} is not differentiable with respect to weight for "
                         f"class-index targets (as in torch); pass weight.detach()")
    weight = _class_weight(weight, n_classes, x, function)
    return None if weight is None else data_of(weight)


def _class_targets(target, x, axis, function):
    """The class-index target as an int64 array of the input's shape without its class
    axis."""
    t = _array(target)
    expected = tuple(x.shape[:axis] + x.shape[axis + 1:])
    if t.dtype.kind not in "iu":
        hint = (f" (class-probability targets must have the input's shape {tuple(x.shape)})"
                if function == "cross_entropy" else "")
        raise TypeError(f"{function}: target must hold integer class indices; got dtype "
                        f"{t.dtype}{hint}")
    if tuple(t.shape) != expected:
        raise ValueError(f"{function}: target must have shape {expected} for input of shape "
                         f"{tuple(x.shape)} (class axis {axis} removed); got "
                         f"{tuple(t.shape)}")
    _same_device("input", x, "target", t)
    return t.astype(np.int64, copy=False)


def _check_class_range(t, mask, n_classes, ignore_index, function):
    """ValueError naming the first target outside ``[0, n_classes)`` that is not
    ``ignore_index``. On a GPU, reading the flag is this function's one synchronisation."""
    xp = backend.array_namespace(t)
    bad = mask & ((t < 0) | (t >= n_classes))
    if bool(bad.any()):
        flat = int(xp.argmax(bad.reshape(-1)))
        value = int(t.reshape(-1)[flat])
        where = np.unravel_index(flat, t.shape) if t.ndim else ()
        raise ValueError(f"{function}: target {value} at {tuple(int(i) for i in where)} is "
                         f"not a class index in [0, {n_classes}) nor "
                         f"ignore_index={ignore_index}")


def _broadcast_weight(weight, x, name):
    """An element weight (Tensor or array) that broadcasts to the input's shape."""
    weight, w = _operand(weight, name)
    try:
        shape = np.broadcast_shapes(tuple(w.shape), tuple(x.shape))
    except ValueError:
        shape = None
    if shape != tuple(x.shape):
        raise ValueError(f"{name} of shape {tuple(w.shape)} must broadcast to the input's "
                         f"shape {tuple(x.shape)}")
    _same_device("input", x, name, w)
    return _cast(weight, x.dtype)


# -- primitives (each forward next to its vector-Jacobian product) ---------------------------
def _ratio(a, b):
    """``a / b`` for scalars (Tensors or constants); ``0 / 0`` is nan, as in torch."""
    x, y = data_of(a), data_of(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = x / y

    def vjp(g):
        with np.errstate(divide="ignore", invalid="ignore"):
            return g / y, -g * out / y

    return record(out, (a, b), vjp)


def _reduce(losses, reduction, denominator=None):
    """``losses`` itself, its sum, or its sum over ``denominator`` (default: the number of
    elements; an empty mean is nan, as in torch)."""
    if reduction == "none":
        return losses
    total = ops.sum(losses)
    if reduction == "sum":
        return total
    return _ratio(total, data_of(losses).size if denominator is None else denominator)


def _negative_log_likelihood(log_probs, classes, mask, coefficient, axis):
    """``-log_probs[class]`` at each element (times ``coefficient`` when given), 0 where
    ``mask`` is False: one gather along ``axis``, never an ``n x C`` one-hot forward."""
    lp = data_of(log_probs)
    xp = backend.array_namespace(lp)
    index = xp.expand_dims(classes, axis)
    picked = xp.take_along_axis(lp, index, axis=axis).squeeze(axis)
    zero = xp.zeros((), lp.dtype)
    out = xp.where(mask, -picked if coefficient is None else -picked * coefficient, zero)

    def vjp(g):
        with np.errstate(invalid="ignore"):     # inf * 0 at an ignored element: masked
            g = xp.where(mask, -g if coefficient is None else -g * coefficient, zero)
        shape = [1] * lp.ndim
        shape[axis] = lp.shape[axis]
        labels = xp.arange(lp.shape[axis]).reshape(shape)
        return ((labels == index) * xp.expand_dims(g, axis),)

    return record(out, (log_probs,), vjp)


def _masked(a, mask):
    """``a`` where ``mask``, else 0 (not ``a * mask``: an ignored inf or nan stays out)."""
    x = data_of(a)
    xp = backend.array_namespace(x)
    zero = xp.zeros((), x.dtype)
    return record(xp.where(mask, x, zero), (a,), lambda g: (xp.where(mask, g, zero),))


def _mix(a, b, alpha, beta):
    """``alpha * a + beta * b`` for same-shape ``a``, ``b`` and constant ``alpha``, ``beta``."""
    return record(alpha * data_of(a) + beta * data_of(b), (a, b),
                  lambda g: (alpha * g, beta * g))


def _log_sigmoid(a):
    """``log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|))``: finite for every finite x."""
    x = data_of(a)
    xp = backend.array_namespace(x)
    e = xp.exp(-xp.abs(x))
    out = xp.minimum(x, 0) - xp.log1p(e)
    # d/dx log sigmoid(x) = sigmoid(-x), the branch of each sign that cannot overflow
    return record(out, (a,), lambda g: (g * xp.where(x >= 0, e / (1 + e), 1 / (1 + e)),))


def _binary_cross_entropy(p, t):
    """torch's elementwise BCE: ``-(t log p + (1 - t) log(1 - p))``, each log clamped to
    ``>= -100``; the input gradient is torch's ``(p - t) / max(p (1 - p), 1e-12)``."""
    x, y = data_of(p), data_of(t)
    xp = backend.array_namespace(x, y)
    flags = xp.stack([xp.any(~((x >= 0) & (x <= 1))), xp.any(~((y >= 0) & (y <= 1)))])
    bad_input, bad_target = (bool(f) for f in backend.to_numpy(flags))  # one read-back
    if bad_input:
        raise ValueError("binary_cross_entropy: every element of input must be a probability "
                         "in [0, 1] (use binary_cross_entropy_with_logits for scores)")
    if bad_target:
        raise ValueError("binary_cross_entropy: every element of target must be in [0, 1]")
    with np.errstate(divide="ignore"):
        log_p = xp.maximum(xp.log(x), -100)
        log_q = xp.maximum(xp.log1p(-x), -100)
    out = -(y * log_p + (1 - y) * log_q)
    return record(out, (p, t), lambda g: (g * (x - y) / xp.maximum(x * (1 - x), 1e-12),
                                          g * (log_q - log_p)))


def _abs(a):
    x = data_of(a)
    xp = backend.array_namespace(x)
    return record(xp.abs(x), (a,), lambda g: (g * xp.sign(x),))


def _smooth_l1(a, beta):
    x = data_of(a)
    xp = backend.array_namespace(x)
    magnitude = xp.abs(x)
    small = magnitude < beta
    out = xp.where(small, 0.5 * x * x / beta, magnitude - 0.5 * beta)
    return record(out, (a,), lambda g: (g * xp.where(small, x / beta, xp.sign(x)),))


def _softmax(a, axis):
    x = data_of(a)
    xp = backend.array_namespace(x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    out = e / e.sum(axis=axis, keepdims=True)
    return record(out, (a,),
                  lambda g: (out * (g - (g * out).sum(axis=axis, keepdims=True)),))


# -- class losses -------------------------------------------------------------------------
def _class_index_loss(log_probs, x, target, weight, ignore_index, reduction, smoothing,
                      function):
    """The negative log-likelihood of class indices with torch's weight, ignore_index and
    label-smoothing rules; ``log_probs`` has the (validated) shape of ``x``."""
    axis = _class_axis(x, function)
    n_classes = x.shape[axis]
    t = _class_targets(target, x, axis, function)
    w = _constant_class_weight(weight, n_classes, x, function)
    xp = backend.array_namespace(x)
    mask = t != ignore_index
    _check_class_range(t, mask, n_classes, ignore_index, function)
    classes = xp.where(mask, t, 0)
    if w is None:
        coefficient = None
        denominator = mask.sum().astype(x.dtype)    # counted exactly, rounded once
    else:
        coefficient = xp.where(mask, w[classes], xp.zeros((), x.dtype))
        denominator = coefficient.sum()
    losses = _negative_log_likelihood(log_probs, classes, mask, coefficient, axis)
    if smoothing:
        # torch: (1 - s) * nll + s / C * (-sum_c w_c log p_c), both over the same
        # denominator (the weights of the kept targets, or their count)
        per_class = log_probs
        if w is not None:
            shape = [1] * x.ndim
            shape[axis] = n_classes
            per_class = ops.mul(log_probs, w.reshape(shape))
        uniform = _masked(ops.neg(ops.sum(per_class, axis=axis)), mask)
        losses = _mix(losses, uniform, 1.0 - smoothing, smoothing / n_classes)
    return _reduce(losses, reduction, denominator)


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100,
                  reduce=None, reduction="mean", label_smoothing=0.0):
    """Cross-entropy of unnormalised scores, as ``torch.nn.functional.cross_entropy``.

    Parameters
    ----------
    input : Tensor or array, (N, C), (N, C, d1, ..., dK) or (C,)
        Floating-point scores (logits); the class axis is 1 (0 for a 1-D input).
    target : Tensor or array
        Either class indices, an integer array of shape (N,), (N, d1, ..., dK) or () --
        the input's shape without its class axis -- with values in ``[0, C)`` or
        ``ignore_index``; or class probabilities, a floating array of the input's shape
        (recognised, as in torch, by the equal shapes).
    weight : Tensor or array (C,), optional
        A rescaling weight per class, cast to the input's dtype.
    size_average, reduce : bool, optional
        torch's deprecated reduction flags: when either is given it decides the
        reduction (``mean`` if both true, ``sum`` if only ``reduce``, else ``none``), with
        a warning.
    ignore_index : int
        Class-index targets equal to it contribute nothing, neither to the loss nor to the
        mean's denominator. Must be negative for class-probability targets (as in torch).
    reduction : {'mean', 'sum', 'none'}
        'none' gives one loss per element of the target, 0 where it is ignored.
    label_smoothing : float in [0, 1]
        Mixes the target with the uniform distribution: ``(1 - s) * target + s / C``.

    Returns
    -------
    Tensor
        For class indices with per-element loss ``l_n = -w[y_n] log softmax(x_n)[y_n]``
        (``w = 1`` without ``weight``): ``'mean'`` is ``sum_n l_n / sum_n w[y_n]`` over the
        non-ignored ``n`` -- nan when every target is ignored, as in torch. With
        ``label_smoothing`` s, ``l_n = (1 - s) * nll_n + s / C * sum_c (-w_c log p_nc)``
        with the same denominator. For probabilities ``l_n = -sum_c w_c p_nc log
        softmax(x_n)_c`` and ``'mean'`` divides by the number of samples (positions).

    Raises
    ------
    TypeError
        A non-floating input or weight; class indices that are not integers.
    ValueError
        A target or weight of the wrong shape; a class index outside ``[0, C)`` that is
        not ``ignore_index`` (checked with one host synchronisation on a GPU); an unknown
        reduction; ``label_smoothing`` outside [0, 1] (torch accepts negative values);
        ``ignore_index >= 0`` with probabilities; a weight that requires a gradient with
        class indices (torch cannot differentiate it either; with probabilities it is
        differentiated, as in torch).
    """
    reduction = _reduction(reduction, size_average, reduce)
    smoothing = _real(label_smoothing, "label_smoothing", 0.0, 1.0)
    ignore_index = _ignore_index(ignore_index)
    input, x = _operand(input, "input")
    axis = _class_axis(x, "cross_entropy")
    n_classes = x.shape[axis]
    log_probs = ops.log_softmax(input, axis=axis)
    if tuple(_array(target).shape) != tuple(x.shape):
        return _class_index_loss(log_probs, x, target, weight, ignore_index, reduction,
                                 smoothing, "cross_entropy")
    target, t = _operand(target, "target (class probabilities, the input's shape)")
    _same_device("input", x, "target", t)
    if ignore_index >= 0:
        raise ValueError(f"cross_entropy: ignore_index must be negative for class-"
                         f"probability targets (as in torch); got {ignore_index}")
    target = _cast(target, x.dtype)
    if smoothing:
        target = ops.add(ops.mul(target, 1.0 - smoothing), smoothing / n_classes)
    product = ops.mul(log_probs, target)
    weight = _class_weight(weight, n_classes, x, "cross_entropy")
    if weight is not None:
        shape = [1] * x.ndim
        shape[axis] = n_classes
        product = ops.mul(product, ops.reshape(weight, tuple(shape)))
    losses = ops.neg(ops.sum(product, axis=axis))
    return _reduce(losses, reduction, x.size / n_classes)


def nll_loss(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
             reduction="mean"):
    """Negative log-likelihood of log-probabilities, as ``torch.nn.functional.nll_loss``.

    ``cross_entropy(x, y, ...)`` is ``nll_loss(log_softmax(x, 1), y, ...)``. Parameters,
    result and errors are :func:`cross_entropy`'s for class-index targets (no
    probabilities, no label smoothing): ``input`` (N, C), (N, C, d1, ...) or (C,) holds
    log-probabilities (not checked, as in torch), the per-element loss is
    ``-w[y_n] * input[n, y_n]`` (0 where ``y_n == ignore_index``), and ``'mean'`` divides
    by the sum of the weights of the non-ignored targets (nan if there are none).
    """
    reduction = _reduction(reduction, size_average, reduce)
    ignore_index = _ignore_index(ignore_index)
    input, x = _operand(input, "input")
    return _class_index_loss(input, x, target, weight, ignore_index, reduction, 0.0,
                             "nll_loss")


def binary_cross_entropy(input, target, weight=None, size_average=None, reduce=None,
                         reduction="mean"):
    """Binary cross-entropy of probabilities, as ``torch.nn.functional.binary_cross_entropy``.

    Parameters
    ----------
    input : Tensor or array
        Probabilities in [0, 1], any shape.
    target : Tensor or array
        Same shape, values in [0, 1] (differentiable, as in torch).
    weight : Tensor or array, optional
        Broadcasts to the input's shape; multiplies each element's loss (differentiable;
        torch refuses a weight that requires a gradient).
    size_average, reduce, reduction
        As in :func:`cross_entropy`; ``'mean'`` divides by the number of elements (nan
        when there are none).

    Returns
    -------
    Tensor
        ``-w * (t * max(log p, -100) + (1 - t) * max(log(1 - p), -100))``, reduced. The
        clamp keeps the loss finite at p = 0 or 1, as torch's does; the input gradient is
        torch's ``(p - t) / max(p (1 - p), 1e-12)``.

    Raises
    ------
    ValueError
        A target of another shape; an input or target element outside [0, 1] or nan
        (checked with one host synchronisation on a GPU); a weight that does not
        broadcast; an unknown reduction.
    TypeError
        Non-floating arrays.
    """
    reduction = _reduction(reduction, size_average, reduce)
    input, x = _operand(input, "input")
    target, t = _operand(target, "target")
    _same_shape(x, t, "binary_cross_entropy")
    _same_device("input", x, "target", t)
    losses = _binary_cross_entropy(input, _cast(target, x.dtype))
    if weight is not None:
        losses = ops.mul(losses, _broadcast_weight(weight, x, "weight"))
    return _reduce(losses, reduction)


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None,
                                     reduce=None, reduction="mean", pos_weight=None):
    """Binary cross-entropy of scores, as ``torch.nn.functional.binary_cross_entropy_with_logits``.

    Parameters
    ----------
    input : Tensor or array
        Scores (logits), any shape.
    target : Tensor or array
        Same shape, usually in [0, 1] (not checked, as in torch; differentiable).
    weight : Tensor or array, optional
        Broadcasts to the input's shape; multiplies each element's loss.
    size_average, reduce, reduction
        As in :func:`cross_entropy`; ``'mean'`` divides by the number of elements.
    pos_weight : Tensor or array, optional
        Weight of the positive term, broadcast to the input's shape (one per class along
        the last axis for (N, C) inputs): ``l = -w [p_w t log s(x) + (1 - t) log(1 - s(x))]``.

    Returns
    -------
    Tensor
        torch's formula ``w * ((1 - t) x - (1 + (p_w - 1) t) log sigmoid(x))`` with a
        log-sigmoid that is finite for every finite x (no overflow at |x| = 1e4), reduced.
        Every floating argument is differentiated (torch refuses a ``weight`` or
        ``pos_weight`` that requires a gradient).

    Raises
    ------
    ValueError
        A target of another shape, a weight or pos_weight that does not broadcast, an
        unknown reduction.
    TypeError
        Non-floating arrays.
    """
    reduction = _reduction(reduction, size_average, reduce)
    input, x = _operand(input, "input")
    target, t = _operand(target, "target")
    _same_shape(x, t, "binary_cross_entropy_with_logits")
    _same_device("input", x, "target", t)
    target = _cast(target, x.dtype)
    log_sigmoid = _log_sigmoid(input)
    if pos_weight is not None:
        pos_weight = _broadcast_weight(pos_weight, x, "pos_weight")
        log_sigmoid = ops.mul(ops.add(ops.mul(ops.sub(pos_weight, 1.0), target), 1.0),
                              log_sigmoid)
    losses = ops.sub(ops.mul(ops.sub(1.0, target), input), log_sigmoid)
    if weight is not None:
        losses = ops.mul(losses, _broadcast_weight(weight, x, "weight"))
    return _reduce(losses, reduction)


# -- regression losses ------------------------------------------------------------------------
def _regression(elementwise, input, target, reduction, weight, function):
    """Shared checks, then ``elementwise(input - target)`` with torch 2.6+'s optional
    same-shape ``weight``: its ``'mean'`` is ``sum(w l) / sum(w)``."""
    input, x = _operand(input, "input")
    target, t = _operand(target, "target")
    _same_shape(x, t, function)
    _same_device("input", x, "target", t)
    losses = elementwise(ops.sub(input, _cast(target, x.dtype)))
    if weight is None:
        return _reduce(losses, reduction)
    weight, w = _operand(weight, "weight")
    _same_shape(x, w, function, "weight")
    _same_device("input", x, "weight", w)
    weight = _cast(weight, x.dtype)
    losses = ops.mul(losses, weight)
    if reduction == "mean":
        return _ratio(ops.sum(losses), ops.sum(weight))
    return _reduce(losses, reduction)


def mse_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """Squared error, as ``torch.nn.functional.mse_loss``: ``(input - target) ** 2``.

    ``input`` and ``target`` (differentiable) must have the same shape: unlike torch,
    which warns and broadcasts, another shape raises ValueError. ``weight`` (torch 2.6+,
    optional, the input's shape) multiplies each element; its ``'mean'`` is
    ``sum(w * l) / sum(w)``. ``size_average`` / ``reduce`` / ``reduction`` as in
    :func:`cross_entropy`; ``'mean'`` of no elements is nan. Returns a Tensor.
    """
    reduction = _reduction(reduction, size_average, reduce)
    return _regression(lambda d: ops.mul(d, d), input, target, reduction, weight, "mse_loss")


def l1_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """Absolute error, as ``torch.nn.functional.l1_loss``: ``|input - target|``.

    Shapes, ``weight`` and reductions as in :func:`mse_loss`. The gradient at a zero
    difference is 0 (torch's ``sign``). Returns a Tensor.
    """
    reduction = _reduction(reduction, size_average, reduce)
    return _regression(_abs, input, target, reduction, weight, "l1_loss")


def smooth_l1_loss(input, target, size_average=None, reduce=None, reduction="mean",
                   beta=1.0):
    """Smooth L1 (Huber-like) loss, as ``torch.nn.functional.smooth_l1_loss``.

    Per element, with ``d = input - target``: ``0.5 d**2 / beta`` where ``|d| < beta``,
    else ``|d| - 0.5 beta``; ``beta = 0`` is the L1 loss. Shapes and reductions as in
    :func:`mse_loss` (no ``weight``: torch has none here).

    Raises
    ------
    ValueError
        A negative or non-finite ``beta`` (torch refuses negative values), a target of
        another shape, an unknown reduction.
    """
    reduction = _reduction(reduction, size_average, reduce)
    beta = _real(beta, "beta", 0.0)
    elementwise = _abs if beta == 0 else (lambda d: _smooth_l1(d, beta))
    return _regression(elementwise, input, target, reduction, None, "smooth_l1_loss")


# -- activations --------------------------------------------------------------------------------
def _softmax_axis(dim, ndim, function):
    if dim is None:
        dim = 0 if ndim in (0, 1, 3) else 1
        warnings.warn(f"Implicit dimension choice for {function} is deprecated (as in "
                      f"torch); pass dim={dim} explicitly", UserWarning, stacklevel=4)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"{function}: dim must be an integer; got {type(dim).__name__}")
    size = max(ndim, 1)
    if not -size <= dim < size:
        raise ValueError(f"{function}: dim must be in [{-size}, {size}) for a {ndim}-d input; "
                         f"got {dim}")
    return int(dim) % size


def _normalise(input, dim, dtype, function, primitive):
    value = input if isinstance(input, Tensor) else _array(input)
    if dtype is not None:
        value = _cast(value, np.dtype(dtype))
    x = data_of(value)
    axis = _softmax_axis(dim, x.ndim, function)
    if x.ndim == 0:     # torch: a 0-d input is one class
        return ops.reshape(primitive(ops.reshape(value, (1,)), 0), ())
    if x.size == 0:
        return ops.reshape(value, x.shape)
    return primitive(value, axis)


def softmax(input, dim=None, _stacklevel=3, dtype=None):
    """``exp(x) / sum(exp(x))`` along ``dim``, as ``torch.nn.functional.softmax``.

    ``dim=None`` picks torch's legacy default (0 for 0-, 1- and 3-d inputs, else 1) with a
    warning; ``dtype`` converts the input first (differentiably). Computed from
    ``x - max(x)``: no overflow. Returns a Tensor of the input's shape.
    """
    return _normalise(input, dim, dtype, "softmax", _softmax)


def log_softmax(input, dim=None, _stacklevel=3, dtype=None):
    """``x - log(sum(exp(x)))`` along ``dim``, as ``torch.nn.functional.log_softmax``
    (``dim`` and ``dtype`` as in :func:`softmax`). Returns a Tensor."""
    return _normalise(input, dim, dtype, "log_softmax",
                      lambda value, axis: ops.log_softmax(value, axis=axis))


def _activation_input(input):
    return input if isinstance(input, Tensor) else _array(input)


def relu(input, inplace=False):
    """``max(x, 0)``; gradient 0 at 0. ``inplace`` is accepted for torch compatibility but
    the input is never modified: use the returned Tensor."""
    return ops.relu(_activation_input(input))


def leaky_relu(input, negative_slope=0.01, inplace=False):
    """``x`` where ``x > 0``, else ``negative_slope * x`` (``inplace`` as in :func:`relu`)."""
    return ops.leaky_relu(_activation_input(input),
                          _real(negative_slope, "negative_slope"))


def elu(input, alpha=1.0, inplace=False):
    """``x`` where ``x > 0``, else ``alpha * (exp(x) - 1)`` (``inplace`` as in
    :func:`relu`)."""
    return ops.elu(_activation_input(input), _real(alpha, "alpha"))


def selu(input, inplace=False):
    """``scale * elu(x, alpha)`` with torch's SELU constants (``inplace`` as in
    :func:`relu`)."""
    return ops.selu(_activation_input(input))


def sigmoid(input):
    """``1 / (1 + exp(-x))``, without overflow for any x."""
    return ops.sigmoid(_activation_input(input))


def tanh(input):
    """The hyperbolic tangent."""
    return ops.tanh(_activation_input(input))


def logsigmoid(input):
    """``log(sigmoid(x))``, finite for every finite x."""
    return _log_sigmoid(_activation_input(input))


def dropout(input, p=0.5, training=True, inplace=False):
    """Inverted dropout, as ``torch.nn.functional.dropout``: in training, each element is
    zeroed with probability ``p`` and the others scaled by ``1 / (1 - p)``; otherwise the
    input is returned (as a Tensor). Note torch's default ``training=True``, whatever the
    calling module's mode.

    The mask comes from :func:`sparsegrid.nn.manual_seed`'s generator (on a GPU it is
    drawn there, from a seed taken from it). ``p = 1`` gives zeros. ``inplace`` as in
    :func:`relu`.

    Raises
    ------
    ValueError
        ``p`` outside [0, 1].
    """
    p = _real(p, "p", 0.0, 1.0)
    input = _activation_input(input)
    if not training or p == 0:
        return input if isinstance(input, Tensor) else Tensor(input)
    if p == 1:
        return ops.mul(input, 0.0)
    return ops.dropout(input, p, True, rng=_module.default_rng())
