"""Which array library an array belongs to, and the kernel set that runs on it.

The kernel contract (DESIGN.md, docs/architecture.md) is :data:`KERNEL_CONTRACT`: the names
every backend module (``sparsegrid.cpu`` today, ``sparsegrid.cuda`` next) provides with the
same signatures and results. Everything above the backends calls kernels only through
:func:`kernels`, chosen by one rule: the array library of the tensor's arrays (indices and
features must agree; a SparseTensor checks that once, when it is built).

Never imports CuPy: an array is a CuPy array only if CuPy is already in ``sys.modules``
(the user imported it) and the array is one of its ndarrays.
"""

from __future__ import annotations

import sys

import numpy as np

#: The kernel contract: every backend module (``sparsegrid.cpu``, ``sparsegrid.cuda``)
#: defines each of these functions with exactly this signature. Arrays belong to the
#: backend's library; ``rulebook`` is a :class:`sparsegrid.Rulebook` whose arrays do too.
#: Whatever a backend precomputes for speed is private to it: ``prepare_conv`` caches it on
#: the rulebook, and the kernels call it themselves.
KERNEL_SIGNATURES = {
    # coordinate index
    "build_index": "(keys)",                                   # -> order | None
    "first_duplicate": "(sorted_keys, order)",                 # -> (row, row) | None
    "query_index": "(sorted_keys, order, queries)",            # -> int32 rows, -1 absent
    "unique_inverse": "(keys)",                  # -> (unique_keys, first_rows, inverse)
    # rulebook construction: (in_idx, out_idx, offset_ptr, identity_offset | out_indices)
    "submanifold_rules": "(indices, order, spatial_shape, batch_size, filter_size, dilation)",
    "offset_rules": "(indices, order, spatial_shape, batch_size, offsets)",
    "strided_rules": "(indices, spatial_shape, batch_size, filter_size, stride, out_shape)",
    "window_rules": "(indices, spatial_shape, batch_size, filter_size, starts, out_shape)",
    "full_rules": "(indices, spatial_shape, batch_size, filter_size, stride, out_shape)",
    # convolution
    "prepare_conv": "(rulebook)",                                        # -> opaque plan
    "conv_forward": "(features, weight, rulebook, bias=None)",           # -> (n_out, Cout)
    "conv_backward": "(grad_out, features, weight, rulebook, need_features=True, "
                     "need_weight=True)",             # -> (grad_features, grad_weight)
    "rows_product": "(x, g)",                        # -> x.T @ g, summed deterministically
    # pooling
    "rule_sum": "(features, rulebook)",                                  # -> (n_out, C)
    "max_pool_forward": "(features, rulebook)",                          # -> (out, argmax)
    "max_pool_backward": "(grad_out, argmax, n_in)",                     # -> (n_in, C)
    # normalisation
    "batch_norm_statistics": "(x)",                                      # -> (mean, var)
    "batch_norm_forward": "(x, mean, var, weight, bias, eps, leakiness)",
    "batch_norm_backward": "(grad_out, x, mean, var, weight, bias, eps, leakiness, "
                           "training, out=None)",       # -> (grad_x, grad_w, grad_b)
    # segment reductions (input layers, voxelization, global pooling)
    "segment_reduce": "(values, segment_ids, n_segments, mode)",         # -> (out, chosen)
    "segment_reduce_backward": "(grad_out, segment_ids, n_segments, mode, chosen, n_rows)",
    # dense conversion
    "scatter_to_dense": "(features, indices, batch_size, spatial_shape)",  # -> (B, C, *S)
    "gather_from_dense": "(dense, indices)",                             # -> (N, C)
    "dense_active_sites": "(dense)",                                     # -> (N, 1 + D)
}

#: The names of the kernel contract, in one place.
KERNEL_CONTRACT = tuple(KERNEL_SIGNATURES)


def is_cupy_array(array):
    """True for a ``cupy.ndarray``, without importing CuPy."""
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(array, cupy.ndarray)


def array_namespace(*arrays):
    """``numpy`` or ``cupy``, whichever the (non-None) arrays belong to; mixing raises."""
    kinds = {is_cupy_array(a) for a in arrays if a is not None}
    if len(kinds) > 1:
        raise TypeError("arrays from different libraries (NumPy and CuPy) were mixed; move them "
                        "to one device first")
    return sys.modules["cupy"] if kinds == {True} else np


def kernels(*arrays):
    """The kernel module (``sparsegrid.cpu`` or ``sparsegrid.cuda``) for these arrays.

    The one rule that picks a backend: the array library of the arrays (NumPy -> cpu,
    CuPy -> cuda); arrays of different libraries raise TypeError.
    """
    if array_namespace(*arrays) is np:
        from . import cpu
        return cpu
    raise NotImplementedError("CuPy arrays were given, but sparsegrid's CUDA backend is not "
                              "available yet; pass NumPy arrays (cupy.asnumpy(x))")


def available_backends():
    """Names of the kernel sets usable in this process: ``['cpu']``, plus ``'cuda'`` when
    the CUDA backend is installed and a GPU is visible."""
    return ["cpu"]


def backend_module(name):
    """The kernel module called ``name`` (``'cpu'`` or ``'cuda'``)."""
    if name == "cpu":
        from . import cpu
        return cpu
    raise ValueError(f"backend must be one of {available_backends()}; got {name!r}")


def to_numpy(array):
    """A NumPy view or copy of a NumPy/CuPy array (or anything ``np.asarray`` takes)."""
    if is_cupy_array(array):
        return array.get()
    return np.asarray(array)
