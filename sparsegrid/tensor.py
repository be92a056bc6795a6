"""SparseTensor: features on an active site set, sharing a Grid with its relatives."""

from __future__ import annotations


import numpy as np

from . import backend
from .coords import normalize_spatial_shape, validate_features, validate_indices
from .autodiff import ops
from .autodiff.core import Tensor, data_of
from .grid import Grid, Sites


class SparseTensor:
    """Features ``(N, C)`` at ``N`` active sites of a batch of D-dimensional grids.

    Parameters
    ----------
    features : array (N, C), float32 or float64, or an autodiff Tensor around one
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
            validate_features(features.data, len(indices))
        else:
            features = validate_features(features, len(indices))
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
                            f"shape ({n}, C) and dtype float32 or float64{context}; got "
                            f"{type(features).__name__}"
                            + (f" around {type(data).__name__}" if data is not features
                               else ""))
        if data.dtype not in (np.float32, np.float64):
            raise TypeError(f"features must be a float32 or float64 array{context}; got dtype "
                            f"{data.dtype}")
        if data.ndim != 2 or data.shape[0] != n:
            raise ValueError(f"features must have shape ({n}, C){context}; got {data.shape}")
        backend.require_same_device("features", data, "this tensor's indices", self.indices,
                          " (.to(device) moves a whole tensor)")
        backend.kernels(self.indices, data)   # the sites' library, or TypeError

    def with_features(self, features):
        """A tensor with new features on the same sites and grid.

        ``features``: a float32/float64 NumPy or CuPy array of shape (N, C) with N this
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
        return self._sites.batch_size

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
        a GPU number or a ``cupy.cuda.Device``).

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

    def get_spatial_locations(self):
        """SCN's coordinate form: int64 (N, D + 1), spatial coordinates then the batch
        index LAST, row-aligned with :attr:`features`."""
        indices = self.indices
        xp = backend.array_namespace(indices)
        return xp.concatenate([indices[:, 1:], indices[:, :1]], axis=1).astype(np.int64)

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

    def __repr__(self):
        lib = "cupy" if backend.is_cupy_array(data_of(self._features)) else "numpy"
        return (f"SparseTensor(n_active={self.n_active}, n_channels={self.n_channels}, "
                f"spatial_shape={self.spatial_shape}, batch_size={self.batch_size}, "
                f"dtype={self.dtype}, backend={lib})")
