"""SBNet block gather / scatter on NumPy (the kernel contract's block primitives).

Geometry (SBNet's): block ``(n, bh, bw)`` of an NHWC image covers rows
``block_offset[0] + bh * block_stride[0] + [0, block_size[0])`` and the matching columns of
image ``n``. Pixels outside the image read as zero and are never written. Blocks may
overlap (stride < size); the block list holds each block once.

* gather: one ``np.take`` of the covered pixels (a row of C channels each), out-of-image
  pixels zeroed afterwards;
* scatter with ``add``: the blocks are split into phase groups ``(bh mod m_h, bw mod m_w)``,
  ``m = ceil(size / stride)``, within which no two blocks overlap, and each group is one
  fancy ``+=`` (distinct targets): every pixel receives its blocks in phase order, the order
  the CUDA kernel uses, so both backends add in the same order;
* scatter without ``add`` (overwrite): the last block of the list covering a pixel wins
  (SBNet's last-writer rule, made deterministic): one stable sort of the targets when
  blocks can overlap.
"""

from __future__ import annotations

import numpy as np


def block_pixels(indices, image_shape, block_size, block_offset, block_stride, xp=np):
    """``(flat, valid)``: for every pixel of every block, its row in the image viewed as
    (N*H*W, C) (clipped into range) and whether it lies inside the image; (nb, BH, BW)."""
    _, height, width = image_shape
    bh_size, bw_size = block_size
    n = indices[:, 0].astype(np.int64)
    rows = (block_offset[0] + indices[:, 1].astype(np.int64) * block_stride[0])[:, None] \
        + xp.arange(bh_size, dtype=np.int64)
    cols = (block_offset[1] + indices[:, 2].astype(np.int64) * block_stride[1])[:, None] \
        + xp.arange(bw_size, dtype=np.int64)
    valid = ((rows >= 0) & (rows < height))[:, :, None] & \
        ((cols >= 0) & (cols < width))[:, None, :]
    flat = ((n[:, None] * height + xp.clip(rows, 0, height - 1)) * width)[:, :, None] + \
        xp.clip(cols, 0, width - 1)[:, None, :]
    return flat, valid


def block_gather(x, indices, block_size, block_offset, block_stride):
    """Blocks (nb, BH, BW, C) of the NHWC array ``x``; out-of-image pixels are zero."""
    n_images, height, width, channels = x.shape
    flat, valid = block_pixels(indices, (n_images, height, width), block_size, block_offset,
                               block_stride)
    out = np.ascontiguousarray(x).reshape(-1, channels).take(flat.reshape(-1), axis=0)
    out = out.reshape(*flat.shape, channels)
    if not valid.all():
        out[~valid] = 0
    return out


def _phases(block_size, block_stride):
    return tuple(-(-int(s) // int(t)) for s, t in zip(block_size, block_stride))


def block_scatter(blocks, indices, base, block_size, block_offset, block_stride, add,
                  inplace=False):
    """A copy of ``base`` (N, H, W, C) -- or ``base`` itself with ``inplace`` (it must be
    C-contiguous) -- with the blocks (nb, BH, BW, C) written (``add=False``: the last block
    of the list covering a pixel wins) or added.

    float16 with ``add``: the sums run in float32 (overlapping blocks are added to a float32
    copy of ``base``) and are rounded once; writes without ``add`` are exact in float16."""
    if add and base.dtype == np.float16:
        total = block_scatter(np.asarray(blocks, np.float32), indices, base.astype(np.float32),
                              block_size, block_offset, block_stride, add, inplace=True)
        if not inplace:
            return total.astype(np.float16)
        base[...] = total
        return base
    n_images, height, width, channels = base.shape
    out = base if inplace else np.array(base, order="C", copy=True)
    if len(indices) == 0:
        return out
    flat, valid = block_pixels(indices, (n_images, height, width), block_size, block_offset,
                               block_stride)
    target = out.reshape(-1, channels)
    values = np.ascontiguousarray(blocks).reshape(-1, channels)
    m_h, m_w = _phases(block_size, block_stride)
    overlapping = m_h > 1 or m_w > 1
    if add:
        groups = [slice(None)] if not overlapping else None
        if overlapping:
            phase = (indices[:, 1] % m_h) * m_w + indices[:, 2] % m_w
            groups = [np.flatnonzero(phase == p) for p in range(m_h * m_w)]
        for group in groups:
            cells = flat[group][valid[group]]
            target[cells] += values.reshape(*flat.shape, channels)[group][valid[group]]
        return out
    cells = flat[valid]
    rows = np.flatnonzero(valid.reshape(-1))
    if overlapping:      # the last writer of each pixel, in list order
        order = np.argsort(cells, kind="stable")
        ordered = cells[order]
        last = np.ones(len(order), bool)
        last[:-1] = ordered[1:] != ordered[:-1]
        keep = order[last]
        cells, rows = cells[keep], rows[keep]
    target[cells] = values.take(rows, axis=0)
    return out
