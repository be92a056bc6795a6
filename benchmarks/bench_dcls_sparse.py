"""SubmanifoldDcls against a submanifold convolution with the same receptive field.

    .venv/bin/python benchmarks/bench_dcls_sparse.py                   # dks 9, KC 8, C 16
    .venv/bin/python benchmarks/bench_dcls_sparse.py --dks 5 9 --kc 4 8 --repeat 3

On the benchmarks' LiDAR street scene (benchmarks/scenes.py ``lidar_street(0.10)``: one
64-beam revolution voxelised at 10 cm), float32, C -> C channels:

  submanifold   nn.SubmanifoldConvolution(3, C, C, dks): all dks^3 offsets
  dcls          nn.SubmanifoldDcls(3, C, C, KC, dks, version='v1') with DCLS's
                initialisation (P ~ N(0, 0.5) clamped): only the offsets the taps touch
  dcls spread   the same with the taps spread uniformly over the whole kernel (what a
                trained layer may look like): the union over C x C filters' taps

Times are medians of --repeat runs after a warm-up (which builds and caches the
rulebooks), in ms: forward, and forward + backward (gradients of the features and of
every parameter). "rulebook" is the first call's extra cost (building the rulebook).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import scenes  # noqa: E402
import timing  # noqa: E402

import sparsegrid as sg  # noqa: E402
import sparsegrid.nn as nn  # noqa: E402
from sparsegrid import autodiff as ad  # noqa: E402


def median_ms(fn, repeat):
    return timing.median_ms(fn, repeat, warmup=False)


def measure(layer, indices, shape, channels, repeat, rng):
    features = rng.standard_normal((len(indices), channels)).astype(np.float32)

    def fresh():
        return sg.SparseTensor(ad.Tensor(features, requires_grad=True), indices, shape, 1)

    x = fresh()
    start = time.perf_counter()
    layer(x)
    first = 1e3 * (time.perf_counter() - start)

    def forward():
        with ad.no_grad():
            layer(x)

    def forward_backward():
        layer.zero_grad()
        y = layer(x)
        ad.sum(y.features * y.features).backward()

    fwd = median_ms(forward, repeat)
    fb = median_ms(forward_backward, repeat)
    return first - fwd, fwd, fb


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--voxel", type=float, default=0.10)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--dks", type=int, nargs="+", default=[9])
    parser.add_argument("--kc", type=int, nargs="+", default=[8])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    indices, shape = scenes.lidar_street(args.voxel)
    c = args.channels
    print(f"lidar_street({args.voxel}): {len(indices)} active sites, grid {shape}, "
          f"C = {c} -> {c}, float32, medians of {args.repeat}")
    print("| layer | dks | KC | offsets | weights | rulebook ms | fwd ms | fwd+bwd ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(0)
    for dks in args.dks:
        nn.manual_seed(0)
        conv = nn.SubmanifoldConvolution(3, c, c, dks, True)
        rb, fwd, fb = measure(conv, indices, shape, c, args.repeat, rng)
        n_weights = sum(p.data.size for p in conv.parameters())
        print(f"| submanifold | {dks} | - | {dks ** 3} | {n_weights} | {rb:.0f} | {fwd:.0f} "
              f"| {fb:.0f} |", flush=True)
        for kc in args.kc:
            for label in ("dcls", "dcls spread"):
                nn.manual_seed(0)
                layer = nn.SubmanifoldDcls(3, c, c, kc, dks, version="v1")
                if label == "dcls spread":
                    lim = dks // 2
                    layer.P.data[...] = rng.uniform(-lim, lim, layer.P.shape).astype(
                        np.float32)
                n_weights = sum(p.data.size for p in layer.parameters())
                rb, fwd, fb = measure(layer, indices, shape, c, args.repeat, rng)
                print(f"| {label} | {dks} | {kc} | {len(layer.offsets())} | {n_weights} | "
                      f"{rb:.0f} | {fwd:.0f} | {fb:.0f} |", flush=True)


if __name__ == "__main__":
    main()
