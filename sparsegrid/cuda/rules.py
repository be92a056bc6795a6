"""Rulebook construction on the GPU (the kernel contract's rule builders).

The same pairs, in the same order, as :mod:`sparsegrid.cpu.rules`; new site sets come back
sorted by (batch, x1, ..., xD). Deterministic by construction: sort-based coordinate maps
(stable radix sorts and binary search of int64 keys, no hash table), one thread per
candidate pair, compaction in candidate order.

* submanifold / explicit offsets: one launch searches every (site, offset) neighbour key in
  the sorted keys (``neighbour_search``); the hits are compacted offset by offset in sorted
  site order. Odd filters search half the offsets: the pairs of ``-delta`` are those of
  ``+delta`` swapped, and the centre is the identity.
* strided / windowed: one launch enumerates, per input row, every combination of the
  per-axis windows that cover it (``window_candidates``, from small per-axis tables built
  on the host); a stable sort groups the pairs by offset; the output sites are the sorted
  distinct output keys.
* full (generative): every (offset, input row) pair, output keys made unique by one sort.

Host reads: the number of pairs found (to size the pair arrays), nothing per offset.
"""

from __future__ import annotations

import math

import numpy as np

from ..coords import pack_keys, packing_strides, submanifold_offsets, unpack_keys
from . import _compile
from ._runtime import cp, read
from .index import unique_ranks


def _assemble(pieces_in, pieces_out):
    """Concatenate per-offset pair lists; offset_ptr from their (host-known) lengths."""
    counts = np.array([len(p) for p in pieces_in], np.int64)
    ptr = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=ptr[1:])
    offset_ptr = cp.asarray(ptr)
    if ptr[-1] == 0:
        empty = cp.zeros(0, dtype=np.int32)
        return empty, empty.copy(), offset_ptr
    in_idx = cp.concatenate([p for p in pieces_in if len(p)]).astype(np.int32, copy=False)
    out_idx = cp.concatenate([p for p in pieces_out if len(p)]).astype(np.int32, copy=False)
    return in_idx, out_idx, offset_ptr


def _neighbour_pairs(keys, order, deltas):
    """Per delta, the pairs (row of key + delta, row of key), in sorted-site order."""
    n, n_deltas = len(keys), len(deltas)
    if n >= 2**31 - 1:
        raise ValueError(f"the CUDA rule builders take fewer than 2**31 sites; got {n}")
    if n_deltas == 0:
        return [], []
    found = cp.empty((n_deltas, n), dtype=np.int32)
    _compile.launch("index.cu", "neighbour_search", n * n_deltas,
                    cp.ascontiguousarray(keys), np.int64(n),
                    cp.asarray(np.asarray(deltas, np.int64)), np.int64(n_deltas), found)
    hits = found >= 0
    counts = read(hits.sum(axis=1)).astype(np.int64)      # one host read
    flat = cp.flatnonzero(hits)
    in_sorted = found.reshape(-1)[flat]
    out_sorted = (flat % n).astype(np.int32)
    if order is None:
        in_rows, out_rows = in_sorted, out_sorted
    else:
        rows = order.astype(np.int32)
        in_rows, out_rows = rows[in_sorted], rows[out_sorted]
    bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
    return ([in_rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
            [out_rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])])


def _host(values):
    """Small parameter arrays (offset lists, window starts) on the host, as NumPy, from
    either library."""
    if isinstance(values, (np.ndarray, list, tuple, range)):
        return np.asarray(values)
    return read(values)


def _sorted_keys(indices, order, spatial_shape, batch_size, pad):
    sorted_indices = indices if order is None else indices[order]
    return pack_keys(sorted_indices, spatial_shape, batch_size, pad)


def submanifold_rules(indices, order, spatial_shape, batch_size, filter_size, dilation):
    """Pairs (input row, output row) with input = output + (delta - f//2) * dilation.

    Returns ``(in_idx, out_idx, offset_ptr, identity_offset)`` as the CPU builder.
    """
    n = len(indices)
    offsets = submanifold_offsets(filter_size, dilation)
    k_total = len(offsets)
    keys, strides = _sorted_keys(indices, order, spatial_shape, batch_size,
                                 np.abs(offsets).max(axis=0))
    packed = offsets @ strides[1:]
    if all(f % 2 == 1 for f in filter_size):
        centre = k_total // 2
        pieces_in, pieces_out = _neighbour_pairs(keys, order, packed[:centre])
        identity = cp.arange(n, dtype=np.int32)
        mirrored = range(centre - 1, -1, -1)          # offset k > centre mirrors K-1-k
        return (*_assemble(pieces_in + [identity] + [pieces_out[j] for j in mirrored],
                           pieces_out + [identity] + [pieces_in[j] for j in mirrored]),
                centre)
    pieces_in, pieces_out = _neighbour_pairs(keys, order, packed)
    return (*_assemble(pieces_in, pieces_out), -1)


def offset_rules(indices, order, spatial_shape, batch_size, offsets):
    """Submanifold pairs for an explicit offset list: input = output + offsets[k]; the first
    all-zero offset is the identity. Returns as :func:`submanifold_rules`."""
    n = len(indices)
    offsets = _host(offsets).astype(np.int64).reshape(-1, len(spatial_shape))
    pad = np.abs(offsets).max(axis=0) if len(offsets) else np.zeros(len(spatial_shape),
                                                                    np.int64)
    keys, strides = _sorted_keys(indices, order, spatial_shape, batch_size, pad)
    packed = offsets @ strides[1:]
    zero = np.flatnonzero(~offsets.any(axis=1))
    identity_offset = int(zero[0]) if len(zero) else -1
    searched = [k for k in range(len(offsets)) if k != identity_offset]
    found_in, found_out = _neighbour_pairs(keys, order, packed[searched])
    pieces_in, pieces_out = list(found_in), list(found_out)
    if identity_offset >= 0:
        identity = cp.arange(n, dtype=np.int32)
        pieces_in.insert(identity_offset, identity)
        pieces_out.insert(identity_offset, identity)
    return (*_assemble(pieces_in, pieces_out), identity_offset)


def _axis_tables(filter_size, starts, spatial_shape):
    """Per axis, on the host: for each cell of the grid the windows covering it (see
    ``window_candidates`` in kernels/rules.cu). Returns the device arrays and params."""
    run_starts, run_lengths, taps_all, outs_all = [], [], [], []
    cell_base, entry_base, widths = [], [], []
    cells_so_far = entries_so_far = 0
    for f, st, extent in zip(filter_size, starts, spatial_shape):
        f, extent = int(f), int(extent)
        st = np.asarray(st, np.int64)
        cells = (st[:, None] + np.arange(f)).reshape(-1)
        outs = np.repeat(np.arange(len(st), dtype=np.int64), f)
        taps = np.tile(np.arange(f, dtype=np.int64), len(st))
        inside = (cells >= 0) & (cells < extent)
        cells, outs, taps = cells[inside], outs[inside], taps[inside]
        order = np.argsort(cells, kind="stable")
        cells, outs, taps = cells[order], outs[order], taps[order]
        every_cell = np.arange(extent)
        run_start = np.searchsorted(cells, every_cell)
        run_length = np.searchsorted(cells, every_cell, side="right") - run_start
        run_starts.append(run_start)
        run_lengths.append(run_length)
        taps_all.append(taps)
        outs_all.append(outs)
        cell_base.append(cells_so_far)
        entry_base.append(entries_so_far)
        widths.append(max(int(run_length.max(initial=0)), 1))
        cells_so_far += extent
        entries_so_far += len(cells)
    device = (cp.asarray(np.concatenate(run_starts).astype(np.int64)),
              cp.asarray(np.concatenate(run_lengths).astype(np.int32)),
              cp.asarray(np.concatenate(taps_all).astype(np.int32)),
              cp.asarray(np.concatenate(outs_all).astype(np.int32)))
    return device, cell_base, entry_base, widths


def _window_pairs(indices, spatial_shape, batch_size, filter_size, starts, out_shape,
                  by_slot):
    n, dims = len(indices), len(spatial_shape)
    n_offsets = math.prod(filter_size)
    tables, cell_base, entry_base, widths = _axis_tables(filter_size, starts, spatial_shape)
    per_row = math.prod(widths)
    out_strides = packing_strides(out_shape, batch_size)
    tap_strides = packing_strides(filter_size, 1)[1:]
    params = np.concatenate([cell_base, entry_base, widths, tap_strides,
                             out_strides]).astype(np.int64)
    offset = cp.empty(n * per_row, dtype=np.int32)
    key = cp.empty(n * per_row, dtype=np.int64)
    slot = cp.empty(n * per_row, dtype=np.int64)
    _compile.launch("rules.cu", "window_candidates", n * per_row,
                    cp.ascontiguousarray(indices.astype(np.int32, copy=False)), np.int64(n),
                    np.int32(dims), np.int64(per_row), *tables, cp.asarray(params), offset,
                    key, slot)
    valid = cp.flatnonzero(offset >= 0)                 # one host read: the pair count
    offset, key = offset[valid], key[valid]
    if by_slot and per_row > 1:
        order = cp.argsort(offset.astype(np.int64) * per_row + slot[valid])
    else:
        order = cp.argsort(offset)
    # the pairs are offset-major after the sort: the pointers by binary search (CuPy's
    # bincount would read the ids' bounds back to the host)
    ptr = cp.searchsorted(offset[order], cp.arange(n_offsets + 1, dtype=np.int32)).astype(
        np.int64, copy=False)
    unique_keys, out_rows = unique_ranks(key[order])
    in_idx = (valid // per_row)[order].astype(np.int32)
    return (in_idx, out_rows.astype(np.int32), ptr,
            unpack_keys(unique_keys, out_shape))


def strided_rules(indices, spatial_shape, batch_size, filter_size, stride, out_shape):
    """Pairs of a strided convolution / pooling: input = output * stride + delta; output
    sites sorted; within one offset, pairs in increasing input-row order.

    Returns ``(in_idx, out_idx, offset_ptr, out_indices)``.
    """
    starts = [np.arange(int(o), dtype=np.int64) * int(s) for o, s in zip(out_shape, stride)]
    return _window_pairs(indices, spatial_shape, batch_size, filter_size, starts, out_shape,
                         False)


def window_rules(indices, spatial_shape, batch_size, filter_size, starts, out_shape):
    """Pairs of a strided op whose windows start at ``starts[d][o]`` on axis d; within one
    offset, pairs ordered by their slots (j_1, ..., j_D), then by input row (as the CPU)."""
    starts = [_host(s).astype(np.int64) for s in starts]
    return _window_pairs(indices, spatial_shape, batch_size, filter_size, starts, out_shape,
                         True)


def full_rules(indices, spatial_shape, batch_size, filter_size, stride, out_shape):
    """Pairs of a full (generative) transposed convolution: output = input * stride + delta.
    Every input site activates all its children; output sites sorted."""
    n = len(indices)
    strides = packing_strides(out_shape, batch_size)
    base = indices[:, 0].astype(np.int64) * int(strides[0])
    for d in range(len(filter_size)):
        base += indices[:, d + 1].astype(np.int64) * int(int(stride[d]) * strides[d + 1])
    taps = np.stack(np.meshgrid(*[np.arange(f) for f in filter_size], indexing="ij"),
                    axis=-1).reshape(-1, len(filter_size))
    tap_keys = cp.asarray((taps @ strides[1:]).astype(np.int64))
    n_offsets = len(taps)
    keys = (tap_keys[:, None] + base[None, :]).reshape(-1)
    unique_keys, out_rows = unique_ranks(keys)
    offset_ptr = cp.asarray(np.arange(n_offsets + 1, dtype=np.int64) * n)
    in_idx = cp.tile(cp.arange(n, dtype=np.int32), n_offsets)
    return in_idx, out_rows.astype(np.int32), offset_ptr, unpack_keys(unique_keys, out_shape)
