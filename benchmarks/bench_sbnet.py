"""SBNet's benchmark protocol: sparse residual blocks against the dense block.

    .venv/bin/python benchmarks/bench_sbnet.py                      # the 200x350x192 stage
    .venv/bin/python benchmarks/bench_sbnet.py --stages all --json /tmp/sbnet.json
    python benchmarks/bench_sbnet.py --device cuda    # CuPy arrays; torch cuDNN baseline

For each LiDAR-detector stage of the SBNet paper (H x W x C -> bottleneck width: 400x700x96
->24, 200x350x192->48, 100x175x256->64, 50x88x384->96), a pre-activation bottleneck
residual block (BN-ReLU, 1x1, BN-ReLU, 3x3, BN-ReLU, 1x1, + x), float32, evaluation mode,
batch 1:

  dense        the block on the whole map (sparsegrid.denseconv convolutions)
  torch        the same with torch.nn.functional.conv2d (when torch is importable)
  sparse       nn.SparseResBlock with output tiles T x T (gathered blocks T + 2; the
               best T of --tiles is shown), block indices precomputed (reduce_mask timed
               separately); the result a new map
  in-place     the same adding into the map itself (inplace=True: no copy of the map)
  submanifold  the same bottleneck as sparsegrid submanifold ops (network_in_network and
               a 3x3 submanifold convolution) on the mask's active pixels

at mask sparsities 0.5 - 0.99, masks being a top-left square ("square") or random
discs ("blobs"). Times are medians of --repeat runs after a warm-up (ms); "speed-up" is
the best dense baseline over the sparse time, "of ideal" that speed-up over
1 / (1 - sparsity). Each sparse result is checked against the dense block on its tiles.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import timing  # noqa: E402  (benchmarks/timing.py: this script's folder is on sys.path)

import sparsegrid as sg
import sparsegrid.nn as nn
from sparsegrid import backend, denseconv, sbnet

STAGES = {"400x700x96": (400, 700, 96, 24), "200x350x192": (200, 350, 192, 48),
          "100x175x256": (100, 175, 256, 64), "50x88x384": (50, 88, 384, 96)}


SYNC = [lambda: None]      # the device's synchronize with --device cuda


def median_ms(fn, repeat):
    return timing.median_ms(fn, repeat, sync=SYNC[0])


def make_mask(kind, height, width, sparsity, rng):
    if kind == "square":
        side = np.sqrt(1 - sparsity)
        mask = np.zeros((1, height, width), bool)
        mask[0, :max(int(round(side * height)), 1), :max(int(round(side * width)), 1)] = True
        return mask
    mask = np.zeros((height, width), bool)
    rows, cols = np.mgrid[:height, :width]
    while mask.mean() < 1 - sparsity:
        r, c = rng.integers(height), rng.integers(width)
        radius = rng.uniform(3, 12)
        mask |= (rows - r) ** 2 + (cols - c) ** 2 <= radius ** 2
    return mask[None]


def bn_relu(h, bn):
    xp = backend.array_namespace(h)
    scale = (bn.weight.data / xp.sqrt(bn.running_var + bn.eps)).astype(h.dtype)
    shift = (bn.bias.data - bn.running_mean * scale).astype(h.dtype)
    return xp.maximum(h * scale + shift, 0)


def dense_block(block, x):
    h = denseconv.conv(bn_relu(x, block.bn1), block.conv1.data, padding=0, layout="NHWC")
    h = denseconv.conv(bn_relu(h, block.bn2), block.conv2.data, padding=1, layout="NHWC")
    h = denseconv.conv(bn_relu(h, block.bn3), block.conv3.data, padding=0, layout="NHWC")
    return x + h


def torch_block(torch, block, x_nchw):
    F = torch.nn.functional
    device = x_nchw.device

    def host(a):
        return backend.to_numpy(a)

    def bn(h, m):
        scale = host(m.weight.data) / np.sqrt(host(m.running_var) + m.eps)
        shift = host(m.bias.data) - host(m.running_mean) * scale
        scale = torch.as_tensor(scale.astype(np.float32), device=device)
        shift = torch.as_tensor(shift.astype(np.float32), device=device)
        return torch.relu(h * scale[:, None, None] + shift[:, None, None])

    w = [torch.as_tensor(host(p.data), device=device)
         for p in (block.conv1, block.conv2, block.conv3)]
    with torch.no_grad():
        h = F.conv2d(bn(x_nchw, block.bn1), w[0])
        h = F.conv2d(bn(h, block.bn2), w[1], padding=1)
        h = F.conv2d(bn(h, block.bn3), w[2])
        return x_nchw + h


def submanifold_block(block, x_sparse):
    def bn(t, m):
        return sg.batch_norm(t, m.weight.data, m.bias.data, m.running_mean, m.running_var,
                             training=False, eps=m.eps, leakiness=0.0)
    xp = backend.array_namespace(block.conv1.data)
    w1 = xp.ascontiguousarray(block.conv1.data[:, :, 0, 0].T)
    w2 = xp.ascontiguousarray(block.conv2.data.transpose(2, 3, 1, 0).reshape(
        9, *block.conv2.data.shape[1::-1]))
    w3 = xp.ascontiguousarray(block.conv3.data[:, :, 0, 0].T)
    h = sg.network_in_network(bn(x_sparse, block.bn1), w1)
    h = sg.submanifold_conv(bn(h, block.bn2), w2, filter_size=3)
    h = sg.network_in_network(bn(h, block.bn3), w3)
    return h


def run_stage(name, sparsities, tiles, repeat, rng, have_torch, device="cpu"):
    height, width, channels, mid = STAGES[name]
    nn.manual_seed(0)
    x = backend.to_device(rng.standard_normal((1, height, width, channels)).astype(
        np.float32), device)
    xp = backend.array_namespace(x)
    blocks = {t: nn.SparseResBlock(channels, mid, block_size=t + 2).eval() for t in tiles}
    reference = blocks[tiles[0]]
    for block in blocks.values():          # one set of weights for every block size
        block.load_state_dict(reference.state_dict())
        block.to(device)
    rows = []
    dense_ms = median_ms(lambda: dense_block(reference, x), repeat)
    dense_out = dense_block(reference, x)
    torch_ms = None
    if have_torch:
        import torch
        torch.set_num_threads(max(1, sg.get_num_threads()))
        x_nchw = torch.as_tensor(xp.ascontiguousarray(x.transpose(0, 3, 1, 2)),
                                 device="cuda" if device != "cpu" else "cpu")
        torch_ms = median_ms(lambda: torch_block(torch, reference, x_nchw), repeat)
    best_dense = min(t for t in (dense_ms, torch_ms) if t is not None)
    print(f"\n{name} (bottleneck {channels}->{mid}->{channels}): dense {dense_ms:.1f} ms"
          + (f", torch {torch_ms:.1f} ms" if torch_ms else ""))
    print(f"  {'mask':<7}{'sparsity':>9}{'blocks':>8}{'reduce':>8}{'sparse':>9}"
          f"{'speed-up':>9}{'of ideal':>9}{'in-place':>9}{'speed-up':>9}{'of ideal':>9}"
          f"{'subm':>9}  tile")
    for kind in ("square", "blobs"):
        for sparsity in sparsities:
            host_mask = make_mask(kind, height, width, sparsity, rng)
            actual = 1 - host_mask.mean()
            mask = backend.to_device(host_mask, device)
            best = None
            for t, block in blocks.items():
                reduce_ms = median_ms(lambda: block.active_blocks(mask, x.shape), repeat)
                indices = block.active_blocks(mask, x.shape)
                sparse_ms = median_ms(lambda: block(x, indices), repeat)
                y = block(x, indices).data
                block.inplace = True
                own = x.copy()
                inplace_ms = median_ms(lambda: block(own, indices), repeat)
                block.inplace = False
                params = block.block_params(x.shape)
                ones = xp.ones((len(indices), *params.bsize_out, 1), dtype=np.float32)
                tiles_mask = sbnet.sparse_scatter(
                    ones, indices, xp.zeros((1, height, width, 1), dtype=np.float32),
                    params.bsize_out, 0, params.bsize_out)[..., 0] > 0
                error = float(backend.to_numpy(xp.abs(y - dense_out).max(
                    axis=-1)[tiles_mask].max())) if bool(tiles_mask.any()) else 0.0
                row = dict(stage=name, mask=kind, sparsity=float(actual), tile=t,
                           blocks=int(len(indices)), reduce_ms=reduce_ms, sparse_ms=sparse_ms,
                           inplace_ms=inplace_ms, inplace_speedup=best_dense / inplace_ms,
                           inplace_of_ideal=best_dense / inplace_ms * (1 - actual),
                           dense_ms=dense_ms, torch_ms=torch_ms,
                           speedup=best_dense / sparse_ms,
                           of_ideal=best_dense / sparse_ms * (1 - actual), max_error=error)
                if best is None or sparse_ms < best["sparse_ms"]:
                    best = row
                rows.append(row)
            coords = np.argwhere(host_mask[0])
            indices2 = np.concatenate([np.zeros((len(coords), 1), np.int32),
                                       coords.astype(np.int32)], axis=1)
            xs = sg.SparseTensor(x[0][mask[0]], backend.to_device(indices2, device),
                                 (height, width))
            subm_ms = median_ms(lambda: submanifold_block(reference, xs), repeat)
            best["submanifold_ms"] = subm_ms
            print(f"  {kind:<7}{actual:>9.3f}{best['blocks']:>8}{best['reduce_ms']:>8.2f}"
                  f"{best['sparse_ms']:>9.2f}{best['speedup']:>9.2f}{best['of_ideal']:>9.2f}"
                  f"{best['inplace_ms']:>9.2f}{best['inplace_speedup']:>9.2f}"
                  f"{best['inplace_of_ideal']:>9.2f}"
                  f"{subm_ms:>9.2f}  {best['tile']}  (max error {best['max_error']:.1e})")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", default=["200x350x192"],
                        help=f"names of {list(STAGES)}, or all")
    parser.add_argument("--sparsities", nargs="+", type=float,
                        default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.99])
    parser.add_argument("--tiles", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (CuPy arrays; "
                        "torch's cuDNN convolutions as the second baseline)")
    args = parser.parse_args()
    if args.device != "cpu":
        import cupy
        SYNC[0] = cupy.cuda.Device().synchronize
    stages = list(STAGES) if args.stages == ["all"] else args.stages
    try:
        import torch  # noqa: F401
        have_torch = args.device == "cpu" or torch.cuda.is_available()
    except ImportError:
        have_torch = False
    print(f"sparsegrid threads: {sg.get_num_threads()}; torch: {'yes' if have_torch else 'no'}")
    rng = np.random.default_rng(0)
    rows = []
    for name in stages:
        rows += run_stage(name, args.sparsities, args.tiles, args.repeat, rng, have_torch,
                          args.device)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
