"""Sparse <-> dense conversion on NumPy. Dense layout: (B, C, S1, ..., SD)."""

from __future__ import annotations

import numpy as np


def _flat_positions(indices, spatial_shape):
    coords = indices[:, 1:].astype(np.int64)
    return np.ravel_multi_index(tuple(coords.T), spatial_shape) if len(coords) else \
        np.zeros(0, np.int64)


def scatter_to_dense(features, indices, batch_size, spatial_shape):
    """Dense (B, C, *spatial_shape) array, zero where no site is active."""
    channels = features.shape[1]
    dense = np.zeros((batch_size, channels, int(np.prod(spatial_shape, dtype=np.int64))),
                     features.dtype)
    # Mixed advanced/basic indexing puts the site axis first: shape (N, C), as features.
    dense[indices[:, 0], :, _flat_positions(indices, spatial_shape)] = features
    return dense.reshape((batch_size, channels, *spatial_shape))


def gather_from_dense(dense, indices):
    """Rows (N, C) of a dense (B, C, *S) array at the given sites."""
    batch_size, channels = dense.shape[:2]
    flat = dense.reshape(batch_size, channels, int(np.prod(dense.shape[2:], dtype=np.int64)))
    return flat[indices[:, 0], :, _flat_positions(indices, dense.shape[2:])]


def dense_active_sites(dense):
    """Sites where any channel is non-zero, sorted (batch, x1, ..., xD): int32 (N, 1 + D)."""
    active = np.any(dense != 0, axis=1)
    return np.argwhere(active).astype(np.int32)
