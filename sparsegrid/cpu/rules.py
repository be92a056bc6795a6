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
    """Per axis, the taps through which each site reaches an output: a range per site.

    Site x reaches output o through tap delta iff x = o * s + delta with 0 <= o < out, so
    delta = x mod s + j * s and o = q - j (q = x div s); the valid j are the contiguous
    range max(0, q - out + 1) <= j <= min(q, (f - 1 - x mod s) div s), at most ceil(f / s)
    of them. Returns, per axis, ``(count, tap, out, (tap_step, out_step), width)``: per
    site the number of taps and the first one's (tap, output coordinate), int64 arrays;
    the i-th tap of a site is ``tap + i * tap_step`` with output ``out + i * out_step``.
    """
    axes = []
    for d, (f, s, n_out) in enumerate(zip(filter_size, stride, out_shape)):
        f, s, n_out, x = int(f), int(s), int(n_out), coords[:, d]
        power = s & (s - 1) == 0      # coordinates are >= 0: a mask and a shift
        shift = s.bit_length() - 1
        first = x & (s - 1) if power else x % s
        q = x - first
        if power:
            q >>= shift
        else:
            q //= s
        last = f - 1 - first          # tap = first + j * s <= f - 1
        if power:
            last >>= shift
        else:
            last //= s
        low = q - (n_out - 1)
        np.maximum(low, 0, out=low)
        count = np.minimum(q, last, out=last)
        count -= low
        count += 1
        np.maximum(count, 0, out=count)
        q -= low                      # output of the first valid tap
        low *= s
        low += first                  # the first valid tap
        axes.append((count, low, q, (s, -1), -(-f // s)))
    return axes


def strided_rules(indices, spatial_shape, batch_size, filter_size, stride, out_shape):
    """Pairs of a strided convolution / pooling: input = output * stride + delta.

    An output site is active iff some active input lies in its window. Output sites come
    back sorted by (batch, x1, ..., xD). Per axis each site falls into a contiguous range
    of at most ceil(f / s) windows; a site's pairs are the product of its ranges, built by
    one repeat per axis (no Python loop over windows or kernel offsets: a window as large
    as the grid costs what its pairs cost). The pairs are then grouped by offset with a
    stable sort, in increasing input-row order within one offset.

    Returns
    -------
    in_idx, out_idx : int32 (P,)
    offset_ptr : int64 (K + 1,)
    out_indices : int32 (M, 1 + D)
    """
    coords = indices[:, 1:].astype(np.int64)
    axes = _per_axis_taps(coords, filter_size, stride, out_shape)
    return _rules_from_taps(indices, axes, batch_size, filter_size, out_shape, False)


def _window_taps(coords, filter_size, starts):
    """:func:`_per_axis_taps` for windows starting at arbitrary ``starts[d]`` per axis.

    ``starts[d]`` is an increasing int64 array (one start per output coordinate); window
    o of axis d covers ``[starts[d][o], starts[d][o] + f - 1]``. The windows covering a
    cell, in increasing o, are its slots j = 0, 1, ...; the (tap, o) of every (cell, slot)
    lie in one table sorted by cell. Per axis ``(count, at, None, (taps, outs), width)``:
    per site the number of slots and the table position of slot 0.
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
        slot = np.arange(len(cells)) - np.searchsorted(cells, cells)
        width = int(slot.max(initial=-1)) + 1
        every_cell = np.arange(size)
        run_start = np.searchsorted(cells, every_cell)
        run_length = np.searchsorted(cells, every_cell, side="right") - run_start
        c = coords[:, d]
        axes.append((run_length[c], run_start[c], None, (taps, outs), width))
    return axes


def window_rules(indices, spatial_shape, batch_size, filter_size, starts, out_shape):
    """Pairs of a strided op whose windows start at ``starts[d][o]`` on axis d.

    RandomizedStrideConvolution / RandomizedStrideMaxPooling use it with randomly spaced,
    strictly increasing starts. Same return values as :func:`strided_rules`; within one
    offset, pairs are ordered by their slots (j_1, ..., j_D), then by input row.
    """
    coords = indices[:, 1:].astype(np.int64)
    axes = _window_taps(coords, filter_size, starts)
    return _rules_from_taps(indices, axes, batch_size, filter_size, out_shape, True)


def _stable_order(values, bound):
    """Stable argsort of non-negative int64 ``values`` below ``bound`` (a radix sort when
    they fit 16 bits)."""
    return np.argsort(values.astype(np.uint16) if bound <= 2**16 else values, kind="stable")


def _spread(acc, parent, begin, step):
    """``acc[parent[p]] + (p - begin[parent[p]]) * step`` for every pair p (``step`` != 0)."""
    acc -= begin * step
    acc = acc.take(parent)
    acc += np.arange(0, len(parent) * step, step, dtype=np.int64)
    return acc


def _rules_from_taps(indices, axes, batch_size, filter_size, out_shape, by_slot):
    """Pairs from per-axis tap ranges (:func:`_per_axis_taps`, :func:`_window_taps`).

    Row by row, a site's pairs are the product of its per-axis ranges, last axis fastest:
    one repeat per axis on which some site has several taps, so the work and memory are
    proportional to the pairs. With ``by_slot``, pairs of one offset are ordered by
    their slots (j_1, ..., j_D) before the input row (the order of one pass per slot
    combination); regular windows give one offset one slot combination, so there that
    order is plain input-row order.
    """
    n = len(indices)
    out_strides = packing_strides(out_shape, batch_size)
    tap_strides = packing_strides(filter_size, 1)[1:]
    n_offsets = math.prod(filter_size)
    alive = np.ones(n, bool)
    for axis in axes:
        alive &= axis[0] > 0
    rows = None if alive.all() else np.flatnonzero(alive)   # None: every row, in order
    key = indices[:, 0].astype(np.int64) * out_strides[0]
    if rows is not None:
        key = key[rows]
    offset = np.zeros(len(key), np.int64)
    slot = np.zeros(len(key), np.int64) if by_slot else None
    for d, (count, tap, out, step, width) in enumerate(axes):
        tap_stride, out_stride = tap_strides[d], out_strides[d + 1]
        c = count if rows is None else count[rows]
        if rows is not None:
            tap = tap[rows]
            out = out if out is None else out[rows]
        expand = len(c) and int(c.max()) > 1          # some site has several taps here
        if expand:                                    # pair p: tap number i of parent[p]
            index = np.int32 if len(c) < 2**31 else np.int64
            parent = np.repeat(np.arange(len(c), dtype=index), c)
            begin = np.cumsum(c)
            begin -= c                                # i = p - begin[parent[p]]
            rows = parent if rows is None else rows.take(parent)
        if out is not None:                           # linear: tap + i * s, out - i
            offset += tap * tap_stride
            key += out * out_stride
            if expand:      # acc[parent[p]] + (p - begin[parent[p]]) * step, no i array
                offset = _spread(offset, parent, begin, step[0] * tap_stride)
                key = _spread(key, parent, begin, step[1] * out_stride)
        else:                                         # a table of (tap, out) per slot
            taps, outs = step
            if expand:
                i = np.arange(len(parent), dtype=np.int64)
                i -= begin.take(parent)
                tap = tap.take(parent)
                tap += i
                offset = offset.take(parent)
                key = key.take(parent)
            offset += taps.take(tap) * tap_stride
            key += outs.take(tap) * out_stride
        if by_slot:                                   # slot combination, lexicographic
            if expand:
                slot = slot.take(parent)
                slot *= width
                slot += i
            else:
                slot *= width
    if rows is None:
        rows = np.arange(n)
    # Group by offset with a stable sort (the pairs are in input-row order so far). The slot
    # combinations number at most prod(filter_size), which packing_strides bounds.
    n_slots = math.prod(axis[4] for axis in axes)
    if by_slot and n_slots > 1:
        order = _stable_order(slot, n_slots)
        order = order[_stable_order(offset[order], n_offsets)]
    else:
        order = _stable_order(offset, n_offsets)
    offset_ptr = np.zeros(n_offsets + 1, np.int64)
    np.cumsum(np.bincount(offset, minlength=n_offsets), out=offset_ptr[1:])
    unique_keys, out_rows = unique_ranks(key[order])
    if offset_ptr[-1] == 0:
        empty = np.zeros(0, np.int32)
        return empty, empty.copy(), offset_ptr, unpack_keys(unique_keys, out_shape)
    in_idx = rows[order].astype(np.int32)
    return in_idx, out_rows.astype(np.int32), offset_ptr, unpack_keys(unique_keys, out_shape)


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
