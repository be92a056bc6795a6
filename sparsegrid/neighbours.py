"""Output-stationary neighbour maps, rows sorted by neighbour mask, and tile statistics.

The fused implicit-GEMM convolution of the CUDA backend reads a rulebook as a neighbour
map: for each output row and kernel offset the input row it gathers, or -1. A thread block
owns a tile of consecutive output rows and runs the offsets any row of the tile uses, so
the work it does is ``tile_rows * (offsets used by the tile)`` pairs, whatever the number
of real pairs. Sorting the rows by their neighbour mask (the set of offsets a row has
pairs at) puts rows with the same mask in the same tiles and cuts that waste: this module
computes the sorted order once per rulebook (cached on it and reused by every layer at that
resolution) and the statistics benchmarks report (computed pairs over valid pairs).

Backend-neutral: the arrays stay in the rulebook's library (NumPy or CuPy); nothing here
reads device values back except :func:`pair_statistics`, which returns Python numbers.
"""

from __future__ import annotations

import numpy as np

from . import backend

#: Row padding of the stored map: a multiple of every tile height the kernels use.
ROW_ALIGN = 128


class MaskOrder:
    """A rulebook's neighbour map with its rows sorted by neighbour mask.

    Attributes
    ----------
    order : int32 (n_out,)
        Output rows in sorted order: sorted position ``s`` holds output row ``order[s]``
        (a stable sort: rows with equal masks keep their rulebook order).
    kmap : int32 (K, n_pad)
        ``kmap[k, s]`` is the input row that output row ``order[s]`` gathers at offset
        ``k``, or -1; ``n_pad`` rounds ``n_out`` up to :data:`ROW_ALIGN` (padding rows
        are -1 everywhere).
    n_out, n_offsets, n_pad, valid_pairs : int
    """

    __slots__ = ("order", "kmap", "n_out", "n_offsets", "n_pad", "valid_pairs", "_tiles")

    def __init__(self, order, kmap, n_out, valid_pairs):
        self.order = order
        self.kmap = kmap
        self.n_out = int(n_out)
        self.n_offsets = int(kmap.shape[0])
        self.n_pad = int(kmap.shape[1])
        self.valid_pairs = int(valid_pairs)
        self._tiles = {}

    def tile_masks(self, tile_rows):
        """int32 (n_pad / tile_rows, ceil(K / 32)): bit ``k % 32`` of word ``k // 32`` is
        set when some row of the tile has a pair at offset ``k`` (cached per height)."""
        found = self._tiles.get(tile_rows)
        if found is None:
            found = self._tiles[tile_rows] = _pack_bits(
                _tile_union(self.present(), tile_rows))
        return found

    def present(self):
        """bool (n_pad, K): whether sorted row ``s`` has a pair at offset ``k`` (made from
        the map when asked: not kept)."""
        return self.kmap.T >= 0

    def __repr__(self):
        return (f"MaskOrder(n_out={self.n_out}, offsets={self.n_offsets}, "
                f"valid_pairs={self.valid_pairs})")


def _tile_union(present, tile_rows):
    rows, k = present.shape
    if rows % tile_rows:
        raise ValueError(f"tile_rows must divide the padded row count {rows}; got "
                         f"{tile_rows}")
    return present.reshape(rows // tile_rows, tile_rows, k).any(axis=1)


def _pack_bits(bits):
    """bool (n, K) -> int32 (n, ceil(K/32)) words, bit j of word w = column 32 w + j.
    32 shift-or passes over uint32 words: no temporary larger than the words."""
    xp = backend.array_namespace(bits)
    n, k = bits.shape
    words = max(1, -(-k // 32))
    packed = xp.zeros((n, words), dtype=xp.uint32)
    for j in range(min(k, 32)):
        column = bits[:, j::32].astype(xp.uint32)        # offsets j, j + 32, ...
        packed[:, :column.shape[1]] |= column << xp.uint32(j)
    return packed.view(xp.int32)


def _mask_order(table):
    """Stable order of the rows of a bool (n, K) table by their masks read as Gray codes
    (the highest offsets the most significant bits): consecutive rows then differ in few
    offsets, which is what a tile's OR of masks pays for (on the benchmark scenes 4 % fewer
    computed pairs than sorting the masks as plain numbers). LSD radix over 32-bit words."""
    xp = backend.array_namespace(table)
    n = table.shape[0]
    words = _pack_bits(table).view(xp.uint32).astype(xp.int64)
    # Gray code -> rank: bit i of the rank is the XOR of the code's bits i and above
    ranks = xp.empty_like(words)
    carry = xp.zeros(n, dtype=xp.int64)
    for w in range(words.shape[1] - 1, -1, -1):
        b = words[:, w]
        for shift in (1, 2, 4, 8, 16):
            b = b ^ (b >> shift)
        b = b ^ (carry * 0xFFFFFFFF)
        ranks[:, w] = b
        carry = b & 1
    order = xp.arange(n, dtype=xp.int64)
    for w in range(words.shape[1]):
        order = order[xp.argsort(ranks[order, w], kind="stable")] if n else order
    return order


def mask_order(rulebook):
    """The :class:`MaskOrder` of ``rulebook``, built on first use and cached on it.

    One scatter of the pairs into an (n_out, K) table, one stable sort of the masks: no
    host reads. Works for every kind of rulebook (each output row has at most one input
    per offset)."""
    def build():
        xp = backend.array_namespace(rulebook.in_idx)
        table = rulebook.neighbor_map()                       # (n_out, K), -1 absent
        present = table >= 0
        order = _mask_order(present)
        n_out, k = table.shape
        n_pad = max(ROW_ALIGN, -(-n_out // ROW_ALIGN) * ROW_ALIGN)
        kmap = xp.full((k, n_pad), -1, dtype=xp.int32)
        kmap[:, :n_out] = table[order].T
        return MaskOrder(order.astype(xp.int32), kmap, n_out, rulebook.n_pairs)

    return rulebook.derived("mask_order", build)


def pair_statistics(rulebook, tile_rows=64):
    """How much work a tiled output-stationary kernel does on ``rulebook``.

    Parameters
    ----------
    rulebook : Rulebook
    tile_rows : int
        Output rows per thread block (a divisor of 128: 16, 32, 64 or 128).

    Returns
    -------
    dict
        ``valid_pairs`` (the rulebook's pairs), ``dense_pairs`` (n_out * K),
        ``computed_unsorted`` / ``computed_sorted`` (``tile_rows`` times the offsets each
        tile uses, summed over tiles, with rows in rulebook order / sorted by mask; the
        last tile counts whole), and ``ratio_unsorted`` / ``ratio_sorted``
        (computed / valid; 1.0 for an empty rulebook).
    """
    if not isinstance(tile_rows, (int, np.integer)) or tile_rows <= 0 or \
            ROW_ALIGN % int(tile_rows):
        raise ValueError(f"tile_rows must be a positive divisor of {ROW_ALIGN}; got "
                         f"{tile_rows!r}")
    tile_rows = int(tile_rows)
    order = mask_order(rulebook)
    xp = backend.array_namespace(order.kmap)
    n_out, k = order.n_out, order.n_offsets
    present = order.present()                       # sorted rows
    unsorted = xp.zeros((order.n_pad, k), dtype=bool)
    unsorted[order.order] = present[:n_out]          # back to rulebook order: no new map
    counts = backend.to_numpy(xp.stack([
        _tile_union(unsorted, tile_rows).sum(), _tile_union(present, tile_rows).sum()
    ])).astype(np.int64)
    valid = order.valid_pairs
    computed_unsorted = int(counts[0]) * tile_rows
    computed_sorted = int(counts[1]) * tile_rows
    return {
        "tile_rows": tile_rows,
        "valid_pairs": valid,
        "dense_pairs": n_out * k,
        "computed_unsorted": computed_unsorted,
        "computed_sorted": computed_sorted,
        "ratio_unsorted": computed_unsorted / valid if valid else 1.0,
        "ratio_sorted": computed_sorted / valid if valid else 1.0,
    }
