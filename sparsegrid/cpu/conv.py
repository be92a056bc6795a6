"""Gather-GEMM-scatter convolution on NumPy (forward and backward).

For each kernel offset k: ``out[out_idx] += features[in_idx] @ W[k]``. Within one offset the
output rows are unique (the rulebook guarantees it), so the fancy-indexed ``+=`` is exact
and no ``np.add.at`` is needed. Offsets are visited in order, so results are bit-identical
run to run and for any BLAS thread count (BLAS splits rows and columns, never the sum).

Weights are ``(K, Cin, Cout)`` or, with groups, ``(K, G, Cin/G, Cout/G)``: input channel
block g feeds output channel block g.
"""

from __future__ import annotations

import numpy as np


def _matmul(x, w):
    """x (n, Cin) times one offset's weight: (Cin, Cout) or grouped (G, Cin/G, Cout/G)."""
    if w.ndim == 2:
        return x @ w
    groups, cin_g, _ = w.shape
    xg = x.reshape(len(x), groups, cin_g).transpose(1, 0, 2)
    return np.matmul(xg, w).transpose(1, 0, 2).reshape(len(x), -1)


def _output_channels(weight):
    return weight.shape[-1] * (weight.shape[1] if weight.ndim == 4 else 1)


def _transpose_weight(weight):
    return np.swapaxes(weight, -1, -2)


def conv_forward(features, weight, in_idx, out_idx, offset_ptr, n_out, bias=None,
                 identity_offset=-1):
    """Sparse convolution over a rulebook.

    Parameters
    ----------
    features : (N_in, Cin) float32/float64
    weight : (K, Cin, Cout) or (K, G, Cin/G, Cout/G), same dtype as ``features``
    in_idx, out_idx : int32 (P,); offset_ptr : int64 (K + 1,)
    n_out : int
    bias : (Cout,) or None
    identity_offset : int
        An offset whose pairs are (r, r) for every row (submanifold centre): its product
        is computed without gather or scatter.

    Returns
    -------
    (n_out, Cout) array of ``features.dtype``
    """
    n_offsets = len(offset_ptr) - 1
    cout = _output_channels(weight)
    if identity_offset >= 0:
        out = _matmul(features, weight[identity_offset])
        if bias is not None:
            out += bias
    elif bias is not None:
        out = np.empty((n_out, cout), features.dtype)
        out[...] = bias
    else:
        out = np.zeros((n_out, cout), features.dtype)
    for k in range(n_offsets):
        start, stop = offset_ptr[k], offset_ptr[k + 1]
        if start == stop or k == identity_offset:
            continue
        rows_out = out_idx[start:stop]
        out[rows_out] += _matmul(features.take(in_idx[start:stop], axis=0), weight[k])
    return out


def conv_backward(grad_out, features, weight, in_idx, out_idx, offset_ptr, identity_offset=-1,
                  need_features=True, need_weight=True):
    """Gradients of :func:`conv_forward` with respect to features and weight.

    The feature gradient is the convolution of ``grad_out`` over the transposed rulebook
    with the transposed weights; the weight gradient of offset k is
    ``features[in_idx_k].T @ grad_out[out_idx_k]``. The bias gradient is
    ``grad_out.sum(0)`` and is left to the caller.

    Returns
    -------
    grad_features : (N_in, Cin) or None
    grad_weight : weight-shaped or None
    """
    grad_features = grad_weight = None
    if need_features:
        grad_features = conv_forward(grad_out, _transpose_weight(weight), out_idx, in_idx,
                                     offset_ptr, len(features), identity_offset=identity_offset)
    if need_weight:
        grad_weight = np.zeros_like(weight)
        for k in range(len(offset_ptr) - 1):
            start, stop = offset_ptr[k], offset_ptr[k + 1]
            if start == stop:
                continue
            if k == identity_offset:
                x, g = features, grad_out
            else:
                x = features.take(in_idx[start:stop], axis=0)
                g = grad_out.take(out_idx[start:stop], axis=0)
            if weight.ndim == 3:
                grad_weight[k] = x.T @ g
            else:
                groups, cin_g, cout_g = weight.shape[1:]
                xg = x.reshape(len(x), groups, cin_g).transpose(1, 2, 0)
                gg = g.reshape(len(g), groups, cout_g).transpose(1, 0, 2)
                grad_weight[k] = np.matmul(xg, gg)
    return grad_features, grad_weight


def rule_sum(features, in_idx, out_idx, offset_ptr, n_out):
    """``out[out_idx] += features[in_idx]`` offset by offset (unit-weight convolution).

    Sum pooling, unpooling and their gradients are this with the rulebook or its transpose.
    """
    out = np.zeros((n_out, features.shape[1]), features.dtype)
    for k in range(len(offset_ptr) - 1):
        start, stop = offset_ptr[k], offset_ptr[k + 1]
        if start != stop:
            out[out_idx[start:stop]] += features.take(in_idx[start:stop], axis=0)
    return out
