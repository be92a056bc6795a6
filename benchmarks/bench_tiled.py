"""Tiled inference on Dask: tiles/s per worker at 1 and 2 workers, halo overhead against
the analytic estimate, and peak memory per worker against a whole-scene run.

    .venv/bin/python benchmarks/bench_tiled.py                      # 20M points
    .venv/bin/python benchmarks/bench_tiled.py --points 2000000     # a small machine

A synthetic airborne survey (ground with slopes, box buildings, vegetation; about 10 points
per square metre) is voxelized at --voxel metres and run through a three-level U-Net
(total stride 4) in tiles of --tile voxels (x/y), on a LocalCluster of 1 and 2 worker
processes (one thread each, SPARSEGRID_NUM_THREADS=1). Each worker's peak RSS is its
VmHWM after the run, its mark reset just before (a forked worker inherits the client's); the whole scene is run once in a fresh worker for comparison, and
the tiled result is checked against it (float32: to rounding, see docs/distributed.md).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def survey(n, seed=0):
    """(points (n, 3) float64, features (n, 2) float32): ground, buildings, trees."""
    rng = np.random.default_rng(seed)
    side = float(np.sqrt(n / 10.0))                    # ~10 points per square metre
    kinds = rng.choice(3, n, p=[0.6, 0.25, 0.15])
    xy = rng.uniform(0, side, (n, 2))
    ground = 3 * np.sin(xy[:, 0] / 40) + 2 * np.cos(xy[:, 1] / 55)
    z = ground + rng.normal(0, 0.05, n)
    # buildings: a lattice of boxes 20 m wide, roofs 6-15 m up
    cell = np.floor(xy / 35.0)
    height = 6 + 9 * ((cell[:, 0] * 7 + cell[:, 1] * 13) % 10) / 10
    inside = np.all((xy % 35.0) < 20.0, axis=1)
    roof = (kinds == 1) & inside
    z[roof] = ground[roof] + height[roof] + rng.normal(0, 0.03, roof.sum())
    trees = kinds == 2
    z[trees] = ground[trees] + rng.gamma(2.0, 2.5, trees.sum())
    points = np.stack([xy[:, 0], xy[:, 1], z - z.min()], axis=1)
    features = np.stack([rng.uniform(0, 1, n), (kinds == 2).astype(float)], axis=1)
    return points, features.astype(np.float32)


def model():
    import sparsegrid.nn as scn
    scn.manual_seed(0)
    net = scn.Sequential(scn.SubmanifoldConvolution(3, 2, 16, 3, False),
                         scn.UNet(3, 1, [16, 24, 32]),
                         scn.NetworkInNetwork(16, 5, True))
    return net.eval()


def _reset_peak_rss():
    """Restart the process's peak-RSS mark (Linux: ``echo 5 > /proc/self/clear_refs``).

    A worker forked from this process inherits its high-water mark (the survey held here
    counts as the worker's), so getrusage alone would report the client's memory."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb():
    """The peak RSS since :func:`_reset_peak_rss` (VmHWM), else getrusage's lifetime peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _whole_scene(points, features, voxel):
    from sparsegrid.distributed import predict_scene
    _reset_peak_rss()
    start = time.perf_counter()
    out = predict_scene(model(), points, voxel, features=features)
    return out, time.perf_counter() - start, _peak_rss_mb()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=20_000_000)
    parser.add_argument("--voxel", type=float, default=0.5)
    parser.add_argument("--tile", type=int, default=128, help="core size in voxels (x/y)")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--skip-whole", action="store_true")
    args = parser.parse_args()
    os.environ["SPARSEGRID_NUM_THREADS"] = "1"       # inherited by the worker processes
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from distributed import Client, LocalCluster
    from sparsegrid.distributed import predict_tiled, receptive_field, total_stride

    points, features = survey(args.points)
    net = model()
    rf, stride = receptive_field(net), total_stride(net)
    print(f"{args.points:,} points, {np.ptp(points[:, 0]):.0f} x {np.ptp(points[:, 1]):.0f} "
          f"m, voxel {args.voxel} m, tile {args.tile} voxels; receptive field "
          f"{rf.lower[0]}/{rf.upper[0]}, total stride {stride[0]}")
    results = {}
    for n_workers in [int(w) for w in args.workers.split(",")]:
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                          dashboard_address=None, memory_limit=0) as cluster, \
                Client(cluster) as client:
            client.run(_reset_peak_rss)
            start = time.perf_counter()
            out, info = predict_tiled(net, points, args.voxel, args.tile,
                                      features=features, client=client, return_info=True)
            wall = time.perf_counter() - start
            rss = client.run(_peak_rss_mb)
        results[n_workers] = out
        tiles = info["tiles"]
        # analytic halo overhead: the read regions' x/y area over the cores' (uniform
        # density), against the voxels actually computed over the voxels owned
        cores = np.prod(np.asarray(info["read_shapes"])[:, :2], axis=1)
        analytic = (args.tile + 2 * 16) ** 2 / args.tile ** 2
        print(f"\n{n_workers} worker(s): {tiles} tiles in {wall:.1f} s = "
              f"{tiles / wall:.2f} tiles/s ({tiles / wall / n_workers:.2f} per worker); "
              f"busy {sum(info['seconds']):.1f} s of tile time")
        print(f"  voxels computed {info['voxels']:,}, owned {info['core_voxels']:,}: "
              f"overhead x{info['voxels'] / info['core_voxels']:.3f}; analytic for an "
              f"interior tile ((T + 2*16)/T)^2 = x{analytic:.3f}, mean read area / core "
              f"area x{cores.mean() / args.tile ** 2:.3f} (edge tiles read less)")
        print(f"  points read {info['points_read']:,} "
              f"(x{info['points_read'] / args.points:.3f})")
        print("  peak RSS per worker (MB): " +
              ", ".join(f"{v:.0f}" for v in rss.values()))
    if not args.skip_whole:
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                          dashboard_address=None, memory_limit=0) as cluster, \
                Client(cluster) as client:
            whole, seconds, peak = client.submit(_whole_scene, points, features,
                                                 args.voxel).result()
        diff = max(float(np.abs(out - whole).max()) for out in results.values())
        print(f"\nwhole scene in one worker: {seconds:.1f} s, peak RSS {peak:.0f} MB; "
              f"max |tiled - whole| = {diff:.2e} (float32 rounding)")


if __name__ == "__main__":
    main()
