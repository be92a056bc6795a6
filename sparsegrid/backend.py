"""Which array library an array belongs to, and the kernels that run on it.

Never imports CuPy: an array is a CuPy array only if CuPy is already in ``sys.modules``
(the user imported it) and the array is one of its ndarrays.
"""

from __future__ import annotations

import sys

import numpy as np


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
    """The kernel module (``sparsegrid.cpu`` or ``sparsegrid.cuda``) for these arrays."""
    if array_namespace(*arrays) is np:
        from . import cpu
        return cpu
    raise NotImplementedError("CuPy arrays were given, but sparsegrid's CUDA backend is not "
                              "available yet; pass NumPy arrays (cupy.asnumpy(x))")


def to_numpy(array):
    """A NumPy view or copy of a NumPy/CuPy array (or anything ``np.asarray`` takes)."""
    if is_cupy_array(array):
        return array.get()
    return np.asarray(array)
