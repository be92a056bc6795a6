"""sparsegrid quickstart: a synthetic scan through a few sparse convolutions and poolings.

Run:  python examples/quickstart.py
"""

import time

import numpy as np

import sparsegrid as sg


def synthetic_scan(n_points=200_000, voxel=0.02, seed=0):
    """Points on a floor, a sphere and a box in a 2.56 m cube, voxelised at 2 cm."""
    rng = np.random.default_rng(seed)
    floor = np.c_[rng.uniform(0, 2.5, (n_points // 2, 2)), np.full(n_points // 2, 0.05)]
    direction = rng.standard_normal((n_points // 4, 3))
    sphere = 0.5 * direction / np.linalg.norm(direction, axis=1, keepdims=True) + [1.2, 1.2, 0.6]
    side = rng.uniform(0, 0.6, (n_points // 4, 3))
    side[np.arange(len(side)), rng.integers(0, 3, len(side))] = 0.0   # one face per point
    box = side + [0.2, 1.6, 0.05]
    points = np.concatenate([floor, sphere, box])
    return np.floor(points / voxel).astype(np.int32)


def main():
    rng = np.random.default_rng(1)
    voxels = synthetic_scan()
    spatial_shape = (128, 128, 128)
    indices = np.c_[np.zeros(len(voxels), np.int32), voxels]   # batch index first
    features = np.ones((len(indices), 1), np.float32)
    # Points fall into the same voxel: the input layer merges them (here: mean).
    x, _ = sg.input_layer(indices, features, spatial_shape, mode="mean")
    print(f"input      {x}")

    def weight(k, cin, cout):
        return (rng.standard_normal((k, cin, cout)) * np.sqrt(2.0 / (k * cin))).astype(np.float32)

    steps = [
        ("submanifold 3x3x3, 1 -> 16", lambda t: sg.submanifold_conv(t, weight(27, 1, 16), None, 3)),
        ("batch norm + ReLU", lambda t: sg.batch_norm(t, leakiness=0.0)),
        ("submanifold 3x3x3, 16 -> 16", lambda t: sg.submanifold_conv(t, weight(27, 16, 16), None, 3)),
        ("max pooling 2/2", lambda t: sg.max_pool(t, 2, 2)),
        ("convolution 2/2, 16 -> 32", lambda t: sg.conv(t, weight(8, 16, 32), None, 2, 2)),
        ("submanifold 3x3x3, 32 -> 32", lambda t: sg.submanifold_conv(t, weight(27, 32, 32), None, 3)),
        ("deconvolution 2/2, 32 -> 16", lambda t: sg.deconv(t, weight(8, 32, 16), None, 2, 2)),
    ]
    for name, op in steps:
        start = time.perf_counter()
        x = op(x)
        ms = (time.perf_counter() - start) * 1e3
        print(f"{name:<30} -> {x.n_active:>7} sites x {x.n_channels:>2} channels, "
              f"spatial {x.spatial_shape}  ({ms:.1f} ms)")
    pooled = sg.global_pool(x, "mean")
    print(f"global mean pool -> {pooled.shape}, mean |feature| {np.abs(pooled).mean():.4f}")
    # The second submanifold layer reused the first one's rulebook; deconvolution reused
    # the strided convolution's, transposed.
    print(f"rulebooks built for this input: {x.grid}")


if __name__ == "__main__":
    main()
