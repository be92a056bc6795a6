"""Rulebook construction on NumPy (the kernel contract's rule builders).

Every builder returns ``(in_idx, out_idx, offset_ptr)``: int32 pair lists grouped by
kernel offset, pairs of offset ``k`` at ``[offset_ptr[k], offset_ptr[k + 1])``, and within
one offset every output row (and every input row) appears at most once. Builders that
create a new site set also return its indices, sorted by (batch, x1, ..., xD).

No Python loop runs over sites or pairs; loops run over kernel offsets only.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from ..coords import pack_keys, packing_strides, submanifold_offsets, unpack_keys
from .index import KEY_SENTINEL


def _assemble(pairs_in, pairs_out):
    counts = np.array([len(p) for p in pairs_in], np.int64)
    offset_ptr = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offset_ptr[1:])
    if len(pairs_in) == 0 or offset_ptr[-1] == 0:
        empty = np.zeros(0, np.int32)
        return empty, empty.copy(), offset_ptr
    in_idx = np.concatenate(pairs_in).astype(np.int32, copy=False)
    out_idx = np.concatenate(pairs_out).astype(np.int32, copy=False)
    return in_idx, out_idx, offset_ptr


def _positions(keys, query):
    """``np.searchsorted(keys, query)`` for an increasing ``query`` (keys shifted by one
    packed offset): one stable merge of the two sorted runs (timsort merges them in linear
    time, about 1.5x faster than binary searches on millions of keys). In the merged order
    query j is preceded by the j earlier queries and by the keys below it."""
    n = len(query)
    merged = np.argsort(np.concatenate([query, keys]), kind="stable")
    ranks = np.flatnonzero(merged < n)
    ranks -= np.arange(n)
    return ranks


def submanifold_rules(indices, order, spatial_shape, batch_size, filter_size, dilation):
    """Pairs (input row, output row) with input = output + (delta - f//2) * dilation.

    Output sites are the input sites. Neighbour keys are found in the sorted keys by one
    merge of the keys with the shifted keys (:func:`_positions`); along the last axis (dilation 1) consecutive offsets are consecutive keys,
    so one search per filter column suffices and the rest is a walk: if key q sits at
    position p, key q + 1 can only sit at p + 1, and if q is absent it can only sit at p.
    For odd filters the offset set is symmetric: the pairs of -delta are those of +delta
    swapped, and the centre offset is the identity.

    Parameters
    ----------
    indices : int32 (N, 1 + D)
    order : int64 (N,) or None
        Sort permutation of the rows (see :func:`build_index`).
    spatial_shape, filter_size, dilation : tuples of D ints
    batch_size : int

    Returns
    -------
    in_idx, out_idx : int32 (P,)
    offset_ptr : int64 (K + 1,)
    identity_offset : int
        The offset whose pairs are (r, r) for every row in row order, or -1.
    """
    n = len(indices)
    offsets = submanifold_offsets(filter_size, dilation)
    k_total = len(offsets)
    pad = np.abs(offsets).max(axis=0)
    sorted_indices = indices if order is None else indices[order]
    keys, strides = pack_keys(sorted_indices, spatial_shape, batch_size, pad)
    packed = offsets @ strides[1:]
    skeys = np.append(keys, KEY_SENTINEL)
    # int32 rows: the pair lists are built in their final dtype (half the memory)
    rows = np.arange(n, dtype=np.int32) if order is None else order.astype(np.int32)

    symmetric = all(f % 2 == 1 for f in filter_size)
    f_last = filter_size[-1]
    walk = dilation[-1] == 1
    n_cols = k_total // f_last
    pairs_in = [None] * k_total
    pairs_out = [None] * k_total

    identity_rows = order is None   # rows[i] == i: no gathers through ``rows``

    def record(k, pos, found):
        out_sorted = np.flatnonzero(found)
        if identity_rows:
            pairs_in[k] = pos.take(out_sorted).astype(np.int32)
            pairs_out[k] = out_sorted.astype(np.int32)
        else:
            pairs_in[k] = rows.take(pos.take(out_sorted))
            pairs_out[k] = rows.take(out_sorted)

    identity_offset = -1
    query = np.empty(n, np.int64)
    hit = np.empty(n, np.int64)
    found = np.empty(n, bool)
    for c in range(n_cols):
        mirror = n_cols - 1 - c
        if symmetric and mirror < c:
            continue
        column = range(c * f_last, (c + 1) * f_last)
        if symmetric and mirror == c:
            identity_offset = k_total // 2
            pairs_in[identity_offset] = pairs_out[identity_offset] = np.arange(n, dtype=np.int32)
            column = range(identity_offset + 1, (c + 1) * f_last)
            pos = np.arange(1, n + 1)  # key + 1, if present, follows key itself
        elif walk:
            np.add(keys, packed[column[0]], out=query)
            pos = _positions(keys, query)
        for k in column:
            np.add(keys, packed[k], out=query)
            if not walk:
                pos = _positions(keys, query)
            np.take(skeys, pos, out=hit, mode="clip")
            np.equal(hit, query, out=found)
            record(k, pos, found)
            if walk:
                pos += found
    if symmetric:
        for k in range(k_total):
            if pairs_in[k] is None:
                pairs_in[k], pairs_out[k] = pairs_out[k_total - 1 - k], pairs_in[k_total - 1 - k]
    in_idx, out_idx, offset_ptr = _assemble(pairs_in, pairs_out)
    return in_idx, out_idx, offset_ptr, identity_offset


def _per_axis_taps(coords, filter_size, stride, out_shape):
    """Per axis, the at most ceil(f / s) taps through which each site reaches an output.

    Site x reaches output o through tap delta iff x = o * s + delta with 0 <= o < out, so
    delta = x mod s + j * s for j = 0, 1, ...; returns, per axis, lists over j of
    (valid mask, tap, output coordinate).
    """
    axes = []
    for d, (f, s, n_out) in enumerate(zip(filter_size, stride, out_shape)):
        f, s, x = int(f), int(s), coords[:, d]
        power = s & (s - 1) == 0      # coordinates are >= 0: a mask and a shift
        first = x & (s - 1) if power else x % s
        choices = []
        for j in range(-(-f // s)):
            tap = first + j * s
            o = (x - tap) >> (s.bit_length() - 1) if power else (x - tap) // s
            valid = (o >= 0) & (o < n_out)
            if j * s + s > f:          # only then can tap = first + j * s reach f
                valid &= tap < f
            choices.append((valid, tap, o))
        axes.append(choices)
    return axes


def strided_rules(indices, spatial_shape, batch_size, filter_size, stride, out_shape):
    """Pairs of a strided convolution / pooling: input = output * stride + delta.

    An output site is active iff some active input lies in its window. Output sites come
    back sorted by (batch, x1, ..., xD). The loop runs over the prod(ceil(f / s)) ways a
    site can fall into windows (1 for f <= s), not over the prod(f) kernel offsets; pairs
    are then grouped by offset with a stable sort, keeping input-row order within one.

    Returns
    -------
    in_idx, out_idx : int32 (P,)
    offset_ptr : int64 (K + 1,)
    out_indices : int32 (M, 1 + D)
    """
    coords = indices[:, 1:].astype(np.int64)
    axes = _per_axis_taps(coords, filter_size, stride, out_shape)
    return _rules_from_taps(indices, axes, batch_size, filter_size, out_shape)


def _window_taps(coords, filter_size, starts):
    """:func:`_per_axis_taps` for windows starting at arbitrary ``starts[d]`` per axis.

    ``starts[d]`` is an increasing int64 array (one start per output coordinate); window
    o of axis d covers ``[starts[d][o], starts[d][o] + f - 1]``.
    """
    axes = []
    for d, (f, st) in enumerate(zip(filter_size, starts)):
        st = np.asarray(st, np.int64)
        n_out = len(st)
        cells = (st[:, None] + np.arange(f)).reshape(-1)          # covered coordinate
        outs = np.repeat(np.arange(n_out, dtype=np.int64), f)
        taps = np.tile(np.arange(f, dtype=np.int64), n_out)
        order = np.argsort(cells, kind="stable")
        cells, outs, taps = cells[order], outs[order], taps[order]
        size = int(max(coords[:, d].max(initial=0), cells.max(initial=0))) + 1
        first = np.searchsorted(cells, cells)                     # start of each cell's run
        slot = np.arange(len(cells)) - first
        width = int(slot.max(initial=-1)) + 1
        valid = np.zeros((size, width), bool)
        tap_table = np.zeros((size, width), np.int64)
        out_table = np.zeros((size, width), np.int64)
        valid[cells, slot] = True
        tap_table[cells, slot] = taps
        out_table[cells, slot] = outs
        c = coords[:, d]
        axes.append([(valid[c, j], tap_table[c, j], out_table[c, j]) for j in range(width)])
    return axes


def window_rules(indices, spatial_shape, batch_size, filter_size, starts, out_shape):
    """Pairs of a strided op whose windows start at ``starts[d][o]`` on axis d.

    RandomizedStrideConvolution / RandomizedStrideMaxPooling use it with randomly spaced,
    strictly increasing starts. Same return values as :func:`strided_rules`.
    """
    coords = indices[:, 1:].astype(np.int64)
    axes = _window_taps(coords, filter_size, starts)
    return _rules_from_taps(indices, axes, batch_size, filter_size, out_shape)


def _rules_from_taps(indices, axes, batch_size, filter_size, out_shape):
    out_strides = packing_strides(out_shape, batch_size)
    tap_strides = packing_strides(filter_size, 1)[1:]
    batch_key = indices[:, 0].astype(np.int64) * out_strides[0]
    rows_list, offset_list, key_list = [], [], []
    for choice in itertools.product(*[range(len(a)) for a in axes]):
        mask = axes[0][choice[0]][0]
        for d in range(1, len(choice)):
            mask = mask & axes[d][choice[d]][0]
        rows = np.flatnonzero(mask)
        every = len(rows) == len(mask)   # every row: no gathers needed
        offset = np.zeros(len(rows), np.int64)
        key = batch_key.copy() if every else batch_key[rows]
        for d, j in enumerate(choice):
            _, tap, o = axes[d][j]
            offset += (tap if every else tap[rows]) * tap_strides[d]
            key += (o if every else o[rows]) * out_strides[d + 1]
        rows_list.append(rows)
        offset_list.append(offset)
        key_list.append(key)
    empty = np.zeros(0, np.int64)
    rows = np.concatenate(rows_list) if rows_list else empty
    offsets = np.concatenate(offset_list) if offset_list else empty
    keys = np.concatenate(key_list) if key_list else empty
    n_offsets = math.prod(filter_size)
    # A stable sort by offset (radix sort for K < 2**16) groups the pairs by offset; with
    # regular windows each offset comes from exactly one choice, so its pairs are also in
    # increasing input-row order (random windows: not necessarily; nothing relies on it).
    sort_keys = offsets.astype(np.uint16) if n_offsets <= 2**16 else offsets
    order = np.argsort(sort_keys, kind="stable")
    counts = np.bincount(offsets, minlength=n_offsets)
    bounds = np.cumsum(counts)[:-1]
    pairs_in = np.split(rows[order], bounds)
    out_keys = np.split(keys[order], bounds)
    return _finish_new_sites(pairs_in, out_keys, out_shape)


def offset_rules(indices, order, spatial_shape, batch_size, offsets):
    """Submanifold pairs for an explicit offset list: input = output + offsets[k].

    Used for lattices that are not a box (PermutohedralSubmanifoldConvolution). One binary
    search per offset. The first all-zero offset is the identity offset.

    Returns ``(in_idx, out_idx, offset_ptr, identity_offset)`` as :func:`submanifold_rules`.
    """
    n = len(indices)
    offsets = np.asarray(offsets, np.int64).reshape(-1, len(spatial_shape))
    pad = np.abs(offsets).max(axis=0) if len(offsets) else np.zeros(len(spatial_shape),
                                                                    np.int64)
    sorted_indices = indices if order is None else indices[order]
    keys, strides = pack_keys(sorted_indices, spatial_shape, batch_size, pad)
    packed = offsets @ strides[1:]
    skeys = np.append(keys, KEY_SENTINEL)
    # int32 rows: the pair lists are built in their final dtype (half the memory)
    rows = np.arange(n, dtype=np.int32) if order is None else order.astype(np.int32)
    zero = np.flatnonzero(~offsets.any(axis=1))
    identity_offset = int(zero[0]) if len(zero) else -1
    pairs_in, pairs_out = [], []
    for k in range(len(offsets)):
        if k == identity_offset:
            pairs_in.append(np.arange(n, dtype=np.int32))
            pairs_out.append(np.arange(n, dtype=np.int32))
            continue
        query = keys + packed[k]
        pos = _positions(keys, query)
        found = np.flatnonzero(skeys[pos] == query)
        pairs_in.append(rows[pos[found]])
        pairs_out.append(rows[found])
    in_idx, out_idx, offset_ptr = _assemble(pairs_in, pairs_out)
    return in_idx, out_idx, offset_ptr, identity_offset


def full_rules(indices, spatial_shape, batch_size, filter_size, stride, out_shape):
    """Pairs of a full (generative) transposed convolution: output = input * stride + delta.

    Every input site activates all its children. Output sites come back sorted.
    """
    n = len(indices)
    coords = indices[:, 1:].astype(np.int64)
    strides = packing_strides(out_shape, batch_size)
    base = indices[:, 0].astype(np.int64) * strides[0] + (coords * np.asarray(stride)) @ strides[1:]
    rows = np.arange(n, dtype=np.int32)
    pairs_in, out_keys = [], []
    for taps in itertools.product(*[range(f) for f in filter_size]):
        pairs_in.append(rows)
        out_keys.append(base + int(np.dot(taps, strides[1:])))
    return _finish_new_sites(pairs_in, out_keys, out_shape)


# unique_ranks marks keys in a table over their range when it is at most this many times
# the number of keys (or this many cells): a scatter and a scan instead of a sort.
_DENSE_RANGE_FACTOR = 8
_DENSE_RANGE_MIN = 1 << 20


def unique_ranks(keys):
    """``(unique_keys, ranks)``: the sorted distinct values of an int64 array and each
    value's position among them (``unique_keys[ranks] == keys``).

    Keys within a small range (at most 8x their number, or 2**20) are marked in a table over
    that range: the marks, read in order, are the sorted distinct keys (the room scene's
    strided rulebooks: 234k-627k keys over 0.9 million output cells). Otherwise one
    argsort (the LiDAR scenes' output grids are 100-1000x their keys): NumPy's
    ``np.unique`` hashes int64 keys (8x slower here on 600k keys), and a ``searchsorted``
    of every key costs more than scattering the ranks back."""
    keys = np.asarray(keys, np.int64)
    if len(keys) == 0:
        return keys.copy(), np.zeros(0, np.int64)
    low, high = int(keys.min()), int(keys.max())
    span = high - low + 1
    if span <= max(_DENSE_RANGE_FACTOR * len(keys), _DENSE_RANGE_MIN):
        shifted = keys - low
        marks = np.zeros(span, bool)
        marks[shifted] = True
        present = np.flatnonzero(marks)
        table = np.empty(span, np.int64)     # read only where marked
        table[present] = np.arange(len(present))
        return present + low, table[shifted]
    order = np.argsort(keys)
    ordered = keys[order]
    new = np.empty(len(keys), bool)
    new[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    ranks = np.empty(len(keys), np.int64)
    ranks[order] = np.cumsum(new) - 1
    return ordered[new], ranks


def _finish_new_sites(pairs_in, out_keys, out_shape):
    counts = [len(p) for p in pairs_in]
    all_keys = np.concatenate(out_keys) if out_keys else np.zeros(0, np.int64)
    unique_keys, out_rows = unique_ranks(all_keys)
    pairs_out = np.split(out_rows, np.cumsum(counts)[:-1]) if counts else []
    in_idx, out_idx, offset_ptr = _assemble(pairs_in, pairs_out)
    return in_idx, out_idx, offset_ptr, unpack_keys(unique_keys, out_shape)
