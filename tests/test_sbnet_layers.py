"""Block-sparse convolution and residual blocks against the dense computation: equal on
every tile of an active block, the input (or zero) elsewhere; gradients; training; GPU."""

from __future__ import annotations

import numpy as np
import pytest

import sparsegrid.nn as nn
from sparsegrid import autodiff as ad
from sparsegrid import backend, denseconv, sbnet
from sparsegrid.nn.optim import SGD


def _tiles(indices, image, tile, channels=1):
    """Boolean (N, H, W): the pixels covered by the output tiles of the blocks."""
    ones = np.ones((len(indices), *tile, 1))
    return sbnet.sparse_scatter(ones, indices, np.zeros((*image, 1)), tile, 0, tile)[..., 0] > 0


def _randomise_norms(block, rng):
    for module in block.modules():
        if isinstance(module, nn.ChannelsLastBatchNorm):
            # statistics that keep a fair share of the ReLUs open
            module.running_mean[...] = 0.3 * rng.standard_normal(module.nPlanes)
            module.running_var[...] = rng.random(module.nPlanes) + 0.5
            module.weight.data[...] = rng.random(module.nPlanes) + 0.5
            module.bias.data[...] = 0.3 * rng.standard_normal(module.nPlanes)


def _bn_relu(h, bn):
    return np.maximum((h - bn.running_mean) / np.sqrt(bn.running_var + bn.eps) * bn.weight.data
                      + bn.bias.data, 0)


def _dense_block(block, x):
    conv = lambda h, w, p: denseconv.conv(h, w.data, None, padding=p, layout="NHWC")  # noqa
    if block.kind == "bottleneck":
        h = conv(_bn_relu(x, block.bn1), block.conv1, 0)
        h = conv(_bn_relu(h, block.bn2), block.conv2, 1)
        h = conv(_bn_relu(h, block.bn3), block.conv3, 0)
    else:
        h = conv(_bn_relu(x, block.bn1), block.conv1, 1)
        h = conv(_bn_relu(h, block.bn2), block.conv2, 1)
    return x + h


@pytest.mark.parametrize("kind,block_size", [("bottleneck", 7), ("bottleneck", (6, 9)),
                                             ("basic", 8), ("basic", (9, 7))])
@pytest.mark.parametrize("image", [(2, 13, 11), (1, 16, 16), (3, 5, 7)])
def test_res_block_equals_the_dense_block_on_active_tiles(rng, kind, block_size, image):
    nn.manual_seed(1)
    block = nn.SparseResBlock(6, 3 if kind == "bottleneck" else None, kind=kind, block_size=block_size).double()
    _randomise_norms(block, rng)
    block.eval()
    x = rng.standard_normal((*image, 6))
    dense = _dense_block(block, x)
    for density in (0.0, 0.03, 0.2, 1.0):
        mask = rng.random(image) < density
        indices = block.active_blocks(mask, x.shape)
        y = block(x, indices).data
        params = block.block_params(x.shape)
        tiles = _tiles(indices, image, params.bsize_out)
        np.testing.assert_allclose(y[tiles], dense[tiles], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(y[~tiles], x[~tiles])
        np.testing.assert_array_equal(block(x, mask=mask).data, y)
        if density == 1.0:
            assert tiles.all()                        # the blocks cover every pixel
    assert not np.shares_memory(y, x)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, "SAME"), (3, 2, "SAME"),
                                                   (2, 1, "SAME"), (5, 2, "SAME"),
                                                   (3, 1, "VALID"), ((3, 1), (2, 1), "SAME")])
def test_block_sparse_conv_equals_dense_conv_on_active_tiles(rng, kernel, stride, padding):
    nn.manual_seed(2)
    layer = nn.BlockSparseConv2d(3, 5, kernel, stride, padding, True, block_size=8).double()
    x = rng.standard_normal((2, 15, 12, 3))
    k = sbnet._pair("k", kernel)
    s = sbnet._pair("s", stride)
    if padding == "SAME":     # TF's SAME: total pad (out - 1) s + k - in, the extra on the right
        pads = []
        for e, kk, ss in zip(x.shape[1:3], k, s):
            total = max((-(-e // ss) - 1) * ss + kk - e, 0)
            pads.append((total // 2, total - total // 2))
        padded = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    else:
        padded = x
    dense = denseconv.conv(padded, layer.weight.data, layer.bias.data, stride=s, padding=0,
                           layout="NHWC")
    for density in (0.02, 0.3, 1.0):
        mask = rng.random(x.shape[:3]) < density
        indices = layer.active_blocks(mask, x.shape)
        y = layer(x, indices).data
        assert y.shape == dense.shape
        params = layer.block_params(x.shape)
        tiles = _tiles(indices, dense.shape[:3], params.bsize_out)
        np.testing.assert_allclose(y[tiles], dense[tiles], rtol=1e-12, atol=1e-12)
        assert not y[~tiles].any()
        if density == 1.0:
            assert tiles.all()


def _norms(block):
    return [m for m in block.modules() if isinstance(m, nn.ChannelsLastBatchNorm)]


def test_res_block_gradients(rng):
    """Gradients of the input and of a 3x3 weight against finite differences, in training
    (batch statistics over the gathered pixels) and evaluation mode."""
    nn.manual_seed(3)
    for kind in ("bottleneck", "basic"):
        block = nn.SparseResBlock(3, 4 if kind == "bottleneck" else None, kind=kind, block_size=6).double()
        _randomise_norms(block, rng)
        x = rng.standard_normal((1, 7, 6, 3))
        indices = block.active_blocks(rng.random((1, 7, 6)) < 0.3, x.shape)
        assert len(indices)
        probe = rng.standard_normal(x.shape)
        saved = [(m.running_mean.copy(), m.running_var.copy()) for m in _norms(block)]

        def run(xv, weight):
            for m, (mean, var) in zip(_norms(block), saved):   # no drift between calls
                m.running_mean[...], m.running_var[...] = mean, var
            block.conv2.data = weight
            return ad.sum(block(xv, indices) * probe)

        weight = block.conv2.data.copy()
        for training in (True, False):
            block.train(training)
            ad.check_gradients(lambda xv: run(xv, weight), [x])
            block.zero_grad()
            run(ad.Tensor(x), weight).backward()
            analytic = block.conv2.grad.copy()
            numeric = ad.numerical_gradient(lambda w: float(run(ad.Tensor(x), w).data), weight)
            np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)
            assert np.abs(numeric).max() > 1e-3, (kind, training)


def test_res_block_trains_and_saves(rng, tmp_path):
    nn.manual_seed(4)
    block = nn.SparseResBlock(4, 2, block_size=6)
    x = rng.standard_normal((2, 10, 10, 4)).astype(np.float32)
    target = rng.standard_normal(x.shape).astype(np.float32)
    indices = block.active_blocks(rng.random((2, 10, 10)) < 0.1, x.shape)
    optimizer = SGD(block.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(5):
        loss = ad.mse_loss(block(x, indices), ad.Tensor(target))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.data))
    assert losses[-1] < losses[0]
    state = block.state_dict()
    assert {"conv1", "conv2", "conv3", "bn1.weight", "bn1.running_mean"} <= set(state)
    twin = nn.SparseResBlock(4, 2, block_size=6)
    twin.load_state_dict(state)
    block.eval(), twin.eval()
    np.testing.assert_array_equal(twin(x, indices).data, block(x, indices).data)


def test_layer_arguments_are_checked():
    with pytest.raises(ValueError, match="kind must be"):
        nn.SparseResBlock(4, kind="wide")
    with pytest.raises(ValueError, match="block_size must exceed 4"):
        nn.SparseResBlock(4, kind="basic", block_size=4)
    with pytest.raises(ValueError, match="padding must be"):
        nn.BlockSparseConv2d(2, 2, padding="FULL")
    block = nn.SparseResBlock(4, block_size=6)
    with pytest.raises(ValueError, match="exactly one of indices"):
        block(np.zeros((1, 6, 6, 4), np.float32))
    with pytest.raises(ValueError, match="bsize"):
        sbnet.calc_block_params((1, 8, 8, 1), 2, 3)


def test_calc_block_params_covers_every_output_pixel():
    for height, width, b, k, s in [(13, 11, 7, 3, 1), (200, 350, 18, 3, 1), (15, 12, 8, 3, 2),
                                   (9, 9, 4, 2, 2), (17, 5, 9, 5, 1)]:
        p = sbnet.calc_block_params((1, height, width, 1), b, k, s, "SAME")
        out = (-(-height // s), -(-width // s))
        assert all(c * t >= o for c, t, o in zip(p.bcount, p.bsize_out, out))
        assert all((c - 1) * t < o for c, t, o in zip(p.bcount, p.bsize_out, out))
        assert p.bstrides == tuple(t * s for t in p.bsize_out)
    assert sbnet.calc_block_params((1, 10, 10, 1), 6, (3, 3), (1, 1, 1, 1)) == \
        sbnet.BlockParams((6, 6), (4, 4), (-1, -1), (3, 3), (4, 4))


def test_res_block_on_the_gpu_is_the_cpus(rng, gpu_device):
    nn.manual_seed(5)
    block = nn.SparseResBlock(4, 2, kind="bottleneck", block_size=6).double()
    _randomise_norms(block, rng)
    x = rng.standard_normal((2, 9, 10, 4))
    mask = rng.random((2, 9, 10)) < 0.1
    results = []
    for device in ("cpu", gpu_device):
        block.to(device)
        block.train()
        xt = ad.Tensor(backend.to_device(x, device), requires_grad=True)
        y = block(xt, mask=backend.to_device(mask, device))
        ad.sum(y * y).backward()
        results.append((backend.to_numpy(y.data), backend.to_numpy(xt.grad),
                        backend.to_numpy(block.conv2.grad)))
        block.zero_grad()
        block.to("cpu")
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)


def test_inplace_res_block_and_scatter(rng):
    nn.manual_seed(6)
    block = nn.SparseResBlock(4, 2, block_size=6).eval()
    x = rng.standard_normal((1, 9, 9, 4)).astype(np.float32)
    indices = block.active_blocks(rng.random((1, 9, 9)) < 0.1, x.shape)
    expected = block(x, indices).data
    block.inplace = True
    own = x.copy()
    y = block(own, indices)
    assert y.data is own
    np.testing.assert_array_equal(own, expected)
    with pytest.raises(ValueError, match="requires a gradient"):
        block(ad.Tensor(x.copy(), requires_grad=True), indices)
    with pytest.raises(ValueError, match="C-contiguous"):
        sbnet.sparse_scatter(np.ones((1, 2, 2, 4), np.float32), indices[:1],
                             np.asfortranarray(x), 2, 0, 2, inplace=True)
    # the blocks' gradient still flows through an in-place scatter
    blocks = ad.Tensor(np.ones((len(indices), 2, 2, 4), np.float32), requires_grad=True)
    ad.sum(sbnet.sparse_scatter(blocks, indices, x.copy(), 2, 0, 2, add=True,
                                inplace=True)).backward()
    assert blocks.grad is not None and blocks.grad.any()


@pytest.mark.parametrize("bsize,stride", [(5, 3), (6, 4), (7, 7), (6, 2), (5, 6), (8, 9)],
                         ids=["overlap-odd", "even", "gaps-none", "overlap-even", "gaps-odd",
                              "gaps-even"])
@pytest.mark.parametrize("channels", [1, 16, 64])
def test_gather_valid_conv_scatter_equals_the_dense_same_conv(rng, bsize, stride, channels):
    """SBNet's pipeline with any block geometry (overlapping blocks, gaps between them):
    gather with a 1-pixel halo, a VALID 3x3 convolution, scatter of the tiles: on every
    pixel a tile covers, the dense SAME convolution."""
    x = rng.standard_normal((2, 17, 14, channels))
    weight = rng.standard_normal((5, channels, 3, 3)) / np.sqrt(9 * channels)
    dense = denseconv.conv(x, weight, padding=1, layout="NHWC")
    count = (-(-17 // stride) + 1, -(-14 // stride) + 1)
    for density in (0.3, 1.0):
        indices = sbnet.reduce_mask(rng.random((2, 17, 14)) < density, count, bsize, -1,
                                    stride)
        blocks = sbnet.sparse_gather(x, indices, bsize, -1, stride)
        tiles = denseconv.conv(blocks, weight, padding=0, layout="NHWC")
        tile = bsize - 2
        y = sbnet.sparse_scatter(tiles, indices, np.zeros(dense.shape), tile, 0, stride)
        covered = _tiles_at(indices, dense.shape[:3], tile, stride)
        assert covered.any()
        np.testing.assert_allclose(y[covered], dense[covered], rtol=1e-10, atol=1e-10)
        assert not y[~covered].any()


def _tiles_at(indices, image, size, stride):
    ones = np.ones((len(indices), size, size, 1))
    return sbnet.sparse_scatter(ones, indices, np.zeros((*image, 1)), size, 0, stride)[..., 0] > 0


def test_sbnet_layers_between_submanifold_layers(rng):
    """A network mixing both: submanifold convolution -> dense map -> sparse residual block
    on the occupied blocks -> back to the same sites -> submanifold convolution; gradients
    reach every parameter, and the result at the sites matches the dense computation."""
    import sparsegrid as sg
    nn.manual_seed(7)
    idx = np.unique(np.stack([np.zeros(60, int), rng.integers(0, 20, 60),
                              rng.integers(0, 18, 60)], 1), axis=0).astype(np.int32)
    features = rng.standard_normal((len(idx), 3))
    first = nn.SubmanifoldConvolution(2, 3, 8, 3, False).double()
    block = nn.SparseResBlock(8, 4, block_size=6).double()
    last = nn.SubmanifoldConvolution(2, 8, 2, 3, False).double()
    x = sg.SparseTensor(ad.Tensor(features, requires_grad=True), idx, (20, 18))
    h = first(x)
    dense_map, mask = sbnet.from_sparse(h)
    assert dense_map.shape == (1, 20, 18, 8) and mask.sum() == len(idx)
    y = block(dense_map, mask=mask)
    back = sbnet.to_sparse(y, h)
    assert back.grid is h.grid and np.array_equal(back.indices, h.indices)
    out = last(back)
    ad.sum(out.features * out.features).backward()
    for p in (first.weight, block.conv2, last.weight):
        assert p.grad is not None and np.abs(p.grad).max() > 0
    assert np.abs(x.features.grad).max() > 0
    # every site lies in an active block: the block there is the dense block
    block.eval()
    y = block(dense_map.data, mask=mask).data
    reference = _dense_block(block, dense_map.data)
    np.testing.assert_allclose(y[mask], reference[mask], rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="2-D SparseTensor"):
        sbnet.from_sparse(dense_map)
    with pytest.raises(ValueError, match="dense must be"):
        sbnet.to_sparse(np.zeros((1, 5, 5, 8)), h)


def test_review_regressions(rng):
    """Mismatched params, an ambiguous ksize, a mask of the wrong shape, out-of-range
    block numbers, far-apart distinct blocks, a kernel larger than the block."""
    x = rng.standard_normal((1, 8, 8, 2))
    w = rng.standard_normal((4, 2, 3, 3))
    valid = sbnet.calc_block_params(x.shape, 6, 3, 1, "VALID")
    idx = np.array([[0, 0, 0]], np.int32)
    with pytest.raises(ValueError, match="were not made for this convolution"):
        sbnet.sparse_conv2d(x, idx, w, None, valid, 1, "SAME")
    with pytest.raises(ValueError, match="ksize must be an int or"):
        sbnet.calc_block_params(x.shape, 6, w.shape)
    block = nn.SparseResBlock(2, 1, block_size=6)
    with pytest.raises(ValueError, match="mask must have shape"):
        block(x.astype(np.float32), mask=np.ones((1, 5, 5), bool))
    with pytest.raises(ValueError, match="below 2\\*\\*31"):
        sbnet.sparse_gather(x, np.array([[0, 2**32, 0]], np.int64), 2, 0, 2)
    far = np.array([[0, 0, 2**21], [0, 1, 0]], np.int64)      # distinct: no false alarm
    assert sbnet.sparse_gather(x, far, 2, 0, 2).shape == (2, 2, 2, 2)
    with pytest.raises(ValueError, match="at least the kernel size"):
        nn.BlockSparseConv2d(2, 2, 5, block_size=4)
    with pytest.raises(ValueError, match="has no mid_channels"):
        nn.SparseResBlock(4, 2, kind="basic")
