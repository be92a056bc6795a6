"""Exact tiled inference: receptive fields, stride alignment, tiles on Dask.

A network of :mod:`sparsegrid.nn` layers computes each output site from the input sites in
a bounded box around it, and its strided layers see the input on grids of stride 2, 4, ...
So a scene too large for one process can be cut into tiles on **one global voxel grid**
(one origin), each tile read with a halo at least the receptive field and starting at a
multiple of the total stride; each tile keeps the outputs it owns (its core) and the
stitched result equals the whole scene's. docs/distributed.md states the conditions.

* :func:`receptive_field` / :func:`total_stride` walk a model's layers (no forward pass).
* :func:`predict_tiled` runs the tiles in this process or, given a
  ``dask.distributed.Client``, on the cluster; :func:`predict_scene` runs the same model
  on the whole scene, on the grid tiling is exact against.

How a site depends on the input, per axis, in input voxels: a site of a grid of stride
``S`` at coordinate ``o`` sits at the *anchor* ``o * S`` and depends on the input sites in
``[anchor - lower, anchor + upper]``. A submanifold layer with filter ``f`` and dilation
``d`` adds ``(f // 2) * d * S`` below and ``(f - 1 - f // 2) * d * S`` above; a strided
convolution or pooling (filter ``f``, stride ``s``: its output ``o`` reads the finer sites
``o * s .. o * s + f - 1``) adds ``(f - 1) * S`` above and moves to stride ``S * s``; a
transposed op back to stride ``S' = S / s`` adds ``(f - 1) * S'`` below (the coarse sites
``p`` reads start as low as ``(p - f + 1) / s``) and joins the dependencies of the finer
sites it returns to. Branches join by the union. Each bound is attained for some site, so
the halo is exact, not padded.

Dask is imported only inside :func:`predict_tiled` when a client is given
(``pip install "sparsegrid[dask]"``).
"""

from __future__ import annotations

import numbers
import os
import time
from collections import namedtuple

import numpy as np

__all__ = ["NotTileable", "ReceptiveField", "receptive_field", "total_stride",
           "predict_tiled", "predict_scene", "TiledVoxels"]


class NotTileable(ValueError):
    """A model (or one of its layers) whose output at a site is not a function of a
    bounded neighbourhood of the input, so tiling cannot reproduce the whole scene."""


class ReceptiveField(namedtuple("ReceptiveField", "lower upper")):
    """The input voxels an output site depends on, per axis: from ``anchor - lower`` to
    ``anchor + upper`` (inclusive), the anchor being the site's coordinate times its
    grid's stride. ``radius`` is the per-axis maximum of the two (a symmetric halo)."""

    __slots__ = ()

    @property
    def radius(self):
        return tuple(max(a, b) for a, b in zip(self.lower, self.upper))


#: What predict_tiled returns with ``output='voxels'``: the output sites on the output
#: grid (global coordinates, int64 (M, D), sorted), their features (M, C), that grid's
#: stride in input voxels per axis, and the input grid's origin and voxel size.
TiledVoxels = namedtuple("TiledVoxels", "indices features stride origin voxel_size")


# -- the walk over a model's layers ---------------------------------------------------------
class _Field:
    """One tensor's place in the walk: its grid stride, dependency box, spatial size (when
    sizes are checked) and the stack of fields a transposed op returns to."""

    __slots__ = ("stride", "lower", "upper", "size", "stack")

    def __init__(self, stride, lower, upper, size, stack):
        self.stride, self.lower, self.upper, self.size, self.stack = \
            stride, lower, upper, size, stack


class _Walk:
    """State of one walk: the dimension, the strides met, the axes whose size failed."""

    def __init__(self, dimension, sizes):
        self.dimension = dimension
        self.strides = []
        self.bad = np.zeros(dimension, bool)
        self.check_sizes = sizes is not None


def _per_axis(value, dimension, where, what):
    values = np.broadcast_to(np.asarray(value, np.int64), (dimension,)).copy()
    if values.shape != (dimension,):   # pragma: no cover - broadcast_to raises first
        raise ValueError(f"{where}: {what} must have {dimension} values")
    return values


def _strided(walk, field, f, s, where):
    f = _per_axis(f, walk.dimension, where, "filter size")
    s = _per_axis(s, walk.dimension, where, "stride")
    size = None
    if field.size is not None:
        bad = (field.size < f) | ((field.size - f) % s != 0)
        walk.bad |= bad
        size = np.maximum((field.size - f) // s + 1, 1)
    stride = field.stride * s
    walk.strides.append(stride)
    return _Field(stride, field.lower.copy(), field.upper + (f - 1) * field.stride, size,
                  field.stack + (field,))


def _transposed(walk, field, f, s, where, generative=False):
    f = _per_axis(f, walk.dimension, where, "filter size")
    s = _per_axis(s, walk.dimension, where, "stride")
    if (field.stride % s).any():
        raise NotTileable(f"{where}: a transposed op of stride {tuple(s.tolist())} on a grid "
                          f"of stride {tuple(field.stride.tolist())} (in input voxels) "
                          "would make a grid finer than the input's")
    fine = field.stride // s
    lower = field.lower + (f - 1) * fine
    if generative:    # FullConvolution: new sites, a finer grid of its own
        size = None if field.size is None else (field.size - 1) * s + f
        walk.strides.append(fine)
        return _Field(fine, lower, field.upper.copy(), size, field.stack)
    if not field.stack:
        raise NotTileable(f"{where}: a Deconvolution/UnPooling without the strided op it "
                          "inverts before it")
    back = field.stack[-1]
    if not (back.stride == fine).all():
        raise NotTileable(f"{where}: goes back to a grid of stride {tuple(fine.tolist())}, "
                          f"but the strided op it inverts came from stride "
                          f"{tuple(back.stride.tolist())}")
    # the finer sites are the ones the strided op read: their dependencies join
    return _Field(fine, np.maximum(lower, back.lower), np.maximum(field.upper, back.upper),
                  back.size, back.stack)


def _local(field, below, above):
    return _Field(field.stride, field.lower + below * field.stride,
                  field.upper + above * field.stride, field.size, field.stack)


def _join(fields, where):
    if not isinstance(fields, list):
        raise NotTileable(f"{where}: expects the list of a ConcatTable's branches")
    first = fields[0]
    for i, other in enumerate(fields[1:], start=1):
        if not (other.stride == first.stride).all() or len(other.stack) != len(first.stack):
            raise NotTileable(f"{where}: branch {i} ends on a grid of stride "
                              f"{tuple(other.stride.tolist())}, branch 0 on "
                              f"{tuple(first.stride.tolist())}")
    return _Field(first.stride, np.max([f.lower for f in fields], axis=0),
                  np.max([f.upper for f in fields], axis=0), first.size, first.stack)


def _refuse(where, module, why):
    raise NotTileable(f"{where} ({type(module).__name__}) {why}, so a tile cannot reproduce "
                      "the whole scene's result; tiled inference needs every layer to "
                      "compute a site from a bounded neighbourhood")


def _visit(walk, module, field, where):
    """The field after ``module``; NotTileable for a layer that couples distant sites."""
    from .. import nn
    from ..coords import permutohedral_offsets
    from ..nn import generative, layers
    name = type(module).__name__
    where = f"layer {where!r}" if where else "the model"
    if isinstance(module, (generative.Cat, generative.Union, generative.Pruning,
                           nn.GenerativeConvolutionTranspose)):
        _refuse(where, module, "is not supported by the receptive-field walk")
    if isinstance(module, nn.Sequential):
        for child_name, child in module.named_children():
            field = _visit(walk, child, field, _child(where, child_name))
        return field
    if isinstance(module, nn.ConcatTable):
        if isinstance(field, list):
            raise NotTileable(f"{where}: a ConcatTable given a list of tensors")
        return [_visit(walk, child, field, _child(where, child_name))
                for child_name, child in module.named_children()]
    if isinstance(module, (nn.JoinTable, nn.AddTable)):
        return _join(field, where)
    if isinstance(field, list):
        raise NotTileable(f"{where} ({name}) is given the list of a ConcatTable's branches; "
                          "join them first (JoinTable / AddTable)")
    if isinstance(module, (layers.InputLayer, layers.OutputLayer, nn.Identity)):
        return field       # point rows <-> their voxels, or nothing: no neighbours
    training = module.training
    if isinstance(module, (layers.RandomizedStrideConvolution,
                           layers.RandomizedStrideMaxPooling)) and training:
        _refuse(where, module, "draws its window positions at random in training mode "
                "(call model.eval())")
    if isinstance(module, layers.Convolution):
        return _strided(walk, field, module.filter_size, module.filter_stride, where)
    if isinstance(module, (layers.MaxPooling, layers.AveragePooling,
                           layers.RandomizedStrideMaxPooling)):
        return _strided(walk, field, module.pool_size, module.pool_stride, where)
    if isinstance(module, layers.Deconvolution):
        return _transposed(walk, field, module.filter_size, module.filter_stride, where)
    if isinstance(module, layers.UnPooling):
        return _transposed(walk, field, module.pool_size, module.pool_stride, where)
    if isinstance(module, layers.FullConvolution):
        return _transposed(walk, field, module.filter_size, module.filter_stride, where,
                           generative=True)
    if isinstance(module, (layers.SubmanifoldConvolution, layers.ShapeContext)):
        f = _per_axis(module.filter_size, walk.dimension, where, "filter size")
        d = _per_axis(getattr(module, "dilation", 1), walk.dimension, where, "dilation")
        return _local(field, (f // 2) * d, (f - 1 - f // 2) * d)
    if isinstance(module, layers.PermutohedralSubmanifoldConvolution):
        offsets = permutohedral_offsets(walk.dimension)
        return _local(field, -offsets.min(axis=0), offsets.max(axis=0))
    if isinstance(module, (layers.BatchNormalization, layers.MeanOnlyBNLeakyReLU)):
        if training:
            _refuse(where, module, "is in training mode: it normalises by statistics over "
                    "every site of the batch (call model.eval() to use the running "
                    "statistics)")
        return field
    if isinstance(module, layers.Dropout):
        if training and module.p > 0:
            _refuse(where, module, "is in training mode: its random mask is drawn per "
                    "row of the tile (call model.eval())")
        return field
    if isinstance(module, (layers._Activation, layers.ELU, layers.LeakyReLU,
                           layers.NetworkInNetwork, layers.Linear)):
        return field       # per site (Linear on a SparseTensor: per site)
    if isinstance(module, layers._GlobalPooling):
        _refuse(where, module, "pools over every site of a sample")
    if isinstance(module, layers.SparseGroupNorm):
        _refuse(where, module, "normalises by statistics over every site of a sample")
    if isinstance(module, (layers.SparseToDense, layers.DenseToSparse, layers.Flatten)):
        _refuse(where, module, "converts to or from a dense array of the whole grid")
    if isinstance(module, layers.AddCoords):
        _refuse(where, module, "depends on absolute coordinates and the grid's size")
    _refuse(where, module, "is not a layer the receptive-field walk knows")


def _child(where, name):
    prefix = where[len("layer '"):-1] if where.startswith("layer '") else ""
    return f"{prefix}.{name}" if prefix else name


def _dimension_of(model):
    from ..nn.module import Module
    if not isinstance(model, Module):
        raise TypeError(f"model must be a sparsegrid.nn.Module; got {type(model).__name__}")
    for _, module in model.named_modules():
        d = getattr(module, "dimension", None)
        if isinstance(d, int):
            return d
    return None


def _walk(model, dimension=None, sizes=None):
    """(walk, final field) of ``model``; ``sizes``: check spatial sizes from these."""
    found = _dimension_of(model)
    if dimension is None:
        dimension = found
        if dimension is None:
            raise ValueError("receptive_field: no layer of the model says its dimension; "
                             "pass dimension=")
    elif found is not None and found != dimension:
        raise ValueError(f"the model is {found}-D; the data have {dimension} axes")
    walk = _Walk(dimension, sizes)
    zero = np.zeros(dimension, np.int64)
    start = _Field(np.ones(dimension, np.int64), zero, zero.copy(),
                   None if sizes is None else np.asarray(sizes, np.int64), ())
    field = _visit(walk, model, start, "")
    if isinstance(field, list):
        raise NotTileable("the model ends with a ConcatTable's list of tensors; join them "
                          "(JoinTable / AddTable) so it returns one tensor")
    return walk, field


def receptive_field(model, dimension=None):
    """The input voxels one output site of ``model`` depends on, per axis.

    Computed from the layers alone (no forward pass): submanifold convolutions (any filter
    size and dilation), ShapeContext, permutohedral convolutions, strided convolutions and
    pooling, Deconvolution / UnPooling back up (the union with the finer sites they return
    to), FullConvolution, ConcatTable branches joined by JoinTable / AddTable, and the
    per-site layers (NetworkInNetwork, Linear on sparse tensors, activations, Identity,
    batch norm in evaluation mode, dropout in evaluation mode or with p = 0).

    Parameters
    ----------
    model : sparsegrid.nn.Module
    dimension : int, optional
        The number of spatial axes, when no layer of the model says it.

    Returns
    -------
    ReceptiveField
        ``(lower, upper)``, tuples of D ints: an output site whose grid coordinate is ``o``
        on a grid of stride ``S`` depends exactly on the input sites in ``[o * S - lower,
        o * S + upper]`` (every bound attained for some site); ``.radius`` is the
        per-axis maximum.

    Raises
    ------
    NotTileable
        (a ValueError) naming the first layer whose output couples distant sites: global
        pooling, group norm, batch norm or dropout in training mode, randomized strides in
        training mode, dense conversion, AddCoords, or a layer the walk does not know.
    TypeError
        If ``model`` is not a sparsegrid.nn.Module.
    """
    _, field = _walk(model, dimension)
    return ReceptiveField(tuple(int(v) for v in field.lower),
                          tuple(int(v) for v in field.upper))


def total_stride(model, dimension=None):
    """The stride tiles of ``model``'s input must start at, per axis: the least common
    multiple of the strides of every grid the model's layers compute on (4 for a U-Net of
    three levels with stride 2), so each tile's strided grids are the whole scene's.

    Returns a tuple of D ints (1 for a model without strided layers). Raises as
    :func:`receptive_field`.
    """
    walk, _ = _walk(model, dimension)
    out = np.ones(walk.dimension, np.int64)
    for s in walk.strides:
        out = np.lcm(out, s)
    return tuple(int(v) for v in out)


def _fit_sizes(model, dimension, needed):
    """The smallest spatial sizes >= ``needed`` (per axis) every strided layer accepts
    (``(in - f) % s == 0`` and ``in >= f`` on every grid)."""
    needed = np.asarray(needed, np.int64)
    sizes = needed.copy()
    limit = needed + 1 + 64 * int(np.prod(total_stride(model, dimension))) + 1024
    while True:
        walk, _ = _walk(model, dimension, sizes)
        if not walk.bad.any():
            return sizes
        sizes[walk.bad] += 1
        if (sizes > limit).any():
            raise NotTileable("no spatial size near "
                              f"{tuple(needed.tolist())} satisfies every strided layer of "
                              "the model ((in - filter) % stride == 0 on each grid)")


class _Analysis:
    """What tiling needs to know about a model: dimension, receptive field, strides."""

    def __init__(self, model, dimension):
        walk, field = _walk(model, dimension)
        self.model = model
        self.dimension = walk.dimension
        self.lower = field.lower
        self.upper = field.upper
        self.output_stride = field.stride
        stride = np.ones(walk.dimension, np.int64)
        for s in walk.strides:
            stride = np.lcm(stride, s)
        self.total_stride = stride

    def fit(self, needed):
        return _fit_sizes(self.model, self.dimension, needed)


# -- arguments ------------------------------------------------------------------------------
def _network(model):
    """The model without a leading InputLayer / trailing OutputLayer (tiling voxelizes and
    maps back to the points itself), and the input layer's mode (or None)."""
    from ..nn import layers
    from ..nn.containers import Sequential
    from ..nn.module import Module
    if not isinstance(model, Module):
        raise TypeError(f"model must be a sparsegrid.nn.Module; got {type(model).__name__}")
    mode = None
    if isinstance(model, Sequential) and len(model) >= 1:
        items = list(model.named_children())
        if isinstance(items[0][1], layers.BLInputLayer) or \
                isinstance(items[-1][1], layers.BLOutputLayer):
            raise NotTileable("BLInputLayer / BLOutputLayer models take padded batches; "
                              "tiled inference needs an InputLayer (or none)")
        if isinstance(items[0][1], layers.InputLayer):
            mode = items[0][1].mode
            items = items[1:]
        if items and isinstance(items[-1][1], layers.OutputLayer):
            items = items[:-1]
        if len(items) != len(model):
            inner = Sequential()
            for name, child in items:
                inner.add_module(name, child)
            inner.training = model.training
            model = inner
    return model, mode


_MODE_REDUCE = {"sum": "sum", "mean": "mean", "first": "first", "last": "last",
                "max": "max"}


def _voxel_size(value, dimension):
    from ..pointcloud import _vector
    return _vector("voxel_size", value, dimension, positive=True)


def _tile_sizes(tile_size, dimension, stride):
    """Per-axis core sizes in voxels (None: the axis is not cut)."""
    if isinstance(tile_size, (bool, np.bool_)) or tile_size is None:
        raise TypeError(f"tile_size must be a positive int (voxels, x/y) or {dimension} "
                        f"ints or None (None: that axis is not cut); got {tile_size!r}")
    if isinstance(tile_size, (numbers.Integral, np.integer)):
        values = [int(tile_size)] * min(dimension, 2) + [None] * max(dimension - 2, 0)
    elif isinstance(tile_size, (list, tuple)):
        if len(tile_size) != dimension:
            raise ValueError(f"tile_size must have {dimension} entries (one per axis, None "
                             f"for an axis not cut); got {len(tile_size)}: {tile_size!r}")
        values = list(tile_size)
    else:
        raise TypeError(f"tile_size must be a positive int or a list of {dimension} ints or "
                        f"None; got {type(tile_size).__name__}")
    out = []
    for d, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (numbers.Integral, np.integer)):
            raise TypeError(f"tile_size[{d}] must be a positive int (voxels) or None; got "
                            f"{v!r}")
        v = int(v)
        s = int(stride[d])
        if v < 1 or v % s:
            lo = max(s, v // s * s)
            raise ValueError(f"tile_size[{d}] = {v} voxels: tiles must be a positive "
                             f"multiple of the model's total stride {s} on axis {d} so that "
                             f"its strided grids line up across tiles (try {lo} or "
                             f"{lo + s})")
        out.append(v)
    if all(v is None for v in out):
        raise ValueError("tile_size cuts no axis; use predict_scene for one tile")
    return out


def _halo(halo, analysis):
    d = analysis.dimension
    if halo is None:
        return analysis.lower.copy(), analysis.upper.copy()
    if isinstance(halo, ReceptiveField) or (isinstance(halo, tuple) and len(halo) == 2 and
                                            all(isinstance(h, (list, tuple)) for h in halo)):
        lower, upper = halo
    else:
        lower = upper = halo
    lower = np.broadcast_to(np.asarray(lower, np.int64), (d,)).copy()
    upper = np.broadcast_to(np.asarray(upper, np.int64), (d,)).copy()
    if (lower < 0).any() or (upper < 0).any():
        raise ValueError(f"halo must be non-negative voxels; got {halo!r}")
    return lower, upper


# -- one tile ---------------------------------------------------------------------------------
#: A tile: its core (owned input voxels) and the region read, in global voxels per axis.
_Tile = namedtuple("_Tile", "core_lo core_hi read_lo read_shape")


def _cells(points, origin, voxel_size):
    """Global voxel coordinates, int64 (N, D): ``floor((p - origin) / voxel_size)`` in
    float64, as :func:`sparsegrid.voxelize` computes them."""
    out = np.subtract(points.astype(np.float64, copy=False), np.asarray(origin, np.float64))
    out /= np.asarray(voxel_size, np.float64)
    np.floor(out, out=out)
    return out.astype(np.int64)


def _run_tile(model, points, features, rows, tile, setup):
    """Run ``model`` on one tile; returns ``(rows, predictions, stats)`` for per-point
    output or ``(indices, features, stats)`` for per-voxel output (global, core only)."""
    from ..autodiff.core import no_grad
    from ..pointcloud import voxelize
    from ..tensor import SparseTensor
    started = time.perf_counter()
    origin, voxel_size, reduce, output, out_stride, device = setup
    read_lo = np.asarray(tile.read_lo, np.int64)
    read_hi = read_lo + np.asarray(tile.read_shape, np.int64)
    cells = _cells(points, origin, voxel_size)
    inside = np.all((cells >= read_lo) & (cells < read_hi), axis=1)
    if not inside.all():
        keep = np.flatnonzero(inside)
        points, cells, rows = points[keep], cells[keep], rows[keep]
        features = None if features is None else features[keep]
    stats = {"points": int(len(points)), "voxels": 0, "core_voxels": 0, "seconds": 0.0,
             "pid": os.getpid()}
    core_lo = np.asarray(tile.core_lo, np.int64)
    core_hi = np.asarray(tile.core_hi, np.int64)
    dimension = len(read_lo)
    if len(points) == 0:
        empty = np.zeros((0, dimension), np.int64)
        return (np.zeros(0, np.int64) if output == "points" else empty), None, stats
    voxels = voxelize(points, voxel_size, features, reduce=reduce, origin=origin)
    tensor, inverse = voxels.tensor, voxels.inverse
    local = tensor.indices.astype(np.int64)
    local[:, 1:] -= read_lo
    x = SparseTensor(tensor.features, local.astype(np.int32), tuple(int(v) for v in
                                                                      tile.read_shape))
    if device is not None:
        x = x.to(device)
        model.to(device)
    with no_grad():
        y = model(x)
    if not isinstance(y, SparseTensor):
        raise TypeError(f"the model returned a {type(y).__name__}; tiled inference needs a "
                        "SparseTensor")
    values = y.features.data if hasattr(y.features, "data") else y.features
    from .. import backend
    values = backend.to_numpy(values) if backend.is_cupy_array(values) else np.asarray(values)
    stats["voxels"] = int(x.n_active)
    if output == "points":
        from ..functional import _same_sites
        if not _same_sites(y.sites, x.sites) and not (
                y.n_active == x.n_active and y.spatial_shape == x.spatial_shape and
                np.array_equal(backend.to_numpy(y.indices) if backend.is_cupy_array(y.indices)
                               else y.indices, local)):
            raise ValueError("output='points' needs a model whose output is on its input's "
                             f"sites (a segmentation network); this one returned "
                             f"{y.n_active} sites on a grid of shape {y.spatial_shape} for "
                             f"{x.n_active} input sites of shape {x.spatial_shape}: use "
                             "output='voxels'")
        mine = np.all((cells >= core_lo) & (cells < core_hi), axis=1)
        owned = np.flatnonzero(mine)
        owned_voxels = np.all((local[:, 1:] + read_lo >= core_lo) &
                              (local[:, 1:] + read_lo < core_hi), axis=1)
        stats["core_voxels"] = int(owned_voxels.sum())
        stats["seconds"] = time.perf_counter() - started
        return rows[owned], values[inverse[owned]], stats
    out_idx = backend.to_numpy(y.indices) if backend.is_cupy_array(y.indices) else y.indices
    anchors = out_idx[:, 1:].astype(np.int64) * out_stride + read_lo
    mine = np.flatnonzero(np.all((anchors >= core_lo) & (anchors < core_hi), axis=1))
    stats["core_voxels"] = int(len(mine))
    stats["seconds"] = time.perf_counter() - started
    return anchors[mine] // out_stride, values[mine], stats


# -- reading tiles from files ------------------------------------------------------------------
def _file_kind(path):
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext in (".las", ".laz"):
        return "las"
    if ext == ".ply":
        return "ply"
    raise ValueError(f"points_or_reader: a file must be .las, .laz or .ply; got {path!r}")


def _columns(source, names, n, where):
    """Feature columns ``names`` of a LAS chunk / PLY dict as float32 (n, C)."""
    if names is None:
        return None
    parts = []
    for name in names:
        if name in ("colors", "rgb"):
            value = source.get("colors") if isinstance(source, dict) else \
                np.stack([np.asarray(source[c]) for c in ("red", "green", "blue")], axis=1)
        elif isinstance(source, dict):
            value = source.get(name, source.get("properties", {}).get(name))
            if value is None and name == "labels":
                value = source.get("labels")
        else:
            value = np.asarray(source["classification" if name == "labels" else name])
        if value is None:
            raise ValueError(f"features: {where} has no field {name!r}")
        value = np.asarray(value, np.float32)
        parts.append(value.reshape(n, -1))
    return np.concatenate(parts, axis=1)


def _read_tile(path, tile, setup, names, chunk_size, scene_hi):
    """The points of ``path`` in the tile's read region, in file order: (points,
    features, rows). A LAS/LAZ file is decoded chunk by chunk and only the points in the
    region are kept (memory: one chunk plus the tile); a PLY file is read whole."""
    origin, voxel_size = setup[0], setup[1]
    read_lo = np.asarray(tile.read_lo, np.int64)
    read_hi = read_lo + np.asarray(tile.read_shape, np.int64)
    where = repr(os.fspath(path))
    kept_points, kept_features, kept_rows = [], [], []

    def take(points, source, start):
        cells = _cells(points, origin, voxel_size)
        if not np.isfinite(points).all():
            raise ValueError(f"{where}: a point has a non-finite coordinate")
        outside = np.any((cells < 0) | (cells >= scene_hi), axis=1)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise ValueError(f"{where}: point {start + i} ({points[i].tolist()}) lies outside "
                             f"the scene's grid (origin {tuple(origin)}, "
                             f"{tuple(int(v) for v in scene_hi)} voxels; from the header's "
                             "bounds unless origin/extent are given): pass origin= and "
                             "extent= that cover every point")
        keep = np.flatnonzero(np.all((cells >= read_lo) & (cells < read_hi), axis=1))
        kept_points.append(points[keep])
        kept_rows.append(keep + start)
        if names is not None:
            kept_features.append(_columns(source, names, len(points), where)[keep])

    if _file_kind(path) == "ply":
        from ..io import read_ply
        cloud = read_ply(path)
        take(np.asarray(cloud["points"], np.float64), cloud, 0)
    else:
        from ..io import _import_laspy
        laspy = _import_laspy("predict_tiled")
        with laspy.open(os.fspath(path)) as reader:
            start = 0
            for chunk in reader.chunk_iterator(int(chunk_size)):
                points = np.stack([np.asarray(chunk.x), np.asarray(chunk.y),
                                   np.asarray(chunk.z)], axis=1)
                take(points, chunk, start)
                start += len(points)
    points = np.concatenate(kept_points) if kept_points else np.zeros((0, 3))
    rows = np.concatenate(kept_rows) if kept_rows else np.zeros(0, np.int64)
    features = None if names is None else (np.concatenate(kept_features) if kept_features
                                           else np.zeros((0, 1), np.float32))
    return points, features, rows


def _file_tile(model, path, tile, setup, names, chunk_size, scene_hi):
    points, features, rows = _read_tile(path, tile, setup, names, chunk_size, scene_hi)
    return _run_tile(model, points, features, rows, tile, setup)


def _file_header(path):
    """(point count, mins, maxs) of a LAS/LAZ header, or of a PLY file (read whole)."""
    if _file_kind(path) == "ply":
        from ..io import read_ply
        points = np.asarray(read_ply(path)["points"], np.float64)
        if len(points) == 0:
            return 0, np.zeros(3), np.zeros(3)
        return len(points), points.min(axis=0), points.max(axis=0)
    from ..io import _import_laspy
    laspy = _import_laspy("predict_tiled")
    with laspy.open(os.fspath(path)) as reader:
        h = reader.header
        return int(h.point_count), np.array(h.mins, np.float64), np.array(h.maxs, np.float64)


# -- the plan ---------------------------------------------------------------------------------
def _plan(analysis, extent, tiles, halo, align, occupied=None):
    """The tiles over a scene of ``extent`` voxels per axis (cores of ``tiles`` voxels on
    the cut axes), each read with the halo and its start rounded down to ``align``."""
    lower, upper = halo
    out_stride = analysis.output_stride
    counts = [1 if t is None else -(-int(extent[a]) // t) for a, t in enumerate(tiles)]
    plan = []
    for index in np.ndindex(*counts):
        core_lo = np.array([0 if t is None else i * t for i, t in zip(index, tiles)], np.int64)
        core_hi = np.array([extent[a] if t is None else min((i + 1) * t, extent[a])
                            for a, (i, t) in enumerate(zip(index, tiles))], np.int64)
        # the last owned anchor is below core_hi on the output grid
        last_anchor = (core_hi - 1) // out_stride * out_stride
        read_lo = np.maximum(core_lo - lower, 0) // align * align
        need = last_anchor + upper + 1 - read_lo
        cut = np.array([t is not None for t in tiles])
        read_lo = np.where(cut, read_lo, 0)
        need = np.where(cut, need, extent + upper)
        if occupied is not None:
            # skip a tile only when no point lies in its whole read region (an empty core
            # may still own output sites, e.g. strided windows reaching into the next)
            window = tuple(slice(0, 1) if t is None else
                           slice(int(read_lo[a]) // t, -(-int(read_lo[a] + need[a]) // t))
                           for a, t in enumerate(tiles))
            if not occupied[window].any():
                continue
        plan.append(_Tile(tuple(core_lo.tolist()), tuple(core_hi.tolist()),
                          tuple(read_lo.tolist()), tuple(int(v) for v in
                                                         analysis.fit(need).tolist())))
    return plan, counts


def _setup(model, dimension, reduce, output, device):
    network, mode = _network(model)
    analysis = _Analysis(network, dimension)
    if reduce is None:
        if mode is not None and mode not in _MODE_REDUCE:
            raise ValueError(f"the model's InputLayer merges duplicates with mode {mode!r}, "
                             "which voxelization does not offer; pass reduce=")
        reduce = _MODE_REDUCE.get(mode, "mean")
    if output not in ("points", "voxels"):
        raise ValueError(f"output must be 'points' or 'voxels'; got {output!r}")
    if output == "points" and (analysis.output_stride != 1).any():
        raise ValueError("output='points' needs a model whose output is on its input's "
                         "sites; this model ends on a grid of stride "
                         f"{tuple(analysis.output_stride.tolist())}: use output='voxels'")
    return network, analysis, reduce


def _points_input(points, features, dimension_hint):
    if not isinstance(points, np.ndarray):
        raise TypeError("points_or_reader must be a NumPy (N, D) array of coordinates or a "
                        f"path to a .las/.laz/.ply file; got {type(points).__name__}")
    if points.ndim != 2 or points.dtype.kind not in "iuf" or points.dtype == bool:
        raise ValueError("points must be a real (N, D) array; got shape "
                         f"{points.shape}, dtype {points.dtype}")
    if dimension_hint is not None and points.shape[1] != dimension_hint:
        raise ValueError(f"the model is {dimension_hint}-D; points have {points.shape[1]} "
                         "columns")
    if features is not None:
        if not isinstance(features, np.ndarray) or features.ndim != 2 or \
                len(features) != len(points):
            raise ValueError(f"features must be a (N, C) array with N = {len(points)} rows "
                             f"(one per point); got "
                             f"{getattr(features, 'shape', type(features).__name__)}")
    if not np.isfinite(points).all():
        i = int(np.flatnonzero(~np.isfinite(points).all(axis=1))[0])
        raise ValueError(f"points: row {i} has a non-finite coordinate {points[i].tolist()}")


def _default_origin(lows, voxel_size):
    return tuple(float(np.floor(lo / v) * v) for lo, v in zip(lows, voxel_size))


def _origin_arg(origin, dimension):
    from ..pointcloud import _vector
    return _vector("origin", origin, dimension)


def predict_scene(model, points, voxel_size, features=None, origin=None, reduce=None,
                  output="points", device=None, return_info=False):
    """Whole-scene inference on the grid :func:`predict_tiled` is exact against.

    The points are voxelized at ``origin`` (default: the minimum corner floored to a
    multiple of ``voxel_size``) on a grid reaching at least the receptive field's upper
    reach beyond the last occupied voxel (then rounded up to a size every strided layer
    accepts: any larger grid gives the same result), and the model runs once. Arguments
    and result as :func:`predict_tiled` (in-memory points only).
    """
    return _predict(model, points, voxel_size, None, features, origin, reduce, output,
                    None, None, None, device, return_info, False, None, 1_000_000)


def predict_tiled(model, points_or_reader, voxel_size, tile_size, client=None,
                  features=None, origin=None, extent=None, reduce=None, output="points",
                  halo=None, align=None, device=None, progress=None, return_info=False,
                  chunk_size=1_000_000):
    """Exact tiled inference over a large point cloud, in-process or on a Dask cluster.

    The scene is voxelized on one global grid (``origin``, ``voxel_size``); the cut axes
    (x and y by default) are split into cores of ``tile_size`` voxels; each tile reads its
    core plus a halo of the model's :func:`receptive_field`, its start rounded down to a
    multiple of the :func:`total_stride`, runs the model, and keeps the outputs whose
    site lies in its core. The stitched result equals :func:`predict_scene`'s (bit for bit
    on the CPU backend, see docs/distributed.md for which ops guarantee it).

    Parameters
    ----------
    model : sparsegrid.nn.Module
        In evaluation mode (``model.eval()``); maps a SparseTensor (one sample, the
        voxelized features) to a SparseTensor. A leading InputLayer and trailing
        OutputLayer are dropped (voxelization and the inverse map take their place; the
        input layer's mode gives the default ``reduce``).
    points_or_reader : float (N, D) array, or a path to a .las / .laz / .ply file
        A file is read per tile by the worker running the tile: LAS/LAZ decoded in
        chunks of ``chunk_size`` points, keeping only the tile's region (each tile decodes
        the whole file once: I/O grows with the number of tiles, memory with the tile);
        PLY is read whole by each tile (no chunked reader).
    voxel_size : float or D floats
    tile_size : int or D ints / None
        Core size in voxels; an int cuts x and y (axes 0, 1), a list gives each axis (None:
        not cut). Each must be a positive multiple of the model's total stride on its axis.
    client : dask.distributed.Client, optional
        Run the tiles on this cluster (the model is scattered to every worker once);
        without one they run here, one after the other.
    features : float (N, C) array (for an array input), or a list of field names (for a
        file: ``'intensity'``, ``'colors'``, ``'labels'`` or any LAS dimension / PLY
        property); None: one channel of ones (occupancy).
    origin : D floats, optional
        The grid's origin. Default: the points' minimum (the header's ``mins`` for LAS)
        floored to a multiple of ``voxel_size``.
    extent : D ints, optional
        (Files only) the scene's size in voxels from the origin; default from the
        header's ``maxs``. A point outside raises ValueError in the tile that meets it.
    reduce : str, optional
        How points in one voxel are merged (:func:`sparsegrid.voxelize`); default the
        InputLayer's mode or 'mean'.
    output : 'points' (default) or 'voxels'
        'points': an (N, C) array, one prediction per input point in input (file) order,
        through the voxel each point falls in (the model must return its input's sites);
        'voxels': a :class:`TiledVoxels` of every output site (any output grid, e.g. a
        strided VGG net's).
    halo : int, D ints or (lower, upper), optional
        Override the receptive field (for testing the exactness check: a smaller halo
        gives a different answer).
    align : int, optional
        Override the multiple tile starts are rounded to (default the total stride).
    device : str, optional
        Run each tile there (e.g. ``'cuda'``): the model is moved once per process.
    progress : bool, optional
        A progress bar over tiles (:func:`sparsegrid.progress.progress`).
    return_info : bool
        Also return a dict: ``tiles``, ``grid`` (tile counts per axis), ``voxels`` (voxels
        computed, halos included), ``core_voxels``, ``points_read``, ``seconds`` (per
        tile) and ``workers``.
    chunk_size : int
        Points decoded per LAS chunk.

    Returns
    -------
    (N, C) array, or TiledVoxels; with ``return_info`` a pair (result, info).

    Raises
    ------
    NotTileable
        If the model couples distant sites (see :func:`receptive_field`).
    ValueError, TypeError
        For a tile size that is not a positive multiple of the total stride, points and
        model of different dimensions, points below the origin or outside the extent,
        features of the wrong length, and malformed arguments (each message names it).
    ImportError
        With a client when dask.distributed is missing (``pip install
        "sparsegrid[dask]"``), or for LAS files without laspy.
    """
    if tile_size is None:
        raise TypeError("tile_size must be a positive int (voxels) or D ints / None; got "
                        "None (predict_scene runs the whole scene as one tile)")
    return _predict(model, points_or_reader, voxel_size, tile_size, features, origin,
                    reduce, output, halo, align, client, device, return_info, progress,
                    extent, chunk_size)


def _predict(model, source, voxel_size, tile_size, features, origin, reduce, output, halo,
             align, client, device, return_info, progress, extent, chunk_size):
    from ..progress import progress as progress_bar
    is_file = isinstance(source, (str, os.PathLike))
    hint = _dimension_of(_network(model)[0])
    dimension = 3 if is_file else (source.shape[1] if isinstance(source, np.ndarray)
                                   and source.ndim == 2 else hint)
    if is_file and hint is not None and hint != 3:
        raise ValueError(f"the model is {hint}-D; point files hold 3-D points")
    if not is_file:
        _points_input(source, features, hint)
    elif features is not None and (isinstance(features, (str, np.ndarray)) or
                                   not all(isinstance(n, str) for n in features)):
        raise TypeError("features for a file must be a list of field names (e.g. "
                        f"['intensity']); got {features!r}")
    network, analysis, reduce = _setup(model, dimension, reduce, output, device)
    voxel_size = _voxel_size(voxel_size, dimension)
    if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(
            chunk_size, (numbers.Integral, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")

    # the scene: origin and extent in voxels
    if is_file:
        _file_kind(source)
        if not os.path.exists(source):
            raise FileNotFoundError(f"points_or_reader: no such file {os.fspath(source)!r}")
        n_points, lows, highs = _file_header(source)
        origin = _default_origin(lows, voxel_size) if origin is None else \
            _origin_arg(origin, dimension)
        if extent is None:
            scene = _cells(highs[None], origin, voxel_size)[0] + 1
        else:
            scene = _per_axis(extent, dimension, "extent", "extent")
            if (scene < 1).any():
                raise ValueError(f"extent must be positive voxels; got {extent!r}")
        scene = np.maximum(scene, 1)
        cells = None
    else:
        if extent is not None:
            raise ValueError("extent is for files; an array's extent is its points'")
        n_points = len(source)
        if origin is None:
            origin = _default_origin(source.min(axis=0) if n_points else
                                     np.zeros(dimension), voxel_size)
        else:
            origin = _origin_arg(origin, dimension)
        cells = _cells(source, origin, voxel_size)
        if n_points and (cells < 0).any():
            i = int(np.flatnonzero((cells < 0).any(axis=1))[0])
            raise ValueError(f"points: row {i} ({source[i].tolist()}) lies below origin "
                             f"{origin}: the global grid starts at the origin")
        scene = (cells.max(axis=0) + 1) if n_points else np.ones(dimension, np.int64)
    if tile_size is None:
        tiles = [None] * dimension
    else:
        if align is not None:
            if isinstance(align, (bool, np.bool_)) or not isinstance(
                    align, (numbers.Integral, np.integer)) or align < 1:
                raise ValueError(f"align must be a positive int; got {align!r}")
        tiles = _tile_sizes(tile_size, dimension, analysis.total_stride)
    align_to = analysis.total_stride if align is None else np.full(dimension, int(align))
    halo_box = _halo(halo, analysis)
    occupied = None
    if cells is not None and tile_size is not None and n_points:
        counts = [1 if t is None else -(-int(scene[a]) // t) for a, t in enumerate(tiles)]
        which = [np.zeros(n_points, np.int64) if t is None else cells[:, a] // t
                 for a, t in enumerate(tiles)]
        occupied = np.zeros(counts, bool)
        occupied[tuple(which)] = True
    if tile_size is None:
        plan = [_Tile((0,) * dimension, tuple(scene.tolist()), (0,) * dimension,
                      tuple(int(v) for v in analysis.fit(scene + analysis.upper)))]
        grid = [1] * dimension
    else:
        plan, grid = _plan(analysis, scene, tiles, halo_box, align_to, occupied)
    setup = (tuple(origin), tuple(voxel_size), reduce, output,
             tuple(int(v) for v in analysis.output_stride), device)

    # the points of each tile (arrays): grouped by core cell, gathered from the neighbours
    def tile_points(tile):
        read_lo = np.asarray(tile.read_lo)
        read_hi = read_lo + np.asarray(tile.read_shape)
        if tile_size is None:
            rows = np.arange(n_points)
        else:
            lo_cell = [0 if t is None else int(read_lo[a]) // t for a, t in enumerate(tiles)]
            hi_cell = [0 if t is None else min(int(read_hi[a] - 1) // t, grid[a] - 1)
                       for a, t in enumerate(tiles)]
            pieces = [order[starts[c]:starts[c + 1]] for c in
                      np.ravel_multi_index(np.stack(np.meshgrid(
                          *[np.arange(lo, hi + 1) for lo, hi in zip(lo_cell, hi_cell)],
                          indexing="ij")).reshape(dimension, -1), grid)]
            rows = np.sort(np.concatenate(pieces))       # input order: voxel sums match
            inside = np.all((cells[rows] >= read_lo) & (cells[rows] < read_hi), axis=1)
            rows = rows[inside]
        return (source[rows], None if features is None else features[rows], rows)

    if cells is not None and tile_size is not None:
        flat = np.ravel_multi_index(tuple(which), grid) if n_points else np.zeros(0, np.int64)
        order = np.argsort(flat, kind="stable")
        starts = np.searchsorted(flat[order], np.arange(int(np.prod(grid)) + 1))

    names = None if features is None else list(features) if is_file else None
    results = []
    bar = progress_bar(total=len(plan), desc="tiles", unit="tile", enable=progress)
    try:
        if client is None:
            for tile in plan:
                if is_file:
                    results.append(_file_tile(network, source, tile, setup, names,
                                              chunk_size, scene))
                else:
                    results.append(_run_tile(network, *tile_points(tile), tile, setup))
                bar.update(1)
        else:
            results = _on_cluster(client, network, plan, setup, is_file, source,
                                  tile_points, names, chunk_size, scene, bar)
    finally:
        bar.close()
    out = _stitch(results, output, n_points, setup, analysis)
    if not return_info:
        return out
    stats = [r[2] for r in results]
    info = {"tiles": len(plan), "grid": tuple(grid),
            "voxels": sum(s["voxels"] for s in stats),
            "core_voxels": sum(s["core_voxels"] for s in stats),
            "points_read": sum(s["points"] for s in stats),
            "seconds": [s["seconds"] for s in stats],
            "workers": sorted({s["pid"] for s in stats}),
            "read_shapes": [t.read_shape for t in plan]}
    return out, info


def _on_cluster(client, network, plan, setup, is_file, source, tile_points, names,
                chunk_size, scene, bar):
    try:
        from distributed import as_completed
    except ImportError as exc:
        raise ImportError("predict_tiled with a client needs dask.distributed: pip install "
                          "\"sparsegrid[dask]\"") from exc
    model_future = client.scatter(network, broadcast=True)
    # A sliding window of tiles in flight (two per worker thread): tiles are submitted
    # as earlier ones finish, so no worker (nor the scheduler) ever holds more than a few
    # tiles' points, whatever the scene's size.
    window = max(2 * sum(client.nthreads().values()), 2)

    def submit(i):
        tile = plan[i]
        if is_file:
            return client.submit(_file_tile, model_future, os.fspath(source), tile, setup,
                                 names, chunk_size, scene, pure=False)
        points, feats, rows = tile_points(tile)
        return client.submit(_run_tile, model_future, points, feats, rows, tile, setup,
                             pure=False)

    futures, pending, following = {}, as_completed(), 0

    def launch():
        nonlocal following
        future = submit(following)
        futures[future] = following
        pending.add(future)
        following += 1

    while following < min(window, len(plan)):
        launch()
    results = [None] * len(plan)
    for future in pending:
        results[futures.pop(future)] = future.result()
        future.release()
        bar.update(1)
        if following < len(plan):
            launch()
    return results


def _stitch(results, output, n_points, setup, analysis):
    if output == "points":
        channels = next((r[1].shape[1] for r in results if r[1] is not None), None)
        dtype = next((r[1].dtype for r in results if r[1] is not None), np.float32)
        out = np.zeros((n_points, channels or 0), dtype)
        seen = np.zeros(n_points, np.int64)
        for rows, values, _ in results:
            if values is None:
                continue
            out[rows] = values
            seen[rows] += 1
        if n_points and not (seen == 1).all():   # pragma: no cover - a bug, not an input
            raise RuntimeError(f"tiling covered {int((seen == 0).sum())} points no time and "
                               f"{int((seen > 1).sum())} more than once")
        return out
    d = analysis.dimension
    parts = [(idx, v) for idx, v, _ in results if v is not None and len(idx)]
    if parts:
        indices = np.concatenate([p[0] for p in parts])
        values = np.concatenate([p[1] for p in parts])
        order = np.lexsort(indices.T[::-1])
        indices, values = indices[order], values[order]
    else:
        indices = np.zeros((0, d), np.int64)
        values = np.zeros((0, 0), np.float32)
    return TiledVoxels(indices, values, tuple(int(v) for v in analysis.output_stride),
                       setup[0], setup[1])
