"""Batch normalisation over active sites on the GPU (SCN's semantics, as the CPU).

Per-channel statistics and gradient sums are CuPy reductions (fixed reduction trees, no
atomics: the same bits run after run) accumulated in float64 for every data type, rounded
once to the data's dtype; the elementwise passes run in the data's dtype. float16 data
(mixed precision) is computed in float32 and rounded once, as on the CPU: its statistics
are float32, and the forward and backward passes convert it to float32 first.
"""

from __future__ import annotations

import numpy as np

from ..cpu.norm import _scale_shift  # array-library neutral
from ..cpu.precision import float16_in_float32  # array-library neutral too
from ._runtime import cp


def _column_sum(x):
    return x.sum(axis=0, dtype=np.float64)


@float16_in_float32("x", round_results=False)
def batch_norm_statistics(x):
    """Per-channel mean and biased variance over rows; (C,), (C,). Zeros for no rows.
    float16 data: float32 statistics."""
    if len(x) == 0:
        zeros = cp.zeros(x.shape[1], dtype=x.dtype)
        return zeros, zeros.copy()
    mean = _column_sum(x) / len(x)
    centred = x.astype(np.float64) - mean
    var = _column_sum(centred * centred) / len(x)
    return mean.astype(x.dtype), var.astype(x.dtype)


def _activate(y, leakiness):
    if leakiness == 1:
        return y
    if leakiness == 0:
        return cp.maximum(y, 0)
    return cp.where(y > 0, y, y * y.dtype.type(leakiness))


@float16_in_float32("x", "mean", "var", "weight", "bias")
def batch_norm_forward(x, mean, var, weight, bias, eps, leakiness):
    """``y = (x - mean) / sqrt(var + eps) * weight + bias``, then the leaky activation."""
    scale, shift = _scale_shift(mean, var, weight, bias, eps)
    return _activate(x * scale + shift, leakiness)


@float16_in_float32("grad_out", "x", "mean", "var", "weight", "bias", "out")
def batch_norm_backward(grad_out, x, mean, var, weight, bias, eps, leakiness, training,
                        out=None):
    """Gradients of :func:`batch_norm_forward` w.r.t. x, weight and bias (see the CPU
    backend for the formulas; ``out``, the forward's output, saves a recomputation)."""
    dtype = x.dtype
    invstd = (1.0 / cp.sqrt(var.astype(np.float64) + eps))
    g = grad_out
    if leakiness != 1:
        if out is not None and leakiness >= 0:
            positive = out > 0
        else:
            scale, shift = _scale_shift(mean, var, weight, bias, eps)
            positive = x * scale + shift > 0
        g = cp.where(positive, g, g * g.dtype.type(leakiness))
    n = len(x)
    sum_g = _column_sum(g)
    mean64 = mean.astype(np.float64)
    sum_gxhat = invstd * (_column_sum(g * x) - mean64 * sum_g) if n else sum_g
    grad_weight = sum_gxhat.astype(dtype) if weight is not None else None
    grad_bias = sum_g.astype(dtype) if bias is not None else None
    k = invstd * weight.astype(np.float64) if weight is not None else invstd
    if training and n:
        m2 = sum_gxhat / n
        coef_x = (-k * invstd * m2).astype(dtype)
        const = (k * (mean64 * invstd * m2 - sum_g / n)).astype(dtype)
        return g * k.astype(dtype) + x * coef_x + const, grad_weight, grad_bias
    return g * k.astype(dtype), grad_weight, grad_bias
