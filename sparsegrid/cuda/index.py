"""Coordinate index on the GPU: sorted int64 keys, queried by binary search.

The same contract as :mod:`sparsegrid.cpu.index`: the index of a site set is its sort
permutation (``None`` when the keys already increase). CuPy's sorts are stable radix
sorts, so every result here is deterministic and equal to the CPU's.
"""

from __future__ import annotations

import numpy as np

from ._runtime import cp, read


def build_index(keys):
    """Stable sort permutation of int64 ``keys``, or ``None`` when already increasing.
    One host read (whether the keys increase)."""
    if len(keys) < 2 or bool(read((keys[1:] > keys[:-1]).all())):
        return None
    return cp.argsort(keys).astype(np.int64, copy=False)


def first_duplicate(sorted_keys, order):
    """``(first, second)`` rows of the first row repeating an earlier key, or None."""
    if len(sorted_keys) < 2:
        return None
    same = cp.flatnonzero(sorted_keys[1:] == sorted_keys[:-1]) + 1
    if len(same) == 0:
        return None
    rows = same if order is None else order[same]
    pick = cp.argmin(rows)
    position = same[pick]
    first_pos = cp.searchsorted(sorted_keys, sorted_keys[position])
    first = first_pos if order is None else order[first_pos]
    first, second = (int(v) for v in read(cp.stack([first, rows[pick]])))
    return first, second


def query_index(sorted_keys, order, queries):
    """Rows holding ``queries`` (int64, any shape), -1 where absent; int32."""
    if len(sorted_keys) == 0:
        return cp.full(queries.shape, -1, dtype=np.int32)
    pos = cp.searchsorted(sorted_keys, queries)
    pos = cp.minimum(pos, len(sorted_keys) - 1)
    found = sorted_keys[pos] == queries
    rows = pos if order is None else order[pos]
    return cp.where(found, rows, -1).astype(np.int32)


def unique_inverse(keys):
    """``(unique_keys, first_rows, inverse)`` of int64 keys: sorted distinct keys, the
    first row holding each, each row's key position (all int64). One stable sort; one
    host read (the number of distinct keys)."""
    keys = cp.ascontiguousarray(keys.reshape(-1).astype(np.int64, copy=False))
    n = len(keys)
    if n == 0:
        empty = cp.zeros(0, dtype=np.int64)
        return keys.copy(), empty, empty.copy()
    order = cp.argsort(keys).astype(np.int64, copy=False)
    ordered = keys[order]
    new = cp.empty(n, dtype=bool)
    new[:1] = True
    new[1:] = ordered[1:] != ordered[:-1]
    ranks = cp.cumsum(new, dtype=np.int64) - 1
    inverse = cp.empty(n, dtype=np.int64)
    inverse[order] = ranks                 # a permutation: one write per row
    starts = cp.flatnonzero(new)
    return ordered[starts], order[starts], inverse


def unique_ranks(keys):
    """``(unique_keys, ranks)``: sorted distinct int64 values and each one's position."""
    unique_keys, _, inverse = unique_inverse(keys)
    return unique_keys, inverse
