"""Coordinate index on NumPy: sorted int64 keys, queried with searchsorted.

The index of a site set is its sort permutation (``order``; ``None`` when the rows are
already in key order, as every site set sparsegrid creates is). Keys themselves are cheap
to recompute with whatever padding a rulebook builder needs, so only ``order`` is cached.
"""

from __future__ import annotations

import numpy as np

# Appended to sorted keys so a search position may equal N and still be dereferenced.
KEY_SENTINEL = np.iinfo(np.int64).max


def build_index(keys):
    """Sort permutation of ``keys`` (int64, any order), or ``None`` if already increasing.

    Returns
    -------
    order : ndarray of int64 or None
        ``keys[order]`` is sorted; a stable sort, so equal keys keep their row order.
    """
    if len(keys) < 2 or bool(np.all(keys[1:] > keys[:-1])):
        return None
    return np.argsort(keys, kind="stable")


def first_duplicate(sorted_keys, order):
    """``(first, second)`` rows of the first row that repeats an earlier row's key, or None.

    ``second`` is the smallest row index whose key appeared before it; ``first`` the
    earliest row with the same key.
    """
    if len(sorted_keys) < 2:
        return None
    same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1]) + 1
    if len(same) == 0:
        return None
    rows = same if order is None else order[same]
    pick = int(np.argmin(rows))
    first_pos = int(np.searchsorted(sorted_keys, sorted_keys[same[pick]]))
    first = first_pos if order is None else int(order[first_pos])
    return first, int(rows[pick])


def query_index(sorted_keys, order, queries):
    """Rows holding ``queries`` (int64, any shape) in an index, ``-1`` where absent.

    Returns int32 rows in the original (unsorted) numbering.
    """
    if len(sorted_keys) == 0:
        return np.full(np.shape(queries), -1, np.int32)
    pos = np.searchsorted(sorted_keys, queries)
    np.minimum(pos, len(sorted_keys) - 1, out=pos)
    found = sorted_keys[pos] == queries
    rows = pos if order is None else order[pos]
    return np.where(found, rows, -1).astype(np.int32)
