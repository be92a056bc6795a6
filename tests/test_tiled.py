"""Exact tiled inference (sparsegrid.distributed.tiling): receptive fields by hand, tiled ==
whole scene (bit for bit where no BLAS product is involved, to float64 rounding through
convolutions), halos one voxel too small and misaligned tiles that must fail, bad
arguments, and a two-worker Dask LocalCluster over arrays and a LAS file."""

import numpy as np
import pytest

import sparsegrid.nn as scn
from sparsegrid.distributed import (NotTileable, ReceptiveField, predict_scene,
                                    predict_tiled, receptive_field, total_stride)

from optional import require


def _float64(net):
    """``net`` with float64 parameters and buffers: convolutions then agree with the
    whole scene to ~1e-15, so a halo error (~1e-2) cannot hide in rounding."""
    for module in net.modules():
        for name, p in module._parameters.items():
            if p is not None:
                p.data = p.data.astype(np.float64)
        for name in list(module._buffers):
            setattr(module, name, getattr(module, name).astype(np.float64))
    return net


def _randomize_norms(net, rng):
    for module in net.modules():
        if isinstance(module, scn.BatchNormalization):
            module.running_mean[...] = rng.normal(0, 0.3, module.nPlanes)
            module.running_var[...] = rng.uniform(0.5, 2, module.nPlanes)
    return net


def _scene(n=6000, size=(30.0, 30.0, 4.0), seed=0, channels=2):
    rng = np.random.default_rng(seed)
    # clustered, so some tiles are dense, some sparse, some empty
    centres = rng.uniform(0, 1, (12, 3)) * size
    points = centres[rng.integers(0, 12, n)] + rng.normal(0, 3.0, (n, 3))
    points = np.clip(points, 0, np.array(size) - 1e-6)
    features = rng.standard_normal((n, channels))
    return points, features


def _unet(levels, seed=0):
    scn.manual_seed(seed)
    net = scn.Sequential(scn.SubmanifoldConvolution(3, 2, 8, 3, False),
                         scn.UNet(3, 1, [8, 12, 16][:levels], downsample=(2, 2)),
                         scn.NetworkInNetwork(8, 3, True))
    net.eval()
    return _float64(_randomize_norms(net, np.random.default_rng(seed)))


# -- receptive fields by hand -------------------------------------------------------------
def test_receptive_field_of_single_layers():
    assert receptive_field(scn.SubmanifoldConvolution(3, 1, 1, 3, False)) == \
        ((1, 1, 1), (1, 1, 1))
    # an even filter: window [o - f/2, o + f/2 - 1]
    assert receptive_field(scn.SubmanifoldConvolution(2, 1, 1, 4, False)) == ((2, 2), (1, 1))
    assert receptive_field(scn.SubmanifoldConvolution(2, 1, 1, (5, 3), False)) == \
        ((2, 1), (2, 1))
    conv = scn.Convolution(2, 1, 1, 3, 2, False)      # o reads [2o, 2o + 2]
    assert receptive_field(conv) == ((0, 0), (2, 2)) and total_stride(conv) == (2, 2)
    assert receptive_field(scn.MaxPooling(2, 3, 2)) == ((0, 0), (2, 2))
    assert total_stride(scn.SubmanifoldConvolution(3, 1, 1, 3, False)) == (1, 1, 1)
    assert isinstance(receptive_field(conv), ReceptiveField)
    assert receptive_field(scn.SubmanifoldConvolution(2, 1, 1, 4, False)).radius == (2, 2)


def test_receptive_field_of_stacks_counts_the_coarse_grid_in_input_voxels():
    # SubM3 on stride 1 (1, 1), Conv 3/2 (+2 above), SubM3 on stride 2 (+2 each side),
    # Conv 2/2 on stride 2 (+2 above), SubM3 on stride 4 (+4 each side)
    net = scn.Sequential(scn.SubmanifoldConvolution(1, 1, 1, 3, False),
                         scn.Convolution(1, 1, 1, 3, 2, False),
                         scn.SubmanifoldConvolution(1, 1, 1, 3, False),
                         scn.Convolution(1, 1, 1, 2, 2, False),
                         scn.SubmanifoldConvolution(1, 1, 1, 3, False))
    assert receptive_field(net) == ((1 + 2 + 4,), (1 + 2 + 2 + 2 + 4,))
    assert total_stride(net) == (4,)
    # back up: Deconvolution 2/2 to stride 2 adds (f - 1) * 2 below and joins the
    # stride-2 sites' own field; to stride 1, (f - 1) * 1 below
    up = net + scn.Sequential(scn.Deconvolution(1, 1, 1, 2, 2, False),
                              scn.Deconvolution(1, 1, 1, 3, 2, False))
    assert receptive_field(up) == ((7 + 2 + 2,), (11,))


def test_receptive_field_of_unets():
    # 2 levels: SubM3 (1,1); block SubM3 (2,2); Conv2/2 (2,3); SubM3 at 2 (4,5);
    # Deconv (5,5) joined with (2,2); block SubM3 (6,6); NiN
    assert receptive_field(_unet(2)) == ((6,) * 3, (6,) * 3)
    assert total_stride(_unet(2)) == (2,) * 3
    assert receptive_field(_unet(3)) == ((14,) * 3, (14,) * 3)
    assert total_stride(_unet(3)) == (4,) * 3
    unet = scn.UNet(2, 2, [4, 8], residual_blocks=True)
    unet.eval()
    # two residual blocks of two SubM3 per side: (4, 4); Conv2/2 (4, 5); at stride 2
    # (12, 13); Deconv2/2 (13, 13); two blocks (17, 17)
    assert receptive_field(unet) == ((4 + 8 + 1 + 4,) * 2, (4 + 1 + 8 + 4,) * 2)


def test_receptive_field_of_vgg_resnet_and_fully_convolutional():
    vgg = scn.SparseVggNet(2, 1, [["C", 4], "MP", ["C", 4], ["C3/2", 8]])
    vgg.eval()
    # C (1,1); MP 3/2 (+2 above); C at 2 (+2); C3/2 at 2 (+4 above): stride 4
    assert receptive_field(vgg) == ((3, 3), (1 + 2 + 2 + 4,) * 2)
    assert total_stride(vgg) == (4, 4)
    res = scn.SparseResNet(2, 4, [["b", 4, 1, 1], ["b", 8, 1, 2]])
    res.eval()
    # block 1: two SubM3 (2,2); block 2: Conv3/2 (+2 above), SubM3 at 2 (+2 each)
    assert receptive_field(res) == ((4, 4), (6, 6)) and total_stride(res) == (2, 2)
    fcn = scn.FullyConvolutionalNet(2, 1, [4, 8])
    fcn.eval()
    # SubM3 (1,1); Conv2/2 (1,2); SubM3 at 2 (3,4); UnPool (4,4) join (1,1)
    assert receptive_field(fcn) == ((4, 4), (4, 4))


def test_layers_that_couple_distant_sites_are_refused_by_name():
    with pytest.raises(NotTileable, match=r"'1' \(GlobalMaxPooling\)"):
        receptive_field(scn.Sequential(scn.SubmanifoldConvolution(2, 1, 1, 3, False),
                                       scn.GlobalMaxPooling()))
    bn = scn.Sequential(scn.BatchNormReLU(4))
    with pytest.raises(NotTileable, match=r"BatchNormReLU.*training mode.*eval"):
        receptive_field(bn, dimension=2)
    bn.eval()
    assert receptive_field(bn, dimension=2) == ((0, 0), (0, 0))
    drop = scn.Sequential(scn.Dropout(0.5))
    with pytest.raises(NotTileable, match="Dropout"):
        receptive_field(drop, dimension=2)
    assert receptive_field(drop.eval(), dimension=2) == ((0, 0), (0, 0))
    with pytest.raises(NotTileable, match="SparseToDense"):
        receptive_field(scn.Sequential(scn.SparseToDense(2, 1)).eval())
    with pytest.raises(NotTileable, match="SparseGroupNorm"):
        receptive_field(scn.SparseGroupNorm(1, 2), dimension=2)
    with pytest.raises(NotTileable, match=r"'0' \(SubmanifoldDcls\).*does not know|"
                                          r"'0' \(SubmanifoldDcls\)"):
        receptive_field(scn.Sequential(scn.SubmanifoldDcls(2, 1, 1, 3, 2)).eval())
    with pytest.raises(NotTileable, match="AddCoords"):
        receptive_field(scn.AddCoords(), dimension=2)
    with pytest.raises(TypeError, match="sparsegrid.nn.Module"):
        receptive_field(lambda x: x)


# -- tiled == whole scene ---------------------------------------------------------------
@pytest.mark.parametrize("levels", [2, 3])       # total strides 2 and 4
def test_unet_tiled_equals_whole_scene(levels):
    points, features = _scene()
    net = _unet(levels)
    whole = predict_scene(net, points, 0.5, features=features)
    tiled, info = predict_tiled(net, points, 0.5, 16, features=features, return_info=True)
    assert info["tiles"] > 4 and info["voxels"] > info["core_voxels"]
    assert whole.shape == (len(points), 3)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-12)
    # another tiling of the same grid gives the same answer
    other = predict_tiled(net, points, 0.5, [24, 8, None], features=features)
    np.testing.assert_allclose(other, whole, rtol=0, atol=1e-12)


def test_unet_float32_agrees_to_rounding():
    points, features = _scene(seed=3)
    scn.manual_seed(1)
    net = scn.Sequential(scn.SubmanifoldConvolution(3, 2, 8, 3, False),
                         scn.UNet(3, 1, [8, 12, 16])).eval()
    f32 = features.astype(np.float32)
    whole = predict_scene(net, points, 0.5, features=f32)
    tiled = predict_tiled(net, points, 0.5, 16, features=f32)
    assert tiled.dtype == np.float32
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-5)


def _blas_free_net():
    """Pooling, unpooling, batch norm (eval), activations and tables: no BLAS product, so
    every output's arithmetic is independent of the tile: bit-for-bit equality."""
    rng = np.random.default_rng(5)
    bn = scn.BatchNormLeakyReLU(2, leakiness=0.1)
    bn.running_mean[...] = rng.normal(size=2)
    bn.running_var[...] = rng.uniform(0.5, 2, 2)
    bn.weight.data[...] = rng.normal(size=2)
    down = scn.Sequential(scn.MaxPooling(3, 2, 2),
                          scn.ConcatTable(scn.Identity(),
                                          scn.Sequential(scn.AveragePooling(3, 3, 2),
                                                         scn.Tanh(),
                                                         scn.UnPooling(3, 3, 2))),
                          scn.AddTable(), scn.UnPooling(3, 2, 2))
    return _float64(scn.Sequential(bn, scn.ConcatTable(scn.Identity(), down),
                                   scn.JoinTable(), scn.ReLU()).eval())


def test_ops_without_blas_products_are_bit_for_bit():
    points, features = _scene(seed=1)
    net = _blas_free_net()
    assert total_stride(net) == (4, 4, 4)
    whole = predict_scene(net, points, 0.4, features=features)
    tiled = predict_tiled(net, points, 0.4, 12, features=features)
    assert np.array_equal(tiled, whole) and np.abs(whole).max() > 0
    # no halo at all: the tiles' borders show
    short = predict_tiled(net, points, 0.4, 12, features=features, halo=0)
    assert not np.array_equal(short, whole)


def test_vgg_per_voxel_output_on_the_strided_grid():
    scn.manual_seed(2)
    vgg = scn.SparseVggNet(3, 2, [["C", 6], "MP", ["C", 8], ["C3/2", 8], ["C", 8]])
    _float64(_randomize_norms(vgg.eval(), np.random.default_rng(2)))
    points, features = _scene(seed=2)
    whole = predict_scene(vgg, points, 0.5, features=features, output="voxels")
    tiled = predict_tiled(vgg, points, 0.5, 12, features=features, output="voxels")
    assert whole.stride == (4, 4, 4) and len(whole.indices) > 50
    assert np.array_equal(tiled.indices, whole.indices)
    np.testing.assert_allclose(tiled.features, whole.features, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="output='voxels'"):
        predict_tiled(vgg, points, 0.5, 12, features=features)


def test_a_halo_one_voxel_too_small_gives_a_different_answer():
    points, features = _scene(n=8000)
    net = _unet(3)
    inner = net[1]                 # the bare UNet: field 13, not a multiple of 4
    rf = receptive_field(inner)
    assert rf == ((13,) * 3, (13,) * 3)
    channels = features[:, :2]
    scn.manual_seed(0)
    whole = predict_scene(inner, points, 0.5, features=np.repeat(channels, 4, 1))
    exact = predict_tiled(inner, points, 0.5, 16, features=np.repeat(channels, 4, 1))
    np.testing.assert_allclose(exact, whole, rtol=0, atol=1e-12)
    # Tiles start at multiples of 4 and read sizes that are multiples of 4, so the halo
    # actually read is a multiple of 4: 12 reads the same as 9..12, and the field's 13 is
    # reached only by sites = 2 (mod 4), which a tile starting at a multiple of 4 sees
    # within 12 of its start; one read step less (8) must differ.
    same = predict_tiled(inner, points, 0.5, 16, features=np.repeat(channels, 4, 1),
                         halo=12)
    np.testing.assert_allclose(same, whole, rtol=0, atol=1e-12)
    short = predict_tiled(inner, points, 0.5, 16, features=np.repeat(channels, 4, 1),
                          halo=8)
    assert np.abs(short - whole).max() > 1e-6
    # a stride-1 network: the field is exact on each side
    scn.manual_seed(4)
    subm = _float64(scn.Sequential(scn.SubmanifoldConvolution(3, 2, 4, 5, False),
                                   scn.ReLU(),
                                   scn.SubmanifoldConvolution(3, 4, 2, 3, False)).eval())
    assert receptive_field(subm) == ((3,) * 3, (3,) * 3)
    whole = predict_scene(subm, points, 0.5, features=channels)
    np.testing.assert_allclose(predict_tiled(subm, points, 0.5, 8, features=channels),
                               whole, rtol=0, atol=1e-12)
    for halo in [((2, 3, 3), (3, 3, 3)), ((3, 3, 3), (3, 2, 3))]:
        wrong = predict_tiled(subm, points, 0.5, 8, features=channels, halo=halo)
        assert np.abs(wrong - whole).max() > 1e-6, halo


def test_tiles_misaligned_to_the_total_stride_give_a_different_answer():
    points, features = _scene(n=8000, seed=4)
    net = _unet(3)
    whole = predict_scene(net, points, 0.5, features=features)
    rf = receptive_field(net)
    assert rf.lower == (14, 14, 14)
    # a big enough halo, but tile starts (core - 14) only aligned to 2: the stride-4
    # grids of the tiles are not the scene's
    wrong = predict_tiled(net, points, 0.5, 16, features=features, halo=rf, align=2)
    assert np.abs(wrong - whole).max() > 1e-6
    right = predict_tiled(net, points, 0.5, 16, features=features, halo=rf, align=4)
    np.testing.assert_allclose(right, whole, rtol=0, atol=1e-12)


def test_input_and_output_layers_are_replaced_by_voxelization():
    points, features = _scene(n=3000)
    inner = _unet(2)
    wrapped = scn.Sequential(scn.InputLayer(3, 10_000, mode="mean"), inner,
                             scn.OutputLayer(3)).eval()
    a = predict_tiled(wrapped, points, 0.5, 16, features=features)
    b = predict_tiled(inner, points, 0.5, 16, features=features)
    assert np.array_equal(a, b)


def test_edge_cases():
    net = _unet(2)
    one = np.array([[3.0, 4.0, 1.0]])
    feats = np.ones((1, 2))
    assert np.array_equal(predict_tiled(net, one, 0.5, 8, features=feats),
                          predict_scene(net, one, 0.5, features=feats))
    empty = predict_tiled(net, np.zeros((0, 3)), 0.5, 8, features=np.zeros((0, 2)))
    assert empty.shape[0] == 0


# -- bad input ------------------------------------------------------------------------------
def test_bad_tile_sizes_and_mismatched_grids_raise_clearly():
    points, features = _scene(n=500)
    net = _unet(3)
    for bad in (0, -4, 6, 18):
        with pytest.raises(ValueError, match=r"multiple of the model's total stride 4"):
            predict_tiled(net, points, 0.5, bad, features=features)
    with pytest.raises(TypeError, match="tile_size"):
        predict_tiled(net, points, 0.5, 16.0, features=features)
    with pytest.raises(TypeError, match="tile_size"):
        predict_tiled(net, points, 0.5, None, features=features)
    with pytest.raises(ValueError, match="tile_size must have 3 entries"):
        predict_tiled(net, points, 0.5, [16, 16], features=features)
    with pytest.raises(ValueError, match="cuts no axis"):
        predict_tiled(net, points, 0.5, [None, None, None], features=features)
    with pytest.raises(ValueError, match="model is 3-D; points have 2"):
        predict_tiled(net, points[:, :2], 0.5, 16, features=features)
    with pytest.raises(ValueError, match="below origin"):
        predict_tiled(net, points, 0.5, 16, features=features, origin=(5.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="features must be a .N, C. array"):
        predict_tiled(net, points, 0.5, 16, features=features[:10])
    with pytest.raises(ValueError, match="non-finite"):
        predict_tiled(net, np.full((2, 3), np.nan), 0.5, 16, features=features[:2])
    with pytest.raises(ValueError, match="voxel_size"):
        predict_tiled(net, points, -1.0, 16, features=features)
    with pytest.raises(ValueError, match="output must be"):
        predict_tiled(net, points, 0.5, 16, features=features, output="grid")
    net.train()
    with pytest.raises(NotTileable, match="training mode"):
        predict_tiled(net, points, 0.5, 16, features=features)


# -- Dask -----------------------------------------------------------------------------------
def test_dask_cluster_over_arrays_and_a_las_file(tmp_path):
    distributed = require("distributed")
    require("laspy")
    from sparsegrid.io import read_las, write_las
    points, _ = _scene(n=5000, size=(40.0, 30.0, 5.0), seed=7)
    path = tmp_path / "scene.las"
    intensity = (np.arange(len(points)) * 37 % 1000).astype(np.uint16)
    write_las(path, points, properties={"intensity": intensity}, scale=0.001)
    cloud = read_las(path)                 # the file's (quantized) coordinates
    net = _unet(2)
    feats = np.stack([cloud.intensity / 1000.0, np.ones(len(points))], axis=1)
    whole = predict_scene(net, cloud.points, 0.5, features=feats)
    local = predict_tiled(net, cloud.points, 0.5, 16, features=feats)
    scn.manual_seed(3)
    net32 = scn.Sequential(scn.SubmanifoldConvolution(3, 1, 8, 3, False),
                           scn.UNet(3, 1, [8, 12])).eval()
    from_memory = predict_tiled(net32, cloud.points, 0.5, 16,
                                features=cloud.intensity.astype(np.float32)[:, None])
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        remote, info = predict_tiled(net, cloud.points, 0.5, 16, features=feats,
                                     client=client, return_info=True)
        # the same tiles, the same arithmetic: the cluster's bits are the local ones
        assert np.array_equal(remote, local)
        np.testing.assert_allclose(remote, whole, rtol=0, atol=1e-12)
        assert info["points_read"] > len(points)          # halos are read twice
        # streamed from the file by the workers, each keeping only its tile's points
        streamed, file_info = predict_tiled(net32, path, 0.5, 16, client=client,
                                            features=["intensity"], chunk_size=700,
                                            return_info=True)
    assert np.array_equal(streamed, from_memory)
    assert file_info["points_read"] == info["points_read"]
    # in-process file reading gives the same bits
    assert np.array_equal(predict_tiled(net32, path, 0.5, 16, features=["intensity"]),
                          from_memory)


def test_file_points_outside_the_declared_extent_raise(tmp_path):
    require("laspy")
    from sparsegrid.io import write_las
    points, _ = _scene(n=300, seed=8)
    path = tmp_path / "small.las"
    write_las(path, points)
    net = _unet(2)
    with pytest.raises(ValueError, match="outside the scene's grid"):
        predict_tiled(net, path, 0.5, 16, extent=(10, 10, 10))
    with pytest.raises(ValueError, match=r"\.las, \.laz or \.ply"):
        predict_tiled(net, str(tmp_path / "x.xyz"), 0.5, 16)
    with pytest.raises(TypeError, match="list of field names"):
        predict_tiled(net, path, 0.5, 16, features="intensity")


def test_tiles_on_the_gpu_are_the_cpus(gpu_device):
    """device='cuda': each tile runs on the GPU (or the host emulator of CuPy) and the
    stitched result, returned as NumPy, equals the CPU's tiling (float64)."""
    import copy
    points, features = _scene(n=3000)
    net = _unet(2)
    cpu = predict_tiled(copy.deepcopy(net), points, 0.5, 16, features=features)
    gpu = predict_tiled(net, points, 0.5, 16, features=features, device=gpu_device)
    assert isinstance(gpu, np.ndarray)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-10, atol=1e-10)
