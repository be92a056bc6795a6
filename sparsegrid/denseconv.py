"""Dense N-D convolution (cross-correlation), differentiable, on NumPy and CuPy arrays.

:func:`conv` is PyTorch's ``conv1d`` / ``conv2d`` / ``conv3d`` (any number of spatial dims)
on plain arrays or :class:`sparsegrid.autodiff.Tensor`\\ s: the same weight layout
``(Cout, Cin/groups, k1, ..., kD)``, the same output sizes, zero padding (``'same'`` and
``'valid'`` included), stride, dilation and groups, and gradients with respect to the
input, the weight and the bias. It is the dense baseline of SBNet's block-sparse
convolution and the building block of DCLS.

How it computes. Internally everything is channels last: the input is copied once into a
zero-padded ``(N, E1, ..., ED, Cin)`` buffer (padded only as far as some output reads; a
channels-first input is transposed in the same copy), and each kernel tap contributes one
GEMM ``patch (M, Cin/G) @ W_tap (Cin/G, Cout/G)`` accumulated into the output, taps in
row-major order (last kernel axis fastest), so the result is deterministic. Two ways to
get a tap's patch, both without an im2col of K times the input:

- ``shift`` (every stride 1): on the flattened padded buffer, output position ``q`` reads
  input row ``q + offset(tap)``, so a tap's patch is the *contiguous* slice
  ``flat[offset : offset + M]`` -- no copy at all. The output is computed on the padded
  grid (``M`` rows; the rows outside the true output, ``(k - 1) * d`` per axis, are
  computed and dropped), so this path is taken only when those extra rows are at most as
  many as the true ones.
- ``gather`` (strides, or small grids where the extra rows would dominate): the tap's
  strided view of the padded buffer is copied into one reused contiguous buffer.

Backward runs the same taps: ``grad_W[tap] = patch.T @ grad_out`` and
``grad_out @ W_tap.T`` added into the tap's rows of a padded gradient buffer -- for one tap
those rows are distinct, so a plain ``+=`` on a slice or view is exact (no scatter-add).
The ``shift`` path does a whole row of taps (the last kernel axis, k of them) in one GEMM
each way, on ``k`` shifted copies of the output gradient side by side (k times the
gradient, not the input); the rows of the padded grid outside the output carry a zero
gradient there, so they add nothing (for finite inputs and weights).

Groups: one GEMM when ``groups == 1``; a broadcast multiply when every group has one
input channel (depthwise convolutions, with any channel multiplier); else one GEMM per
group. Written with the arrays' namespace (``xp``): the same code runs on CuPy (cuBLAS).
"""

from __future__ import annotations

import itertools
import math
import numbers

import numpy as np

from . import backend
from .autodiff.core import Tensor, data_of, record

__all__ = ["conv", "conv_output_size"]

_CHANNELS_FIRST = ("channels_first", "NCL", "NCW", "NCHW", "NCDHW")
_CHANNELS_LAST = ("channels_last", "NLC", "NWC", "NHWC", "NDHWC")
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def conv(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, layout="NCHW"):
    """Dense convolution (cross-correlation) of ``x`` with ``weight``, PyTorch's semantics.

    Parameters
    ----------
    x : array or Tensor
        ``(N, Cin, S1, ..., SD)`` for a channels-first ``layout`` (``'NCHW'``, the default,
        or ``'channels_first'``, ``'NCL'``, ``'NCW'``, ``'NCDHW'``: any of these names means
        "channels second" whatever D is), ``(N, S1, ..., SD, Cin)`` for channels last
        (``'NHWC'``, ``'channels_last'``, ``'NLC'``, ``'NWC'``, ``'NDHWC'``). float32 or
        float64, NumPy or CuPy.
    weight : array or Tensor
        ``(Cout, Cin / groups, k1, ..., kD)`` (PyTorch's layout whatever ``layout`` is);
        D = ``weight.ndim - 2`` >= 1. Same dtype and device as ``x``.
    bias : array or Tensor, optional
        ``(Cout,)``, same dtype and device.
    stride, dilation : int or D ints, each >= 1.
    padding : int or D ints (>= 0, zeros on both sides), or ``'valid'`` (no padding) or
        ``'same'`` (stride 1 only; output size = input size; total padding
        ``dilation * (k - 1)`` per axis, the odd one on the right, as PyTorch pads).
    groups : int >= 1 dividing Cout; ``Cin == weight.shape[1] * groups``.
    layout : str
        The layout of ``x`` and of the result.

    Returns
    -------
    ``(N, Cout, O1, ..., OD)`` (or channels last) with
    ``O = floor((S + 2 p - d (k - 1) - 1) / s) + 1`` (:func:`conv_output_size`), a new
    C-contiguous array of ``x``'s dtype: a Tensor when any input is a Tensor (recording
    the gradients of those that require one), a plain array otherwise.

    Raises
    ------
    TypeError / ValueError naming the argument: dimensions that do not match, channels
    that do not match ``groups``, bad stride / padding / dilation / groups / layout, a
    (dilated) kernel larger than the padded input, dtypes other than one of float32 /
    float64 shared by all arrays, arrays of two libraries or devices.
    """
    return _conv(x, weight, bias, stride, padding, dilation, groups, layout, method=None)


def conv_output_size(size, kernel_size, stride=1, padding=0, dilation=1):
    """PyTorch's convolution output size along one axis (``padding`` on both sides)."""
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


# -- argument checks -------------------------------------------------------------------------
def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _per_axis(value, d, name, minimum):
    """``value`` (int or D ints) as a tuple of D Python ints >= ``minimum``."""
    if _is_int(value):
        values = (int(value),) * d
    elif isinstance(value, (tuple, list)) and all(_is_int(v) for v in value):
        if len(value) != d:
            raise ValueError(f"conv: {name} must be an int or {d} ints (one per spatial "
                             f"axis of a {d}-D weight); got {len(value)}: {tuple(value)!r}")
        values = tuple(int(v) for v in value)
    else:
        raise TypeError(f"conv: {name} must be an int or a tuple of {d} ints; got "
                        f"{type(value).__name__} {value!r}")
    if any(v < minimum for v in values):
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"conv: {name} must be {kind}; got {values!r}")
    return values


def _array(value, name, optional=False):
    data = data_of(value)
    if data is None and optional:
        return None
    if not (hasattr(data, "shape") and hasattr(data, "dtype") and hasattr(data, "ndim")):
        raise TypeError(f"conv: {name} must be a NumPy/CuPy array or an autodiff Tensor; got "
                        f"{type(value).__name__}")
    return data


def _layout(layout):
    if isinstance(layout, str):
        if layout in _CHANNELS_FIRST:
            return False
        if layout in _CHANNELS_LAST:
            return True
    raise ValueError(f"conv: layout must be one of {_CHANNELS_FIRST + _CHANNELS_LAST} "
                     f"(channels first or channels last); got {layout!r}")


class _Plan:
    """Every size and offset of one convolution, from the shapes and arguments alone."""

    def __init__(self, x, weight, bias, stride, padding, dilation, groups, layout, method):
        self.channels_last = _layout(layout)
        if weight.ndim < 3:
            raise ValueError(f"conv: weight must be (Cout, Cin/groups, k1, ..., kD) with D >= "
                             f"1 spatial axes; got shape {tuple(weight.shape)}")
        d = self.d = weight.ndim - 2
        if x.ndim != d + 2:
            form = "(N, S1, ..., SD, C)" if self.channels_last else "(N, C, S1, ..., SD)"
            raise ValueError(f"conv: x must have {d + 2} dimensions {form} for a {d}-D weight "
                             f"of shape {tuple(weight.shape)}; got shape {tuple(x.shape)}")
        for name, array in (("x", x), ("weight", weight), ("bias", bias)):
            if array is not None and array.dtype not in _DTYPES:
                raise TypeError(f"conv: {name} must be float32 or float64; got {array.dtype}")
        if weight.dtype != x.dtype:
            raise TypeError(f"conv: weight's dtype {weight.dtype} differs from x's {x.dtype}; "
                            f"convert one (astype)")
        if bias is not None and bias.dtype != x.dtype:
            raise TypeError(f"conv: bias's dtype {bias.dtype} differs from x's {x.dtype}")
        if not _is_int(groups):
            raise TypeError(f"conv: groups must be an int; got {type(groups).__name__} "
                            f"{groups!r}")
        if groups < 1:
            raise ValueError(f"conv: groups must be positive; got {groups}")
        g = self.groups = int(groups)
        shape = tuple(int(n) for n in x.shape)
        self.n = shape[0]
        self.cin = shape[-1] if self.channels_last else shape[1]
        self.size = shape[1:-1] if self.channels_last else shape[2:]
        if self.cin == 0 or 0 in self.size:
            raise ValueError(f"conv: x must have non-zero channel and spatial sizes; got "
                             f"shape {shape}")
        self.cout, self.cin_g = int(weight.shape[0]), int(weight.shape[1])
        self.kernel = tuple(int(k) for k in weight.shape[2:])
        if 0 in weight.shape:
            raise ValueError(f"conv: weight must have non-zero sizes; got shape "
                             f"{tuple(weight.shape)}")
        if self.cout % g:
            raise ValueError(f"conv: weight's {self.cout} output channels are not divisible "
                             f"by groups={g}")
        if self.cin != self.cin_g * g:
            raise ValueError(f"conv: x has {self.cin} channels but weight of shape "
                             f"{tuple(weight.shape)} with groups={g} expects "
                             f"{self.cin_g} * {g} = {self.cin_g * g}")
        self.cout_g = self.cout // g
        if bias is not None and tuple(bias.shape) != (self.cout,):
            raise ValueError(f"conv: bias must have shape ({self.cout},) (Cout); got "
                             f"{tuple(bias.shape)}")
        self.stride = _per_axis(stride, d, "stride", 1)
        self.dilation = _per_axis(dilation, d, "dilation", 1)
        span = tuple(dl * (k - 1) for dl, k in zip(self.dilation, self.kernel))
        if isinstance(padding, str):
            if padding == "valid":
                pads = ((0, 0),) * d
            elif padding == "same":
                if any(s != 1 for s in self.stride):
                    raise ValueError(f"conv: padding='same' needs stride 1 (PyTorch's rule); "
                                     f"got stride {self.stride}")
                pads = tuple((t // 2, t - t // 2) for t in span)
            else:
                raise ValueError(f"conv: padding must be an int, {d} ints, 'same' or "
                                 f"'valid'; got {padding!r}")
        else:
            pads = tuple((p, p) for p in _per_axis(padding, d, "padding", 0))
        self.pads = pads
        padded = tuple(s + lo + hi for s, (lo, hi) in zip(self.size, pads))
        if any(p < t + 1 for p, t in zip(padded, span)):
            raise ValueError(f"conv: the kernel {self.kernel} with dilation {self.dilation} "
                             f"spans {tuple(t + 1 for t in span)}, larger than the padded "
                             f"input {padded} (input {self.size}, padding "
                             f"{tuple(pads)})")
        self.out = tuple((p - t - 1) // s + 1 for p, t, s in zip(padded, span, self.stride))
        # The padded buffer: just as far as the last output reads.
        self.extent = tuple((o - 1) * s + t + 1 for o, s, t in zip(self.out, self.stride,
                                                                    span))
        self.used = tuple(max(0, min(s, e - lo)) for s, e, (lo, _) in zip(self.size,
                                                                          self.extent, pads))
        self.copy_free = all(lo == 0 and u == s == e for (lo, _), u, s, e in zip(
            pads, self.used, self.size, self.extent))
        self.taps = list(itertools.product(*[range(k) for k in self.kernel]))
        self.rows = self.n * math.prod(self.out)
        # Shift path: output row q of the padded grid reads input row q + offset(tap).
        pitch = [1] * d
        for a in range(d - 2, -1, -1):
            pitch[a] = pitch[a + 1] * self.extent[a + 1]
        self.pitch = tuple(pitch)
        self.volume = math.prod(self.extent)
        self.shift_rows = ((self.n - 1) * self.volume
                           + sum((o - 1) * p for o, p in zip(self.out, pitch)) + 1)
        self.offsets = [sum(t * dl * p for t, dl, p in zip(tap, self.dilation, pitch))
                        for tap in self.taps]
        shift_ok = all(s == 1 for s in self.stride) and self.rows > 0
        if method is None:
            method = "shift" if shift_ok and self.shift_rows <= 2 * self.rows else "gather"
        elif method not in ("shift", "gather") or (method == "shift" and not shift_ok):
            raise ValueError(f"conv: no method {method!r} for this convolution")
        self.method = method

    # -- slices ----------------------------------------------------------------------------
    def tap_view(self, tap):
        """The slice of the padded buffer a tap reads, output positions in order."""
        return (slice(None),) + tuple(
            slice(t * dl, t * dl + s * (o - 1) + 1, s)
            for t, dl, s, o in zip(tap, self.dilation, self.stride, self.out)) + (slice(None),)

    def input_region(self):
        """Where the (used part of the) input sits in the padded buffer."""
        return (slice(None),) + tuple(slice(lo, lo + u) for (lo, _), u in zip(
            self.pads, self.used)) + (slice(None),)

    def used_region(self):
        """The part of the input some output reads (channels last)."""
        return (slice(None),) + tuple(slice(0, u) for u in self.used) + (slice(None),)

    def out_region(self):
        """The true output inside the padded grid of the shift path."""
        return (slice(None),) + tuple(slice(0, o) for o in self.out) + (slice(None),)


def _to_channels_last(array, channels_last, xp):
    return array if channels_last else xp.moveaxis(array, 1, -1)


def _emit(source_cl, channels_last, xp, bias=None):
    """A new C-contiguous array in the caller's layout from a channels-last (view) array,
    plus ``bias`` on the channel axis, in one pass."""
    source = source_cl if channels_last else xp.moveaxis(source_cl, -1, 1)
    result = xp.empty(source.shape, source.dtype)
    if bias is None:
        result[...] = source
    else:
        shape = (-1,) if channels_last else (-1,) + (1,) * (source.ndim - 2)
        xp.add(source, bias.reshape(shape), out=result)
    return result


# -- the GEMMs -------------------------------------------------------------------------------
def _product(out, a, w, accumulate, tmp, xp):
    """``out (M, G*B) (+)= a (M, G*A) @ blockdiag(w (G, A, B))``; ``out`` and ``a`` are
    C-contiguous; ``tmp`` is a scratch array of ``out``'s shape (used to accumulate)."""
    groups, width, b = w.shape
    m = out.shape[0]
    if groups == 1:
        if accumulate:
            xp.matmul(a, w[0], out=tmp)
            out += tmp
        else:
            xp.matmul(a, w[0], out=out)
    elif width == 1:      # depthwise: each output channel reads one input channel
        a3 = a.reshape(m, groups, 1)
        w2 = w[:, 0, :]
        out3 = out.reshape(m, groups, -1)
        if accumulate:
            tmp3 = tmp.reshape(m, groups, -1)
            xp.multiply(a3, w2, out=tmp3)
            out3 += tmp3
        else:
            xp.multiply(a3, w2, out=out3)
    elif b == 1:          # one output channel per group: a weighted sum of its inputs
        part = (a.reshape(m, groups, width) * w[:, :, 0]).sum(axis=2)
        if accumulate:
            out += part
        else:
            out[...] = part
    else:
        for g in range(groups):
            part = a[:, g * width:(g + 1) * width] @ w[g]
            if accumulate:
                out[:, g * b:(g + 1) * b] += part
            else:
                out[:, g * b:(g + 1) * b] = part


def _product_tn(a, grad, groups, xp):
    """``(G, A, B)``: each group's ``a[:, group].T @ grad[:, group]`` (a weight gradient)."""
    m = a.shape[0]
    width = a.shape[1] // groups
    if groups == 1:
        return (a.T @ grad)[None]
    b = grad.shape[1] // groups
    if width == 1 or b == 1:
        return (a.reshape(m, groups, width, 1) * grad.reshape(m, groups, 1, b)).sum(axis=0)
    return xp.stack([a[:, g * width:(g + 1) * width].T @ grad[:, g * b:(g + 1) * b]
                     for g in range(groups)])


# -- forward and backward --------------------------------------------------------------------
def _padded_input(x, plan, xp):
    """The zero-padded channels-last copy of ``x`` (``x`` itself when it already is one)."""
    x_cl = _to_channels_last(x, plan.channels_last, xp)
    if plan.copy_free:
        return xp.ascontiguousarray(x_cl)
    buffer = xp.zeros((plan.n,) + plan.extent + (plan.cin,), x.dtype)
    buffer[plan.input_region()] = x_cl[plan.used_region()]
    return buffer


def _forward(padded, w_taps, plan, xp):
    """The channels-last output (a view of the accumulation buffer), without bias."""
    dtype = padded.dtype
    if plan.method == "shift":
        flat = padded.reshape(-1, plan.cin)
        m = plan.shift_rows
        out = xp.empty((plan.n * plan.volume, plan.cout), dtype)
        rows = out[:m]
        tmp = xp.empty((m, plan.cout), dtype) if len(plan.taps) > 1 else None
        for k, offset in enumerate(plan.offsets):
            _product(rows, flat[offset:offset + m], w_taps[k], k > 0, tmp, xp)
        return out.reshape((plan.n,) + plan.extent + (plan.cout,))[plan.out_region()]
    m = plan.rows
    out = xp.empty((m, plan.cout), dtype)
    tmp = xp.empty((m, plan.cout), dtype) if len(plan.taps) > 1 else None
    patch = xp.empty((plan.n,) + plan.out + (plan.cin,), dtype)
    for k, tap in enumerate(plan.taps):
        patch[...] = padded[plan.tap_view(tap)]
        _product(out, patch.reshape(m, plan.cin), w_taps[k], k > 0, tmp, xp)
    return out.reshape((plan.n,) + plan.out + (plan.cout,))


def _backward(g, padded, w_taps, plan, need_x, need_w, xp):
    """``(grad_padded_input or None, grad_w_taps (K, G, Cin/G, Cout/G) or None)``."""
    dtype = g.dtype
    g_cl = _to_channels_last(g, plan.channels_last, xp)
    grad_w = (xp.empty((len(plan.taps), plan.groups, plan.cin_g, plan.cout_g), dtype)
              if need_w else None)
    grad_padded = xp.zeros((plan.n,) + plan.extent + (plan.cin,), dtype) if need_x else None
    if plan.method == "shift":
        # One GEMM per row of taps (all but the last kernel axis fixed): ``cat`` holds, for
        # every row r of the padded grid, the output gradient at r, r - d, ..., r - (k-1) d
        # along the last axis (zero outside the output), grouped as (G, k, Cout/G), so a
        # row of taps is ``flat[base : base + R].T @ cat`` for the weight and
        # ``cat @ W_row.T`` added into ``grad_flat[base : base + R]`` for the input.
        kd, dd, groups = plan.kernel[-1], plan.dilation[-1], plan.groups
        reach = (kd - 1) * dd
        nv = plan.n * plan.volume
        r = plan.shift_rows + reach
        cat = xp.zeros((nv + reach, groups * kd * plan.cout_g), dtype)
        g_grouped = g_cl.reshape(g_cl.shape[:-1] + (groups, plan.cout_g))
        for j in range(kd):
            block = cat[j * dd:j * dd + nv].reshape(
                (plan.n,) + plan.extent + (groups, kd, plan.cout_g))
            block[plan.out_region()[:-1] + (slice(None), j, slice(None))] = g_grouped
        cat = cat[:r]
        flat = padded.reshape(-1, plan.cin) if need_w else None
        grad_flat = grad_padded.reshape(-1, plan.cin) if need_x else None
        tmp = xp.empty((r, plan.cin), dtype) if need_x else None
        n_rows = len(plan.taps) // kd
        if need_x:   # (rows, G, k * Cout/G, Cin/G): a row of taps' W.T, stacked
            w_rows = xp.ascontiguousarray(
                w_taps.reshape(n_rows, kd, groups, plan.cin_g, plan.cout_g)
                .transpose(0, 2, 1, 4, 3)).reshape(n_rows, groups, kd * plan.cout_g,
                                                    plan.cin_g)
        for row in range(n_rows):
            base = plan.offsets[row * kd]
            if need_w:
                part = _product_tn(flat[base:base + r], cat, groups, xp)
                grad_w[row * kd:(row + 1) * kd] = part.reshape(
                    groups, plan.cin_g, kd, plan.cout_g).transpose(2, 0, 1, 3)
            if need_x:
                _product(grad_flat[base:base + r], cat, w_rows[row], True, tmp, xp)
        return grad_padded, grad_w
    m = plan.rows
    rows = xp.ascontiguousarray(g_cl).reshape(m, plan.cout)
    patch = xp.empty((plan.n,) + plan.out + (plan.cin,), dtype)
    flat_patch = patch.reshape(m, plan.cin)
    for k, tap in enumerate(plan.taps):
        view = plan.tap_view(tap)
        if need_w:
            patch[...] = padded[view]
            grad_w[k] = _product_tn(flat_patch, rows, plan.groups, xp)
        if need_x:
            _product(flat_patch, rows, w_taps[k].transpose(0, 2, 1), False, None, xp)
            grad_padded[view] += patch
    return grad_padded, grad_w


def _weight_taps(weight, plan, xp):
    """``(Cout, Cin/G, k...)`` -> ``(K, G, Cin/G, Cout/G)``, C-contiguous."""
    k = len(plan.taps)
    return xp.ascontiguousarray(
        weight.reshape(plan.groups, plan.cout_g, plan.cin_g, k).transpose(3, 0, 2, 1))


def _conv(x, weight, bias, stride, padding, dilation, groups, layout, method):
    xd = _array(x, "x")
    wd = _array(weight, "weight")
    bd = _array(bias, "bias", optional=True)
    xp = backend.array_namespace(xd, wd, bd)
    backend.require_same_device("weight", wd, "x", xd)
    if bd is not None:
        backend.require_same_device("bias", bd, "x", xd)
    plan = _Plan(xd, wd, bd, stride, padding, dilation, groups, layout, method)
    return _run(x, weight, bias, xd, bd, plan, _weight_taps(wd, plan, xp), wd.shape, xp)


def _run(x, weight, bias, xd, bd, plan, w_taps, weight_shape, xp, backward_plan=None):
    """The convolution of a prepared plan with its weight taps ``w_taps``, differentiable
    in ``x``, ``weight`` (whose gradient is reshaped to ``weight_shape``) and ``bias``;
    ``backward_plan`` (default: the plan) runs the backward GEMMs (DCLS's construct-free
    path uses it with a subset of the taps)."""
    back = plan if backward_plan is None else backward_plan
    padded = _padded_input(xd, plan, xp)
    out = _forward(padded, w_taps, plan, xp)
    if plan.channels_last and plan.method == "gather":    # already a new contiguous array
        if bd is not None:
            out += bd
    else:
        out = _emit(out, plan.channels_last, xp, bd)
    inputs = (x, weight) if bias is None else (x, weight, bias)
    if not any(isinstance(v, Tensor) for v in inputs):
        return out
    need_x, need_w, need_b = (isinstance(v, Tensor) and v.requires_grad
                              for v in (x, weight, bias))
    saved_input = padded if need_w else None
    saved_weight = w_taps if need_x else None
    del padded, w_taps

    def vjp(g):
        g = g.astype(xd.dtype, copy=False)
        grad_padded = grad_w_taps = None
        if need_x or need_w:
            grad_padded, grad_w_taps = _backward(g, saved_input, saved_weight, back, need_x,
                                                 need_w, xp)
        grads = [None, None]
        if need_x:
            grad_x = xp.zeros(xd.shape, xd.dtype)
            target = _to_channels_last(grad_x, plan.channels_last, xp)
            target[plan.used_region()] = grad_padded[plan.input_region()]
            grads[0] = grad_x
        if need_w:
            grads[1] = xp.ascontiguousarray(
                grad_w_taps.transpose(1, 3, 2, 0)).reshape(weight_shape)
        if bias is not None:
            axes = tuple(a for a in range(g.ndim) if a != (g.ndim - 1 if plan.channels_last
                                                           else 1))
            grads.append(g.sum(axis=axes) if need_b else None)
        return tuple(grads)

    return record(out, inputs, vjp)
