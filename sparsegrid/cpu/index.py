"""Coordinate index on NumPy: sorted int64 keys, queried with searchsorted.

The index of a site set is its sort permutation (``order``; ``None`` when the rows are
already in key order, as every site set sparsegrid creates is). Keys themselves are cheap
to recompute with whatever padding a rulebook builder needs, so only ``order`` is cached.

:func:`unique_inverse` merges repeated keys (the input layer); :func:`group_rows` is the
stable counting sort it and the segment reductions group rows with.
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


def group_rows(group_ids, n_groups, counts=None):
    """Stable grouping of rows by a small non-negative integer id: a counting sort.

    Parameters
    ----------
    group_ids : int (N,), each in ``[0, n_groups)``
    n_groups : int
    counts : int (n_groups,), optional
        ``np.bincount(group_ids, minlength=n_groups)`` when the caller has it.

    Returns
    -------
    order : integer (N,) or None
        The rows grouped by id, each group in increasing row order (``None`` when the ids
        are already non-decreasing: the identity). int32 or int64.
    indptr : int64 (n_groups + 1,)
        Group ``g`` is ``order[indptr[g]:indptr[g + 1]]``.

    The counting sort is SciPy's COO -> CSR conversion (one compiled pass over the rows,
    in row order, so it is stable: O(N + n_groups), no comparison sort): its compiled
    routine directly when SciPy has it where expected (a third less time than going
    through ``coo_matrix``), else the public ``coo_matrix(...).tocsr()``. SciPy is
    imported here, on first use, not by ``import sparsegrid``.
    """
    ids = np.asarray(group_ids, np.int64).reshape(-1)
    n = len(ids)
    if counts is None:
        counts = np.bincount(ids, minlength=n_groups) if n else np.zeros(n_groups, np.int64)
    indptr = np.zeros(n_groups + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    if n < 2 or bool(np.all(ids[1:] >= ids[:-1])):
        return None, indptr
    coo_tocsr = _coo_tocsr()
    if coo_tocsr is not None and max(n, n_groups) < 2**31 - 1:
        order = np.empty(n, np.int32)
        coo_tocsr(n_groups, n, n, ids.astype(np.int32), np.arange(n, dtype=np.int32),
                  np.zeros(n, np.int8), np.empty(n_groups + 1, np.int32), order,
                  np.empty(n, np.int8))
        return order, indptr
    from scipy.sparse import coo_matrix
    grouped = coo_matrix((np.ones(n, np.int8), (ids, np.arange(n))),
                         shape=(n_groups, n)).tocsr()
    return grouped.indices, indptr


def _coo_tocsr():
    """SciPy's compiled COO -> CSR conversion (a stable counting sort), or None."""
    try:
        from scipy.sparse._sparsetools import coo_tocsr
        return coo_tocsr
    except (ImportError, AttributeError):  # pragma: no cover - other SciPy layouts
        return None


def unique_inverse(keys):
    """``(unique_keys, first_rows, inverse)`` of int64 keys, exactly and deterministically.

    Returns
    -------
    unique_keys : int64 (M,)
        The sorted distinct keys.
    first_rows : int64 (M,)
        For each distinct key the first (smallest) row holding it.
    inverse : int64 (N,)
        For each row its key's position: ``unique_keys[inverse] == keys``.

    The same as ``np.unique(keys, return_index=True, return_inverse=True)``, built on
    :func:`sparsegrid.cpu.rules.unique_ranks` (a marks table over a small key range, one
    argsort otherwise) instead of NumPy's slower unique; keys already strictly increasing
    are recognised in one comparison pass.

    ``len(unique_keys) == len(keys)`` says there are no duplicates; then ``first_rows`` is
    the inverse permutation of ``inverse`` (one scatter). With duplicates the first rows
    come from a stable counting sort of ``inverse`` (:func:`group_rows`): a scatter of rows
    in reverse order ("last write wins") would be shorter, but NumPy does not guarantee the
    order in which a fancy assignment writes repeated indices.
    """
    from .rules import unique_ranks   # here: rules imports this module
    keys = np.asarray(keys, np.int64).reshape(-1)
    n = len(keys)
    if n < 2 or bool(np.all(keys[1:] > keys[:-1])):   # already sorted and distinct
        rows = np.arange(n)
        return keys.copy(), rows, rows.copy()
    unique_keys, inverse = unique_ranks(keys)
    m = len(unique_keys)
    if m == n:
        first_rows = np.empty(m, np.int64)
        first_rows[inverse] = np.arange(n)
        return unique_keys, first_rows, inverse
    order, indptr = group_rows(inverse, m)
    starts = indptr[:-1]
    first_rows = (starts if order is None else order[starts]).astype(np.int64)
    return unique_keys, first_rows, inverse
