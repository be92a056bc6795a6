"""DCLS learns where its taps go: a 1-D layer with 3 taps recovers a wide, sparse kernel.

    .venv/bin/python examples/dcls_positions.py                  # ~300 Adam steps, a few s
    .venv/bin/python examples/dcls_positions.py --steps 150 --png /tmp/kernel.png

The ground truth is a 31-cell kernel with 3 spikes far apart (cells 4, 18 and 27 of 31,
offsets -11, +3 and +12 from the centre); random 1-D signals convolved with it are the
targets. A ``sparsegrid.nn.Dcls1d(1, 1, kernel_count=3, dilated_kernel_size=31,
padding=15, version='gauss')`` starts with its taps evenly spread and broad (Gaussian
spread SIG = 3: each tap "sees" a wide neighbourhood, so the gradient can pull it towards
a spike some cells away) and is trained with Adam on the mean squared error; the spreads
shrink as the taps lock on. It prints the learned positions against the true ones and
writes a PNG of the learned kernel over training: one row per recorded step (top: the
start), one column per kernel cell, red positive, blue negative, with the true kernel as
the last rows.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import sparsegrid.nn as nn
from sparsegrid import autodiff as ad
from sparsegrid import denseconv
from sparsegrid.nn.optim import Adam
from png import write_png  # examples/png.py

SIZE = 31
TRUE_CELLS = (4, 18, 27)
TRUE_WEIGHTS = (1.0, -0.8, 0.6)


def picture(rows, scale=8):
    """Kernels (T, n) as a red (positive) / blue (negative) image, cells ``scale`` px."""
    rows = np.asarray(rows, np.float64)
    top = max(float(np.abs(rows).max()), 1e-12)
    v = np.clip(rows / top, -1, 1)[..., None]
    white = np.array([255.0, 255.0, 255.0])
    red, blue = np.array([200.0, 30.0, 30.0]), np.array([30.0, 60.0, 200.0])
    rgb = np.where(v >= 0, white + v * (red - white), white - v * (blue - white))
    rgb = np.repeat(np.repeat(rgb, 2, axis=0), scale, axis=1)
    return rgb.round().astype(np.uint8)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", default="dcls_positions.png")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    truth = np.zeros((1, 1, SIZE), np.float32)
    truth[0, 0, list(TRUE_CELLS)] = TRUE_WEIGHTS
    centre = SIZE // 2

    nn.manual_seed(args.seed)
    layer = nn.Dcls1d(1, 1, kernel_count=3, dilated_kernel_size=SIZE, padding=centre,
                      bias=False, version="gauss")
    layer.P.data[...] = np.array([-9.0, 0.0, 9.0], np.float32).reshape(1, 1, 1, 3)
    layer.SIG.data[...] = 3.0
    layer.weight.data[...] = 0.1
    optimizer = Adam(layer.parameters(), lr=args.lr)

    history = []
    record_every = max(args.steps // 100, 1)
    start = time.perf_counter()
    for step in range(args.steps):
        x = rng.standard_normal((args.batch, 1, args.length)).astype(np.float32)
        target = denseconv.conv(x, truth, padding=centre)
        loss = ad.mean((layer(x) - target) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        layer.clamp_parameters()
        if step % record_every == 0 or step == args.steps - 1:
            history.append(np.asarray(layer.construct_kernel().data)[0, 0].copy())
        if step == 0 or (step + 1) % max(args.steps // 5, 1) == 0:
            print(f"step {step + 1:4d}  loss {float(loss.data):.5f}")
    elapsed = time.perf_counter() - start

    order = np.argsort(layer.P.data[0, 0, 0])
    learned = layer.P.data[0, 0, 0][order] + centre
    weights = layer.weight.data[0, 0][order]
    spreads = np.abs(layer.SIG.data[0, 0, 0][order]) + 0.27
    print(f"true positions:    {' '.join(f'{c:6.2f}' for c in TRUE_CELLS)}")
    print(f"learned positions: {' '.join(f'{c:6.2f}' for c in learned)}")
    print(f"true weights:      {' '.join(f'{w:6.2f}' for w in TRUE_WEIGHTS)}")
    print(f"learned weights:   {' '.join(f'{w:6.2f}' for w in weights)}")
    print(f"learned std devs:  {' '.join(f'{s:6.2f}' for s in spreads)}")
    print(f"{args.steps} steps in {elapsed:.1f} s; final loss {float(loss.data):.6f}")
    rows = np.array(history + [np.zeros(SIZE)] + [truth[0, 0]] * 3)
    write_png(args.png, picture(rows))
    print(f"wrote {args.png} ({len(history)} recorded steps x {SIZE} cells, truth below)")
    return learned


if __name__ == "__main__":
    main()
