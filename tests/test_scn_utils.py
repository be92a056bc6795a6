"""SparseConvNet's ``sparseconvnet.utils`` on sparsegrid (``sparsegrid.nn.utils``, also
``scn.<name>``): every public name of SCN's module, against independent references
(NumPy's ``unique``, brute force, closed forms, finite differences) and its errors."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

import sparsegrid as sg
import sparsegrid.nn as scn
from optional import require
from sparsegrid import autodiff as ad
from sparsegrid.autodiff import check_gradients
from sparsegrid.autodiff.core import data_of
from sparsegrid.nn import utils

# SCN's utils.py, as of cf251d0: every public name it defines
SCN_UTILS = ["toLongTensor", "optionalTensor", "optionalTensorReturn", "threadDatasetIterator",
             "concatenate_feature_planes", "add_feature_planes", "append_tensors", "AddCoords",
             "compare_sparse", "spectral_norm_svd", "pad_with_batch_idx",
             "batch_location_tensors", "prepare_BLInput", "checkpoint_restore", "is_power2",
             "is_square", "has_only_one_nonzero_digit", "checkpoint_save", "random_rotation",
             "squareroot_rotation", "voxelize_pointcloud", "checkpointFunction",
             "checkpoint101", "matplotlib_cubes", "matplotlib_planes", "visdom_scatter",
             "ply_scatter", "VerboseIdentity"]


@pytest.mark.parametrize("name", SCN_UTILS)
def test_every_scn_utils_name_is_provided_in_both_places(name):
    assert callable(getattr(utils, name)) and getattr(scn, name) is getattr(utils, name)
    assert name in utils.__all__ and name in scn.__all__
    assert getattr(utils, name).__doc__


def test_scn_is_cuda_build_reports_whether_a_gpu_can_be_used():
    assert scn.SCN.is_cuda_build() == sg.backend.cuda_available()


# -- small helpers ------------------------------------------------------------------------------
def test_to_long_tensor():
    np.testing.assert_array_equal(scn.toLongTensor(3, 5), [5, 5, 5])
    out = scn.toLongTensor(2, [4, 7])
    assert out.dtype == np.int64 and out.tolist() == [4, 7]
    assert scn.toLongTensor(2, np.array([1, 2])).tolist() == [1, 2]
    with pytest.raises(ValueError):
        scn.toLongTensor(3, [1, 2])
    with pytest.raises(TypeError):
        scn.toLongTensor(2, 1.5)


def test_optional_tensor():
    conv = scn.SubmanifoldConvolution(2, 1, 2, 3, False)
    assert scn.optionalTensor(conv, "weight") is conv.weight
    assert scn.optionalTensor(conv, "bias").shape == (0,)        # bias=False: None here
    assert scn.optionalTensor(conv, "missing").size == 0
    assert scn.optionalTensorReturn(np.zeros(0)) is None
    a = np.ones(2)
    assert scn.optionalTensorReturn(a) is a


@pytest.mark.parametrize("fn, true, false", [
    (scn.is_power2, [1, 2, 4, 1024, 2 ** 60, 8.0], [0, -2, 3, 6, 1023, 2 ** 60 + 1]),
    (scn.is_square, [0, 1, 4, 9, 144, (10 ** 20 + 1) ** 2], [-4, 2, 3, 10 ** 40 + 1]),
    (scn.has_only_one_nonzero_digit, [1, 9, 10, 70, 500, 10 ** 30, 20.0],
     [0, -10, 11, 101, 999, 10 ** 30 + 1])])
def test_number_tests(fn, true, false):
    assert all(fn(v) for v in true) and not any(fn(v) for v in false)
    with pytest.raises(TypeError):
        fn(2.5)
    # against the digit / bit definitions
    for n in range(1, 2000):
        assert scn.is_power2(n) == (bin(n).count("1") == 1)
        assert scn.has_only_one_nonzero_digit(n) == (sum(c != "0" for c in str(n)) == 1)
        assert scn.is_square(n) == (int(round(n ** 0.5)) ** 2 == n)


def test_thread_dataset_iterator_yields_every_item_in_order():
    loads = []

    class Slow:
        def __len__(self):
            return 40

        def __getitem__(self, k):
            loads.append(threading.get_ident())
            time.sleep(0.001 * (k % 3))
            return {"k": k}

    iterator = scn.threadDatasetIterator(Slow())
    assert [item["k"] for item in iterator()] == list(range(40))
    assert [item["k"] for item in iterator()] == list(range(40))     # reusable per epoch
    assert len(set(loads)) > 1                                        # threads did load
    assert list(scn.threadDatasetIterator([])()) == []

    class Broken(Slow):
        def __getitem__(self, k):
            if k == 5:
                raise KeyError("sample 5")
            return k

    with pytest.raises(KeyError, match="sample 5"):
        list(scn.threadDatasetIterator(Broken())())
    it = scn.threadDatasetIterator(Slow())()
    assert next(it)["k"] == 0
    it.close()                                                        # stopping early


# -- input preparation ----------------------------------------------------------------------------
def test_pad_with_batch_idx_and_batch_location_tensors(rng):
    a = rng.integers(0, 9, (5, 3))
    b = np.zeros((0, 3), np.int64)
    c = rng.integers(0, 9, (2, 3)).astype(np.float32)     # whole-number floats (SCN: .long())
    padded = scn.pad_with_batch_idx(a, 4)
    assert padded.dtype == np.int64 and padded.shape == (5, 4)
    np.testing.assert_array_equal(padded, np.concatenate([a, np.full((5, 1), 4)], 1))
    batched = scn.batch_location_tensors([a, b, c])
    expected = np.concatenate([np.concatenate([a, np.zeros((5, 1), int)], 1),
                               np.concatenate([c.astype(int), np.full((2, 1), 2)], 1)])
    np.testing.assert_array_equal(batched, expected)
    assert batched.dtype == np.int64
    # the result feeds an InputLayer: sample 1 is empty, batch size 3 with the bound
    x = scn.InputLayer(3, 9)([batched, np.ones((7, 1), np.float32), 3])
    assert x.batch_size() == 3 and x.n_active == len(np.unique(batched, axis=0))
    assert scn.batch_location_tensors([b, b]).shape == (0, 4)
    with pytest.raises(ValueError, match="empty list"):
        scn.batch_location_tensors([])
    with pytest.raises(ValueError, match="one D"):
        scn.batch_location_tensors([a, np.zeros((2, 2))])
    with pytest.raises(ValueError, match=r"row 1 has 0.5"):
        scn.pad_with_batch_idx(np.array([[1.0, 2.0], [0.5, 1.0]]), 0)


def test_prepare_bl_input(rng):
    samples = [(rng.integers(0, 10, (n, 2)), rng.standard_normal((n, 3)).astype(np.float32))
               for n in (4, 1, 6)]
    L, F = scn.prepare_BLInput(samples)
    assert L.shape == (3, 6, 2) and F.shape == (3, 6, 3)
    assert L.dtype == np.int64 and F.dtype == np.float32
    for i, (loc, feat) in enumerate(samples):
        np.testing.assert_array_equal(L[i, :len(loc)], loc)
        np.testing.assert_array_equal(F[i, :len(loc)], feat)
        assert (L[i, len(loc):] == -1).all() and (F[i, len(loc):] == 0).all()
    # as BLInputLayer takes it, the same tensor as InputLayer on the batched rows
    x = scn.BLInputLayer(2, 10, mode=3)([L, F])
    coords = scn.batch_location_tensors([s[0] for s in samples])
    y = scn.InputLayer(2, 10, mode=3)([coords, np.concatenate([s[1] for s in samples])])
    np.testing.assert_array_equal(x.indices, y.indices)
    np.testing.assert_allclose(data_of(x.features), data_of(y.features), rtol=1e-6)
    # float64 features stay float64; float locations with whole values are accepted
    L64, F64 = scn.prepare_BLInput([(np.array([[1.0, 2.0]]), np.ones((1, 1)))])
    assert L64.dtype == np.int64 and F64.dtype == np.float64
    with pytest.raises(ValueError, match="empty batch"):
        scn.prepare_BLInput([])
    with pytest.raises(ValueError, match="one n"):
        scn.prepare_BLInput([(np.zeros((2, 2)), np.zeros((3, 1)))])
    with pytest.raises(ValueError, match="same number of columns"):
        scn.prepare_BLInput([(np.zeros((2, 2)), np.zeros((2, 1))),
                             (np.zeros((2, 3)), np.zeros((2, 1)))])
    with pytest.raises(TypeError, match="pair"):
        scn.prepare_BLInput([np.zeros((2, 2))])


@pytest.mark.parametrize("average, accumulate", [(True, False), (False, True),
                                                 (False, False), (True, True)])
@pytest.mark.parametrize("dtype", [np.int64, np.float64, np.int32])
def test_voxelize_pointcloud_against_numpy_unique(rng, average, accumulate, dtype):
    xyz = rng.integers(-3, 3, (200, 3)).astype(dtype)
    if dtype == np.float64:
        xyz = xyz + rng.choice([0.0, 0.25, 1e6], (200, 3))       # fractional, large
    rgb = rng.standard_normal((200, 4)).astype(np.float32)
    out_xyz, out_rgb = scn.voxelize_pointcloud(xyz, rgb, average, accumulate)
    ref_xyz, index, inverse, counts = np.unique(xyz, axis=0, return_index=True,
                                                return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    np.testing.assert_array_equal(out_xyz, ref_xyz)
    assert out_xyz.dtype == xyz.dtype
    if average or accumulate:
        sums = np.zeros((len(ref_xyz), 4))
        np.add.at(sums, inverse, rgb.astype(np.float64))
        expected = sums / counts[:, None] if average else sums
        assert out_rgb.dtype == np.float32
        np.testing.assert_allclose(out_rgb, expected, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(out_rgb, rgb[index])


def test_voxelize_pointcloud_edge_cases(rng):
    empty = np.zeros((0, 3)), np.zeros((0, 2), np.float32)
    a, b = scn.voxelize_pointcloud(*empty)
    assert a is empty[0] and b is empty[1]
    one = scn.voxelize_pointcloud(np.array([[5, 5, 5]]), np.array([[1.0, 2.0]]))
    assert one[0].tolist() == [[5, 5, 5]] and one[1].tolist() == [[1.0, 2.0]]
    # uint8 colours: kept for 'first', averaged in float32
    xyz = np.array([[0, 0], [0, 0], [1, 0]])
    colors = np.array([[10], [20], [30]], np.uint8)
    assert scn.voxelize_pointcloud(xyz, colors, False)[1].tolist() == [[10], [30]]
    assert scn.voxelize_pointcloud(xyz, colors)[1].tolist() == [[15.0], [30.0]]
    with pytest.raises(ValueError, match="row 1 is not finite"):
        scn.voxelize_pointcloud(np.array([[0.0, 1.0], [np.nan, 0.0]]), np.zeros((2, 1)))
    with pytest.raises(ValueError, match="one N"):
        scn.voxelize_pointcloud(np.zeros((3, 2)), np.zeros((2, 1)))


# -- checkpoints -------------------------------------------------------------------------------
def _model(seed):
    scn.manual_seed(seed)
    return scn.Sequential(scn.SubmanifoldConvolution(2, 1, 3, 3, True), scn.BatchNormReLU(3))


def test_checkpoint_save_and_restore_follow_scns_naming(tmp_path, capsys):
    exp = str(tmp_path / "unet_scale20")
    assert scn.checkpoint_restore(_model(0), exp, "unet", use_cuda=False) == 1   # nothing
    assert capsys.readouterr().out == ""
    saved = {}
    for epoch in range(1, 7):
        model = _model(epoch)
        saved[epoch] = model.state_dict()
        scn.checkpoint_save(model, exp, "unet", epoch, use_cuda=False)
    names = sorted(os.listdir(tmp_path))
    # the previous epoch's file is removed unless it is a power of 2: 1, 2, 4 stay, and 6
    assert names == [f"unet_scale20-{e:09d}-unet.pth" for e in (1, 2, 4, 6)]
    target = _model(99)
    assert scn.checkpoint_restore(target, exp, "unet", use_cuda=False) == 7
    assert capsys.readouterr().out == f"Restore from {exp}-000000006-unet.pth\n"
    for key, value in saved[6].items():
        np.testing.assert_array_equal(target.state_dict()[key], value)
    assert scn.checkpoint_restore(target, exp, "unet", False, epoch=2) == 3
    for key, value in saved[2].items():
        np.testing.assert_array_equal(target.state_dict()[key], value)
    with pytest.raises(FileNotFoundError, match="epoch 3"):
        scn.checkpoint_restore(target, exp, "unet", False, epoch=3)
    # other experiments and other files next to them are not mistaken for checkpoints
    (tmp_path / "unet_scale20-abc-unet.pth").write_text("x")
    scn.checkpoint_save(_model(1), str(tmp_path / "unet_scale20-x"), "unet", 9, False)
    assert scn.checkpoint_restore(target, exp, "unet", False) == 7


@pytest.mark.skipif(sg.backend.cuda_available(), reason="tests the error without a GPU")
def test_checkpoint_use_cuda_moves_the_model_as_scn(tmp_path):
    with pytest.raises(RuntimeError, match="needs CuPy"):
        scn.checkpoint_save(_model(0), str(tmp_path / "e"), "m", 1, use_cuda=True)


# -- geometry ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dimension", [1, 2, 3, 5])
def test_random_rotation_is_orthogonal_with_the_right_determinant(dimension):
    scn.manual_seed(0)
    dets = []
    for _ in range(200):
        r = scn.random_rotation(dimension)
        assert r.dtype == np.float32 and r.shape == (dimension, dimension)
        np.testing.assert_allclose(r @ r.T, np.eye(dimension), atol=1e-5)
        assert np.linalg.det(r) > 0
        dets.append(np.linalg.det(scn.random_rotation(dimension, allow_mirror=True)))
    dets = np.array(dets)
    np.testing.assert_allclose(np.abs(dets), 1, atol=1e-4)
    assert 60 < (dets < 0).sum() < 140                       # mirrors half of the time
    scn.manual_seed(5)
    a = scn.random_rotation(dimension)
    scn.manual_seed(5)
    np.testing.assert_array_equal(a, scn.random_rotation(dimension))
    with pytest.raises(ValueError, match="positive"):
        scn.random_rotation(0)


def test_random_rotation_is_uniform():
    """Haar measure: the rotated x axis is uniform on the sphere (mean 0, E[z^2] = 1/3)."""
    scn.manual_seed(1)
    v = np.array([scn.random_rotation(3)[:, 0] for _ in range(4000)])
    np.testing.assert_allclose(v.mean(0), 0, atol=0.05)
    np.testing.assert_allclose((v ** 2).mean(0), 1 / 3, atol=0.03)


def test_squareroot_rotation_squares_to_the_rotation():
    scn.manual_seed(2)
    for _ in range(20):
        a = scn.random_rotation(3)
        h = scn.squareroot_rotation(a)
        np.testing.assert_allclose(h @ h, a, atol=1e-5)
        np.testing.assert_allclose(h @ h.T, np.eye(3), atol=1e-5)
        # half the angle: trace(a) = 1 + 2 cos(t), trace(h) = 1 + 2 cos(t / 2)
        angle = np.arccos(np.clip((np.trace(a) - 1) / 2, -1, 1))
        np.testing.assert_allclose(np.trace(h), 1 + 2 * np.cos(angle / 2), atol=1e-4)
    with pytest.raises(ValueError, match="rotation"):
        scn.squareroot_rotation(np.diag([1.0, 1.0, -1.0]))
    with pytest.raises(ValueError, match="rotation"):
        scn.squareroot_rotation(np.eye(2))


# -- networks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: scn.SubmanifoldConvolution(2, 3, 4, 3, False),
                                  lambda: scn.NetworkInNetwork(3, 5),
                                  lambda: scn.Linear(4, 2),
                                  lambda: scn.SubmanifoldConvolution(2, 4, 6, 3, False, 2)])
def test_spectral_norm_svd_and_its_gradient(make):
    scn.manual_seed(3)
    module = make().double()
    w = module.weight.data
    matrix = w.reshape(-1, w.shape[-1]) if w.ndim >= 3 else w
    sigma = scn.spectral_norm_svd(module)
    np.testing.assert_allclose(sigma.item(), np.linalg.norm(matrix, 2), rtol=1e-12)

    def f(weight):
        object.__setattr__(module, "weight", weight)
        return scn.spectral_norm_svd(module)

    check_gradients(f, [ad.Tensor(w.copy(), requires_grad=True)])
    with pytest.raises(TypeError, match="no weight"):
        scn.spectral_norm_svd(scn.ReLU())


def _pair(rng):
    scn.manual_seed(4)
    coords = np.stack(np.unravel_index(rng.choice(128, 30, replace=False), (8, 8, 2)), 1)
    feats = rng.standard_normal((30, 2))
    net = scn.Sequential(scn.SubmanifoldConvolution(2, 2, 3, 3, True), scn.BatchNormReLU(3),
                         scn.Dropout(0.3), scn.Convolution(2, 3, 2, 2, 2, False)).double()
    return net, scn.InputLayer(2, 8)([coords, feats])


def test_checkpoint101_matches_the_plain_run_and_its_gradients(rng):
    net, x = _pair(rng)
    leaf = ad.Tensor(data_of(x.features).copy(), requires_grad=True)
    x1 = x.with_features(leaf)
    state = scn.default_rng().bit_generator.state
    plain = net(x1)
    ad.sum(ad.mul(plain.features, plain.features)).backward()
    grads = [p.grad.copy() for p in net.parameters()] + [leaf.grad.copy()]
    net.zero_grad()
    leaf.grad = None
    scn.default_rng().bit_generator.state = state            # the same dropout draws
    out = scn.checkpoint101(net, x1, down=2)
    assert out.spatial_shape == (4, 4)
    np.testing.assert_array_equal(data_of(out.features), data_of(plain.features))
    ad.sum(ad.mul(out.features, out.features)).backward()
    for a, b in zip([p.grad for p in net.parameters()] + [leaf.grad], grads):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    # an input that needs no gradient: the parameters still get theirs
    net.zero_grad()
    ad.sum(scn.checkpoint101(net, x, 2).features).backward()
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError, match=r"x.spatial_size // down is \(8, 8\)"):
        scn.checkpoint101(net, x)
    with ad.no_grad():
        assert not scn.checkpoint101(net, x, 2).requires_grad
    # the torch-Function form: features in, features out
    f = scn.checkpointFunction.apply(net, x.features, x.metadata, x.spatial_size)
    assert f.shape == out.features.shape


# -- plots and exports -----------------------------------------------------------------------------
def test_matplotlib_cubes_and_planes(rng):
    require("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    positions = rng.integers(0, 5, (7, 3))
    colors = rng.random((7, 3))
    for fn, faces in ((scn.matplotlib_cubes, 6), (scn.matplotlib_planes, 1)):
        fig = plt.figure()
        ax = fig.add_subplot(projection="3d")
        fn(ax, positions, colors)
        (collection,) = ax.collections
        fig.canvas.draw()
        assert len(collection.get_paths()) == 7 * faces
        assert ax.get_xlim() == (positions[:, 0].min(), positions[:, 0].max() + 1)
        plt.close(fig)
    with pytest.raises(ValueError, match="positions must be"):
        scn.matplotlib_cubes(None, np.zeros((2, 2)), np.zeros((2, 3)))


def test_visdom_scatter_scales_colours_without_changing_them():
    calls = []

    class Vis:
        def scatter(self, xyz, opts, win):
            calls.append((xyz, opts, win))

    xyz = np.arange(12.0).reshape(4, 3)
    rgb = np.array([[0.0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 10]])
    before = rgb.copy()
    scn.visdom_scatter(Vis(), xyz, rgb, win="w", markersize=5, title="t")
    (got_xyz, opts, win), = calls
    np.testing.assert_array_equal(got_xyz, xyz)
    assert win == "w" and opts["markersize"] == 5 and opts["title"] == "t"
    np.testing.assert_array_equal(opts["markercolor"], np.floor(rgb / (10 / 255 + 1e-10)))
    np.testing.assert_array_equal(rgb, before)


def test_ply_scatter_writes_an_ascii_ply(tmp_path):
    xyz = np.array([[0, 1, 2], [3, 4, 5]])
    rgb = np.array([[0.0, 0.5, 1.0], [1.0, 1.0, 0.0]])
    scn.ply_scatter(str(tmp_path / "cloud"), xyz, rgb)
    text = (tmp_path / "cloud.ply").read_text()
    assert text.startswith("ply\nformat ascii 1.0\n") and "element vertex 2" in text
    cloud = sg.io.read_ply(tmp_path / "cloud.ply")
    np.testing.assert_array_equal(cloud["points"], xyz)
    # SCN's scaling: shift to 0, divide by max / 255 + 1e-10, floor
    np.testing.assert_array_equal(cloud["colors"], np.floor(rgb / (1 / 255 + 1e-10)))


@pytest.mark.parametrize("n, d", [(100, 10), (60000, 4), (7, 1)])
def test_voxelize_pointcloud_in_high_dimensions_matches_np_unique(n, d):
    """Rows of many distinct values per axis (a rank grid of all axes would overflow
    int64): the result is np.unique(axis=0)'s, features averaged per row."""
    rng = np.random.default_rng(n + d)
    xyz = rng.integers(0, 40, (n, d)).astype(np.float64) / 4
    xyz[1::2] = xyz[0::2][: len(xyz[1::2])]                          # repeated rows
    rgb = rng.random((n, 3)).astype(np.float32)
    out_xyz, out_rgb = scn.voxelize_pointcloud(xyz, rgb)
    rows, inverse = np.unique(xyz, axis=0, return_inverse=True)
    np.testing.assert_array_equal(out_xyz, rows)
    inverse = inverse.reshape(-1)
    sums = np.zeros((len(rows), 3))
    np.add.at(sums, inverse, rgb)
    np.testing.assert_allclose(out_rgb, sums / np.bincount(inverse)[:, None], rtol=1e-5)
