"""SBNet block gather / scatter on the GPU (the contract of :mod:`sparsegrid.cpu.blocks`).

Gather: a thread per block element. Scatter: a thread per element of the output image,
which visits the (at most ``ceil(size / stride)`` per axis) blocks covering its pixel in
phase order through a table of block positions, adding them (the CPU's order: the same
bits) or keeping the last one of the list. No atomics, no host reads.
"""

from __future__ import annotations

import numpy as np

from . import _compile
from ._runtime import cp


def _geometry(block_size, block_offset, block_stride):
    return cp.asarray(np.array([*block_size, *block_offset, *block_stride], np.int64))


def block_gather(x, indices, block_size, block_offset, block_stride):
    """Blocks (nb, BH, BW, C) of the NHWC array ``x``; out-of-image pixels are zero."""
    n_images, height, width, channels = x.shape
    out = cp.empty((len(indices), *block_size, channels), dtype=x.dtype)
    _compile.launch("blocks.cu", _compile.typed("block_gather", x.dtype), out.size,
                    cp.ascontiguousarray(x), cp.ascontiguousarray(indices.astype(np.int32)),
                    _geometry(block_size, block_offset, block_stride), out,
                    np.int64(len(indices)), np.int64(height), np.int64(width),
                    np.int64(channels))
    return out


def _table_shape(extent, offset, stride):
    """Block positions that can cover some pixel of an axis of ``extent``: [0, T)."""
    return max(-(-(extent - offset) // stride), 1)


def block_scatter(blocks, indices, base, block_size, block_offset, block_stride, add,
                  inplace=False):
    """A copy of ``base`` (N, H, W, C) -- or ``base`` itself with ``inplace`` (C-contiguous;
    each thread reads and writes its own element) -- with the blocks written (the last
    block of the list covering a pixel wins) or added (``add``)."""
    n_images, height, width, channels = base.shape
    th = _table_shape(height, block_offset[0], block_stride[0])
    tw = _table_shape(width, block_offset[1], block_stride[1])
    m_h = -(-int(block_size[0]) // int(block_stride[0]))
    m_w = -(-int(block_size[1]) // int(block_stride[1]))
    indices = indices.astype(np.int64)
    n, bh, bw = indices[:, 0], indices[:, 1], indices[:, 2]
    dummy = n_images * th * tw
    inside = (n >= 0) & (n < n_images) & (bh < th) & (bw < tw)
    slot = cp.where(inside, (n * th + bh) * tw + bw, dummy)
    table = cp.full(dummy + 1, -1, dtype=np.int32)
    table[slot] = cp.arange(len(indices), dtype=np.int32)   # distinct blocks: one writer each
    base = base if inplace else cp.ascontiguousarray(base)
    y = base if inplace else cp.empty(base.shape, dtype=base.dtype)
    _compile.launch("blocks.cu", _compile.typed("block_scatter", base.dtype, True), y.size,
                    cp.ascontiguousarray(blocks), base, table,
                    _geometry(block_size, block_offset, block_stride),
                    cp.asarray(np.array([th, tw, m_h, m_w], np.int64)), y,
                    np.int64(n_images), np.int64(height), np.int64(width), np.int64(channels),
                    np.int32(1 if add else 0))
    return y
