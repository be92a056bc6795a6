"""SBNet block ops against SBNet's own pseudo-code (loops over blocks), on NumPy and on
the GPU (real or host-emulated): reduce_mask, sparse_gather, sparse_scatter, adjoints,
gradients, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from sparsegrid import autodiff as ad
from sparsegrid import backend, sbnet


def _geometries():
    # (H, W, bsize, boffset, bstride): gaps, exact tiling, overlaps, odd/even, negative offsets
    return [(9, 11, (3, 3), (-1, -1), (3, 3)), (10, 8, (4, 4), (0, 0), (4, 4)),
            (13, 9, (5, 4), (-2, -1), (3, 2)), (7, 12, (2, 3), (0, -1), (5, 4)),
            (16, 16, (6, 6), (-1, -1), (4, 4)), (5, 6, (7, 8), (-3, -2), (2, 3)),
            (12, 10, (3, 5), (1, 0), (2, 3))]


def _count(extent, offset, stride, size):
    return max(-(-(extent - offset) // stride), 1) + 1   # some blocks lie past the image


def _loop_gather(x, indices, size, offset, stride):
    n_images, height, width, channels = x.shape
    out = np.zeros((len(indices), *size, channels), x.dtype)
    for b, (n, bh, bw) in enumerate(indices.tolist()):
        for i in range(size[0]):
            for j in range(size[1]):
                r, c = offset[0] + bh * stride[0] + i, offset[1] + bw * stride[1] + j
                if 0 <= r < height and 0 <= c < width:
                    out[b, i, j] = x[n, r, c]
    return out


def _loop_scatter(blocks, indices, base, size, offset, stride, add):
    y = base.copy()
    height, width = base.shape[1:3]
    for b, (n, bh, bw) in enumerate(indices.tolist()):
        for i in range(size[0]):
            for j in range(size[1]):
                r, c = offset[0] + bh * stride[0] + i, offset[1] + bw * stride[1] + j
                if 0 <= r < height and 0 <= c < width:
                    if add:
                        y[n, r, c] += blocks[b, i, j]
                    else:
                        y[n, r, c] = blocks[b, i, j]
    return y


def _loop_reduce(mask, count, size, offset, stride, tol, avgpool):
    rows = []
    n_images, height, width = mask.shape
    for n in range(n_images):
        for bh in range(count[0]):
            for bw in range(count[1]):
                r0, c0 = offset[0] + bh * stride[0], offset[1] + bw * stride[1]
                patch = mask[n, max(r0, 0):max(r0 + size[0], 0), max(c0, 0):max(c0 + size[1], 0)]
                if avgpool:
                    active = patch.sum() / (size[0] * size[1]) > tol
                else:
                    active = patch.size > 0 and patch.max() > tol
                if active:
                    rows.append((n, bh, bw))
    return np.array(rows, np.int32).reshape(-1, 3)


def _random_blocks(rng, n_images, count, fraction=0.5):
    all_blocks = np.array([(n, h, w) for n in range(n_images) for h in range(count[0])
                           for w in range(count[1])], np.int32)
    keep = rng.random(len(all_blocks)) < fraction
    keep[rng.integers(len(all_blocks))] = True
    return all_blocks[keep]


@pytest.mark.parametrize("geometry", _geometries(), ids=lambda g: f"{g[0]}x{g[1]}-b{g[2]}-o{g[3]}-s{g[4]}")
@pytest.mark.parametrize("avgpool", [False, True])
def test_reduce_mask_is_sbnets(rng, geometry, avgpool):
    height, width, size, offset, stride = geometry
    count = (_count(height, offset[0], stride[0], size[0]), _count(width, offset[1], stride[1], size[1]))
    for density in (0.0, 0.05, 0.4):
        mask = (rng.random((2, height, width)) < density).astype(np.float32)
        if avgpool:
            mask *= rng.random(mask.shape).astype(np.float32)
        tol = 0.05 if avgpool else 0.5
        expected = _loop_reduce(mask, count, size, offset, stride, tol, avgpool)
        got = sbnet.reduce_mask(mask[..., None], count, size, offset, stride, tol, avgpool)
        assert got.dtype == np.int32 and got.shape[1] == 3
        np.testing.assert_array_equal(got, expected)
    assert sbnet.reduce_mask(np.zeros((1, 4, 4)), (2, 2), 2, 0, 2).shape == (0, 3)


@pytest.mark.parametrize("geometry", _geometries(), ids=lambda g: f"{g[0]}x{g[1]}-b{g[2]}-o{g[3]}-s{g[4]}")
@pytest.mark.parametrize("channels", [1, 3, 8])
def test_gather_and_scatter_are_sbnets(rng, geometry, channels):
    height, width, size, offset, stride = geometry
    count = (_count(height, offset[0], stride[0], size[0]), _count(width, offset[1], stride[1], size[1]))
    x = rng.integers(-9, 10, (3, height, width, channels)).astype(np.float64)
    indices = _random_blocks(rng, 3, count)
    gathered = sbnet.sparse_gather(x, indices, size, offset, stride)
    np.testing.assert_array_equal(gathered, _loop_gather(x, indices, size, offset, stride))
    transposed = sbnet.sparse_gather(x, indices, size, offset, stride, transpose=True)
    np.testing.assert_array_equal(transposed, gathered.transpose(0, 3, 1, 2))
    blocks = rng.integers(-9, 10, gathered.shape).astype(np.float64)
    for add in (False, True):
        expected = _loop_scatter(blocks, indices, x, size, offset, stride, add)
        got = sbnet.sparse_scatter(blocks, indices, x, size, offset, stride, add=add)
        np.testing.assert_array_equal(got, expected)       # integers: exact in any order
        got_t = sbnet.sparse_scatter(blocks.transpose(0, 3, 1, 2), indices, x, size, offset,
                                     stride, add=add, transpose=True)
        np.testing.assert_array_equal(got_t, expected)
    assert not np.shares_memory(got, x)


@pytest.mark.parametrize("geometry", _geometries()[:5], ids=str)
def test_gather_scatter_adjoint_and_gradients(rng, geometry):
    height, width, size, offset, stride = geometry
    count = (_count(height, offset[0], stride[0], size[0]), _count(width, offset[1], stride[1], size[1]))
    indices = _random_blocks(rng, 2, count, 0.6)
    x = rng.standard_normal((2, height, width, 2))
    blocks = rng.standard_normal((len(indices), *size, 2))
    # <scatter_add(b, 0), y> == <b, gather(y)>
    zero = np.zeros_like(x)
    lhs = np.sum(sbnet.sparse_scatter(blocks, indices, zero, size, offset, stride, add=True) * x)
    rhs = np.sum(blocks * sbnet.sparse_gather(x, indices, size, offset, stride))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12)
    for transpose in (False, True):
        b_user = blocks.transpose(0, 3, 1, 2) if transpose else blocks
        probe_g = rng.standard_normal(sbnet.sparse_gather(x, indices, size, offset, stride,
                                                          transpose).shape)
        ad.check_gradients(lambda t: ad.sum(sbnet.sparse_gather(t, indices, size, offset, stride,
                                                                transpose) * probe_g), [x])
        probe_s = rng.standard_normal(x.shape)
        for add in (False, True):
            ad.check_gradients(
                lambda b, base: ad.sum(sbnet.sparse_scatter(b, indices, base, size, offset, stride,
                                                            add, transpose) * probe_s),
                [b_user, x])


def test_overwrite_with_overlaps_last_block_wins_and_gets_the_gradient():
    base = np.zeros((1, 4, 4, 1))
    indices = np.array([[0, 0, 0], [0, 0, 1]], np.int32)   # 3x3 blocks, stride 1: overlap
    blocks = np.stack([np.full((3, 3, 1), 1.0), np.full((3, 3, 1), 2.0)])
    y = sbnet.sparse_scatter(blocks, indices, base, 3, 0, 1)
    assert y[0, 0, 0, 0] == 1 and y[0, 0, 1, 0] == 2 and y[0, 2, 3, 0] == 2
    reversed_ = sbnet.sparse_scatter(blocks[::-1].copy(), indices[::-1].copy(), base, 3, 0, 1)
    assert reversed_[0, 0, 1, 0] == 1                      # list order decides
    b = ad.Tensor(blocks, requires_grad=True)
    ad.sum(sbnet.sparse_scatter(b, indices, base, 3, 0, 1)).backward()
    assert b.grad[0, :, 0].sum() == 3 and b.grad[0, :, 1:].sum() == 0   # overwritten: no grad
    assert b.grad[1].sum() == 9


def test_bad_input():
    x = np.zeros((1, 4, 4, 2))
    idx = np.array([[0, 0, 0]], np.int32)
    with pytest.raises(ValueError, match="4-D NHWC"):
        sbnet.sparse_gather(x[0], idx, 2, 0, 2)
    with pytest.raises(ValueError, match="bsize must be >= 1"):
        sbnet.sparse_gather(x, idx, 0, 0, 2)
    with pytest.raises(ValueError, match="bstride must be >= 1"):
        sbnet.sparse_gather(x, idx, 2, 0, 0)
    with pytest.raises(ValueError, match=r"shape \(n_blocks, 3\)"):
        sbnet.sparse_gather(x, idx[:, :2], 2, 0, 2)
    with pytest.raises(ValueError, match="indices must be >= 0"):
        sbnet.sparse_gather(x, -idx - 1, 2, 0, 2)
    with pytest.raises(ValueError, match="image 1 of 1"):
        sbnet.sparse_gather(x, np.array([[1, 0, 0]], np.int32), 2, 0, 2)
    with pytest.raises(TypeError, match="integers"):
        sbnet.sparse_gather(x, idx.astype(float), 2, 0, 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        sbnet.sparse_gather(x.astype(np.int32), idx, 2, 0, 2)
    with pytest.raises(TypeError, match="one dtype"):
        sbnet.sparse_scatter(np.zeros((1, 2, 2, 2), np.float32), idx, x, 2, 0, 2)
    with pytest.raises(ValueError, match="blocks must have shape"):
        sbnet.sparse_scatter(np.zeros((1, 3, 3, 2)), idx, x, 2, 0, 2)
    with pytest.raises(ValueError, match="each block once"):
        sbnet.sparse_scatter(np.zeros((2, 2, 2, 2)), np.zeros((2, 3), np.int32), x, 2, 0, 2)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        sbnet.reduce_mask(np.zeros((4, 4)), (2, 2), 2, 0, 2)
    with pytest.raises(ValueError, match="block_count must be >= 1"):
        sbnet.reduce_mask(np.zeros((1, 4, 4)), (0, 2), 2, 0, 2)
    with pytest.raises(TypeError, match="pair of ints"):
        sbnet.reduce_mask(np.zeros((1, 4, 4)), (2, 2), 2.5, 0, 2)


def test_block_ops_on_the_gpu_are_the_cpus(rng, gpu_device):
    for height, width, size, offset, stride in _geometries():
        count = (_count(height, offset[0], stride[0], size[0]),
                 _count(width, offset[1], stride[1], size[1]))
        mask = (rng.random((2, height, width)) < 0.3).astype(np.float32)
        idx_cpu = sbnet.reduce_mask(mask, count, size, offset, stride)
        idx_gpu = sbnet.reduce_mask(backend.to_device(mask, gpu_device), count, size, offset,
                                    stride)
        np.testing.assert_array_equal(backend.to_numpy(idx_gpu), idx_cpu)
        x = rng.standard_normal((2, height, width, 3))
        xg = ad.Tensor(backend.to_device(x, gpu_device), requires_grad=True)
        xc = ad.Tensor(x, requires_grad=True)
        for add in (False, True):
            outs = []
            for t, idx, dev in ((xc, idx_cpu, "cpu"), (xg, idx_gpu, gpu_device)):
                blocks = sbnet.sparse_gather(t, idx, size, offset, stride)
                y = sbnet.sparse_scatter(blocks * 2.0 + 1.0, idx, t, size, offset, stride, add)
                ad.sum(y * y).backward()
                outs.append(backend.to_numpy(y.data))
            np.testing.assert_allclose(outs[1], outs[0], rtol=1e-12)   # same order: same bits
            np.testing.assert_allclose(backend.to_numpy(xg.grad), xc.grad, rtol=1e-12)
            xg.grad = xc.grad = None


def test_spelled_out_keywords_are_sbnets():
    x = np.arange(32.0).reshape(1, 4, 4, 2)
    idx = np.array([[0, 1, 1]], np.int32)
    short = sbnet.sparse_gather(x, idx, bsize=2, boffset=0, bstride=2)
    long_ = sbnet.sparse_gather(x, idx, block_size=2, block_offset=0, block_stride=2)
    np.testing.assert_array_equal(short, long_)
    y = sbnet.sparse_scatter(short, idx, base=x, block_size=2, block_offset=0,
                             block_stride=2, add=True)
    np.testing.assert_array_equal(y, sbnet.sparse_scatter(short, idx, x, 2, 0, 2, add=True))
    assert sbnet.reduce_mask(np.ones((1, 4, 4)), (2, 2), block_size=2, block_offset=0,
                             block_stride=2).shape == (4, 3)
    with pytest.raises(TypeError, match="both block_size and bsize"):
        sbnet.sparse_gather(x, idx, bsize=2, block_size=2, boffset=0, bstride=2)
