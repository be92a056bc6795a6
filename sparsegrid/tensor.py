"""SparseTensor: features on an active site set, sharing a Grid with its relatives."""

from __future__ import annotations


import numpy as np

from . import backend
from .coords import normalize_size, normalize_spatial_shape, validate_features, validate_indices
from .autodiff import ops
from .autodiff.core import Tensor, data_of, record
from .grid import Grid, Sites


#: The feature dtypes of a SparseTensor. float16 is mixed precision: the kernels compute
#: in float32 and round once (docs/mixed_precision.md).
FEATURE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_DTYPES_TEXT = "float32 or float64 array (or float16: mixed precision)"


def _bfloat16_error(dtype, name):
    """TypeError for bfloat16 features (ml_dtypes' or torch's): NumPy has no bfloat16
    arithmetic, so no CPU kernel could run on it; say what to use instead."""
    return TypeError(f"{name}: dtype {dtype} is not supported (NumPy has no bfloat16 "
                     "arithmetic, so the CPU kernels cannot run on it); convert with "
                     ".astype(np.float16) or .astype(np.float32)")


def check_feature_dtype(dtype, name="features", context=""):
    """TypeError naming ``name`` unless ``dtype`` is float16, float32 or float64."""
    if str(dtype) == "bfloat16":
        raise _bfloat16_error(dtype, name)
    if dtype not in FEATURE_DTYPES:
        raise TypeError(f"{name} must be a {_DTYPES_TEXT}{context}; got dtype {dtype}; "
                        "convert with .astype(np.float32)")


def validate_sparse_features(features, n_rows, name="features"):
    """:func:`sparsegrid.coords.validate_features` for every feature dtype, float16
    included: dtype, shape (n_rows, C), all values finite; returns the features.

    float16 values are scanned through a float32 copy (the checks' own dtype), once, at
    construction from user data; the tensor keeps the caller's float16 array.
    """
    if not hasattr(features, "dtype"):
        features = np.asarray(features)
    check_feature_dtype(features.dtype, name)
    if features.dtype == np.float16:
        validate_features(features.astype(np.float32), n_rows, name)
        return features
    return validate_features(features, n_rows, name)


class _BatchSize(int):
    """An int that can also be called: ``x.batch_size`` (sparsegrid's property) and
    ``x.batch_size()`` (SparseConvNet's method) both give the number of samples.

    Arithmetic and comparisons are plain ``int``'s (their results are plain ints)."""

    __slots__ = ()

    def __call__(self):
        """The batch size as a plain int (SparseConvNet's ``batch_size()``)."""
        return int(self)


class SparseTensor:
    """Features ``(N, C)`` at ``N`` active sites of a batch of D-dimensional grids.

    Parameters
    ----------
    features : array (N, C), float32 or float64 (or float16: mixed precision, computed in
        float32 by the kernels, see docs/mixed_precision.md), or an autodiff Tensor around one
        (then every sparse op on the tensor is differentiable). NumPy, CuPy, or any
        DLPack-capable array (torch, JAX, ...), viewed without a copy: a CPU tensor as
        NumPy, a CUDA tensor as CuPy (:func:`sparsegrid.interop.asarray`).
    indices : integer array (N, 1 + D), NumPy, CuPy or DLPack-capable
        Column 0 the batch index, columns 1..D the coordinates, each in
        ``[0, spatial_shape[d])``. Each site at most once.
    spatial_shape : sequence of D ints (D = 1..10)
    batch_size : int, optional
        Number of samples; defaults to ``max(batch index) + 1``. Samples may be empty.

    Raises
    ------
    TypeError
        Non-integer indices, non-floating features, a ``spatial_shape`` that is not a
        sequence of ints (None, a float, a string, a nested list, a 0-d or 2-D array).
    ValueError
        Wrong shapes, row-count mismatch, coordinates out of range or negative, duplicate
        sites, NaN/inf features, a spatial shape too large to pack into int64 keys. The
        message names the first offending row.

    Notes
    -----
    Tensors made by sparse ops share their input's :class:`Grid`, which caches rulebooks.
    ``np.asarray(tensor)`` raises: use :meth:`to_dense` (possibly huge) or ``.features``.

    Zero-copy by design: a tensor keeps the caller's features array (NumPy or CuPy) as
    given, without copying, so mutating that array afterwards changes the tensor (copy it
    first if that is not wanted). The indices are copied (cached rulebooks depend on them).

    NaN/inf features are rejected here, at construction from user data only;
    :meth:`with_features` and the :attr:`features` setter check type, dtype and shape but
    do not rescan the values: a rescan per layer would cost a full pass and, on the GPU, a
    host synchronisation for every op.
    """

    __array_priority__ = 1000

    def __init__(self, features, indices, spatial_shape, batch_size=None):
        from .interop import asarray
        if not isinstance(features, Tensor):
            features = asarray(features, "features")
        indices = asarray(indices, "indices")
        spatial_shape = normalize_spatial_shape(spatial_shape)
        indices, batch_size = validate_indices(indices, spatial_shape, batch_size)
        if isinstance(features, Tensor):
            validate_sparse_features(features.data, len(indices))
        else:
            features = validate_sparse_features(features, len(indices))
        backend.require_same_device("features", data_of(features), "indices", indices)
        backend.kernels(indices, data_of(features))   # one library for both, or TypeError
        self._sites = Sites.from_indices(indices, spatial_shape, batch_size)
        self._grid = Grid()
        self._features = features

    @classmethod
    def _on(cls, features, sites, grid):
        """A tensor on known sites of a grid (no validation): used by sparse ops."""
        tensor = cls.__new__(cls)
        tensor._features = features
        tensor._sites = sites
        tensor._grid = grid
        return tensor

    def _check_new_features(self, features, context=""):
        """Type, dtype and shape of replacement features (no value scan: see the class
        notes); TypeError / ValueError naming ``features``."""
        n = len(self._sites)
        data = data_of(features)
        if not (isinstance(data, np.ndarray) or backend.is_cupy_array(data)):
            raise TypeError(f"features must be a NumPy/CuPy array or an autodiff Tensor of "
                            f"shape ({n}, C) and dtype float16, float32 or float64{context}; got "
                            f"{type(features).__name__}"
                            + (f" around {type(data).__name__}" if data is not features
                               else ""))
        if str(data.dtype) == "bfloat16":
            raise _bfloat16_error(data.dtype, "features")
        if data.dtype not in FEATURE_DTYPES:
            raise TypeError(f"features must be a {_DTYPES_TEXT}{context}; got dtype "
                            f"{data.dtype}")
        if data.ndim != 2 or data.shape[0] != n:
            raise ValueError(f"features must have shape ({n}, C){context}; got {data.shape}")
        backend.require_same_device("features", data, "this tensor's indices", self.indices,
                          " (.to(device) moves a whole tensor)")
        backend.kernels(self.indices, data)   # the sites' library, or TypeError

    def with_features(self, features):
        """A tensor with new features on the same sites and grid.

        ``features``: a float16/float32/float64 NumPy or CuPy array of shape (N, C) with N this
        tensor's site count, or an autodiff Tensor around one; anything else raises
        TypeError (type, dtype) or ValueError (shape) naming ``features``. The array is
        kept without copying, and its values are not rescanned for NaN/inf (that would
        cost a host synchronisation per layer on the GPU; see the class notes).
        DLPack-capable arrays (torch, JAX) are viewed as NumPy/CuPy without a copy.
        """
        if not isinstance(features, Tensor):
            from .interop import asarray
            features = asarray(features, "features")
        self._check_new_features(features, " to replace this tensor's features")
        return SparseTensor._on(features, self._sites, self._grid)

    @property
    def features(self):
        """(N, C) array, row-aligned with :attr:`indices`."""
        return self._features

    @features.setter
    def features(self, value):
        """Replace the features in place: checked as :meth:`with_features` (type, dtype,
        shape; kept without copying, not rescanned for NaN/inf)."""
        self._check_new_features(value)
        self._features = value

    @property
    def indices(self):
        """int32 (N, 1 + D): batch index, then coordinates."""
        return self._sites.indices

    @property
    def spatial_shape(self):
        return self._sites.spatial_shape

    @property
    def batch_size(self):
        """The number of samples, an int; also callable, ``x.batch_size()``, as
        SparseConvNet's method (both forms give the same int)."""
        return _BatchSize(self._sites.batch_size)

    @property
    def dimension(self):
        """D, the number of spatial axes."""
        return self._sites.dimension

    @property
    def n_active(self):
        return len(self._sites)

    @property
    def n_channels(self):
        return self._features.shape[1]

    @property
    def dtype(self):
        return self._features.dtype

    @property
    def sites(self):
        return self._sites

    @property
    def kernels(self):
        """The backend module that runs this tensor's ops (chosen once, by its sites)."""
        return self._sites.kernels

    @property
    def grid(self):
        return self._grid

    # -- devices ----------------------------------------------------------------------------
    @property
    def device(self):
        """``'cpu'`` (NumPy arrays) or ``'cuda:N'`` (CuPy arrays on GPU N): where the
        features and indices live (always together)."""
        return backend.device_of(self._sites.indices)

    def to(self, device):
        """This tensor on ``device`` (``'cpu'``, ``'cuda'`` (the current GPU), ``'cuda:N'``,
        a GPU number or a ``cupy.cuda.Device``); or, given a dtype (``np.float32``,
        ``np.float64``, ``np.float16``, ``float``, a ``np.dtype``, ``torch.float32``), the
        same sites and
        grid with features of that dtype (as SparseConvNet's ``to`` passes a dtype on to
        its features; see :meth:`type`).

        Already there: returns ``self`` (nothing is copied). Otherwise the features and
        indices are copied to the device and the result lives on a NEW :class:`Grid`: the
        rulebooks cached on this tensor's grid hold arrays of this device and are not
        reused (the new grid builds its own on demand), and the new sites remember no
        strided op (a Deconvolution / UnPooling / OutputLayer needs the tensor made on
        its own device, so move a network's inputs, not its intermediate tensors).
        ``spatial_shape`` and ``batch_size`` are kept.

        Autodiff Tensor features move differentiably (:func:`sparsegrid.autodiff.to_device`):
        the result requires a gradient when they do, and the gradient flows back to this
        device.

        Raises
        ------
        ValueError, TypeError
            For a malformed ``device`` (naming it).
        RuntimeError
            For a GPU when CuPy or a visible GPU is missing (naming the device).
        """
        if isinstance(device, (type, np.dtype)) or (
                not isinstance(device, (str, int)) and str(device) in _TORCH_FEATURE_TYPES):
            return self.type(device)              # a dtype (torch's dtype objects too)
        target = backend.resolve_device(device)
        if self.device == target:
            return self
        features = self._features
        if isinstance(features, Tensor):
            features = ops.to_device(features, target)
        else:
            features = backend.to_device(features, target)
        indices = backend.to_device(self._sites.indices, target)
        sites = Sites.from_indices(indices, self.spatial_shape, self.batch_size)
        return SparseTensor._on(features, sites, Grid())

    def cuda(self, device=None):
        """This tensor on a GPU: the current one (``device=None``), or GPU ``device`` (N,
        ``'cuda:N'``); see :meth:`to`. Returns ``self`` when it is already there."""
        return self.to(backend.cuda_device_argument(device))

    def cpu(self):
        """This tensor with NumPy arrays (``self`` when it is on the CPU); see :meth:`to`."""
        return self.to("cpu")

    # -- files ------------------------------------------------------------------------------
    def save(self, path):
        """Write this tensor to an ``.npz`` file (atomically; CuPy arrays saved as NumPy,
        autodiff features as their values): :func:`sparsegrid.io.save_tensor`."""
        from .io import save_tensor
        save_tensor(path, self)

    @classmethod
    def load(cls, path, device=None):
        """A tensor read from a file of :meth:`save` (NumPy, or on ``device``), validated
        as the constructor does; foreign, truncated or malformed files raise
        :class:`sparsegrid.io.FileFormatError` (a ValueError):
        :func:`sparsegrid.io.load_tensor`."""
        from .io import load_tensor
        return load_tensor(path, device)

    # -- SparseConvNet compatibility ------------------------------------------------------
    @property
    def spatial_size(self):
        """SCN's name: the spatial shape as an int64 array (D,)."""
        return np.asarray(self.spatial_shape, np.int64)

    @property
    def metadata(self):
        """SparseConvNet's ``metadata``: a :class:`Metadata` view of this tensor's grid,
        shared (equal) by every tensor derived from one input. Pass it to
        ``SparseConvNetTensor(features, metadata, spatial_size)``."""
        return Metadata(self)

    def get_spatial_locations(self, spatial_size=None):
        """SCN's coordinate form: int64 (N, D + 1), spatial coordinates then the batch
        index LAST.

        Without ``spatial_size``: this tensor's sites, row-aligned with :attr:`features`.
        With one (an int or D ints): the sites of that spatial size on this tensor's grid,
        as SparseConvNet's ``metadata.getSpatialLocations(spatial_size)``: see
        :meth:`Metadata.sites` (ValueError when the grid holds no or several site sets
        of that size). On the GPU the array is CuPy.
        """
        sites = self._sites if spatial_size is None else self.metadata.sites(spatial_size)
        return _scn_locations(sites.indices)

    @property
    def requires_grad(self):
        """Whether the features record a gradient (SparseConvNet's property)."""
        return isinstance(self._features, Tensor) and self._features.requires_grad

    def type(self, dtype=None):
        """SparseConvNet's ``type``: without an argument, the features' type as torch
        names it (``'torch.FloatTensor'``, ``'torch.DoubleTensor'``, with ``.cuda`` on a
        GPU); with one, this tensor with features of that type.

        ``dtype``: ``np.float32`` / ``np.float64`` / ``np.float16`` (or ``float``, a
        ``np.dtype``, their names), or torch's names: ``'torch.FloatTensor'``,
        ``'torch.DoubleTensor'``, ``'torch.HalfTensor'``,
        ``'torch.cuda.FloatTensor'``, ``'torch.cuda.DoubleTensor'`` (these two also move
        the tensor to the current GPU, see :meth:`to`), ``'torch.float32'`` ...

        Unlike SparseConvNet, which converts its features in place, this returns a tensor
        on the same sites and grid (``self`` when nothing changes) and leaves ``self``
        as it is: write ``x = x.type(...)``. Autodiff features convert differentiably
        (the gradient comes back in the original dtype).

        Raises
        ------
        TypeError
            For other types: sparse features are float32 or float64, or float16 (mixed
            precision); integer, boolean and bfloat16 features are refused, naming the
            type given.
        """
        if dtype is None:
            name = {np.dtype(np.float32): "FloatTensor", np.dtype(np.float64): "DoubleTensor",
                    np.dtype(np.float16): "HalfTensor"}[np.dtype(self.dtype)]
            return f"torch.{'cuda.' if self.device != 'cpu' else ''}{name}"
        target, device = _feature_type(dtype)
        tensor = self if device is None else self.to(device)
        if tensor.dtype == target:
            return tensor
        features = tensor._features
        if isinstance(features, Tensor):
            source = features.dtype
            features = record(features.data.astype(target), (features,),
                              lambda g: (g.astype(source),))
        else:
            features = features.astype(target)
        return SparseTensor._on(features, tensor._sites, tensor._grid)

    def detach(self):
        """The same sites and grid with features cut from the autodiff graph."""
        return SparseTensor._on(data_of(self._features), self._sites, self._grid)

    def to_dense(self):
        """Dense array (B, C, S1, ..., SD), zero at inactive sites (differentiable)."""
        from .functional import to_dense
        return to_dense(self)

    @classmethod
    def from_dense(cls, dense):
        """Sparse tensor of a dense (B, C, S1, ..., SD) array: active where any channel != 0.

        Rows are sorted by (batch, x1, ..., xD).
        """
        from .functional import from_dense
        return from_dense(dense)

    def __array__(self, dtype=None, copy=None):
        raise TypeError("a SparseTensor does not convert to a dense array implicitly (it may "
                        "be huge); call .to_dense() for a (B, C, *spatial_shape) array, or use "
                        ".features and .indices")

    def __len__(self):
        return len(self._sites)

    def __reduce__(self):
        """Pickling (multiprocessing, Dask, data-loader workers): the features' values (an
        autodiff Tensor's data: the graph does not travel), the indices, the spatial shape
        and the batch size, rebuilt -- and validated -- by the constructor on a new Grid
        (cached rulebooks are not pickled; they are rebuilt on demand)."""
        return (SparseTensor, (data_of(self._features), self._sites.indices,
                               tuple(self.spatial_shape), int(self.batch_size)))

    def __repr__(self):
        lib = "cupy" if backend.is_cupy_array(data_of(self._features)) else "numpy"
        return (f"SparseTensor(n_active={self.n_active}, n_channels={self.n_channels}, "
                f"spatial_shape={self.spatial_shape}, batch_size={self.batch_size}, "
                f"dtype={self.dtype}, backend={lib})")


# -- SparseConvNet's tensor surface --------------------------------------------------------
def _scn_locations(indices):
    """Batch-first int32 indices (N, 1 + D) -> SCN's int64 (N, D + 1), batch last."""
    xp = backend.array_namespace(indices)
    return xp.concatenate([indices[:, 1:], indices[:, :1]], axis=1).astype(np.int64)


_TORCH_FEATURE_TYPES = {
    "torch.FloatTensor": (np.float32, "cpu"), "torch.DoubleTensor": (np.float64, "cpu"),
    "torch.cuda.FloatTensor": (np.float32, "cuda"),
    "torch.cuda.DoubleTensor": (np.float64, "cuda"),
    "torch.float32": (np.float32, None), "torch.float": (np.float32, None),
    "torch.float64": (np.float64, None), "torch.double": (np.float64, None),
    "torch.HalfTensor": (np.float16, "cpu"), "torch.cuda.HalfTensor": (np.float16, "cuda"),
    "torch.float16": (np.float16, None), "torch.half": (np.float16, None),
}


def _feature_type(dtype):
    """``(numpy float dtype, device or None)`` of a type given to ``type`` / ``to``."""
    given = dtype
    if not isinstance(dtype, (str, type, np.dtype)):
        dtype = str(dtype)              # a torch dtype object prints as 'torch.float32'
    if isinstance(dtype, str) and dtype.strip() in _TORCH_FEATURE_TYPES:
        target, device = _TORCH_FEATURE_TYPES[dtype.strip()]
        return np.dtype(target), device
    try:
        target = np.dtype(dtype)
    except TypeError:
        target = None
    if target is None or target not in FEATURE_DTYPES:
        raise TypeError(f"sparse features are float32 or float64 (or float16: mixed "
                        f"precision): give np.float32, np.float64, np.float16, "
                        f"'torch.FloatTensor', 'torch.DoubleTensor' or 'torch.HalfTensor'; "
                        f"got {given!r}")
    return target, None


def _spatial_key(spatial_size, dimension):
    """A spatial size (an int, D ints, an int array or a torch LongTensor) as a tuple."""
    value = spatial_size
    if hasattr(value, "detach"):                       # a torch tensor
        value = value.detach().cpu().numpy()
    if hasattr(value, "tolist") and not isinstance(value, (int, np.integer)):
        value = backend.to_numpy(value).tolist() if backend.is_cupy_array(value) \
            else value.tolist()
    return normalize_size(value, dimension, "spatial_size")


class Metadata:
    """SparseConvNet's ``metadata`` of a tensor: which sites its grid holds per spatial
    size (``x.metadata``).

    SparseConvNet keeps one site set per spatial size in one ``Metadata`` object shared by
    every tensor of a batch. sparsegrid's :class:`Grid` does the same job without keying
    by size (two paths may reach one size with different sites), so this view answers
    SparseConvNet's questions by search: the tensor's own sites, then the site sets it was
    derived from (its strided ancestors, back to the input layer), then the site sets the
    grid made from it by strided ops so far.

    Two views are equal when they belong to the same grid (the same input batch).
    ``Metadata`` is not built directly (SparseConvNet's ``Metadata(dimension)`` creates an
    empty one for its own layers to fill); take it from a tensor.
    """

    __slots__ = ("_grid", "_sites")

    def __init__(self, tensor):
        if not isinstance(tensor, SparseTensor):
            raise TypeError(f"Metadata is taken from a SparseTensor (x.metadata); got "
                            f"{type(tensor).__name__}")
        self._grid = tensor.grid
        self._sites = tensor.sites

    @property
    def grid(self):
        """The :class:`Grid` shared by every tensor derived from the same input."""
        return self._grid

    @property
    def dimension(self):
        return self._sites.dimension

    def sites(self, spatial_size=None):
        """The :class:`Sites` of spatial size ``spatial_size`` (an int or D ints; default:
        the tensor's own).

        Searched in order: the tensor's own sites and its strided ancestors (a unique
        chain back to the input layer), then the outputs of strided ops cached on the
        grid. Raises ValueError naming the sizes found when none has that size, or when
        several different site sets of that size exist (then ask a tensor on the one
        wanted); TypeError / ValueError for a malformed size.
        """
        if spatial_size is None:
            return self._sites
        target = _spatial_key(spatial_size, self.dimension)
        known = []
        sites = self._sites
        while sites is not None:
            if sites.spatial_shape == target:
                return sites
            known.append(sites.spatial_shape)
            sites = sites.producer[0] if sites.producer is not None else None
        found = {}
        for key, value in list(self._grid._rulebooks.items()):
            if isinstance(value, tuple) and key[1] in ("strided", "transposed"):
                for item in value:
                    if isinstance(item, Sites):
                        known.append(item.spatial_shape)
                        if item.spatial_shape == target:
                            found[item.uid] = item
        if len(found) == 1:
            return next(iter(found.values()))
        sizes = sorted(set(known))
        if found:
            raise ValueError(f"spatial_size {target}: this grid holds {len(found)} different "
                             "site sets of that size (made by different strided ops); call "
                             "get_spatial_locations() on a tensor on the one you want")
        raise ValueError(f"spatial_size {target}: no site set of that size on this tensor's "
                         f"grid (its ancestors and the outputs of strided ops so far have "
                         f"sizes {sizes})")

    def getSpatialLocations(self, spatial_size=None):
        """SCN's name: int64 (N, D + 1) coordinates of the sites of ``spatial_size``,
        batch index last (see :meth:`sites`)."""
        return _scn_locations(self.sites(spatial_size).indices)

    def getBatchSize(self, spatial_size=None):
        """SCN's name: the number of samples (an int)."""
        return int(self.sites(spatial_size).batch_size)

    def getNActive(self, spatial_size=None):
        """SCN's name: the number of active sites of ``spatial_size`` (an int)."""
        return len(self.sites(spatial_size))

    def __eq__(self, other):
        return isinstance(other, Metadata) and other._grid is self._grid

    def __hash__(self):
        return id(self._grid)

    def __repr__(self):
        return (f"Metadata(dimension={self.dimension}, tensor sites={self._sites.spatial_shape}"
                f", {len(self._sites)} active)")


class _SparseConvNetTensorType(type):
    """``isinstance(x, SparseConvNetTensor)`` is ``isinstance(x, SparseTensor)``, and
    calling the class builds a SparseTensor."""

    def __instancecheck__(cls, instance):
        return isinstance(instance, SparseTensor)

    def __subclasscheck__(cls, subclass):
        return isinstance(subclass, type) and issubclass(subclass, SparseTensor)

    def __call__(cls, features=None, metadata=None, spatial_size=None):
        if features is None or metadata is None:
            raise TypeError(
                "SparseConvNetTensor(features, metadata, spatial_size=None) needs features "
                "and the metadata of a tensor of the same batch (x.metadata): sparsegrid's "
                "tensors are built whole, not field by field (SCN's empty "
                "SparseConvNetTensor() with .features / .metadata assigned later); for new "
                "features on x's sites write x.with_features(features)")
        if not isinstance(metadata, Metadata):
            raise TypeError(f"SparseConvNetTensor: metadata must be a tensor's .metadata; "
                            f"got {type(metadata).__name__}")
        if not isinstance(features, Tensor):
            from .interop import asarray
            features = asarray(features, "features")
        tensor = SparseTensor._on(None, metadata.sites(spatial_size), metadata.grid)
        tensor._check_new_features(features, " of SparseConvNetTensor(features, metadata, "
                                             "spatial_size)")
        tensor._features = features
        return tensor


class SparseConvNetTensor(metaclass=_SparseConvNetTensorType):
    """SparseConvNet's tensor type, as sparsegrid provides it: every nn layer returns a
    :class:`SparseTensor`, and ``isinstance(x, SparseConvNetTensor)`` holds for it.

    ``SparseConvNetTensor(features, metadata, spatial_size=None)`` returns a SparseTensor
    with ``features`` (N, C) on the sites of ``spatial_size`` in ``metadata`` (a tensor's
    ``.metadata``; default: that tensor's own sites), on the same grid. The features are
    checked as :meth:`SparseTensor.with_features` checks them (type, dtype, shape; not
    rescanned for NaN/inf).

    SparseConvNet's surface on a SparseTensor: ``features``, ``metadata``,
    ``spatial_size``, ``batch_size()`` (also the int ``batch_size``),
    ``get_spatial_locations(spatial_size=None)``, ``type``, ``to``, ``cuda``, ``cpu``,
    ``requires_grad``, ``detach()``. The differences: ``to`` / ``cuda`` / ``cpu`` /
    ``type`` return a tensor instead of changing this one, and an empty
    ``SparseConvNetTensor()`` filled in field by field is not supported (TypeError; use
    ``x.with_features``). See docs/differences_from_scn.md.
    """
