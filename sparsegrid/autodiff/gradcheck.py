"""Float64 finite-difference check of any differentiable function."""

from __future__ import annotations

import numbers

import numpy as np

from .core import Tensor


def numerical_gradient(loss, array, eps=1e-6):
    """Central differences of the scalar ``loss(array)`` with respect to every element."""
    x = np.array(array, dtype=np.float64, order="C")   # C order: reshape(-1) is a view
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


def _zero_allowed(allow_zero, n_inputs):
    """The set of input positions whose gradient may be zero everywhere."""
    if allow_zero is True:
        return set(range(n_inputs))
    if allow_zero is False or allow_zero is None:
        return set()
    if isinstance(allow_zero, numbers.Integral):
        allow_zero = (allow_zero,)
    allowed = set()
    for i in allow_zero:
        if not isinstance(i, numbers.Integral) or isinstance(i, bool):
            raise TypeError(f"allow_zero must be a bool or input positions, got {i!r}")
        if not -n_inputs <= i < n_inputs:
            raise ValueError(f"allow_zero names input {i}, but there are {n_inputs} inputs")
        allowed.add(int(i) % n_inputs)
    return allowed


def check_gradients(fn, inputs, eps=1e-6, rtol=1e-6, atol=1e-8, seed=0, allow_zero=False):
    """Compare ``fn``'s backward pass with finite differences, for every input.

    Parameters
    ----------
    fn : callable
        ``fn(*tensors) -> Tensor`` built from differentiable operations.
    inputs : sequence of float64 arrays
        The point at which to check; each becomes a Tensor with ``requires_grad=True``.
    eps, rtol, atol : float
        Central-difference step, and the tolerance: element ``j`` of input ``i`` agrees when
        ``|backward - fd| <= atol + rtol * |fd|``.
    seed : int
        Seed of the fixed random cotangent ``G``.
    allow_zero : bool, int or sequence of int
        Inputs whose gradient may legitimately be zero everywhere at this point: ``True``
        for all of them, or their positions in ``inputs`` (e.g. ``(2,)``). Default: none.

    The scalar checked is ``sum(fn(*inputs) * G)`` for a fixed random ``G``. Raises
    AssertionError naming the input and the worst element when they disagree; returns the
    largest absolute difference otherwise.

    **Vacuous checks are refused.** An input whose finite-difference gradient is within the
    tolerance of zero at every element -- ``|fd| <= atol + rtol * |fd|`` everywhere, that is,
    a backward pass returning zeros would have passed too -- proves nothing about the
    backward pass (typically the point was chosen where nothing flows: every ReLU off, a
    max pooling whose winners ignore the input, an input the output does not depend on).
    Such an input raises AssertionError saying the check is vacuous, unless ``allow_zero``
    names it; an input with no elements counts as vacuous too. The threshold is the same
    ``atol`` / ``rtol`` the comparison uses, so a caller who tightens ``atol`` to check small
    gradients tightens this test with it. (At the default ``eps`` the rounding noise of a
    truly zero central difference is about ``1e-10 * |sum(out * G)|``, below the default
    ``atol`` while that sum is below ~100, so a zero gradient reads as zero.)
    """
    inputs = [np.array(x, dtype=np.float64) for x in inputs]
    may_be_zero = _zero_allowed(allow_zero, len(inputs))
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
        zero_passes = np.all(np.abs(expected) <= atol + rtol * np.abs(expected))
        if zero_passes and i not in may_be_zero:
            largest = float(np.abs(expected).max()) if expected.size else 0.0
            backward = float(np.abs(actual).max()) if actual.size else 0.0
            raise AssertionError(
                f"gradient check of input {i} (shape {x.shape}) is vacuous: backward "
                f"(max |.| {backward:.3g}) and finite differences (max |.| {largest:.3g}) are "
                f"both zero within atol={atol:g}, rtol={rtol:g} everywhere, so a backward "
                f"returning zeros would pass too; choose a point where the gradient flows, "
                f"or pass allow_zero=({i},) if zero is the correct gradient")
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst
