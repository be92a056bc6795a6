"""The input layer's merge of repeated sites: old (np.unique + reduceat) against new
(``unique_inverse`` + the compiled-pass ``segment_reduce``), on LiDAR rows.

Run::

    .venv/bin/python benchmarks/bench_input_layer.py             # full table
    .venv/bin/python benchmarks/bench_input_layer.py --repeat 3  # quicker

Rows come from the street scene of ``benchmarks/scenes.py`` at 5 cm, before voxelisation,
in firing order (so the site keys are unsorted, as an input layer receives them):

  lidar 90k      the first 90,000 returns of one sweep (some repeat a voxel)
  lidar 240k     240,000 returns of three sweeps of the same street with independent
                 range noise (most voxels are hit 2-3 times)
  distinct 92k   the scene's 92k distinct voxels in a random order (no duplicates)
  distinct sorted  the same voxels in key order (segment ids = 0..N-1)

Each configuration times, median of ``--repeat`` runs after a warm-up (old and new runs
alternate):

  old   ``np.unique(keys, return_index=True, return_inverse=True)`` followed by the
        previous ``segment_reduce`` (``np.add / np.maximum / np.minimum.reduceat``),
        copied below verbatim as the baseline;
  new   ``sparsegrid.cpu.index.unique_inverse`` followed by
        ``sparsegrid.cpu.segment.segment_reduce``.

Both include the unique step (mode-independent; its own times are in the first table).
The new outputs are checked against the old ones (equal, up to float rounding of sums).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import scenes  # noqa: E402
from sparsegrid.cpu.index import unique_inverse  # noqa: E402
from sparsegrid.cpu.segment import segment_reduce  # noqa: E402

MODES = ("sum", "mean", "max", "first", "last")
CHANNELS = (1, 4, 32)


# --- BASELINE: the previous sparsegrid/cpu/segment.py segment_reduce, verbatim ---------------

def _old_group(segment_ids, n_segments):
    """Stable grouping: (order or None, starts, nonempty segment ids, counts per segment)."""
    ids = np.asarray(segment_ids, np.int64)
    counts = np.bincount(ids, minlength=n_segments) if len(ids) else np.zeros(n_segments, np.int64)
    order = None
    if len(ids) > 1 and not bool(np.all(ids[1:] >= ids[:-1])):
        order = np.argsort(ids, kind="stable")
    nonempty = np.flatnonzero(counts)
    ends = np.cumsum(counts)
    starts = (ends - counts)[nonempty]
    return order, starts, nonempty, counts


def old_segment_reduce(values, segment_ids, n_segments, mode):
    order, starts, nonempty, counts = _old_group(segment_ids, n_segments)
    out = np.zeros((n_segments, values.shape[1]), values.dtype)
    chosen = None
    if len(nonempty) == 0:
        if mode == "max":
            chosen = np.full((n_segments, values.shape[1]), -1, np.int64)
        elif mode in ("first", "last"):
            chosen = np.full(n_segments, -1, np.int64)
        return out, chosen
    rows = np.arange(len(values)) if order is None else order
    if mode in ("first", "last"):
        pick = starts if mode == "first" else starts + counts[nonempty] - 1
        chosen = np.full(n_segments, -1, np.int64)
        chosen[nonempty] = rows[pick]
        out[nonempty] = values[chosen[nonempty]]
        return out, chosen
    grouped = values if order is None else values[order]
    if mode == "max":
        best = np.maximum.reduceat(grouped, starts, axis=0)
        out[nonempty] = best
        segment_of_row = np.repeat(np.arange(len(nonempty)), counts[nonempty])
        position = np.where(grouped == best[segment_of_row], np.arange(len(values))[:, None],
                            len(values))
        chosen = np.full((n_segments, values.shape[1]), -1, np.int64)
        chosen[nonempty] = rows[np.minimum.reduceat(position, starts, axis=0)]
        return out, chosen
    total = np.add.reduceat(grouped, starts, axis=0)
    if mode == "mean":
        total /= counts[nonempty, None].astype(values.dtype)
    out[nonempty] = total
    return out, chosen


def old_unique(keys):
    unique_keys, first_rows, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return unique_keys, first_rows, inverse.reshape(-1)

# --- end of baseline --------------------------------------------------------------------------


def street_points(n_sweeps, seed=0):
    """Returns of ``n_sweeps`` sweeps of one street (layout of ``seed``), in firing order."""
    rng = np.random.default_rng(seed)
    layout = scenes.street_layout(rng)
    origin = np.array([0.0, 0.0, scenes.SENSOR_HEIGHT])
    dirs = scenes.lidar_rays()
    t = scenes.raycast(origin, dirs, layout)
    keep = t <= scenes.MAX_RANGE
    sweeps = []
    for sweep in range(n_sweeps):
        noise = rng if sweep == 0 else np.random.default_rng([seed, sweep])
        r = t[keep] + noise.normal(0.0, scenes.RANGE_NOISE, size=int(keep.sum()))
        sweeps.append(origin + r[:, None] * dirs[keep])
    return np.concatenate(sweeps)


def point_keys(points, voxel_size=0.05):
    """Packed int64 voxel keys (last axis fastest) of the points inside the street grid."""
    lower = np.asarray(scenes.STREET_LOWER)
    shape = np.round((np.asarray(scenes.STREET_UPPER) - lower) / voxel_size).astype(np.int64)
    coords = np.floor((points - lower) / voxel_size).astype(np.int64)
    coords = coords[np.all((coords >= 0) & (coords < shape), axis=1)]
    return (coords[:, 0] * shape[1] + coords[:, 1]) * shape[2] + coords[:, 2]


def voxel_keys(indices, spatial_shape):
    x, y, z = (indices[:, 1 + d].astype(np.int64) for d in range(3))
    return (x * spatial_shape[1] + y) * spatial_shape[2] + z


def workloads():
    one = point_keys(street_points(1))[:90_000]
    three = point_keys(street_points(3))[:240_000]
    indices, shape = scenes.lidar_street(voxel_size=0.05)
    voxels = voxel_keys(indices, shape)
    shuffled = voxels[np.random.default_rng(1).permutation(len(voxels))]
    return [("lidar 90k", one), ("lidar 240k", three), ("distinct 92k", shuffled),
            ("distinct sorted", voxels)]


def median_ms(fns, repeat):
    """Median ms of each function; the runs alternate, so load changes hit all alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [1e3 * float(np.median(t)) for t in times]


def check_same(old, new, mode):
    (out_old, chosen_old), (out_new, chosen_new) = old, new
    if mode in ("sum", "mean"):
        np.testing.assert_allclose(out_new, out_old, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(out_new, out_old)
        np.testing.assert_array_equal(chosen_new, chosen_old)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cases = workloads()

    print("unique step (keys -> unique_keys, first_rows, inverse)")
    print(f"{'rows':<16} {'N':>8} {'sites':>8} {'old ms':>8} {'new ms':>8} {'new/old':>8}")
    prepared = []
    for name, keys in cases:
        u_old, u_new = old_unique(keys), unique_inverse(keys)
        for a, b in zip(u_old, u_new):
            np.testing.assert_array_equal(a, b)
        t_old, t_new = median_ms([lambda: old_unique(keys), lambda: unique_inverse(keys)],
                                 args.repeat)
        print(f"{name:<16} {len(keys):>8} {len(u_new[0]):>8} {t_old:>8.2f} {t_new:>8.2f} "
              f"{t_new / t_old:>8.2f}")
        prepared.append((name, keys, len(u_new[0])))

    print()
    print("unique + segment_reduce, float32 (ms, median of", args.repeat, "runs)")
    print(f"{'rows':<16} {'N':>8} {'sites':>8} {'C':>3} {'mode':<6} {'old ms':>8} "
          f"{'new ms':>8} {'new/old':>8}")
    for name, keys, n_sites in prepared:
        for channels in CHANNELS:
            values = rng.standard_normal((len(keys), channels)).astype(np.float32)
            for mode in MODES:
                def old():
                    _, _, inverse = old_unique(keys)
                    return old_segment_reduce(values, inverse, n_sites, mode)

                def new():
                    _, _, inverse = unique_inverse(keys)
                    return segment_reduce(values, inverse, n_sites, mode)

                check_same(old(), new(), mode)
                t_old, t_new = median_ms([old, new], args.repeat)
                print(f"{name:<16} {len(keys):>8} {n_sites:>8} {channels:>3} {mode:<6} "
                      f"{t_old:>8.2f} {t_new:>8.2f} {t_new / t_old:>8.2f}")


if __name__ == "__main__":
    main()
