"""Arrays in and out of other frameworks, zero-copy through DLPack.

sparsegrid computes on NumPy arrays (CPU) and CuPy arrays (NVIDIA GPUs). Anything else
that speaks DLPack -- torch tensors, JAX arrays, TensorFlow tensors, Numba/CuPy/NumPy
arrays, any object with ``__dlpack__`` and ``__dlpack_device__`` -- enters through
:func:`asarray`, which returns a NumPy or CuPy array viewing the same memory:

- a CPU tensor becomes a NumPy array (``numpy.from_dlpack``),
- a CUDA tensor becomes a CuPy array on the same GPU (``cupy.from_dlpack``; CuPy needed),
- anything on another device (ROCm, Metal, XPU, ...) raises a TypeError naming it.

Nothing is ever copied between host and device: a CUDA tensor never quietly becomes a
NumPy array, and mixing a GPU tensor with a CPU one raises a ValueError naming both
devices (:func:`sparsegrid.backend.require_same_device`). ``SparseTensor(features,
indices, ...)`` runs its arguments through :func:`asarray`, so it accepts torch/JAX
arrays directly (its indices are copied to int32 as always; its features are kept).

Out: NumPy and CuPy arrays implement ``__dlpack__`` themselves, and so does
:class:`sparsegrid.autodiff.Tensor` (for its data), so ``torch.from_dlpack(x.features)``,
``jax.dlpack.from_dlpack(...)`` or ``cupy.from_dlpack(...)`` take a tensor's features
without a copy; :func:`to_torch` and :func:`to_jax` are shorthands.

Gradients across the boundary: :mod:`sparsegrid.interop.torch` (a sparsegrid module as a
``torch.nn.Module`` / ``torch.autograd.Function``) and :mod:`sparsegrid.interop.jax` (as
a ``jax.custom_vjp`` function). Neither framework is imported until used.
"""

from __future__ import annotations

import numpy as np

from .. import backend

__all__ = ["asarray", "dlpack_device", "to_torch", "to_jax", "DEVICE_TYPES"]

#: DLPack device type codes (``DLDeviceType``) and their names.
DEVICE_TYPES = {1: "cpu", 2: "cuda", 3: "cuda_host", 4: "opencl", 7: "vulkan", 8: "metal",
                9: "vpi", 10: "rocm", 11: "rocm_host", 12: "ext_dev", 13: "cuda_managed",
                14: "oneapi", 15: "webgpu", 16: "hexagon", 17: "maia"}
_CPU_TYPES = (1, 3, 11)          # host memory: NumPy views it
_CUDA_TYPES = (2, 13)            # device (or managed) memory of an NVIDIA GPU: CuPy


def _framework(value):
    """A short name for the library ``value`` comes from, for messages."""
    module = type(value).__module__.split(".")[0]
    return {"jaxlib": "jax"}.get(module, module)


def dlpack_device(value):
    """``(device type name, device id)`` of a DLPack-capable object, e.g. ``("cuda", 0)``.

    Raises TypeError for an object without ``__dlpack_device__``.
    """
    method = getattr(value, "__dlpack_device__", None)
    if method is None:
        raise TypeError(f"a {type(value).__name__} does not implement the DLPack protocol "
                        "(__dlpack_device__)")
    kind, index = method()
    kind = int(kind)
    return DEVICE_TYPES.get(kind, f"device type {kind}"), int(index)


def _refuse_autograd(value, name):
    """Torch tensors that require a gradient cannot be exported (torch refuses);
    say what to do instead."""
    if getattr(value, "requires_grad", False) and _framework(value) == "torch":
        raise TypeError(
            f"{name} is a torch tensor that requires a gradient; sparsegrid cannot carry "
            f"torch's autograd graph through a plain array. Wrap the sparsegrid module "
            f"with sparsegrid.interop.torch.SparseModule (gradients flow both ways), or "
            f"pass {name}.detach() for a constant")


def asarray(value, name="array"):
    """A NumPy or CuPy array sharing ``value``'s memory (zero-copy through DLPack).

    Parameters
    ----------
    value : array
        A NumPy or CuPy array (returned as it is), or any object implementing
        ``__dlpack__`` / ``__dlpack_device__`` (torch, JAX, TensorFlow, ...). Other
        values (lists, scalars) are returned unchanged for the caller's own checks.
    name : str
        The argument's name, for error messages.

    Returns
    -------
    numpy.ndarray or cupy.ndarray
        A view of the same memory: a CPU tensor as NumPy, a CUDA tensor as CuPy on the
        same GPU. Arrays a framework marks read-only (JAX's) come back read-only.

    Raises
    ------
    TypeError
        A device NumPy and CuPy cannot view (naming it), a torch tensor that requires a
        gradient (use :mod:`sparsegrid.interop.torch`), or a CUDA tensor while CuPy is
        not installed.
    """
    if isinstance(value, np.ndarray) or backend.is_cupy_array(value):
        return value
    if not hasattr(value, "__dlpack__") or not hasattr(value, "__dlpack_device__"):
        return value
    _refuse_autograd(value, name)
    kind, index = dlpack_device(value)
    code = int(value.__dlpack_device__()[0])
    source = _framework(value)
    if code in _CPU_TYPES:
        try:
            return np.from_dlpack(value)
        except (BufferError, TypeError, RuntimeError) as error:
            raise TypeError(f"{name}: NumPy could not view this {source} array through "
                            f"DLPack ({error})") from error
    if code in _CUDA_TYPES:
        try:
            import cupy
        except ImportError as error:
            raise TypeError(
                f"{name} is a {source} array on cuda:{index}; viewing GPU memory needs CuPy "
                f"(pip install sparsegrid[cuda13] or sparsegrid[cuda]). sparsegrid never "
                f"copies it to the host by itself: move it there first (e.g. .cpu()) "
                f"if that is what you want") from error
        try:
            return cupy.from_dlpack(value)
        except (BufferError, TypeError, RuntimeError, ValueError) as error:
            raise TypeError(f"{name}: CuPy could not view this {source} array on "
                            f"cuda:{index} through DLPack ({error})") from error
    raise TypeError(f"{name} is a {source} array on {kind}:{index}; sparsegrid runs on the "
                    f"CPU (NumPy) and on NVIDIA GPUs (CuPy) only, and does not copy between "
                    f"devices: move it to 'cpu' or a CUDA device first")


def _exportable(value, name):
    from ..autodiff.core import Tensor
    if isinstance(value, Tensor):
        value = value.data
    if not (isinstance(value, np.ndarray) or backend.is_cupy_array(value)):
        raise TypeError(f"{name} must be a NumPy/CuPy array or an autodiff Tensor; got "
                        f"{type(value).__name__}")
    return value


def to_torch(value, name="array"):
    """``value`` (a NumPy/CuPy array or an autodiff Tensor's data) as a torch tensor
    sharing its memory: ``torch.from_dlpack``. CPU arrays become CPU tensors, CuPy arrays
    CUDA tensors on the same GPU (stream-ordered by the DLPack protocol)."""
    import torch
    return torch.from_dlpack(_exportable(value, name))


def to_jax(value, name="array"):
    """``value`` (a NumPy/CuPy array or an autodiff Tensor's data) as a JAX array through
    DLPack (``jax.dlpack.from_dlpack``): zero-copy where JAX allows it (JAX may copy to
    meet its own alignment rules on the CPU; a CuPy array needs a CUDA build of jaxlib)."""
    import jax.dlpack
    return jax.dlpack.from_dlpack(_exportable(value, name))
