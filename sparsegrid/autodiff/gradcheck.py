"""Float64 finite-difference check of any differentiable function."""

from __future__ import annotations

import numpy as np

from .core import Tensor


def numerical_gradient(loss, array, eps=1e-6):
    """Central differences of the scalar ``loss(array)`` with respect to every element."""
    x = np.array(array, dtype=np.float64)
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = loss(x)
        flat[i] = old - eps
        down = loss(x)
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return grad


def check_gradients(fn, inputs, eps=1e-6, rtol=1e-6, atol=1e-8, seed=0):
    """Compare ``fn``'s backward pass with finite differences, for every input.

    Parameters
    ----------
    fn : callable
        ``fn(*tensors) -> Tensor`` built from differentiable operations.
    inputs : sequence of float64 arrays
        The point at which to check; each becomes a Tensor with ``requires_grad=True``.

    The scalar checked is ``sum(fn(*inputs) * G)`` for a fixed random ``G``. Raises
    AssertionError naming the input and the worst element when they disagree; returns the
    largest absolute difference otherwise.
    """
    inputs = [np.array(x, dtype=np.float64) for x in inputs]
    out = fn(*[Tensor(x) for x in inputs])
    weights = np.random.default_rng(seed).standard_normal(np.shape(out.data))

    def scalar(arrays):
        return float(np.sum(fn(*[Tensor(a) for a in arrays]).data * weights))

    tensors = [Tensor(x.copy(), requires_grad=True) for x in inputs]
    fn(*tensors).backward(weights)
    worst = 0.0
    for i, (x, t) in enumerate(zip(inputs, tensors)):
        def loss(value, i=i):
            arrays = list(inputs)
            arrays[i] = value
            return scalar(arrays)

        expected = numerical_gradient(loss, x, eps)
        actual = np.zeros_like(x) if t.grad is None else np.asarray(t.grad)
        diff = np.abs(actual - expected)
        bad = diff > atol + rtol * np.abs(expected)
        if bad.any():
            j = np.unravel_index(np.argmax(diff - rtol * np.abs(expected)), x.shape)
            raise AssertionError(f"gradient of input {i} at {j}: backward {actual[j]!r}, "
                                 f"finite differences {expected[j]!r}")
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst
