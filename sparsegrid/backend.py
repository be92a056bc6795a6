"""Which array library an array belongs to, and the kernel set that runs on it.

The kernel contract (DESIGN.md, docs/architecture.md) is :data:`KERNEL_CONTRACT`: the names
every backend module (``sparsegrid.cpu``, ``sparsegrid.cuda``) provides with the
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
    # SBNet blocks of NHWC images (indices: int32 (nb, 3) of (n, bh, bw), distinct)
    "block_gather": "(x, indices, block_size, block_offset, block_stride)",  # (nb, BH, BW, C)
    "block_scatter": "(blocks, indices, base, block_size, block_offset, block_stride, add, "
                     "inplace=False)",                 # a new array, or base itself
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
    CuPy -> cuda); arrays of different libraries raise TypeError, CuPy arrays on
    different GPUs raise ValueError naming both devices.
    """
    if array_namespace(*arrays) is np:
        from . import cpu
        return cpu
    check_same_device(*arrays)
    from . import cuda
    return cuda


def cuda_available():
    """Whether CuPy is installed and sees a GPU. Imports CuPy only if it is installed
    (asking is an explicit device query); never raises."""
    if "cupy" not in sys.modules:
        import importlib.util
        if importlib.util.find_spec("cupy") is None:
            return False
    try:
        import cupy
        return bool(cupy.is_available())
    except Exception:   # a broken CUDA install: no GPU as far as sparsegrid is concerned
        return False


def available_backends():
    """Names of the kernel sets usable in this process: ``['cpu']``, plus ``'cuda'`` when
    CuPy is installed and sees a GPU."""
    return ["cpu", "cuda"] if cuda_available() else ["cpu"]


def backend_module(name):
    """The kernel module called ``name`` (``'cpu'`` or ``'cuda'``)."""
    if name == "cpu":
        from . import cpu
        return cpu
    if name == "cuda":
        from . import cuda
        return cuda
    raise ValueError(f"backend must be one of ['cpu', 'cuda']; got {name!r}")


def device_of(array):
    """``'cpu'`` for a NumPy array, ``'cuda:N'`` for a CuPy array on GPU N."""
    if is_cupy_array(array):
        return f"cuda:{array.device.id}"
    return "cpu"


def check_same_device(*arrays):
    """ValueError naming both devices when CuPy arrays on different GPUs meet (NumPy and
    CuPy mixed raise TypeError in :func:`array_namespace`); never copies."""
    devices = []
    for array in arrays:
        if array is not None and is_cupy_array(array):
            device = device_of(array)
            if device not in devices:
                devices.append(device)
    if len(devices) > 1:
        raise ValueError(f"arrays on different devices met: {devices[0]} and {devices[1]}; "
                         "move them to one device first (.to(device))")


def parse_device(device):
    """``('cpu', None)`` or ``('cuda', N)`` from ``'cpu'``, ``'cuda'``, ``'cuda:N'``, an int
    GPU number or a ``cupy.cuda.Device``; ValueError/TypeError naming ``device`` otherwise."""
    if isinstance(device, str):
        name, _, number = device.strip().lower().partition(":")
        if name == "cpu" and not number:
            return "cpu", None
        if name in ("cuda", "gpu"):
            if not number:
                return "cuda", None
            if number.isdigit():
                return "cuda", int(number)
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
    if isinstance(device, (bool, np.bool_)):
        raise TypeError(f"device must be 'cpu', 'cuda', 'cuda:N' or a GPU number; got {device!r}")
    if isinstance(device, (int, np.integer)):
        if device < 0:
            raise ValueError(f"device must be a GPU number >= 0; got {device}")
        return "cuda", int(device)
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(device, cupy.cuda.Device):
        return "cuda", int(device.id)
    raise TypeError(f"device must be 'cpu', 'cuda', 'cuda:N' or a GPU number; got "
                    f"{type(device).__name__} {device!r}")


def _require_cupy(device):
    if not cuda_available():
        raise RuntimeError(f"device {device!r} needs CuPy and a visible NVIDIA GPU "
                           "(pip install 'sparsegrid[cuda]'); none is available here")
    import cupy
    return cupy


def to_device(array, device):
    """``array`` on ``device`` (see :func:`parse_device`): the same object when it is
    already there, else a copy (NumPy <-> CuPy, or between GPUs). None stays None."""
    if array is None:
        return None
    kind, number = parse_device(device)
    if kind == "cpu":
        return to_numpy(array)
    cupy = _require_cupy(device)
    if number is None:
        number = cupy.cuda.runtime.getDevice()
    if is_cupy_array(array) and array.device.id == number:
        return array
    with cupy.cuda.Device(number):
        return cupy.asarray(to_numpy(array))   # between GPUs too: through the host, explicit


def resolve_device(device):
    """The canonical name (``'cpu'`` or ``'cuda:N'``) of ``device`` (anything
    :func:`parse_device` takes; ``'cuda'`` is the current GPU).

    ValueError / TypeError (from ``parse_device``) for a malformed device; RuntimeError
    naming the device when it is a GPU and CuPy sees none; ValueError when GPU ``N`` does
    not exist. Never copies anything.
    """
    kind, number = parse_device(device)
    if kind == "cpu":
        return "cpu"
    if not cuda_available():
        raise RuntimeError(f"device {device!r} needs CuPy and a visible NVIDIA GPU (pip "
                           "install 'sparsegrid[cuda]'); none is available here")
    import cupy
    count = cupy.cuda.runtime.getDeviceCount()
    if number is None:
        number = cupy.cuda.runtime.getDevice()
    if number >= count:
        raise ValueError(f"device {device!r} does not exist: {count} GPU(s) are visible "
                         f"(cuda:0 to cuda:{count - 1})")
    return f"cuda:{number}"


def cuda_device_argument(device):
    """The device ``.cuda(device)`` means: the current GPU for None, else ``device`` (a GPU
    number, ``'cuda'``, ``'cuda:N'`` or a ``cupy.cuda.Device``); ValueError for ``'cpu'``."""
    if device is None:
        return "cuda"
    kind, _ = parse_device(device)
    if kind != "cuda":
        raise ValueError(f"cuda(device): device must be a GPU (None for the current one, N, "
                         f"'cuda' or 'cuda:N'); got {device!r} (use .cpu() or .to('cpu'))")
    return device


def mixed_devices_error(first, first_device, second, second_device, hint=""):
    """The error for arrays on two devices meeting: TypeError between the CPU and a GPU
    (NumPy and CuPy mixed), ValueError between two GPUs; the message names both."""
    kind = ValueError if first_device != "cpu" and second_device != "cpu" else TypeError
    return kind(f"{first} {'are' if first.endswith('s') else 'is'} on {first_device} but "
                f"{second} on {second_device}; move them to one device first"
                + (hint or " (.to(device))") + " -- sparsegrid never copies between devices "
                "implicitly")


def require_same_device(first, first_array, second, second_array, hint=""):
    """Raise :func:`mixed_devices_error` unless both arrays are on one device."""
    a, b = device_of(first_array), device_of(second_array)
    if a != b:
        raise mixed_devices_error(first, a, second, b, hint)


def to_numpy(array):
    """A NumPy view or copy of a NumPy/CuPy array (or anything ``np.asarray`` takes)."""
    if is_cupy_array(array):
        return array.get()
    return np.asarray(array)
