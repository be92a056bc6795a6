"""Sparse convolution on the CPU: sparsegrid against spconv 2.3.8, same scenes, same process.

Run (spconv optional; without it only sparsegrid's times are printed)::

    .venv-spconv/bin/python benchmarks/bench_conv.py            # full table, 1 and 2 threads
    .venv-spconv/bin/python benchmarks/bench_conv.py --quick    # fewer repeats, one scene
    .venv-spconv/bin/python benchmarks/bench_conv.py --jit off   # NumPy path even with numba
    .venv-spconv/bin/python benchmarks/bench_conv.py --jit both  # JIT and NumPy, side by side

Each thread count runs in a fresh child process whose BLAS / OpenMP / torch thread counts
are set before NumPy is imported. Times are medians of ``--repeat`` runs after a warm-up.
Ratios are sparsegrid / spconv (below 1 means sparsegrid is faster). The child also hashes
sparsegrid's outputs so the parent can check that 1 and 2 threads give identical bits, and
compares sparsegrid's submanifold output with spconv's on the real scene.

Rows (3-D, float32):
  rulebook        build the submanifold 3x3x3 rulebook from raw indices (validation,
                  sorting, neighbour search); spconv: get_indice_pairs as SubMConv3d calls it
  rulebook+plan   the same plus sparsegrid's grouping plan for the GEMMs (built once per
                  rulebook and reused by every layer at that resolution)
  subm fwd Cn     SubMConv3d(n, n, 3) forward, rulebook cached
  subm f+b Cn     forward + backward (feature and weight gradients), rulebook cached
  k2s2/k3s2 rulebook  the strided rulebook and its output sites, from scratch
  k2s2 / k3s2     strided convolution C=32 -> 32, rulebook cached
  inv k2s2/k3s2   the transposed convolution back onto the finer sites, rulebook cached
  peak MiB        peak extra resident memory of rulebook + one forward (C=32), fresh process
                  (with the JIT: after compiling / loading the kernels on a tiny input)

Which convolution path ran is printed per run: "jit" (numba kernels, sparsegrid.cpu.jit) or
"numpy" (the NumPy plan path). ``--jit off`` sets SPARSEGRID_JIT=0 in the children.
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

HERE = os.path.dirname(os.path.abspath(__file__))


def median_time(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def digest(*arrays):
    h = hashlib.sha1()
    for a in arrays:
        h.update(a.tobytes())
    return h.hexdigest()[:12]


def fit_shape(shape, kernel, stride=2):
    """The smallest sizes >= shape that a (kernel, stride) convolution divides exactly."""
    return tuple(s + (-(s - kernel)) % stride for s in shape)


def sparsegrid_rows(indices, shape, repeat, channels_list):
    """Timings (seconds) and output digests of sparsegrid on one scene."""
    import numpy as np

    import sparsegrid as sg
    from sparsegrid import cpu
    from sparsegrid.functional import conv_plan

    rng = np.random.default_rng(0)
    times, digests = {}, {}

    def fresh(features):
        return sg.SparseTensor(features, indices, shape)

    ones = np.ones((len(indices), 1), np.float32)
    times["rulebook"] = median_time(lambda: (lambda x: x.grid.submanifold(x.sites, 3))(fresh(ones)),
                                    repeat)
    times["rulebook+plan"] = median_time(
        lambda: (lambda x: conv_plan(x.grid.submanifold(x.sites, 3), cpu))(fresh(ones)), repeat)

    for c in channels_list:
        f = rng.standard_normal((len(indices), c)).astype(np.float32)
        w = (rng.standard_normal((27, c, c)) / np.sqrt(27 * c)).astype(np.float32)
        g = rng.standard_normal((len(indices), c)).astype(np.float32)
        x = fresh(f)
        rb = x.grid.submanifold(x.sites, 3)
        conv_plan(rb, cpu)   # built once, as the first layer of a network would
        tplan = conv_plan(rb.transpose(), cpu)
        times[f"subm fwd C{c}"] = median_time(lambda: sg.submanifold_conv(x, w), repeat)

        def forward_backward():
            y = sg.submanifold_conv(x, w)
            return y, cpu.conv_backward(g, f, w, rb.in_idx, rb.out_idx, rb.offset_ptr,
                                        rb.identity_offset, transposed_plan=tplan)

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

    times = {"rulebook": sb.time_rulebook(indices, shape, repeat)}
    for c in channels_list:
        times[f"subm fwd C{c}"] = sb.time_subm_forward(indices, shape, c, repeat)
        times[f"subm f+b C{c}"] = sb.time_subm_forward_backward(indices, shape, c, repeat)
    for k in (2, 3):
        s = fit_shape(shape, k)
        times[f"k{k}s2 rulebook"] = sb.time_strided_rulebook(indices, s, k, 2, repeat)
        times[f"k{k}s2 C32"] = sb.time_strided_forward(indices, s, 32, k, 2, repeat)
        times[f"inv k{k}s2 C32"] = sb.time_inverse_forward(indices, s, 32, k, 2, repeat)
    return times


def memory_child(path, shape, channels):
    """Peak extra RSS of rulebook + plan + one forward (same method as spconv_baseline)."""
    import numpy as np

    import sparsegrid as sg
    from spconv_baseline import _rss_kib

    indices = np.load(path)
    # compile / load the JIT kernels (and import numba) before the measurement
    tiny = sg.SparseTensor(np.ones((1, channels), np.float32), np.zeros((1, 4), np.int32),
                           (1, 1, 1))
    sg.submanifold_conv(tiny, np.zeros((27, channels, channels), np.float32))
    features = np.random.default_rng(0).standard_normal((len(indices), channels)).astype(np.float32)
    weight = np.zeros((27, channels, channels), np.float32)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = _rss_kib("VmRSS")
    x = sg.SparseTensor(features, indices, shape)
    out = sg.submanifold_conv(x, weight)
    peak = _rss_kib("VmHWM")
    del out
    print(json.dumps({"peak_bytes": (peak - before) * 1024}))


def peak_memory(indices, shape, channels, spconv):
    env = _thread_env(1)
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "indices.npy")
        np.save(path, indices)
        ours = subprocess.run(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {HERE!r}); import bench_conv as b; "
             f"b.memory_child({path!r}, {tuple(shape)!r}, {channels})"],
            capture_output=True, text=True, check=True, env=env)
    result = {"ours": int(json.loads(ours.stdout.splitlines()[-1])["peak_bytes"])}
    if spconv:
        import spconv_baseline as sb
        result["spconv"] = sb.peak_memory_rulebook_forward(indices, shape, channels)
    return result


def child(args):
    sys.path.insert(0, HERE)
    import numpy as np

    import scenes
    import spconv_baseline as sb

    from sparsegrid import cpu

    have_spconv = args.threads == 1 and sb.available() and not args.no_spconv and args.spconv
    if have_spconv:
        sb.set_threads(1)
    report = {"_path": "jit" if cpu.jit_enabled() else "numpy"}
    for name in args.scenes:
        indices, shape = scenes.SCENES[name]()
        ours, digests = sparsegrid_rows(indices, shape, args.repeat, args.channels)
        entry = {"n": len(indices), "ours": ours}
        f, w, y = digests.pop("subm_output")
        entry["digests"] = digests
        if have_spconv:
            entry["spconv"] = spconv_rows(indices, shape, args.repeat, args.channels)
            reference = sb.subm_forward_output(indices, shape, f, w)
            entry["max_abs_diff_vs_spconv"] = float(np.abs(reference - y).max())
            entry["memory"] = peak_memory(indices, shape, 32, True)
        report[name] = entry
    print("JSON" + json.dumps(report))


def _thread_env(n):
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                "SPARSEGRID_NUM_THREADS"):
        env[var] = str(n)
    return env


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", nargs="+", default=["lidar_5cm", "lidar_10cm", "room_2cm"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--channels", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="one scene, 3 repeats")
    parser.add_argument("--no-spconv", action="store_true")
    parser.add_argument("--jit", choices=["auto", "on", "off", "both"], default="auto",
                        help="SPARSEGRID_JIT for the children ('both': run each path)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spconv", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the raw results to this file")
    args = parser.parse_args()
    if args.quick:
        args.scenes, args.repeat = args.scenes[:1], 3
    if args.child:
        args.threads = int(os.environ.get("SPARSEGRID_NUM_THREADS", "1"))
        return child(args)

    modes = {"auto": [None], "on": ["1"], "off": ["0"], "both": ["1", "0"]}[args.jit]
    everything = {}
    for m, mode in enumerate(modes):
        results = {}
        for n in args.threads:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--repeat",
                   str(args.repeat), "--scenes", *args.scenes, "--channels",
                   *map(str, args.channels), "--spconv", "1" if m == 0 else "0"]
            if args.no_spconv:
                cmd.append("--no-spconv")
            env = _thread_env(n)
            if mode is not None:
                env["SPARSEGRID_JIT"] = mode
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                sys.stderr.write(out.stderr)
                return out.returncode
            results[n] = json.loads(out.stdout.split("JSON", 1)[1])
        if m > 0:  # spconv ran once; compare every path with those times
            for n in args.threads:
                for name in args.scenes:
                    for key in ("spconv", "max_abs_diff_vs_spconv"):
                        if key in everything[modes[0]][n][name]:
                            results[n][name][key] = everything[modes[0]][n][name][key]
                    if "memory" in everything[modes[0]][n][name]:
                        results[n][name]["memory"] = peak_memory_with(
                            results[n][name], everything[modes[0]][n][name], args, name, mode)
        everything[mode] = results
        print_report(results, args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(everything if len(modes) > 1 else everything[modes[0]], fh, indent=1)
    return 0


def peak_memory_with(entry, reference, args, name, mode):
    """Our peak memory under another SPARSEGRID_JIT mode (spconv's number reused)."""
    sys.path.insert(0, HERE)
    import scenes

    indices, shape = scenes.SCENES[name]()
    before = os.environ.get("SPARSEGRID_JIT")
    os.environ["SPARSEGRID_JIT"] = mode
    try:
        ours = peak_memory(indices, shape, 32, False)["ours"]
    finally:
        if before is None:
            del os.environ["SPARSEGRID_JIT"]
        else:
            os.environ["SPARSEGRID_JIT"] = before
    return {"ours": ours, "spconv": reference["memory"]["spconv"]}


def print_report(results, args):
    import platform

    base = results[args.threads[0]]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"median of {args.repeat}; times in ms; ratio = sparsegrid / spconv")
    print(f"sparsegrid convolution path: {base['_path']}")
    for name in args.scenes:
        entry = base[name]
        print(f"\n{name}: N = {entry['n']:,}")
        header = f"{'row':<16}{'sparsegrid':>11}{'spconv':>9}{'ratio':>7}"
        extra = [n for n in args.threads[1:]]
        for n in extra:
            header += f"{f'sg {n}T':>9}{'speed-up':>9}"
        print(header)
        for row, t in entry["ours"].items():
            theirs = entry.get("spconv", {}).get(row if row != "rulebook+plan" else "rulebook")
            line = f"{row:<16}{t * 1e3:11.1f}"
            line += f"{theirs * 1e3:9.1f}{t / theirs:7.2f}" if theirs else f"{'-':>9}{'-':>7}"
            for n in extra:
                tn = results[n][name]["ours"][row]
                line += f"{tn * 1e3:9.1f}{t / tn:9.2f}"
            print(line)
        if "memory" in entry:
            m = entry["memory"]
            print(f"{'peak MiB C32':<16}{m['ours'] / 2**20:11.1f}{m['spconv'] / 2**20:9.1f}"
                  f"{m['ours'] / m['spconv']:7.2f}")
        if "max_abs_diff_vs_spconv" in entry:
            print(f"subm C32 output vs spconv: max abs diff {entry['max_abs_diff_vs_spconv']:.1e}")
        for n in extra:
            same = results[n][name]["digests"] == entry["digests"]
            print(f"bits at {n} threads identical to {args.threads[0]} thread: {same}")


if __name__ == "__main__":
    sys.exit(main())
