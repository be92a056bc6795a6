"""How sparsegrid's first submanifold layer scales with the number of voxels (CPU, float32).

Run::

    .venv/bin/python benchmarks/bench_scale.py                    # 1M and 4M voxels, 1 thread
    .venv/bin/python benchmarks/bench_scale.py --sizes 1000000    # one size
    .venv/bin/python benchmarks/bench_scale.py --threads 1 2 --json /tmp/scale.json

The scene is ``scenes.lidar_batch(N)``: a batch of 5 cm LiDAR sweeps (mean 3x3x3
neighbour count about 5.2), N voxels exactly, int32 (N, 4) indices. For every size (and
thread count) a fresh child process, with BLAS / OpenMP / sparsegrid thread counts set
before NumPy is imported, loads the indices, draws C = 32 float32 features and a
(27, 32, 32) weight, warms up on a tiny input (lazy imports), and then measures

(a) from raw indices: ``SparseTensor(features, indices, shape)`` (validation and index),
    ``x.grid.submanifold(x.sites, 3)`` (rulebook), ``cpu.prepare_conv(rb)`` (the CPU plan)
    and ``submanifold_conv(x, w)`` (one forward); per stage and in total;
(b) the forward alone, rulebook and plan cached.

The first (a) in the process is the memory measurement: ``/proc/self/clear_refs`` is set
to 5 just before, and the peak RSS increase is ``VmHWM - VmRSS before`` (the inputs are
resident before and not counted; the output, rulebook, plan and every temporary are).
It is divided by the input + output feature bytes (2 * N * 32 * 4). Times are medians of
``--repeat`` further runs, (a) and (b) alternating (the first run's times are printed
too, as "cold"); "spread" is (max - min) / median of those runs. Targets:
(a) / (b) <= 2, peak / feature bytes <= 3, and growth from one size to the next
proportional to N (4x from 1M to 4M).

By default glibc returns large freed blocks to the kernel (munmap), so every run of (a)
faults its temporaries in afresh; on a VM that first touch is expensive and varies.
``--malloc-retain`` sets ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the
children so freed memory stays in the heap and is reused: the difference between the two
runs is the page-fault share of each stage.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CHANNELS = 32
STAGES = ("tensor", "rulebook", "prepare_conv", "forward")


def _rss_kib(field):
    from spconv_baseline import _rss_kib as read    # importable without torch or spconv
    return read(field)


def child(path, shape, repeat):
    import numpy as np

    import sparsegrid as sg
    from sparsegrid import cpu

    from bench_conv import source_digest

    source = source_digest()
    indices = np.load(path)
    n = len(indices)
    rng = np.random.default_rng(0)
    features = rng.standard_normal((n, CHANNELS), dtype=np.float32)
    weight = (rng.standard_normal((27, CHANNELS, CHANNELS), dtype=np.float32)
              / np.float32(np.sqrt(27 * CHANNELS)))
    tiny = sg.SparseTensor(np.ones((1, CHANNELS), np.float32), np.zeros((1, 4), np.int32),
                           (1, 1, 1))
    sg.submanifold_conv(tiny, weight)

    def from_raw():
        t0 = time.perf_counter()
        x = sg.SparseTensor(features, indices, shape)
        t1 = time.perf_counter()
        rb = x.grid.submanifold(x.sites, 3)
        t2 = time.perf_counter()
        cpu.prepare_conv(rb)
        t3 = time.perf_counter()
        y = sg.submanifold_conv(x, weight)
        t4 = time.perf_counter()
        stages = dict(zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)))
        stages["total"] = t4 - t0
        return stages, x, rb, y

    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = _rss_kib("VmRSS")
    cold, x, rb, y = from_raw()
    peak = _rss_kib("VmHWM")
    pairs = int(rb.offset_ptr[-1]) if hasattr(rb, "offset_ptr") else None
    del x, rb, y

    # (a) and (b) alternate, so that a slow phase of a shared machine hits both
    x = sg.SparseTensor(features, indices, shape)
    sg.submanifold_conv(x, weight)   # rulebook and plan built and cached
    runs, b_runs = [], []
    for _ in range(repeat):
        runs.append(from_raw()[0])
        start = time.perf_counter()
        sg.submanifold_conv(x, weight)
        b_runs.append(time.perf_counter() - start)
    a = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    b = statistics.median(b_runs)
    print("JSON" + json.dumps({
        "n": n, "pairs": pairs, "threads": sg.get_num_threads(), "a": a, "a_cold": cold,
        "a_runs": [r["total"] for r in runs], "b": b, "b_runs": b_runs,
        "loadavg": os.getloadavg(), "source": source, "source_end": source_digest(),
        "peak_bytes": (peak - before) * 1024, "feature_bytes": 2 * n * CHANNELS * 4,
        "rss_before_bytes": before * 1024}))


from timing import thread_env as _thread_env  # noqa: E402


def _spread(values):
    return (max(values) - min(values)) / statistics.median(values)


def _label(n):
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1_000_000, 4_000_000])
    parser.add_argument("--threads", nargs="+", type=int, default=[1])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--malloc-retain", action="store_true",
                        help="diagnostic: children keep freed memory in glibc's heap "
                             "(MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_), so repeated "
                             "runs reuse resident pages instead of faulting in fresh ones")
    parser.add_argument("--json", help="also write the raw results to this file")
    args = parser.parse_args()

    sys.path.insert(0, HERE)
    import numpy as np

    import scenes

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            start = time.perf_counter()
            indices, shape = scenes.lidar_batch(size)
            generated = time.perf_counter() - start
            path = os.path.join(tmp, f"indices_{size}.npy")
            np.save(path, indices)
            batches = int(indices[:, 0].max()) + 1
            del indices
            for n in args.threads:
                code = (f"import sys; sys.path.insert(0, {HERE!r}); import bench_scale as b; "
                        f"b.child({path!r}, {tuple(shape)!r}, {args.repeat})")
                env = _thread_env(n)
                if args.malloc_retain:
                    env.update(MALLOC_MMAP_THRESHOLD_=str(2 ** 32), MALLOC_TRIM_THRESHOLD_=str(2 ** 33))
                out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                     text=True, env=env)
                if out.returncode:
                    sys.stderr.write(out.stderr)
                    return out.returncode
                r = json.loads(out.stdout.split("JSON", 1)[1])
                r.update(batches=batches, shape=list(shape), generate_s=generated,
                         malloc_retain=args.malloc_retain)
                results[(size, n)] = r
                print_one(size, n, r, args.repeat)
            os.remove(path)
    sources = {r[k] for r in results.values() for k in ("source", "source_end")}
    print(f"\nsparsegrid source {', '.join(sorted(sources))}")
    if len(sources) > 1:
        print("WARNING: sparsegrid's source changed during the run; sizes may have run "
              "different code")
    print_growth(results, args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args),
                       "results": {f"{s}@{n}T": r for (s, n), r in results.items()}}, fh,
                      indent=1)
    return 0


def print_one(size, n, r, repeat):
    if r.get("malloc_retain"):
        print("\n(glibc keeps freed memory: --malloc-retain)", end="")
    mib = 2 ** 20
    a, cold = r["a"], r["a_cold"]
    pairs = f", {r['pairs']:,} pairs ({r['pairs'] / r['n']:.2f} per site)" if r["pairs"] else ""
    print(f"\nN = {r['n']:,} ({_label(size)}), {r['batches']} samples of {tuple(r['shape'])}"
          f"{pairs}; C = {CHANNELS} float32; {n} thread(s); median of {repeat}")
    print(f"  {'stage of (a)':<26}{'median ms':>10}{'cold ms':>9}{'share':>7}")
    for k in STAGES:
        print(f"  {k:<26}{a[k] * 1e3:10.1f}{cold[k] * 1e3:9.1f}{a[k] / a['total']:7.0%}")
    print(f"  {'(a) rulebook+plan+forward':<26}{a['total'] * 1e3:10.1f}{cold['total'] * 1e3:9.1f}")
    print(f"  {'(b) cached forward':<26}{r['b'] * 1e3:10.1f}")
    print(f"  (a) / (b) = {a['total'] / r['b']:.2f}   (target <= 2); spread of (a) "
          f"{_spread(r['a_runs']):.0%}, of (b) {_spread(r['b_runs']):.0%}")
    print(f"  peak RSS increase during (a): {r['peak_bytes'] / mib:.0f} MiB; input + output "
          f"features {r['feature_bytes'] / mib:.0f} MiB; ratio {r['peak_bytes'] / r['feature_bytes']:.2f}"
          f"   (target <= 3)")
    print(f"  load average at the end (1, 5, 15 min): "
          f"{', '.join(f'{v:.2f}' for v in r['loadavg'])} on {os.cpu_count()} cores")


def print_growth(results, args):
    sizes = sorted(args.sizes)
    for n in args.threads:
        for s0, s1 in zip(sizes, sizes[1:]):
            r0, r1 = results[(s0, n)], results[(s1, n)]
            print(f"\ngrowth {_label(s0)} -> {_label(s1)} ({s1 / s0:g}x voxels), {n} thread(s):")
            for label, key in (("(a) rulebook+plan+forward", lambda r: r["a"]["total"]),
                               ("(b) cached forward", lambda r: r["b"]),
                               ("peak RSS increase", lambda r: r["peak_bytes"]),
                               *((f"    stage {k}", (lambda k: lambda r: r["a"][k])(k))
                                 for k in STAGES)):
                print(f"  {label:<28}{key(r1) / key(r0):6.2f}x")


if __name__ == "__main__":
    sys.exit(main())
