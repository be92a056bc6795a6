"""Gradient clipping (sparsegrid.nn.clip) against torch.nn.utils, float64, float32, float16."""

import math

import numpy as np
import pytest

import sparsegrid.nn as scn
from optional import require


def _params(rng, dtype, scale=1.0):
    shapes = [(3, 4), (5,), (2, 2, 2), (0,)]
    params = []
    for shape in shapes:
        p = scn.Parameter(np.zeros(shape, dtype))
        p.grad = (rng.standard_normal(shape) * scale).astype(dtype)
        params.append(p)
    params.append(scn.Parameter(np.zeros(2, dtype)))     # no gradient: skipped
    return params


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 100.0])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_clip_grad_norm_matches_torch(norm_type, max_norm, dtype):
    torch = require("torch")
    rng = np.random.default_rng(0)
    params = _params(rng, dtype)
    theirs = [torch.zeros(p.shape, dtype=torch.float64, requires_grad=True) for p in params]
    for t, p in zip(theirs, params):
        if p.grad is not None:
            t.grad = torch.from_numpy(p.grad.astype(np.float64))
    # (torch refuses the inf-norm of an empty gradient; sparsegrid takes it as 0)
    want = float(torch.nn.utils.clip_grad_norm_([t for t in theirs if t.numel()], max_norm,
                                                norm_type))
    got = scn.clip_grad_norm_(params, max_norm, norm_type)
    tol = 1e-3 if dtype == np.float16 else 1e-6
    assert got == pytest.approx(want, rel=tol)
    for t, p in zip(theirs, params):
        if p.grad is not None:
            assert p.grad.dtype == dtype
            np.testing.assert_allclose(p.grad.astype(np.float64), t.grad.numpy(), rtol=tol,
                                       atol=tol * 1e-2)
    assert params[-1].grad is None
    assert scn.utils.clip_grad_norm_ is scn.clip_grad_norm_


def test_clip_grad_norm_nonfinite_and_bad_input():
    rng = np.random.default_rng(1)
    params = _params(rng, np.float32)
    params[0].grad[0, 0] = np.inf
    with pytest.raises(RuntimeError, match="non-finite"):
        scn.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert scn.clip_grad_norm_([], 1.0) == 0.0
    with pytest.raises(TypeError, match="parameters"):
        scn.clip_grad_norm_(3, 1.0)
    with pytest.raises(TypeError, match="Tensors"):
        scn.clip_grad_norm_([np.zeros(3)], 1.0)


def test_clip_grad_value_():
    rng = np.random.default_rng(2)
    params = _params(rng, np.float32, scale=3.0)
    before = [None if p.grad is None else p.grad.copy() for p in params]
    scn.clip_grad_value_(params, 1.5)
    for p, b in zip(params, before):
        if b is not None:
            np.testing.assert_array_equal(p.grad, np.clip(b, -1.5, 1.5))
    with pytest.raises(ValueError, match="clip_value"):
        scn.clip_grad_value_(params, -1.0)
