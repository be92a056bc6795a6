"""Dense differentiable primitives. Each forward sits next to its vector-Jacobian product.

Every function takes Tensors or plain arrays/scalars and returns a Tensor. Broadcasting
follows NumPy; :func:`unbroadcast` sums a gradient back to an input's shape, once, for all.

float16 (mixed precision): elementwise operations run in float16 (each result is rounded
once anyway); matrix products and sums convert float16 to float32, compute, and round the
result once (:func:`matrix_product`, :func:`sum_of`), as the CPU kernels do: NumPy's
float16 matmul has no BLAS, and float16 running sums lose precision row after row.

The end of the module installs them on :class:`Tensor` as operators and as torch-named
methods (``view``, ``max(dim)``, ``float()``, ``index_add_``, ...; see "Tensor methods"),
and gives Tensor an ``__array_ufunc__``: a NumPy ufunc with a Tensor operand
(``ndarray * t``, ``np.exp(t)``) runs the differentiable op here when there is one, and
otherwise computes on the values (refusing, with TypeError, to drop a gradient silently).
"""

from __future__ import annotations

import builtins
import collections
import numbers

import numpy as np

from .. import backend
from .core import (TORCH_TYPE_NAMES, Tensor, _dimension, as_tensor, data_of, is_grad_enabled,
                   record)

#: What ``max(dim)``, ``min(dim)`` and ``sort`` return, as torch's ``return_types``:
#: ``values`` (differentiable) and ``indices`` (int64), also unpackable as a pair.
ValuesIndices = collections.namedtuple("ValuesIndices", ["values", "indices"])


def _xp(*values):
    return backend.array_namespace(*[data_of(v) for v in values if hasattr(data_of(v), "shape")])


def sum_of(x, axis=None, keepdims=False):
    """``x.sum(axis, keepdims)``; float16 summed in float32 and rounded once."""
    if x.dtype == np.float16:
        return x.sum(axis=axis, keepdims=keepdims, dtype=np.float32).astype(np.float16)
    return x.sum(axis=axis, keepdims=keepdims)


def matrix_product(x, y):
    """``x @ y`` of arrays; two float16 operands are multiplied in float32 (BLAS) and the
    product rounded once to float16 (NumPy's float16 matmul is a slow loop)."""
    if x.dtype == np.float16 and y.dtype == np.float16:
        return (x.astype(np.float32) @ y.astype(np.float32)).astype(np.float16)
    return x @ y


def unbroadcast(grad, shape):
    """Sum ``grad`` over the axes NumPy broadcasting added or stretched to reach it
    (float16 in float32, rounded once per axis)."""
    while grad.ndim > len(shape):
        grad = sum_of(grad, axis=0)
    for axis, size in enumerate(shape):
        if size == 1 and grad.shape[axis] != 1:
            grad = sum_of(grad, axis=axis, keepdims=True)
    return grad


def _shape(value):
    return np.shape(data_of(value))


# -- arithmetic ---------------------------------------------------------------------------
def add(a, b):
    sa, sb = _shape(a), _shape(b)
    return record(data_of(a) + data_of(b), (a, b),
                  lambda g: (unbroadcast(g, sa), unbroadcast(g, sb)))


def sub(a, b):
    sa, sb = _shape(a), _shape(b)
    return record(data_of(a) - data_of(b), (a, b),
                  lambda g: (unbroadcast(g, sa), unbroadcast(-g, sb)))


def mul(a, b):
    x, y = data_of(a), data_of(b)
    return record(x * y, (a, b),
                  lambda g: (unbroadcast(g * y, _shape(a)), unbroadcast(g * x, _shape(b))))


def div(a, b):
    x, y = data_of(a), data_of(b)
    return record(x / y, (a, b), lambda g: (unbroadcast(g / y, _shape(a)),
                                            unbroadcast(-g * x / (y * y), _shape(b))))


def neg(a):
    return record(-data_of(a), (a,), lambda g: (-g,))


def power(a, exponent):
    """``a ** exponent`` for a constant exponent."""
    x = data_of(a)
    return record(x ** exponent, (a,), lambda g: (g * exponent * x ** (exponent - 1),))


def exp(a):
    out = _xp(a).exp(data_of(a))
    return record(out, (a,), lambda g: (g * out,))


def log(a):
    x = data_of(a)
    return record(_xp(a).log(x), (a,), lambda g: (g / x,))


def matmul(a, b):
    """Matrix product of 2-D (or batched) arrays; 1-D operands are not supported."""
    x, y = data_of(a), data_of(b)
    if x.ndim < 2 or y.ndim < 2:
        raise ValueError(f"matmul needs operands with ndim >= 2; got {x.shape} and {y.shape}")
    return record(matrix_product(x, y), (a, b), lambda g: (
        unbroadcast(matrix_product(g, y.swapaxes(-1, -2)), x.shape),
        unbroadcast(matrix_product(x.swapaxes(-1, -2), g), y.shape)))


# -- reductions and shapes -------------------------------------------------------------------
def sum(a, axis=None, keepdims=False):  # noqa: A001 - mirrors numpy's name
    x = data_of(a)
    xp = _xp(a)

    def vjp(g):
        if axis is not None and not keepdims:
            g = xp.expand_dims(g, axis)
        return (xp.broadcast_to(g, x.shape).copy(),)

    return record(sum_of(x, axis=axis, keepdims=keepdims), (a,), vjp)


def _scaled_sum(a, scale, axis=None, keepdims=False):
    """``sum(a) * scale`` differentiably; float16 summed and scaled in float32 and rounded
    once (a float16 sum of many terms overflows long before their mean does)."""
    x = data_of(a)
    if x.dtype != np.float16:
        return mul(sum(a, axis, keepdims), scale)
    xp = _xp(a)

    def vjp(g):
        if axis is not None and not keepdims:
            g = xp.expand_dims(g, axis)
        g = g.astype(np.float32) * np.float32(scale)
        return (xp.broadcast_to(g, x.shape).astype(np.float16),)

    total = x.sum(axis=axis, keepdims=keepdims, dtype=np.float32) * np.float32(scale)
    return record(xp.asarray(total).astype(np.float16), (a,), vjp)


def mean(a, axis=None, keepdims=False):
    x = data_of(a)
    count = x.size if axis is None else int(np.prod([x.shape[i] for i in np.atleast_1d(axis)]))
    return _scaled_sum(a, 1.0 / max(count, 1), axis, keepdims)


def reshape(a, shape):
    old = _shape(a)
    return record(data_of(a).reshape(shape), (a,), lambda g: (g.reshape(old),))


def transpose(a, axes=None):
    x = data_of(a)
    inverse = None if axes is None else tuple(np.argsort(axes))
    return record(x.transpose(axes), (a,), lambda g: (g.transpose(inverse),))


def concatenate(values, axis=0):
    arrays = [data_of(v) for v in values]
    xp = _xp(*values)
    bounds = np.cumsum([a.shape[axis] for a in arrays])[:-1].tolist()  # ints: CuPy too
    return record(xp.concatenate(arrays, axis=axis), tuple(values),
                  lambda g: tuple(xp.split(g, bounds, axis=axis)))


def getitem(a, index):
    """``a[index]``; the gradient scatters back (repeated integer indices accumulate)."""
    x = data_of(a)
    xp = _xp(a)
    index = data_of(index)

    def vjp(g):
        if _names_distinct_elements(index):    # slices, ints, masks: a plain assignment
            grad = xp.zeros_like(x)
            grad[index] = g
            return (grad,)
        if xp is np:
            grad = np.zeros_like(x)
            np.add.at(grad, index, g)  # an arbitrary index may repeat; not a sparse hot path
            return (grad,)
        # CuPy's add.at adds with float atomics (order-dependent bits): instead, each
        # output element's flat source position, and one deterministic segment sum
        flat = xp.arange(x.size, dtype=np.int64).reshape(x.shape)[index]
        g = xp.broadcast_to(g, flat.shape)
        total, _ = backend.kernels(g).segment_reduce(
            xp.ascontiguousarray(g).reshape(-1, 1), flat.reshape(-1), x.size, "sum")
        return (total.reshape(x.shape),)

    return record(x[index], (a,), vjp)


def _names_distinct_elements(index):
    """Whether ``x[index]`` can name no element twice: only basic indices (ints, slices,
    None, Ellipsis) and at most one boolean mask, no integer arrays."""
    parts = index if isinstance(index, tuple) else (index,)
    masks = 0
    for part in parts:
        part = data_of(part)
        if part is None or part is Ellipsis or isinstance(part, (slice, numbers.Integral)):
            continue
        if getattr(part, "dtype", None) == np.bool_:
            masks += 1
            continue
        return False
    return masks <= 1


def take_rows(values, rows):
    """``values[rows]`` for DISTINCT ``rows`` (a row gather); its gradient is a plain
    assignment into zeros (``getitem`` must allow repeats and so scatter-adds).

    The one primitive behind every gather of distinct rows (Sparsify/select, BL layers,
    output layers). A plain array in gives a plain array out; a Tensor gives a Tensor
    (recording only when a gradient is wanted).
    """
    if not isinstance(values, Tensor):
        return values[rows]
    data = values.data

    def vjp(g):
        grad = _xp(g).zeros_like(data)
        grad[rows] = g
        return (grad,)

    return record(data[rows], (values,), vjp)


def put_rows(values, rows, n_rows):
    """Zeros ``(n_rows, C)`` with ``out[rows] = values`` for DISTINCT ``rows``: the adjoint
    of :func:`take_rows` (its gradient is ``g[rows]``). Same array-or-Tensor rule."""
    data = data_of(values)
    xp = _xp(data)
    out = xp.zeros((n_rows,) + tuple(data.shape[1:]), data.dtype)
    out[rows] = data
    if not isinstance(values, Tensor):
        return out
    return record(out, (values,), lambda g: (g[rows],))


def to_device(a, device):
    """``a`` on ``device`` (``'cpu'``, ``'cuda'``, ``'cuda:N'``, a GPU number; see
    :func:`sparsegrid.backend.parse_device`), differentiably: the gradient is moved back to
    ``a``'s device. Already there: ``a`` itself (a Tensor around it for a plain array).

    The one autodiff op that crosses devices (every other op refuses mixed devices):
    ``SparseTensor.to`` moves Tensor features with it, so the result requires a gradient
    exactly when ``a`` does.
    """
    x = data_of(a)
    source = backend.device_of(x)
    out = backend.to_device(x, device)
    if out is x:
        return a if isinstance(a, Tensor) else Tensor(x)
    return record(out, (a,), lambda g: (backend.to_device(g, source),))


# -- activations ------------------------------------------------------------------------------
def relu(a):
    x = data_of(a)
    mask = x > 0
    return record(x * mask, (a,), lambda g: (g * mask,))


def leaky_relu(a, negative_slope=0.01):
    x = data_of(a)
    scale = _xp(a).where(x > 0, 1, negative_slope).astype(x.dtype)
    return record(x * scale, (a,), lambda g: (g * scale,))


def elu(a, alpha=1.0):
    x = data_of(a)
    xp = _xp(a)
    negative = alpha * (xp.exp(xp.minimum(x, 0)) - 1)
    out = xp.where(x > 0, x, negative)
    return record(out, (a,), lambda g: (g * xp.where(x > 0, 1, negative + alpha),))


SELU_ALPHA = 1.6732632423543772
SELU_SCALE = 1.0507009873554805


def selu(a):
    return mul(elu(a, SELU_ALPHA), SELU_SCALE)


def sigmoid(a):
    x = data_of(a)
    xp = _xp(a)
    # exp of -|x| never overflows: two branches of the same formula.
    e = xp.exp(-xp.abs(x))
    out = xp.where(x >= 0, 1 / (1 + e), e / (1 + e))
    return record(out, (a,), lambda g: (g * out * (1 - out),))


def tanh(a):
    out = _xp(a).tanh(data_of(a))
    return record(out, (a,), lambda g: (g * (1 - out * out),))


def log_softmax(a, axis=-1):
    x = data_of(a)
    xp = _xp(a)
    half = x.dtype == np.float16      # mixed precision: in float32, rounded once each way
    if half:
        x = x.astype(np.float32)
    shifted = x - x.max(axis=axis, keepdims=True)
    out = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))

    def vjp(g):
        if half:
            g = g.astype(np.float32)
        grad = g - xp.exp(out) * g.sum(axis=axis, keepdims=True)
        return (grad.astype(np.float16) if half else grad,)

    return record(out.astype(np.float16) if half else out, (a,), vjp)


# -- losses -----------------------------------------------------------------------------------
def softmax_cross_entropy(logits, labels, ignore_index=-100, reduction="mean"):
    """Cross-entropy of (N, C) logits against integer labels (N,).

    Rows whose label equals ``ignore_index`` contribute nothing; ``'mean'`` divides by the
    number of other rows (0 if there are none). ``reduction``: 'mean', 'sum' or 'none'.
    """
    labels = np.asarray(backend.to_numpy(data_of(labels)))
    x = data_of(logits)
    if x.ndim != 2 or labels.shape != (x.shape[0],):
        raise ValueError(f"logits must be (N, C) and labels (N,); got {x.shape} and "
                         f"{labels.shape}")
    keep = labels != ignore_index
    if keep.any() and (labels[keep].min() < 0 or labels[keep].max() >= x.shape[1]):
        raise ValueError(f"labels must be in [0, {x.shape[1]}) or ignore_index "
                         f"{ignore_index}; got values in [{labels.min()}, {labels.max()}]")
    xp = _xp(logits)
    rows = xp.asarray(np.flatnonzero(keep))
    picked = getitem(log_softmax(logits), (rows, xp.asarray(labels[keep])))
    losses = neg(picked)
    if reduction == "none":
        full = Tensor(xp.zeros(x.shape[0], x.dtype))
        return _scatter_rows(full, losses, rows, x.shape[0])
    if reduction == "sum":
        return sum(losses)
    if reduction == "mean":
        return _scaled_sum(losses, 1.0 / max(int(keep.sum()), 1))
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")


def _scatter_rows(base, values, rows, n):
    xp = _xp(values)

    def vjp(g):
        return None, g[rows]

    out = xp.zeros(n, values.dtype)
    out[rows] = data_of(values)
    return record(out, (base, values), vjp)


def binary_cross_entropy_with_logits(logits, targets, reduction="mean"):
    """Mean (or sum) of ``max(x, 0) - x * t + log(1 + exp(-|x|))``: stable for any x.

    ``logits`` and ``targets`` must have the same shape (no broadcasting: an (N, 1) score
    against (N,) targets would silently become (N, N)).
    """
    _same_shape(logits, targets, "logits", "targets")
    x, t = data_of(logits), data_of(targets)
    xp = _xp(logits)
    losses = xp.maximum(x, 0) - x * t + xp.log1p(xp.exp(-xp.abs(x)))
    e = xp.exp(-xp.abs(x))
    prob = xp.where(x >= 0, 1 / (1 + e), e / (1 + e))
    if reduction == "none":
        return record(losses, (logits, targets), lambda g: (g * (prob - t), -g * x))
    scale = 1.0 / max(losses.size, 1) if reduction == "mean" else 1.0
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")
    if x.dtype == np.float16:       # summed and scaled in float32, rounded once
        total = xp.asarray(losses.sum(dtype=np.float32) * np.float32(scale)).astype(np.float16)
    else:
        total = losses.sum() * scale
    return record(total, (logits, targets),
                  lambda g: (g * scale * (prob - t), -g * scale * x))


def _same_shape(a, b, name_a, name_b):
    if _shape(a) != _shape(b):
        raise ValueError(f"{name_a} and {name_b} must have the same shape; got {_shape(a)} "
                         f"and {_shape(b)} (reshape one: losses do not broadcast)")


def mse_loss(a, b, reduction="mean"):
    """Mean (or sum, or per element) squared difference of two same-shape arrays."""
    _same_shape(a, b, "input", "target")
    diff = sub(a, b)
    squared = mul(diff, diff)
    if reduction == "none":
        return squared
    return mean(squared) if reduction == "mean" else sum(squared)


def dropout(a, p=0.5, training=True, rng=None):
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p).

    ``rng`` (a NumPy Generator; a fresh one if None) draws the mask of a NumPy array. For a
    CuPy array the mask is drawn on the device, by CuPy's generator seeded with one draw
    from ``rng``: reproducible from the same seed (``nn.manual_seed``), no host-to-device
    copy of the mask, but a different mask than the CPU's."""
    if not 0 <= p < 1:
        raise ValueError(f"p must be in [0, 1); got {p}")
    if not training or p == 0:
        return a if isinstance(a, Tensor) else Tensor(a)
    x = data_of(a)
    rng = np.random.default_rng() if rng is None else rng
    xp = backend.array_namespace(x)
    if xp is np:
        keep = rng.random(x.shape) >= p
    else:
        seed = int(rng.integers(2**63 - 1))
        keep = xp.random.RandomState(seed).random_sample(x.shape, dtype=np.float32) >= p
    scale = (keep / (1 - p)).astype(x.dtype)
    return record(x * scale, (a,), lambda g: (g * scale,))


# -- elementwise and casts ------------------------------------------------------------------
def absolute(a):
    """``|a|``; the gradient is ``sign(a)`` (0 at 0, as torch's)."""
    x = data_of(a)
    xp = _xp(a)
    return record(xp.abs(x), (a,), lambda g: (g * xp.sign(x),))


def _maximum_or_minimum(a, b, larger):
    x, y = data_of(a), data_of(b)
    xp = _xp(a, b)
    out = xp.maximum(x, y) if larger else xp.minimum(x, y)

    def vjp(g):
        wins = (x > y) if larger else (x < y)
        tie = x == y                        # ties share the gradient equally, as in torch
        share_a = xp.where(wins, 1.0, xp.where(tie, 0.5, 0.0)).astype(g.dtype)
        return unbroadcast(g * share_a, _shape(a)), unbroadcast(g * (1 - share_a), _shape(b))

    return record(out, (a, b), vjp)


def maximum(a, b):
    """Elementwise maximum with broadcasting (``torch.maximum``); at ties each input gets
    half the gradient."""
    return _maximum_or_minimum(a, b, True)


def minimum(a, b):
    """Elementwise minimum with broadcasting (``torch.minimum``); at ties each input gets
    half the gradient."""
    return _maximum_or_minimum(a, b, False)


def cast(a, dtype):
    """``a`` as ``dtype`` (anything ``np.dtype`` takes). Between floating dtypes the
    gradient is cast back; to an integer or bool dtype the result is a constant (no
    gradient, as torch's ``long()``). The same dtype: ``a`` itself."""
    x = data_of(a)
    dtype = np.dtype(dtype)
    if x.dtype == dtype:
        return as_tensor(a)
    out = x.astype(dtype)
    if dtype.kind in "fc" and x.dtype.kind in "fc":
        return record(out, (a,), lambda g: (g.astype(x.dtype),))
    return Tensor(out)


def clone(a):
    """A copy of ``a``'s data; the gradient passes through unchanged."""
    return record(data_of(a).copy(), (a,), lambda g: (g,))


# -- reductions with indices -----------------------------------------------------------------
def _reduced_axis(x, dim, where):
    axis = _dimension(dim, x.ndim, where)
    if x.shape[axis] == 0:
        raise IndexError(f"{where}: dimension {dim} of shape {tuple(x.shape)} is empty, so "
                         f"there is nothing to reduce")
    return axis


def _extreme(a, dim, keepdim, largest, where):
    """(values Tensor, indices array or None) of the max/min of ``a`` over ``dim``."""
    x = data_of(a)
    xp = _xp(a)
    if dim is None:
        if x.size == 0:
            raise ValueError(f"{where}() of an empty tensor (shape {tuple(x.shape)}): "
                             f"there is no value; give dim to reduce one dimension")
        value = x.max() if largest else x.min()

        def vjp_all(g):
            # ties share the gradient equally (torch's max() without dim); a NaN maximum
            # is held by the NaN elements
            hit = x == value
            if x.dtype.kind == "f":
                hit = hit | (xp.isnan(x) & xp.isnan(value))
            return ((g / hit.sum()).astype(x.dtype) * hit,)

        return record(value, (a,), vjp_all), None
    axis = _reduced_axis(x, dim, where)
    kept = (xp.argmax if largest else xp.argmin)(x, axis=axis, keepdims=True)
    values = xp.take_along_axis(x, kept, axis=axis)

    def vjp(g):
        if not keepdim:
            g = xp.expand_dims(g, axis)
        positions = xp.arange(x.shape[axis]).reshape(
            [-1 if i == axis else 1 for i in range(x.ndim)])
        return (xp.where(positions == kept, g, 0).astype(x.dtype),)

    index = kept if keepdim else kept.squeeze(axis)
    if not keepdim:
        values = values.squeeze(axis)
    return record(values, (a,), vjp), index.astype(np.int64, copy=False)


def amax(a, axis=None, keepdims=False):
    """The maximum over ``axis`` (one int, or None for all elements). Gradient: to the
    first maximal element along ``axis`` (the one :func:`argmax` names); over all elements,
    shared equally by the maximal elements (torch's ``max(dim)`` and ``max()``)."""
    return _extreme(a, axis, keepdims, True, "amax")[0]


def amin(a, axis=None, keepdims=False):
    """The minimum over ``axis``; the gradient rule of :func:`amax`."""
    return _extreme(a, axis, keepdims, False, "amin")[0]


def _arg_extreme(a, dim, keepdim, largest, where):
    x = data_of(a)
    xp = _xp(a)
    find = xp.argmax if largest else xp.argmin
    if dim is None:
        if x.size == 0:
            raise ValueError(f"{where}() of an empty tensor (shape {tuple(x.shape)})")
        index = find(x.reshape(-1))
        if keepdim:
            index = index.reshape((1,) * x.ndim)
    else:
        index = find(x, axis=_reduced_axis(x, dim, where), keepdims=bool(keepdim))
    return Tensor(xp.asarray(index).astype(np.int64, copy=False))


def argmax(a, axis=None, keepdims=False):
    """int64 indices of the (first) maximum along ``axis``; ``axis=None``: the index into
    the flattened tensor (``keepdims``: shaped with ones, as torch). No gradient."""
    return _arg_extreme(a, axis, keepdims, True, "argmax")


def argmin(a, axis=None, keepdims=False):
    """int64 indices of the (first) minimum along ``axis``; see :func:`argmax`."""
    return _arg_extreme(a, axis, keepdims, False, "argmin")


def sort(a, axis=-1, descending=False):
    """``(values, indices)`` of ``a`` sorted along ``axis``, stably (equal values keep their
    order, in both directions); NaN sorts as the largest value, as in torch. The values'
    gradient goes back to where each value came from."""
    x = data_of(a)
    xp = _xp(a)
    if x.ndim == 0:
        return ValuesIndices(clone(a), Tensor(xp.zeros((), np.int64)))
    axis = _dimension(axis, x.ndim, "sort")
    if descending:   # a stable ascending sort of the reversed axis, reversed back
        n = x.shape[axis]
        flipped = xp.argsort(xp.flip(x, axis=axis), axis=axis, kind="stable")
        index = xp.flip(n - 1 - flipped, axis=axis)
    else:
        index = xp.argsort(x, axis=axis, kind="stable")
    index = index.astype(np.int64, copy=False)

    def vjp(g):
        grad = xp.zeros_like(x)
        xp.put_along_axis(grad, index, g, axis=axis)
        return (grad,)

    return ValuesIndices(record(xp.take_along_axis(x, index, axis=axis), (a,), vjp),
                         Tensor(index))


def expand(a, shape):
    """``a`` broadcast to ``shape`` (a read-only view); the gradient sums back."""
    x = data_of(a)
    return record(_xp(a).broadcast_to(x, tuple(shape)), (a,),
                  lambda g: (unbroadcast(g, x.shape),))


def softmax(a, axis=-1):
    """``exp(log_softmax(a, axis))``: stable for any input (float16: computed in float32,
    rounded once)."""
    x = data_of(a)
    if x.dtype != np.float16:
        return exp(log_softmax(a, axis))
    xp = _xp(a)
    wide = x.astype(np.float32)
    shifted = wide - wide.max(axis=axis, keepdims=True)
    e = xp.exp(shifted)
    out = e / e.sum(axis=axis, keepdims=True)

    def vjp(g):
        g = g.astype(np.float32)
        return ((out * (g - (g * out).sum(axis=axis, keepdims=True))).astype(np.float16),)

    return record(out.astype(np.float16), (a,), vjp)


# -- index_add ------------------------------------------------------------------------------
def _index_add_arguments(self, dim, index, source, alpha):
    """Validated (axis, int64 index array, source, alpha) for ``index_add(_)``."""
    x = data_of(self)
    if x.ndim == 0:
        raise ValueError("index_add_: self must have at least one dimension; got a 0-d "
                         "tensor")
    axis = _dimension(dim, x.ndim, "index_add_")
    index = data_of(index)
    if isinstance(index, (list, tuple)):   # (a float in the list stays float: refused)
        index = np.asarray(index) if len(index) else np.zeros(0, np.int64)
    if not hasattr(index, "dtype") or index.dtype.kind not in "iu":
        raise TypeError(f"index_add_: index must be a 1-D integer array or Tensor; got "
                        f"{getattr(index, 'dtype', type(index).__name__)}")
    if index.ndim > 1:
        raise ValueError(f"index_add_: index must be 1-D; got shape {tuple(index.shape)}")
    backend.require_same_device("index_add_: self", x, "index", index)
    index = index.reshape(-1).astype(np.int64, copy=False)
    src = data_of(source)
    if not hasattr(src, "dtype"):
        raise TypeError(f"index_add_: source must be an array or Tensor; got "
                        f"{type(source).__name__}")
    backend.require_same_device("index_add_: self", x, "source", src)
    if src.dtype != x.dtype:
        raise TypeError(f"index_add_: self ({x.dtype}) and source ({src.dtype}) must have "
                        f"the same dtype (cast one with .to(dtype))")
    expected = x.shape[:axis] + (len(index),) + x.shape[axis + 1:]
    if tuple(src.shape) != tuple(expected):
        raise ValueError(f"index_add_: source must have shape {expected} (self's shape "
                         f"{tuple(x.shape)} with len(index) = {len(index)} along dim "
                         f"{axis}); got {tuple(src.shape)}")
    if x.dtype.kind not in "fiub":
        raise TypeError(f"index_add_: dtype {x.dtype} is not supported (floating, integer "
                        f"or bool tensors)")
    if isinstance(alpha, (Tensor,)) or not isinstance(alpha, numbers.Number):
        raise TypeError(f"index_add_: alpha must be a number; got {type(alpha).__name__}")
    if x.dtype.kind in "iub" and not isinstance(alpha, numbers.Integral):
        raise TypeError(f"index_add_: alpha must be an int for an integer tensor; got "
                        f"{alpha!r}")
    if len(index):
        low, high = int(index.min()), int(index.max())     # (a host read on the GPU)
        if low < 0 or high >= x.shape[axis]:
            raise IndexError(f"index_add_: index out of range: values must be in [0, "
                             f"{x.shape[axis]}) for dim {axis} of shape {tuple(x.shape)}; "
                             f"got values in [{low}, {high}]")
    return axis, index, source, alpha


def _index_totals(x, axis, index, src, alpha):
    """(distinct indices, their summed source slices): each index's slices added in the
    order they appear, deterministically, without ``ufunc.at``."""
    xp = backend.array_namespace(x)
    moved = x.shape[:axis] + x.shape[axis + 1:]
    width = int(np.prod(moved, dtype=np.int64))
    rows = xp.moveaxis(src, axis, 0).reshape(len(index), width)
    targets, inverse = xp.unique(index, return_inverse=True)
    inverse = inverse.reshape(-1)
    if width == 0:
        totals = xp.zeros((len(targets), 0), x.dtype)
    elif x.dtype.kind == "f":    # the backends' segment sum (float16 summed in float32)
        work = rows if x.dtype != np.float16 else rows.astype(np.float32)
        totals, _ = backend.kernels(work).segment_reduce(
            xp.ascontiguousarray(work), inverse, len(targets), "sum")
        if alpha != 1:
            totals = totals * alpha
        totals = totals.astype(x.dtype, copy=False)
    else:                         # integers: a stable sort and differences of running sums
        order = xp.argsort(inverse, kind="stable")
        sums = xp.cumsum(rows[order].astype(np.int64 if x.dtype.kind == "b" else x.dtype),
                         axis=0)
        ends = xp.searchsorted(inverse[order], xp.arange(len(targets)), side="right") - 1
        totals = sums[ends]
        totals[1:] -= sums[ends[:-1]]
        totals = totals > 0 if x.dtype.kind == "b" else totals * x.dtype.type(alpha)
    return targets, totals.reshape((len(targets),) + moved)


def _add_at(array, axis, targets, totals):
    """``array[..., targets, ...] += totals`` along ``axis`` in place (distinct targets)."""
    view = backend.array_namespace(array).moveaxis(array, axis, 0)
    if array.dtype.kind == "b":
        view[targets] = view[targets] | totals
    else:
        view[targets] = view[targets] + totals


def index_add(self, dim, index, source, alpha=1):
    """Out of place: ``self`` with ``alpha * source[..., i, ...]`` added at position
    ``index[i]`` along ``dim`` (repeated indices accumulate). Differentiable in ``self``
    (identity) and ``source`` (the gradient gathered at ``index``). See
    :meth:`Tensor.index_add_`."""
    axis, index, source, alpha = _index_add_arguments(self, dim, index, source, alpha)
    x = data_of(self)
    out = x.copy()
    if len(index):
        _add_at(out, axis, *_index_totals(x, axis, index, data_of(source), alpha))
    xp = _xp(self)

    def vjp(g):
        gathered = xp.take(g, index, axis=axis)
        return g, (gathered * alpha).astype(g.dtype, copy=False) if alpha != 1 else gathered

    return record(out, (self, source), vjp)


# -- Tensor methods (torch's names) ----------------------------------------------------------
def _shape_argument(shape, where, many_minus_ones=False):
    """A shape given as varargs ints or one tuple/list/Size, checked (at most one -1,
    unless ``many_minus_ones``)."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    out = []
    for extent in shape:
        if isinstance(extent, (bool, np.bool_)) or not isinstance(extent, numbers.Integral):
            raise TypeError(f"{where}: the shape must be ints; got {shape!r}")
        out.append(int(extent))
    if any(e < -1 for e in out) or (builtins.sum(e == -1 for e in out) > 1
                                     and not many_minus_ones):
        raise ValueError(f"{where}: invalid shape {tuple(out)}: extents must be >= 0"
                         + ("" if many_minus_ones else ", with at most one -1"))
    return tuple(out)


def _view(self, *shape):
    """The same elements in another shape: ``view(2, -1)``, ``view((2, 3))`` (as
    ``reshape``; the data is copied only where NumPy must). Differentiable."""
    shape = _shape_argument(shape, "view")
    size = self.data.size
    known = int(np.prod([e for e in shape if e != -1], dtype=np.int64))
    if (known != size if -1 not in shape else (known == 0 or size % known)):
        raise ValueError(f"view: shape {shape} is invalid for a tensor of {size} elements "
                         f"(shape {tuple(self.shape)})")
    return reshape(self, shape)


def _view_as(self, other):
    """``view(other.shape)``."""
    return _view(self, tuple(np.shape(data_of(other))))


def _flatten(self, start_dim=0, end_dim=-1):
    """Dimensions ``start_dim..end_dim`` merged into one (a 0-d tensor becomes 1-D)."""
    shape = tuple(self.shape)
    if not shape:
        return reshape(self, (1,))
    start = _dimension(start_dim, len(shape), "flatten")
    end = _dimension(end_dim, len(shape), "flatten")
    if start > end:
        raise ValueError(f"flatten: start_dim {start_dim} comes after end_dim {end_dim}")
    merged = int(np.prod(shape[start:end + 1], dtype=np.int64))
    return reshape(self, shape[:start] + (merged,) + shape[end + 1:])


def _squeeze(self, dim=None):
    """Dimensions of extent 1 removed: all of them, or those named by ``dim`` (an int or a
    tuple; a named dimension whose extent is not 1 stays, as in torch)."""
    shape = tuple(self.shape)
    if dim is None:
        drop = {i for i, e in enumerate(shape) if e == 1}
    else:
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        drop = {i for i in (_dimension(d, len(shape), "squeeze") for d in dims)
                if shape[i] == 1}
    return reshape(self, tuple(e for i, e in enumerate(shape) if i not in drop))


def _unsqueeze(self, dim):
    """A dimension of extent 1 inserted at ``dim`` (in ``[-ndim - 1, ndim]``)."""
    shape = tuple(self.shape)
    axis = _dimension(dim, len(shape) + 1, "unsqueeze")
    return reshape(self, shape[:axis] + (1,) + shape[axis:])


def _permute(self, *dims):
    """The dimensions reordered: ``permute(2, 0, 1)`` or ``permute((2, 0, 1))``."""
    dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
    axes = [_dimension(d, self.ndim, "permute") for d in dims]
    if sorted(axes) != list(range(self.ndim)):
        raise ValueError(f"permute: dims {tuple(dims)} are not a permutation of the "
                         f"{self.ndim} dimensions")
    return transpose(self, tuple(axes))


def _transpose(self, dim0, dim1):
    """Dimensions ``dim0`` and ``dim1`` swapped (torch's ``transpose``)."""
    axes = list(range(self.ndim))
    i, j = _dimension(dim0, self.ndim, "transpose"), _dimension(dim1, self.ndim, "transpose")
    axes[i], axes[j] = axes[j], axes[i]
    return transpose(self, tuple(axes))


def _t(self):
    """The transpose of a matrix; a 0-d or 1-D tensor as is (torch's ``t()``)."""
    if self.ndim > 2:
        raise ValueError(f"t() expects a tensor with <= 2 dimensions; got {self.ndim} (use "
                         f"transpose(dim0, dim1) or permute)")
    return transpose(self) if self.ndim == 2 else self


def _expand(self, *sizes):
    """Broadcast to ``sizes`` (-1 keeps a dimension; new leading dimensions allowed)."""
    sizes = _shape_argument(sizes, "expand", many_minus_ones=True)
    shape = tuple(self.shape)
    lead = len(sizes) - len(shape)
    if lead < 0:
        raise ValueError(f"expand: {len(sizes)} sizes for a tensor of {len(shape)} "
                         f"dimensions")
    target = tuple(shape[i - lead] if s == -1 and i >= lead else s
                   for i, s in enumerate(sizes))
    if -1 in target[:lead]:
        raise ValueError(f"expand: -1 is not allowed for a new leading dimension; got "
                         f"{sizes}")
    return expand(self, target)


def _reduction_axes(dim, axis, ndim, where):
    if dim is not None and axis is not None:
        raise TypeError(f"{where}: give dim or axis, not both")
    dim = axis if dim is None else dim
    if dim is None:
        return None
    if isinstance(dim, (tuple, list)):
        axes = tuple(_dimension(d, ndim, where) for d in dim)
        if len(set(axes)) != len(axes):
            raise ValueError(f"{where}: dimension repeated in {tuple(dim)}")
        return axes
    return _dimension(dim, ndim, where)


def _keep(keepdim, keepdims):
    return bool(keepdim if keepdims is None else keepdims)


def _no_out(out, where):
    if out is not None:
        raise TypeError(f"{where}: out= is not supported (tensors are not written in place)")


def _sum_method(self, dim=None, keepdim=False, *, axis=None, keepdims=None, dtype=None,
                out=None):
    """Sum over ``dim`` (an int, a tuple, or None for all), torch's or NumPy's keywords
    (``keepdim``/``keepdims``, ``dim``/``axis``); ``dtype`` casts first. Differentiable."""
    _no_out(out, "sum")
    a = self if dtype is None else cast(self, dtype)
    return sum(a, _reduction_axes(dim, axis, self.ndim, "sum"), _keep(keepdim, keepdims))


def _mean_method(self, dim=None, keepdim=False, *, axis=None, keepdims=None, dtype=None,
                 out=None):
    """Mean over ``dim`` (as :meth:`sum`). Differentiable."""
    _no_out(out, "mean")
    a = self if dtype is None else cast(self, dtype)
    return mean(a, _reduction_axes(dim, axis, self.ndim, "mean"), _keep(keepdim, keepdims))


def _extreme_method(largest):
    name = "max" if largest else "min"

    def method(self, dim=None, keepdim=False, *, axis=None, keepdims=None, out=None):
        _no_out(out, name)
        if isinstance(dim, (Tensor, np.ndarray)) or backend.is_cupy_array(dim):
            return _maximum_or_minimum(self, dim, largest)    # torch.max(a, b)
        if dim is not None and axis is not None:
            raise TypeError(f"{name}: give dim or axis, not both")
        dim = axis if dim is None else dim
        values, index = _extreme(self, dim, _keep(keepdim, keepdims), largest, name)
        return values if index is None else ValuesIndices(values, Tensor(index))

    method.__name__ = name
    method.__doc__ = (
        f"``{name}()``: the {name}imum of all elements (a 0-d Tensor; ties share the "
        f"gradient). ``{name}(dim, keepdim=False)``: ``(values, indices)`` along ``dim`` "
        f"(a :class:`ValuesIndices`: ``.values`` differentiable, the gradient to the first "
        f"{name}imal element, ``.indices`` int64). ``{name}(other)``: the elementwise "
        f"{name}imum. ``axis``/``keepdims`` are accepted for NumPy's functions.")
    return method


def _arg_method(largest):
    name = "argmax" if largest else "argmin"

    def method(self, dim=None, keepdim=False, *, axis=None, keepdims=None, out=None):
        _no_out(out, name)
        if dim is not None and axis is not None:
            raise TypeError(f"{name}: give dim or axis, not both")
        dim = axis if dim is None else dim
        return _arg_extreme(self, dim, _keep(keepdim, keepdims), largest, name)

    method.__name__ = name
    method.__doc__ = (f"int64 index of the first {name[3:]}imum along ``dim`` (of the "
                      f"flattened tensor when None; ``keepdim`` keeps the dimension). No "
                      f"gradient.")
    return method


def _sort_method(self, dim=-1, descending=False, stable=True):
    """``(values, indices)`` sorted along ``dim``; always stable. See :func:`sort`."""
    return sort(self, dim, descending)


def _softmax_method(self, dim=-1):
    """Softmax along ``dim``. Differentiable."""
    return softmax(self, _dimension(dim, self.ndim, "softmax"))


def _log_softmax_method(self, dim=-1):
    """Log-softmax along ``dim``. Differentiable."""
    return log_softmax(self, _dimension(dim, self.ndim, "log_softmax"))


def _is_dtype(value):
    if isinstance(value, np.dtype):
        return True
    if isinstance(value, type):
        return issubclass(value, (np.generic, builtins.int, builtins.float, builtins.bool,
                                  complex))
    return False


def _to(self, *args, device=None, dtype=None, non_blocking=False, copy=False):
    """``to(device)``, ``to(dtype)``, ``to(device, dtype)``, ``to(other)`` (its device and
    dtype), with ``device=`` / ``dtype=`` keywords: the tensor moved (see
    :func:`to_device`) and cast (see :func:`cast`), differentiably; ``self`` itself when
    nothing changes, unless ``copy=True``. Devices: ``'cpu'``, ``'cuda'``, ``'cuda:N'``, a
    GPU number; dtypes: a NumPy dtype or type (``np.float32``) or its name."""
    if len(args) > 2:
        raise TypeError(f"to() takes at most 2 positional arguments; got {len(args)}")
    for arg in args:
        if isinstance(arg, Tensor):
            device, dtype = arg.device, arg.dtype
        elif _is_dtype(arg):
            dtype = arg
        elif isinstance(arg, str):
            try:
                backend.parse_device(arg)
                device = arg
            except ValueError:
                try:
                    dtype = np.dtype(arg)
                except TypeError:
                    raise ValueError(f"to(): {arg!r} is neither a device ('cpu', 'cuda', "
                                     f"'cuda:N') nor a dtype name ('float32', ...)") from None
        else:
            device = arg
    out = self if device is None else to_device(self, device)
    if dtype is not None:
        out = cast(out, dtype)
    if copy and out is self:
        out = clone(self)
    return out


def _cuda(self, device=None, non_blocking=False):
    """The tensor on a GPU (the current one for None), differentiably."""
    return to_device(self, backend.cuda_device_argument(device))


def _cpu(self):
    """The tensor on the CPU (itself when it is there), differentiably."""
    return to_device(self, "cpu")


def _caster(dtype, name):
    def method(self):
        return cast(self, dtype)

    method.__name__ = name
    method.__doc__ = (f"The tensor as {np.dtype(dtype)} (``self`` when it already is"
                      + ("; differentiable from floating dtypes" if np.dtype(dtype).kind == "f"
                         else "; no gradient") + ").")
    return method


def tensor_type(a, dtype):
    """``Tensor.type(dtype)``: torch's type names -- ``'torch.FloatTensor'`` (float32 on
    the CPU), ``'torch.cuda.FloatTensor'`` (on the GPU: the tensor's own one, else the
    current one), ``'torch.LongTensor'``, ``'torch.DoubleTensor'``, ``'torch.HalfTensor'``,
    ``'torch.IntTensor'``, ``'torch.BoolTensor'``, ... (a CPU name moves a GPU tensor to the
    CPU, as in torch) -- or a NumPy dtype. Differentiable between floating dtypes.
    ValueError for an unknown name."""
    if not isinstance(dtype, str):
        return cast(a, dtype)
    prefix, _, name = dtype.rpartition(".")
    if prefix not in ("torch", "torch.cuda") or name not in TORCH_TYPE_NAMES:
        raise ValueError(f"invalid type: {dtype!r}; expected 'torch.<Name>' or "
                         f"'torch.cuda.<Name>' with Name one of {sorted(TORCH_TYPE_NAMES)}")
    a = as_tensor(a)
    if prefix == "torch":
        device = "cpu"
    else:
        device = a.device if a.is_cuda else "cuda"
    return cast(to_device(a, device), TORCH_TYPE_NAMES[name])


def _index_add_(self, dim, index, source, alpha=1):
    """In place: add ``alpha * source[..., i, ...]`` to ``self[..., index[i], ...]`` along
    ``dim`` (repeated indices accumulate) and return ``self``, as torch's.

    ``index``: 1-D integers in ``[0, self.size(dim))`` (IndexError otherwise) on
    ``self``'s device; ``source``: ``self``'s dtype, and shape with ``len(index)`` along
    ``dim``. Deterministic: each index's slices are summed in their order by the backend's
    segment sum (floating; float16 in float32) or exactly (integers; bool: logical or); no
    ``ufunc.at``, no float atomics.

    Without a gradient to record (under ``no_grad()``, or when neither ``self`` nor
    ``source`` requires one), ``self.data`` is updated in place. Otherwise ``self`` becomes
    the recorded result (differentiable in ``self`` and ``source``), holding a new array:
    the graph keeps the old one. A leaf that requires a gradient is refused
    (RuntimeError, as in torch), and ``backward`` refuses operations that used ``self``
    before the change (see ``Tensor.backward``).
    """
    axis, index, source, alpha = _index_add_arguments(self, dim, index, source, alpha)
    wanted = is_grad_enabled() and (self.requires_grad or getattr(source, "requires_grad",
                                                                  False))
    if wanted and self.requires_grad and self.is_leaf:
        raise RuntimeError("index_add_: a leaf Tensor that requires grad is being used in an "
                           "in-place operation; use index_add (out of place), or clone() it")
    if not wanted:
        if len(index):
            _add_at(self.data, axis, *_index_totals(self.data, axis, index, data_of(source),
                                                     alpha))
        self._version += 1
        return self
    # Rebase: the old value moves to a new node; self becomes index_add(old, source).
    previous = Tensor(self.data, self.requires_grad)
    previous._inputs, previous._vjp = self._inputs, self._vjp
    previous._saved_versions = self._saved_versions
    result = index_add(previous, axis, index, previous if source is self else source, alpha)
    self.data, self.requires_grad = result.data, True
    self._inputs, self._vjp = result._inputs, result._vjp
    self._saved_versions = result._saved_versions
    self._version += 1
    return self


# -- NumPy's ufuncs on Tensors ---------------------------------------------------------------
_UFUNC_OPS = {np.add: add, np.subtract: sub, np.multiply: mul, np.true_divide: div,
              np.matmul: matmul, np.maximum: maximum, np.minimum: minimum, np.negative: neg,
              np.exp: exp, np.log: log, np.tanh: tanh, np.absolute: absolute,
              np.positive: as_tensor}
# ufuncs whose gradient is zero wherever it exists (or whose outputs are not floating):
# computed on the values even for inputs that require a gradient.
_UFUNCS_WITHOUT_GRADIENT = {np.equal, np.not_equal, np.less, np.less_equal, np.greater,
                            np.greater_equal, np.isnan, np.isinf, np.isfinite, np.signbit,
                            np.logical_and, np.logical_or, np.logical_xor, np.logical_not,
                            np.sign, np.floor, np.ceil, np.rint, np.trunc, np.floor_divide,
                            np.bitwise_and, np.bitwise_or, np.bitwise_xor, np.invert}


def _array_ufunc(self, ufunc, method, *inputs, **kwargs):
    """NumPy's ufunc protocol: ``ndarray * t``, ``np.float32(2) - t``, ``np.exp(t)``,
    ``arr == t`` give Tensors (the differentiable op when there is one, so a gradient
    flows); other ufuncs compute on the values, and refuse (TypeError) when an input needs
    a gradient they cannot give. ``out=`` arrays are written in place."""
    if method == "__call__" and not kwargs:
        op = _UFUNC_OPS.get(ufunc)
        if op is not None:
            return op(*inputs)
        if ufunc is np.power and isinstance(inputs[0], Tensor) and \
                not isinstance(inputs[1], Tensor):
            return power(inputs[0], data_of(inputs[1]))
    out = kwargs.get("out")
    # Values written into plain arrays (``arr += t``) leave the graph explicitly, as
    # np.asarray(t) does; a Tensor result must not silently lose a gradient.
    into_arrays = out is not None and not any(isinstance(o, Tensor) for o in out)
    operands = inputs + (tuple(out) if out is not None else ())
    needs_grad = is_grad_enabled() and not into_arrays and any(
        isinstance(v, Tensor) and v.requires_grad for v in operands)
    if needs_grad and ufunc not in _UFUNCS_WITHOUT_GRADIENT:
        raise TypeError(f"numpy.{ufunc.__name__}{'' if method == '__call__' else '.' + method}"
                        f" on a Tensor that requires a gradient: sparsegrid.autodiff has no "
                        f"gradient for it; apply it to .detach() (or .numpy()) to use the "
                        f"values, or write it with autodiff operations")
    if out is not None:
        kwargs["out"] = tuple(data_of(o) for o in out)
    result = getattr(ufunc, method)(*[data_of(v) for v in inputs], **kwargs)
    if out is not None:
        for o in out:
            if isinstance(o, Tensor):
                o._version += 1
        return out[0] if len(out) == 1 else out
    if result is None:            # ufunc.at: in place on the first operand
        if isinstance(inputs[0], Tensor):
            inputs[0]._version += 1
        return None
    if isinstance(result, tuple):
        return tuple(Tensor(r) for r in result)
    return Tensor(result)


# -- operators on Tensor ---------------------------------------------------------------------
def _install_operators():
    def rev(fn):
        return lambda self, other: fn(other, self)

    Tensor.__add__ = lambda self, other: add(self, other)
    Tensor.__radd__ = rev(add)
    Tensor.__sub__ = lambda self, other: sub(self, other)
    Tensor.__rsub__ = rev(sub)
    Tensor.__mul__ = lambda self, other: mul(self, other)
    Tensor.__rmul__ = rev(mul)
    Tensor.__truediv__ = lambda self, other: div(self, other)
    Tensor.__rtruediv__ = rev(div)
    Tensor.__matmul__ = lambda self, other: matmul(self, other)
    Tensor.__rmatmul__ = rev(matmul)
    Tensor.__neg__ = neg
    Tensor.__pos__ = as_tensor
    Tensor.__pow__ = power
    Tensor.__abs__ = absolute
    Tensor.__getitem__ = getitem
    Tensor.__array_ufunc__ = _array_ufunc
    Tensor.T = property(lambda self: transpose(self))
    methods = {
        # shapes
        "view": _view, "reshape": _view, "view_as": _view_as, "reshape_as": _view_as,
        "flatten": _flatten, "squeeze": _squeeze, "unsqueeze": _unsqueeze,
        "permute": _permute, "transpose": _transpose, "t": _t, "expand": _expand,
        "expand_as": lambda self, other: expand(self, np.shape(data_of(other))),
        "contiguous": lambda self: self,
        # reductions
        "sum": _sum_method, "mean": _mean_method, "max": _extreme_method(True),
        "min": _extreme_method(False), "argmax": _arg_method(True),
        "argmin": _arg_method(False), "sort": _sort_method,
        # elementwise
        "abs": absolute, "exp": exp, "log": log, "tanh": tanh, "sigmoid": sigmoid,
        "relu": relu, "neg": neg, "pow": power, "softmax": _softmax_method,
        "log_softmax": _log_softmax_method, "clone": clone,
        # devices and dtypes
        "to": _to, "cuda": _cuda, "cpu": _cpu, "float": _caster(np.float32, "float"),
        "double": _caster(np.float64, "double"), "half": _caster(np.float16, "half"),
        "long": _caster(np.int64, "long"), "int": _caster(np.int32, "int"),
        "bool": _caster(np.bool_, "bool"),
        # in place
        "index_add_": _index_add_, "index_add": index_add,
    }
    for name, method in methods.items():
        setattr(Tensor, name, method)


_install_operators()
