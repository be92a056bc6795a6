"""SCN's tensor helpers: ``append_tensors`` and ``compare_sparse``."""

from __future__ import annotations

import numpy as np

from .. import backend

from ..autodiff import ops
from ..coords import pack_keys
from ..tensor import SparseTensor
from .layers import _tensor_features


def append_tensors(tensors):
    """Concatenate batches: the samples of ``tensors[1]`` follow those of ``tensors[0]``...

    All tensors must share the spatial shape and channel count. The result lives on a new
    grid; its features are differentiable with respect to every input's.
    """
    tensors = list(tensors)
    if not tensors or not all(isinstance(t, SparseTensor) for t in tensors):
        raise TypeError("append_tensors expects a non-empty list of SparseTensors")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if t.spatial_shape != first.spatial_shape or t.n_channels != first.n_channels:
            raise ValueError(f"append_tensors: tensor {i} has spatial shape "
                             f"{t.spatial_shape} and {t.n_channels} channels; tensor 0 has "
                             f"{first.spatial_shape} and {first.n_channels}")
        if t.dtype != first.dtype:
            raise TypeError(f"append_tensors: tensor {i} has {t.dtype} features; tensor 0 "
                            f"has {first.dtype}")
    offsets = np.cumsum([0] + [t.batch_size for t in tensors])
    xp = backend.array_namespace(*(t.indices for t in tensors))
    indices = xp.concatenate([t.indices + xp.asarray([offsets[i]] + [0] * t.dimension,
                                                     dtype=np.int32)
                              for i, t in enumerate(tensors)]).astype(np.int32)
    joined = ops.concatenate([_tensor_features(t).features for t in tensors], axis=0)
    return SparseTensor(joined, indices, first.spatial_shape, int(offsets[-1]))


def compare_sparse(x, y):
    """SCN's ``compare_sparse``: the squared difference of two sparse tensors over the
    union of their sites (a site missing from one counts as zeros there), divided by the
    number of sites in the union. Differentiable in both tensors' features."""
    if not isinstance(x, SparseTensor) or not isinstance(y, SparseTensor):
        raise TypeError("compare_sparse expects two SparseTensors")
    if x.spatial_shape != y.spatial_shape or x.n_channels != y.n_channels:
        raise ValueError(f"compare_sparse: shapes differ: {x.spatial_shape} x {x.n_channels} "
                         f"channels vs {y.spatial_shape} x {y.n_channels}")
    if x.dtype != y.dtype:
        raise TypeError(f"compare_sparse: dtypes differ: x has {x.dtype} features, y has "
                        f"{y.dtype}")
    batch = max(x.batch_size, y.batch_size)
    kx, _ = pack_keys(x.indices, x.spatial_shape, batch)
    ky, _ = pack_keys(y.indices, y.spatial_shape, batch)
    xp = backend.array_namespace(kx, ky)
    union = xp.unique(xp.concatenate([kx, ky]))
    n = len(union)
    diff = ops.sub(ops.put_rows(x.features, xp.searchsorted(union, kx), n),   # a Tensor
                   ops.put_rows(y.features, xp.searchsorted(union, ky), n))
    return ops.mul(ops.sum(ops.mul(diff, diff)), 1.0 / max(n, 1))


__all__ = ["append_tensors", "compare_sparse"]
