"""Grid: the coordinate manager shared by every tensor derived from one input.

A :class:`Sites` is one active site set (indices, spatial shape, batch size and its sorted
index). A :class:`Grid` owns the site sets derived from one input and caches the rulebooks
between them, keyed by (site set, kind, filter, stride, dilation): a network computes each
rulebook once per batch. A strided op remembers which site set and rulebook produced its
output, so Deconvolution and UnPooling find the exact adjoint (SCN keys site sets by spatial
size alone, so two different paths to one size overwrite each other; here they cannot).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from . import backend
from .coords import (check_rulebook_size, normalize_size, normalize_spatial_shape, pack_keys,
                     strided_output_shape, transposed_output_shape)
from .rulebook import Rulebook

_uids = itertools.count()


class Sites:
    """An active site set. Treat as immutable.

    Attributes
    ----------
    indices : int32 (N, 1 + D), batch first
    spatial_shape : tuple of D ints
    batch_size : int
    order : int64 (N,) or None
        Sort permutation of ``indices`` by (batch, x1, ..., xD); None when already sorted.
    producer : tuple or None
        ``(input_sites, filter_size, stride, rulebook)`` of the strided op that made it.
    kernels : module
        The backend (``sparsegrid.cpu`` / ``sparsegrid.cuda``) of the indices' library.
    """

    __slots__ = ("indices", "spatial_shape", "batch_size", "order", "producer", "uid",
                 "kernels")

    def __init__(self, indices, spatial_shape, batch_size, order=None, producer=None):
        if isinstance(indices, np.ndarray):
            indices.flags.writeable = False   # cached rulebooks depend on these coordinates
        self.indices = indices
        # The backend is chosen here, once, from the indices' array library; every
        # rulebook and kernel on these sites uses it.
        self.kernels = backend.kernels(indices)
        self.spatial_shape = tuple(spatial_shape)
        self.batch_size = int(batch_size)
        self.order = order
        self.producer = producer
        self.uid = next(_uids)

    @classmethod
    def from_indices(cls, indices, spatial_shape, batch_size):
        """Index validated indices; ValueError naming the rows of the first duplicate site."""
        kernels = backend.kernels(indices)
        keys, _ = pack_keys(indices, spatial_shape, batch_size)
        order = kernels.build_index(keys)
        sorted_keys = keys if order is None else keys[order]
        duplicate = kernels.first_duplicate(sorted_keys, order)
        if duplicate is not None:
            a, b = duplicate
            raise ValueError(f"indices rows {a} and {b} are the same site "
                             f"{indices[a].tolist()}; a SparseTensor holds each site once "
                             "(use sparsegrid.input_layer to merge duplicates)")
        return cls(indices, spatial_shape, batch_size, order)

    @property
    def dimension(self):
        return len(self.spatial_shape)

    def __len__(self):
        return len(self.indices)

    def __repr__(self):
        return (f"Sites(n={len(self)}, spatial_shape={self.spatial_shape}, "
                f"batch_size={self.batch_size})")


def _strided_result(sites, filter_size, stride, out_shape, rules):
    """``(rulebook, output_sites)`` of a strided op's rules; the output sites remember
    the rulebook that made them (for Deconvolution / UnPooling)."""
    in_idx, out_idx, ptr, out_indices = rules
    rulebook = Rulebook(in_idx, out_idx, ptr, len(sites), len(out_indices), filter_size,
                        stride=stride, kind="strided")
    out_sites = Sites(out_indices, out_shape, sites.batch_size,
                      producer=(sites, filter_size, stride, rulebook))
    return rulebook, out_sites


def random_window_starts(filter_size, stride, out_shape, rng):
    """Per axis, the increasing int64 window starts of :meth:`Grid.randomized_strided`: the
    ``out - 1`` steps are a shuffle (by ``rng``) of about one third ``s - 1``, one third
    ``s + 1`` and the rest ``s``, where ``1 < s < f``; plain steps of ``s`` otherwise."""
    starts = []
    for f, s, n_out in zip(filter_size, stride, out_shape):
        steps = np.full(n_out - 1, s, np.int64)
        if 1 < s < f:
            third = (n_out - 1) // 3
            steps[:third] -= 1
            steps[third:2 * third] += 1
            rng.shuffle(steps)
        starts.append(np.concatenate([[0], np.cumsum(steps)]).astype(np.int64))
    return starts


class Grid:
    """Site sets derived from one input, and the rulebooks between them (cached)."""

    def __init__(self):
        self._rulebooks = {}

    def __repr__(self):
        return f"Grid({len(self._rulebooks)} cached rulebooks)"

    def clear(self):
        """Forget cached rulebooks (they are rebuilt on demand)."""
        self._rulebooks.clear()

    def _cached(self, key, build):
        found = self._rulebooks.get(key)
        if found is None:
            found = self._rulebooks[key] = build()
        return found

    def submanifold(self, sites, filter_size, dilation=1, *, op="Grid.submanifold"):
        """Rulebook of a submanifold convolution on ``sites`` (output sites = input sites).

        Before building, the worst case of ``K * N`` pairs is checked against
        :data:`sparsegrid.coords.MAX_ALLOCATION_BYTES` (MemoryError naming ``op``).
        """
        d = sites.dimension
        filter_size = normalize_size(filter_size, d, "filter_size")
        dilation = normalize_size(dilation, d, "dilation")

        def build():
            check_rulebook_size(op, math.prod(filter_size), len(sites))
            kernels = sites.kernels
            in_idx, out_idx, ptr, identity = kernels.submanifold_rules(
                sites.indices, sites.order, sites.spatial_shape, sites.batch_size,
                filter_size, dilation)
            return Rulebook(in_idx, out_idx, ptr, len(sites), len(sites), filter_size,
                            dilation=dilation, kind="submanifold", identity_offset=identity)

        return self._cached((sites.uid, "submanifold", filter_size, dilation), build)

    def strided(self, sites, filter_size, stride, *, op="Grid.strided"):
        """``(rulebook, output_sites)`` of a strided convolution / pooling on ``sites``.

        Raises ValueError when the spatial size does not fit ``(in - f) % s == 0``, and
        MemoryError (naming ``op``) when the worst case of pairs (each input site lies in
        at most ``prod(min(ceil(f / s), out))`` windows) exceeds the allocation limit.
        """
        d = sites.dimension
        filter_size = normalize_size(filter_size, d, "filter_size")
        stride = normalize_size(stride, d, "stride")
        out_shape = strided_output_shape(sites.spatial_shape, filter_size, stride)

        def build():
            # a site lies in at most ceil(f / s) windows per axis, and in no more windows
            # than the axis has outputs (a window as large as the grid: one)
            reach = math.prod(min(-(-f // st), o) for f, st, o in zip(filter_size, stride,
                                                                       out_shape))
            check_rulebook_size(op, reach, len(sites),
                                extra=f"; each site in at most {reach} windows")
            kernels = sites.kernels
            return _strided_result(sites, filter_size, stride, out_shape, kernels.strided_rules(
                sites.indices, sites.spatial_shape, sites.batch_size, filter_size, stride,
                out_shape))

        return self._cached((sites.uid, "strided", filter_size, stride), build)

    def lattice(self, sites, offsets, name, *, op="Grid.lattice", keep_latest=False):
        """Rulebook of a submanifold convolution over an explicit offset list (K, D).

        ``input = output + offsets[k]``; ``name`` identifies the offset set in the cache
        (for example ``'permutohedral'``). ``keep_latest``: the grid keeps one offset list
        per (sites, name) -- a new list replaces the previous one's rulebook, so offsets
        that change during training (learnable positions) do not accumulate rulebooks.
        """
        offsets = tuple(tuple(int(v) for v in row) for row in offsets)
        if keep_latest:
            stale = [key for key in self._rulebooks if key[:3] == (sites.uid, "lattice", name)
                     and key[3] != offsets]
            for key in stale:
                del self._rulebooks[key]

        def build():
            check_rulebook_size(op, len(offsets), len(sites))
            kernels = sites.kernels
            in_idx, out_idx, ptr, identity = kernels.offset_rules(
                sites.indices, sites.order, sites.spatial_shape, sites.batch_size, offsets)
            return Rulebook(in_idx, out_idx, ptr, len(sites), len(sites), (len(offsets),),
                            kind="submanifold", identity_offset=identity)

        return self._cached((sites.uid, "lattice", name, offsets), build)

    def randomized_strided(self, sites, filter_size, stride, rng, *,
                           op="Grid.randomized_strided"):
        """``(rulebook, output_sites)`` of a strided op with randomly spaced windows.

        Per axis, the ``out - 1`` steps between window starts are a shuffle of about one
        third ``s - 1``, one third ``s + 1`` and the rest ``s`` (equal numbers of ``s - 1``
        and ``s + 1``, so the windows still span the whole input), as SCN's
        RandomizedStrideConvolution. Strides of 1 are not randomised (a step of 0 would
        repeat a window), nor filters no larger than the stride (a step of ``s + 1`` would
        leave inputs in no window). Nothing is cached: every call draws new windows; the
        output sites remember the rulebook, so a Deconvolution/UnPooling finds its adjoint.
        """
        d = sites.dimension
        filter_size = normalize_size(filter_size, d, "filter_size")
        stride = normalize_size(stride, d, "stride")
        out_shape = strided_output_shape(sites.spatial_shape, filter_size, stride)
        # randomly spaced windows may start s - 1 apart: at most min(f, out) per axis
        reach = math.prod(min(f, o) for f, o in zip(filter_size, out_shape))
        check_rulebook_size(op, reach, len(sites),
                            extra=f"; each site in at most {reach} windows")
        starts = random_window_starts(filter_size, stride, out_shape, rng)
        kernels = sites.kernels
        return _strided_result(sites, filter_size, stride, out_shape, kernels.window_rules(
            sites.indices, sites.spatial_shape, sites.batch_size, filter_size, starts,
            out_shape))

    def transposed(self, sites, filter_size, stride):
        """``(rulebook, output_sites)`` of Deconvolution / UnPooling on coarse ``sites``.

        The output sites are the finer site set whose strided op (same filter and stride)
        produced ``sites``, and the rulebook is that op's, transposed: the exact adjoint.

        Raises
        ------
        ValueError
            When ``sites`` were not produced by a strided op with this filter and stride.
        """
        d = sites.dimension
        filter_size = normalize_size(filter_size, d, "filter_size")
        stride = normalize_size(stride, d, "stride")
        producer = sites.producer
        if producer is None or producer[1] != filter_size or producer[2] != stride:
            made = ("the input (no strided op made them)" if producer is None else
                    f"a strided op with filter_size={producer[1]}, stride={producer[2]}")
            raise ValueError(
                f"Deconvolution/UnPooling with filter_size={filter_size}, stride={stride} "
                "needs the rulebook of the Convolution/pooling with the same filter_size and "
                "stride that produced its input's sites; this input's sites came from "
                f"{made}. Use full_conv for a transposed convolution that creates new sites.")
        fine_sites, _, _, rulebook = producer
        expected = transposed_output_shape(sites.spatial_shape, filter_size, stride)
        assert expected == fine_sites.spatial_shape, (expected, fine_sites.spatial_shape)
        return self._cached((sites.uid, "transposed", filter_size, stride),
                            lambda: (rulebook.transpose(), fine_sites))

    def full(self, sites, filter_size, stride, *, op="Grid.full"):
        """``(rulebook, output_sites, new_grid)`` of a full (generative) transposed conv.

        Every input site activates all ``prod(filter_size)`` children; the output lives in
        a new Grid (its sites are not derived by a strided op from anything in this one).
        MemoryError (naming ``op``) when the ``K * N`` pairs, their int64 keys and up to
        ``K * N`` new sites' int32 indices exceed the allocation limit.
        """
        d = sites.dimension
        filter_size = normalize_size(filter_size, d, "filter_size")
        stride = normalize_size(stride, d, "stride")
        out_shape = normalize_spatial_shape(
            transposed_output_shape(sites.spatial_shape, filter_size, stride))

        def build():
            check_rulebook_size(op, math.prod(filter_size), len(sites),
                                bytes_per_pair=8 + 8 + 4 * (d + 1),
                                extra=", each pair also a new site's int64 key and int32 "
                                      "indices")
            kernels = sites.kernels
            in_idx, out_idx, ptr, out_indices = kernels.full_rules(
                sites.indices, sites.spatial_shape, sites.batch_size, filter_size, stride,
                out_shape)
            rulebook = Rulebook(in_idx, out_idx, ptr, len(sites), len(out_indices), filter_size,
                                stride=stride, kind="full")
            return rulebook, Sites(out_indices, out_shape, sites.batch_size), Grid()

        return self._cached((sites.uid, "full", filter_size, stride), build)
