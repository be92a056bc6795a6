"""Voxelization speed and peak memory: sparsegrid.pointcloud.voxelize on LiDAR-like clouds.

1M and 10M points (a ground plane with noise plus building- and tree-like clusters over
200 m x 200 m, float64 xyz and float32 intensity+rgb features), 5 cm voxels, reductions
'mean' and 'first'. Time: best of ``--repeat`` runs; peak memory: tracemalloc's peak of
NumPy allocations during one call, and its ratio to the input's bytes (points + features).
Open3D's ``voxel_down_sample`` and spconv's ``PointToVoxel`` run in the same process when
importable (neither is a dependency).

    .venv/bin/python benchmarks/bench_voxelize.py [--sizes 1000000 10000000] [--repeat 3]
"""

import argparse
import time
import tracemalloc

import numpy as np

from sparsegrid.pointcloud import voxelize


def lidar_like(n, seed=0):
    rng = np.random.default_rng(seed)
    n_ground = int(n * 0.6)
    ground = np.column_stack([rng.uniform(0, 200, n_ground), rng.uniform(0, 200, n_ground),
                              rng.normal(0, 0.05, n_ground)])
    n_obj = n - n_ground
    centres = rng.uniform(0, 200, (400, 2))
    which = rng.integers(0, len(centres), n_obj)
    obj = np.column_stack([centres[which] + rng.normal(0, 2.0, (n_obj, 2)),
                           rng.uniform(0, 15, n_obj)])
    points = np.concatenate([ground, obj]) + np.array([500_000.0, 4_000_000.0, 100.0])
    features = rng.random((n, 4)).astype(np.float32)
    return points, features


def timed(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def peak_bytes(fn):
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--voxel", type=float, default=0.05)
    args = parser.parse_args()
    try:
        import open3d
    except ImportError:
        open3d = None
    try:
        from spconv.pytorch.utils import PointToVoxel
        import torch
    except ImportError:
        PointToVoxel = None
    for n in args.sizes:
        points, features = lidar_like(n)
        input_bytes = points.nbytes + features.nbytes
        for reduce in ("mean", "first"):
            def run():
                return voxelize(points, args.voxel, features, reduce)
            seconds, res = timed(run, args.repeat)
            peak = peak_bytes(run)
            print(f"sparsegrid voxelize  n={n:>9,} reduce={reduce:<5} voxels="
                  f"{res.tensor.n_active:>9,}  {seconds * 1e3:8.1f} ms  "
                  f"{n / seconds / 1e6:6.1f} Mpts/s  peak {peak / 2**20:7.1f} MiB "
                  f"({peak / input_bytes:.2f}x input)")
        if open3d is not None:
            cloud = open3d.geometry.PointCloud(open3d.utility.Vector3dVector(points))
            seconds, _ = timed(lambda: cloud.voxel_down_sample(args.voxel), args.repeat)
            print(f"open3d voxel_down_sample n={n:>9,}  {seconds * 1e3:8.1f} ms")
        else:
            print("open3d: not installed (pip install open3d) -- skipped")
        if PointToVoxel is not None:
            lo, hi = points.min(0), points.max(0) + args.voxel
            gen = PointToVoxel(vsize_xyz=[args.voxel] * 3,
                               coors_range_xyz=list(lo - lo) + list(hi - lo),
                               num_point_features=3, max_num_voxels=n,
                               max_num_points_per_voxel=1)
            local = torch.from_numpy((points - lo).astype(np.float32))
            seconds, _ = timed(lambda: gen(local), args.repeat)
            print(f"spconv PointToVoxel  n={n:>9,}  {seconds * 1e3:8.1f} ms")
        else:
            print("spconv: not installed -- skipped")


if __name__ == "__main__":
    main()
