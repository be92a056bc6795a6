"""sparsegrid.pointcloud: voxelize against a plain-Python reference, devoxelize, trilinear."""

import math
import warnings

import numpy as np
import pytest

from sparsegrid import autodiff as ad
from sparsegrid import backend
from sparsegrid.autodiff.gradcheck import check_gradients
from sparsegrid.pointcloud import REDUCTIONS, devoxelize, trilinear, voxelize


def _reference(clouds, voxel_size, feats, reduce, origin, caps=(None, None)):
    """dict (batch, *voxel) -> list of (global row, feature row), then reduced; rows sorted."""
    d = clouds[0].shape[1]
    size = np.broadcast_to(np.asarray(voxel_size, float), (d,))
    voxels, row = {}, 0
    for b, cloud in enumerate(clouds):
        for p in cloud:
            key = (b,) + tuple(int(math.floor((float(p[a]) - origin[a]) / size[a]))
                               for a in range(d))
            voxels.setdefault(key, []).append(row)
            row += 1
    keys = sorted(voxels)
    out, inverse = [], np.full(row, -1)
    for i, key in enumerate(keys):
        rows = voxels[key]
        for r in rows:
            inverse[r] = i
        vals = feats[rows]
        out.append({"mean": vals.mean(0), "sum": vals.sum(0), "max": vals.max(0),
                    "min": vals.min(0), "first": vals[0], "last": vals[-1],
                    "count": np.array([len(rows)], float)}[reduce])
    return np.array(keys, np.int64).reshape(-1, d + 1), np.array(out).reshape(len(keys), -1), \
        inverse


def _clouds(rng, sizes, d, scale=4.0):
    return [rng.random((n, d)) * scale for n in sizes]


@pytest.mark.parametrize("d", [1, 2, 3, 4])
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_every_reduction_matches_the_reference(d, reduce, rng):
    clouds = _clouds(rng, [40, 0, 25], d)
    feats = [rng.standard_normal((len(c), 3)) for c in clouds]
    size = [0.7, 1.1, 0.9, 1.3][:d]
    res = voxelize(clouds, size, feats, reduce)
    origin = res.origin
    for a in range(d):   # default origin: the batch minimum floored to the voxel grid
        low = min(c[:, a].min() for c in clouds if len(c))
        assert origin[a] == math.floor(low / size[a]) * size[a]
    keys, out, inverse = _reference(clouds, size, np.concatenate(feats), reduce, origin)
    x = res.tensor
    np.testing.assert_array_equal(x.indices, keys)
    np.testing.assert_allclose(x.features, out, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(res.inverse, inverse)
    assert res.inverse.dtype == np.int64 and x.batch_size == 3
    assert x.spatial_shape == tuple(int(v) + 1 for v in keys[:, 1:].max(0))
    assert res.dropped.total_points == 0


def test_single_array_float32_and_rows_sorted(rng):
    p = (rng.random((200, 3)) * 10).astype(np.float32)
    f = rng.random((200, 2)).astype(np.float32)
    x, inverse = voxelize(p, 0.5, f, "sum")
    assert x.dtype == np.float32 and x.batch_size == 1
    keys = [tuple(r) for r in x.indices.tolist()]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    np.testing.assert_allclose(x.features.sum(0), f.sum(0), rtol=1e-5)
    cells = np.floor((p.astype(np.float64) - np.array(voxelize(p, 0.5).origin)) / 0.5)
    np.testing.assert_array_equal(x.indices[inverse, 1:], cells)


def test_no_features_gives_ones_and_count(rng):
    p = rng.random((50, 2)) * 3
    x, _ = voxelize(p, 1.0)
    assert x.dtype == np.float32 and x.n_channels == 1 and np.all(x.features == 1)
    c, inv = voxelize(p, 1.0, reduce="count")
    np.testing.assert_array_equal(c.features[:, 0], np.bincount(inv))


def test_single_point_and_empty_inputs():
    x, inv = voxelize(np.array([[1.25, -3.5]]), 0.5, np.array([[2.0]]))
    assert x.n_active == 1 and x.spatial_shape == (1, 1) and inv.tolist() == [0]
    assert x.indices.tolist() == [[0, 0, 0]] and x.features.tolist() == [[2.0]]
    x, inv = voxelize(np.zeros((0, 3)), 0.1)
    assert x.n_active == 0 and x.batch_size == 1 and len(inv) == 0
    x, inv = voxelize([np.zeros((0, 2)), np.zeros((0, 2))], 0.1, [np.zeros((0, 4))] * 2)
    assert x.n_active == 0 and x.batch_size == 2 and x.n_channels == 4
    x, inv = voxelize([], [0.1, 0.2, 0.3])
    assert x.n_active == 0 and x.batch_size == 0 and x.dimension == 3
    with pytest.raises(ValueError, match="dimension"):
        voxelize([], 0.1)
    # empty clouds between others keep their batch index
    x, inv = voxelize([np.zeros((0, 1)), np.array([[0.5]]), np.zeros((0, 1))], 1.0)
    assert x.indices.tolist() == [[1, 0]] and x.batch_size == 3


def test_label_vote_ties_and_ignore():
    p = np.array([[0.1], [0.2], [0.3], [0.4], [1.1], [1.2], [2.5], [2.6], [2.7]])
    labels = np.array([5, 3, 3, 5, 7, 7, 2, 9, 9], np.int32)
    res = voxelize(p, 1.0, labels=labels)
    assert res.labels.dtype == np.int32
    assert res.labels.tolist() == [3, 7, 9]          # voxel 0: a 2-2 tie -> smallest
    res = voxelize(p, 1.0, labels=labels, label_conflict="ignore", ignore_label=-1)
    assert res.labels.tolist() == [-1, 7, -1]
    # 'vote' with ignore_label: those points do not vote, unless they are alone
    lab = np.array([0, 0, 0, 4, 0, 0, 8, 0, 0])
    res = voxelize(p, 1.0, labels=lab, ignore_label=0)
    assert res.labels.tolist() == [4, 0, 8]
    with pytest.raises(ValueError, match="ignore_label"):
        voxelize(p, 1.0, labels=labels, label_conflict="ignore")


def test_labels_match_a_reference_vote(rng):
    clouds = _clouds(rng, [300, 200], 2, scale=3)
    labels = [rng.integers(-2, 4, len(c)) for c in clouds]
    res = voxelize(clouds, 0.6, labels=labels)
    votes = {}
    for r, v in enumerate(res.inverse):
        votes.setdefault(int(v), []).append(int(np.concatenate(labels)[r]))
    for v, vals in votes.items():
        counts = {lab: vals.count(lab) for lab in vals}
        best = max(counts.values())
        assert res.labels[v] == min(lab for lab, c in counts.items() if c == best)


def test_point_cap_keeps_the_first_points_and_warns(rng):
    p = rng.random((100, 2)) * 2
    f = rng.standard_normal((100, 1))
    with pytest.warns(UserWarning, match="max_points_per_voxel=3 dropped"):
        res = voxelize(p, 1.0, f, "sum", max_points_per_voxel=3)
    full = voxelize(p, 1.0, f, "sum")
    kept = res.inverse >= 0
    assert res.dropped.point_cap_points == 100 - int(kept.sum())
    for v in range(res.tensor.n_active):
        rows = np.flatnonzero(full.inverse == v)
        np.testing.assert_array_equal(np.flatnonzero(res.inverse == v), rows[:3])
        np.testing.assert_allclose(res.tensor.features[v], f[rows[:3]].sum(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        voxelize(p, 1.0, f, max_points_per_voxel=100)        # nothing dropped: no warning


def test_voxel_cap_keeps_first_appearing_voxels_per_cloud(rng):
    clouds = _clouds(rng, [60, 50], 2, scale=3)
    full = voxelize(clouds, 1.0)
    with pytest.warns(UserWarning, match="max_voxels=2 dropped"):
        res = voxelize(clouds, 1.0, reduce="count", max_voxels=2)
    assert res.tensor.n_active == 4
    expect = []
    offset = 0
    for b, c in enumerate(clouds):
        seen = []
        for v in full.inverse[offset:offset + len(c)]:
            if v not in seen:
                seen.append(int(v))
        expect += sorted(seen[:2])
        offset += len(c)
    np.testing.assert_array_equal(res.tensor.indices, full.tensor.indices[expect])
    assert res.dropped.voxels == full.tensor.n_active - 4
    assert res.dropped.voxel_cap_points == int((res.inverse < 0).sum())
    assert res.tensor.features.sum() == 110 - res.dropped.voxel_cap_points


def test_bounds_and_drop_invalid():
    p = np.array([[0.0, 0.0], [0.95, 1.99], [1.0, 0.5], [-0.1, 0.5], [0.5, np.nan]])
    bounds = ([0.0, 0.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="row 4 has a NaN"):
        voxelize(p, 0.5, bounds=bounds)
    with pytest.raises(ValueError, match=r"points row 2 = \[1.0, 0.5\] lies outside bounds"):
        voxelize(p[:4], 0.5, bounds=bounds)
    with pytest.raises(ValueError, match=r"points\[1\] row 0 = "):
        voxelize([p[:2], p[2:4]], 0.5, bounds=bounds)
    res = voxelize(p, 0.5, bounds=bounds, drop_invalid=True)
    assert res.tensor.spatial_shape == (2, 4)
    assert res.inverse.tolist() == [0, 1, -1, -1, -1]
    assert res.tensor.indices.tolist() == [[0, 0, 0], [0, 1, 3]]
    assert res.dropped.non_finite == 1 and res.dropped.out_of_bounds == 2
    assert res.dropped.total_points == 3
    # an explicit origin: points below it are out of the grid
    with pytest.raises(ValueError, match="below origin"):
        voxelize(p[:4], 0.5, origin=[0, 0])
    res = voxelize(p[:4], 0.5, origin=[0, 0], drop_invalid=True)
    assert res.dropped.out_of_bounds == 1 and res.inverse[3] == -1
    with pytest.raises(ValueError, match="origin must not exceed"):
        voxelize(p[:2], 0.5, origin=[0.5, 0], bounds=bounds)


def test_utm_coordinates_keep_centimetre_voxels():
    rng = np.random.default_rng(3)
    cells = rng.integers(0, 50_000, (5000, 3))
    origin = np.array([500_000.0, 4_000_000.0, 100.0])
    p = origin + (cells + 0.5) * 0.01 + rng.uniform(-0.004, 0.004, cells.shape)
    res = voxelize(p, 0.01, origin=origin)
    np.testing.assert_array_equal(res.tensor.indices[res.inverse, 1:], cells)
    # the float32 way (cast first) would not: the casting error is metres-scale / 100
    p32 = p.astype(np.float32).astype(np.float64)
    assert not np.array_equal(np.floor((p32 - origin) / 0.01), cells)
    # the default origin floors the minimum to the same centimetre grid
    res2 = voxelize(p, 0.01)
    shift = np.round((np.array(res2.origin) - origin) / 0.01).astype(int)
    np.testing.assert_array_equal(res2.tensor.indices[res2.inverse, 1:] + shift, cells)


def test_tiles_share_a_grid_with_a_fixed_origin(rng):
    p = rng.random((400, 2)) * 10
    left, right = p[p[:, 0] < 5], p[p[:, 0] >= 5]
    whole = voxelize(p, 0.5, origin=[0, 0])
    a, b = voxelize(left, 0.5, origin=[0, 0]), voxelize(right, 0.5, origin=[0, 0])
    got = {tuple(r) for r in a.tensor.indices.tolist()} | {tuple(r) for r in
                                                          b.tensor.indices.tolist()}
    assert got == {tuple(r) for r in whole.tensor.indices.tolist()}


def test_validation_names_the_argument(rng):
    p = rng.random((5, 3))
    with pytest.raises(TypeError, match="points must be"):
        voxelize("xyz", 0.1)
    with pytest.raises(TypeError, match="points must be a float"):
        voxelize(p.astype(complex), 0.1)
    with pytest.raises(ValueError, match=r"points must have shape \(N, D\)"):
        voxelize(p[0], 0.1)
    with pytest.raises(ValueError, match="columns"):
        voxelize(np.zeros((2, 11)), 0.1)
    with pytest.raises(ValueError, match="same number of columns"):
        voxelize([p, p[:, :2]], 0.1)
    with pytest.raises(ValueError, match="voxel_size must be finite positive"):
        voxelize(p, [0.1, 0, 0.1])
    with pytest.raises(ValueError, match="voxel_size must be one number or 3"):
        voxelize(p, [0.1, 0.1])
    with pytest.raises(TypeError, match="voxel_size"):
        voxelize(p, "0.1")
    with pytest.raises(ValueError, match="origin must be finite"):
        voxelize(p, 0.1, origin=[0, np.inf, 0])
    with pytest.raises(ValueError, match="bounds: upper must exceed"):
        voxelize(p, 0.1, bounds=([0, 0, 0], [1, 0, 1]))
    with pytest.raises(TypeError, match="bounds must be a pair"):
        voxelize(p, 0.1, bounds=[0, 1, 2])
    with pytest.raises(ValueError, match="reduce must be one of"):
        voxelize(p, 0.1, reduce="median")
    with pytest.raises(TypeError, match="features must be a float32"):
        voxelize(p, 0.1, np.ones((5, 1), int))
    with pytest.raises(ValueError, match="features must have shape"):
        voxelize(p, 0.1, np.ones((4, 1)))
    with pytest.raises(ValueError, match="features row 2 is not finite"):
        f = np.ones((5, 1))
        f[2] = np.nan
        voxelize(p, 0.1, f)
    with pytest.raises(TypeError, match="features must be a list"):
        voxelize([p, p], 0.1, np.ones((10, 1)))
    with pytest.raises(ValueError, match="features has 1 entries"):
        voxelize([p, p], 0.1, [np.ones((5, 1))])
    with pytest.raises(TypeError, match="labels must be an integer"):
        voxelize(p, 0.1, labels=np.ones(5))
    with pytest.raises(ValueError, match="labels must have shape"):
        voxelize(p, 0.1, labels=np.ones(4, int))
    with pytest.raises(TypeError, match="max_points_per_voxel"):
        voxelize(p, 0.1, max_points_per_voxel=1.5)
    with pytest.raises(ValueError, match="max_voxels must be >= 1"):
        voxelize(p, 0.1, max_voxels=0)
    with pytest.raises(TypeError, match="drop_invalid"):
        voxelize(p, 0.1, drop_invalid="yes")
    with pytest.raises(ValueError, match="label_conflict"):
        voxelize(p, 0.1, labels=np.ones(5, int), label_conflict="majority")
    with pytest.raises(ValueError, match="voxel_size .* 2\\*\\*31"):
        voxelize(np.array([[0.0], [1e6]]), 1e-6)
    x, inv = voxelize(p, 0.5)
    with pytest.raises(TypeError, match="tensor must be a SparseTensor"):
        devoxelize(x.features, inv)
    with pytest.raises(ValueError, match="inverse must hold rows"):
        devoxelize(x, inv + x.n_active)
    with pytest.raises(TypeError, match="inverse must be a 1-D integer"):
        devoxelize(x, inv.astype(float))
    with pytest.raises(ValueError, match="D = 3 columns"):
        trilinear(x, p[:, :2], 0.5, (0, 0, 0))
    with pytest.raises(ValueError, match="missing"):
        trilinear(x, p, 0.5, (0, 0, 0), missing="nearest")
    with pytest.raises(ValueError, match="NaN or inf"):
        trilinear(x, np.full((1, 3), np.nan), 0.5, (0, 0, 0))


def test_devoxelize_values_and_gradient(rng):
    p = rng.random((30, 2)) * 2
    f = rng.standard_normal((30, 3))
    res = voxelize(p, 0.5, f, "mean", bounds=([0, 0], [1.5, 2.0]), drop_invalid=True)
    out = devoxelize(res.tensor, res.inverse)
    live = res.inverse >= 0
    np.testing.assert_array_equal(out[live], res.tensor.features[res.inverse[live]])
    assert np.all(out[~live] == 0) and (~live).any()

    def fn(feats):
        return devoxelize(res.tensor.with_features(feats), res.inverse)

    check_gradients(fn, [res.tensor.features])


@pytest.mark.parametrize("reduce", ["mean", "sum", "max", "min", "first", "last"])
def test_voxelize_is_differentiable_in_the_features(reduce, rng):
    p = rng.random((40, 2)) * 2
    f = rng.standard_normal((40, 2))

    def fn(feats):
        return voxelize(p, 0.5, feats, reduce, bounds=([0, 0], [1.6, 2.0]),
                        drop_invalid=True).tensor.features

    check_gradients(fn, [f], allow_zero=False)


def _dense_multilinear(x, pts, size, origin):
    dense = x.to_dense()[0]            # (C, S...)
    d = x.dimension
    out = np.zeros((len(pts), x.n_channels))
    for i, q in enumerate(pts):
        u = (q - origin) / size - 0.5
        lo = np.floor(u).astype(int)
        t = u - lo
        for k in range(1 << d):
            bits = [(k >> (d - 1 - a)) & 1 for a in range(d)]
            cell = lo + bits
            if np.any(cell < 0) or np.any(cell >= x.spatial_shape):
                continue
            w = np.prod([t[a] if bits[a] else 1 - t[a] for a in range(d)])
            out[i] += w * dense[(slice(None),) + tuple(cell)]
    return out


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_trilinear_values_and_gradient(d, rng):
    p = rng.random((60, d)) * 2
    f = rng.standard_normal((60, 2))
    size, origin = 0.5, np.full(d, -0.25)
    res = voxelize(p, size, f, origin=origin)
    q = rng.random((25, d)) * 2.5 - 0.25
    got = trilinear(res.tensor, q, size, origin)
    np.testing.assert_allclose(got, _dense_multilinear(res.tensor, q, size, origin),
                               atol=1e-12)
    # at a voxel centre: the voxel's own value
    centre = origin + (res.tensor.indices[:3, 1:] + 0.5) * size
    np.testing.assert_allclose(trilinear(res.tensor, centre, size, origin),
                               res.tensor.features[:3], atol=1e-12)
    check_gradients(lambda feats: trilinear(res.tensor.with_features(feats), q, size, origin),
                    [res.tensor.features])


def test_trilinear_renormalize_and_batches(rng):
    p = [rng.random((200, 2)) * 2, rng.random((150, 2)) * 2]
    f = [np.ones((200, 1)), 2 * np.ones((150, 1))]
    res = voxelize(p, 0.5, f, origin=[0, 0])
    q = [rng.random((10, 2)) * 2, rng.random((10, 2)) * 2]
    ren = trilinear(res.tensor, q, 0.5, (0, 0), missing="renormalize")
    assert np.allclose(ren[:10], 1) and np.allclose(ren[10:], 2)   # constant per sample
    zero = trilinear(res.tensor, q, 0.5, (0, 0))
    assert np.all(zero[:10] <= 1 + 1e-12)
    check_gradients(lambda feats: trilinear(res.tensor.with_features(feats), q, 0.5, (0, 0),
                                            missing="renormalize"), [res.tensor.features])


def test_deterministic(rng):
    p = rng.random((5000, 3)) * 5
    f = rng.standard_normal((5000, 4)).astype(np.float32)
    a = voxelize(p, 0.3, f, "mean")
    b = voxelize(p.copy(), 0.3, f.copy(), "mean")
    assert a.tensor.features.tobytes() == b.tensor.features.tobytes()
    np.testing.assert_array_equal(a.inverse, b.inverse)


@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_gpu_matches_the_cpu(reduce, gpu_device, rng):
    clouds = _clouds(rng, [80, 0, 50], 3)
    feats = [rng.standard_normal((len(c), 2)) for c in clouds]
    labels = [rng.integers(0, 3, len(c)) for c in clouds]
    kwargs = dict(reduce=reduce, bounds=([0, 0, 0], [3.5, 4, 4]), drop_invalid=True)
    cpu = voxelize(clouds, 0.5, feats, labels=labels, **kwargs)
    dev = [backend.to_device(c, gpu_device) for c in clouds]
    dfeat = [backend.to_device(c, gpu_device) for c in feats]
    dlab = [backend.to_device(c, gpu_device) for c in labels]
    gpu = voxelize(dev, 0.5, dfeat, labels=dlab, **kwargs)
    assert backend.is_cupy_array(gpu.tensor.features) and gpu.tensor.device != "cpu"
    np.testing.assert_array_equal(backend.to_numpy(gpu.tensor.indices), cpu.tensor.indices)
    np.testing.assert_array_equal(backend.to_numpy(gpu.inverse), cpu.inverse)
    np.testing.assert_array_equal(backend.to_numpy(gpu.labels), cpu.labels)
    np.testing.assert_allclose(backend.to_numpy(gpu.tensor.features), cpu.tensor.features,
                               rtol=1e-12, atol=1e-12)
    assert gpu.dropped == cpu.dropped
    np.testing.assert_allclose(backend.to_numpy(devoxelize(gpu.tensor, gpu.inverse)),
                               devoxelize(cpu.tensor, cpu.inverse), rtol=1e-12)
    q = rng.random((20, 3)) * 3.5
    np.testing.assert_allclose(
        backend.to_numpy(trilinear(gpu.tensor, backend.to_device(q, gpu_device), 0.5,
                                   gpu.origin)),
        trilinear(cpu.tensor, q, 0.5, cpu.origin), rtol=1e-12, atol=1e-12)


def test_gpu_caps_and_gradients(gpu_device, rng):
    p = rng.random((120, 2)) * 3
    f = rng.standard_normal((120, 2))
    with pytest.warns(UserWarning):
        cpu = voxelize(p, 1.0, f, "max", max_points_per_voxel=4, max_voxels=5)
    with pytest.warns(UserWarning):
        gpu = voxelize(backend.to_device(p, gpu_device), 1.0, backend.to_device(f, gpu_device),
                       "max", max_points_per_voxel=4, max_voxels=5)
    np.testing.assert_array_equal(backend.to_numpy(gpu.inverse), cpu.inverse)
    np.testing.assert_array_equal(backend.to_numpy(gpu.tensor.features), cpu.tensor.features)
    assert gpu.dropped == cpu.dropped
    feats = ad.Tensor(gpu.tensor.features, requires_grad=True)
    out = devoxelize(gpu.tensor.with_features(feats), gpu.inverse)
    ad.sum(out * out).backward()
    ref = ad.Tensor(cpu.tensor.features, requires_grad=True)
    ad.sum(devoxelize(cpu.tensor.with_features(ref), cpu.inverse) ** 2).backward()
    np.testing.assert_allclose(backend.to_numpy(feats.grad), ref.grad, rtol=1e-12)


# -- the NumPy fast path: packed keys with rows below them, chunked passes, threads ------------
def _voxelize_bits(res):
    x = res.tensor
    return (x.indices.tobytes(), np.asarray(x.features).tobytes(), res.inverse.tobytes(),
            None if res.labels is None else res.labels.tobytes(), tuple(res.dropped),
            res.origin, x.spatial_shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("reduce", ["mean", "sum", "first", "last", "max", "min"])
def test_reductions_have_segment_reduce_bits(reduce, channels, dtype, rng):
    """The fast path's sums (CSR in row order for float32 and wide float64, bincount for
    narrow float64) and picks are those of the contract's segment_reduce, bit for bit,
    also with dropped points (only the kept rows reduce) and signed zeros."""
    from sparsegrid import cpu
    p = np.round(rng.random((3000, 3)) * 6, 1)
    p[::97] = np.nan
    f = rng.standard_normal((3000, channels)).astype(dtype)
    f[::13] = -0.0
    res = voxelize(p, 0.5, f, reduce, drop_invalid=True)
    used = np.flatnonzero(res.inverse >= 0)
    mode = "max" if reduce == "min" else reduce
    picked = -f[used] if reduce == "min" else f[used]
    ref, _ = cpu.segment_reduce(np.ascontiguousarray(picked), res.inverse[used],
                                res.tensor.n_active, mode)
    if reduce == "min":
        ref = -ref
    assert res.tensor.features.dtype == dtype
    assert res.tensor.features.tobytes() == ref.tobytes()


@pytest.mark.parametrize("reduce", ["mean", "sum", "first", "last", "max", "count"])
def test_thread_and_chunk_counts_give_the_same_bits(reduce, rng, monkeypatch):
    import sparsegrid
    from sparsegrid import pointcloud
    clouds = [np.round(rng.random((n, 3)) * 8, 1) + 1e5 for n in (40_000, 0, 25_000)]
    clouds[0][5] = np.inf
    feats = [rng.standard_normal((len(c), 4)).astype(np.float32) for c in clouds]
    labels = [rng.integers(0, 5, len(c)) for c in clouds]
    kwargs = dict(labels=labels, drop_invalid=True, bounds=([1e5] * 3, [1e5 + 7.5] * 3))
    before = sparsegrid.get_num_threads()
    results = []
    try:
        for chunk, piece, threads in ((1 << 16, 1 << 18, 1), (1 << 16, 1 << 18, 2),
                                      (997, 5000, 1), (997, 5000, 2), (4096, 7919, 3)):
            monkeypatch.setattr(pointcloud, "_CHUNK", chunk)
            monkeypatch.setattr(pointcloud, "_SORT_PIECE", piece)   # sorted in pieces
            sparsegrid.set_num_threads(threads)
            results.append(_voxelize_bits(voxelize(clouds, 0.25, feats, reduce, **kwargs)))
    finally:
        sparsegrid.set_num_threads(before)
    assert all(r == results[0] for r in results[1:])
    dropped = results[0][4]
    assert dropped[0] == 1 and dropped[1] > 0      # the inf point, points outside bounds


def test_keys_too_wide_for_rows_fall_back_to_a_stable_argsort(rng):
    """20 bits per axis leave no room for 12 bits of rows below the key: the other path
    (a stable argsort of plain keys) gives the reference result."""
    from sparsegrid import pointcloud
    p = np.round(rng.random((3000, 3)) * 1000, 2)
    p[1000:1500] = p[:500]
    f = rng.standard_normal((3000, 2))
    packing = pointcloud._packing((10**6,) * 3, 1, 3000)
    assert packing.shifts is not None and packing.row_bits is None
    for reduce in ("mean", "first", "last"):
        res = voxelize(p, 1e-3, f, reduce)
        keys, out, inverse = _reference([p], 1e-3, f, reduce, res.origin)
        np.testing.assert_array_equal(res.tensor.indices, keys)
        np.testing.assert_array_equal(res.inverse, inverse)
        np.testing.assert_allclose(res.tensor.features, out, rtol=1e-12)


def test_grids_too_wide_for_bit_fields_use_exact_strides():
    """Extents 2**21 + 1, 2**21 + 1, 2**20 need 65 bits of fields but fit the exact
    strides (about 2**62 cells): keys and indices are then the exact packing's."""
    from sparsegrid import pointcloud
    p = np.array([[0.5, 0.5, 0.5], [2**21 + 0.5, 2**21 + 0.5, 2**20 - 0.5],
                  [3.5, 2.5, 1.5], [0.7, 0.2, 0.9], [2**21 + 0.1, 7.5, 9.5]])
    packing = pointcloud._packing((2**21 + 1, 2**21 + 1, 2**20), 1, len(p))
    assert packing.shifts is None
    res = voxelize(p, 1.0, np.arange(5.0)[:, None], "sum")
    assert res.tensor.spatial_shape == (2**21 + 1, 2**21 + 1, 2**20)
    assert res.tensor.indices.tolist() == [[0, 0, 0, 0], [0, 3, 2, 1],
                                           [0, 2**21, 7, 9], [0, 2**21, 2**21, 2**20 - 1]]
    assert res.inverse.tolist() == [0, 3, 1, 0, 2]
    assert res.tensor.features[:, 0].tolist() == [3.0, 2.0, 4.0, 1.0]


def test_packing_sorts_like_the_exact_strides(rng):
    """The bit-field keys order voxels as the exact strides do: (batch, x1, ..., xD)."""
    from sparsegrid import pointcloud
    from sparsegrid.coords import pack_keys
    shape = (5, 300, 7)
    packing = pointcloud._packing(shape, 3, 1000)
    assert packing.bits == [3, 9, 3] and packing.row_bits == 10
    idx = np.column_stack([rng.integers(0, 3, 500)] + [rng.integers(0, s, 500) for s in shape])
    ours = idx @ np.array(packing.strides)
    exact, _ = pack_keys(idx, shape, 3)
    np.testing.assert_array_equal(np.argsort(ours, kind="stable"),
                                  np.argsort(exact, kind="stable"))
    unpacked = pointcloud._unpack(np, np.unique(ours), packing, shape)
    np.testing.assert_array_equal(unpacked, np.unique(idx, axis=0))


def test_row_gathers_copy_bits(rng):
    """The 4-, 8- and 16-byte row gathers (one element per row) copy every bit."""
    from sparsegrid import pointcloud
    for dtype, channels in ((np.float32, 1), (np.float32, 2), (np.float32, 4),
                            (np.float64, 1), (np.float64, 2), (np.float32, 3)):
        data = rng.standard_normal((5000, channels)).astype(dtype)
        data.reshape(-1)[::7] = -0.0
        data.reshape(-1)[::11] = np.finfo(dtype).tiny / 4     # subnormal
        rows = rng.integers(0, 5000, 7000)
        got = pointcloud._take_rows(data, rows)
        assert got.dtype == dtype and got.tobytes() == data.take(rows, axis=0).tobytes()
    strided = rng.standard_normal((100, 8))[:, ::2]        # not contiguous: rows as rows
    assert pointcloud._row_view(strided) is None
    np.testing.assert_array_equal(pointcloud._take_rows(strided, [3, 1]), strided[[3, 1]])


@pytest.mark.parametrize("reduce", ["mean", "first"])
def test_peak_memory_within_three_times_the_input(reduce, rng):
    """tracemalloc's peak (NumPy's buffers) of one call: at most 3x points + features."""
    import tracemalloc
    p = rng.random((300_000, 3)) * 40
    f = rng.random((300_000, 4)).astype(np.float32)
    voxelize(p, 0.1, f, reduce)     # imports what the call needs (counted otherwise)
    tracemalloc.start()
    try:
        voxelize(p, 0.1, f, reduce)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 3 * (p.nbytes + f.nbytes), peak / (p.nbytes + f.nbytes)


def test_max_voxels_with_a_63_bit_key():
    """A single cloud whose packed key uses all 63 bits (three 21-bit axes)."""
    points = np.array([[0.0, 0, 0], [2000.0, 2000, 2000], [1.0, 1, 1]])
    with pytest.warns(UserWarning):
        result = voxelize(points, 1e-3, max_voxels=2)
    assert result.tensor.n_active == 2 and result.dropped.voxels == 1


def test_bounds_are_compared_in_float64_for_float32_points():
    """Whether a float32 point is inside the bounds does not depend on the other points."""
    alone = voxelize(np.array([[0.2], [0.7]], np.float32), 0.1, bounds=([0.0], [0.7]))
    assert (alone.inverse >= 0).all()                     # float32(0.7) < 0.7 in float64
    mixed = voxelize(np.array([[0.2], [0.7], [5.0]], np.float32), 0.1,
                     bounds=([0.0], [0.7]), drop_invalid=True)
    assert list(mixed.inverse >= 0) == [True, True, False]
