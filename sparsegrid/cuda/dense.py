"""Sparse <-> dense conversion on the GPU. Dense layout: (B, C, S1, ..., SD)."""

from __future__ import annotations

import math

import numpy as np

from . import _compile
from ._runtime import cp


def _sites(indices, spatial_shape):
    """Per site ``b * S + flat position`` (int64), S the spatial volume."""
    site = indices[:, 0].astype(np.int64)
    for d, extent in enumerate(spatial_shape):
        site = site * int(extent) + indices[:, d + 1].astype(np.int64)
    return cp.ascontiguousarray(site)


def scatter_to_dense(features, indices, batch_size, spatial_shape):
    """Dense (B, C, *spatial_shape), zero where no site is active."""
    spatial_shape = tuple(int(s) for s in spatial_shape)
    channels = features.shape[1]
    volume = math.prod(spatial_shape)
    dense = cp.zeros((int(batch_size), channels, *spatial_shape), dtype=features.dtype)
    _compile.launch("dense.cu", _compile.typed("scatter_dense", features.dtype),
                    len(indices) * channels, cp.ascontiguousarray(features),
                    _sites(indices, spatial_shape), dense, np.int64(len(indices)),
                    np.int64(channels), np.int64(volume))
    return dense


def gather_from_dense(dense, indices):
    """Rows (N, C) of a dense (B, C, *S) array at the given sites."""
    spatial_shape = tuple(int(s) for s in dense.shape[2:])
    channels = dense.shape[1]
    out = cp.empty((len(indices), channels), dtype=dense.dtype)
    _compile.launch("dense.cu", _compile.typed("gather_dense", dense.dtype),
                    len(indices) * channels, cp.ascontiguousarray(dense),
                    _sites(indices, spatial_shape), out, np.int64(len(indices)),
                    np.int64(channels), np.int64(math.prod(spatial_shape)))
    return out


def dense_active_sites(dense):
    """Sites where any channel is non-zero, sorted (batch, x1, ..., xD): int32 (N, 1 + D)."""
    active = cp.any(dense != 0, axis=1)
    return cp.argwhere(active).astype(np.int32)
