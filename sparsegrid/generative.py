"""Generative ops (MinkowskiEngine's, for completion and reconstruction networks).

- :func:`generative_transposed_conv`: every child site of every input site. This is
  SCN's FullConvolution, already :func:`sparsegrid.functional.full_conv`
  (``output = input * stride + delta_k``); it is exposed here under MinkowskiEngine's name.
- :func:`prune`: keep the sites where a boolean mask is true (MinkowskiPruning), on
  :func:`sparsegrid.functional.select`.
- :func:`union`: the union of the site sets of several tensors, features summed where
  sites overlap (MinkowskiUnion), on the kernel contract's ``unique_inverse`` and
  ``segment_reduce(..., 'sum')``, so it runs on NumPy and CuPy alike.
- :func:`cat`: channel concatenation of tensors on identical sites (MinkowskiEngine's
  ``cat``).

Every op follows the one rule of :mod:`sparsegrid.functional`: plain feature arrays give
plain arrays, autodiff Tensor features give Tensors (recording the backward pass when a
gradient is wanted). Layers: :mod:`sparsegrid.nn.generative` (``nn.Pruning``,
``nn.Union``, ``nn.Cat``; ``nn.FullConvolution`` is the generative transposed convolution).
"""

from __future__ import annotations

import numpy as np

from . import backend
from .autodiff.core import data_of
from .coords import pack_keys
from .functional import _differentiable, _require_tensor, _same_sites, full_conv, select
from .grid import Grid, Sites
from .tensor import SparseTensor


def generative_transposed_conv(x, weight, bias=None, filter_size=2, stride=2):
    """Generative transposed convolution: every child site of every input site.

    MinkowskiEngine's ``MinkowskiGenerativeConvolutionTranspose`` in sparsegrid's
    conventions; exactly :func:`sparsegrid.functional.full_conv` (SCN's FullConvolution),
    which this calls.

    Every active input site ``q`` activates all ``K = prod(filter_size)`` output sites
    ``p = q * stride + delta_k`` (``delta_k`` the filter box's offsets, row-major, last
    axis fastest), and ``out[p] = bias + sum over (q, k) with q * stride + delta_k = p of
    in[q] @ weight[k]``: the dense transposed convolution of the zero-filled input,
    restricted to those sites (with ``stride < filter_size`` children of neighbouring
    sites overlap and their contributions add).

    Parameters
    ----------
    x : SparseTensor (N, Cin)
    weight : (K, Cin, Cout) or grouped (K, G, Cin/G, Cout/G)
    bias : (Cout,) or None
    filter_size, stride : int or D ints

    Returns
    -------
    SparseTensor
        Spatial size ``(in - 1) * stride + filter_size``, rows sorted by (batch, x1, ...,
        xD), on a new Grid (its sites are not derived from the input's by a strided op).

    Unlike MinkowskiEngine, coordinates are not kept at full resolution with a tensor
    stride: the output lives on the finer grid itself, as every sparsegrid tensor does
    (docs/pointcloud.md).
    """
    return full_conv(x, weight, bias, filter_size, stride)


def _mask(x, keep):
    """``keep`` as a boolean array (N,) on ``x``'s device; TypeError / ValueError."""
    n = x.n_active
    data = data_of(keep)
    if isinstance(data, (list, tuple)):
        data = np.asarray(data)
    if not (isinstance(data, np.ndarray) or backend.is_cupy_array(data)):
        raise TypeError(f"keep must be a boolean (or 0/1 integer) array of shape ({n},); got "
                        f"{type(keep).__name__}")
    backend.require_same_device("keep", data, "the input tensor", x.indices,
                                " (move the mask with sparsegrid.backend.to_device)")
    if data.dtype.kind not in "biu":
        raise TypeError(f"keep must be a boolean (or 0/1 integer) array of shape ({n},); got "
                        f"dtype {data.dtype}")
    if data.shape != (n,):
        raise ValueError(f"keep must have shape ({n},), one entry per site of the input; "
                         f"got shape {data.shape}")
    if data.dtype.kind != "b":
        if n and not bool(((data == 0) | (data == 1)).all()):
            raise ValueError("keep must hold only 0 and 1 when it is an integer array (or be "
                             "boolean); got other values")
        data = data != 0
    return data


def prune(x, keep):
    """The sites of ``x`` where ``keep`` is true (MinkowskiPruning).

    Parameters
    ----------
    x : SparseTensor (N, C)
    keep : boolean (N,) array (NumPy for a CPU tensor, CuPy on its GPU), an integer
        array of 0 and 1, a list of bools, or an autodiff Tensor around one

    Returns
    -------
    SparseTensor (M, C)
        The kept rows in their relative order (a sorted input, as every op that creates
        sites returns, gives a sorted output), with their features gathered
        differentiably (the gradient of a pruned row is zero), on a new Grid with the same
        spatial shape and batch size. ``M`` may be 0.

    Raises TypeError for a mask that is not an array of booleans or integers, or is on
    another device, and ValueError for a wrong shape or integer values other than 0 / 1.
    The one implementation is :func:`sparsegrid.functional.select` (SCN's Sparsify).
    """
    _require_tensor(x)
    return select(x, _mask(x, keep))


def _tensors(op, tensors):
    """``op(a, b, ...)`` or ``op([a, b, ...])``: the SparseTensors as a list, checked to
    share dtype and device; TypeError otherwise."""
    if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)):
        tensors = tuple(tensors[0])
    if not tensors:
        raise TypeError(f"{op} needs at least one SparseTensor; got none")
    for i, t in enumerate(tensors):
        if not isinstance(t, SparseTensor):
            raise TypeError(f"{op}: input {i} must be a SparseTensor; got {type(t).__name__}")
    first = tensors[0]
    for i, t in enumerate(tensors[1:], 1):
        if t.dtype != first.dtype:
            raise TypeError(f"{op} needs tensors of one dtype; input {i} has {t.dtype} "
                            f"features, input 0 has {first.dtype}")
        backend.require_same_device(f"{op} input {i}", t.indices, "input 0", first.indices)
    return list(tensors)


def union(*tensors):
    """The union of the site sets of tensors, features summed where sites overlap
    (MinkowskiUnion).

    ``union(a, b, ...)`` or ``union([a, b, ...])``. The tensors must share spatial shape,
    batch size, channel count, dtype and device; their sites may differ freely.

    Returns
    -------
    SparseTensor
        One row per site active in any input, sorted by (batch, x1, ..., xD), holding the
        sum of the inputs' features there (on the zero-filled grid: the dense sum, at the
        union of the active sites). Differentiable: each input's gradient is the output's
        gradient at its sites. On a new Grid -- except when every input is on the very
        same sorted site set (one ``Sites`` object), where the result keeps those sites
        and that Grid (the sum of tensors on one site set, as ``nn.AddTable``).

    Overlapping rows are summed in input order (``a``'s row, then ``b``'s, ...), by the
    backend's deterministic ``segment_reduce``: the same bits run to run.
    """
    tensors = _tensors("union", tensors)
    first = tensors[0]
    for i, t in enumerate(tensors[1:], 1):
        for what in ("spatial_shape", "batch_size", "n_channels"):
            if getattr(t, what) != getattr(first, what):
                raise ValueError(f"union needs tensors of one {what}; input {i} has "
                                 f"{getattr(t, what)}, input 0 has {getattr(first, what)}")
    features = tuple(t.features for t in tensors)
    values = [data_of(f) for f in features]
    xp = backend.array_namespace(first.indices)
    if all(t.sites is first.sites for t in tensors) and first.sites.order is None:
        out = values[0].copy()
        for v in values[1:]:
            out += v
        return first.with_features(_differentiable(out, features,
                                                   lambda g: [g] * len(features)))
    indices = xp.concatenate([t.indices for t in tensors], axis=0)
    keys, _ = pack_keys(indices, first.spatial_shape, first.batch_size)
    kernels = first.kernels
    unique_keys, first_rows, inverse = kernels.unique_inverse(keys)
    n_sites = len(unique_keys)
    out, _ = kernels.segment_reduce(xp.concatenate(values, axis=0), inverse, n_sites, "sum")
    bounds = np.cumsum([0] + [t.n_active for t in tensors]).tolist()
    parts = [inverse[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    out = _differentiable(out, features, lambda g: [g[part] for part in parts])
    sites = Sites(xp.ascontiguousarray(indices.take(first_rows, axis=0)), first.spatial_shape,
                  first.batch_size)
    return SparseTensor._on(out, sites, Grid())


def cat(*tensors):
    """Channel concatenation of tensors on identical sites (MinkowskiEngine's ``cat``).

    ``cat(a, b, ...)`` or ``cat([a, b, ...])``. Required: the same sites **in the same row
    order** -- one ``Sites`` object, or equal indices (same rows, same order), spatial
    shape and batch size (a tensor rebuilt from the same indices) -- and one dtype and
    device. Anything else (the same site set in another order included) is a ValueError:
    rows are matched by position, as ``nn.JoinTable`` does. For tensors on different
    sites, :func:`union` of zero-padded channels is the sparse alternative.

    Returns a tensor on the first input's sites and Grid (so its cached rulebooks are
    reused) with ``sum(C_i)`` channels, input 0's first; differentiable (each input's
    gradient is its block of the output gradient's channels).
    """
    tensors = _tensors("cat", tensors)
    first = tensors[0]
    for i, t in enumerate(tensors[1:], 1):
        if not _same_sites(t.sites, first.sites):
            raise ValueError(
                f"cat needs tensors on the same sites in the same row order; input {i} "
                f"({t.n_active} sites, spatial_shape {t.spatial_shape}, batch_size "
                f"{t.batch_size}) differs from input 0 ({first.n_active} sites, "
                f"spatial_shape {first.spatial_shape}, batch_size {first.batch_size})"
                "; use union for tensors on different sites")
    features = tuple(t.features for t in tensors)
    values = [data_of(f) for f in features]
    xp = backend.array_namespace(first.indices)
    bounds = np.cumsum([v.shape[1] for v in values]).tolist()

    def vjp(g):
        starts = [0] + bounds[:-1]
        return [xp.ascontiguousarray(g[:, a:b]) for a, b in zip(starts, bounds)]

    return first.with_features(_differentiable(xp.concatenate(values, axis=1), features, vjp))


__all__ = ["cat", "generative_transposed_conv", "prune", "union"]

