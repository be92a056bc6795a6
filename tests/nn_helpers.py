"""Shared helpers of the sparsegrid.nn tests (test_nn_*.py, test_checkpoint.py,
test_training.py, test_nn_networks.py): random sparse inputs, float64 views and comparisons,
finite-difference gradient checks of whole modules, SCN golden files and SCN-style input
rows, and the small training setup shared by the training and checkpoint tests.

Not a test module (no ``test_`` prefix): pytest collects nothing here.
"""

from __future__ import annotations

import contextlib

import numpy as np

import reference as ref
import sparsegrid as sg
import sparsegrid.nn as scn
from conftest import GOLDEN
from sparsegrid import autodiff as ad
from sparsegrid.autodiff import check_gradients
from sparsegrid.autodiff.core import data_of

SHAPES = {1: (11,), 2: (7, 6), 3: (5, 4, 5)}
TOL = 2e-5   # float32 layers against float64 references


# --------------------------------------------------------------------------------------
# random inputs and float64 views
# --------------------------------------------------------------------------------------
def sparse(rng, shape, channels=3, batch=2, density=0.35, dtype=np.float32, empty=()):
    """A SparseTensor on random sites (rows shuffled) with standard-normal features."""
    indices = ref.random_sites(rng, shape, batch, density, empty_batches=empty)
    features = rng.standard_normal((len(indices), channels)).astype(dtype)
    return sg.SparseTensor(features, indices, shape, batch)


def dense(x):
    """Zero-filled float64 (B, C, *S) array of a SparseTensor (pure-Python scatter)."""
    return ref.to_dense(values(x), x.indices, x.batch_size, x.spatial_shape)


def values(x):
    """float64 features of a SparseTensor (or the array of a Tensor / array)."""
    return np.asarray(data_of(x.features if isinstance(x, sg.SparseTensor) else x), np.float64)


def close(actual, expected, tol=TOL):
    actual = values(actual)
    assert actual.shape == np.shape(expected), (actual.shape, np.shape(expected))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol)


def w64(param):
    return np.asarray(param.data, np.float64)


# --------------------------------------------------------------------------------------
# finite-difference gradients of a module (float64)
# --------------------------------------------------------------------------------------
def param_slots(model):
    return [(m, name) for _, m in model.named_modules() for name in m._parameters]


@contextlib.contextmanager
def using(model, tensors):
    """Run ``model`` with its parameters replaced by ``tensors`` (for check_gradients)."""
    slots = param_slots(model)
    saved = [getattr(m, name) for m, name in slots]
    for (m, name), t in zip(slots, tensors):
        object.__setattr__(m, name, t)
    try:
        yield
    finally:
        for (m, name), p in zip(slots, saved):
            object.__setattr__(m, name, p)


def check_module_gradients(model, x, output=lambda y: y.features, allow_zero=()):
    """Finite differences (float64) w.r.t. the input features and every parameter.

    ``allow_zero``: dotted names ('0.bias', as in ``state_dict``) of the parameters whose
    gradient is legitimately zero everywhere at this point; any other input whose gradient
    is zero makes check_gradients refuse the (vacuous) check.
    """
    model.double()
    x = x.with_features(np.asarray(x.features, np.float64))
    slots = param_slots(model)
    params = [np.array(getattr(m, name).data) for m, name in slots]
    assert params, "no parameters to check"
    names = [f"{path}.{name}" if path else name for path, m in model.named_modules()
             for name in m._parameters]
    unknown = sorted(set(allow_zero) - set(names))
    assert not unknown, f"allow_zero names no parameter: {unknown} (parameters: {names})"

    def fn(features, *ps):
        with using(model, ps):
            return output(model(x.with_features(features)))

    return check_gradients(fn, [x.features, *params],
                           allow_zero=[1 + names.index(n) for n in allow_zero])


# --------------------------------------------------------------------------------------
# SCN golden files and SCN-style input rows
# --------------------------------------------------------------------------------------
def golden(name):
    with np.load(GOLDEN / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


def by_coordinate(coords, feats):
    return {tuple(c): f for c, f in zip(coords.tolist(), feats)}


def scn_rows(rng, shape, batch, n_rows, channels=2, duplicates=True):
    """Rows in SCN's form: coordinates (N, D + 1) with the batch LAST, with repeats."""
    sites = ref.random_sites(rng, shape, batch, density=0.4)
    picks = rng.integers(0, len(sites), n_rows) if duplicates else rng.permutation(len(sites))
    batch_first = sites[picks]
    coords = np.concatenate([batch_first[:, 1:], batch_first[:, :1]], axis=1).astype(np.int64)
    return coords, rng.standard_normal((len(picks), channels)).astype(np.float32), batch_first


def bl_batch(rng, shape=(5, 6), b=3, length=7, channels=2):
    """Padded coords (B, L, D) with -1 rows and duplicates, features (B, L, C)."""
    coords = rng.integers(0, 3, (b, length, len(shape)))       # a small range: duplicates
    pad = rng.random((b, length)) < 0.3
    pad[1] = True                                                # an empty sample
    coords[pad] = -1
    coords[0, 2] = (-1, 4)                                       # first coordinate < 0: empty
    coords[2, 3] = coords[2, 5] = coords[0, 4] = coords[0, 6] = (1, 1)   # duplicates
    feats = rng.standard_normal((b, length, channels)).astype(np.float32)
    return coords, feats


# --------------------------------------------------------------------------------------
# a small training setup (test_training.py, test_checkpoint.py)
# --------------------------------------------------------------------------------------
def toy_batch(seed=0, n=6, size=15):
    """``n`` random sparse 2-D samples (SCN batch-last coordinates) and class labels."""
    rng = np.random.default_rng(seed)
    coords, feats = [], []
    for b in range(n):
        sites = rng.choice(size * size, size=20, replace=False)
        xy = np.stack(np.unravel_index(sites, (size, size)), axis=1)
        coords.append(np.concatenate([xy, np.full((20, 1), b)], axis=1))
        feats.append(rng.standard_normal((20, 2)).astype(np.float32))
    return [np.concatenate(coords), np.concatenate(feats), n], rng.integers(0, 3, n)


def toy_model():
    scn.manual_seed(3)
    return scn.Sequential(
        scn.InputLayer(2, 15, mode=3),
        scn.SubmanifoldConvolution(2, 2, 8, 3, False),
        scn.BatchNormReLU(8),
        scn.Convolution(2, 8, 16, 3, 2, False),          # 15 -> 7
        scn.BatchNormLeakyReLU(16),
        scn.SubmanifoldConvolution(2, 16, 16, 3, True),
        scn.MaxPooling(2, 3, 2),                         # 7 -> 3
        scn.SparseToDense(2, 16),
        scn.Flatten(),
        scn.Linear(16 * 9, 3))


def step(model, optimizer, inputs, labels):
    optimizer.zero_grad()
    loss = ad.softmax_cross_entropy(model(inputs), labels)
    loss.backward()
    optimizer.step()
    return loss.item()


def deep_equal(a, b):
    """Exact equality of nested dicts / lists / arrays (dtype included)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
                and a.dtype == b.dtype and np.array_equal(a, b))
    if isinstance(a, dict):
        return (isinstance(b, dict) and list(a) == list(b)
                and all(deep_equal(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(deep_equal(x, y) for x, y in zip(a, b)))
    return type(a) is type(b) and a == b


def bits_equal(a, b):
    """Bit-for-bit equality of nested dicts / lists / arrays (dtype, shape and bytes: NaN
    payloads and the sign of zero included); other values by type and ``==`` (NaN equal
    to NaN)."""
    if isinstance(a, np.generic) or isinstance(b, np.generic):
        return type(a) is type(b) and bits_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
                and a.dtype == b.dtype and a.shape == b.shape
                and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes())
    if isinstance(a, dict):
        return (isinstance(b, dict) and list(a) == list(b)
                and all(bits_equal(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(bits_equal(x, y) for x, y in zip(a, b)))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return type(a) is type(b) and a == b


def training_snapshot(model=None, optimizer=None, scheduler=None):
    """Deep copies of the state dicts of a model, an optimizer and a schedule (None for
    an object not given), for checking that a failed load changed nothing."""
    import copy

    return tuple(None if obj is None else copy.deepcopy(obj.state_dict())
                 for obj in (model, optimizer, scheduler))
