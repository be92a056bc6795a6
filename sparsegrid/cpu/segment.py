"""Segment reductions on NumPy: input layers, voxelization and per-sample global pooling.

Rows with equal ``segment_ids`` form a segment; ``mode`` reduces each segment to one row:
``'sum'``, ``'mean'``, ``'max'`` (channel-wise), ``'first'`` / ``'last'`` (in row order).
Empty segments give zeros. Every mode is a few compiled passes over all rows (no Python
loop over rows or segments, no ``ufunc.at``, no ``reduceat`` over mostly one-row
segments), and each segment reduces its rows in row order, so results are deterministic:

* when no segment holds two rows (an input layer without duplicates), no reduction: one
  gather by the inverse permutation, or a copy when the ids are ``0..N-1`` in order;
* otherwise the rows are grouped by a stable counting sort (:func:`.index.group_rows`);
* ``'sum'`` / ``'mean'``: one SciPy CSR product (a row of ones per segment over its rows,
  in row order) accumulating in the values' dtype, the same additions in the same order as
  ``np.add.reduceat`` (float64 with at most 4 channels: ``np.bincount`` per channel, the
  same sums). ``'mean'`` divides that sum by the count, in the values' dtype;
* ``'max'``: pass ``j`` compares the ``j``-th row of every segment that has one with the
  best so far (strict ``>``, so the earliest row wins ties), for ``j`` below
  ``_MAX_PASSES``; the rest of a longer segment is one ``reduceat`` over those long tails
  only. A NaN counts as the maximum (it propagates, as in ``np.maximum``) and the first
  NaN row is the one recorded;
* ``'first'`` / ``'last'``: gathers at the group boundaries.

Row gathers use ``ndarray.take``, several times faster than ``[]`` indexing with NumPy 2.
"""

from __future__ import annotations

import numpy as np

from .index import group_rows
from .precision import float16_in_float32

SEGMENT_MODES = ("sum", "mean", "max", "first", "last")

# 'max' compares the j-th row of each segment for j < _MAX_PASSES, one vectorized pass
# per j; longer segments finish with one reduceat over their remaining rows. At most 255
# (the winning pass is kept in a uint8).
_MAX_PASSES = 16


def _check_mode(mode):
    if mode not in SEGMENT_MODES:
        raise ValueError(f"mode must be one of {SEGMENT_MODES}; got {mode!r}")


def _no_chosen(mode, n_segments, channels):
    if mode == "max":
        return np.full((n_segments, channels), -1, np.int64)
    if mode in ("first", "last"):
        return np.full(n_segments, -1, np.int64)
    return None


def _distinct(values, ids, n_segments, mode):
    """Every segment has at most one row: out[ids] = values, no reduction."""
    n, channels = values.shape
    if n == n_segments and bool(np.all(ids[1:] > ids[:-1])):   # the identity 0..N-1
        out = np.array(values, order="C", copy=True)
        picked = np.arange(n)
    elif n == n_segments:                                      # a permutation
        picked = np.empty(n, np.int64)
        picked[ids] = np.arange(n)
        out = values.take(picked, axis=0)    # take: several times faster than [] here
    else:
        out = np.zeros((n_segments, channels), values.dtype)
        out[ids] = values
        picked = np.full(n_segments, -1, np.int64)
        picked[ids] = np.arange(n)
    if mode in ("first", "last"):
        return out, picked
    if mode == "max":
        return out, np.repeat(picked[:, None], channels, axis=1)
    return out, None


def _sum(values, ids, n_segments, counts):
    """Per-segment sums in the values' dtype, each segment in row order."""
    n, channels = values.shape
    if values.dtype == np.float64 and channels <= 4:
        # bincount adds in float64, in row order: the same sums as the CSR product.
        out = np.empty((n_segments, channels), np.float64)
        for c in range(channels):
            out[:, c] = np.bincount(ids, weights=values[:, c], minlength=n_segments)
        return out
    from scipy.sparse import csr_matrix
    order, indptr = group_rows(ids, n_segments, counts)
    columns = np.arange(n) if order is None else order
    matrix = csr_matrix((np.ones(n, values.dtype), columns, indptr), shape=(n_segments, n))
    out = matrix @ np.ascontiguousarray(values)
    return np.asarray(out, values.dtype)


def _max(values, order, indptr, counts, n_segments):
    """Channel-wise maximum and the first row in row order holding it."""
    n, channels = values.shape
    nonempty = np.flatnonzero(counts)
    depth = np.minimum(counts[nonempty], _MAX_PASSES)       # rows taken by the passes
    # Segments by decreasing depth (a radix sort of small ints): pass j is a prefix.
    segs = nonempty[np.argsort((_MAX_PASSES - depth).astype(np.uint8), kind="stable")]
    starts = indptr[segs]
    # n_deeper[j]: how many segments have a j-th row.
    n_deeper = len(segs) - np.cumsum(np.bincount(depth, minlength=_MAX_PASSES + 1))
    has_nan = values.dtype.kind == "f" and bool(np.isnan(values.max()))
    if order is not None:
        order = order.astype(np.int64)

    def rows_at(positions):
        return positions if order is None else order.take(positions)

    def better_than(candidate, current):
        better = np.greater(candidate, current)
        if has_nan:   # a NaN beats any number and loses to an earlier NaN
            better |= np.isnan(candidate) & ~np.isnan(current)
        return better

    # best: the running maximum (np.maximum propagates NaN, like the rule above); rank:
    # the pass j that last improved it, i.e. the winning row's rank within its segment
    # (row ranks increase with j, so rank = max(rank, j * better) records it without a
    # branchy select: np.where / copyto with a mask cost 25x a maximum here).
    best = values.take(rows_at(starts), axis=0)
    rank = np.zeros((len(segs), channels), np.uint8)
    for j in range(1, _MAX_PASSES):
        k = int(n_deeper[j])
        if k == 0:
            break
        candidate = values.take(rows_at(starts[:k] + j), axis=0)
        current = best[:k]
        better = better_than(candidate, current)
        np.maximum(current, candidate, out=current)
        np.maximum(rank[:k], better.view(np.uint8) * np.uint8(j), out=rank[:k])

    # Back to segment order; chosen row = the segment's start + the winning rank.
    if len(segs) == n_segments:
        where = np.empty(n_segments, np.int64)
        where[segs] = np.arange(n_segments)
        out = best.take(where, axis=0)
        rank = rank.take(where, axis=0)
    else:
        out = np.zeros((n_segments, channels), values.dtype)
        out[segs] = best
        full_rank = np.zeros((n_segments, channels), np.uint8)
        full_rank[segs] = rank
        rank = full_rank
    chosen = indptr[:-1, None] + rank
    if len(segs) < n_segments:
        np.minimum(chosen, n - 1, out=chosen)          # empty segments: set to -1 below
    if order is not None:
        chosen = order.take(chosen)     # (not mode="clip": 10x slower than a bound check)
    if len(segs) < n_segments:
        chosen[counts == 0] = -1

    # Segments longer than the passes: one reduceat over their remaining rows.
    n_full = int(n_deeper[_MAX_PASSES - 1])
    long_ = segs[:n_full][counts[segs[:n_full]] > _MAX_PASSES]
    if len(long_):
        tail = counts[long_] - _MAX_PASSES
        offsets = np.zeros(len(long_), np.int64)
        np.cumsum(tail[:-1], out=offsets[1:])
        total = int(offsets[-1] + tail[-1])
        rows = rows_at(np.repeat(indptr[long_] + _MAX_PASSES - offsets, tail)
                       + np.arange(total))
        candidate = values.take(rows, axis=0)
        top = np.maximum.reduceat(candidate, offsets, axis=0)
        owner = np.repeat(np.arange(len(long_)), tail)
        hit = candidate == top[owner]
        if has_nan:
            hit |= np.isnan(candidate) & np.isnan(top)[owner]
        first = np.minimum.reduceat(np.where(hit, np.arange(total)[:, None], total),
                                    offsets, axis=0)
        current = out[long_]
        better = better_than(top, current)    # tail rows come later: strictly better
        out[long_] = np.where(better, top, current)
        chosen[long_] = np.where(better, rows[first], chosen[long_])
    return out, chosen


@float16_in_float32("values")
def segment_reduce(values, segment_ids, n_segments, mode):
    """Reduce rows of ``values`` (N, C) by segment.

    Returns
    -------
    out : (n_segments, C)
    chosen : int64 rows, or None
        ``'max'``: (n_segments, C), the first row in row order holding each maximum (-1 for
        empty segments); ``'first'`` / ``'last'``: (n_segments,), the row kept (-1 if empty).
    """
    _check_mode(mode)
    ids = np.asarray(segment_ids, np.int64).reshape(-1)
    n, channels = values.shape
    if len(ids) != n:
        raise ValueError(f"segment_ids must have one id per row of values ({n}); got "
                         f"{len(ids)}")
    if n and int(ids.min()) < 0:
        raise ValueError(f"segment_ids must be >= 0; got {int(ids.min())}")
    counts = np.bincount(ids, minlength=n_segments) if n else np.zeros(n_segments, np.int64)
    if len(counts) > n_segments:
        raise ValueError(f"segment_ids must be below n_segments={n_segments}; got "
                         f"{int(ids.max())}")
    if n == 0 or (channels == 0 and mode not in ("first", "last")):
        out = np.zeros((n_segments, channels), values.dtype)
        return out, _no_chosen(mode, n_segments, channels)
    if int(counts.max()) <= 1:
        return _distinct(values, ids, n_segments, mode)
    if mode in ("sum", "mean"):
        out = _sum(values, ids, n_segments, counts)
        if mode == "mean":
            out /= np.maximum(counts, 1)[:, None].astype(values.dtype)
        return out, None
    order, indptr = group_rows(ids, n_segments, counts)
    if mode == "max":
        return _max(values, order, indptr, counts, n_segments)
    nonempty = np.flatnonzero(counts)
    pick = indptr[nonempty] if mode == "first" else indptr[nonempty + 1] - 1
    rows = pick if order is None else order.take(pick).astype(np.int64)
    if len(nonempty) == n_segments:
        return values.take(rows, axis=0), rows
    chosen = np.full(n_segments, -1, np.int64)
    chosen[nonempty] = rows
    out = np.zeros((n_segments, channels), values.dtype)
    out[nonempty] = values.take(rows, axis=0)
    return out, chosen


@float16_in_float32("grad_out")
def segment_reduce_backward(grad_out, segment_ids, n_segments, mode, chosen, n_rows):
    """Gradient of :func:`segment_reduce` with respect to ``values`` (n_rows, C).

    'sum' / 'mean': one gather (of the gradient divided by the count, for 'mean');
    'first' / 'last' / 'max': one scatter to the recorded rows (distinct per channel, so a
    plain assignment).
    """
    _check_mode(mode)
    ids = np.asarray(segment_ids, np.int64).reshape(-1)
    if mode == "sum":
        return grad_out.take(ids, axis=0)
    if mode == "mean":
        counts = np.bincount(ids, minlength=n_segments) if len(ids) else np.zeros(
            n_segments, np.int64)
        scaled = grad_out / np.maximum(counts, 1)[:, None].astype(grad_out.dtype)
        return scaled.take(ids, axis=0)
    channels = grad_out.shape[1]
    grad = np.zeros((n_rows, channels), grad_out.dtype)
    if mode in ("first", "last"):
        if chosen.size and int(chosen.min()) < 0:
            keep = chosen >= 0
            grad[chosen[keep]] = grad_out[keep]
        else:
            grad[chosen] = grad_out
        return grad
    cells = chosen * channels + np.arange(channels)
    if chosen.size and int(chosen.min()) < 0:
        keep = chosen >= 0
        grad.reshape(-1)[cells[keep]] = grad_out[keep]
    else:
        grad.reshape(-1)[cells.reshape(-1)] = grad_out.reshape(-1)
    return grad
