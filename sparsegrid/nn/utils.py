"""SparseConvNet's ``sparseconvnet.utils``: tensor helpers (``append_tensors``,
``compare_sparse``), input preparation (``prepare_BLInput``, ``batch_location_tensors``,
``pad_with_batch_idx``, ``voxelize_pointcloud``), checkpoints (``checkpoint_save``,
``checkpoint_restore``), geometry (``random_rotation``, ``squareroot_rotation``), number
tests (``is_power2`` ...), gradient checkpointing (``checkpoint101``), plots and exports.

Scripts call them as ``scn.<name>`` (``import sparsegrid.nn as scn``) or import them from
``sparsegrid.nn.utils`` as from ``sparseconvnet.utils``. Arguments are NumPy or CuPy
arrays (torch tensors are viewed through DLPack); results are NumPy/CuPy arrays where SCN
returns torch tensors, except ``prepare_BLInput``'s features, an autodiff Tensor (scripts
call torch methods such as ``.to(device)`` on them). Differences are listed in
docs/differences_from_scn.md.
"""

from __future__ import annotations

import glob as _glob
import math as _math
import os as _os
import re as _re
import types as _types
from collections import deque as _deque
from concurrent.futures import ThreadPoolExecutor as _ThreadPoolExecutor

import numpy as np

from .. import backend

from ..autodiff import ops
from ..autodiff.core import Tensor as _Tensor
from ..autodiff.core import data_of as _data_of
from ..autodiff.core import record as _record
from ..coords import pack_keys
from ..tensor import SparseTensor
from .layers import _integral_coordinates, _tensor_features


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


# =========================================================================================
# SparseConvNet's ``sparseconvnet.utils``: the functions scripts call as ``scn.<name>``
# (re-exported by sparsegrid.nn), with SCN's names, arguments and results, on NumPy/CuPy
# arrays instead of torch tensors. Differences are in docs/differences_from_scn.md.
# =========================================================================================


def _host_or_device(value, name):
    """An array argument as NumPy/CuPy (torch and other DLPack arrays viewed, Tensors
    unwrapped, lists converted); TypeError naming ``name`` for anything else."""
    from ..interop import asarray
    if isinstance(value, _Tensor):
        return value.data
    if hasattr(value, "detach") and hasattr(value, "numpy"):     # a torch tensor
        value = value.detach()
    value = asarray(value, name)
    if isinstance(value, (list, tuple)):
        value = np.asarray(value)
    if not (isinstance(value, np.ndarray) or backend.is_cupy_array(value)):
        raise TypeError(f"{name} must be an array; got {type(value).__name__}")
    return value


def toLongTensor(dimension, x):
    """SCN's ``toLongTensor``: ``x`` (an int, D ints or an integer array of D) as an int64
    array (D,); an int is repeated D times.

    Raises ValueError when a sequence does not have ``dimension`` entries, TypeError for
    non-integers."""
    from ..coords import normalize_size
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if hasattr(x, "tolist") and not isinstance(x, (int, np.integer)):
        x = backend.to_numpy(x).tolist()
    return np.asarray(normalize_size(x, int(dimension), "toLongTensor: x"), np.int64)


def optionalTensor(a, b):
    """SCN's ``optionalTensor``: attribute ``b`` of ``a``, or an empty float32 array when
    ``a`` has no such attribute or it is None (a layer built with ``bias=False``)."""
    value = getattr(a, b, None)
    return np.zeros(0, np.float32) if value is None else value


def optionalTensorReturn(a):
    """SCN's ``optionalTensorReturn``: ``a``, or None when it has no elements."""
    return a if _data_of(a).size else None


def threadDatasetIterator(d, n_threads=8, prefetch=16):
    """SCN's ``threadDatasetIterator``: a function returning an iterator over ``d[0]``,
    ``d[1]``, ... (``len(d)`` items) loaded by ``n_threads`` threads, up to ``prefetch``
    items ahead.

    Items come in index order (SCN's come in whatever order its 8 threads finish). An
    exception raised by ``d[k]`` is raised by the iterator at item ``k``. Stopping early
    cancels the loads not yet started.
    """
    n = len(d)
    n_threads = max(1, int(n_threads))
    prefetch = max(1, int(prefetch))

    def iterator():
        pool = _ThreadPoolExecutor(n_threads)
        try:
            pending = _deque()
            for k in range(min(prefetch, n)):
                pending.append(pool.submit(d.__getitem__, k))
            following = len(pending)
            while pending:
                item = pending.popleft().result()
                if following < n:
                    pending.append(pool.submit(d.__getitem__, following))
                    following += 1
                yield item
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    return iterator


def _int_value(owner, num):
    """``num`` as a Python int when it is integral (an int, or a whole float), else None."""
    if isinstance(num, (bool, np.bool_)):
        return None
    if isinstance(num, (int, np.integer)):
        return int(num)
    if isinstance(num, (float, np.floating)) and _math.isfinite(num) and float(num).is_integer():
        return int(num)
    raise TypeError(f"{owner}: expected an integer; got {num!r} ({type(num).__name__})")


def is_power2(num):
    """SCN's ``is_power2``: whether the integer ``num`` is 1, 2, 4, 8, ... (False for 0
    and negative numbers). TypeError for non-integers."""
    n = _int_value("is_power2", num)
    return n is not None and n > 0 and (n & (n - 1)) == 0


def is_square(num):
    """SCN's ``is_square``: whether the integer ``num`` is a perfect square (0, 1, 4, 9,
    ...); exact for any size (SCN's float square root is not beyond 2**52)."""
    n = _int_value("is_square", num)
    return n is not None and n >= 0 and _math.isqrt(n) ** 2 == n


def has_only_one_nonzero_digit(num):
    """SCN's ``has_only_one_nonzero_digit`` (OEIS A037124: 1..9, 10, 20, ..., 90, 100,
    ...): whether the positive integer ``num`` has exactly one non-zero decimal digit.
    Exact (SCN's goes through a float logarithm)."""
    n = _int_value("has_only_one_nonzero_digit", num)
    return n is not None and n > 0 and len(str(n).rstrip("0")) == 1


def pad_with_batch_idx(x, idx):
    """SCN's ``pad_with_batch_idx``: coordinates ``x`` (N, D) with a last column of batch
    index ``idx``, int64 (N, D + 1), in ``x``'s array library (NumPy or CuPy).

    ``x`` holds integers, or floats with whole-number values (ValueError naming the row
    otherwise)."""
    x = _host_or_device(x, "x")
    if x.ndim != 2:
        raise ValueError(f"pad_with_batch_idx: x must have shape (N, D); got {x.shape}")
    idx = _int_value("pad_with_batch_idx: idx", idx)
    x = _integral_coordinates(x, "pad_with_batch_idx: x").astype(np.int64)
    xp = backend.array_namespace(x)
    return xp.concatenate([x, xp.full((len(x), 1), idx, np.int64)], axis=1)


def batch_location_tensors(location_tensors):
    """SCN's ``batch_location_tensors``: one (N, D + 1) int64 array of every sample's
    coordinates (N_b, D), each with its position in the list as the batch index (last
    column), skipping empty samples, as InputLayer takes them.

    Raises ValueError for an empty list or samples of different D; an all-empty batch
    gives a (0, D + 1) array (SCN fails)."""
    location_tensors = [_host_or_device(t, f"location_tensors[{i}]")
                        for i, t in enumerate(location_tensors)]
    if not location_tensors:
        raise ValueError("batch_location_tensors: got an empty list (no sample says D)")
    dims = {t.shape[1] if t.ndim == 2 else None for t in location_tensors}
    if len(dims) != 1 or None in dims:
        raise ValueError(f"batch_location_tensors: every sample must be (N_b, D) with one D; "
                         f"got shapes {[t.shape for t in location_tensors]}")
    parts = [pad_with_batch_idx(t, i) for i, t in enumerate(location_tensors) if t.size]
    xp = backend.array_namespace(*location_tensors)
    if not parts:
        return xp.zeros((0, dims.pop() + 1), np.int64)
    return xp.concatenate(parts, axis=0)


def prepare_BLInput(batch):
    """SCN's ``prepare_BLInput``: a list of samples ``(locations (n_b, D), features (n_b,
    C))`` -> ``[L, F]`` for BLInputLayer: ``L`` int64 (B, n, D) padded with -1 (an empty
    row) and ``F`` (B, n, C) padded with 0, n the largest n_b.

    ``F`` is float32 (SCN's type) unless every sample's features are float64. Locations
    may be whole-number floats. NumPy or CuPy, as the inputs. ``L`` is an array and ``F``
    an autodiff Tensor that records nothing (SCN builds both under ``no_grad``), so the
    torch methods scripts call on SCN's features (``F.to(device)``, ``F.cuda()``,
    ``F.type(...)``) work on it.

    Raises ValueError for an empty batch, mismatched row counts or column counts."""
    batch = list(batch)
    if not batch:
        raise ValueError("prepare_BLInput: got an empty batch")
    locations, features = [], []
    for i, sample in enumerate(batch):
        if not isinstance(sample, (list, tuple)) or len(sample) != 2:
            raise TypeError(f"prepare_BLInput: sample {i} must be a pair (locations, "
                            f"features); got {type(sample).__name__}")
        loc = _host_or_device(sample[0], f"batch[{i}][0] (locations)")
        feat = _host_or_device(sample[1], f"batch[{i}][1] (features)")
        if loc.ndim != 2 or feat.ndim != 2 or len(loc) != len(feat):
            raise ValueError(f"prepare_BLInput: sample {i} needs locations (n, D) and "
                             f"features (n, C) with one n; got {loc.shape} and {feat.shape}")
        locations.append(_integral_coordinates(loc, f"batch[{i}][0] (locations)"))
        features.append(feat)
    for name, arrays in (("locations", locations), ("features", features)):
        widths = {a.shape[1] for a in arrays}
        if len(widths) != 1:
            raise ValueError(f"prepare_BLInput: every sample's {name} must have the same "
                             f"number of columns; got {[a.shape for a in arrays]}")
    xp = backend.array_namespace(*locations, *features)
    counts = np.array([len(a) for a in locations], np.int64)
    b, n = len(batch), int(counts.max())
    dtype = np.float64 if all(f.dtype == np.float64 for f in features) else np.float32
    L = xp.full((b, n, locations[0].shape[1]), -1, np.int64)
    F = xp.zeros((b, n, features[0].shape[1]), dtype)
    sample = xp.asarray(np.repeat(np.arange(b), counts))
    row = xp.asarray(np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts,
                                                              counts))
    L[sample, row] = xp.concatenate(locations, axis=0)
    F[sample, row] = xp.concatenate([f.astype(dtype) for f in features], axis=0)
    return [L, _Tensor(F)]


# -- checkpoints ----------------------------------------------------------------------------
def _checkpoint_name(exp_name, name2, epoch):
    return f"{exp_name}-{int(epoch):09d}-{name2}.pth"


def checkpoint_save(model, exp_name, name2, epoch, use_cuda=True):
    """SCN's ``checkpoint_save``: write ``model``'s state dict to
    ``'<exp_name>-<epoch, 9 digits>-<name2>.pth'``, then delete the previous epoch's file
    unless that epoch is a power of two (to save disk space), as SCN does.

    The file is sparsegrid's weights file (:func:`sparsegrid.nn.checkpoint.save_state_dict`:
    an ``.npz`` archive under the ``.pth`` name, written atomically), not a torch pickle.
    State dicts are host copies, so the model is not moved to the CPU to save it; with
    ``use_cuda`` it is moved to the current GPU afterwards, as SCN leaves it.
    """
    from .checkpoint import save_state_dict
    epoch = _int_value("checkpoint_save: epoch", epoch)
    save_state_dict(_checkpoint_name(exp_name, name2, epoch), model.state_dict())
    if use_cuda:
        model.cuda()
    previous = _checkpoint_name(exp_name, name2, epoch - 1)
    if _os.path.isfile(previous) and not is_power2(epoch - 1):
        _os.remove(previous)


def checkpoint_restore(model, exp_name, name2, use_cuda=True, epoch=0):
    """SCN's ``checkpoint_restore``: load ``model`` from the checkpoint of ``epoch``
    (``epoch > 0``; FileNotFoundError if it is missing) or, with ``epoch=0``, from the
    latest ``'<exp_name>-<9 digits>-<name2>.pth'`` there is (none: the model is left as
    it is). Prints ``'Restore from <file>'`` as SCN. Returns the epoch to train next:
    the restored epoch + 1 (1 when nothing was restored).

    Files of :func:`checkpoint_save` (or any sparsegrid weights file / checkpoint); SCN's
    torch pickles need converting first (``torch.load`` then
    ``sparsegrid.nn.checkpoint.save_state_dict``). With ``use_cuda`` the model is moved
    to the current GPU afterwards, as SCN does. The latest file is the one with the
    largest epoch number (SCN sorts names, the same for epochs below 10**9).
    """
    from .checkpoint import load_state_dict
    epoch = _int_value("checkpoint_restore: epoch", epoch)
    if epoch > 0:
        path = _checkpoint_name(exp_name, name2, epoch)
        if not _os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint_restore: no checkpoint {path!r} of epoch "
                                    f"{epoch}")
    else:
        pattern = _re.compile(_re.escape(_os.path.basename(exp_name)) + r"-(\d{9,})-" +
                              _re.escape(name2) + r"\.pth")
        found = []
        for path in _glob.glob(_glob.escape(exp_name) + "-*-" + _glob.escape(name2) + ".pth"):
            match = pattern.fullmatch(_os.path.basename(path))
            if match:
                found.append((int(match.group(1)), path))
        path = None
        if found:
            epoch, path = max(found)
    if path is not None:
        print("Restore from " + path)
        model.load_state_dict(load_state_dict(path))
    if use_cuda:
        model.cuda()
    return epoch + 1


# -- geometry -------------------------------------------------------------------------------
def random_rotation(dimension=3, allow_mirror=False):
    """SCN's ``random_rotation``: a random orthogonal (D, D) float32 matrix, uniformly
    distributed (Haar): a rotation (determinant +1), or with ``allow_mirror`` a rotation
    or a reflection with equal probability.

    Drawn from :func:`sparsegrid.nn.default_rng` (seed it with ``manual_seed``). SCN's
    version fails for ``dimension != 3`` (its sign vector has 3 entries); this one takes
    any D >= 1.
    """
    from .module import default_rng
    d = _int_value("random_rotation: dimension", dimension)
    if d is None or d < 1:
        raise ValueError(f"random_rotation: dimension must be a positive int; got {dimension!r}")
    rng = default_rng()
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)     # Haar on O(D): det +1 or -1 equally
    if not allow_mirror and np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]                           # Haar on SO(D)
    return q.astype(np.float32)


def squareroot_rotation(a):
    """SCN's ``squareroot_rotation``: the rotation half-way from the identity to the 3-D
    rotation ``a`` (slerp at 1/2), float32 (3, 3): applied twice it gives ``a``.

    Uses SciPy's ``Rotation`` (``from_matrix``; SCN's ``from_dcm`` is gone from SciPy).
    Raises ValueError unless ``a`` is a 3 x 3 rotation."""
    from scipy.spatial.transform import Rotation
    a = np.asarray(backend.to_numpy(_host_or_device(a, "a")), np.float64)
    if a.shape != (3, 3) or not np.allclose(a @ a.T, np.eye(3), atol=1e-4) or \
            np.linalg.det(a) < 0:
        raise ValueError(f"squareroot_rotation: a must be a 3 x 3 rotation matrix; got shape "
                         f"{a.shape}" + (f", determinant {np.linalg.det(a):.3g}"
                                         if a.shape == (3, 3) else ""))
    half = Rotation.from_rotvec(Rotation.from_matrix(a).as_rotvec() / 2)
    return half.as_matrix().astype(np.float32)


def voxelize_pointcloud(xyz, rgb, average=True, accumulate=False):
    """SCN's ``voxelize_pointcloud``: merge the points that share a location.

    Parameters
    ----------
    xyz : (N, D) array (D = 1..10): the points' locations (usually integer voxel
        coordinates); rows that are exactly equal are merged. NumPy, CuPy or DLPack.
    rgb : (N, C) array: the points' features.
    average : bool
        Each location gets the mean of its points' features (SCN's default).
    accumulate : bool
        Without ``average``: the sum of its points' features.

    With neither, each location keeps its first point's features.

    Returns
    -------
    (xyz, rgb)
        The distinct locations, sorted lexicographically (as ``np.unique(axis=0)``), in
        ``xyz``'s dtype, and their features: the first point's (any dtype) or the mean /
        sum (float32, or float64 for float64 features, as SCN's float32). Empty input is
        returned as it is.

    Built on :func:`sparsegrid.voxelize`: every distinct row gets a dense rank in
    lexicographic order (the axes' ranks combined one axis at a time, so keys stay below
    N**2 in any dimension), and the points are voxelized on the 1-D grid of those ranks,
    so equal rows (and only those) share a voxel whatever their values (negative,
    fractional, large).

    Raises
    ------
    ValueError
        For non-finite locations (naming the row) or mismatched shapes.
    """
    from ..pointcloud import voxelize
    xyz = _host_or_device(xyz, "xyz")
    rgb = _host_or_device(rgb, "rgb")
    if xyz.ndim != 2 or rgb.ndim != 2 or len(xyz) != len(rgb):
        raise ValueError(f"voxelize_pointcloud: xyz must be (N, D) and rgb (N, C) with one N; "
                         f"got {xyz.shape} and {rgb.shape}")
    if xyz.size == 0 or len(xyz) == 0:
        return xyz, rgb
    xp = backend.array_namespace(xyz, rgb)
    if xyz.dtype.kind == "f":
        bad = ~xp.isfinite(xyz).all(axis=1)
        if bool(bad.any()):
            row = int(xp.flatnonzero(bad)[0])
            raise ValueError(f"voxelize_pointcloud: xyz row {row} is not finite: "
                             f"{xyz[row].tolist()}")
    elif xyz.dtype.kind not in "iub":
        raise TypeError(f"voxelize_pointcloud: xyz must be numeric; got dtype {xyz.dtype}")
    # One dense rank per distinct row, in lexicographic order, combined one axis at a
    # time (rank * n_d + rank_d, re-ranked), so every key stays below N**2 whatever D is:
    # a rank grid of all axes at once would overflow int64 (100 points in 10-D).
    key = None
    for axis in range(xyz.shape[1]):                # one sort per axis (D <= 10)
        distinct, rank = xp.unique(xyz[:, axis], return_inverse=True)
        rank = rank.reshape(-1).astype(np.int64)
        if key is None:
            key = rank
        else:
            key = xp.unique(key * len(distinct) + rank, return_inverse=True)[1].reshape(-1)
    points = key.astype(np.float64)[:, None]        # a 1-D cloud of row ranks, exact
    if average or accumulate:
        feats = rgb if rgb.dtype in (np.float32, np.float64) else rgb.astype(np.float32)
        tensor = voxelize(points, 1.0, features=feats, reduce="mean" if average else "sum",
                          origin=[0.0])[0]
        out_rgb = _data_of(tensor.features)
    else:
        rows = xp.arange(len(xyz), dtype=np.float64)[:, None]     # exact below 2**53
        tensor = voxelize(points, 1.0, features=rows, reduce="first", origin=[0.0])[0]
        out_rgb = rgb[_data_of(tensor.features)[:, 0].astype(np.int64)]
    # the voxels are the ranks 0..M-1 in order; each row's location from its first point
    first = xp.unique(key, return_index=True)[1]
    out_xyz = xyz[first]
    return out_xyz, out_rgb


# -- networks -------------------------------------------------------------------------------
def spectral_norm_svd(module):
    """SCN's ``spectral_norm_svd``: the largest singular value of ``module.weight``,
    differentiable (an autodiff Tensor scalar; its gradient is ``u v^T``).

    A 3-D or 4-D convolution weight (K, Cin, Cout) / (K, G, Cin/G, Cout/G) is read as a
    matrix of its last axis' columns, (-1, Cout) (SCN's ``view(-1, w.size(2))`` for 3-D
    weights); a 2-D weight as it is."""
    weight = getattr(module, "weight", None)
    if weight is None:
        raise TypeError(f"spectral_norm_svd: {type(module).__name__} has no weight")
    w = _data_of(weight)
    matrix = w.reshape(-1, w.shape[-1]) if w.ndim >= 3 else w
    if matrix.ndim != 2:
        raise ValueError(f"spectral_norm_svd: weight must have 2 to 4 axes; got {w.shape}")
    xp = backend.array_namespace(matrix)
    u, s, vt = xp.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    sigma = s[0].astype(w.dtype)

    def vjp(g):
        return ((g * xp.outer(u[:, 0], vt[0])).astype(w.dtype).reshape(w.shape),)

    return _record(sigma, (weight,), vjp)


def checkpoint101(run_function, x, down=1):
    """SCN's ``checkpoint101``: ``run_function(x)`` without keeping its intermediate
    results for the backward pass (gradient checkpointing); the backward pass runs it
    again. Returns its output on the sites of spatial size ``x.spatial_size // down``
    (which must be the output's size; ValueError otherwise).

    ``run_function`` maps a SparseTensor to a SparseTensor; its parameters receive their
    gradients when the backward pass recomputes it, and random draws repeat (the
    generator of :func:`sparsegrid.nn.default_rng` is replayed), as in
    :class:`CheckpointedSequential`.
    """
    if not isinstance(x, SparseTensor):
        raise TypeError(f"checkpoint101 expects a SparseTensor; got {type(x).__name__}")
    down = _int_value("checkpoint101: down", down)
    if down is None or down < 1:
        raise ValueError(f"checkpoint101: down must be a positive int; got {down!r}")
    expected = tuple(int(s) // down for s in x.spatial_shape)
    out = _checkpointed(run_function, x)
    if out.spatial_shape != expected:
        raise ValueError(f"checkpoint101: run_function returned spatial size "
                         f"{out.spatial_shape}; x.spatial_size // down is {expected}")
    return out


def _checkpointed(run_function, x):
    """``run_function(x)``, recorded as one node whose backward pass recomputes it."""
    from ..autodiff.core import is_grad_enabled, no_grad
    from .module import default_rng
    x = _tensor_features(x)
    features = x.features
    if not is_grad_enabled():
        out = run_function(x)
    else:
        rng_state = default_rng().bit_generator.state
        with no_grad():
            out = run_function(x.detach())
    if not isinstance(out, SparseTensor):
        raise TypeError("checkpoint101: run_function must return a SparseTensor; got "
                        f"{type(out).__name__}")
    if not is_grad_enabled():
        return out

    def vjp(g):
        after = default_rng().bit_generator.state
        default_rng().bit_generator.state = rng_state
        leaf = _Tensor(features.data, requires_grad=features.requires_grad)
        again = run_function(x.with_features(leaf))
        default_rng().bit_generator.state = after
        if again.features.requires_grad:
            again.features.backward(g)     # parameter gradients accumulate in place
        return (leaf.grad,)

    # recorded even when x needs no gradient, so the parameters get theirs
    anchor = features if features.requires_grad else _Tensor(features.data, True)
    return out.with_features(_record(_data_of(out.features), (anchor,), vjp))


# -- plots and exports ------------------------------------------------------------------------
def _unit_colors(rgb):
    """SCN's colour scaling: shift to 0, scale the maximum to just under 255, floor."""
    rgb = np.asarray(backend.to_numpy(_host_or_device(rgb, "rgb")), np.float64)
    rgb = rgb - rgb.min() if rgb.size else rgb
    if rgb.size:
        rgb = np.floor(rgb / (rgb.max() / 255 + 1e-10))
    return rgb


def _poly3d(positions, colors, faces):
    try:
        from mpl_toolkits.mplot3d import art3d
    except ImportError as error:
        raise ImportError("matplotlib_cubes / matplotlib_planes need matplotlib: pip install "
                          f"sparsegrid[plot] ({error})") from error
    positions = np.asarray(backend.to_numpy(_host_or_device(positions, "positions")),
                           np.float32)
    colors = np.asarray(backend.to_numpy(_host_or_device(colors, "colors")))
    if positions.ndim != 2 or positions.shape[1] != 3 or len(colors) != len(positions):
        raise ValueError(f"positions must be (N, 3) and colors (N, 3 or 4); got "
                         f"{positions.shape} and {colors.shape}")
    polygons = (faces[None] + positions[:, None, None, :]).reshape(-1, 4, 3)
    return art3d.Poly3DCollection(polygons, facecolors=np.repeat(colors, len(faces), axis=0)), \
        positions


def _show_cubes(ax, positions, colors, faces):
    collection, positions = _poly3d(positions, colors, faces)
    if len(positions):
        low, high = positions.min(0), positions.max(0) + 1
        ax.set_xlim([low[0], high[0]])
        ax.set_ylim([low[1], high[1]])
        ax.set_zlim([low[2], high[2]])
    ax.add_collection3d(collection)
    ax.set_axis_off()


_CUBE_FACES = np.array([[[0, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 0]],
                        [[0, 0, 0], [0, 0, 1], [1, 0, 1], [1, 0, 0]],
                        [[1, 0, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]],
                        [[0, 0, 1], [0, 0, 0], [0, 1, 0], [0, 1, 1]],
                        [[0, 1, 0], [0, 1, 1], [1, 1, 1], [1, 1, 0]],
                        [[0, 1, 1], [0, 0, 1], [1, 0, 1], [1, 1, 1]]], np.float32) - 0.5
_PLANE_FACE = np.array([[[0, -0.5, 0.5], [0, -0.5, -0.5], [0, 0.5, -0.5], [0, 0.5, 0.5]]],
                       np.float32)


def matplotlib_cubes(ax, positions, colors):
    """SCN's ``matplotlib_cubes``: draw a unit cube centred on each of ``positions`` (N, 3)
    with face colour ``colors`` (N, 3 or 4, in [0, 1]) on a 3-D matplotlib axis ``ax``
    (``fig.add_subplot(projection='3d')``), set the limits to the cubes and hide the axes.

    Needs matplotlib (``pip install sparsegrid[plot]``); errors are raised (SCN prints
    'matplotlibcubes fail!?!' and carries on)."""
    _show_cubes(ax, positions, colors, _CUBE_FACES)


def matplotlib_planes(ax, positions, colors):
    """SCN's ``matplotlib_planes``: as :func:`matplotlib_cubes` with one unit square per
    position, in the plane x = position's x."""
    _show_cubes(ax, positions, colors, _PLANE_FACE)


def visdom_scatter(vis, xyz, rgb, win="3d", markersize=3, title=""):
    """SCN's ``visdom_scatter``: ``vis.scatter`` of the points ``xyz`` (N, 3) coloured by
    ``rgb`` scaled to 0..255 (SCN's scaling), on a ``visdom.Visdom`` connection ``vis``.
    ``rgb`` is not changed (SCN's scales it in place)."""
    xyz = np.asarray(backend.to_numpy(_host_or_device(xyz, "xyz")))
    return vis.scatter(xyz, opts={"markersize": markersize, "markercolor": _unit_colors(rgb),
                                  "title": title}, win=win)


def ply_scatter(name, xyz, rgb):
    """SCN's ``ply_scatter``: write the points ``xyz`` (N, 3) coloured by ``rgb`` (scaled
    to 0..255 as SCN) to the ASCII PLY file ``name + '.ply'`` (atomically, through
    :func:`sparsegrid.io.write_ply`; coordinates as floats, where SCN prints them as
    truncated integers)."""
    from ..io import write_ply
    xyz = np.asarray(backend.to_numpy(_host_or_device(xyz, "xyz")), np.float32)
    write_ply(f"{name}.ply", xyz, colors=_unit_colors(rgb).astype(np.uint8), binary=False)


# -- SCN.is_cuda_build ----------------------------------------------------------------------
def is_cuda_build():
    """SCN's ``SCN.is_cuda_build()``: whether sparsegrid can run on a GPU here (CuPy
    installed and a GPU visible); sparsegrid's CUDA kernels compile at run time, so there
    is no separate CUDA build."""
    return backend.cuda_available()


SCN = _types.SimpleNamespace(is_cuda_build=is_cuda_build)
SCN.__doc__ = "SparseConvNet's compiled module's one query scripts make: is_cuda_build()."

__all__ += ["SCN", "batch_location_tensors", "checkpoint101", "checkpoint_restore",
            "checkpoint_save", "has_only_one_nonzero_digit", "is_cuda_build", "is_power2",
            "is_square", "matplotlib_cubes", "matplotlib_planes", "optionalTensor",
            "optionalTensorReturn", "pad_with_batch_idx", "ply_scatter", "prepare_BLInput",
            "random_rotation", "spectral_norm_svd", "squareroot_rotation",
            "threadDatasetIterator", "toLongTensor", "visdom_scatter", "voxelize_pointcloud"]


class checkpointFunction:
    """SCN's ``checkpointFunction`` (a torch autograd Function behind
    :func:`checkpoint101`): ``checkpointFunction.apply(run_function, features, metadata,
    spatial_size)`` returns the features of ``run_function`` applied to the tensor
    ``SparseConvNetTensor(features, metadata, spatial_size)``, checkpointed (recomputed in
    the backward pass). Only ``apply`` is provided (torch's ``forward`` / ``backward``
    protocol has no meaning here)."""

    @staticmethod
    def apply(run_function, x_features, x_metadata, x_spatial_size):
        from ..tensor import SparseConvNetTensor
        x = SparseConvNetTensor(x_features, x_metadata, x_spatial_size)
        out = _checkpointed(run_function, x)
        return out.features


from .containers import (VerboseIdentity, add_feature_planes,  # noqa: E402
                         concatenate_feature_planes)
from .layers import AddCoords  # noqa: E402

__all__ += ["AddCoords", "VerboseIdentity", "add_feature_planes", "checkpointFunction",
            "concatenate_feature_planes"]
