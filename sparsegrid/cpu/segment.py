"""Segment reductions on NumPy: input layers, voxelization and per-sample global pooling.

Rows with equal ``segment_ids`` form a segment; ``mode`` reduces each segment to one row:
``'sum'``, ``'mean'``, ``'max'`` (channel-wise), ``'first'`` / ``'last'`` (in row order).
Empty segments give zeros. Reductions run in row order within a segment (a stable sort
groups them), so results are deterministic.
"""

from __future__ import annotations

import numpy as np

SEGMENT_MODES = ("sum", "mean", "max", "first", "last")


def _group(segment_ids, n_segments):
    """Stable grouping: (order or None, starts, nonempty segment ids, counts per segment)."""
    ids = np.asarray(segment_ids, np.int64)
    counts = np.bincount(ids, minlength=n_segments) if len(ids) else np.zeros(n_segments, np.int64)
    order = None
    if len(ids) > 1 and not bool(np.all(ids[1:] >= ids[:-1])):
        order = np.argsort(ids, kind="stable")
    nonempty = np.flatnonzero(counts)
    ends = np.cumsum(counts)
    starts = (ends - counts)[nonempty]
    return order, starts, nonempty, counts


def segment_reduce(values, segment_ids, n_segments, mode):
    """Reduce rows of ``values`` (N, C) by segment.

    Returns
    -------
    out : (n_segments, C)
    chosen : int64 rows, or None
        ``'max'``: (n_segments, C), the first row in row order holding each maximum (-1 for
        empty segments); ``'first'`` / ``'last'``: (n_segments,), the row kept (-1 if empty).
    """
    if mode not in SEGMENT_MODES:
        raise ValueError(f"mode must be one of {SEGMENT_MODES}; got {mode!r}")
    order, starts, nonempty, counts = _group(segment_ids, n_segments)
    out = np.zeros((n_segments, values.shape[1]), values.dtype)
    chosen = None
    if len(nonempty) == 0:
        if mode == "max":
            chosen = np.full((n_segments, values.shape[1]), -1, np.int64)
        elif mode in ("first", "last"):
            chosen = np.full(n_segments, -1, np.int64)
        return out, chosen
    rows = np.arange(len(values)) if order is None else order
    if mode in ("first", "last"):
        pick = starts if mode == "first" else starts + counts[nonempty] - 1
        chosen = np.full(n_segments, -1, np.int64)
        chosen[nonempty] = rows[pick]
        out[nonempty] = values[chosen[nonempty]]
        return out, chosen
    grouped = values if order is None else values[order]
    if mode == "max":
        best = np.maximum.reduceat(grouped, starts, axis=0)
        out[nonempty] = best
        segment_of_row = np.repeat(np.arange(len(nonempty)), counts[nonempty])
        position = np.where(grouped == best[segment_of_row], np.arange(len(values))[:, None],
                            len(values))
        chosen = np.full((n_segments, values.shape[1]), -1, np.int64)
        chosen[nonempty] = rows[np.minimum.reduceat(position, starts, axis=0)]
        return out, chosen
    total = np.add.reduceat(grouped, starts, axis=0)
    if mode == "mean":
        total /= counts[nonempty, None].astype(values.dtype)
    out[nonempty] = total
    return out, chosen


def segment_reduce_backward(grad_out, segment_ids, n_segments, mode, chosen, n_rows):
    """Gradient of :func:`segment_reduce` with respect to ``values`` (n_rows, C)."""
    ids = np.asarray(segment_ids, np.int64)
    if mode == "sum":
        return grad_out[ids]
    if mode == "mean":
        counts = np.bincount(ids, minlength=n_segments).astype(grad_out.dtype)
        return grad_out[ids] / counts[ids, None]
    grad = np.zeros((n_rows, grad_out.shape[1]), grad_out.dtype)
    if mode in ("first", "last"):
        keep = chosen >= 0
        grad[chosen[keep]] = grad_out[keep]
        return grad
    if mode == "max":
        seg, channel = np.nonzero(chosen >= 0)
        grad[chosen[seg, channel], channel] = grad_out[seg, channel]
        return grad
    raise ValueError(f"mode must be one of {SEGMENT_MODES}; got {mode!r}")
