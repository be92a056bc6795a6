"""Batch normalisation over active sites on NumPy (SCN's BatchNormalization semantics).

Statistics are taken over rows (sites). Train mode normalises with the batch mean and the
biased variance; the caller updates running statistics (SCN's momentum convention:
``running = momentum * running + (1 - momentum) * batch``, unbiased variance). After the
affine map, values <= 0 are multiplied by ``leakiness`` (1 = no activation, 0 = ReLU).
"""

from __future__ import annotations

import numpy as np


def batch_norm_statistics(x):
    """Per-channel mean and biased variance over rows; (C,), (C,). Zeros for no rows."""
    if len(x) == 0:
        zeros = np.zeros(x.shape[1], x.dtype)
        return zeros, zeros.copy()
    mean = x.mean(axis=0)
    centred = x - mean
    return mean, np.mean(centred * centred, axis=0)


def _scale_shift(mean, var, weight, bias, eps):
    scale = 1.0 / np.sqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale.astype(mean.dtype, copy=False), shift.astype(mean.dtype, copy=False)


def batch_norm_forward(x, mean, var, weight, bias, eps, leakiness):
    """``y = (x - mean) / sqrt(var + eps) * weight + bias``, then the leaky activation."""
    scale, shift = _scale_shift(mean, var, weight, bias, eps)
    y = x * scale + shift
    if leakiness != 1:
        y = np.where(y > 0, y, y * y.dtype.type(leakiness))
    return y


def batch_norm_backward(grad_out, x, mean, var, weight, bias, eps, leakiness, training):
    """Gradients of :func:`batch_norm_forward` w.r.t. x, weight and bias.

    ``training=True``: mean and var are the batch statistics of ``x`` and depend on it;
    ``False``: they are constants (running statistics), so the map is affine.

    Returns
    -------
    grad_x : (N, C); grad_weight, grad_bias : (C,) or None when weight / bias is None
    """
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * invstd
    g = grad_out
    if leakiness != 1:
        scale, shift = _scale_shift(mean, var, weight, bias, eps)
        g = np.where(x * scale + shift > 0, g, g * g.dtype.type(leakiness))
    grad_weight = (g * xhat).sum(axis=0) if weight is not None else None
    grad_bias = g.sum(axis=0) if bias is not None else None
    gx = g * weight if weight is not None else g
    if training and len(x):
        gx = gx - gx.mean(axis=0) - xhat * (gx * xhat).mean(axis=0)
    return (gx * invstd).astype(x.dtype, copy=False), grad_weight, grad_bias
