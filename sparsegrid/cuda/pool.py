"""Max pooling over a rulebook on the GPU (average pooling and unpooling are ``rule_sum``)."""

from __future__ import annotations

import numpy as np

from . import _compile
from ._runtime import cp
from .conv import prepare_conv


def max_pool_forward(features, rulebook):
    """Channel-wise maximum over each output's active inputs: ``(out, argmax)``.

    The true maximum; ties go to the earliest kernel offset (offsets run in order and a
    candidate must be strictly greater), argmax int32 (-1 where every input was -inf or
    NaN), as on the CPU.
    """
    plan = prepare_conv(rulebook)
    features = cp.ascontiguousarray(features)
    channels = features.shape[1]
    out = cp.full((rulebook.n_out, channels), -np.inf, dtype=features.dtype)
    argmax = cp.full((rulebook.n_out, channels), -1, dtype=np.int32)
    offsets = sorted(plan.offsets + ([plan.identity_offset] if plan.identity_offset >= 0
                                     else []))
    name = _compile.typed("max_pool_offset", features.dtype)
    for k in offsets:
        a, b = plan.ptr[k], plan.ptr[k + 1]
        _compile.launch("pool.cu", name, (b - a) * channels, features, plan.in_idx[a:b],
                        plan.out_idx[a:b], out, argmax, np.int64(b - a),
                        np.int64(channels))
    return out, argmax


def max_pool_backward(grad_out, argmax, n_in):
    """Each output gradient to the input row in ``argmax``, per channel; several outputs
    picking one input cell are summed in output-row order in float64 and rounded once
    (the CPU's order and precision). A stable sort groups the cells: no atomics."""
    n_out, channels = grad_out.shape
    n_cells = int(n_in) * channels
    cells = argmax.astype(np.int64) * channels + cp.arange(channels, dtype=np.int64)
    cells = cp.where(argmax >= 0, cells, n_cells).reshape(-1)   # -1: to a cell past the end
    order = cp.argsort(cells).astype(np.int64, copy=False)
    ptr = cp.searchsorted(cells[order], cp.arange(n_cells + 1, dtype=np.int64)).astype(
        np.int64, copy=False)
    grad = cp.empty((int(n_in), channels), dtype=grad_out.dtype)
    _compile.launch("pool.cu", _compile.typed("ordered_cell_sum", grad_out.dtype), n_cells,
                    cp.ascontiguousarray(grad_out), order, ptr, grad, np.int64(n_cells))
    return grad
