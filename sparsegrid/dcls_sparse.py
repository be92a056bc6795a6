"""Submanifold DCLS: a sparse submanifold convolution whose taps sit at learnable,
fractional positions inside a large dilated kernel.

DCLS (:mod:`sparsegrid.dcls`) builds a dense kernel ``(Cout, Cin/groups, *dks)`` from a few
taps per filter -- weight ``(Cout, Cin/g, KC)``, positions ``P`` and spreads ``SIG``
``(D, Cout, Cin/g, KC)`` -- by interpolation. On a sparse tensor most of that dilated
kernel is zero: a bilinear tap (``'v0'``, ``'v1'``) touches only the ``2^D`` integer cells
around its position. :func:`submanifold_dcls` therefore

1. decides on the host, from ``P`` (and ``SIG`` for ``'max'``), which integer cells of the
   dilated kernel carry a weight for some (Cout, Cin) filter (:func:`touched_cells`;
   reading ``P`` is one device-to-host copy on a GPU);
2. constructs the dense kernel with :func:`sparsegrid.dcls.construct_kernel`
   (differentiable in weight, P and SIG);
3. takes the weight slices of the touched cells only, in sparsegrid's ``(K, Cin, Cout)``
   (or grouped ``(K, G, Cin/G, Cout/G)``) layout, and runs a submanifold convolution
   over exactly those offsets ``cell - dks // 2``: a rulebook over an explicit offset
   list (:meth:`sparsegrid.grid.Grid.lattice`), cached by the tensor's Grid per offset
   list, so calls with unchanged offsets reuse it.

The result is exactly the dense DCLS convolution (:func:`sparsegrid.dcls.dcls_conv`,
padding ``dks // 2``) on the zero-filled grid read at the active sites, for odd and even
dilated sizes alike (the kernel's centre is cell ``dks // 2``, DCLS's convention; for an
even size the window of axis ``d`` is ``[o - n/2, o + n/2 - 1]``, as
:func:`sparsegrid.functional.submanifold_conv`'s even filters). The gradients flow
through the convolution to the constructed kernel's touched cells and back through
``construct_kernel``; the untouched cells are zero and their derivatives with respect to
weight, P and SIG are zero too (they lie outside every tap's support), so nothing is lost.

Versions: ``'v0'`` / ``'v1'`` (bilinear) touch at most ``2^D`` cells per tap -- few taps,
few offsets, a cheap rulebook. ``'max'`` touches the cells within its half-width
``|SIG| + 1`` of each tap (computed from SIG). ``'gauss'`` has unbounded support: every
cell of the dilated kernel is touched, so it costs what a submanifold convolution with the
full ``prod(dks)``-offset filter costs (allowed, but no saving). The touched set is the
union over every (Cout, Cin) filter's taps: with many channels and independently placed
taps it approaches the whole kernel.
"""

from __future__ import annotations

import math

import numpy as np

from . import backend, dcls
from .autodiff import ops
from .autodiff.core import Tensor, data_of, record
from .tensor import SparseTensor

__all__ = ["submanifold_dcls", "touched_cells", "touched_offsets"]


def touched_cells(P, SIG, dilated_kernel_size, version="v1"):
    """The flat (row-major) indices, sorted, of the dilated kernel's cells that some tap
    touches: an int64 NumPy array (a host decision; a GPU ``P`` is copied to the host).

    ``'v0'`` / ``'v1'``: per tap and axis the cells ``floor(q)`` and ``floor(q) + 1``
    (``q = P + n // 2``), those inside the kernel -- a superset of the nonzero cells that
    also holds every cell with a nonzero derivative (``'v0'``'s right-hand derivative at
    integer positions included). ``'max'``: the cells with ``|i - q| < |SIG| + 1`` (outside
    them the value and every derivative are 0). ``'gauss'``: every cell.
    """
    where = "touched_cells"
    dcls._version(version, where)
    p = backend.to_numpy(data_of(P))
    if p.ndim != 4:
        raise ValueError(f"{where}: P must be (ndim, Cout, Cin/groups, kernel_count); got "
                         f"shape {tuple(p.shape)}")
    sizes = dcls._kernel_size(dilated_kernel_size, p.shape[0], where)
    total = math.prod(sizes)
    if version == "gauss":
        return np.arange(total, dtype=np.int64)
    d = len(sizes)
    # the tap positions in P's own dtype, as construct_kernel computes them (a float32 P
    # just below an integer rounds onto it there), then widened
    q = (p.reshape(d, -1) + np.array([n // 2 for n in sizes], p.dtype)[:, None]).astype(
        np.float64)
    if not np.isfinite(q).all():
        raise ValueError(f"{where}: P holds NaN or inf")
    if version == "max":
        if SIG is None:
            raise ValueError(f"{where}: version 'max' needs SIG")
        half = np.abs(backend.to_numpy(data_of(SIG)).reshape(d, -1).astype(np.float64)) + \
            dcls.MAX_SIG_OFFSET
        lo = np.floor(q - half) + 1              # the cells with |i - q| < half: outside
        hi = np.ceil(q + half) - 1               # them value and derivatives are 0
    else:
        lo = np.floor(q)
        hi = lo + 1
    limit = np.array(sizes, np.float64)[:, None] - 1
    lo = np.clip(lo, 0, None)
    hi = np.clip(hi, None, limit)
    inside = (lo <= hi).all(axis=0)                   # a tap wholly outside touches nothing
    lo, hi = lo[:, inside].astype(np.int64), hi[:, inside].astype(np.int64)
    # the union of the taps' boxes [lo, hi]: a D-dimensional difference array, then one
    # cumulative sum per axis
    shape = tuple(n + 1 for n in sizes)
    marks = np.zeros(math.prod(shape), np.int64)
    for corner in np.ndindex(*(2,) * d):
        index = tuple(np.where(c, hi[a] + 1, lo[a]) for a, c in enumerate(corner))
        flat = np.ravel_multi_index(index, shape)
        marks += (-1) ** sum(corner) * np.bincount(flat, minlength=marks.size)
    marks = marks.reshape(shape)
    for axis in range(d):
        marks = np.cumsum(marks, axis=axis)
    covered = marks[tuple(slice(0, n) for n in sizes)] > 0
    return np.flatnonzero(covered.reshape(-1)).astype(np.int64)


def touched_offsets(P, SIG, dilated_kernel_size, version="v1"):
    """The touched cells of :func:`touched_cells` as integer offsets ``(K, D)`` relative to
    the kernel centre ``dilated_kernel_size // 2`` (int64, row-major order)."""
    p = data_of(P)
    sizes = dcls._kernel_size(dilated_kernel_size,
                              int(p.shape[0]) if getattr(p, "ndim", 0) == 4 else 1,
                              "touched_offsets")
    cells = touched_cells(P, SIG, sizes, version)
    return _offsets_of(cells, sizes)


def _offsets_of(cells, sizes):
    coords = np.stack(np.unravel_index(cells, sizes), axis=1).astype(np.int64)
    return coords - np.array([n // 2 for n in sizes], np.int64)


def submanifold_dcls(x, weight, P, SIG, bias, dilated_kernel_size, version="v1", groups=1,
                     check_range=True):
    """Submanifold DCLS convolution of a SparseTensor.

    ``out[o] = bias + sum_cells in[o + cell - dks // 2] @ K[:, :, cell]^T`` over the active
    neighbours, ``K = construct_kernel(weight, P, SIG, dks, version)``, summed over the
    touched cells only (the others are zero). Output sites and rows are the input's.

    Parameters
    ----------
    x : SparseTensor (N, Cin), D spatial axes; features float32 / float64 (a Tensor for
        gradients).
    weight : array or Tensor ``(Cout, Cin/groups, KC)``, the features' dtype and device.
    P : array or Tensor ``(D, Cout, Cin/groups, KC)``: tap offsets from the centre cell.
    SIG : array or Tensor shaped as P, or None (``'v0'`` / ``'v1'``; required by
        ``'gauss'`` / ``'max'``).
    bias : array or Tensor ``(Cout,)`` or None.
    dilated_kernel_size : int or D ints >= 1 (odd or even; centre cell ``n // 2``).
    version : 'v1' (default), 'v0', 'max' or 'gauss' (every cell touched: no saving).
    groups : int dividing Cin and Cout.
    check_range : as :func:`sparsegrid.dcls.construct_kernel`.

    Returns
    -------
    SparseTensor (N, Cout) on the input's sites and Grid.

    Raises
    ------
    TypeError / ValueError: x not a SparseTensor, P's D not the tensor's dimension, channel
    or group counts that do not match, and every error of ``construct_kernel`` (shapes,
    dtypes, devices, unknown version, P outside the dilated kernel).
    """
    where = "submanifold_dcls"
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{where}: x must be a SparseTensor; got {type(x).__name__}")
    w, p = data_of(weight), data_of(P)
    for name, value in (("weight", w), ("P", p)):
        if not hasattr(value, "ndim"):
            raise TypeError(f"{where}: {name} must be an array or an autodiff Tensor; got "
                            f"{type(value).__name__}")
    if p.ndim != 4 or int(p.shape[0]) != x.dimension:
        raise ValueError(f"{where}: P must be (D, Cout, Cin/groups, kernel_count) with D = "
                         f"{x.dimension} (the tensor's spatial dimension); got shape "
                         f"{tuple(p.shape)}")
    if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{where}: groups must be a positive int; got {groups!r}")
    groups = int(groups)
    if w.ndim != 3:
        raise ValueError(f"{where}: weight must be (Cout, Cin/groups, kernel_count); got shape "
                         f"{tuple(w.shape)}")
    cout, cin_g = int(w.shape[0]), int(w.shape[1])
    if cin_g * groups != x.n_channels or cout % groups:
        raise ValueError(f"{where}: weight {tuple(w.shape)} with groups={groups} expects "
                         f"{cin_g * groups} input channels (and Cout divisible by groups); "
                         f"the input has {x.n_channels}")
    if w.dtype != x.dtype:
        raise TypeError(f"{where}: weight's dtype {w.dtype} differs from the features' "
                        f"{x.dtype}; convert one (astype, or module.float() / .double())")
    backend.require_same_device("weight", w, "the input tensor", x.indices)
    sizes = dcls._kernel_size(dilated_kernel_size, x.dimension, where)
    # the dense kernel first: construct_kernel validates shapes, dtypes, version, range
    kernel = dcls.construct_kernel(weight, P, SIG, sizes, version, check_range)
    if bias is not None:
        b = data_of(bias)
        if getattr(b, "shape", None) != (cout,):
            raise ValueError(f"{where}: bias must have shape ({cout},); got "
                             f"{getattr(b, 'shape', type(bias).__name__)}")
    cells = touched_cells(P, SIG, sizes, version)
    offsets = _offsets_of(cells, sizes)
    xp = backend.array_namespace(w)
    total = math.prod(sizes)
    if len(cells) == 0:                 # no tap inside the kernel: only the bias
        out = _zeros_like_rows(x, cout)
        if bias is not None:
            out = out + (bias if isinstance(bias, Tensor) else data_of(bias))
        return x.with_features(out)
    # (Cout, Cin/g, *dks) -> (prod dks, Cin/g, Cout) (grouped: (prod dks, G, Cin/g,
    # Cout/g)) -> the touched rows, C-contiguous
    if groups == 1:
        shape, axes = (cout, cin_g, total), (2, 1, 0)
    else:
        shape, axes = (groups, cout // groups, cin_g, total), (3, 0, 2, 1)
    rows = None if len(cells) == total else xp.asarray(cells)
    if isinstance(kernel, Tensor):
        flat = ops.transpose(ops.reshape(kernel, shape), axes)
        sliced = _contiguous(flat if rows is None else ops.take_rows(flat, rows))
    else:
        flat = kernel.reshape(shape).transpose(axes)
        sliced = xp.ascontiguousarray(flat if rows is None else flat[rows])
    rulebook = x.grid.lattice(x.sites, offsets, "dcls", op=where, keep_latest=True)
    from .functional import _convolve
    return x.with_features(_convolve(x, sliced, bias, rulebook))


def _contiguous(t):
    """A Tensor whose data is C-contiguous (the convolution kernels' weight layout)."""
    xp = backend.array_namespace(t.data)
    return record(xp.ascontiguousarray(t.data), (t,), lambda g: (g,))


def _zeros_like_rows(x, cout):
    xp = backend.array_namespace(x.indices)
    return xp.zeros((x.n_active, cout), x.dtype)
