"""Point clouds <-> sparse tensors: voxelization, devoxelization, multilinear interpolation.

Written once with the points' array namespace (NumPy or CuPy) and the kernel contract's
``unique_inverse`` / ``segment_reduce`` / ``build_index`` / ``query_index``, so the same
code runs on the CPU and the GPU, deterministically. On NumPy, :func:`voxelize` sorts
its own keys (each point's row packed below its voxel's key: one ``np.sort``, no
argsort) and reduces 'mean' / 'sum' / 'first' / 'last' itself, with the bits of
``segment_reduce`` (see "the NumPy path" below). Semantics and choices:
docs/pointcloud.md; speed: docs/performance.md.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections import namedtuple

import numpy as np

from . import backend
from .autodiff.core import Tensor, data_of
from .coords import MAX_DIMENSIONS, packing_strides, pack_keys, unpack_keys
from .grid import Grid, Sites
from .tensor import SparseTensor

__all__ = ["voxelize", "devoxelize", "trilinear", "VoxelizeResult", "Dropped",
           "REDUCTIONS"]

#: The per-voxel reductions of :func:`voxelize`.
REDUCTIONS = ("mean", "sum", "max", "min", "first", "last", "count")
_LABEL_CONFLICTS = ("vote", "ignore")
_INT32_LIMIT = 2**31 - 1

#: What :func:`voxelize` dropped, in points (``voxels``: in voxels).
#:
#: non_finite : points with a NaN / inf coordinate (``drop_invalid=True``)
#: out_of_bounds : points outside ``bounds`` or below ``origin`` (``drop_invalid=True``)
#: voxel_cap_points : points of the voxels ``max_voxels`` dropped
#: voxels : voxels ``max_voxels`` dropped
#: point_cap_points : points over ``max_points_per_voxel`` in the voxels kept
Dropped = namedtuple("Dropped", "non_finite out_of_bounds voxel_cap_points voxels "
                                "point_cap_points")
Dropped.total_points = property(lambda self: self.non_finite + self.out_of_bounds
                                + self.voxel_cap_points + self.point_cap_points)
Dropped.total_points.__doc__ = "All points dropped, for any reason (their inverse is -1)."


class VoxelizeResult(tuple):
    """``(tensor, inverse)``, so ``x, inverse = voxelize(...)`` unpacks, with more attributes.

    Attributes
    ----------
    tensor : SparseTensor
        One row per voxel, sorted by (batch, x1, ..., xD).
    inverse : int64 (N,)
        The tensor row of every input point (clouds concatenated in list order); -1 for a
        dropped point.
    labels : integer (M,) or None
        The voxel labels (when ``labels`` was given), in the labels' dtype.
    dropped : Dropped
        What was dropped, counted.
    origin : tuple of D floats
        The world position of voxel 0's corner (the grid's origin).
    voxel_size : tuple of D floats
    """

    def __new__(cls, tensor, inverse, labels, dropped, origin, voxel_size):
        self = super().__new__(cls, (tensor, inverse))
        self.labels, self.dropped = labels, dropped
        self.origin, self.voxel_size = origin, voxel_size
        return self

    tensor = property(lambda self: self[0])
    inverse = property(lambda self: self[1])

    def __repr__(self):
        return (f"VoxelizeResult(tensor={self.tensor!r}, n_points={len(self.inverse)}, "
                f"dropped={self.dropped}, origin={self.origin}, voxel_size={self.voxel_size})")


# -- validation -------------------------------------------------------------------------------
def _is_array(value):
    return isinstance(value, np.ndarray) or backend.is_cupy_array(value)


def _clouds(name, value, allow_list=True):
    """A list of 2-D arrays (one per cloud) and whether the input was a list."""
    if isinstance(value, (list, tuple)) and allow_list:
        clouds = list(value)
        is_list = True
    else:
        clouds = [value]
        is_list = False
    out = []
    for i, cloud in enumerate(clouds):
        where = f"{name}[{i}]" if is_list else name
        if isinstance(cloud, Tensor):
            raise TypeError(f"{where} must be a NumPy/CuPy array of coordinates (not an "
                            "autodiff Tensor: coordinates are not differentiable)")
        if not _is_array(cloud):
            if isinstance(cloud, (list, tuple)) and not is_list:
                cloud = np.asarray(cloud)
            else:
                raise TypeError(f"{where} must be a NumPy or CuPy array of shape (N, D); got "
                                f"{type(cloud).__name__}")
        if cloud.dtype == bool or cloud.dtype.kind not in "iuf":
            raise TypeError(f"{where} must be a float (or integer) array of coordinates; got "
                            f"dtype {cloud.dtype}")
        if cloud.ndim != 2:
            raise ValueError(f"{where} must have shape (N, D); got {cloud.shape}")
        out.append(cloud)
    return out, is_list


def _vector(name, value, ndim, positive=False):
    """A scalar or D finite reals -> tuple of D floats (host); TypeError / ValueError."""
    if backend.is_cupy_array(value):
        value = backend.to_numpy(value)
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a real number or {ndim} real numbers; got "
                        f"{type(value).__name__} {value!r}")
    if isinstance(value, (numbers.Real, np.integer, np.floating)):
        values = [value] * ndim
    else:
        try:
            arr = np.asarray(value)
        except Exception:
            raise TypeError(f"{name} must be a real number or {ndim} real numbers; got "
                            f"{type(value).__name__}") from None
        if arr.dtype == bool or arr.dtype.kind not in "iuf":
            raise TypeError(f"{name} must be real numbers; got {value!r}")
        if arr.ndim == 0:
            values = [arr.item()] * ndim
        elif arr.shape != (ndim,):
            raise ValueError(f"{name} must be one number or {ndim} numbers (one per axis); "
                             f"got shape {arr.shape}")
        else:
            values = arr.tolist()
    out = tuple(float(v) for v in values)
    for d, v in enumerate(out):
        if not math.isfinite(v) or (positive and v <= 0):
            what = "finite positive" if positive else "finite"
            raise ValueError(f"{name} must be {what} on every axis; axis {d} is {v}")
    return out


def _count(name, value):
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral,
                                                                     np.integer)):
        raise TypeError(f"{name} must be None or an int >= 1; got {type(value).__name__} "
                        f"{value!r}")
    if int(value) < 1:
        raise ValueError(f"{name} must be >= 1; got {int(value)}")
    return int(value)


def _per_point(name, value, sizes, is_list, xp, kind):
    """features / labels: one array (or a list matching the clouds) -> one array."""
    if value is None:
        return None
    if is_list:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list of arrays, one per cloud, when points is a "
                            f"list; got {type(value).__name__}")
        if len(value) != len(sizes):
            raise ValueError(f"{name} has {len(value)} entries but points has {len(sizes)} "
                             "clouds")
        parts = list(value)
    else:
        parts = [value]
    tensor = any(isinstance(p, Tensor) for p in parts)
    if tensor and (kind != "features" or len(parts) != 1):
        raise TypeError(f"{name} may be an autodiff Tensor only for a single cloud's features")
    checked = []
    for i, (part, n) in enumerate(zip(parts, sizes)):
        where = f"{name}[{i}]" if is_list else name
        data = data_of(part)
        if not _is_array(data):
            raise TypeError(f"{where} must be a NumPy or CuPy array; got {type(part).__name__}")
        if backend.array_namespace(data) is not xp:
            raise backend.mixed_devices_error(where, backend.device_of(data), "points",
                                              "cuda" if xp is not np else "cpu")
        if kind == "features":
            if data.dtype not in (np.float32, np.float64):
                raise TypeError(f"{where} must be a float32 or float64 array; got dtype "
                                f"{data.dtype}")
            if data.ndim != 2 or data.shape[0] != n:
                raise ValueError(f"{where} must have shape (N, C) with N = {n} (the points' "
                                 f"rows); got {data.shape}")
        else:
            if data.dtype == bool or data.dtype.kind not in "iu":
                raise TypeError(f"{where} must be an integer array; got dtype {data.dtype}")
            if data.shape != (n,):
                raise ValueError(f"{where} must have shape ({n},) (one label per point); got "
                                 f"{data.shape}")
        checked.append(data)
    if kind == "features":
        channels = {c.shape[1] for c in checked}
        dtypes = {c.dtype for c in checked}
        if len(channels) > 1 or len(dtypes) > 1:
            raise ValueError(f"{name}: every cloud needs the same channel count and dtype; "
                             f"got {sorted(channels)} channels, dtypes {sorted(map(str, dtypes))}")
        for i, c in enumerate(checked):
            if c.size and not bool(xp.isfinite(c.sum())):
                row = int(xp.flatnonzero(~xp.isfinite(c).all(axis=1))[0])
                where = f"{name}[{i}]" if is_list else name
                raise ValueError(f"{where} row {row} is not finite (NaN or inf): "
                                 f"{c[row].tolist()}")
    if tensor:
        return parts[0]
    if len(checked) == 1:
        return checked[0]
    if not checked:
        return None
    return xp.concatenate(checked)


def _locate(row, sizes, is_list):
    """'points row r' or 'points[c] row r' for a global row."""
    if not is_list:
        return f"points row {row}"
    offsets = np.cumsum([0] + list(sizes))
    cloud = int(np.searchsorted(offsets, row, side="right")) - 1
    return f"points[{cloud}] row {row - int(offsets[cloud])}"


# -- voxelize ---------------------------------------------------------------------------------
def voxelize(points, voxel_size, features=None, reduce="mean", origin=None, bounds=None,
             labels=None, ignore_label=None, label_conflict="vote",
             max_points_per_voxel=None, max_voxels=None, drop_invalid=False):
    """Voxelize one point cloud or a batch of clouds into a SparseTensor.

    Parameters
    ----------
    points : float (N, D) array, or a list of (N_b, D) arrays (one batch; batch index =
        list position), NumPy or CuPy; D = 1..10.
    voxel_size : one number or D numbers, > 0 (world units per voxel, per axis)
    features : float32/64 (N, C) (or a list matching the clouds), optional
        Reduced per voxel by ``reduce``. None: one channel of float32 ones per point
        (so 'mean' gives occupancy 1, 'sum' and 'count' the point count).
    reduce : 'mean', 'sum', 'max', 'min', 'first', 'last' (input order) or 'count'
        ('count': one channel, the number of points kept in the voxel).
    origin : D numbers, optional
        World position of voxel 0's corner: point p lies in voxel ``floor((p - origin) /
        voxel_size)`` (the subtraction in float64 first). Default: ``bounds``' lower
        corner when bounds are given, else the minimum over the whole batch floored to a
        multiple of ``voxel_size`` (so clouds voxelized separately still share the global
        grid ``floor(p / voxel_size)`` up to a shift of whole voxels). Pass it to put tiles
        of one survey on one grid.
    bounds : (lower, upper), D numbers each, optional
        The region voxelized: points with ``lower <= p < upper`` on every axis. The grid
        covers it: ``spatial_shape = ceil((upper - origin) / voxel_size)``. Points outside
        raise ValueError naming the first one, unless ``drop_invalid``. Without bounds the
        spatial shape is the data's extent (largest voxel index + 1 per axis).
    labels : integer (N,) (or a list), optional
        Per-point labels voted per voxel (see ``label_conflict``).
    ignore_label : int, optional
        'vote': points with this label do not vote (a voxel of only such points gets it);
        'ignore': the label of voxels whose points disagree.
    label_conflict : 'vote' (majority; ties: the smallest label) or 'ignore'
    max_points_per_voxel : int, optional
        Keep only the first points of each voxel, in input order.
    max_voxels : int, optional
        Per cloud: keep the voxels whose first point comes first in the input (spconv's
        first-appearance order); their rows stay sorted.
    drop_invalid : bool
        Drop (and count) points with NaN/inf coordinates or outside the grid instead of
        raising ValueError.

    Returns
    -------
    VoxelizeResult
        ``(tensor, inverse)`` with ``.labels``, ``.dropped``, ``.origin``, ``.voxel_size``.
        Anything the caps drop is counted in ``.dropped`` and announced by a
        ``UserWarning``.
    """
    clouds, is_list = _clouds("points", points)
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}; got {reduce!r}")
    if label_conflict not in _LABEL_CONFLICTS:
        raise ValueError(f"label_conflict must be one of {_LABEL_CONFLICTS}; got "
                         f"{label_conflict!r}")
    if not isinstance(drop_invalid, (bool, np.bool_)):
        raise TypeError(f"drop_invalid must be a bool; got {type(drop_invalid).__name__}")
    max_points_per_voxel = _count("max_points_per_voxel", max_points_per_voxel)
    max_voxels = _count("max_voxels", max_voxels)
    if ignore_label is not None and (isinstance(ignore_label, (bool, np.bool_)) or
                                     not isinstance(ignore_label, (numbers.Integral, np.integer))):
        raise TypeError(f"ignore_label must be None or an int; got {ignore_label!r}")
    if label_conflict == "ignore" and ignore_label is None:
        raise ValueError("label_conflict='ignore' needs an ignore_label")
    if ignore_label is not None and labels is None:
        raise ValueError("ignore_label was given without labels")

    # the dimension: from the clouds, else from a vector argument (an empty batch)
    dims = {c.shape[1] for c in clouds}
    if len(dims) > 1:
        raise ValueError(f"points: every cloud needs the same number of columns D; got "
                         f"{sorted(dims)}")
    if dims:
        ndim = dims.pop()
    else:
        ndim = next((len(np.asarray(v[0] if v is bounds else v).reshape(-1))
                     for v in (voxel_size, origin, bounds) if v is not None
                     and np.ndim(v[0] if v is bounds else v) == 1), None)
        if ndim is None:
            raise ValueError("points is an empty list and no argument says the dimension: "
                             "pass voxel_size, origin or bounds with one value per axis")
    if not 1 <= ndim <= MAX_DIMENSIONS:
        raise ValueError(f"points must have 1..{MAX_DIMENSIONS} columns (D); got {ndim}")
    libs = {backend.is_cupy_array(c) for c in clouds}
    if len(libs) > 1:
        raise TypeError("points: the clouds mix NumPy and CuPy arrays; move them to one "
                        "device first")
    if clouds:
        backend.check_same_device(*clouds)
    xp = backend.array_namespace(*clouds) if clouds else np
    voxel_size = _vector("voxel_size", voxel_size, ndim, positive=True)
    if origin is not None:
        origin = _vector("origin", origin, ndim)
    if bounds is not None:
        if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
            raise TypeError("bounds must be a pair (lower, upper) of D numbers each; got "
                            f"{type(bounds).__name__}")
        lower = _vector("bounds lower", bounds[0], ndim)
        upper = _vector("bounds upper", bounds[1], ndim)
        for d in range(ndim):
            if not upper[d] > lower[d]:
                raise ValueError(f"bounds: upper must exceed lower on every axis; axis {d} "
                                 f"has lower {lower[d]}, upper {upper[d]}")
            if origin is not None and origin[d] > lower[d]:
                raise ValueError(f"origin must not exceed bounds' lower corner (the grid "
                                 f"starts at origin); axis {d}: origin {origin[d]} > lower "
                                 f"{lower[d]}")
        if origin is None:
            origin = lower
    sizes = [int(c.shape[0]) for c in clouds]
    n = sum(sizes)
    batch_size = len(clouds)
    values = _per_point("features", features, sizes, is_list, xp, "features")
    point_labels = _per_point("labels", labels, sizes, is_list, xp, "labels")

    coords = clouds[0] if len(clouds) == 1 else (
        xp.concatenate([c.astype(np.float64, copy=False) for c in clouds])
        if clouds else xp.zeros((0, ndim)))
    batch = None
    if batch_size > 1:
        batch = xp.repeat(xp.arange(batch_size, dtype=np.int64), sizes)

    # 1. invalid points: NaN / inf, outside bounds. One min and one max per axis decide the
    # common case (NaN and inf show in them); the per-point masks are built only when they
    # say some point is invalid.
    valid = None
    n_non_finite = n_out = 0
    finite = None
    column_range = _column_range(xp, coords, None) if n else None
    if n and coords.dtype.kind == "f" and not all(map(math.isfinite, column_range[0] +
                                                      column_range[1])):
        finite = xp.isfinite(coords).all(axis=1)
        if not drop_invalid:
            row = int(xp.flatnonzero(~finite)[0])
            raise ValueError(f"{_locate(row, sizes, is_list)} has a NaN or inf coordinate: "
                             f"{coords[row].tolist()} (pass drop_invalid=True to drop "
                             "such points)")
        n_non_finite = int(n - int(finite.sum()))
        valid = finite
    if bounds is not None and n and (valid is not None or not all(
            lower[d] <= column_range[0][d] and column_range[1][d] < upper[d]
            for d in range(ndim))):
        inside = xp.ones(n, bool)
        for d in range(ndim):
            # in float64 (the bounds' precision, as the range check above), never in a
            # float32 column's precision: a point's fate must not depend on the others
            column = coords[:, d].astype(np.float64, copy=False)
            inside &= (column >= np.float64(lower[d])) & (column < np.float64(upper[d]))
        if finite is not None:
            inside &= finite
        outside = ~inside if valid is None else (valid & ~inside)
        if bool(outside.any()):
            if not drop_invalid:
                row = int(xp.flatnonzero(outside)[0])
                raise ValueError(f"{_locate(row, sizes, is_list)} = {coords[row].tolist()} lies "
                                 f"outside bounds [{list(lower)}, {list(upper)}) (pass "
                                 "drop_invalid=True to drop such points)")
            n_out += int(outside.sum())
            valid = inside
    if valid is not None:
        column_range = _column_range(xp, coords, valid)

    # 2. origin: the batch minimum floored to the voxel grid
    floating_origin = origin is None
    if origin is None:
        if column_range is not None:
            origin = tuple(math.floor(low / size) * size
                           for low, size in zip(column_range[0], voxel_size))
        else:
            origin = (0.0,) * ndim

    # 3. integer voxel coordinates: (p - origin) / size in float64, floored. floor((p - o) /
    # s) is monotonic in p (each step is correctly rounded), so the smallest and largest
    # voxel index of an axis are those of its smallest and largest coordinate.
    limit = None if bounds is None else [max(1, math.ceil((upper[d] - origin[d]) /
                                                          voxel_size[d])) for d in range(ndim)]
    low_cells = high_cells = None
    if column_range is not None:
        low_cells, high_cells = [], []
        for d in range(ndim):
            low, high = column_range[0][d], column_range[1][d]
            low_cell = _cell(low, origin[d], voxel_size[d])
            if floating_origin and low_cell < 0:
                # the floored origin rounded above the minimum: one voxel lower
                origin = origin[:d] + (origin[d] - voxel_size[d],) + origin[d + 1:]
                low_cell = _cell(low, origin[d], voxel_size[d])
            high_cell = _cell(high, origin[d], voxel_size[d])
            if high_cell > _INT32_LIMIT - 1:
                raise ValueError(f"voxel_size {voxel_size[d]} on axis {d} makes the grid "
                                 f"{high_cell + 1:.0f} voxels long, more than 2**31 - 1 "
                                 "(coordinates are int32): use a larger voxel_size or bounds")
            low_cells.append(low_cell)
            high_cells.append(high_cell)
    if low_cells is not None and min(low_cells) < 0:   # only with an explicit origin, no bounds
        below = xp.zeros(n, bool)
        for d in range(ndim):
            if low_cells[d] < 0:
                below |= _cells(xp, coords[:, d], origin[d], voxel_size[d], None) < 0
        if valid is not None:
            below &= valid
        if not drop_invalid:
            row = int(xp.flatnonzero(below)[0])
            raise ValueError(f"{_locate(row, sizes, is_list)} = {coords[row].tolist()} lies "
                             f"below origin {list(origin)} (pass drop_invalid=True to drop "
                             "such points)")
        n_out += int(below.sum())
        valid = ~below if valid is None else (valid & ~below)
        column_range = _column_range(xp, coords, valid)
        high_cells = None if column_range is None else [
            _cell(high, origin[d], voxel_size[d]) for d, high in enumerate(column_range[1])]
    if limit is not None:
        spatial_shape = tuple(limit)
    else:
        spatial_shape = tuple(int(h) + 1 for h in high_cells) if high_cells is not None \
            else (1,) * ndim
    for d, s in enumerate(spatial_shape):
        if s > _INT32_LIMIT:
            raise ValueError(f"bounds and voxel_size make axis {d} {s} voxels long, more "
                             "than 2**31 - 1 (coordinates are int32)")

    # 4. keys -> sorted distinct voxels and the point -> voxel inverse
    kernels = backend.kernels(coords) if clouds else backend.kernels(np.zeros(0))
    kept_rows = None if valid is None else xp.flatnonzero(valid)
    n_kept = n if kept_rows is None else len(kept_rows)
    packing = _packing(spatial_shape, batch_size, n_kept if xp is np else None)
    strides = packing.strides
    grid = _Grid(coords, batch, origin, voxel_size, limit, packing)
    sub_keys = _voxel_keys(xp, grid, kept_rows)
    grouping = None
    if xp is np:
        unique_keys, sub_inverse, grouping = _group_numpy(sub_keys, packing.row_bits)
        first_rows = None   # taken from the grouping below where a cap needs them
    else:
        unique_keys, first_rows, sub_inverse = kernels.unique_inverse(sub_keys)
    del sub_keys
    m = len(unique_keys)

    # 5. caps
    n_voxel_cap_points = n_voxels_capped = n_point_cap = 0
    if max_voxels is not None and m:
        if first_rows is None:
            first_rows = _grouped_rows(grouping, grouping.starts)
        # One cloud: every voxel is in batch 0 (and the key may use all 63 bits, so its
        # batch stride, 1 << 63, would not fit an int64 division).
        voxel_batch = (xp.zeros(m, np.int64) if batch_size <= 1 else
                       unique_keys // int(strides[0]))
        order = xp.argsort(first_rows)         # distinct values: any sort gives this order
        per_batch = xp.bincount(voxel_batch, minlength=max(batch_size, 1))
        starts = xp.cumsum(per_batch) - per_batch
        rank = xp.empty(m, np.int64)
        rank[order] = xp.arange(m, dtype=np.int64) - starts[voxel_batch[order]]
        keep_voxel = rank < max_voxels
        n_kept = int(keep_voxel.sum())
        if n_kept < m:
            n_voxels_capped = m - n_kept
            new_id = xp.cumsum(keep_voxel) - 1
            point_keep = keep_voxel[sub_inverse]
            n_voxel_cap_points = int(len(sub_inverse) - int(point_keep.sum()))
            sub_inverse = xp.where(point_keep, new_id[sub_inverse], -1)
            unique_keys = unique_keys[keep_voxel]
            m = n_kept
    if max_points_per_voxel is not None and len(sub_inverse):
        k = len(sub_inverse)
        live = sub_inverse >= 0
        rank = xp.empty(k, np.int64)    # of each point within its voxel, in row order
        if grouping is not None:   # NumPy: the voxels' rows in order, from the sort
            starts = grouping.starts
            rank[_grouped_rows(grouping)] = np.arange(k) - np.repeat(
                starts, np.diff(np.append(starts, k)))
        else:
            ids = xp.where(live, sub_inverse, m)
            order = xp.argsort(ids * k + xp.arange(k, dtype=np.int64))   # distinct composite
            counts = xp.bincount(ids, minlength=m + 1)
            starts = xp.cumsum(counts) - counts
            rank[order] = xp.arange(k, dtype=np.int64) - starts[ids[order]]
        over = live & (rank >= max_points_per_voxel)
        n_point_cap = int(over.sum())
        if n_point_cap:
            sub_inverse = xp.where(over, -1, sub_inverse)
    if n_voxels_capped or n_point_cap:
        parts = []
        if n_voxels_capped:
            parts.append(f"max_voxels={max_voxels} dropped {n_voxels_capped} voxels "
                         f"({n_voxel_cap_points} points)")
        if n_point_cap:
            parts.append(f"max_points_per_voxel={max_points_per_voxel} dropped "
                         f"{n_point_cap} points")
        warnings.warn("voxelize: " + "; ".join(parts) + " (counts in result.dropped)",
                      UserWarning, stacklevel=2)

    if kept_rows is None:
        inverse = sub_inverse.astype(np.int64, copy=False)
    else:
        inverse = xp.full(n, -1, np.int64)
        inverse[kept_rows] = sub_inverse

    # 6. features
    used = None if (n_voxels_capped == 0 and n_point_cap == 0 and valid is None) else \
        xp.flatnonzero(inverse >= 0)
    ids = inverse if used is None else inverse[used]
    if n_voxels_capped or n_point_cap:
        grouping = None   # made for the points before the caps
    out = _reduce(xp, kernels, values, ids, used, n, m, reduce, grouping)
    del grouping

    # 7. labels
    voxel_labels = None
    if point_labels is not None:
        voxel_labels = _vote(xp, kernels, point_labels if used is None else point_labels[used],
                             ids, m, ignore_label, label_conflict)

    indices = _unpack(xp, unique_keys, packing, spatial_shape)
    tensor = SparseTensor._on(out, Sites(indices, spatial_shape, batch_size), Grid())
    dropped = Dropped(n_non_finite, n_out, n_voxel_cap_points, n_voxels_capped, n_point_cap)
    return VoxelizeResult(tensor, inverse, voxel_labels, dropped, tuple(origin), voxel_size)


def _reduce(xp, kernels, values, ids, used, n, m, reduce, grouping=None):
    """Per-voxel features: (m, C); differentiable when ``values`` is a Tensor.

    ``grouping``: NumPy only, optional: the :data:`_Grouping` of the points ``ids``
    numbers."""
    from .functional import _differentiable
    if values is None or reduce == "count":
        dtype = np.float32 if values is None else data_of(values).dtype
        if reduce in ("sum", "count"):
            counts = xp.bincount(ids, minlength=m) if len(ids) else xp.zeros(m, np.int64)
            out = counts.astype(dtype).reshape(m, 1)
        else:
            out = xp.ones((m, 1), dtype)
        if values is not None and isinstance(values, Tensor):
            return Tensor(out)
        return out
    data = data_of(values)
    mode = "max" if reduce == "min" else reduce
    if xp is np and mode != "max" and len(ids):
        out, chosen = _segment_reduce_numpy(data, ids, used, m, mode, grouping)
    else:
        picked = data if used is None else data[used]
        if reduce == "min":
            picked = -picked
        out, chosen = kernels.segment_reduce(xp.ascontiguousarray(picked), ids, m, mode)
        if reduce == "min":
            out = -out
    n_used = len(ids)

    def vjp(g):
        grad = kernels.segment_reduce_backward(g, ids, m, mode, chosen, n_used)
        if used is None:
            return (grad,)
        full = xp.zeros((n, data.shape[1]), grad.dtype)
        full[used] = grad
        return (full,)

    return _differentiable(out, (values,), vjp)


# -- the voxel grid: keys of points -----------------------------------------------------------
#: Rows per unit of work of the passes over points: their temporaries stay in cache, and
#: on NumPy the units run on sparsegrid's thread pool (each writes only its own rows, or
#: returns a part combined exactly, so the thread count never changes a result).
_CHUNK = 1 << 16
#: Keys per piece of the sort when several threads run (one piece below twice this).
_SORT_PIECE = 1 << 18

#: How voxels are packed into int64 keys. Each axis takes a bit field wide enough for its
#: extent (and the batch index one above them), so keys sort in (batch, x1, ..., xD) order
#: and unpack with shifts and masks; ``shifts`` is None when the fields do not fit 63 bits,
#: then the strides are the exact ones (``coords.packing_strides``). ``row_bits``: on
#: NumPy, the low bits that hold each point's row below its key (None: they do not fit).
_Packing = namedtuple("_Packing", "strides shifts bits row_bits")

#: What maps a point to its voxel: the (N, D) coordinates, the batch index of each point
#: (None: one cloud), the origin, voxel size and bounds' cell limit per axis, the packing.
_Grid = namedtuple("_Grid", "coords batch origin voxel_size limit packing")


def _on_chunks(xp, work, n):
    """``[work(start, stop) for each chunk of n rows]``: on the thread pool for NumPy, in
    one piece for CuPy (its kernels are parallel already)."""
    if xp is not np:
        return [work(0, n)] if n else []
    from .cpu.threads import parallel_map
    spans = [(start, min(start + _CHUNK, n)) for start in range(0, n, _CHUNK)]
    return parallel_map(lambda span: work(*span), spans,
                        sizes=[stop - start for start, stop in spans])


def _column_range(xp, coords, valid):
    """``(lows, highs)``: each axis' minimum and maximum (floats) over the rows ``valid``
    marks (all rows for None), or None when there is no such row. NaN and inf show."""
    rows = None if valid is None else xp.flatnonzero(valid)
    n = coords.shape[0] if rows is None else len(rows)
    if n == 0:
        return None

    def work(start, stop):
        part = coords[start:stop] if rows is None else coords.take(rows[start:stop], axis=0)
        return ([part[:, d].min() for d in range(part.shape[1])],
                [part[:, d].max() for d in range(part.shape[1])])

    parts = _on_chunks(xp, work, n)
    # min / max of the parts' results: exact, and NaN propagates as in one reduction
    lows = np.min(np.array([[float(v) for v in p[0]] for p in parts]), axis=0)
    highs = np.max(np.array([[float(v) for v in p[1]] for p in parts]), axis=0)
    return lows.tolist(), highs.tolist()


def _cells(xp, column, origin, size, limit):
    """Voxel index along one axis, as float64: ``floor((p - origin) / size)``, widened to
    float64 before the subtraction, at most ``limit - 1`` (the bounds' last cell)."""
    cells = xp.subtract(column.astype(np.float64, copy=False), origin)
    xp.divide(cells, size, out=cells)
    xp.floor(cells, out=cells)
    if limit is not None:
        xp.minimum(cells, limit - 1, out=cells)
    return cells


def _cell(value, origin, size):
    """:func:`_cells` of one coordinate (without the limit), as a Python float."""
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.floor((np.float64(value) - origin) / size))


def _packing(spatial_shape, batch_size, n_rows):
    """The :data:`_Packing` of a grid; ``n_rows``: the points whose rows go below the keys
    (None: no rows). ValueError when even the exact strides overflow int64."""
    exact = packing_strides(spatial_shape, batch_size, "the voxel grid")
    bits = [(int(e) - 1).bit_length() for e in spatial_shape]
    batch_bits = (max(int(batch_size), 1) - 1).bit_length()
    key_bits = batch_bits + sum(bits)
    if key_bits > 63:
        return _Packing([int(s) for s in exact], None, None, None)
    shifts = [0] * len(bits)
    for d in range(len(bits) - 2, -1, -1):
        shifts[d] = shifts[d + 1] + bits[d + 1]
    strides = [1 << (shifts[0] + bits[0])] + [1 << s for s in shifts]
    row_bits = None
    if n_rows is not None and key_bits + (max(n_rows, 1) - 1).bit_length() <= 63:
        row_bits = (max(n_rows, 1) - 1).bit_length()
    return _Packing(strides, shifts, bits, row_bits)


def _voxel_keys(xp, grid, rows):
    """int64 packed voxel keys of the points ``rows`` (all for None), chunk by chunk (no
    (N, D) integer grid, only cache-sized float64 temporaries). With ``row_bits``: ``key <<
    row_bits | i`` for the i-th of those points, all distinct."""
    n = grid.coords.shape[0] if rows is None else len(rows)
    keys = xp.empty(n, np.int64)
    row_bits = grid.packing.row_bits or 0
    strides = [int(s) << row_bits for s in grid.packing.strides]

    def work(start, stop):
        part = grid.coords[start:stop] if rows is None else \
            grid.coords.take(rows[start:stop], axis=0)
        out = keys[start:stop]
        scaled = xp.empty(stop - start, np.float64)
        cells = xp.empty(stop - start, np.int64)
        for d in range(part.shape[1]):
            # (p - origin) / size >= 0 at every point kept: truncation is the floor
            xp.subtract(part[:, d].astype(np.float64, copy=False), grid.origin[d], out=scaled)
            xp.divide(scaled, grid.voxel_size[d], out=scaled)
            target = out if d == 0 else cells
            xp.copyto(target, scaled, casting="unsafe")
            if grid.limit is not None:
                xp.minimum(target, grid.limit[d] - 1, out=target)
            if strides[d + 1] != 1:
                target *= strides[d + 1]
            if d:
                out += cells
        if grid.batch is not None:
            batch = grid.batch[start:stop] if rows is None else grid.batch.take(rows[start:stop])
            out += batch * strides[0]
        if row_bits:
            out += xp.arange(start, stop, dtype=np.int64)

    _on_chunks(xp, work, n)
    return keys


def _unpack(xp, keys, packing, spatial_shape):
    """int64 keys -> int32 ``(M, 1 + D)`` (batch, voxel) indices."""
    if packing.shifts is None:
        return unpack_keys(keys, spatial_shape)
    ndim = len(packing.shifts)
    indices = xp.empty((len(keys), ndim + 1), np.int32)

    def work(start, stop):
        part, out = keys[start:stop], indices[start:stop]
        for d in range(ndim):
            out[:, d + 1] = (part >> packing.shifts[d]) & ((1 << packing.bits[d]) - 1)
        out[:, 0] = part >> (packing.shifts[0] + packing.bits[0])

    _on_chunks(xp, work, len(keys))
    return indices


# -- the NumPy path: distinct keys and per-voxel reductions -----------------------------------
# The contract's unique_inverse and segment_reduce serve any keys and rows; a voxelization
# runs on millions of points and can put each point's row below its key: the keys are then
# distinct, one np.sort (in place, no permutation to gather with) orders them, and the
# order within a voxel is the row order, so the sort also groups each voxel's points in
# input order. Every result (the sorted distinct keys, each point's rank, sums in input row
# order, first and last rows) is a function of the keys alone, never of a thread count.
def _sort_distinct(keys):
    """Sort distinct int64 keys in place. With several threads, ``np.partition`` first
    puts every key in its piece of the sorted order, and the pieces sort on the thread
    pool: the keys are distinct, so the result is the one sorted array either way."""
    from .cpu.threads import get_num_threads, parallel_map
    n = len(keys)
    pieces = max(1, min(get_num_threads(), n // _SORT_PIECE))
    if pieces == 1:
        keys.sort()
        return
    cuts = [n * i // pieces for i in range(pieces + 1)]
    keys.partition(cuts[1:-1])
    spans = list(zip(cuts[:-1], cuts[1:]))
    parallel_map(lambda span: keys[span[0]:span[1]].sort(), spans,
                 sizes=[stop - start for start, stop in spans])


#: Each voxel's points in increasing row order, voxel after voxel, as the sort left them:
#: ``order`` (None: the rows are the low bits of the sorted keys, ``ordered & mask``),
#: ``ordered`` the sorted keys (with the rows below them when ``mask``), ``starts`` where
#: each voxel's points begin.
_Grouping = namedtuple("_Grouping", "order ordered mask starts")


def _grouped_rows(grouping, positions=None):
    """The rows at ``positions`` of the grouping's order (all of them for None)."""
    if grouping.order is not None:
        return grouping.order if positions is None else grouping.order.take(positions)
    if positions is None:
        return grouping.ordered & grouping.mask
    rows = grouping.ordered.take(positions)
    rows &= grouping.mask
    return rows


def _group_numpy(keys, row_bits):
    """``(unique_keys, inverse, grouping)`` of voxel keys, which it consumes.

    ``keys``: ``key << row_bits | row`` (``row_bits`` None: plain keys). ``unique_keys``:
    the sorted distinct keys; ``inverse``: each row's position among them; ``grouping``:
    a :data:`_Grouping`. Besides the results, only chunk-sized temporaries (and, for plain
    keys, the argsort's permutation and the sorted copy).
    """
    n = len(keys)
    if row_bits is None:   # keys and rows do not fit one int64: a stable argsort
        order = np.argsort(keys, kind="stable")
        ordered, mask = keys.take(order), 0
    else:
        _sort_distinct(keys)
        order, ordered, mask = None, keys, (1 << row_bits) - 1
    new = np.empty(n, bool)

    def compare(start, stop):   # a new voxel where the keys above the row bits change
        if start == 0:
            new[:1] = True
        low = max(start, 1)
        np.greater(ordered[low:stop] ^ ordered[low - 1:stop - 1], mask, out=new[low:stop])
        return int(np.count_nonzero(new[start:stop]))

    offsets = np.cumsum([0] + _on_chunks(np, compare, n)).tolist()
    inverse = np.empty(n, np.int64)

    def scatter(start, stop):   # the rows are a permutation: the chunks write disjoint rows
        ranks = np.cumsum(new[start:stop])
        ranks += offsets[start // _CHUNK] - 1
        rows = order[start:stop] if order is not None else ordered[start:stop] & mask
        inverse[rows] = ranks

    _on_chunks(np, scatter, n)
    starts = np.flatnonzero(new)
    unique_keys = ordered.take(starts)
    if mask:
        unique_keys >>= row_bits
    return unique_keys, inverse, _Grouping(order, ordered, mask, starts)


def _row_view(data):
    """``data`` (k, C) as a 1-D array of one element per row when a row is 4, 8 or 16
    bytes (gathering single elements is several times faster than gathering rows), else
    None. Only copied, never computed on: the bits stay."""
    width = data.shape[1] * data.itemsize
    kind = {4: np.int32, 8: np.int64, 16: np.complex128}.get(width)
    if kind is None or not data.flags.c_contiguous or data.ctypes.data % 16:
        return None
    return data.view(kind).reshape(-1)


def _take_rows(data, rows):
    """``data.take(rows, axis=0)``, chunk by chunk on the thread pool."""
    view = _row_view(data)
    source = data if view is None else view
    out = np.empty((len(rows),) + source.shape[1:], source.dtype)

    def work(start, stop):
        source.take(rows[start:stop], axis=0, out=out[start:stop])

    _on_chunks(np, work, len(rows))
    return out if view is None else out.view(data.dtype).reshape(len(rows), -1)


def _scatter_sums(data, ids, used, m):
    """``out[v] = sum of data[used][r] over the rows r with ids[r] == v``, each voxel's
    rows added one after another in row order in the data's dtype: the additions of
    segment_reduce's CSR product (and of bincount for float64). SciPy's compiled CSC
    product with one column per point walks the points in input order and adds each into
    its voxel's row of the output (no grouping, no gather of the rows), one chunk of
    points after the other, through chunk-sized index buffers."""
    channels = data.shape[1]
    k = len(ids)
    try:
        from scipy.sparse._sparsetools import csc_matvecs
    except ImportError:   # pragma: no cover - other SciPy layouts: the public matrix
        from scipy.sparse import csc_matrix
        matrix = csc_matrix((np.ones(k, data.dtype), ids, np.arange(k + 1)), shape=(m, k))
        return np.asarray(matrix @ (data if used is None else data[used]), data.dtype)
    out = np.zeros((m, channels), data.dtype)
    size = min(k, _CHUNK)
    pointers = np.arange(size + 1, dtype=ids.dtype)
    ones = np.ones(size, data.dtype)
    contiguous = used is None and data.flags.c_contiguous
    for start in range(0, k, _CHUNK):
        stop = min(start + _CHUNK, k)
        if contiguous:
            part = data[start:stop]
        else:
            part = np.ascontiguousarray(data[start:stop] if used is None else
                                        data.take(used[start:stop], axis=0))
        csc_matvecs(m, stop - start, channels, pointers, ids[start:stop], ones,
                    part.reshape(-1), out.reshape(-1))
    return out


def _segment_reduce_numpy(data, ids, used, m, mode, grouping=None):
    """``segment_reduce(data[used], ids, m, mode)`` for 'sum', 'mean', 'first', 'last' and
    ids covering every voxel, with the same bits (sums and means in row order, in the
    data's dtype), without gathering ``data[used]`` first. ``grouping``: see
    :func:`_reduce` (without it, 'first' / 'last' group the rows by a counting sort)."""
    if mode in ("sum", "mean"):
        counts = np.bincount(ids, minlength=m)
        if int(counts.max()) <= 1:   # one point per voxel: the point itself, as segment_reduce
            rows = np.empty(m, np.int64)
            rows[ids] = np.arange(len(ids)) if used is None else used
            return _take_rows(data, rows), None
        out = _scatter_sums(data, ids, used, m)
        if mode == "mean":
            # float32 / count rounds once, as in float32 (double rounding is harmless for
            # a quotient when the wider format has 2p + 2 bits or more)
            np.divide(out, counts[:, None], out=out)
        return out, None
    if grouping is None:
        from .cpu.index import group_rows
        order, indptr = group_rows(ids, m)
        order = np.arange(len(ids)) if order is None else order.astype(np.int64)
        chosen = order.take(indptr[:-1] if mode == "first" else indptr[1:] - 1)
    elif mode == "first":
        chosen = _grouped_rows(grouping, grouping.starts)
    else:
        ends = np.append(grouping.starts[1:], len(ids))
        ends -= 1
        chosen = _grouped_rows(grouping, ends)
    return _take_rows(data, chosen if used is None else used.take(chosen)), chosen

def _vote(xp, kernels, labels, ids, m, ignore_label, label_conflict):
    """Per-voxel labels: majority (ties: smallest), or ignore_label on conflict."""
    dtype = labels.dtype
    if m == 0:
        return xp.zeros(0, dtype)
    # distinct labels -> ranks; (voxel, rank) pairs -> counts
    label_values, _, rank = kernels.unique_inverse(labels.astype(np.int64))
    n_labels = len(label_values)
    pair_keys = ids * n_labels + rank
    pairs, _, pair_inverse = kernels.unique_inverse(pair_keys)
    pair_count = xp.bincount(pair_inverse, minlength=len(pairs))
    pair_voxel = pairs // n_labels
    pair_label = label_values[pairs % n_labels]
    if label_conflict == "ignore":
        distinct = xp.bincount(pair_voxel, minlength=m)
        first = xp.searchsorted(pair_voxel, xp.arange(m, dtype=np.int64))
        out = pair_label[first]
        out = xp.where(distinct > 1, int(ignore_label), out)
        return out.astype(dtype)
    score = pair_count.astype(np.float64)
    if ignore_label is not None:
        score = xp.where(pair_label == int(ignore_label), -1.0, score)
    # pairs are sorted by (voxel, label): the first maximum in row order is the smallest
    _, chosen = kernels.segment_reduce(score.reshape(-1, 1), pair_voxel, m, "max")
    return pair_label[chosen[:, 0]].astype(dtype)


# -- back to points ---------------------------------------------------------------------------
def _require_tensor(name, x):
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{name} must be a SparseTensor; got {type(x).__name__}")


def devoxelize(tensor, inverse):
    """Every point's voxel features: ``(N, C)``, zeros for dropped points (inverse -1).

    Differentiable in ``tensor.features`` (the gradient of a voxel is the sum over its
    points, in point order); an autodiff Tensor when the features are one.
    """
    from .functional import _differentiable
    _require_tensor("tensor", tensor)
    if isinstance(inverse, VoxelizeResult):
        inverse = inverse.inverse
    if not _is_array(inverse):
        raise TypeError(f"inverse must be the NumPy/CuPy int array voxelize returned; got "
                        f"{type(inverse).__name__}")
    if inverse.dtype == bool or inverse.dtype.kind not in "iu" or inverse.ndim != 1:
        raise TypeError(f"inverse must be a 1-D integer array; got dtype {inverse.dtype}, "
                        f"shape {inverse.shape}")
    features = data_of(tensor.features)
    backend.require_same_device("inverse", inverse, "the tensor", features)
    xp = backend.array_namespace(features)
    m, channels = features.shape
    if len(inverse):
        low, high = int(inverse.min()), int(inverse.max())
        if low < -1 or high >= m:
            raise ValueError(f"inverse must hold rows in [-1, {m}) (the tensor has {m} rows); "
                             f"got values in [{low}, {high}]")
    inverse = inverse.astype(np.int64, copy=False)
    live = inverse >= 0
    all_live = bool(live.all()) if len(inverse) else True
    rows = inverse if all_live else xp.where(live, inverse, 0)
    out = features[rows]
    if not all_live:
        out = out * live[:, None].astype(features.dtype)
    kernels = tensor.kernels

    def vjp(g):
        if all_live:
            return (kernels.segment_reduce(xp.ascontiguousarray(g), inverse, m, "sum")[0],)
        used = xp.flatnonzero(live)
        return (kernels.segment_reduce(xp.ascontiguousarray(g[used]), inverse[used], m,
                                       "sum")[0],)

    return _differentiable(out, (tensor.features,), vjp)


def trilinear(tensor, points, voxel_size, origin, missing="zero"):
    """Multilinear (D-linear) interpolation of voxel features at float points: ``(N, C)``.

    Voxel ``i``'s value sits at its centre ``origin + (i + 0.5) * voxel_size``; a point
    takes the ``2**D`` voxels around it weighted by the products of its fractional
    distances. ``points`` as in :func:`voxelize` (an (N, D) array: batch 0; a list: one
    cloud per batch index). ``missing='zero'``: inactive or off-grid neighbours count as
    zero (the interpolation of the zero-filled dense grid; linear in the features);
    ``missing='renormalize'``: the weights of the present neighbours are rescaled to sum
    to one (a point with none gets zeros). Differentiable in ``tensor.features``.
    """
    from .functional import _differentiable
    _require_tensor("tensor", tensor)
    if missing not in ("zero", "renormalize"):
        raise ValueError(f"missing must be 'zero' or 'renormalize'; got {missing!r}")
    ndim = tensor.dimension
    clouds, is_list = _clouds("points", points)
    for i, c in enumerate(clouds):
        if c.shape[1] != ndim:
            where = f"points[{i}]" if is_list else "points"
            raise ValueError(f"{where} must have D = {ndim} columns (the tensor's dimension); "
                             f"got shape {c.shape}")
    if len(clouds) > tensor.batch_size:
        raise ValueError(f"points has {len(clouds)} clouds but the tensor's batch_size is "
                         f"{tensor.batch_size}")
    voxel_size = _vector("voxel_size", voxel_size, ndim, positive=True)
    origin = _vector("origin", origin, ndim)
    features = data_of(tensor.features)
    xp = backend.array_namespace(features)
    for i, c in enumerate(clouds):
        backend.require_same_device(f"points[{i}]" if is_list else "points", c,
                                    "the tensor", features)
    sizes = [int(c.shape[0]) for c in clouds]
    n = sum(sizes)
    m, channels = features.shape
    coords = xp.concatenate([c.astype(np.float64, copy=False) for c in clouds]) if \
        len(clouds) > 1 else (clouds[0].astype(np.float64, copy=False) if clouds
                              else xp.zeros((0, ndim)))
    if n and not bool(xp.isfinite(coords).all()):
        row = int(xp.flatnonzero(~xp.isfinite(coords).all(axis=1))[0])
        raise ValueError(f"{_locate(row, sizes, is_list)} has a NaN or inf coordinate: "
                         f"{coords[row].tolist()}")
    batch = xp.repeat(xp.arange(len(clouds), dtype=np.int64), sizes) if len(clouds) > 1 else \
        xp.zeros(n, np.int64)
    kernels = tensor.kernels
    shape = tensor.spatial_shape
    site_keys, _ = pack_keys(tensor.indices, shape, tensor.batch_size)
    order = kernels.build_index(site_keys)
    sorted_keys = site_keys if order is None else site_keys[order]
    strides = packing_strides(shape, tensor.batch_size)

    base, frac = [], []
    for d in range(ndim):
        u = (coords[:, d] - origin[d]) / voxel_size[d] - 0.5
        lo = xp.floor(u)
        frac.append(u - lo)
        base.append(lo)
    corners = 1 << ndim
    rows = xp.empty((corners, n), np.int64)
    weights = xp.empty((corners, n), np.float64)
    for k in range(corners):
        w = xp.ones(n, np.float64)
        key = batch * int(strides[0])
        inside = xp.ones(n, bool)
        for d in range(ndim):
            bit = (k >> (ndim - 1 - d)) & 1
            cell = base[d] + bit
            w = w * (frac[d] if bit else 1.0 - frac[d])
            inside &= (cell >= 0) & (cell < shape[d])
            key = key + xp.where(inside, cell, 0).astype(np.int64) * int(strides[d + 1])
        found = kernels.query_index(sorted_keys, order, xp.where(inside, key, -1)) if m else \
            xp.full(n, -1, np.int32)
        found = xp.where(inside, found.astype(np.int64), -1)
        rows[k] = found
        weights[k] = xp.where(found >= 0, w, 0.0)
    if missing == "renormalize":
        total = weights.sum(axis=0)
        weights = weights / xp.where(total > 0, total, 1.0)
    weights = weights.astype(features.dtype)
    out = xp.zeros((n, channels), features.dtype)
    for k in range(corners):
        out += features[xp.maximum(rows[k], 0)] * weights[k][:, None]

    def vjp(g):
        live = xp.flatnonzero(rows.reshape(-1) >= 0)
        flat_rows = rows.reshape(-1)[live]
        contrib = (g[None, :, :] * weights[:, :, None]).reshape(-1, channels)[live]
        return (kernels.segment_reduce(xp.ascontiguousarray(contrib), flat_rows, m,
                                       "sum")[0],)

    return _differentiable(out, (tensor.features,), vjp)
