"""SparseTensor: construction, properties, repr, features, dense round trip, import hygiene."""

import os
import subprocess
import sys

import numpy as np
import pytest

import sparsegrid as sg
from sparsegrid.grid import Grid, Sites

import reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sample(rng, shape=(5, 6), batch=3, channels=2, dtype=np.float32, density=0.3):
    idx = reference.random_sites(rng, shape, batch, density)
    feats = rng.standard_normal((len(idx), channels)).astype(dtype)
    return idx, feats


# --------------------------------------------------------------------------- construction
def test_construction_properties(rng):
    idx, feats = _sample(rng)
    t = sg.SparseTensor(feats, idx, [5, 6])
    assert isinstance(t.spatial_shape, tuple) and t.spatial_shape == (5, 6)
    assert all(type(s) is int for s in t.spatial_shape)
    assert t.indices.dtype == np.int32
    assert t.indices.flags.c_contiguous
    np.testing.assert_array_equal(t.indices, idx)
    assert t.features is feats
    assert t.n_active == len(t) == len(idx)
    assert t.n_channels == 2
    assert t.dimension == 2
    assert t.dtype == np.float32
    assert t.batch_size == int(idx[:, 0].max()) + 1
    assert isinstance(t.sites, Sites) and isinstance(t.grid, Grid)
    assert t.sites.indices is t.indices


@pytest.mark.parametrize("dtype", [np.int64, np.int16, np.uint8, np.uint32])
def test_indices_converted_to_contiguous_int32(dtype):
    idx = np.asfortranarray(np.array([[0, 3, 1], [1, 0, 2], [0, 1, 1]], dtype))
    t = sg.SparseTensor(np.ones((3, 1), np.float32), idx, (4, 4))
    assert t.indices.dtype == np.int32 and t.indices.flags.c_contiguous
    np.testing.assert_array_equal(t.indices, idx)


def test_indices_from_strided_view():
    big = np.array([[0, 9, 1, 9, 2], [1, 9, 3, 9, 0]], np.int32)
    view = big[:, ::2]
    t = sg.SparseTensor(np.ones((2, 1), np.float32), view, (4, 4))
    assert t.indices.flags.c_contiguous
    np.testing.assert_array_equal(t.indices, [[0, 1, 2], [1, 3, 0]])


def test_indices_from_nested_lists_and_float_list_features():
    t = sg.SparseTensor([[1.0, 2.0], [3.0, 4.0]], [[0, 1], [0, 3]], (4,))
    assert t.indices.dtype == np.int32
    assert t.dtype == np.float64
    np.testing.assert_array_equal(t.features, [[1, 2], [3, 4]])


def test_batch_size_explicit_with_empty_trailing_samples(rng):
    idx, feats = _sample(rng, batch=2)
    t = sg.SparseTensor(feats, idx, (5, 6), batch_size=5)
    assert t.batch_size == 5
    dense = t.to_dense()
    assert dense.shape == (5, 2, 5, 6)
    assert not dense[2:].any()
    np.testing.assert_array_equal(sg.global_pool(t, "sum")[2:], 0)


def test_batch_size_default_skips_leading_empty_samples():
    idx = np.array([[2, 0, 0], [2, 1, 1]], np.int32)
    t = sg.SparseTensor(np.ones((2, 1), np.float32), idx, (3, 3))
    assert t.batch_size == 3
    assert not t.to_dense()[:2].any()


def test_empty_tensor():
    t = sg.SparseTensor(np.zeros((0, 3), np.float32), np.zeros((0, 4), np.int32), (2, 3, 4))
    assert t.batch_size == 0 and t.n_active == 0 and t.n_channels == 3
    assert t.indices.shape == (0, 4) and t.indices.dtype == np.int32
    assert t.to_dense().shape == (0, 3, 2, 3, 4)
    t2 = sg.SparseTensor(np.zeros((0, 3), np.float32), np.zeros((0, 4), np.int32), (2, 3, 4),
                         batch_size=2)
    assert t2.batch_size == 2
    np.testing.assert_array_equal(t2.to_dense(), np.zeros((2, 3, 2, 3, 4), np.float32))


@pytest.mark.parametrize("d", [1, 10])
def test_dimension_limits(d):
    shape = (2,) * d
    idx = np.array([[0] + [1] * d, [0] + [0] * d], np.int32)
    t = sg.SparseTensor(np.ones((2, 1)), idx, shape)
    assert t.dimension == d and t.spatial_shape == shape
    dense = t.to_dense()
    assert dense.shape == (1, 1) + shape and dense.sum() == 2


def test_spatial_shape_accepts_numpy_ints_and_arrays():
    idx = np.array([[0, 1, 2]], np.int32)
    for shape in [np.array([4, 5]), (np.int64(4), np.int32(5)), [4, 5]]:
        t = sg.SparseTensor(np.ones((1, 1)), idx, shape)
        assert t.spatial_shape == (4, 5)
        assert all(type(s) is int for s in t.spatial_shape)


def test_repr_content(rng):
    idx, feats = _sample(rng, shape=(5, 6), batch=2, channels=3, dtype=np.float64)
    t = sg.SparseTensor(feats, idx, (5, 6), batch_size=4)
    r = repr(t)
    assert r.startswith("SparseTensor(")
    for part in (f"n_active={len(idx)}", "n_channels=3", "spatial_shape=(5, 6)",
                 "batch_size=4", "dtype=float64", "backend=numpy"):
        assert part in r, (part, r)


def test_features_setter(rng):
    idx, feats = _sample(rng)
    t = sg.SparseTensor(feats, idx, (5, 6))
    sites, grid = t.sites, t.grid
    new = rng.standard_normal((len(idx), 7)).astype(np.float32)
    t.features = new
    assert t.features is new and t.n_channels == 7
    assert t.sites is sites and t.grid is grid


def test_with_features_shares_sites_and_grid(rng):
    idx, feats = _sample(rng)
    t = sg.SparseTensor(feats, idx, (5, 6))
    rb = t.grid.submanifold(t.sites, 3)
    new = np.zeros((len(idx), 4), np.float64)
    u = t.with_features(new)
    assert u is not t
    assert u.features is new and u.dtype == np.float64
    assert u.sites is t.sites and u.grid is t.grid
    assert u.grid.submanifold(u.sites, 3) is rb
    assert t.features is feats  # original untouched


def test_input_layer_rows_sorted_and_merged():
    idx = np.array([[1, 0, 0], [0, 2, 1], [0, 0, 3], [0, 2, 1], [1, 0, 0]], np.int32)
    feats = np.arange(10, dtype=np.float32).reshape(5, 2)
    t, imap = sg.input_layer(idx, feats, (3, 4), mode="sum")
    np.testing.assert_array_equal(t.indices, [[0, 0, 3], [0, 2, 1], [1, 0, 0]])
    np.testing.assert_array_equal(t.features, [[4, 5], [2 + 6, 3 + 7], [0 + 8, 1 + 9]])
    assert t.indices.dtype == np.int32 and t.indices.flags.c_contiguous
    assert imap.n_rows == 5 and imap.n_sites == 3


# --------------------------------------------------------------------------- dense
@pytest.mark.parametrize("shape", [(7,), (4, 5), (3, 4, 2), (2, 3, 2, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_to_dense_matches_reference(rng, shape, dtype):
    idx, feats = _sample(rng, shape=shape, batch=2, channels=3, dtype=dtype)
    t = sg.SparseTensor(feats, idx, shape, batch_size=3)
    dense = t.to_dense()
    assert dense.dtype == dtype and dense.shape == (3, 3, *shape)
    np.testing.assert_array_equal(dense, reference.to_dense(feats, idx, 3, shape))
    np.testing.assert_array_equal(sg.to_dense(t), dense)


@pytest.mark.parametrize("shape", [(7,), (4, 5), (3, 4, 2)])
def test_dense_round_trip(rng, shape):
    idx, feats = _sample(rng, shape=shape, batch=2, channels=2, dtype=np.float64)
    feats[feats == 0] = 1.0  # every active site has a non-zero channel
    feats[::3, 0] = 0.0      # ... though some channels are zero
    t = sg.SparseTensor(feats, idx, shape)
    back = sg.from_dense(t.to_dense())
    order = np.lexsort(idx.T[::-1])
    np.testing.assert_array_equal(back.indices, idx[order])
    np.testing.assert_array_equal(back.features, feats[order])
    assert back.spatial_shape == shape and back.batch_size == t.batch_size
    assert back.dtype == np.float64 and back.indices.dtype == np.int32
    np.testing.assert_array_equal(back.to_dense(), t.to_dense())


def test_from_dense_active_where_any_channel_nonzero(rng):
    dense = np.zeros((2, 3, 4, 5), np.float32)
    dense[1, 2, 3, 4] = -1.5
    dense[0, 0, 1, 2] = 2.0
    dense[0, 1, 1, 2] = 3.0
    dense[0, 1, 0, 0] = -0.0  # negative zero is zero
    t = sg.SparseTensor.from_dense(dense)
    np.testing.assert_array_equal(t.indices, [[0, 1, 2], [1, 3, 4]])
    np.testing.assert_array_equal(t.features, [[2, 3, 0], [0, 0, -1.5]])
    assert t.batch_size == 2 and t.spatial_shape == (4, 5)
    assert t.dtype == np.float32


def test_from_dense_result_supports_ops(rng):
    dense = np.zeros((1, 1, 6, 6), np.float64)
    dense[0, 0, [0, 3, 5], [1, 3, 5]] = [1.0, 2.0, 3.0]
    t = sg.from_dense(dense)
    y = sg.max_pool(t, 2, 2)
    np.testing.assert_array_equal(y.indices, [[0, 0, 0], [0, 1, 1], [0, 2, 2]])
    np.testing.assert_array_equal(y.features[:, 0], [1, 2, 3])
    rb = t.grid.submanifold(t.sites, 3)
    assert rb.n_in == 3


def test_from_dense_all_zero():
    t = sg.from_dense(np.zeros((2, 3, 4, 4), np.float32))
    assert t.n_active == 0 and t.batch_size == 2 and t.n_channels == 3
    assert t.to_dense().shape == (2, 3, 4, 4)


# --------------------------------------------------------------------------- import hygiene
def test_import_does_not_pull_cupy_or_scipy():
    code = ("import sparsegrid, sys; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('cupy', 'scipy')]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_import_is_fast():
    code = ("import time; t = time.perf_counter(); import sparsegrid; "
            "print(time.perf_counter() - t)")
    # numpy itself is imported inside the timed region; a generous bound for slow machines
    best = min(float(subprocess.run([sys.executable, "-c", code], cwd=REPO,
                                    capture_output=True, text=True, timeout=60,
                                    check=True).stdout) for _ in range(2))
    assert best < 1.0, f"import sparsegrid took {best:.2f} s"



def test_a_sparse_tensor_pickles():
    import pickle
    from sparsegrid.autodiff import Tensor
    x = sg.SparseTensor(np.arange(6, dtype=np.float32).reshape(3, 2),
                     np.array([[0, 1, 2], [0, 3, 3], [2, 0, 0]]), (4, 4), batch_size=4)
    y = pickle.loads(pickle.dumps(x))
    np.testing.assert_array_equal(y.features, x.features)
    np.testing.assert_array_equal(y.indices, x.indices)
    assert y.spatial_shape == (4, 4) and y.batch_size == 4 and y.batch_size() == 4
    z = pickle.loads(pickle.dumps(x.with_features(Tensor(x.features, requires_grad=True))))
    assert isinstance(z.features, np.ndarray)          # values only: no graph travels
