"""Segment reductions on the GPU: input layers, voxelization, per-sample global pooling.

Rows are grouped by one stable sort of their segment ids. 'sum' / 'mean' / 'max' then run
in two passes: a thread per (chunk of 64 rows, channel) reduces its chunk in row order,
and a thread per (segment, channel) folds the chunks in order (no atomics, and long
segments such as global pooling's stay parallel). A segment of at most 64 rows is reduced
one row after another, the CPU's order: its sums are the CPU's bits; longer ones agree to
rounding. 'max'/'first'/'last' choose the same rows as the CPU always. float16 data is
summed in float32.
"""

from __future__ import annotations

import numpy as np

from . import _compile
from ._runtime import cp, read

SEGMENT_MODES = ("sum", "mean", "max", "first", "last")
_MODE_CODES = {"sum": 0, "mean": 1, "max": 2}


def _check_mode(mode):
    if mode not in SEGMENT_MODES:
        raise ValueError(f"mode must be one of {SEGMENT_MODES}; got {mode!r}")


def _ids(segment_ids, n_rows, n_segments):
    ids = cp.ascontiguousarray(segment_ids.reshape(-1).astype(np.int64, copy=False))
    if len(ids) != n_rows:
        raise ValueError(f"segment_ids must have one id per row of values ({n_rows}); got "
                         f"{len(ids)}")
    if len(ids):
        low, high = (int(v) for v in read(cp.stack([ids.min(), ids.max()])))
        if low < 0:                                        # one host read for both bounds
            raise ValueError(f"segment_ids must be >= 0; got {low}")
        if high >= n_segments:
            raise ValueError(f"segment_ids must be below n_segments={n_segments}; got {high}")
    return ids


def _groups(ids, n_segments):
    """Rows grouped by id (stable: row order within a group) and the group pointers."""
    order = cp.argsort(ids).astype(np.int64, copy=False)
    ptr = cp.searchsorted(ids[order], cp.arange(n_segments + 1, dtype=np.int64)).astype(
        np.int64, copy=False)
    return order, ptr


def segment_reduce(values, segment_ids, n_segments, mode):
    """Reduce rows of ``values`` (N, C) by segment: ``(out, chosen)`` as on the CPU
    ('max': int64 (n_segments, C) rows holding each maximum; 'first'/'last': int64
    (n_segments,) rows kept; -1 for empty segments; None for 'sum'/'mean')."""
    _check_mode(mode)
    n, channels = values.shape
    n_segments = int(n_segments)
    ids = _ids(segment_ids, n, n_segments)
    values = cp.ascontiguousarray(values)
    order, ptr = _groups(ids, n_segments)
    if mode in ("first", "last"):
        if n == 0:
            return (cp.zeros((n_segments, channels), dtype=values.dtype),
                    cp.full(n_segments, -1, dtype=np.int64))
        at = ptr[:-1] if mode == "first" else ptr[1:] - 1
        chosen = cp.where(ptr[1:] > ptr[:-1], order[cp.clip(at, 0, n - 1)], -1)
        chosen = chosen.astype(np.int64, copy=False)
        out = cp.take(values, cp.maximum(chosen, 0), axis=0)
        return cp.where((chosen >= 0)[:, None], out, values.dtype.type(0)), chosen
    return _reduce(values, order, ptr, n_segments, mode)


# Rows per chunk of the first pass (kernels/segment.cu: SG_CHUNK).
_CHUNK = 64


def _reduce(values, order, ptr, n_segments, mode):
    """'sum' / 'mean' / 'max' in two passes (see kernels/segment.cu). The chunk count is
    bounded without a host read: each segment has at most len // 64 + 1 chunks."""
    n, channels = values.shape
    acc_type = _compile.ACCUMULATOR[values.dtype]
    counts = ptr[1:] - ptr[:-1]
    chunk_ptr = cp.zeros(n_segments + 1, dtype=np.int64)
    chunk_ptr[1:] = cp.cumsum((counts + (_CHUNK - 1)) // _CHUNK)
    n_slots = n_segments + n // _CHUNK + 1
    chunk_segment = (cp.searchsorted(chunk_ptr, cp.arange(n_slots, dtype=np.int64),
                                     side="right") - 1).astype(np.int64, copy=False)
    partial = cp.empty((n_slots, channels), dtype=acc_type)
    partial_row = cp.empty((n_slots, channels), dtype=np.int64)
    code = np.int32(_MODE_CODES[mode])
    _compile.launch("segment.cu", _compile.typed("segment_chunks", values.dtype, True),
                    n_slots * channels, values, order, ptr, chunk_ptr, chunk_segment,
                    partial, partial_row, np.int64(n_slots), np.int64(n_segments),
                    np.int64(channels), code)
    out = cp.empty((n_segments, channels), dtype=values.dtype)
    chosen = cp.empty((n_segments, channels), dtype=np.int64)
    _compile.launch("segment.cu", _compile.typed("segment_finish", values.dtype, True),
                    n_segments * channels, partial, partial_row, ptr, chunk_ptr, out, chosen,
                    np.int64(n_segments), np.int64(channels), code)
    return out, (chosen if mode == "max" else None)


def segment_reduce_backward(grad_out, segment_ids, n_segments, mode, chosen, n_rows):
    """Gradient of :func:`segment_reduce` with respect to ``values`` (n_rows, C)."""
    _check_mode(mode)
    ids = segment_ids.reshape(-1).astype(np.int64, copy=False)
    if mode == "sum":
        return cp.take(grad_out, ids, axis=0)
    if mode == "mean":      # counts from a sort (CuPy's bincount reads the ids back)
        _, ptr = _groups(cp.ascontiguousarray(ids), int(n_segments))
        counts = ptr[1:] - ptr[:-1]
        scaled = grad_out / cp.maximum(counts, 1)[:, None].astype(grad_out.dtype)
        return cp.take(scaled, ids, axis=0)
    channels = grad_out.shape[1]
    grad = cp.zeros((int(n_rows), channels), dtype=grad_out.dtype)
    name = "scatter_rows" if mode in ("first", "last") else "scatter_cells"
    _compile.launch("segment.cu", _compile.typed(name, grad_out.dtype), grad_out.size,
                    cp.ascontiguousarray(grad_out),
                    cp.ascontiguousarray(chosen.astype(np.int64, copy=False)), grad,
                    np.int64(len(grad_out)), np.int64(channels))
    return grad
