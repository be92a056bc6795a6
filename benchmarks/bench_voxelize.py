"""Voxelization speed and peak memory: sparsegrid.pointcloud.voxelize against spconv's CPU
``PointToVoxel`` and Open3D's ``voxel_down_sample``, on the same points, in one run.

Scenes (float64 xyz at UTM-sized offsets, float32 features: intensity + rgb):

* ``drive``: a 64-beam spinning LiDAR (benchmarks/scenes.py's street: ground, facades,
  cars, poles, trees) ray-cast from sensor poses 0.5 m apart along the road, the sweeps
  accumulated in firing order (a mapping drive), 5 cm voxels: 2.1 points per voxel at 1M
  points, 5.3 at 10M, up to 200 in the voxels next to the sensor path;
* ``uniform``: uniform random points in a cube sized for 4 points per voxel on average.

Every measurement runs in a fresh subprocess (``--worker``) that loads the points from
.npy files, makes one untimed warm-up call on all of them, then times ``--repeat`` calls;
thread counts are set through the environment before NumPy, torch or Open3D load. The
tools take turns over ``--rounds`` rounds (the order reversed every other round); each
time is the median over rounds of a round's median, each ratio sparsegrid / baseline the
median over rounds of the ratio within a round, so a load that drifts during the run
(the machine is shared) moves both sides of a ratio. Memory, against the input's bytes
(points float64 + features), the largest over the rounds:

* ``traced``: tracemalloc's peak of the allocations made during one further call (NumPy
  reports its buffers to tracemalloc; spconv's and Open3D's C++ allocations are not seen);
* ``rss``: the peak resident size of the worker (``ru_maxrss``) minus its resident size
  after loading the input, before the first call: every allocation, any library.

What each baseline computes (none of them is a dependency of sparsegrid):

* ``open3d``: ``PointCloud.voxel_down_sample(voxel)``, the per-voxel mean of the points
  and of their colours (rgb as float64), in a hash map. The like-for-like of 'mean'. Its
  grid starts half a voxel below the points' minimum; one extra point half a voxel below
  sparsegrid's origin puts its voxels on sparsegrid's (that point's voxel not counted).
* ``spconv-first``: ``PointToVoxel(max_num_points_per_voxel=1, max_num_voxels=N)``:
  every voxel, with its first point in input order (the like-for-like of 'first').
* ``spconv-all``: ``PointToVoxel(max_num_points_per_voxel=<the scene's largest voxel
  count>, max_num_voxels=N)``: every point kept, gathered into the padded
  (voxels, points, 7) array (what a mean needs, without the reduction). Skipped when that
  array (twice: spconv's buffer and the clone it returns) needs more than
  ``--spconv-max-gib``.

spconv needs float32 points in a range from 0: it gets xyz minus the scene's lower corner
as float32 plus the 4 features, ``clear_voxels=False`` (its fastest setting; the padding
then keeps older values, which ``num_points`` tells apart), and the range that covers the
points. Its dense hash table (one int32 per grid cell) is allocated when PointToVoxel is
built, outside the timing. The conversions for the baselines are not timed.

The baselines run with the python of a virtual environment that has them
(``--spconv-python``, ``--open3d-python``; default: this interpreter, when it imports them;
else they are reported as skipped).

    .venv/bin/python benchmarks/bench_voxelize.py --spconv-python .venv-spconv/bin/python \\
        --open3d-python /tmp/venv-open3d/bin/python [--sizes 1000000 10000000] \\
        [--scenes drive uniform] [--threads 1 2] [--rounds 3] [--repeat 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
UTM_OFFSET = np.array([500_000.0, 4_000_000.0, 100.0])
SCENE_VOXEL = {"drive": 0.05, "uniform": 0.05}
UNIFORM_POINTS_PER_VOXEL = 4.0
FEATURE_CHANNELS = 4


# -- scenes ---------------------------------------------------------------------------------
def lidar_drive(n, seed=0):
    """``n`` LiDAR returns of a drive down benchmarks/scenes.py's street, (n, 3) float64.

    Sweep k: the 64-beam rays of :func:`scenes.lidar_rays` turned by a random phase (a
    spinning sensor is not synchronised with the drive) from (-25 + 0.5 k, ~0, 1.8) m,
    ray-cast against one street layout, 2 cm range noise, returns beyond 70 m dropped.
    """
    sys.path.insert(0, HERE)
    import scenes
    rng = np.random.default_rng(seed)
    layout = scenes.street_layout(rng)
    rays = scenes.lidar_rays()
    parts, total, k = [], 0, 0
    while total < n:
        phase = rng.uniform(0.0, 2.0 * np.pi)
        c, s = np.cos(phase), np.sin(phase)
        dirs = rays @ np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
        origin = np.array([-25.0 + 0.5 * k, rng.normal(0.0, 0.1), scenes.SENSOR_HEIGHT])
        t = scenes.raycast(origin, dirs, layout)
        keep = t <= scenes.MAX_RANGE
        t = t[keep] + rng.normal(0.0, scenes.RANGE_NOISE, int(keep.sum()))
        parts.append(origin + t[:, None] * dirs[keep])
        total += len(parts[-1])
        k += 1
    return np.concatenate(parts)[:n] + UTM_OFFSET


def uniform_cube(n, voxel, seed=0):
    """``n`` uniform random points in a cube of ``UNIFORM_POINTS_PER_VOXEL`` per voxel."""
    rng = np.random.default_rng(seed)
    side = voxel * (n / UNIFORM_POINTS_PER_VOXEL) ** (1.0 / 3.0)
    return rng.uniform(0.0, side, (n, 3)) + UTM_OFFSET


def scene_files(workdir, scene, n):
    """(points.npy, features.npy) of a scene, generated once per workdir."""
    base = os.path.join(workdir, f"{scene}_{n}")
    paths = (base + "_points.npy", base + "_features.npy")
    if all(os.path.exists(p) for p in paths):
        return paths
    start = time.perf_counter()
    voxel = SCENE_VOXEL[scene]
    points = lidar_drive(n) if scene == "drive" else uniform_cube(n, voxel)
    rng = np.random.default_rng(1)
    features = rng.random((n, FEATURE_CHANNELS), dtype=np.float32)
    np.save(paths[0], points)
    np.save(paths[1], features)
    print(f"# generated {scene} with {n:,} points in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    return paths


# -- workers (run in a fresh subprocess each) -----------------------------------------------
def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(call, repeat, traced=True):
    """Warm-up call, ``repeat`` timed calls, then one traced call: a result dict. The
    resident size is taken before the warm-up: memory a library keeps after a call (its
    allocator's free lists) still counts once."""
    import resource
    import tracemalloc
    rss_before = _rss_bytes()
    call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"times": times, "rss": max(0, rss_peak - rss_before)}
    if traced:
        tracemalloc.start()
        call()
        out["traced"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return out


def worker_sparsegrid(args, points, features):
    from sparsegrid.pointcloud import voxelize
    # the first call of the process sets up the thread pool and finds the BLAS library
    voxelize(points[:1000], args.voxel, features[:1000], args.reduce)
    result = {}

    def call():
        result["voxels"] = voxelize(points, args.voxel, features, args.reduce).tensor.n_active

    out = _measure(call, args.repeat)
    out["voxels"] = result["voxels"]
    return out


def worker_open3d(args, points, features):
    import open3d
    # Open3D's grid starts half a voxel below the points' minimum; one extra point half a
    # voxel below sparsegrid's origin puts its voxel faces on sparsegrid's (the point makes
    # one voxel of its own, subtracted from the count).
    corner = np.floor(points.min(axis=0) / args.voxel) * args.voxel - args.voxel / 2
    cloud = open3d.geometry.PointCloud(open3d.utility.Vector3dVector(
        np.concatenate([corner[None], points])))
    colors = np.concatenate([np.zeros((1, 3)), features[:, 1:4].astype(np.float64)])
    cloud.colors = open3d.utility.Vector3dVector(colors)
    result = {}

    def call():
        result["voxels"] = len(cloud.voxel_down_sample(args.voxel).points) - 1

    out = _measure(call, args.repeat, traced=False)
    out["voxels"] = result["voxels"]
    return out


def worker_spconv(args, points, features):
    import torch
    torch.set_num_threads(args.worker_threads)
    from spconv.pytorch.utils import PointToVoxel
    low = np.floor(points.min(axis=0) / args.voxel) * args.voxel
    local = points - low
    high = local.max(axis=0) + args.voxel
    pc = torch.from_numpy(np.concatenate([local.astype(np.float32), features], axis=1))
    n, channels = pc.shape

    def make(per_voxel):
        return PointToVoxel(vsize_xyz=[args.voxel] * 3,
                            coors_range_xyz=[0.0, 0.0, 0.0] + [float(h) for h in high],
                            num_point_features=int(channels), max_num_voxels=int(n),
                            max_num_points_per_voxel=int(per_voxel))

    first = make(1)
    _, indices, _, voxel_id = first.generate_voxel_with_id(pc, clear_voxels=False)
    n_voxels = len(indices)
    largest = int(torch.bincount(voxel_id[voxel_id >= 0]).max())
    kept = int((voxel_id >= 0).sum())
    if args.spconv_mode == "first":
        gen, per_voxel = first, 1
    else:
        per_voxel = largest
        need = 2 * n_voxels * per_voxel * channels * 4
        if need > args.spconv_max_gib * 2**30:
            return {"skipped": f"its padded (voxels, {per_voxel}, {channels}) float32 "
                               f"buffer and the copy it returns need {need / 2**30:.1f} GiB "
                               f"> --spconv-max-gib {args.spconv_max_gib}"}
        del first
        gen = make(per_voxel)

    def call():
        voxels, _, num_points = gen(pc, clear_voxels=False)
        return voxels, num_points

    out = _measure(call, args.repeat, traced=False)
    out.update(voxels=n_voxels, per_voxel=per_voxel, largest=largest, points_kept=kept)
    return out


def run_worker(args):
    points = np.load(args.points)
    features = np.load(args.features)
    fn = {"sparsegrid": worker_sparsegrid, "open3d": worker_open3d,
          "spconv": worker_spconv}[args.worker]
    out = fn(args, points, features)
    out["input_bytes"] = points.nbytes + features.nbytes
    print("RESULT " + json.dumps(out))


# -- driver -----------------------------------------------------------------------------------
from timing import thread_env  # noqa: E402


def spawn(python, tool, paths, voxel, reduce, threads, args, extra=()):
    command = [python, os.path.abspath(__file__), "--worker", tool, "--points", paths[0],
               "--features", paths[1], "--voxel", str(voxel), "--reduce", reduce,
               "--worker-threads", str(threads), "--repeat", str(args.repeat),
               "--spconv-max-gib", str(args.spconv_max_gib), *extra]
    env = thread_env(threads)
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"skipped": f"{tool} failed (exit {proc.returncode}): " + " | ".join(tail)}


def imports(python, module):
    if not python:
        return False
    try:
        proc = subprocess.run([python, "-c", f"import {module}"], capture_output=True)
    except OSError:   # no such interpreter
        return False
    return proc.returncode == 0


def median_ms(result):
    return float(np.median(result["times"])) * 1e3


def measure_group(scene, n, threads, paths, args, tools):
    """``rounds`` rounds over every tool, alternating their order; per tool the per-round
    medians and, for sparsegrid, the ratio to each baseline within each round."""
    voxel = SCENE_VOXEL[scene]
    runs = {what: [] for what, _ in tools}
    for round_ in range(args.rounds):
        for what, command in (tools if round_ % 2 == 0 else tools[::-1]):
            python, tool, reduce, extra = command
            runs[what].append(spawn(python, tool, paths, voxel, reduce, threads, args, extra))
    out = {}
    for what, results in runs.items():
        done = [r for r in results if "times" in r]
        if not done:
            out[what] = results[0]
            continue
        record = dict(done[0])
        record["round_ms"] = [median_ms(r) for r in results if "times" in r]
        record["median_ms"] = float(np.median(record["round_ms"]))
        record["traced"] = max((r["traced"] for r in done if "traced" in r), default=None)
        record["rss"] = max(r["rss"] for r in done)
        record.pop("times")
        out[what] = record
    for what in out:
        if not what.startswith("sparsegrid") or "median_ms" not in out[what]:
            continue
        ratios = {}
        for base in out:
            if base.startswith("sparsegrid") or "median_ms" not in out[base]:
                continue
            paired = [median_ms(a) / median_ms(b) for a, b in zip(runs[what], runs[base])
                      if "times" in a and "times" in b]
            ratios[base] = float(np.median(paired))
        out[what]["ratios"] = ratios
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--scenes", nargs="+", default=["drive", "uniform"],
                        choices=sorted(SCENE_VOXEL))
    parser.add_argument("--reduces", nargs="+", default=["mean", "first"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed calls per worker process (their median is the round's)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="worker processes per tool, alternating tools (median reported)")
    parser.add_argument("--spconv-python", default=sys.executable)
    parser.add_argument("--open3d-python", default=sys.executable)
    parser.add_argument("--spconv-max-gib", type=float, default=4.0)
    parser.add_argument("--workdir", help="keep the generated scenes here (default: a "
                                          "temporary folder, removed at the end)")
    parser.add_argument("--json", help="write every measurement to this file")
    # worker mode (internal)
    parser.add_argument("--worker", choices=["sparsegrid", "open3d", "spconv"])
    parser.add_argument("--points")
    parser.add_argument("--features")
    parser.add_argument("--voxel", type=float)
    parser.add_argument("--reduce", default="mean")
    parser.add_argument("--worker-threads", type=int, default=1)
    parser.add_argument("--spconv-mode", default="first", choices=["first", "all"])
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)

    tools = [(f"sparsegrid {r}", (sys.executable, "sparsegrid", r, ())) for r in args.reduces]
    if imports(args.open3d_python, "open3d"):
        tools.append(("open3d", (args.open3d_python, "open3d", "mean", ())))
    else:
        print(f"# open3d: not importable by {args.open3d_python} (pip install open3d; pass "
              "--open3d-python) -- skipped")
    if imports(args.spconv_python, "spconv.pytorch"):
        for mode in ("first", "all"):
            tools.append((f"spconv-{mode}", (args.spconv_python, "spconv", "mean",
                                             ("--spconv-mode", mode))))
    else:
        print(f"# spconv: not importable by {args.spconv_python} (pass --spconv-python) "
              "-- skipped")
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_voxelize_")
    os.makedirs(workdir, exist_ok=True)
    print(f"# {args.rounds} rounds x {args.repeat} timed calls per tool and case, each "
          "round a fresh process per tool; ratios: sparsegrid / baseline, median over rounds")
    print(f"{'scene':<8} {'points':>10} {'thr':>3} {'what':<16} {'voxels':>9} "
          f"{'median ms':>10} {'Mpts/s':>7} {'traced/in':>9} {'rss/in':>7}  ratios")
    records = []
    try:
        for scene in args.scenes:
            for n in args.sizes:
                paths = scene_files(workdir, scene, n)
                for threads in args.threads:
                    group = measure_group(scene, n, threads, paths, args, tools)
                    for what, res in group.items():
                        records.append({"scene": scene, "points": n, "voxel": SCENE_VOXEL[scene],
                                        "threads": threads, "what": what, **res})
                        head = f"{scene:<8} {n:>10,} {threads:>3} {what:<16}"
                        if "median_ms" not in res:
                            print(f"{head} skipped: {res['skipped']}", flush=True)
                            continue
                        ms = res["median_ms"]
                        traced = ("-" if res.get("traced") is None else
                                  f"{res['traced'] / res['input_bytes']:.2f}x")
                        ratios = ""
                        if res.get("ratios"):
                            fastest = max(res["ratios"], key=res["ratios"].get)
                            ratios = "  ".join(f"{v:.2f}x {k}" for k, v in res["ratios"].items())
                            ratios += (f"  (vs the fastest, {fastest}: "
                                       f"{res['ratios'][fastest]:.2f}x)")
                        print(f"{head} {res['voxels']:>9,} {ms:>10.1f} {n / ms / 1e3:>7.1f} "
                              f"{traced:>9} {res['rss'] / res['input_bytes']:>6.2f}x  {ratios}",
                              flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
