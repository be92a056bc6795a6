"""Gradient clipping with torch.nn.utils' semantics: ``clip_grad_norm_``, ``clip_grad_value_``.

With a :class:`~sparsegrid.nn.GradScaler`, call ``scaler.unscale_(optimizer)`` first, so
the clipping threshold applies to the true gradients. Norms are computed in float64 in the
gradients' array library (NumPy or CuPy; one host read of the total norm, which is
returned), whatever the gradients' dtype.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..autodiff import Tensor


def _parameters(parameters, name):
    if isinstance(parameters, Tensor):
        return [parameters]
    try:
        found = list(parameters)
    except TypeError:
        raise TypeError(f"{name}: parameters must be a Tensor or an iterable of Tensors; got "
                        f"{type(parameters).__name__}") from None
    for p in found:
        if not isinstance(p, Tensor):
            raise TypeError(f"{name}: parameters must be Tensors (Parameters); got "
                            f"{type(p).__name__}")
    return found


def _grad_array(p):
    grad = p.grad
    return grad.data if isinstance(grad, Tensor) else grad


def _set_grad(p, array):
    if isinstance(p.grad, Tensor):
        p.grad.data[...] = array
    else:
        p.grad[...] = array


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False):
    """Scale the gradients of ``parameters`` in place so that their total norm (the
    ``norm_type``-norm of the vector of all gradients) is at most ``max_norm``.

    Parameters
    ----------
    parameters : Tensor or iterable of Tensors
        Parameters without a gradient are skipped.
    max_norm : float
    norm_type : float or ``inf``
    error_if_nonfinite : bool
        Raise RuntimeError when the total norm is NaN or infinite (else the gradients
        are scaled by a NaN factor, as torch does).

    Returns
    -------
    float
        The total norm of the gradients before clipping.
    """
    params = [p for p in _parameters(parameters, "clip_grad_norm_") if p.grad is not None]
    max_norm, norm_type = float(max_norm), float(norm_type)
    if not params:
        return 0.0
    grads = [_grad_array(p) for p in params]
    xp = backend.array_namespace(*grads)
    if math.isinf(norm_type):
        norms = [xp.abs(g).max().astype(np.float64) if g.size else xp.zeros((), np.float64)
                 for g in grads]
        total = xp.stack(norms).max()
    else:
        norms = [(xp.abs(g.astype(np.float64)) ** norm_type).sum() for g in grads]
        total = xp.stack(norms).sum() ** (1.0 / norm_type)
    total = float(backend.to_numpy(total))
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError(f"clip_grad_norm_: the total norm of order {norm_type} of the "
                           f"gradients is non-finite ({total}), so it cannot be clipped; "
                           "pass error_if_nonfinite=False to scale by it anyway")
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1.0 or math.isnan(coefficient):
        for p, g in zip(params, grads):
            _set_grad(p, (g.astype(np.float64) * coefficient).astype(g.dtype))
    return total


def clip_grad_value_(parameters, clip_value):
    """Clamp every gradient element of ``parameters`` to ``[-clip_value, clip_value]`` in
    place (torch.nn.utils.clip_grad_value_)."""
    clip_value = float(clip_value)
    if clip_value < 0:
        raise ValueError(f"clip_grad_value_: clip_value must be >= 0; got {clip_value}")
    for p in _parameters(parameters, "clip_grad_value_"):
        if p.grad is not None:
            g = _grad_array(p)
            xp = backend.array_namespace(g)
            _set_grad(p, xp.clip(g, -clip_value, clip_value))
