"""Dense differentiable primitives. Each forward sits next to its vector-Jacobian product.

Every function takes Tensors or plain arrays/scalars and returns a Tensor. Broadcasting
follows NumPy; :func:`unbroadcast` sums a gradient back to an input's shape, once, for all.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from .core import Tensor, data_of, record


def _xp(*values):
    return backend.array_namespace(*[data_of(v) for v in values if hasattr(data_of(v), "shape")])


def unbroadcast(grad, shape):
    """Sum ``grad`` over the axes NumPy broadcasting added or stretched to reach it."""
    while grad.ndim > len(shape):
        grad = grad.sum(axis=0)
    for axis, size in enumerate(shape):
        if size == 1 and grad.shape[axis] != 1:
            grad = grad.sum(axis=axis, keepdims=True)
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
    return record(x @ y, (a, b), lambda g: (unbroadcast(g @ y.swapaxes(-1, -2), x.shape),
                                            unbroadcast(x.swapaxes(-1, -2) @ g, y.shape)))


# -- reductions and shapes -------------------------------------------------------------------
def sum(a, axis=None, keepdims=False):  # noqa: A001 - mirrors numpy's name
    x = data_of(a)
    xp = _xp(a)

    def vjp(g):
        if axis is not None and not keepdims:
            g = xp.expand_dims(g, axis)
        return (xp.broadcast_to(g, x.shape).copy(),)

    return record(x.sum(axis=axis, keepdims=keepdims), (a,), vjp)


def mean(a, axis=None, keepdims=False):
    x = data_of(a)
    count = x.size if axis is None else int(np.prod([x.shape[i] for i in np.atleast_1d(axis)]))
    return mul(sum(a, axis, keepdims), 1.0 / max(count, 1))


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
    shifted = x - x.max(axis=axis, keepdims=True)
    out = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
    return record(out, (a,),
                  lambda g: (g - xp.exp(out) * g.sum(axis=axis, keepdims=True),))


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
    total = sum(losses)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return mul(total, 1.0 / max(int(keep.sum()), 1))
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
    return record(losses.sum() * scale, (logits, targets),
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
    Tensor.__pow__ = power
    Tensor.__getitem__ = getitem
    Tensor.sum = sum
    Tensor.mean = mean
    Tensor.reshape = lambda self, *shape: reshape(
        self, shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape)
    Tensor.T = property(lambda self: transpose(self))


_install_operators()
