"""SparseConvNet's layers with SCN's names, constructor arguments, defaults and initialisation.

Each layer maps a :class:`~sparsegrid.SparseTensor` to a SparseTensor through
:mod:`sparsegrid.functional`; parameters are :class:`Parameter` objects, so a forward pass
on them records the autodiff graph (and inference under ``no_grad()`` records nothing).

One kind of return value: every layer returns SparseTensors whose ``.features`` is an
autodiff :class:`~sparsegrid.autodiff.Tensor`, and dense outputs as a Tensor, with or
without ``no_grad()``. Layers wrap plain input features in a Tensor at entry
(:func:`_tensor_features`); the functional ops then return Tensors by their rule.
What an input layer knows about the grid it made (its input map) is kept here, in a
weak table keyed by the Grid, not on the Grid itself.
Deliberate differences from SCN are listed in docs/differences_from_scn.md.
"""

from __future__ import annotations

import math
import numbers
import operator
import sys
import weakref

import numpy as np

from .. import functional as F
from .. import backend
from ..autodiff import ops
from ..autodiff.core import Tensor, record
from ..coords import normalize_size, permutohedral_offsets
from ..tensor import SparseTensor
from .module import Module, Parameter, default_rng


# -- helpers ------------------------------------------------------------------------------
def _size(value, dimension, name):
    """SCN's toLongTensor: an int or D ints -> tuple of D ints."""
    if hasattr(value, "tolist") and not isinstance(value, (int, np.integer)):
        value = value.tolist()
    return normalize_size(value, dimension, name)


def _spatial(value, dimension, name="spatial_size"):
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return normalize_size(np.asarray(value).tolist() if not isinstance(value, (int, np.integer))
                          else value, dimension, name)


def _as_size_array(out_size, dimension):
    out = np.asarray(out_size.detach().cpu().numpy() if hasattr(out_size, "detach")
                     else out_size, dtype=np.int64)
    return np.broadcast_to(out, (dimension,)).copy() if out.ndim == 0 else out


def _tensor_features(x):
    """``x`` with autodiff-Tensor features: a SparseTensor made by the user may hold a
    plain array, which is wrapped (no ``requires_grad``, one small object) on the same
    sites and grid. Every layer applies this at entry, so every op after it returns
    Tensors and a layer's output is of one kind however its input was made."""
    features = x.features
    if isinstance(features, Tensor):
        return x
    return SparseTensor._on(Tensor(features), x.sites, x.grid)


def _check_input(module, x):
    """``x`` checked to be a SparseTensor on the module's device, with Tensor features
    (see _tensor_features)."""
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{type(module).__name__} expects a SparseTensor; got "
                        f"{type(x).__name__}")
    module._check_device(x.device)
    return _tensor_features(x)


def _check_planes(module, x, n_planes):
    x = _check_input(module, x)
    if x.n_channels != n_planes:
        raise ValueError(f"{type(module).__name__} expects {n_planes} input channels; the "
                         f"input has {x.n_channels}")
    return x


def _dense_input(value):
    """A dense input (NumPy/CuPy array, torch tensor or Tensor) as a Tensor."""
    if isinstance(value, Tensor):
        return value
    if hasattr(value, "detach"):                        # a torch tensor
        value = value.detach().cpu().numpy()
    return Tensor(value if backend.is_cupy_array(value) else np.asarray(value))


def _map_features(x, fn):
    """Apply a dense autodiff op to the (Tensor) features."""
    return x.with_features(fn(x.features))


def _normal(shape, std):
    return (default_rng().standard_normal(shape) * std).astype(np.float32)


def _count(multiply_adds, hidden_states):
    """Add to SparseConvNet's counters, the module attributes
    ``sparsegrid.nn.forward_pass_multiplyAdd_count`` and
    ``sparsegrid.nn.forward_pass_hidden_states``: read and written through the package
    object, so a script's ``scn.forward_pass_multiplyAdd_count = 0`` resets what the
    layers add to. Counted as SCN counts, in every forward pass (training, evaluation,
    under ``no_grad()``), by the layers SCN counts in: the convolutions (a rulebook pair
    costs ``nIn * nOut / groups`` multiply-adds) and NetworkInNetwork (``nIn * nOut`` per
    site); the hidden states are the output's ``N * nOut`` values."""
    package = sys.modules[__package__]
    package.forward_pass_multiplyAdd_count = \
        getattr(package, "forward_pass_multiplyAdd_count", 0) + int(multiply_adds)
    package.forward_pass_hidden_states = \
        getattr(package, "forward_pass_hidden_states", 0) + int(hidden_states)


# -- argument checks (every constructor runs these before any work or allocation) -----------
MAX_DIMENSION = 10          # a 3-wide filter then has 3**10 = 59,049 offsets
# A layer's parameter may take at most this many bytes; None (the default) means a third of
# sparsegrid.coords.MAX_ALLOCATION_BYTES, since initialisation draws a float64 array first.
MAX_PARAMETER_BYTES = None


def _given(value):
    """``value`` and its type, for an error message."""
    return f"{value!r} ({type(value).__name__})"


def _integer(value):
    """``value`` as a Python int when it is an integer (not a bool), else None."""
    if isinstance(value, (bool, np.bool_, float, np.floating)) or \
            getattr(getattr(value, "dtype", None), "kind", "i") not in "iu":
        return None
    if isinstance(value, (numbers.Integral, np.integer)):
        return int(value)
    try:                                    # 0-d integer arrays, torch integer scalars
        return operator.index(value)
    except TypeError:
        return None


def _int_arg(owner, name, value, minimum=1, maximum=None):
    """``value`` checked to be an int in [minimum, maximum] (bool refused)."""
    expected = (f"an int in [{minimum}, {maximum}]" if maximum is not None else
                "a positive int" if minimum == 1 else "a non-negative int" if minimum == 0
                else f"an int >= {minimum}")
    n = _integer(value)
    if n is None:
        raise TypeError(f"{owner}: {name} must be {expected}; got {_given(value)}")
    if n < minimum or (maximum is not None and n > maximum):
        raise ValueError(f"{owner}: {name} must be {expected}; got {n}")
    return n


def _dimension(owner, value):
    return _int_arg(owner, "dimension", value, 1, MAX_DIMENSION)


def _real_arg(owner, name, value, low=None, high=None, low_open=False, high_open=False):
    """``value`` checked to be a finite real number (bool refused) within the bounds."""
    if low is None and high is None:
        expected = "a finite number"
    elif high is None:
        expected = f"a finite number {'>' if low_open else '>='} {low:g}"
    elif low is None:
        expected = f"a finite number {'<' if high_open else '<='} {high:g}"
    else:
        expected = (f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                    ", a finite number")
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":
        value = value.item()           # a 0-d real array is one number
    if isinstance(value, (bool, np.bool_)) or \
            not isinstance(value, (numbers.Real, np.integer, np.floating)):
        raise TypeError(f"{owner}: {name} must be {expected}; got {_given(value)}")
    v = float(value)
    if not math.isfinite(v) or \
            (low is not None and (v < low or (low_open and v == low))) or \
            (high is not None and (v > high or (high_open and v == high))):
        raise ValueError(f"{owner}: {name} must be {expected}; got {value!r}")
    return v


def _flag_arg(owner, name, value, none_is_false=False):
    """``value`` checked to be a bool (or the ints 0 and 1); None is False where
    ``none_is_false`` (``bias=None``, as PyTorch / SCN users write it)."""
    if value is None and none_is_false:
        return False
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    n = _integer(value)
    if n in (0, 1):
        return bool(n)
    raise TypeError(f"{owner}: {name} must be a bool; got {_given(value)}")


def _sizes(owner, value, dimension, name):
    """A filter/pool size or stride: an int or D positive ints, named after ``owner``."""
    return _size(value, dimension, f"{owner}: {name}")


def _check_parameter_bytes(owner, shape, dtype=np.float32,
                           hint="the filter size, nIn, nOut and dimension"):
    """Refuse a parameter too large to be a mistake-free request, before allocating it."""
    n_bytes = math.prod(int(s) for s in shape) * np.dtype(dtype).itemsize
    limit = MAX_PARAMETER_BYTES
    if limit is None:
        from .. import coords
        limit = None if coords.MAX_ALLOCATION_BYTES is None else \
            coords.MAX_ALLOCATION_BYTES // 3
    if limit is not None and n_bytes > limit:
        raise MemoryError(f"{owner}: a parameter of shape {tuple(shape)} ({np.dtype(dtype)}) "
                          f"would take {n_bytes:,} bytes ({n_bytes / 1024 ** 3:.1f} GiB), over "
                          f"the limit of {limit:,} bytes (a third of "
                          "sparsegrid.coords.MAX_ALLOCATION_BYTES, as initialisation draws "
                          f"float64 values first); check {hint}")
    return shape


def _batch_size_arg(owner, value):
    """An optional batch size: a non-negative int (bool refused); a finite integral float
    (1.0, from arithmetic) is accepted as that int."""
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and \
            float(value).is_integer():
        value = int(value)
    return _int_arg(owner, "batch_size", value, 0)


# -- input and output -----------------------------------------------------------------------
def _scn_coordinates(coords, dimension):
    """SCN coordinates (N, D + 1) with the batch LAST, or (N, D) -> batch-first indices."""
    coords = _coordinate_array(coords)
    xp = backend.array_namespace(coords)
    if coords.ndim != 2 or coords.shape[1] not in (dimension, dimension + 1):
        raise ValueError(f"coords must have shape (N, {dimension}) or (N, {dimension + 1}) "
                         f"(SCN form: spatial coordinates, then the batch index); got "
                         f"{coords.shape}")
    coords = _integral_coordinates(coords)
    if coords.shape[1] == dimension:
        batch = xp.zeros((len(coords), 1), coords.dtype)
        return xp.concatenate([batch, coords], axis=1)
    return xp.concatenate([coords[:, dimension:], coords[:, :dimension]], axis=1)


def _coordinate_array(coords):
    """Coordinates as an array of their own library: NumPy or CuPy as they are, an
    autodiff Tensor's data, and torch/JAX/... arrays viewed through DLPack (a CPU tensor
    as NumPy, a CUDA tensor as CuPy: never a copy between host and device)."""
    from ..interop import asarray
    if isinstance(coords, Tensor):
        coords = coords.data
    elif hasattr(coords, "detach") and hasattr(coords, "__dlpack__"):
        coords = coords.detach()                    # a torch tensor: a view, no graph
    coords = asarray(coords, "coords")
    return coords if backend.is_cupy_array(coords) else np.asarray(coords)


def _integral_coordinates(coords, name="coords"):
    """Integer coordinates as they are; floating ones whose values are all whole numbers
    (SCN calls ``.long()`` on its coordinates) as int64. A non-integral or non-finite
    value raises ValueError naming its row (its (sample, row) position for 3-D arrays)
    and value; other dtypes raise TypeError."""
    kind = coords.dtype.kind
    if kind in "iu":
        return coords
    if kind != "f":
        raise TypeError(f"{name} must be an integer array (or floats with whole-number "
                        f"values); got dtype {coords.dtype}")
    xp = backend.array_namespace(coords)
    # whole numbers small enough for int64 (2**62 leaves room for any spatial size)
    good = xp.isfinite(coords) & (coords == xp.floor(coords)) & (xp.abs(coords) < 2.0 ** 62)
    if not bool(good.all()):
        flat = int(xp.flatnonzero(~good.reshape(-1))[0])
        position = tuple(int(i) for i in np.unravel_index(flat, coords.shape))
        row = position[:-1] if len(position) > 2 else position[0]
        value = coords.reshape(-1)[flat].item()
        raise ValueError(f"{name} must hold whole numbers (integer coordinates); row {row} "
                         f"has {value!r} (round or floor the coordinates first)")
    return coords.astype(np.int64)


class _InputRecord:
    """What an input layer recorded about the grid it made: the map OutputLayer inverts,
    the sites it made (OutputLayer needs a tensor on them) and BLInputLayer's layout."""

    __slots__ = ("input_map", "sites", "bl_layout")

    def __init__(self, input_map, sites, bl_layout):
        self.input_map = input_map
        self.sites = sites
        self.bl_layout = bl_layout


# Grid -> _InputRecord of the input layer that made the grid. Weak keys: an entry lives as
# long as its grid (every tensor derived from the input shares it), and nn state stays out
# of the core Grid. The record never refers back to the grid.
_input_records = weakref.WeakKeyDictionary()


def _input_record(x):
    """The _InputRecord of ``x``'s grid, or None when no input layer made it."""
    return _input_records.get(x.grid)


def _shape_of_input(input):
    if isinstance(input, (list, tuple)):
        return f"a {type(input).__name__} of {len(input)} items"
    return f"a {type(input).__name__}"


class InputLayerInput(list):
    """SCN's ``InputLayerInput(coords, features)``: a two-item sequence.

    ``to(device)`` / ``cuda()`` / ``cpu()`` move its coordinates and features (both: they
    must share a device) in place and return it, as SCN's ``cuda()`` (which moves only
    the features, SCN's coordinates staying on the host)."""

    def __init__(self, coords, features, batch_size=None):
        if batch_size is not None:
            batch_size = _batch_size_arg("InputLayerInput", batch_size)
        super().__init__([coords, features] + ([] if batch_size is None else [batch_size]))

    def to(self, device):
        """Move the coordinates and features to ``device`` (in place); returns self."""
        target = backend.resolve_device(device)
        self[0] = backend.to_device(_coordinate_array(self[0]), target)
        self[1] = _features_to(self[1], target)
        return self

    def cuda(self, device=None):
        """Move the coordinates and features to a GPU (in place); returns self."""
        return self.to(backend.cuda_device_argument(device))

    def cpu(self):
        """Move the coordinates and features to the CPU (in place); returns self."""
        return self.to("cpu")


def _features_to(features, device):
    """Dense features (array, Tensor or torch tensor) on ``device``; a Tensor moves
    differentiably."""
    if isinstance(features, Tensor):
        return ops.to_device(features, device)
    return backend.to_device(_dense_input(features).data, device)


class InputLayer(Module):
    """Coordinates and features of a batch -> a SparseTensor (SCN InputLayer).

    ``forward([coords, features(, batch_size)])`` takes SCN's form: ``coords`` (N, D + 1)
    with the batch index in the LAST column, or (N, D) for a single sample; integers, or
    floats with whole-number values (SCN calls ``.long()``; a fractional or non-finite
    value is a ValueError naming its row). ``to(device)`` makes the layer move each batch
    there (see :meth:`to`). Duplicate
    sites are merged by ``mode``: 0 none allowed (an error, not SCN's corruption), 1 keep
    the first row, 2 keep the last row (SCN's measured behaviour), 3 sum, 4 mean, or a name
    ('unique', 'first', 'last', 'sum', 'mean', 'max'). Coordinates are validated. Output
    rows are sorted by (batch, x1, ..., xD) (SCN: first appearance).
    """

    def __init__(self, dimension, spatial_size, mode=3):
        super().__init__()
        owner = type(self).__name__
        self.dimension = _dimension(owner, dimension)
        self.spatial_size = _spatial(spatial_size, self.dimension, f"{owner}: spatial_size")
        self.mode = self._mode_name(mode)
        self.device = None

    def to(self, device):
        """SCN's ``inputLayer.to(device)``: from now on, move each batch's coordinates and
        features to ``device`` (``'cpu'``, ``'cuda'``, ``'cuda:N'``, a GPU number) before
        building the tensor, so its output lives there. (SCN moves only the features, its
        coordinates staying on the host; here both move, as a tensor's features and
        indices share one device.) Without it the coordinates and features must already
        share a device. ``cuda()`` / ``cpu()`` do the same. A parent module's ``to`` does
        not set this (as in SCN, where ``model.to`` leaves its input layer's device
        alone). Returns self.

        Raises ValueError / TypeError for a malformed device, RuntimeError for a GPU when
        CuPy or a visible GPU is missing."""
        super().to(device)
        self.device = backend.resolve_device(device)
        return self

    def _on_device(self, coords, features):
        """Coordinates and features moved to the device set by :meth:`to` (if any)."""
        if self.device is None:
            return coords, features
        return backend.to_device(coords, self.device), _features_to(features, self.device)

    @staticmethod
    def _mode_name(mode):
        return F.input_mode_name(mode)

    def extra_repr(self):
        return f"{self.dimension}, spatial_size={self.spatial_size}, mode={self.mode!r}"

    @staticmethod
    def _remember(tensor, input_map, bl_layout=None):
        """Record, for the tensor's (new) grid, what the output layer inverts and on which
        sites (in nn's weak table, not on the Grid)."""
        _input_records[tensor.grid] = _InputRecord(input_map, tensor.sites, bl_layout)
        return tensor

    def forward(self, input):
        if not isinstance(input, (list, tuple)) or len(input) not in (2, 3):
            raise TypeError("InputLayer expects [coords, features] or [coords, features, "
                            f"batch_size]; got {_shape_of_input(input)}")
        batch_size = None if len(input) == 2 else _batch_size_arg(
            f"{type(self).__name__} input", input[2])
        coords, features = self._on_device(_coordinate_array(input[0]), input[1])
        indices = _scn_coordinates(coords, self.dimension)
        features = _dense_input(features)
        backend.require_same_device("features", features.data, "coords", indices)
        if batch_size is not None and len(indices):
            batch_size = max(batch_size, int(indices[:, 0].max()) + 1)  # SCN: a lower bound
        return self._remember(*F.input_layer(indices, features, self.spatial_size,
                                             batch_size, self.mode))


class OutputLayer(Module):
    """Features back onto the rows given to the InputLayer (SCN OutputLayer): (N_rows, C)."""

    def __init__(self, dimension):
        super().__init__()
        self.dimension = _dimension(type(self).__name__, dimension)

    def extra_repr(self):
        return str(self.dimension)

    def forward(self, x):
        x = _check_input(self, x)
        found = _input_record(x)
        if found is None:
            raise ValueError("OutputLayer needs a tensor on the sites made by an InputLayer "
                             "(of this batch); this one's grid has no input map (a tensor "
                             "moved with .to() is on a new grid: move the InputLayer's "
                             "coords and features instead)")
        _check_input_sites(self, x, found)
        return F.output_layer(x, found.input_map)


def _check_input_sites(module, x, found, input_layer="InputLayer"):
    # The grid is shared by every tensor derived from the input, so a strided op's output
    # has the input map too; its rows may even be as many as the input's sites.
    if not F._same_sites(x.sites, found.sites):
        raise ValueError(f"{type(module).__name__} needs a tensor on the sites made by its "
                         f"{input_layer}; this one has {x.n_active} sites of spatial shape "
                         f"{x.spatial_shape} from a later strided op (go back up with "
                         "Deconvolution/UnPooling first)")


_BL_MODES = {0: "unique", 1: "last", 2: "first", 3: "sum", 4: "mean"}


class BLInputLayer(InputLayer):
    """Batched, padded input (SCN BLInputLayer): coords (B, L, D), features (B, L, C).

    A row is empty when its first coordinate is negative. Mode 1 keeps the LAST duplicate
    and mode 2 the FIRST (as SCN documents and does for this layer, the opposite of
    InputLayer); 3 sums, 4 averages, 0 forbids duplicates.
    """

    @staticmethod
    def _mode_name(mode):
        if isinstance(mode, (int, np.integer)) and not isinstance(mode, bool) and \
                int(mode) in _BL_MODES:
            return _BL_MODES[int(mode)]
        return F.input_mode_name(mode)

    def forward(self, input):
        if not isinstance(input, (list, tuple)) or len(input) != 2:
            raise TypeError("BLInputLayer expects [coords (B, L, D), features (B, L, C)] (the "
                            f"batch size is B); got {_shape_of_input(input)}")
        coords, feats = self._on_device(_coordinate_array(input[0]), input[1])
        feats = _dense_input(feats)
        backend.require_same_device("features", feats.data, "coords", coords)
        xp = backend.array_namespace(coords)
        if coords.ndim != 3 or coords.shape[2] != self.dimension:
            raise ValueError(f"coords must have shape (B, L, {self.dimension}); got "
                             f"{coords.shape}")
        coords = _integral_coordinates(coords)
        if feats.ndim != 3 or feats.shape[:2] != coords.shape[:2]:
            raise ValueError(f"features must have shape {coords.shape[:2] + ('C',)}; got "
                             f"{feats.shape}")
        b, length = coords.shape[:2]
        valid = xp.flatnonzero(coords[:, :, 0].reshape(-1) >= 0)
        batch = (valid // max(length, 1)).astype(coords.dtype)[:, None]
        indices = xp.concatenate([batch, coords.reshape(-1, self.dimension)[valid]], axis=1)
        rows = ops.take_rows(ops.reshape(feats, (b * length, feats.shape[2])), valid)
        tensor, input_map = F.input_layer(indices, rows, self.spatial_size, b, self.mode)
        return self._remember(tensor, input_map, (valid, b, length))


class BLOutputLayer(OutputLayer):
    """Inverse of :class:`BLInputLayer`: features (B, L, C), zero on empty rows."""

    def forward(self, x):
        x = _check_input(self, x)
        found = _input_record(x)
        if found is None or found.bl_layout is None:
            raise ValueError("BLOutputLayer needs a tensor on the sites made by a BLInputLayer")
        _check_input_sites(self, x, found, "BLInputLayer")
        valid, b, length = found.bl_layout
        rows = F.output_layer(x, found.input_map)
        return ops.reshape(ops.put_rows(rows, valid, b * length), (b, length, rows.shape[1]))


# -- convolutions ---------------------------------------------------------------------------
class _Convolution(Module):
    """Shared parameter handling: weight (K, Cin, Cout) or (K, G, Cin/G, Cout/G), SCN init."""

    def __init__(self, dimension, nIn, nOut, filter_size, filter_stride, bias, groups=1,
                 filter_volume=None):
        super().__init__()
        owner = type(self).__name__
        self.dimension = _dimension(owner, dimension)
        self.nIn = _int_arg(owner, "nIn", nIn)
        self.nOut = _int_arg(owner, "nOut", nOut)
        self.groups = _int_arg(owner, "groups", groups)
        if self.nIn % self.groups or self.nOut % self.groups:
            raise ValueError(f"{owner}: groups={groups} must divide nIn={nIn} and nOut={nOut}")
        bias = _flag_arg(owner, "bias", bias, none_is_false=True)
        if filter_volume is None:
            self.filter_size = _sizes(owner, filter_size, self.dimension, "filter_size")
            self.filter_stride = _sizes(owner, filter_stride, self.dimension, "filter_stride")
            filter_volume = math.prod(self.filter_size)
        self.filter_volume = filter_volume
        std = math.sqrt(2.0 * self.groups / self.nIn / filter_volume)
        shape = (filter_volume, self.nIn, self.nOut) if self.groups == 1 else \
            (filter_volume, self.groups, self.nIn // self.groups, self.nOut // self.groups)
        self.weight = Parameter(_normal(_check_parameter_bytes(owner, shape), std))
        self.bias = Parameter(np.zeros(self.nOut, np.float32)) if bias else None

    def _convert_loaded(self, name, value, shape):
        # SCN stores ungrouped weights as (K, 1, Cin, Cout).
        if name == "weight" and value.ndim == 4 and value.shape[1] == 1 and len(shape) == 3:
            return value.reshape(value.shape[0], value.shape[2], value.shape[3])
        return value

    def extra_repr(self):
        parts = [f"{self.nIn}->{self.nOut}"]
        if hasattr(self, "filter_size"):
            parts.append(f"filter_size={_short(self.filter_size)}")
            if self.filter_stride != (1,) * self.dimension:
                parts.append(f"stride={_short(self.filter_stride)}")
        if self.groups > 1:
            parts.append(f"groups={self.groups}")
        parts.append(f"bias={self.bias is not None}")
        return ", ".join(parts)

    def _check(self, x):
        x = _check_planes(self, x, self.nIn)
        if x.dimension != self.dimension:
            raise ValueError(f"{type(self).__name__} is {self.dimension}-D; the input has "
                             f"{x.dimension} spatial dimensions")
        return x

    def _counted(self, out, rulebook):
        """``out`` after adding this convolution to SCN's counters: each rulebook pair
        costs (nIn / groups) * (nOut / groups) * groups multiply-adds (SCN's count)."""
        _count(rulebook.n_pairs * self.nIn * self.nOut // self.groups,
               out.n_active * self.nOut)
        return out


def _short(size):
    return size[0] if len(set(size)) == 1 else size


class SubmanifoldConvolution(_Convolution):
    """Submanifold convolution: output sites and rows are the input's (SCN)."""

    def __init__(self, dimension, nIn, nOut, filter_size, bias, groups=1):
        super().__init__(dimension, nIn, nOut, filter_size, 1, bias, groups)

    def forward(self, x):
        x = self._check(x)
        out = F.submanifold_conv(x, self.weight, self.bias, self.filter_size)
        return self._counted(out, x.grid.submanifold(x.sites, self.filter_size))  # cached


ValidConvolution = SubmanifoldConvolution


class Convolution(_Convolution):
    """Strided convolution: spatial size (in - f) / s + 1, which must be exact."""

    def __init__(self, dimension, nIn, nOut, filter_size, filter_stride, bias, groups=1):
        super().__init__(dimension, nIn, nOut, filter_size, filter_stride, bias, groups)

    def forward(self, x):
        x = self._check(x)
        out = F.conv(x, self.weight, self.bias, self.filter_size, self.filter_stride)
        return self._counted(out, out.sites.producer[3])

    def input_spatial_size(self, out_size):
        return (_as_size_array(out_size, self.dimension) - 1) * np.array(self.filter_stride) \
            + np.array(self.filter_size)


class RandomizedStrideConvolution(Convolution):
    """Convolution whose windows are randomly spaced in training mode (SCN); plain
    Convolution in evaluation mode."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        x = self._check(x)
        out = F.randomized_conv(x, self.weight, self.bias, self.filter_size,
                                self.filter_stride, default_rng())
        return self._counted(out, out.sites.producer[3])


def _transposed_input_size(out_size, filter_size, stride):
    """The input size a transposed op maps to ``out_size``: (o - f) / s + 1, exactly."""
    out = _as_size_array(out_size, len(filter_size)) - np.array(filter_size)
    if (out % np.array(stride)).any() or (out < 0).any():
        raise ValueError(f"no input size gives output size {tuple(np.ravel(out_size))} with "
                         f"filter_size={filter_size}, stride={stride}: (out - filter) must be "
                         "a non-negative multiple of the stride")
    return out // np.array(stride) + 1


class _Transposed(_Convolution):
    def input_spatial_size(self, out_size):
        return _transposed_input_size(out_size, self.filter_size, self.filter_stride)


class Deconvolution(_Transposed):
    """Transposed convolution back onto the finer sites of the matching Convolution."""

    def __init__(self, dimension, nIn, nOut, filter_size, filter_stride, bias, groups=1):
        super().__init__(dimension, nIn, nOut, filter_size, filter_stride, bias, groups)

    def forward(self, x):
        x = self._check(x)
        out = F.deconv(x, self.weight, self.bias, self.filter_size, self.filter_stride)
        return self._counted(out, x.sites.producer[3])   # the strided op it inverts


class FullConvolution(_Transposed):
    """Generative transposed convolution: every child of every site (new grid)."""

    def __init__(self, dimension, nIn, nOut, filter_size, filter_stride, bias, groups=1):
        super().__init__(dimension, nIn, nOut, filter_size, filter_stride, bias, groups)

    def forward(self, x):
        x = self._check(x)
        out = F.full_conv(x, self.weight, self.bias, self.filter_size, self.filter_stride)
        return self._counted(out, x.grid.full(x.sites, self.filter_size,
                                              self.filter_stride)[0])   # cached


TransposeConvolution = FullConvolution


class PermutohedralSubmanifoldConvolution(_Convolution):
    """Submanifold convolution over the d*d + d + 1 offsets of a permutohedral lattice.

    Map point coordinates into lattice coordinates with ``permutohedral_basis(d)[1]``
    first. Weight init as SCN: std = sqrt(2 / (nIn * K)).
    """

    def __init__(self, dimension, nIn, nOut, bias, groups=1):
        d = _dimension(type(self).__name__, dimension)
        super().__init__(d, nIn, nOut, None, None, bias, groups,
                         filter_volume=len(permutohedral_offsets(d)))
        # SCN initialises this layer without the groups factor.
        self.weight.data = self.weight.data / np.float32(math.sqrt(self.groups))

    def forward(self, x):
        x = self._check(x)
        out = F.permutohedral_conv(x, self.weight, self.bias)
        return self._counted(out, x.grid.lattice(x.sites, permutohedral_offsets(self.dimension),
                                                 "permutohedral"))   # cached


class NetworkInNetwork(Module):
    """Per-site linear map, weight (nIn, nOut) with std sqrt(2 / nIn) (SCN)."""

    def __init__(self, nIn, nOut, bias=False):
        super().__init__()
        owner = type(self).__name__
        self.nIn = _int_arg(owner, "nIn", nIn)
        self.nOut = _int_arg(owner, "nOut", nOut)
        bias = _flag_arg(owner, "bias", bias, none_is_false=True)
        shape = _check_parameter_bytes(owner, (self.nIn, self.nOut), hint="nIn and nOut")
        self.weight = Parameter(_normal(shape, math.sqrt(2.0 / self.nIn)))
        self.bias = Parameter(np.zeros(self.nOut, np.float32)) if bias else None

    def extra_repr(self):
        return f"{self.nIn}->{self.nOut}, bias={self.bias is not None}"

    def forward(self, x):
        x = _check_planes(self, x, self.nIn)
        out = F.network_in_network(x, self.weight, self.bias)
        _count(x.n_active * self.nIn * self.nOut, x.n_active * self.nOut)   # as SCN
        return out


class ShapeContext(Module):
    """Concatenate each site's neighbours' features (what SCN's fixed identity-weight
    submanifold convolution intends): nIn -> nIn * prod(filter_size) channels, neighbours
    in offset order, zeros where a neighbour is inactive. SCN ships this layer broken.
    """

    def __init__(self, dimension, nIn, filter_size=3):
        super().__init__()
        owner = type(self).__name__
        self.dimension = _dimension(owner, dimension)
        self.nIn = _int_arg(owner, "nIn", nIn)
        self.filter_size = _sizes(owner, filter_size, self.dimension, "filter_size")
        self.nOut = self.nIn * math.prod(self.filter_size)

    def extra_repr(self):
        return f"{self.dimension}, {self.nIn}, filter_size={_short(self.filter_size)}"

    def forward(self, x):
        x = _check_planes(self, x, self.nIn)
        return F.neighbour_features(x, self.filter_size)


# -- pooling --------------------------------------------------------------------------------
class _Pooling(Module):
    def __init__(self, dimension, pool_size, pool_stride, nFeaturesToDrop=0):
        super().__init__()
        owner = type(self).__name__
        self.dimension = _dimension(owner, dimension)
        self.pool_size = _sizes(owner, pool_size, self.dimension, "pool_size")
        self.pool_stride = _sizes(owner, pool_stride, self.dimension, "pool_stride")
        self.nFeaturesToDrop = _int_arg(owner, "nFeaturesToDrop", nFeaturesToDrop, 0)

    def extra_repr(self):
        s = f"{self.dimension}, {_short(self.pool_size)}, {_short(self.pool_stride)}"
        return s + (f", nFeaturesToDrop={self.nFeaturesToDrop}" if self.nFeaturesToDrop else "")

    def input_spatial_size(self, out_size):
        return (_as_size_array(out_size, self.dimension) - 1) * np.array(self.pool_stride) \
            + np.array(self.pool_size)


class MaxPooling(_Pooling):
    """Max pooling: the true maximum of each window's active inputs (SCN clamps at 0)."""

    def forward(self, x):
        x = _check_input(self, x)
        return F.max_pool(x, self.pool_size, self.pool_stride, self.nFeaturesToDrop)


class RandomizedStrideMaxPooling(_Pooling):
    """Max pooling with randomly spaced windows in training mode; MaxPooling in eval."""

    def forward(self, x):
        x = _check_input(self, x)
        if not self.training:
            return F.max_pool(x, self.pool_size, self.pool_stride, self.nFeaturesToDrop)
        return F.randomized_max_pool(x, self.pool_size, self.pool_stride,
                                     self.nFeaturesToDrop, default_rng())


class AveragePooling(_Pooling):
    """Average pooling as SCN: the window's sum divided by the window volume."""

    def forward(self, x):
        x = _check_input(self, x)
        return F.avg_pool(x, self.pool_size, self.pool_stride, self.nFeaturesToDrop)


class UnPooling(_Pooling):
    """Each finer site receives the sum of its coarse parents (reuses the pooling rulebook)."""

    def forward(self, x):
        x = _check_input(self, x)
        return F.unpool(x, self.pool_size, self.pool_stride, self.nFeaturesToDrop)

    def input_spatial_size(self, out_size):
        # SCN returns (o - 1) s + f here, which is wrong; this is the inverse of the op.
        return _transposed_input_size(out_size, self.pool_size, self.pool_stride)


# -- normalisation --------------------------------------------------------------------------
class BatchNormalization(Module):
    """Batch normalisation over active sites, then a leaky activation (SCN).

    ``running = momentum * running + (1 - momentum) * batch`` (SCN's convention, the
    inverse of PyTorch's); ``leakiness`` 1 means no activation, 0 ReLU. In a float16
    model (``half()``) the running statistics stay float32.
    """

    _float32_buffers = ("running_mean", "running_var")

    def __init__(self, nPlanes, eps=1e-4, momentum=0.99, affine=True, leakiness=1):
        super().__init__()
        owner = type(self).__name__
        self.nPlanes = _int_arg(owner, "nPlanes", nPlanes)
        self.eps, self.momentum = _eps_momentum(owner, eps, momentum)
        self.affine = _flag_arg(owner, "affine", affine)
        self.leakiness = _real_arg(owner, "leakiness", leakiness)
        _check_parameter_bytes(owner, (4, self.nPlanes), hint="nPlanes")  # 2 buffers, 2 params
        self.register_buffer("running_mean", np.zeros(self.nPlanes, np.float32))
        self.register_buffer("running_var", np.ones(self.nPlanes, np.float32))
        self.weight = Parameter(np.ones(self.nPlanes, np.float32)) if self.affine else None
        self.bias = Parameter(np.zeros(self.nPlanes, np.float32)) if self.affine else None

    def extra_repr(self):
        s = f"{self.nPlanes}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
        return s + (f", leakiness={self.leakiness}" if self.leakiness != 1 else "")

    def forward(self, x):
        x = _check_planes(self, x, self.nPlanes)
        return F.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                            self.training, self.momentum, self.eps, self.leakiness)


def _eps_momentum(owner, eps, momentum):
    return (_real_arg(owner, "eps", eps, low=0, low_open=True),
            _real_arg(owner, "momentum", momentum, low=0, high=1))


class BatchNormReLU(BatchNormalization):
    def __init__(self, nPlanes, eps=1e-4, momentum=0.99):
        super().__init__(nPlanes, eps, momentum, True, 0)


class BatchNormLeakyReLU(BatchNormalization):
    def __init__(self, nPlanes, eps=1e-4, momentum=0.99, leakiness=0.333):
        super().__init__(nPlanes, eps, momentum, True, leakiness)


def BatchNormELU(nPlanes, eps=1e-4, momentum=0.9):
    """SCN's BatchNormELU: ``Sequential(BatchNormalization, ELU)``."""
    from .containers import Sequential
    _int_arg("BatchNormELU", "nPlanes", nPlanes)
    _eps_momentum("BatchNormELU", eps, momentum)
    return Sequential(BatchNormalization(nPlanes, eps, momentum), ELU())


class MeanOnlyBNLeakyReLU(Module):
    """Subtract the per-channel mean over sites (batch mean in training, running mean in
    evaluation), add a bias, apply a leaky ReLU. SCN ships this broken with affine=True
    and stops the gradient through the mean; here the mean is differentiated. In a float16
    model the running mean stays float32."""

    _float32_buffers = ("running_mean",)

    def __init__(self, nPlanes, affine=True, leakiness=1, momentum=0.99):
        super().__init__()
        owner = type(self).__name__
        self.nPlanes = _int_arg(owner, "nPlanes", nPlanes)
        self.affine = _flag_arg(owner, "affine", affine)
        self.leakiness = _real_arg(owner, "leakiness", leakiness)
        self.momentum = _real_arg(owner, "momentum", momentum, low=0, high=1)
        _check_parameter_bytes(owner, (2, self.nPlanes), hint="nPlanes")
        self.register_buffer("running_mean", np.zeros(self.nPlanes, np.float32))
        self.bias = Parameter(np.zeros(self.nPlanes, np.float32)) if self.affine else None

    def extra_repr(self):
        return f"{self.nPlanes}, momentum={self.momentum}, leakiness={self.leakiness}"

    def forward(self, x):
        x = _check_planes(self, x, self.nPlanes)
        if x.n_active == 0:
            return x

        def fn(f):
            if self.training:
                mean = ops.mean(f, axis=0, keepdims=True)
                self.running_mean *= self.momentum
                self.running_mean += (1 - self.momentum) * mean.data[0]
            else:
                mean = self.running_mean.astype(x.dtype)
            out = ops.sub(f, mean)
            if self.bias is not None:
                out = ops.add(out, self.bias)
            return ops.leaky_relu(out, self.leakiness) if self.leakiness != 1 else out

        return _map_features(x, fn)


class SparseGroupNorm(Module):
    """Group normalisation per sample over its active sites (what SCN's broken layer
    intends): ``num_channels`` split into ``num_groups`` groups."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True):
        super().__init__()
        owner = type(self).__name__
        self.num_groups = _int_arg(owner, "num_groups", num_groups)
        self.num_channels = _int_arg(owner, "num_channels", num_channels)
        if self.num_channels % self.num_groups:
            raise ValueError(f"{owner}: num_groups={num_groups} must divide "
                             f"num_channels={num_channels}")
        self.eps = _real_arg(owner, "eps", eps, low=0, low_open=True)
        self.affine = _flag_arg(owner, "affine", affine)
        _check_parameter_bytes(owner, (2, self.num_channels), hint="num_channels")
        self.weight = Parameter(np.ones(self.num_channels, np.float32)) if self.affine else None
        self.bias = Parameter(np.zeros(self.num_channels, np.float32)) if self.affine else None

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"

    def forward(self, x):
        x = _check_planes(self, x, self.num_channels)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


# -- activations and dropout ------------------------------------------------------------------
class _Activation(Module):
    _fn = None

    def forward(self, x):
        x = _check_input(self, x)
        return _map_features(x, type(self)._fn)


class Sigmoid(_Activation):
    _fn = staticmethod(ops.sigmoid)


class Tanh(_Activation):
    _fn = staticmethod(ops.tanh)


class ReLU(_Activation):
    _fn = staticmethod(ops.relu)


class ELU(Module):
    """``x`` where positive, ``alpha * (exp(x) - 1)`` elsewhere (SCN's ELU: alpha 1)."""

    def __init__(self, alpha=1.0):
        super().__init__()
        self.alpha = _real_arg(type(self).__name__, "alpha", alpha)

    def extra_repr(self):
        return f"alpha={self.alpha:.4g}" if self.alpha != 1 else ""

    def forward(self, x):
        x = _check_input(self, x)
        return _map_features(x, lambda f: ops.elu(f, self.alpha))


class SELU(_Activation):
    _fn = staticmethod(ops.selu)


class LeakyReLU(Module):
    def __init__(self, leak=1 / 3):
        super().__init__()
        self.leak = _real_arg(type(self).__name__, "leak", leak)

    def extra_repr(self):
        return f"leak={self.leak:.4g}"

    def forward(self, x):
        x = _check_input(self, x)
        return _map_features(x, lambda f: ops.leaky_relu(f, self.leak))


class Dropout(Module):
    """Inverted dropout in training (kept values scaled by 1/(1-p)); identity in eval.

    SCN's Dropout is not inverted (it scales by 1-p in evaluation instead); the expected
    output is the same.
    """

    def __init__(self, p=0.5):
        super().__init__()
        self.p = _real_arg(type(self).__name__, "p", p, low=0, high=1, high_open=True)

    def extra_repr(self):
        return f"p={self.p}"

    def forward(self, x):
        x = _check_input(self, x)
        if not self.training or self.p == 0:
            return x
        return _map_features(x, lambda f: ops.dropout(f, self.p, True, default_rng()))


class BatchwiseDropout(Dropout):
    """Dropout with one mask per channel, shared by every site of the batch (inverted)."""

    def forward(self, x):
        x = _check_input(self, x)
        if not self.training or self.p == 0:
            return x
        keep = default_rng().random(x.n_channels) >= self.p
        xp = backend.array_namespace(x.indices)
        scale = xp.asarray((keep / (1 - self.p)).astype(x.dtype))
        return _map_features(x, lambda f: ops.mul(f, scale))


# -- conversion and sparsification ----------------------------------------------------------
class SparseToDense(Module):
    """A dense (B, nPlanes, S1, ..., SD) array, zero at inactive sites."""

    def __init__(self, dimension, nPlanes):
        super().__init__()
        owner = type(self).__name__
        self.dimension = _dimension(owner, dimension)
        self.nPlanes = _int_arg(owner, "nPlanes", nPlanes)

    def extra_repr(self):
        return f"{self.dimension}, {self.nPlanes}"

    def forward(self, x):
        x = _check_planes(self, x, self.nPlanes)
        return F.to_dense(x)


class DenseToSparse(Module):
    """A SparseTensor of a dense (B, C, S1, ..., SD) array: active where any channel != 0."""

    def __init__(self, dimension):
        super().__init__()
        self.dimension = _dimension(type(self).__name__, dimension)

    def extra_repr(self):
        return str(self.dimension)

    def forward(self, dense):
        dense = _dense_input(dense)
        if dense.ndim != self.dimension + 2:
            raise ValueError(f"DenseToSparse({self.dimension}) expects a (B, C, "
                             f"{self.dimension} spatial axes) array; got {dense.ndim} axes")
        return F.from_dense(dense)

    def input_spatial_size(self, out_size):
        return out_size


def _step_straight_through(f):
    """(f > 0) forward, identity gradient (SCN's fakeGradHardSigmoid)."""
    return record((f.data > 0).astype(f.dtype), (f,), lambda g: (g,))


class Sparsify(Module):
    """Keep the sites where a learned per-site score passes a threshold (SCN Sparsify).

    The score is NetworkInNetwork(nIn, 1, bias) followed by ``activation`` (None,
    'sigmoid' or 'fakeGradHardSigmoid' (step forward, identity gradient)); sites with
    score > 0.5 (0 without activation) are kept, on a new grid. The scores of all input
    sites are returned as ``output.mask`` (N,), as SCN, for a loss.
    """

    def __init__(self, dimension, nIn, activation=None):
        super().__init__()
        owner = type(self).__name__
        if not (activation is None or isinstance(activation, str)) or \
                activation not in (None, "sigmoid", "fakeGradHardSigmoid"):
            raise ValueError(f"{owner}: activation must be None, 'sigmoid' or "
                             f"'fakeGradHardSigmoid'; got {activation!r}")
        self.dimension = _dimension(owner, dimension)
        _int_arg(owner, "nIn", nIn)
        self.activation = activation
        # SCN's module tree (and so its checkpoint keys): Sequential(NIN, activation) with
        # an activation ("net.0.weight"), the bare NIN without ("net.weight").
        self.net = NetworkInNetwork(nIn, 1, True)
        if activation:
            from .containers import Sequential
            self.net = Sequential(self.net)
        self.threshold = 0.5 if activation else 0.0

    def extra_repr(self):
        return f"{self.dimension}, activation={self.activation!r}"

    def forward(self, x):
        x = _check_input(self, x)
        mask = self.net(x).features
        if self.activation == "sigmoid":
            mask = ops.sigmoid(mask)
        elif self.activation == "fakeGradHardSigmoid":
            mask = _step_straight_through(mask)
        mask = ops.reshape(mask, (-1,))
        out = F.select(x, mask.data > self.threshold)
        out.mask = mask
        return out


class SparsifyFCS(Module):
    """Keep the sites whose first channel is positive (new grid)."""

    def __init__(self, dimension):
        super().__init__()
        self.dimension = _dimension(type(self).__name__, dimension)

    def forward(self, x):
        x = _check_input(self, x)
        return F.select(x, x.features.data[:, 0] > 0)


class AddCoords(Module):
    """Append each site's coordinates scaled to [-1, 1]: ``x / ((size - 1) / 2) - 1``."""

    def forward(self, x):
        x = _check_input(self, x)
        size = np.asarray(x.spatial_shape, np.float64)
        xp = backend.array_namespace(x.indices)
        half = xp.asarray(np.where(size > 1, (size - 1) / 2, 1.0))
        coords = (x.indices[:, 1:] / half - xp.asarray(size > 1)).astype(x.dtype)
        return x.with_features(ops.concatenate([x.features, coords], axis=1))


# -- dense heads -------------------------------------------------------------------------------
class Linear(Module):
    """Dense ``x @ weight.T + bias`` for classifier heads, laid out as ``torch.nn.Linear``:
    weight (out_features, in_features), so the head of an SCN + PyTorch checkpoint loads
    as is. Initialised as PyTorch: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.

    Accepts an array/Tensor (N, in_features) or a SparseTensor (applied per site).
    """

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        owner = type(self).__name__
        self.in_features = _int_arg(owner, "in_features", in_features)
        self.out_features = _int_arg(owner, "out_features", out_features)
        bias = _flag_arg(owner, "bias", bias, none_is_false=True)
        _check_parameter_bytes(owner, (self.out_features, self.in_features),
                               hint="in_features and out_features")
        bound = 1.0 / math.sqrt(self.in_features)
        rng = default_rng()
        self.weight = Parameter(rng.uniform(-bound, bound, (self.out_features,
                                                            self.in_features)).astype(np.float32))
        self.bias = Parameter(rng.uniform(-bound, bound, self.out_features).astype(
            np.float32)) if bias else None

    def extra_repr(self):
        return f"{self.in_features}->{self.out_features}, bias={self.bias is not None}"

    def forward(self, x):
        if isinstance(x, SparseTensor):
            return _map_features(_check_planes(self, x, self.in_features), self._apply)
        x = _dense_input(x)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Linear expects (N, {self.in_features}); got {x.shape}")
        self._check_device(backend.device_of(x.data))
        return self._apply(x)

    def _apply(self, x):
        out = ops.matmul(x, ops.transpose(self.weight))
        return ops.add(out, self.bias) if self.bias is not None else out


class Flatten(Module):
    """Reshape (B, ...) to (B, -1): between SparseToDense and a Linear head."""

    def forward(self, x):
        x = _dense_input(x)
        return ops.reshape(x, (x.shape[0], -1))


class _GlobalPooling(Module):
    _mode = None

    def forward(self, x):
        x = _check_input(self, x)
        return F.global_pool(x, self._mode)


class GlobalMaxPooling(_GlobalPooling):
    """Per-sample maximum over active sites: dense (batch_size, C)."""
    _mode = "max"


class GlobalAveragePooling(_GlobalPooling):
    """Per-sample mean over active sites: dense (batch_size, C)."""
    _mode = "mean"


class GlobalSumPooling(_GlobalPooling):
    """Per-sample sum over active sites: dense (batch_size, C)."""
    _mode = "sum"


__all__ = [
    "AddCoords", "AveragePooling", "BatchNormalization", "BatchNormELU", "BatchNormLeakyReLU",
    "BatchNormReLU", "BatchwiseDropout", "BLInputLayer", "BLOutputLayer", "Convolution",
    "Deconvolution", "DenseToSparse", "Dropout", "ELU", "Flatten", "FullConvolution",
    "GlobalAveragePooling", "GlobalMaxPooling", "GlobalSumPooling", "InputLayer",
    "InputLayerInput", "LeakyReLU", "Linear", "MaxPooling", "MeanOnlyBNLeakyReLU",
    "NetworkInNetwork", "OutputLayer", "PermutohedralSubmanifoldConvolution",
    "RandomizedStrideConvolution", "RandomizedStrideMaxPooling", "ReLU", "SELU",
    "ShapeContext", "Sigmoid", "SparseGroupNorm", "SparseToDense", "Sparsify", "SparsifyFCS",
    "SubmanifoldConvolution", "Tanh", "TransposeConvolution", "UnPooling", "ValidConvolution",
]
