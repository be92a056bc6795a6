"""Sparse convolution on the CPU: sparsegrid against spconv 2.3.8, same scenes, same process.

Run (spconv optional; without it only sparsegrid's times are printed)::

    .venv-spconv/bin/python benchmarks/bench_conv.py             # full table, 1 and 2 threads
    .venv-spconv/bin/python benchmarks/bench_conv.py --quick     # fewer repeats, one scene
    .venv-spconv/bin/python benchmarks/bench_conv.py --rounds 3 --json /tmp/bench.json
    python benchmarks/bench_conv.py --device cuda                  # the GPU (bench_conv_cuda.py)

Each thread count runs in a fresh child process whose BLAS / OpenMP / torch / sparsegrid
thread counts are set (environment variables, then ``torch.set_num_threads``) before NumPy
is imported. Times are medians of ``--repeat`` runs after a warm-up. With ``--rounds R``
the child repeats the whole measurement R times, each round timing sparsegrid and then
spconv on each scene (so slow phases of a noisy machine hit both), and reports for every
row the median over the rounds of the per-round medians; "spread" is (max - min) / median
of sparsegrid's per-round times. spconv runs only in the 1-thread child (its CPU kernels
give wrong results with more torch threads). Ratios are sparsegrid / spconv (below 1 means
sparsegrid is faster); the "vs" column names the spconv row each sparsegrid row is compared
with, and "target" the ratio aimed for where there is one. The child also hashes
sparsegrid's outputs so the parent can check that 1 and 2 threads give identical bits, and
compares sparsegrid's submanifold output with spconv's on the real scene.

Rows (3-D, float32; every scene's voxels are distinct, sorted by (batch, x, y, z)):
  rulebook            build the submanifold 3x3x3 rulebook from raw indices (SparseTensor:
                      validation and index; grid.submanifold: neighbour search); spconv:
                      get_indice_pairs as SubMConv3d calls it
  rulebook+plan       the same plus cpu.prepare_conv of the rulebook and of its transpose
                      (the CPU backend's private GEMM plan, built once per rulebook and
                      reused by every layer at that resolution); vs spconv's rulebook
  input <mode>        sg.input_layer(indices, features, shape, mode) on the scene's sites,
                      C = --input-channels (32), for modes unique (0), first, last, sum,
                      mean, max; vs spconv's rulebook, target <= 0.25
  input sum shuffled  mode 'sum' on the same rows in a fixed random order (as a point
                      loader delivers them); vs spconv's rulebook
  nn.InputLayer 0     sparsegrid.nn.InputLayer(3, shape, 0) on [coords, features] in SCN form
                      (coordinates, then the batch index last); vs spconv's rulebook
  tensor+rule+fwd C32 SparseTensor(features, indices) + submanifold_conv C=32 -> 32 (rulebook,
                      plan and one forward from raw indices); vs spconv's SubMConv3d forward
                      on a fresh SparseConvTensor (rulebook + forward), target <= 1.0
  input+rule+fwd C32  the same through sg.input_layer(mode 'unique') instead of the
                      SparseTensor constructor; same spconv row, target <= 1.0
  subm fwd Cn         SubMConv3d(n, n, 3) forward, rulebook and plan cached
  subm f+b Cn         forward + cpu.conv_backward(g, f, w, rb) (feature and weight gradients),
                      rulebook and plans cached
  k2s2/k3s2 rulebook  the strided rulebook and its output sites, from scratch
  k2s2 / k3s2 C32     strided convolution C=32 -> 32, rulebook cached
  inv k2s2/k3s2 C32   the transposed convolution back onto the finer sites, rulebook cached
  peak MiB ...        peak extra resident memory (VmHWM after clear_refs) of rulebook + plan +
                      one forward (C=32) from raw indices, fresh 1-thread process: through the
                      SparseTensor constructor and through input_layer; spconv: SubMConv3d
                      forward on a fresh SparseConvTensor
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import timing  # noqa: E402  (benchmarks/timing.py: this script's folder is on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))

INPUT_MODES = ("unique", "first", "last", "sum", "mean", "max")

# sparsegrid row -> (spconv row it is compared with, target ratio or None)
REFERENCE = {
    "rulebook": ("rulebook", None),
    "rulebook+plan": ("rulebook", None),
    **{f"input {m}": ("rulebook", 0.25) for m in INPUT_MODES},
    "input sum shuffled": ("rulebook", 0.25),
    "nn.InputLayer 0": ("rulebook", 0.25),
    "tensor+rule+fwd C32": ("rulebook+subm fwd C32", 1.0),
    "input+rule+fwd C32": ("rulebook+subm fwd C32", 1.0),
}
SHORT = {"rulebook": "rulebook", "rulebook+subm fwd C32": "rb+fwd C32"}


def median_time(fn, repeat):
    """Median seconds of ``fn()`` over ``repeat`` runs after one warm-up."""
    return timing.median_ms(fn, repeat) / 1e3


def digest(*arrays):
    import numpy as np

    h = hashlib.sha1()
    for a in arrays:
        if not isinstance(a, np.ndarray):   # an autodiff Tensor (nn layers return those)
            a = a.data
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:12]


def fit_shape(shape, kernel, stride=2):
    """The smallest sizes >= shape that a (kernel, stride) convolution divides exactly."""
    return tuple(s + (-(s - kernel)) % stride for s in shape)


def sparsegrid_rows(indices, shape, repeat, channels_list, input_channels):
    """Timings (seconds) and output digests of sparsegrid on one scene."""
    import numpy as np

    import sparsegrid as sg
    import sparsegrid.nn as sgnn
    from sparsegrid import cpu

    rng = np.random.default_rng(0)
    times, digests = {}, {}

    def fresh(features):
        return sg.SparseTensor(features, indices, shape)

    def rulebook():
        x = fresh(ones)
        return x.grid.submanifold(x.sites, 3)

    def rulebook_plan():
        rb = rulebook()
        cpu.prepare_conv(rb)
        cpu.prepare_conv(rb.transpose())
        return rb

    ones = np.ones((len(indices), 1), np.float32)
    times["rulebook"] = median_time(rulebook, repeat)
    times["rulebook+plan"] = median_time(rulebook_plan, repeat)

    # input layer: raw batch-first rows -> SparseTensor (the scenes' sites are distinct)
    f_in = rng.standard_normal((len(indices), input_channels)).astype(np.float32)
    for mode in INPUT_MODES:
        times[f"input {mode}"] = median_time(
            lambda: sg.input_layer(indices, f_in, shape, mode=mode), repeat)
        t, _ = sg.input_layer(indices, f_in, shape, mode=mode)
        digests[f"input {mode}"] = digest(t.features, t.indices)
    perm = np.random.default_rng(1).permutation(len(indices))
    shuffled, f_shuffled = np.ascontiguousarray(indices[perm]), np.ascontiguousarray(f_in[perm])
    times["input sum shuffled"] = median_time(
        lambda: sg.input_layer(shuffled, f_shuffled, shape, mode="sum"), repeat)
    t, _ = sg.input_layer(shuffled, f_shuffled, shape, mode="sum")
    digests["input sum shuffled"] = digest(t.features, t.indices)
    scn_coords = np.ascontiguousarray(np.concatenate([indices[:, 1:], indices[:, :1]], axis=1))
    layer = sgnn.InputLayer(3, shape, 0)
    times["nn.InputLayer 0"] = median_time(lambda: layer([scn_coords, f_in]), repeat)
    t = layer([scn_coords, f_in])
    digests["nn.InputLayer 0"] = digest(t.features, t.indices)

    # from raw indices to the first submanifold layer's output, C = 32
    f32 = rng.standard_normal((len(indices), 32)).astype(np.float32)
    w32 = (rng.standard_normal((27, 32, 32)) / np.sqrt(27 * 32)).astype(np.float32)
    times["tensor+rule+fwd C32"] = median_time(
        lambda: sg.submanifold_conv(fresh(f32), w32), repeat)

    def input_rule_forward():
        t, _ = sg.input_layer(indices, f32, shape, mode="unique")
        return sg.submanifold_conv(t, w32)

    times["input+rule+fwd C32"] = median_time(input_rule_forward, repeat)
    digests["tensor+rule+fwd C32"] = digest(sg.submanifold_conv(fresh(f32), w32).features)
    digests["input+rule+fwd C32"] = digest(input_rule_forward().features)

    for c in channels_list:
        f = rng.standard_normal((len(indices), c)).astype(np.float32)
        w = (rng.standard_normal((27, c, c)) / np.sqrt(27 * c)).astype(np.float32)
        g = rng.standard_normal((len(indices), c)).astype(np.float32)
        x = fresh(f)
        rb = x.grid.submanifold(x.sites, 3)
        cpu.prepare_conv(rb)   # built once, as the first layer of a network would
        cpu.prepare_conv(rb.transpose())
        times[f"subm fwd C{c}"] = median_time(lambda: sg.submanifold_conv(x, w), repeat)

        def forward_backward():
            y = sg.submanifold_conv(x, w)
            return y, cpu.conv_backward(g, f, w, rb)

        times[f"subm f+b C{c}"] = median_time(forward_backward, repeat)
        y, (gf, gw) = forward_backward()
        digests[f"subm C{c}"] = digest(y.features, gf, gw)
        if c == 32:
            digests["subm_output"] = (f, w, y.features)

    c = 32
    for k in (2, 3):
        s = fit_shape(shape, k)
        f = rng.standard_normal((len(indices), c)).astype(np.float32)
        w = (rng.standard_normal((k ** 3, c, c)) / np.sqrt(k ** 3 * c)).astype(np.float32)
        times[f"k{k}s2 rulebook"] = median_time(
            lambda: (lambda t: t.grid.strided(t.sites, k, 2))(sg.SparseTensor(ones, indices, s)),
            repeat)
        x = sg.SparseTensor(f, indices, s)
        coarse = sg.conv(x, w, None, k, 2)
        times[f"k{k}s2 C32"] = median_time(lambda: sg.conv(x, w, None, k, 2), repeat)
        times[f"inv k{k}s2 C32"] = median_time(lambda: sg.deconv(coarse, w, None, k, 2), repeat)
        digests[f"k{k}s2"] = digest(coarse.features, sg.deconv(coarse, w, None, k, 2).features)
    return times, digests


def spconv_rows(indices, shape, repeat, channels_list):
    import spconv_baseline as sb

    times = {"rulebook": sb.time_rulebook(indices, shape, repeat),
             "rulebook+subm fwd C32": sb.time_subm_rulebook_forward(indices, shape, 32, repeat)}
    for c in channels_list:
        times[f"subm fwd C{c}"] = sb.time_subm_forward(indices, shape, c, repeat)
        times[f"subm f+b C{c}"] = sb.time_subm_forward_backward(indices, shape, c, repeat)
    for k in (2, 3):
        s = fit_shape(shape, k)
        times[f"k{k}s2 rulebook"] = sb.time_strided_rulebook(indices, s, k, 2, repeat)
        times[f"k{k}s2 C32"] = sb.time_strided_forward(indices, s, 32, k, 2, repeat)
        times[f"inv k{k}s2 C32"] = sb.time_inverse_forward(indices, s, 32, k, 2, repeat)
    return times


def memory_child(path, shape, channels, via="tensor"):
    """Peak extra RSS of rulebook + plan + one forward from raw indices (same method as
    spconv_baseline: VmHWM after clear_refs, minus VmRSS before)."""
    import numpy as np

    import sparsegrid as sg
    from spconv_baseline import _rss_kib

    indices = np.load(path)
    # load the modules the kernels import lazily (scipy.sparse) before the measurement
    tiny = sg.SparseTensor(np.ones((1, channels), np.float32), np.zeros((1, 4), np.int32),
                           (1, 1, 1))
    sg.submanifold_conv(tiny, np.zeros((27, channels, channels), np.float32))
    sg.input_layer(np.zeros((1, 4), np.int32), np.ones((1, channels), np.float32), (1, 1, 1),
                   mode="unique")
    features = np.random.default_rng(0).standard_normal((len(indices), channels)).astype(np.float32)
    weight = np.zeros((27, channels, channels), np.float32)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = _rss_kib("VmRSS")
    if via == "input":
        x, _ = sg.input_layer(indices, features, shape, mode="unique")
    else:
        x = sg.SparseTensor(features, indices, shape)
    out = sg.submanifold_conv(x, weight)
    peak = _rss_kib("VmHWM")
    del out
    print(json.dumps({"peak_bytes": (peak - before) * 1024}))


def peak_memory(indices, shape, channels, spconv):
    env = _thread_env(1)
    import numpy as np

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "indices.npy")
        np.save(path, indices)
        for via in ("tensor", "input"):
            ours = subprocess.run(
                [sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r}); "
                 f"import bench_conv as b; "
                 f"b.memory_child({path!r}, {tuple(shape)!r}, {channels}, {via!r})"],
                capture_output=True, text=True, check=True, env=env)
            result[via] = int(json.loads(ours.stdout.splitlines()[-1])["peak_bytes"])
    if spconv:
        import spconv_baseline as sb
        result["spconv"] = sb.peak_memory_rulebook_forward(indices, shape, channels)
    return result


def source_digest():
    """Hash of sparsegrid's source files: other people edit them while benchmarks run."""
    import sparsegrid

    root = os.path.dirname(os.path.abspath(sparsegrid.__file__))
    h = hashlib.sha1()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                h.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()[:12]


def _blas_info():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return [f"{i.get('internal_api')} {i.get('num_threads')}" for i in threadpool_info()]


def child(args):
    sys.path.insert(0, HERE)
    import numpy as np

    import scenes
    import spconv_baseline as sb

    import sparsegrid as sg

    have_spconv = args.threads == 1 and not args.no_spconv and sb.available()
    if have_spconv:
        sb.set_threads(1)
    report = {"_threads": {"sparsegrid": sg.get_num_threads(), "blas": _blas_info()},
              "_loadavg_start": os.getloadavg(), "_source_start": source_digest()}
    data = {name: scenes.scene(name) for name in args.scenes}
    rounds = {name: {"ours": [], "spconv": [], "digests": []} for name in args.scenes}
    outputs = {}
    for r in range(args.rounds):
        for name, (indices, shape) in data.items():
            ours, digests = sparsegrid_rows(indices, shape, args.repeat, args.channels,
                                            args.input_channels)
            outputs[name] = digests.pop("subm_output")
            rounds[name]["ours"].append(ours)
            rounds[name]["digests"].append(digests)
            if have_spconv:
                rounds[name]["spconv"].append(spconv_rows(indices, shape, args.repeat,
                                                          args.channels))
            print(f"round {r + 1}/{args.rounds} {name} done", file=sys.stderr, flush=True)

    def median_rows(per_round):
        return {row: statistics.median(t[row] for t in per_round) for row in per_round[0]}

    for name, (indices, shape) in data.items():
        per = rounds[name]
        entry = {"n": len(indices), "ours": median_rows(per["ours"]),
                 "ours_rounds": per["ours"], "digests": per["digests"][0],
                 "digests_stable_across_rounds": all(d == per["digests"][0]
                                                     for d in per["digests"])}
        if have_spconv:
            entry["spconv"] = median_rows(per["spconv"])
            entry["spconv_rounds"] = per["spconv"]
            f, w, y = outputs[name]
            reference = sb.subm_forward_output(indices, shape, f, w)
            entry["max_abs_diff_vs_spconv"] = float(np.abs(reference - y).max())
        if args.threads == 1 and not args.no_memory:
            entry["memory"] = peak_memory(indices, shape, 32, have_spconv)
        report[name] = entry
    report["_loadavg_end"] = os.getloadavg()
    report["_source_end"] = source_digest()
    print("JSON" + json.dumps(report))


_thread_env = timing.thread_env


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", nargs="+", default=["lidar_5cm", "lidar_10cm", "room_2cm"],
                        help="names of scenes.SCENES, or scaled_1m / scaled_4m / scaled_<N>")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--channels", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--input-channels", type=int, default=32,
                        help="feature channels of the input-layer rows")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the whole measurement, alternating sparsegrid and "
                             "spconv, and report the median over rounds")
    parser.add_argument("--quick", action="store_true", help="one scene, 3 repeats, 1 round")
    parser.add_argument("--no-spconv", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory rows")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: the GPU benchmark (bench_conv_cuda.py)")
    args, unknown = parser.parse_known_args()
    if args.device == "cuda":
        import bench_conv_cuda
        forward = ["--scenes", *args.scenes] if "--scenes" in sys.argv else []
        forward += ["--json", args.json] if args.json else []
        return bench_conv_cuda.main(forward + unknown)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.quick:
        args.scenes, args.repeat, args.rounds = args.scenes[:1], 3, 1
    if args.child:
        args.threads = int(os.environ.get("SPARSEGRID_NUM_THREADS", "1"))
        return child(args)

    results = {}
    for n in args.threads:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--repeat",
               str(args.repeat), "--rounds", str(args.rounds), "--scenes", *args.scenes,
               "--channels", *map(str, args.channels), "--input-channels",
               str(args.input_channels)]
        if args.no_spconv:
            cmd.append("--no-spconv")
        if args.no_memory:
            cmd.append("--no-memory")
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=_thread_env(n))
        if out.returncode:
            sys.stderr.write(out.stderr)
            return out.returncode
        results[n] = json.loads(out.stdout.split("JSON", 1)[1])
        results[n]["_wall_s"] = time.perf_counter() - start
    print_report(results, args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)
    return 0


def print_report(results, args):
    import platform

    base = results[args.threads[0]]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"median of {args.repeat}, median over {args.rounds} round(s); times in ms; "
          f"ratio = sparsegrid / spconv (1 thread)")
    for n in args.threads:
        t = results[n]["_threads"]
        load = "/".join(f"{results[n][k][0]:.1f}" for k in ("_loadavg_start", "_loadavg_end"))
        print(f"child {n}T: sparsegrid threads {t['sparsegrid']}, BLAS {t['blas']}, "
              f"{results[n]['_wall_s']:.0f} s, 1-min load average start/end {load}, "
              f"sparsegrid source {results[n]['_source_start']}")
    sources = {results[n][k] for n in args.threads for k in ("_source_start", "_source_end")}
    if len(sources) > 1:
        print("WARNING: sparsegrid's source changed during the run (children or rounds may "
              "have run different code): " + ", ".join(
                  f"{n}T {results[n]['_source_start']}->{results[n]['_source_end']}"
                  for n in args.threads))
    for name in args.scenes:
        entry = base[name]
        print(f"\n{name}: N = {entry['n']:,}")
        header = (f"{'row':<21}{'sparsegrid':>11}{'spread':>7}{'vs':>12}{'spconv':>9}"
                  f"{'ratio':>7}{'target':>7}")
        extra = list(args.threads[1:])
        for n in extra:
            header += f"{f'sg {n}T':>9}{'speed-up':>9}"
        print(header)
        spconv = entry.get("spconv", {})
        for row, t in entry["ours"].items():
            ref, target = REFERENCE.get(row, (row, None))
            per_round = [r[row] for r in entry["ours_rounds"]]
            spread = (max(per_round) - min(per_round)) / t if t else 0.0
            line = f"{row:<21}{t * 1e3:11.1f}{spread * 100:6.0f}%"
            theirs = spconv.get(ref)
            if theirs:
                line += f"{SHORT.get(ref, 'same'):>12}{theirs * 1e3:9.1f}{t / theirs:7.2f}"
            else:
                line += f"{'-':>12}{'-':>9}{'-':>7}"
            line += f"{target:7.2f}" if target else f"{'':>7}"
            for n in extra:
                tn = results[n][name]["ours"][row]
                line += f"{tn * 1e3:9.1f}{t / tn:9.2f}"
            print(line)
        for row in ("rulebook+subm fwd C32",):
            if row in spconv:
                print(f"{'(spconv ' + SHORT[row] + ')':<21}{'':>11}{'':>7}{'':>12}"
                      f"{spconv[row] * 1e3:9.1f}")
        if "memory" in entry:
            m = entry["memory"]
            for via, label in (("tensor", "peak MiB tensor C32"), ("input", "peak MiB input C32")):
                line = f"{label:<21}{m[via] / 2**20:11.1f}{'':>7}"
                if "spconv" in m:
                    line += f"{'rb+fwd C32':>12}{m['spconv'] / 2**20:9.1f}{m[via] / m['spconv']:7.2f}"
                print(line)
        if "max_abs_diff_vs_spconv" in entry:
            print(f"subm C32 output vs spconv: max abs diff {entry['max_abs_diff_vs_spconv']:.1e}")
        for n in args.threads:
            if not results[n][name]["digests_stable_across_rounds"]:
                print(f"WARNING: {n}-thread outputs differ between rounds")
        for n in extra:
            theirs = results[n][name]["digests"]
            differ = [k for k in entry["digests"] if theirs.get(k) != entry["digests"][k]]
            print(f"bits at {n} threads identical to {args.threads[0]} thread: {not differ}"
                  + (f" (differ: {', '.join(differ)})" if differ else
                     f" ({len(entry['digests'])} outputs compared)"))


if __name__ == "__main__":
    sys.exit(main())
