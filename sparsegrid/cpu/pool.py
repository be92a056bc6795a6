"""Max pooling over a rulebook on NumPy (average pooling and unpooling are ``rule_sum``)."""

from __future__ import annotations

import numpy as np


def max_pool_forward(features, rulebook):
    """Channel-wise maximum over each output's active inputs.

    Returns
    -------
    out : (n_out, C)
        The true maximum (not clamped at 0 as SCN does). Every output of a strided rulebook
        has at least one input.
    argmax : int32 (n_out, C)
        The input row that supplied each maximum. Ties go to the earliest kernel offset
        (strict comparison), so the choice is deterministic.
    """
    in_idx, out_idx, offset_ptr = rulebook.in_idx, rulebook.out_idx, rulebook.offset_ptr
    n_out, channels = rulebook.n_out, features.shape[1]
    out = np.full((n_out, channels), -np.inf, features.dtype)
    argmax = np.full((n_out, channels), -1, np.int32)
    ptr = np.asarray(offset_ptr, np.int64)
    for k in np.flatnonzero(ptr[1:] > ptr[:-1]).tolist():   # offsets with pairs only
        start, stop = ptr[k], ptr[k + 1]
        rows_in, rows_out = in_idx[start:stop], out_idx[start:stop]
        candidate = features.take(rows_in, axis=0)
        current = out.take(rows_out, axis=0)
        better = candidate > current
        out[rows_out] = np.where(better, candidate, current)
        argmax[rows_out] = np.where(better, rows_in[:, None], argmax.take(rows_out, axis=0))
    return out, argmax


def max_pool_backward(grad_out, argmax, n_in):
    """Send each output gradient to the input row recorded in ``argmax``, channel by channel.

    Several outputs may pick one input (overlapping windows): their gradients are summed
    by one ``bincount`` over (row, channel) cells, in row order (deterministic; float64
    accumulation, rounded once to the gradient's dtype). A cell with no arg-max (-1: every input was
    -inf or NaN) sends no gradient.
    """
    n_out, channels = grad_out.shape
    cells = argmax.astype(np.int64) * channels + np.arange(channels)
    weights = grad_out.reshape(-1)
    if argmax.size and argmax.min() < 0:   # outputs whose inputs were all -inf or NaN
        keep = argmax.reshape(-1) >= 0
        cells, weights = cells.reshape(-1)[keep], weights[keep]
    total = np.bincount(cells.reshape(-1), weights=weights, minlength=n_in * channels)
    return total.reshape(n_in, channels).astype(grad_out.dtype, copy=False)
