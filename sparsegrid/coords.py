"""Integer coordinates: validation, packing into int64 keys, kernel offsets.

Conventions (DESIGN.md): ``indices`` is an int32 array ``(N, 1 + D)`` whose column 0 is
the batch index and columns 1..D the spatial coordinates, each in ``[0, spatial_shape[d])``.
Kernel offsets run row-major over the filter box with the last spatial axis fastest.
"""

from __future__ import annotations

import math
import numbers
import operator
import os

import numpy as np

from . import backend

MAX_DIMENSIONS = 10
_INT64_LIMIT = 2**63 - 1
_INT32_LIMIT = 2**31 - 1
_GIB = 2**30


def _physical_memory():
    """Total physical memory in bytes (os.sysconf, cheap), or None where it is unknown."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
        return None
    if pages <= 0 or page_size <= 0:  # pragma: no cover
        return None
    return int(pages) * int(page_size)


def _default_allocation_limit():
    physical = _physical_memory()
    return 16 * _GIB if physical is None else min(16 * _GIB, physical)


#: The largest single allocation (in bytes) that an op may make before it refuses with a
#: MemoryError naming the op, the shape and the bytes (see :func:`check_allocation`).
#: Ops estimate their big arrays up front -- a dense output of ``batch_size *
#: prod(spatial_shape)`` cells, per-sample statistics of ``batch_size`` rows, a rulebook of
#: up to ``K * N`` pairs -- and refuse *before* allocating or building anything, instead
#: of swapping, being killed by the OOM killer, or raising NumPy's anonymous error.
#:
#: The default is 16 GiB, or the machine's physical memory when that is smaller (read once
#: at import with ``os.sysconf``). It is a module attribute on purpose: assign
#: ``sparsegrid.coords.MAX_ALLOCATION_BYTES = 64 * 2**30`` to allow more on a big machine,
#: or ``None`` to switch the checks off. The same limit applies to CuPy (device) arrays.
#: Rulebook estimates are worst cases (every neighbour active), so a very large input can
#: be refused although its actual rulebook would fit: raise the limit then.
MAX_ALLOCATION_BYTES = _default_allocation_limit()


def _format_bytes(n):
    """``'274877906944 bytes (256.0 GiB)'``: the exact count, and a readable one."""
    if n >= _GIB:
        return f"{n} bytes ({n / _GIB:.1f} GiB)"
    if n >= 2**20:
        return f"{n} bytes ({n / 2**20:.1f} MiB)"
    return f"{n} bytes"


def check_allocation(op, shape, itemsize, what="an array", hint=None):
    """Refuse an allocation of ``prod(shape) * itemsize`` bytes above the limit.

    Computed with Python ints (no overflow), before anything is allocated.

    Parameters
    ----------
    op : str
        The op about to allocate (named in the message).
    shape : tuple of ints
        The shape it would allocate.
    itemsize : int
        Bytes per element (for several arrays of one shape, their summed item sizes).
    what : str
        What the array is (for the message).
    hint : str, optional
        What the caller can do instead, appended to the message.

    Returns
    -------
    int
        The estimated number of bytes.

    Raises
    ------
    MemoryError
        When the bytes exceed :data:`MAX_ALLOCATION_BYTES` (unless that is None).
    """
    shape = tuple(int(s) for s in shape)
    n_bytes = math.prod(shape) * int(itemsize)
    limit = MAX_ALLOCATION_BYTES
    if limit is not None and n_bytes > limit:
        message = (f"{op} would allocate {what} of shape {shape} at {int(itemsize)} bytes per "
                   f"element: {_format_bytes(n_bytes)}, more than "
                   f"sparsegrid.coords.MAX_ALLOCATION_BYTES = {_format_bytes(int(limit))}; "
                   "raise that limit if the machine has the memory")
        if hint:
            message += f", or {hint}"
        raise MemoryError(message)
    return n_bytes


def check_rulebook_size(op, n_offsets, n_sites, bytes_per_pair=8, extra=""):
    """Refuse a rulebook of up to ``K * N`` (input, output) pairs above the limit.

    Every one of the N input sites meets at most one output per kernel offset, so a
    rulebook holds at most ``K * N`` pairs of two int32 rows (8 bytes; more where the op
    also creates output sites). Called before the rulebook is built.
    """
    return check_allocation(
        op, (n_offsets, n_sites), bytes_per_pair,
        what=f"a rulebook of up to K * N = {int(n_offsets)} * {int(n_sites)} pairs "
             f"(K = {int(n_offsets)} kernel offsets, N = {int(n_sites)} sites{extra})",
        hint="use a smaller filter_size (K = prod(filter_size)) or fewer sites")


def normalize_size(value, ndim, name, minimum=1):
    """Return ``value`` as a tuple of ``ndim`` Python ints, each ``>= minimum``.

    ``value`` may be one integer (used for every axis) or a sequence of ``ndim`` integers.

    Raises
    ------
    TypeError
        When ``value`` is not an integer or a sequence of integers.
    ValueError
        When the sequence has the wrong length or a value is below ``minimum``.
    """
    if type(value) is tuple and len(value) == ndim and \
            all(type(v) is int and v >= minimum for v in value):
        return value                   # fast path: already normalised
    if getattr(value, "ndim", None) == 0 and not isinstance(value, (numbers.Number, np.generic)):
        value = _scalar_int(value, ndim, name)   # a 0-d integer array / torch tensor: one int
    if isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, bool):
        sizes = (int(value),) * ndim
    elif value is None or isinstance(value, (str, bytes)) or (
            getattr(value, "ndim", 1) != 1 and not isinstance(value, (list, tuple))):
        raise TypeError(f"{name} must be an int or a sequence of {ndim} ints; got "
                        f"{_describe(value)}")
    else:
        try:
            items = list(np.asarray(value).reshape(-1)) if not isinstance(value, (list, tuple)) \
                else list(value)
        except Exception as exc:  # pragma: no cover - exotic inputs
            raise TypeError(f"{name} must be an int or a sequence of {ndim} ints; "
                            f"got {value!r}") from exc
        if not all(isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, bool)
                   for v in items):
            raise TypeError(f"{name} must be an int or a sequence of {ndim} ints; got {value!r}")
        if len(items) != ndim:
            raise ValueError(f"{name} must have {ndim} entries (one per spatial axis); "
                             f"got {len(items)}: {tuple(int(v) for v in items)}")
        sizes = tuple(int(v) for v in items)
    bad = [s for s in sizes if s < minimum]
    if bad:
        raise ValueError(f"{name} entries must be >= {minimum}; got {sizes}")
    return sizes


def _scalar_int(value, ndim, name):
    """A 0-d array-like (NumPy, CuPy, torch) of an integer dtype as a Python int; TypeError
    otherwise (never AttributeError: torch dtypes have no ``.kind``)."""
    dtype = getattr(value, "dtype", None)
    try:
        kind = np.dtype(dtype).kind if dtype is not None else None
    except Exception:
        text = str(dtype).rsplit(".", 1)[-1]          # e.g. torch.int64 -> 'int64'
        kind = "i" if text.startswith(("int", "uint")) else None if not text else "?"
    if kind is None or kind in "iu":
        try:
            return operator.index(value)
        except Exception:
            pass
        try:
            number = value.item()
        except Exception:
            number = None
        if isinstance(number, (numbers.Integral, np.integer)) and not isinstance(number, bool):
            return int(number)
    raise TypeError(f"{name} must be an int or a sequence of {ndim} ints; got "
                    f"{_describe(value)}")


def _describe(value):
    """A short description of a bad argument for an error message."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def normalize_spatial_shape(spatial_shape, ndim=None):
    """Validate a spatial shape: a sequence of 1..10 positive ints (or one int with ``ndim``).

    A list, tuple or 1-D integer array; anything else (None, a float, a string, a nested
    list, a 0-d or 2-D array) raises TypeError naming ``spatial_shape`` and what was given.
    """
    if ndim is None:
        if isinstance(spatial_shape, (numbers.Integral, np.integer)):
            raise TypeError("spatial_shape must be a sequence of ints (one per spatial axis); "
                            f"got the single int {spatial_shape!r}")
        expected = "spatial_shape must be a sequence of ints (one per spatial axis)"
        if spatial_shape is None or isinstance(spatial_shape, (str, bytes, numbers.Number)):
            raise TypeError(f"{expected}; got {_describe(spatial_shape)}")
        if hasattr(spatial_shape, "ndim") and spatial_shape.ndim != 1:
            raise TypeError(f"{expected}, e.g. a 1-D integer array; got "
                            f"{_describe(spatial_shape)}")
        try:
            ndim = len(spatial_shape)
        except TypeError:
            raise TypeError(f"{expected}; got {_describe(spatial_shape)}") from None
        if isinstance(spatial_shape, (list, tuple)):
            for axis, entry in enumerate(spatial_shape):
                if isinstance(entry, bool) or not isinstance(entry, (numbers.Integral,
                                                                     np.integer)):
                    raise TypeError(f"{expected}; got {_describe(spatial_shape)}, whose entry "
                                    f"{axis} is {_describe(entry)}")
    if not 1 <= ndim <= MAX_DIMENSIONS:
        raise ValueError(f"spatial_shape must have 1..{MAX_DIMENSIONS} axes; got {ndim}")
    shape = normalize_size(spatial_shape, ndim, "spatial_shape")
    if max(shape) > _INT32_LIMIT:
        raise ValueError(f"spatial_shape entries must be at most 2**31 - 1 (coordinates are "
                         f"int32); got {shape}")
    return shape


def validate_indices(indices, spatial_shape, batch_size=None):
    """Check user coordinates and return them as a C-contiguous int32 array.

    Parameters
    ----------
    indices : array_like of int, shape (N, 1 + D)
        Column 0 is the batch index, columns 1..D the spatial coordinates.
    spatial_shape : tuple of D ints
    batch_size : int, optional
        When given, every batch index must be below it.

    Returns
    -------
    indices : ndarray of int32, shape (N, 1 + D)
    batch_size : int
        ``batch_size`` if given, else ``max(batch index) + 1`` (0 for no sites).

    Raises
    ------
    TypeError
        Non-integer dtype (floats, bools, objects).
    ValueError
        Wrong shape, a negative or out-of-range coordinate or batch index (the message names
        the first offending row).
    """
    arr = indices if backend.is_cupy_array(indices) else np.asarray(indices)
    xp = backend.array_namespace(arr)
    ndim = len(spatial_shape)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"indices must be an integer array (int32 preferred); got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != ndim + 1:
        raise ValueError(f"indices must have shape (N, 1 + D) = (N, {ndim + 1}) for a "
                         f"{ndim}-D spatial_shape {tuple(spatial_shape)}; got {arr.shape}")
    if batch_size is not None:
        if not isinstance(batch_size, (numbers.Integral, np.integer)) or isinstance(batch_size, bool):
            raise TypeError(f"batch_size must be an int; got {batch_size!r}")
        batch_size = int(batch_size)
        if not 0 <= batch_size <= _INT32_LIMIT:
            raise ValueError(f"batch_size must be in [0, 2**31 - 1] (batch indices are int32); "
                             f"got {batch_size}")
    if len(arr) == 0:
        return xp.zeros((0, ndim + 1), np.int32), (batch_size or 0)
    upper = xp.asarray([_INT32_LIMIT if batch_size is None else batch_size, *spatial_shape],
                       dtype=np.int64)
    bad = (arr < 0) | (arr >= upper)
    if bool(bad.any()):
        row, col = (int(v) for v in xp.argwhere(bad)[0])
        what = "batch index" if col == 0 else f"coordinate on spatial axis {col - 1}"
        if col == 0:
            limit = "2**31 - 1" if batch_size is None else f"batch_size {batch_size}"
        else:
            limit = f"spatial_shape[{col - 1}] = {spatial_shape[col - 1]}"
        raise ValueError(f"indices row {row} = {arr[row].tolist()}: {what} is {arr[row, col]}, "
                         f"outside [0, {limit})")
    if batch_size is None:
        batch_size = int(arr[:, 0].max()) + 1
    # A private copy (a Sites makes NumPy copies read-only): cached rulebooks must not go
    # stale behind our back.
    owned = xp.array(arr, dtype=np.int32, order="C", copy=True)
    return owned, batch_size


def validate_features(features, n_rows, name="features"):
    """Check a feature matrix: floating dtype, shape (n_rows, C), all values finite."""
    if not hasattr(features, "dtype"):
        features = np.asarray(features)
    xp = backend.array_namespace(features)
    if features.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be a float32 or float64 array; got dtype "
                        f"{features.dtype}; convert with .astype(np.float32)")
    if features.ndim != 2:
        raise ValueError(f"{name} must have shape (N, C); got {features.shape}")
    if features.shape[0] != n_rows:
        raise ValueError(f"{name} has {features.shape[0]} rows but indices has {n_rows}; "
                         "they must match row for row")
    # One summing pass decides the common case: NaN and inf propagate into the sum, so a
    # finite sum means every value is finite (a sum that overflows, or any non-finite
    # value, falls through to the element-wise check that names the row).
    with np.errstate(over="ignore", invalid="ignore"):
        total = features.sum() if features.size else 0.0
    if features.size and not bool(xp.isfinite(total)):
        finite = xp.isfinite(features).all(axis=1)
    else:
        finite = None
    if finite is not None and not bool(finite.all()):
        row = int(xp.flatnonzero(~finite)[0])
        raise ValueError(f"{name} row {row} is not finite (NaN or inf): {features[row].tolist()}")
    return features


def packing_strides(extents, batch_size, what="spatial_shape"):
    """Strides that pack (batch, x1..xD) with per-axis ``extents`` into one int64 key.

    The last axis is fastest, so key order equals lexicographic (batch, x1, ..., xD) order.

    Raises
    ------
    ValueError
        When ``max(batch_size, 1) * prod(extents)`` does not fit in an int64.
    """
    extents = tuple(int(e) for e in extents)
    total = max(int(batch_size), 1)
    for e in extents:
        total *= e
    if total > _INT64_LIMIT:
        raise ValueError(f"{what} {extents} with batch_size {batch_size} cannot be "
                         f"packed into int64 keys ({total} cells > 2**63 - 1); use a smaller "
                         "spatial_shape (crop, or a coarser voxel size)")
    strides = np.ones(len(extents) + 1, np.int64)
    for d in range(len(extents) - 1, -1, -1):
        strides[d] = strides[d + 1] * int(extents[d])
    return strides


def pack_keys(indices, spatial_shape, batch_size, pad=None):
    """Pack batch-first coordinates into int64 keys, lexicographically ordered.

    With ``pad`` (one int per spatial axis) each axis is widened by ``pad`` cells on both
    sides, so a key plus a packed kernel offset of at most ``pad`` never wraps into another
    axis: neighbours outside the grid get keys no active site can have.
    """
    pad = np.zeros(len(spatial_shape), np.int64) if pad is None else np.asarray(pad, np.int64)
    extents = np.asarray(spatial_shape, np.int64) + 2 * pad
    what = "spatial_shape" if not pad.any() else \
        f"spatial_shape {tuple(spatial_shape)} widened by the filter's reach to"
    strides = packing_strides(extents, batch_size, what)
    shift = int(np.dot(pad, strides[1:]))
    # one column at a time, in the indices' own array library (host or device)
    keys = indices[:, 0].astype(np.int64) * int(strides[0])
    for d in range(1, indices.shape[1]):
        keys += indices[:, d].astype(np.int64) * int(strides[d])
    if shift:
        keys += shift
    return keys, strides


def unpack_keys(keys, spatial_shape):
    """Inverse of :func:`pack_keys` with no padding: int64 keys -> int32 (N, 1 + D) indices."""
    xp = backend.array_namespace(keys)
    extents = [int(e) for e in spatial_shape]
    out = xp.empty((len(keys), len(extents) + 1), np.int32)
    rest = xp.asarray(keys, np.int64)
    for d in range(len(extents) - 1, -1, -1):
        rest, out[:, d + 1] = xp.divmod(rest, extents[d])
    out[:, 0] = rest
    return out


def kernel_offsets(filter_size):
    """All offsets of a filter box, shape (K, D), row-major with the last axis fastest.

    ``kernel_offsets((2, 3))`` is ``[[0,0],[0,1],[0,2],[1,0],[1,1],[1,2]]``.
    """
    grids = np.meshgrid(*[np.arange(f) for f in filter_size], indexing="ij")
    return np.stack([g.reshape(-1) for g in grids], axis=1).astype(np.int64)


def submanifold_offsets(filter_size, dilation):
    """Centred, dilated offsets: input = output + (delta - f//2) * dilation, shape (K, D)."""
    f = np.asarray(filter_size, np.int64)
    return (kernel_offsets(filter_size) - f // 2) * np.asarray(dilation, np.int64)


def strided_output_shape(spatial_shape, filter_size, stride, name="input"):
    """(in - f) / s + 1 per axis; ValueError naming a fitting size when it does not divide."""
    out = []
    for d, (n, f, s) in enumerate(zip(spatial_shape, filter_size, stride)):
        if n < f or (n - f) % s:
            lower = f + ((max(n, f) - f) // s) * s
            fits = sorted({lower, lower + s} - {0})
            raise ValueError(
                f"{name} spatial size {tuple(spatial_shape)} does not fit filter_size "
                f"{tuple(filter_size)} and stride {tuple(stride)} on axis {d}: (size - filter) "
                f"must be a non-negative multiple of the stride; sizes that fit on that axis: "
                f"{' or '.join(map(str, fits))}")
        out.append((n - f) // s + 1)
    return tuple(out)


def transposed_output_shape(spatial_shape, filter_size, stride):
    """(in - 1) * s + f per axis (Deconvolution, FullConvolution, UnPooling)."""
    return tuple((n - 1) * s + f for n, f, s in zip(spatial_shape, filter_size, stride))


def permutohedral_basis(dimension):
    """``(a, a_inverse)``: a lower-triangular basis in which unit lattice vectors meet at 60°.

    Rows of ``a`` have unit length and pairwise dot products 1/2 (a permutohedral /
    A*-style lattice). Map real coordinates ``p`` into lattice coordinates with
    ``p @ a_inverse`` before rounding them to a sparse input (as SCN's
    ``permutohedral_basis``).
    """
    d = int(dimension)
    a = np.zeros((d, d))
    for i in range(d):
        for j in range(i):
            a[i, j] = (0.5 - a[i, :] @ a[j, :]) / a[j, j]
        a[i, i] = np.sqrt(1.0 - a[i, :] @ a[i, :])
    return a, np.linalg.inv(a)


def permutohedral_offsets(dimension):
    """The d*d + d + 1 lattice offsets of a permutohedral submanifold convolution, (K, D).

    The zero offset first, then every ``x`` in {-1, 0, 1}^d with ``|x @ a| <= 1`` (the
    lattice's nearest neighbours) with the FIRST axis fastest, as SCN's table. In 2-D
    SCN's iterator visits the centre twice (slots 0 and 3) and never (0, -1); here slot
    3 is (0, -1) and the other slots are SCN's.
    """
    d = int(dimension)
    a, _ = permutohedral_basis(d)
    codes = np.arange(3 ** d)
    x = (codes[:, None] // 3 ** np.arange(d)) % 3 - 1
    near = ((x @ a) ** 2).sum(axis=1) <= 1.01
    x = x[near & x.any(axis=1)].astype(np.int64)
    if d == 2:
        # SCN's 2-D kernel k uses (centre, (1,-1), (-1,0), centre again, (1,0), (-1,1),
        # (0,1)); slot 3 gets the missing (0,-1), so the other six slots hold the same
        # offsets as SCN's and an SCN checkpoint's weights land where SCN used them.
        x = x[[1, 2, 0, 3, 4, 5]]
    return np.concatenate([np.zeros((1, d), np.int64), x])
