"""SBNet on a LiDAR bird's-eye view: block-sparse residual blocks where the sweep has points.

A 64-beam LiDAR sweep of a street (the benchmarks' ray-cast scene) is projected onto a
bird's-eye-view grid (20 cm cells, 704 x 400); the occupancy, dilated a little, is the
mask. `reduce_mask` turns it into active blocks, and a stack of four pre-activation
bottleneck residual blocks (C = 64) runs on those blocks only, in place, against the same
stack computed densely. Prints the sparsity, the blocks, both times and the speed-up, and
writes a picture of the mask with the active blocks outlined (a PNG written with zlib:
no plotting library needed).

    python examples/sbnet_lidar.py [--channels 64] [--blocks 4] [--tile 16] [--out bev.png]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))

import sparsegrid.nn as nn  # noqa: E402
from sparsegrid import denseconv  # noqa: E402
from png import write_png  # noqa: E402 - examples/png.py


def bird_eye_mask(cell=0.2):
    """Occupancy of the LiDAR street scene on an x-y grid of ``cell`` metres, (1, H, W)."""
    import scenes
    indices, _ = scenes.lidar_street(voxel_size=0.05)
    xy = indices[:, 1:3].astype(np.int64) // int(round(cell / 0.05))
    height = int(round((scenes.STREET_UPPER[0] - scenes.STREET_LOWER[0]) / cell))
    width = int(round((scenes.STREET_UPPER[1] - scenes.STREET_LOWER[1]) / cell))
    mask = np.zeros((height, width), bool)
    mask[xy[:, 0], xy[:, 1]] = True
    # a 3x3 dilation: the cells a 3x3 layer around the points reads
    padded = np.pad(mask, 1)
    grown = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            grown |= padded[dy:dy + height, dx:dx + width]
    return grown[None]


def picture(mask, indices, params):
    """The mask in grey, active block tiles tinted blue with dark outlines."""
    height, width = mask.shape[1:]
    rgb = np.full((height, width, 3), 255, np.uint8)
    th, tw = params.bsize_out
    for _, bh, bw in indices.tolist():
        r0, c0 = bh * th, bw * tw
        r1, c1 = min(r0 + th, height), min(c0 + tw, width)
        rgb[r0:r1, c0:c1] = (205, 222, 255)
        rgb[r0, c0:c1] = rgb[r1 - 1, c0:c1] = (40, 60, 160)
        rgb[r0:r1, c0] = rgb[r0:r1, c1 - 1] = (40, 60, 160)
    rgb[mask[0]] = (60, 60, 60)
    return rgb


def dense_stack(blocks, x):
    def bn_relu(h, bn):
        scale = (bn.weight.data / np.sqrt(bn.running_var + bn.eps)).astype(h.dtype)
        return np.maximum(h * scale + (bn.bias.data - bn.running_mean * scale).astype(h.dtype),
                          0)
    for block in blocks:
        h = denseconv.conv(bn_relu(x, block.bn1), block.conv1.data, padding=0, layout="NHWC")
        h = denseconv.conv(bn_relu(h, block.bn2), block.conv2.data, padding=1, layout="NHWC")
        h = denseconv.conv(bn_relu(h, block.bn3), block.conv3.data, padding=0, layout="NHWC")
        x = x + h
    return x


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--tile", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default="sbnet_bev.png")
    args = parser.parse_args()

    mask = bird_eye_mask()
    n, height, width = mask.shape
    nn.manual_seed(0)
    stack = [nn.SparseResBlock(args.channels, args.channels // 4, block_size=args.tile + 2,
                               inplace=True).eval() for _ in range(args.blocks)]
    x = np.random.default_rng(0).standard_normal((n, height, width, args.channels)).astype(
        np.float32)
    params = stack[0].block_params(x.shape)
    start = time.perf_counter()
    indices = stack[0].active_blocks(mask, x.shape)       # shared by every block of the stack
    reduce_ms = 1e3 * (time.perf_counter() - start)
    print(f"bird's-eye view {height} x {width}, {mask.mean():.1%} of cells occupied "
          f"(sparsity {1 - mask.mean():.3f}); tiles {params.bsize_out}, "
          f"{len(indices)} of {params.bcount[0] * params.bcount[1]} blocks active "
          f"({reduce_ms:.1f} ms to find them)")

    def sparse():
        y = x.copy()
        for block in stack:
            y = block(y, indices).data
        return y

    def timed(fn):
        fn()
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return 1e3 * best

    sparse_ms, dense_ms = timed(sparse), timed(lambda: dense_stack(stack, x))
    print(f"{args.blocks} bottleneck residual blocks, C = {args.channels}: dense "
          f"{dense_ms:.1f} ms, block-sparse {sparse_ms:.1f} ms: {dense_ms / sparse_ms:.1f}x")
    first = stack[0]
    first.inplace = False
    one = first(x, indices).data
    first.inplace = True
    reference = dense_stack(stack[:1], x)
    tiles = np.zeros((n, height, width), bool)
    for _, bh, bw in indices.tolist():
        tiles[0, bh * params.bsize_out[0]:(bh + 1) * params.bsize_out[0],
              bw * params.bsize_out[1]:(bw + 1) * params.bsize_out[1]] = True
    print(f"first block on active tiles vs dense: max difference "
          f"{np.abs(one[tiles] - reference[tiles]).max():.1e}")
    write_png(args.out, picture(mask, indices, params))
    print(f"picture: {args.out}")


if __name__ == "__main__":
    main()
