"""Batch normalisation over active sites on NumPy (SCN's BatchNormalization semantics).

Statistics are taken over rows (sites). Train mode normalises with the batch mean and the
biased variance; the caller updates running statistics (SCN's momentum convention:
``running = momentum * running + (1 - momentum) * batch``, unbiased variance). After the
affine map, values <= 0 are multiplied by ``leakiness`` (1 = no activation, 0 = ReLU).

Every kernel is a few whole-array passes: per-channel sums are single-pass ``einsum``
reductions, and the backward pass folds ``xhat`` into per-channel coefficients
(``dx = a * g + b * x + c``) instead of materialising it.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from .precision import float16_in_float32


@float16_in_float32("x", round_results=False)
def batch_norm_statistics(x):
    """Per-channel mean and biased variance over rows; (C,), (C,). Zeros for no rows.

    In the data's dtype, except for float16 data: float32 statistics (computed in
    float32; the running statistics and the normalisation use them as they are)."""
    if len(x) == 0:
        zeros = np.zeros(x.shape[1], x.dtype)
        return zeros, zeros.copy()
    mean = x.mean(axis=0)
    centred = x - mean                       # two passes: no E[x^2] - E[x]^2 cancellation
    var = np.einsum("ij,ij->j", centred, centred) / x.dtype.type(len(x))
    return mean, var.astype(x.dtype, copy=False)


def _scale_shift(mean, var, weight, bias, eps):
    """Per-channel ``(scale, shift)`` of the normalisation, in the statistics' dtype and
    array library (the CUDA backend uses this function too)."""
    xp = backend.array_namespace(var)
    scale = 1.0 / xp.sqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale.astype(mean.dtype, copy=False), shift.astype(mean.dtype, copy=False)


def _activate(y, leakiness):
    """In place: values <= 0 times ``leakiness`` (a no-op for 1)."""
    if leakiness == 1:
        return y
    if leakiness == 0:
        return np.maximum(y, 0, out=y)
    if 0 < leakiness < 1:   # max(y, leak * y) is y for y > 0 and leak * y below
        return np.maximum(y, y * y.dtype.type(leakiness), out=y)
    return np.copyto(y, np.where(y > 0, y, y * y.dtype.type(leakiness))) or y


@float16_in_float32("x", "mean", "var", "weight", "bias")
def batch_norm_forward(x, mean, var, weight, bias, eps, leakiness):
    """``y = (x - mean) / sqrt(var + eps) * weight + bias``, then the leaky activation."""
    scale, shift = _scale_shift(mean, var, weight, bias, eps)
    y = np.multiply(x, scale)
    y += shift
    return _activate(y, leakiness)


@float16_in_float32("grad_out", "x", "mean", "var", "weight", "bias", "out")
def batch_norm_backward(grad_out, x, mean, var, weight, bias, eps, leakiness, training,
                        out=None):
    """Gradients of :func:`batch_norm_forward` w.r.t. x, weight and bias.

    ``training=True``: mean and var are the batch statistics of ``x`` and depend on it;
    ``False``: they are constants (running statistics), so the map is affine. ``out``, the
    forward's output, saves recomputing where the activation was active.

    Returns
    -------
    grad_x : (N, C); grad_weight, grad_bias : (C,) or None when weight / bias is None
    """
    dtype = x.dtype
    invstd = (1.0 / np.sqrt(var + eps)).astype(dtype, copy=False)
    g = grad_out
    if leakiness != 1:
        if out is None:
            scale, shift = _scale_shift(mean, var, weight, bias, eps)
            positive = x * scale + shift > 0
        else:
            positive = out > 0 if leakiness >= 0 else None
            if positive is None:  # a negative leak flips signs: recompute
                scale, shift = _scale_shift(mean, var, weight, bias, eps)
                positive = x * scale + shift > 0
        g = np.where(positive, g, g * g.dtype.type(leakiness))
    n = len(x)
    sum_g = g.sum(axis=0)
    # sum(g * xhat) = invstd * (sum(g * x) - mean * sum(g)), one pass without temporaries
    sum_gxhat = invstd * (np.einsum("ij,ij->j", g, x) - mean * sum_g) if n else sum_g
    grad_weight = sum_gxhat.astype(dtype, copy=False) if weight is not None else None
    grad_bias = sum_g.astype(dtype, copy=False) if bias is not None else None
    k = invstd * weight if weight is not None else invstd
    if training and n:
        # dx = k * (g - mean(g) - xhat * mean(g * xhat)), xhat = (x - mean) * invstd
        m2 = sum_gxhat / dtype.type(n)
        coef_x = -k * invstd * m2
        const = k * (mean * invstd * m2 - sum_g / dtype.type(n))
        gx = np.multiply(g, k.astype(dtype, copy=False))
        gx += x * coef_x.astype(dtype, copy=False)
        gx += const.astype(dtype, copy=False)
        return gx, grad_weight, grad_bias
    return np.multiply(g, k.astype(dtype, copy=False)), grad_weight, grad_bias

