"""Sparse convolution on the GPU: sparsegrid's CUDA backend (gather-GEMM-scatter).

Run on a machine with an NVIDIA GPU and CuPy::

    python benchmarks/bench_conv.py --device cuda                 # forwards here
    python benchmarks/bench_conv_cuda.py --scenes lidar_5cm scaled_1m --json /tmp/gpu.json

Times are CUDA-event medians of ``--repeat`` runs after two warm-ups (kernel compilation
and CuPy's memory pool filling are excluded), in milliseconds. Rows, per scene (3-D,
float32, the scene's voxels on the GPU):

  rulebook         SparseTensor on the device indices + grid.submanifold 3x3x3 (index build,
                   neighbour search, compaction), target < 2 ms at 240k sites
  plan             cuda.prepare_conv of the rulebook (one read of offset_ptr)
  subm fwd Cn      conv_forward C=n -> n, rulebook and plan cached
  subm f+b Cn      conv_forward + conv_backward (feature and weight gradients)

Beside each convolution row: achieved TFLOP/s (2 * pairs * Cin * Cout per GEMM pass) and
the time over the gather-GEMM-scatter memory-traffic bound (the bytes the per-offset
gather, GEMM and scatter must move, at the device-to-device copy bandwidth measured in the
same run): the issue's target is <= 3x. Determinism: each forward is run twice and the
outputs compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_median_ms(cp, fn, repeat):
    fn()
    fn()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def copy_bandwidth(cp, n_bytes=1 << 30, repeat=10):
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    a = cp.empty(n_bytes // 4, dtype=cp.float32)
    b = cp.empty_like(a)
    ms = cuda_median_ms(cp, lambda: b.__setitem__(Ellipsis, a), repeat)
    return 2 * n_bytes / (ms * 1e-3)


def ggs_bytes(n_pairs_offsets, n_in, n_out, cin, cout, identity_rows, itemsize=4):
    """Bytes a gather-GEMM-scatter forward must move: per non-identity pair, gather (read
    a row, write it), GEMM (read it, write the product), scatter (read the product and the
    output row, write the output row) and its two int32 indices; the identity GEMM reads
    the input and writes the output once; the weights once per offset."""
    pairs = n_pairs_offsets
    per_pair = itemsize * (2 * cin + cin + cout + 3 * cout) + 8
    identity = itemsize * identity_rows * (cin + cout)
    return pairs * per_pair + identity


def run_scene(cp, name, indices_host, shape, channels, repeat):
    import numpy as np

    import sparsegrid as sg
    from sparsegrid import cuda

    indices = cp.asarray(indices_host)
    n = len(indices)
    ones = cp.ones((n, 1), dtype=cp.float32)
    rows = {}

    def rulebook():
        x = sg.SparseTensor(ones, indices, shape)
        return x.grid.submanifold(x.sites, 3)

    rows["rulebook"] = cuda_median_ms(cp, rulebook, repeat)
    rb = rulebook()
    rows["plan"] = cuda_median_ms(cp, lambda: cuda.prepare_conv(
        sg.Rulebook(rb.in_idx, rb.out_idx, rb.offset_ptr, rb.n_in, rb.n_out, rb.filter_size,
                    identity_offset=rb.identity_offset)), repeat)
    cuda.prepare_conv(rb)
    cuda.prepare_conv(rb.transpose())
    pairs = rb.n_pairs - (n if rb.identity_offset >= 0 else 0)
    rng = np.random.default_rng(0)
    bandwidth = copy_bandwidth(cp)
    checks = {}
    for c in channels:
        f = cp.asarray(rng.standard_normal((n, c)).astype(np.float32))
        w = cp.asarray((rng.standard_normal((27, c, c)) / np.sqrt(27 * c)).astype(np.float32))
        g = cp.asarray(rng.standard_normal((n, c)).astype(np.float32))
        fwd = cuda_median_ms(cp, lambda: cuda.conv_forward(f, w, rb), repeat)
        fb = cuda_median_ms(cp, lambda: (cuda.conv_forward(f, w, rb),
                                         cuda.conv_backward(g, f, w, rb)), repeat)
        flop = 2.0 * rb.n_pairs * c * c
        bound_s = ggs_bytes(pairs, n, n, c, c, n) / bandwidth
        rows[f"subm fwd C{c}"] = fwd
        rows[f"subm f+b C{c}"] = fb
        rows[f"subm fwd C{c} TFLOP/s"] = flop / (fwd * 1e-3) / 1e12
        rows[f"subm fwd C{c} x traffic bound"] = fwd * 1e-3 / bound_s
        rows[f"subm f+b C{c} x traffic bound"] = fb * 1e-3 / (3 * bound_s)
        first, second = cuda.conv_forward(f, w, rb), cuda.conv_forward(f, w, rb)
        checks[f"C{c} bit-identical"] = bool((first == second).all())
    return {"n": n, "pairs": int(rb.n_pairs), "copy GB/s": bandwidth / 1e9, "ms": rows,
            "checks": checks}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", nargs="+",
                        default=["lidar_5cm", "lidar_10cm", "room_2cm", "scaled_1m"])
    parser.add_argument("--channels", nargs="+", type=int, default=[16, 32, 64, 128])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    import cupy as cp

    sys.path.insert(0, HERE)
    import scenes

    device = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(device.id)
    print(f"device {device.id}: {props['name'].decode()}, CuPy {cp.__version__}")
    results = {"device": props["name"].decode(), "cupy": cp.__version__, "scenes": {}}
    for name in args.scenes:
        indices, shape = scenes.scene(name)
        result = run_scene(cp, name, indices, shape, args.channels, args.repeat)
        results["scenes"][name] = result
        print(f"\n{name}: {result['n']:,} sites, {result['pairs']:,} pairs, copy "
              f"{result['copy GB/s']:.0f} GB/s")
        for row, value in result["ms"].items():
            unit = "" if ("TFLOP" in row or "bound" in row) else " ms"
            print(f"  {row:<32} {value:9.3f}{unit}")
        for check, ok in result["checks"].items():
            print(f"  {check:<32} {'yes' if ok else 'NO'}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
