"""SparseConvNet's tensor, module and container surface on sparsegrid (issue 13):
``SparseConvNetTensor`` and what a layer's output offers as one (``batch_size()``,
``get_spatial_locations(spatial_size)``, ``metadata``, ``type`` / ``to`` / ``requires_grad``),
``Module.requires_grad_`` / ``half``, ``Sequential(OrderedDict)``, ``InputLayer.to`` and
float coordinates, and SCN's counters ``forward_pass_multiplyAdd_count`` /
``forward_pass_hidden_states`` against hand-computed and brute-force counts.
"""

from __future__ import annotations

import itertools
import json
import pickle
from collections import OrderedDict

import numpy as np
import pytest

import sparsegrid as sg
import sparsegrid.nn as scn
from sparsegrid import autodiff as ad
from sparsegrid import backend
from sparsegrid.autodiff.core import data_of
from sparsegrid.nn.optim import SGD

no_gpu = pytest.mark.skipif("cuda" in backend.available_backends(),
                            reason="tests the error raised without a GPU")


def _input(rng, size=8, n=12, batch=2, channels=2):
    """SCN-form coordinates (batch last) of distinct random sites, and features."""
    cells = rng.choice(batch * size * size, n, replace=False)
    b, x, y = np.unravel_index(cells, (batch, size, size))
    coords = np.stack([x, y, b], axis=1).astype(np.int64)
    return coords, rng.standard_normal((n, channels)).astype(np.float32)


def _sorted_rows(a):
    a = np.asarray(a)
    return a[np.lexsort(a.T[::-1])]


# -- batch_size: an int and a method ----------------------------------------------------------
def test_batch_size_is_an_int_and_callable(rng):
    coords, feats = _input(rng, batch=3)
    x = scn.InputLayer(2, 8)([coords, feats, 3])
    y = scn.SubmanifoldConvolution(2, 2, 4, 3, False)(x)
    for t in (x, y):
        assert t.batch_size == 3 and t.batch_size() == 3
        assert type(t.batch_size()) is int and isinstance(t.batch_size, int)
        assert type(t.batch_size + 1) is int and t.batch_size * 2 == 6
        assert list(range(t.batch_size)) == [0, 1, 2]
        assert np.zeros((t.batch_size, 2)).shape == (3, 2)
        assert json.dumps({"b": t.batch_size}) == '{"b": 3}'
        assert pickle.loads(pickle.dumps(t.batch_size)) == 3
        assert f"{t.batch_size}" == "3" and repr(t.batch_size) == "3"
    # the internal users of the int: a tensor built from it, append_tensors
    z = sg.SparseTensor(feats, np.concatenate([coords[:, 2:], coords[:, :2]], 1), (8, 8),
                        x.batch_size)
    assert z.batch_size() == 3 and scn.append_tensors([z, z]).batch_size() == 6


# -- get_spatial_locations and metadata -----------------------------------------------------------
def _pyramid(rng):
    scn.manual_seed(0)
    coords, feats = _input(rng, size=8, n=20)
    inp = scn.InputLayer(2, 8, mode=3)
    x = inp([coords, feats])
    y = scn.Convolution(2, 2, 3, 2, 2, False)(x)           # 8 -> 4
    z = scn.MaxPooling(2, 2, 2)(y)                          # 4 -> 2
    return coords, x, y, z


def test_get_spatial_locations_default_is_scn_form_row_aligned(rng):
    coords, x, _, _ = _pyramid(rng)
    loc = x.get_spatial_locations()
    assert loc.dtype == np.int64 and loc.shape == (x.n_active, 3)
    np.testing.assert_array_equal(loc[:, :2], x.indices[:, 1:])
    np.testing.assert_array_equal(loc[:, 2], x.indices[:, 0])
    np.testing.assert_array_equal(_sorted_rows(loc), _sorted_rows(np.unique(coords, axis=0)))


def test_get_spatial_locations_of_another_size_searches_the_grid(rng):
    coords, x, y, z = _pyramid(rng)
    # ancestors: the coarse tensor asks for the input's and the middle's sites
    np.testing.assert_array_equal(z.get_spatial_locations([8, 8]), x.get_spatial_locations())
    np.testing.assert_array_equal(z.get_spatial_locations(np.array([4, 4])),
                                  y.get_spatial_locations())
    np.testing.assert_array_equal(z.get_spatial_locations(2), z.get_spatial_locations())
    # descendants: the input asks for the coarser sites the network has made so far
    np.testing.assert_array_equal(x.get_spatial_locations([2, 2]), z.get_spatial_locations())
    np.testing.assert_array_equal(x.metadata.getSpatialLocations([4, 4]),
                                  y.get_spatial_locations())
    # independent check: the 4x4 sites are the input's coordinates // 2
    expected = np.unique(np.concatenate([coords[:, :2] // 2, coords[:, 2:]], 1), axis=0)
    np.testing.assert_array_equal(_sorted_rows(x.get_spatial_locations([4, 4])),
                                  _sorted_rows(expected))


def test_get_spatial_locations_errors_name_the_sizes(rng):
    _, x, y, z = _pyramid(rng)
    with pytest.raises(ValueError, match=r"spatial_size \(3, 3\).*sizes \[\(2, 2\), \(4, 4\), "
                                         r"\(8, 8\)\]"):
        z.get_spatial_locations([3, 3])
    with pytest.raises(ValueError, match="spatial_size"):
        x.get_spatial_locations([4, 4, 4])
    # two different site sets of one size (8 -> 4 by f=2,s=2 and by f=5,s=1): ambiguous
    scn.Convolution(2, 2, 3, 5, 1, False)(x)
    with pytest.raises(ValueError, match="2 different site sets of that size"):
        x.get_spatial_locations([4, 4])
    np.testing.assert_array_equal(z.get_spatial_locations([4, 4]), y.get_spatial_locations())


def test_metadata_is_shared_by_one_batch(rng):
    coords, x, y, z = _pyramid(rng)
    other = scn.InputLayer(2, 8)([coords, np.ones((len(coords), 2), np.float32)])
    assert x.metadata == y.metadata == z.metadata and hash(x.metadata) == hash(z.metadata)
    assert other.metadata != x.metadata and x.metadata.grid is z.grid
    assert z.metadata.getBatchSize([8, 8]) == 2 == z.metadata.getBatchSize()
    assert z.metadata.getNActive([8, 8]) == x.n_active and z.metadata.getNActive() == z.n_active
    assert "Metadata(dimension=2" in repr(z.metadata)
    assert isinstance(z.metadata, scn.Metadata)
    with pytest.raises(TypeError, match="taken from a SparseTensor"):
        scn.Metadata(3)


# -- SparseConvNetTensor --------------------------------------------------------------------------
def test_sparseconvnettensor_names_the_layers_output_type(rng):
    _, x, y, z = _pyramid(rng)
    assert all(isinstance(t, scn.SparseConvNetTensor) for t in (x, y, z))
    assert issubclass(sg.SparseTensor, scn.SparseConvNetTensor)
    assert not isinstance(np.zeros(3), scn.SparseConvNetTensor)
    assert not issubclass(int, scn.SparseConvNetTensor)


def test_sparseconvnettensor_constructor_puts_features_on_the_metadatas_sites(rng):
    _, x, y, z = _pyramid(rng)
    f = rng.standard_normal((y.n_active, 3)).astype(np.float32)
    t = scn.SparseConvNetTensor(f, z.metadata, y.spatial_size)
    assert isinstance(t, sg.SparseTensor) and t.sites is y.sites and t.grid is y.grid
    assert t.features is f
    np.testing.assert_array_equal(t.get_spatial_locations(), y.get_spatial_locations())
    # on the grid, so the strided op's rulebook is found: a Deconvolution goes back up
    up = scn.Deconvolution(2, 3, 2, 2, 2, False)(t)
    assert up.sites is x.sites
    # the default size is the metadata's own tensor's; a Tensor stays differentiable
    g = ad.Tensor(rng.standard_normal((z.n_active, 3)).astype(np.float32), requires_grad=True)
    u = scn.SparseConvNetTensor(g, z.metadata)
    assert u.sites is z.sites and u.requires_grad
    ad.sum(u.features).backward()
    np.testing.assert_array_equal(g.grad, np.ones_like(g.data))


def test_sparseconvnettensor_constructor_errors(rng):
    _, x, y, _ = _pyramid(rng)
    with pytest.raises(TypeError, match="with_features"):
        scn.SparseConvNetTensor()
    with pytest.raises(TypeError, match="with_features"):
        scn.SparseConvNetTensor(np.zeros((y.n_active, 1), np.float32))
    with pytest.raises(TypeError, match="metadata must be a tensor's .metadata"):
        scn.SparseConvNetTensor(np.zeros((y.n_active, 1), np.float32), y.grid)
    with pytest.raises(ValueError, match=rf"shape \({y.n_active}, C\)"):
        scn.SparseConvNetTensor(np.zeros((y.n_active + 1, 1), np.float32), y.metadata)
    with pytest.raises(TypeError, match="float32 or float64"):
        scn.SparseConvNetTensor(np.zeros((y.n_active, 1), np.int32), y.metadata)
    with pytest.raises(ValueError, match="no site set of that size"):
        scn.SparseConvNetTensor(np.zeros((y.n_active, 1), np.float32), y.metadata, [5, 5])


# -- type, to, requires_grad -------------------------------------------------------------------
def test_type_and_to_convert_the_features(rng):
    _, x, _, _ = _pyramid(rng)
    assert x.type() == "torch.FloatTensor" and not x.requires_grad
    for target in (np.float64, "torch.DoubleTensor", "float64", float, np.dtype("float64"),
                   "torch.float64"):
        d = x.type(target)
        assert d.dtype == np.float64 and d.type() == "torch.DoubleTensor"
        assert d.sites is x.sites and d.grid is x.grid and x.dtype == np.float32
        np.testing.assert_array_equal(data_of(d.features), data_of(x.features))
    assert x.type(np.float32) is x and x.type("torch.FloatTensor") is x
    assert x.to(np.float64).dtype == np.float64 and x.to(float).dtype == np.float64
    assert x.to("cpu") is x and x.cpu() is x

    class TorchDtype:                      # what torch.float64 prints as
        def __str__(self):
            return "torch.float64"

    assert x.to(TorchDtype()).dtype == np.float64 and x.type(TorchDtype()).dtype == np.float64
    for bad in ("torch.LongTensor", np.int64, "bogus"):
        with pytest.raises(TypeError, match="float32 or float64"):
            x.type(bad)
    with pytest.raises(TypeError, match="float32 or float64"):
        x.to(np.int32)
    # float16 is mixed precision (docs/mixed_precision.md)
    assert x.type("torch.HalfTensor").type() == "torch.HalfTensor"
    assert x.to(np.float16).dtype == np.float16


def test_type_conversion_is_differentiable(rng):
    coords, feats = _input(rng)
    leaf = ad.Tensor(feats, requires_grad=True)
    x = scn.InputLayer(2, 8)([coords, leaf])
    assert x.requires_grad
    d = x.type(np.float64)
    assert d.requires_grad and d.dtype == np.float64
    ad.sum(ad.mul(d.features, d.features)).backward()
    assert leaf.grad.dtype == np.float32
    np.testing.assert_allclose(leaf.grad, 2 * feats, rtol=1e-6)


@no_gpu
def test_torch_cuda_type_names_move_to_the_gpu(rng):
    _, x, _, _ = _pyramid(rng)
    with pytest.raises(RuntimeError, match="needs CuPy"):
        x.type("torch.cuda.FloatTensor")


# -- Module ------------------------------------------------------------------------------------
def _small(seed=1):
    scn.manual_seed(seed)
    return scn.Sequential(scn.SubmanifoldConvolution(2, 2, 4, 3, True), scn.BatchNormReLU(4),
                          scn.SparseToDense(2, 4), scn.Flatten(), scn.Linear(4 * 64, 3))


def _loss(model, x):
    return ad.softmax_cross_entropy(model(x), np.array([0, 2]))


def test_requires_grad_freezes_and_unfreezes(rng):
    coords, feats = _input(rng)
    x = scn.InputLayer(2, 8)([coords, feats])
    model = _small()
    assert model.requires_grad_(False) is model
    assert not any(p.requires_grad for p in model.parameters())
    before = [p.data.copy() for p in model.parameters()]
    opt = SGD(model.parameters(), lr=0.1)
    loss = _loss(model, x)
    assert not loss.requires_grad
    opt.step()
    assert all(p.grad is None for p in model.parameters())
    assert all(np.array_equal(a, p.data) for a, p in zip(before, model.parameters()))
    # part of it trainable again
    model[4].requires_grad_()
    _loss(model, x).backward()
    assert model[4].weight.grad is not None and model[0].weight.grad is None
    with pytest.raises(TypeError, match="requires_grad must be a bool"):
        model.requires_grad_("yes")


def test_half_float_double(rng):
    coords, feats = _input(rng)
    x = scn.InputLayer(2, 8)([coords, feats])
    model = _small()
    expected = data_of(model(x))
    assert model.half() is model
    assert all(p.dtype == np.float16 for p in model.parameters())
    # batch-norm running statistics stay float32 (mixed precision), other buffers float16
    assert all(b.dtype == (np.float32 if name.rsplit(".", 1)[-1] in ("running_mean",
                                                                     "running_var")
                           else np.float16) for name, b in model.named_buffers())
    with pytest.raises(TypeError, match=r"features' dtype float32; got float16 .*\.half\(\)"):
        model(x)                            # float32 features into a float16 model
    half_out = data_of(model(x.type(np.float16)))
    assert half_out.dtype == np.float16
    np.testing.assert_allclose(half_out.astype(np.float32), expected, rtol=0.05, atol=0.05)
    model.float()
    assert all(p.dtype == np.float32 for p in model.parameters())
    np.testing.assert_allclose(data_of(model(x)), expected, rtol=1e-2, atol=1e-2)
    assert model.double() is model and model[0].weight.dtype == np.float64


def test_sequential_from_an_ordered_dict_is_named_by_its_keys(rng):
    coords, feats = _input(rng)
    x = scn.InputLayer(2, 8)([coords, feats])
    numbered = _small()
    named = scn.Sequential(OrderedDict([("conv", numbered[0]), ("bn", numbered[1]),
                                        ("dense", numbered[2]), ("flat", numbered[3]),
                                        ("head", numbered[4])]))
    assert list(named.state_dict()) == ["conv.weight", "conv.bias", "bn.weight", "bn.bias",
                                        "bn.running_mean", "bn.running_var", "head.weight",
                                        "head.bias"]
    assert [name for name, _ in named.named_children()] == ["conv", "bn", "dense", "flat",
                                                            "head"]
    named.eval(), numbered.eval()
    np.testing.assert_array_equal(data_of(named(x)), data_of(numbered(x)))
    assert named.head is numbered[4] and named[0] is numbered[0] and len(named) == 5
    # a plain dict works too; add() after names continues with the position
    plain = scn.Sequential({"a": scn.ReLU()}).add(scn.Tanh())
    assert [n for n, _ in plain.named_children()] == ["a", "1"]
    with pytest.raises(ValueError, match="taken"):
        scn.Sequential(OrderedDict([("1", scn.ReLU())])).add(scn.ReLU())
    for bad in ("", "a.b", 3):
        with pytest.raises(ValueError, match="module names"):
            scn.Sequential({bad: scn.ReLU()})
    with pytest.raises(ValueError, match="taken by an attribute"):
        scn.Sequential({"forward": scn.ReLU()})
    with pytest.raises(TypeError, match="Module"):
        scn.Sequential({"a": 3})


# -- InputLayer: float coordinates and .to -------------------------------------------------------
def test_input_layer_takes_whole_number_float_coordinates(rng):
    coords, feats = _input(rng)
    layer = scn.InputLayer(2, 8, mode=4)
    ints = layer([coords, feats])
    for dtype in (np.float32, np.float64):
        floats = layer([coords.astype(dtype), feats])
        np.testing.assert_array_equal(floats.indices, ints.indices)
        np.testing.assert_array_equal(data_of(floats.features), data_of(ints.features))
    single = layer([coords[:, :2].astype(np.float64), feats])     # (N, D): one sample
    assert single.batch_size == 1


@pytest.mark.parametrize("value", [0.5, -1.25, np.nan, np.inf])
def test_input_layer_names_the_row_of_a_fractional_coordinate(rng, value):
    coords, feats = _input(rng)
    bad = coords.astype(np.float64)
    bad[7, 1] = value
    with pytest.raises(ValueError, match=rf"row 7 has {value!r}"):
        scn.InputLayer(2, 8)([bad, feats])
    with pytest.raises(TypeError, match="integer array"):
        scn.InputLayer(2, 8)([coords.astype(bool), feats])


def test_bl_input_layer_takes_float_coordinates(rng):
    coords = np.array([[[0, 1], [2, 3], [-1, -1]], [[4, 4], [-1, -1], [-1, -1]]])
    feats = rng.standard_normal((2, 3, 2)).astype(np.float32)
    layer = scn.BLInputLayer(2, 8)
    a, b = layer([coords, feats]), layer([coords.astype(np.float32), feats])
    np.testing.assert_array_equal(a.indices, b.indices)
    bad = coords.astype(np.float64)
    bad[1, 0, 1] = 4.5
    with pytest.raises(ValueError, match=r"row \(1, 0\) has 4.5"):
        layer([bad, feats])


def test_input_layer_to_records_the_device(rng):
    coords, feats = _input(rng)
    layer = scn.InputLayer(2, 8)
    assert layer.device is None and layer.to("cpu") is layer and layer.device == "cpu"
    assert layer.cpu() is layer
    assert layer([coords, feats]).device == "cpu"
    with pytest.raises(ValueError, match="device"):
        layer.to("tpu")
    # a parent's .to moves parameters only (SCN: torch's Module.to leaves it alone)
    fresh = scn.InputLayer(2, 8)
    scn.Sequential(fresh, scn.SubmanifoldConvolution(2, 2, 2, 3, False)).to("cpu")
    assert fresh.device is None
    item = scn.InputLayerInput(coords, feats)
    assert item.to("cpu") is item and item.cpu() is item and len(item) == 2


@no_gpu
def test_input_layer_to_a_gpu_without_one_is_a_runtime_error():
    with pytest.raises(RuntimeError, match="needs CuPy"):
        scn.InputLayer(2, 8).to("cuda")
    with pytest.raises(RuntimeError, match="needs CuPy"):
        scn.InputLayerInput(np.zeros((1, 3), np.int64), np.zeros((1, 1), np.float32)).cuda()


def test_input_layer_to_moves_host_batches_to_the_gpu(gpu_device, rng):
    import cupy
    coords, feats = _input(rng)
    layer = scn.InputLayer(2, 8).to(gpu_device)
    x = layer([coords, feats])                      # host arrays: moved by the layer
    assert x.device.startswith("cuda") and backend.is_cupy_array(data_of(x.features))
    ref = scn.InputLayer(2, 8)([coords, feats])
    np.testing.assert_array_equal(cupy.asnumpy(x.indices), ref.indices)
    item = scn.InputLayerInput(coords, feats).cuda()
    assert backend.is_cupy_array(item[0]) and backend.is_cupy_array(item[1])
    assert scn.InputLayer(2, 8)(item).device == x.device
    assert scn.BLInputLayer(2, 8).to(gpu_device)(
        [coords[None, :, :2], feats[None]]).device == x.device


# -- counters ----------------------------------------------------------------------------------
@pytest.fixture
def counters():
    scn.forward_pass_multiplyAdd_count = 0
    scn.forward_pass_hidden_states = 0
    yield
    scn.forward_pass_multiplyAdd_count = 0
    scn.forward_pass_hidden_states = 0


def _counts():
    return scn.forward_pass_multiplyAdd_count, scn.forward_pass_hidden_states


# the line (0,0) (0,1) (0,2) and the lone site (3,3) of sample 1, on an 8 x 8 grid
LINE = np.array([[0, 0, 0], [0, 1, 0], [0, 2, 0], [3, 3, 1]])


def test_counters_by_hand_for_a_small_network(counters):
    scn.manual_seed(0)
    x = scn.InputLayer(2, 8)([LINE, np.ones((4, 2), np.float32)])
    assert _counts() == (0, 0)                              # input layers do not count
    # submanifold 3x3: the centre of every site (4 pairs) + 2 pairs each way along the
    # line = 8 pairs of 2 * 3 multiply-adds; 4 sites x 3 channels hidden
    y = scn.SubmanifoldConvolution(2, 2, 3, 3, False)(x)
    assert _counts() == (8 * 2 * 3, 4 * 3)
    # BN, activations, pooling and dense layers count nothing (as SCN)
    y = scn.BatchNormReLU(3)(scn.ReLU()(y))
    assert _counts() == (48, 12)
    # 2/2 convolution: every site in one window: 4 pairs x 3 x 4; outputs (0,0), (1,1) of
    # sample 1 and (0,1) -> (0,0)... sites (0,0),(0,1) share window (0,0); (0,2) -> (0,1)
    z = scn.Convolution(2, 3, 4, 2, 2, False)(y)
    assert z.n_active == 3 and _counts() == (48 + 4 * 12, 12 + 3 * 4)
    scn.MaxPooling(2, 2, 2)(z)
    assert _counts() == (96, 24)
    # network in network: 3 sites x 4 x 5
    w = scn.NetworkInNetwork(4, 5, True)(z)
    assert _counts() == (96 + 60, 24 + 15)
    # deconvolution back: the same 4 pairs, 5 x 2 each; 4 fine sites x 2
    up = scn.Deconvolution(2, 5, 2, 2, 2, False)(w)
    assert up.sites is x.sites and _counts() == (156 + 40, 39 + 8)
    # a script resets them by assignment; the layers keep adding from there
    scn.forward_pass_multiplyAdd_count = 0
    scn.forward_pass_hidden_states = 0
    scn.Linear(2, 3)(up.features)
    assert _counts() == (0, 0)
    # full convolution 2/2: 4 sites x 4 children = 16 pairs of 2 x 1; 16 new sites
    scn.FullConvolution(2, 2, 1, 2, 2, False)(up)
    assert _counts() == (16 * 2, 16)
    # grouped submanifold: 8 pairs x (4 / 2) x (6 / 2) x 2 groups
    scn.forward_pass_multiplyAdd_count = scn.forward_pass_hidden_states = 0
    four = x.with_features(np.ones((4, 4), np.float32))
    scn.SubmanifoldConvolution(2, 4, 6, 3, False, groups=2)(four)
    assert _counts() == (8 * 2 * 3 * 2, 4 * 6)


def _brute_submanifold_pairs(indices, filter_size):
    sites = {tuple(r) for r in indices.tolist()}
    d = indices.shape[1] - 1
    half = [f // 2 for f in filter_size]
    n = 0
    for b, *o in sites:
        for delta in itertools.product(*(range(f) for f in filter_size)):
            n += (b, *[o[i] + delta[i] - half[i] for i in range(d)]) in sites
    return n


def _brute_strided_pairs(indices, filter_size, stride, out_shape):
    n = 0
    for b, *i in indices.tolist():
        for o in itertools.product(*(range(s) for s in out_shape)):
            n += all(o[a] * stride[a] <= i[a] < o[a] * stride[a] + filter_size[a]
                     for a in range(len(i)))
    return n


@pytest.mark.parametrize("dimension, shape", [(2, (9, 9)), (3, (5, 7, 5))])
def test_counters_match_brute_force_counts_on_random_sites(counters, rng, dimension, shape):
    scn.manual_seed(1)
    n = 30
    cells = rng.choice(2 * int(np.prod(shape)), n, replace=False)
    idx = np.stack(np.unravel_index(cells, (2,) + shape), axis=1)
    x = sg.SparseTensor(rng.standard_normal((n, 3)).astype(np.float32), idx, shape, 2)
    sub = scn.SubmanifoldConvolution(dimension, 3, 5, 3, True)
    y = sub(x)
    pairs = _brute_submanifold_pairs(x.indices, (3,) * dimension)
    assert _counts() == (pairs * 15, n * 5)
    conv = scn.Convolution(dimension, 5, 2, 3, 2, False)
    z = conv(y)
    out_shape = tuple((s - 3) // 2 + 1 for s in shape)
    strided = _brute_strided_pairs(x.indices, (3,) * dimension, (2,) * dimension, out_shape)
    assert _counts() == (pairs * 15 + strided * 10, n * 5 + z.n_active * 2)
    # counted on every forward pass: evaluation and no_grad too
    with ad.no_grad():
        sub.eval()(x)
    assert _counts()[0] == 2 * pairs * 15 + strided * 10
    # the randomized stride counts its own windows' pairs (training), the plain ones (eval)
    rand = scn.RandomizedStrideConvolution(dimension, 5, 2, 3, 2, False)
    scn.forward_pass_multiplyAdd_count = scn.forward_pass_hidden_states = 0
    r = rand.eval()(y)
    assert _counts() == (strided * 10, r.n_active * 2)
    scn.forward_pass_multiplyAdd_count = 0
    r = rand.train()(y)
    assert _counts()[0] == r.sites.producer[3].n_pairs * 10


def test_counters_of_the_permutohedral_convolution_and_networks(counters, rng):
    scn.manual_seed(2)
    idx = np.array([[0, 1, 1], [0, 1, 2], [0, 2, 2], [0, 5, 5]])
    x = sg.SparseTensor(np.ones((4, 2), np.float32), idx, (8, 8))
    conv = scn.PermutohedralSubmanifoldConvolution(2, 2, 3, False)
    conv(x)
    offsets = sg.coords.permutohedral_offsets(2)
    sites = {tuple(r) for r in idx[:, 1:].tolist()}
    pairs = sum((o[0] + d[0], o[1] + d[1]) in sites for o in sites for d in offsets)
    assert _counts() == (pairs * 6, 12)
    # a network builder's counts are its layers' counts: UNet from SCN's 3-D example
    scn.forward_pass_multiplyAdd_count = scn.forward_pass_hidden_states = 0
    coords, feats = _input(rng, size=16, n=40, channels=1)
    net = scn.Sequential(scn.InputLayer(2, 16), scn.SubmanifoldConvolution(2, 1, 4, 3, False),
                         scn.UNet(2, 1, [4, 8], residual_blocks=False),
                         scn.BatchNormReLU(4), scn.OutputLayer(2))
    net(scn.InputLayerInput(coords, feats))
    first = _counts()
    assert first[0] > 0 and first[1] > 0
    net(scn.InputLayerInput(coords, feats))
    assert _counts() == (2 * first[0], 2 * first[1])
