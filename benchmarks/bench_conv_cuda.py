"""Sparse convolution layers on the GPU: sparsegrid's CUDA backend beside spconv 2.3.8.

Run on a machine with an NVIDIA GPU and CuPy (spconv optional: without it its rows are
reported absent, with the reason, and sparsegrid is compared with a same-run cuBLAS
dense equivalent and the roofline instead)::

    python benchmarks/bench_conv.py --device cuda                     # forwards here
    python benchmarks/bench_conv_cuda.py --json /tmp/gpu.json
    python benchmarks/bench_conv_cuda.py --scenes room_1m lidar_1m --modes fp16 tf32
    python benchmarks/bench_conv_cuda.py --device cpu --smoke --json /tmp/smoke.json

``--device cpu`` rehearses every code path but the CUDA-only calls on the CPU backend
(NumPy arrays, ``time.perf_counter``, tracemalloc for memory, spconv's CPU build where it
imports, in float32 for every mode; sparsegrid's CPU kernels take float16, computing in
float32; TF32 changes nothing there).
``--smoke``: two tiny scenes, small channel counts, one repeat: seconds, for the test
suite.

Layers, per scene (``benchmarks/scenes.py``: the standard ``lidar_5cm``, ``lidar_10cm``
and ``room_2cm``, and the 1M-voxel batches ``room_1m`` (indoor) and ``lidar_1m``):

  subm3 Cn        submanifold 3x3x3, C = n -> n (``--channels``, default 32 64 128 256),
                  rulebook built once (as every later layer at that resolution finds it)
  k2s2 Cn         strided 2x2x2 / 2, C -> C (``--strided-channels``); passes ``fwd`` /
                  ``f+b`` with the rulebook cached, and ``rb+fwd`` / ``rb+f+b`` with the
                  rulebook built from the raw indices each call, which is what spconv
                  does on every call of a strided layer (so those are the rows compared)
  inv k2s2 Cn     the transposed layer back onto the fine sites, reusing the strided
                  layer's rulebook (spconv: SparseInverseConv3d on the strided layer's
                  indice_key)

each in every precision mode (``--modes``): ``fp32`` (float32, TF32 off: exact fp32
through cuBLAS), ``tf32`` (float32 under ``sparsegrid.cuda.tf32(True)``; spconv with
torch's TF32 flags and ``spconv.constants.SPCONV_ALLOW_TF32``), ``fp16`` (float16 data),
and for sparsegrid every convolution algorithm (``--algorithms``, through
``sparsegrid.cuda.conv_algorithm``): ``gather_gemm``, ``implicit_gemm`` (not run in
``fp32``, where it is not eligible and falls back to gather-GEMM; ``--all-algorithms``
runs it anyway) and ``auto`` (the default, a measured per-layer autotuner). Passes:
``fwd`` (``conv_forward``) and ``f+b`` (``conv_forward`` + ``conv_backward``: feature and
weight gradients).

Measurements: medians of ``--repeat`` timed calls after two warm-ups (kernel compilation,
autotuning and CuPy's memory pool filling excluded), capped so one measurement takes
about ``--max-ms`` (at least 3 calls); CUDA events on the GPU (CuPy's for sparsegrid,
torch's for spconv; both libraries launch on the legacy default stream).

  TFLOP/s         2 * valid_pairs * Cin * Cout per GEMM pass (valid_pairs: the rulebook's
                  pairs, the submanifold centre included), one pass forward, three
                  forward+backward (forward, feature gradient, weight gradient)
  GB/s            minimum bytes over the time: forward = features in + features out +
                  weights + an int32 map (n_out x K); forward+backward adds the output
                  gradient, the input features again, the weights again, the feature and
                  weight gradients and the map again
  ceilings        measured in the same run: cupy.matmul on 8192^3 (fp32, TF32 and fp16
                  with fp32 accumulation) and a 1 GiB device-to-device copy (bytes read +
                  written); every row gives its % of its mode's GEMM ceiling and of the
                  fp16 one, and % of the copy bandwidth
  peak memory     extra bytes in use at the high-water mark of one call, over what was in
                  use before: a CuPy MemoryHook adding up the pool allocations minus frees
                  (sparsegrid), torch.cuda.max_memory_allocated (spconv); tracemalloc on
                  the CPU
  bit-identical   the call run twice, outputs (and gradients) compared bit for bit
  pair stats      sparsegrid.neighbours.pair_statistics of each rulebook at
                  ``--tile-rows`` (computed / valid pairs, rows in rulebook order or sorted
                  by neighbour mask)
  dense equiv.    cupy.matmul of (valid_pairs x Cin) @ (Cin x Cout) in the row's mode: the
                  same FLOPs as one dense GEMM (rows capped at 4M and scaled)
  check           one layer per scene (subm3 at ``--check-channels``, and the k2s2 and
                  inverse layers), every algorithm and spconv against a float64 reference
                  (sparsegrid's gather-GEMM in float64 on the same device), relative L2
                  error against the mode's tolerance

Targets (issue 11), evaluated on every row and summarised for ``auto``: submanifold rows
at C >= 32 in fp16 and TF32 at <= 0.8x spconv's time forward and <= 0.9x forward+backward;
at 1M voxels >= 50% of the copy bandwidth on C <= 64 layers and >= 35% of the fp16 GEMM
ceiling on C >= 128 layers (fp16 rows); peak memory per layer <= spconv's.

The JSON (``--json``, rewritten after every scene, so a run cut short keeps what it
measured) holds the device, the ceilings, these definitions, spconv's status, per scene
its statistics, pair statistics and checks, and a flat list of rows. ``--budget-s``
stops timing once that many seconds have passed (the remaining rows are listed as
skipped), so a run ends inside a fixed time limit with its JSON written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (HERE, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import timing  # noqa: E402  (benchmarks/timing.py)

MODES = ("fp32", "tf32", "fp16")
ALGORITHMS = ("gather_gemm", "implicit_gemm", "auto")
DEFAULT_SCENES = ("room_1m", "lidar_1m", "lidar_5cm", "room_2cm", "lidar_10cm")
SMOKE_SCENES = ("smoke_lidar", "smoke_room")
TOLERANCE = {"fp32": 1e-5, "tf32": 5e-3, "fp16": 5e-3}
TARGETS = {
    "ratio_fwd": 0.8, "ratio_fb": 0.9,              # sparsegrid / spconv, subm C >= 32
    "copy_fraction_c64": 0.5,                      # 1M voxels, C <= 64
    "fp16_gemm_fraction_c128": 0.35,               # 1M voxels, C >= 128, fp16 rows
    "large_scene_voxels": 900_000,
}
DEFINITIONS = {
    "flop": "2 * valid_pairs * Cin * Cout per GEMM pass; fwd 1 pass, f+b 3 passes",
    "min_bytes_fwd": "itemsize * (n_in*Cin + n_out*Cout + K*Cin*Cout) + 4 * n_out * K",
    "min_bytes_fb": "min_bytes_fwd + itemsize * (n_out*Cout + n_in*Cin + K*Cin*Cout + "
                    "n_in*Cin + K*Cin*Cout) + 4 * n_out * K",
    "ratio_vs_spconv": "sparsegrid ms / spconv ms, same scene, layer, mode and pass",
    "peak_bytes": "sparsegrid: CuPy MemoryHook high-water mark of pool allocations minus "
                  "frees during one call; spconv: torch.cuda.max_memory_allocated minus "
                  "memory_allocated before; CPU: tracemalloc",
    "dense_equivalent": "cupy.matmul (valid_pairs x Cin) @ (Cin x Cout) in the row's mode "
                        "(rows capped at 4M, time scaled); f+b: 3x that",
    "targets": TARGETS,
}


# --------------------------------------------------------------------------
# The device: arrays, timers, memory, precision, ceilings
# --------------------------------------------------------------------------


class Device:
    """What differs between the GPU run and its CPU rehearsal, in one place."""

    def __init__(self, name):
        import sparsegrid
        from sparsegrid import cuda as sg_cuda

        self.name = name
        self.sg_cuda = sg_cuda
        if name == "cuda":
            import cupy as cp

            if not cp.is_available():
                raise RuntimeError("bench_conv_cuda: --device cuda needs a visible NVIDIA "
                                   "GPU (cupy.is_available() is False); rehearse with "
                                   "--device cpu")
            from sparsegrid import cuda as kernels

            self.xp, self.kernels = cp, kernels
            self.timer = timing.EventTimer(cp.cuda, "cupy")
            props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
            self.description = {"name": props["name"].decode(), "cupy": cp.__version__,
                                "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
                                "driver": cp.cuda.runtime.driverGetVersion(),
                                "multiprocessors": props["multiProcessorCount"],
                                "memory_bytes": int(props["totalGlobalMem"])}
        else:
            from sparsegrid import cpu as kernels

            self.xp, self.kernels = np, kernels
            self.timer = timing.HostTimer()
            self.description = {"name": platform.processor() or platform.machine(),
                                "cores": os.cpu_count(),
                                "sparsegrid_threads": sparsegrid.get_num_threads()}
        self.description["numpy"] = np.__version__

    # -- arrays ---------------------------------------------------------------------------
    def asarray(self, host):
        return self.xp.asarray(host)

    def to_host(self, array):
        return array.get() if self.name == "cuda" else np.asarray(array)

    def randn(self, shape, seed, scale=1.0):
        """Seeded standard normal float32 on the device (generated there: no 1 GB host
        arrays for the 1M-voxel layers)."""
        if self.name == "cuda":
            out = self.xp.random.RandomState(seed).standard_normal(shape, dtype=np.float32)
        else:
            out = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        return out * np.float32(scale) if scale != 1.0 else out

    def synchronize(self):
        if self.name == "cuda":
            self.xp.cuda.Device().synchronize()

    def free_memory(self):
        if self.name == "cuda":
            self.synchronize()
            self.xp.get_default_memory_pool().free_all_blocks()

    def bit_identical(self, first, second):
        """Whether two arrays (or tuples of arrays) hold the same bits."""
        if isinstance(first, (tuple, list)):
            return all(self.bit_identical(a, b) for a, b in zip(first, second))
        if first is None or second is None:
            return first is second
        if first.shape != second.shape or first.dtype != second.dtype:
            return False
        view = {2: np.uint16, 4: np.uint32, 8: np.uint64}[first.dtype.itemsize]
        return bool(self.xp.array_equal(first.view(view), second.view(view)))

    # -- memory ---------------------------------------------------------------------------
    def peak_bytes(self, fn):
        """Extra bytes at the high-water mark while ``fn()`` runs (its result alive at the
        end), over what was in use before."""
        if self.name == "cuda":
            hook = _pool_high_water(self.xp)
            self.synchronize()
            with hook:
                result = fn()
                self.synchronize()
            del result
            return int(hook.peak)
        import tracemalloc

        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            result = fn()
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        del result
        return int(peak)

    # -- precision and algorithms -----------------------------------------------------------
    @contextlib.contextmanager
    def precision(self, mode):
        """sparsegrid's precision mode: yields the data dtype (the CPU kernels take float16
        too, computing in float32 and rounding once, so the rehearsal runs the same
        dtypes; only TF32 is the GPU's alone)."""
        with self.sg_cuda.tf32(mode == "tf32"):
            yield np.dtype(np.float16 if mode == "fp16" else np.float32)

    def algorithm(self, name):
        return self.sg_cuda.conv_algorithm(name)

    @contextlib.contextmanager
    def cublas_tf32(self, enabled):
        """cupy.matmul's float32 compute type: TF32 (enabled) or CuPy's default, restored
        afterwards (the ceilings and the dense equivalents). Nothing on the CPU."""
        if self.name != "cuda":
            yield
            return
        from cupy._core import _routines_linalg as linalg

        previous = linalg.get_compute_type(np.dtype(np.float32))
        linalg.set_compute_type(np.dtype(np.float32), linalg.COMPUTE_TYPE_TF32 if enabled
                                else linalg.COMPUTE_TYPE_DEFAULT)
        try:
            yield
        finally:
            linalg.set_compute_type(np.dtype(np.float32), previous)

    # -- ceilings ---------------------------------------------------------------------------
    def ceilings(self, smoke=False):
        """GEMM TFLOP/s per mode (square n^3 cupy.matmul) and copy GB/s, measured now."""
        n = 256 if smoke else (8192 if self.name == "cuda" else 1024)
        copy_bytes = (4 << 20) if smoke else ((1 << 30) if self.name == "cuda" else 64 << 20)
        repeat = 3 if smoke else 10
        gemm = {}
        for mode in MODES:
            dtype = np.float16 if mode == "fp16" and self.name == "cuda" else np.float32
            a = self.randn((n, n), 1).astype(dtype)
            b = self.randn((n, n), 2).astype(dtype)
            with self.cublas_tf32(mode == "tf32"):
                ms = self.timer.median_ms(lambda: self.xp.matmul(a, b), repeat)
            gemm[mode] = 2.0 * n ** 3 / (ms * 1e-3) / 1e12
            del a, b
        src = self.xp.empty(copy_bytes // 4, dtype=np.float32)
        src[...] = 1.0
        dst = self.xp.empty_like(src)
        ms = self.timer.median_ms(lambda: dst.__setitem__(Ellipsis, src), repeat)
        del src, dst
        self.free_memory()
        return {"gemm_tflops": gemm, "copy_gbps": 2.0 * copy_bytes / (ms * 1e-3) / 1e9,
                "gemm_n": n, "copy_bytes": copy_bytes, "timer": self.timer.kind}


def _pool_high_water(cp):
    """A CuPy MemoryHook that follows the bytes handed out by the memory pool (malloc
    minus free, rounded sizes as the pool allocates them) and keeps their maximum."""

    class PoolHighWater(cp.cuda.MemoryHook):
        name = "bench_conv_cuda_high_water"

        def __init__(self):
            self.in_use = 0
            self.peak = 0
            self.live = {}      # pointer -> size of the blocks allocated under the hook

        def malloc_postprocess(self, **kwargs):
            pointer = kwargs.get("mem_ptr", 1)
            if pointer:
                self.live[pointer] = kwargs["mem_size"]
                self.in_use += kwargs["mem_size"]
                self.peak = max(self.peak, self.in_use)

        def free_postprocess(self, **kwargs):
            # only blocks allocated while the hook was on: freeing an older block must
            # not lower the count below what this call holds
            self.in_use -= self.live.pop(kwargs.get("mem_ptr"), 0)

    return PoolHighWater()


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------


class Clock:
    """Wall-clock budget of the whole run: :meth:`over` once ``budget_s`` have passed."""

    def __init__(self, budget_s):
        self.start = time.perf_counter()
        self.budget_s = float(budget_s or 0)

    def elapsed(self):
        return time.perf_counter() - self.start

    def over(self, grace=0.0):
        """Past the budget (plus ``grace`` seconds)."""
        return self.budget_s > 0 and self.elapsed() > self.budget_s + grace


def measure(timer, fn, repeat, max_ms):
    """Median, min, max and count of timed calls: two warm-ups, then ``repeat`` calls cut
    to about ``max_ms`` of work (at least 3, or 1 when ``repeat`` is 1)."""
    first = timer.times_ms(fn, 1, warmup=2)[0]
    count = max(1, int(repeat))
    if count > 3 and first > 0:
        count = max(3, min(count, int(max_ms / first)))
    times = [first] + (timer.times_ms(fn, count - 1, warmup=0) if count > 1 else [])
    times.sort()
    return {"ms": float(times[len(times) // 2]) if len(times) % 2 else
            float(0.5 * (times[len(times) // 2 - 1] + times[len(times) // 2])),
            "min_ms": float(times[0]), "max_ms": float(times[-1]), "repeats": len(times)}


def fit_shape(shape, kernel=2, stride=2):
    """The smallest sizes >= shape that a (kernel, stride) convolution divides exactly."""
    return tuple(int(s + (-(s - kernel)) % stride) for s in shape)


def min_bytes(itemsize, n_in, n_out, cin, cout, k, backward):
    """The fewest bytes a pass must move (DEFINITIONS)."""
    fwd = itemsize * (n_in * cin + n_out * cout + k * cin * cout) + 4 * n_out * k
    if not backward:
        return fwd
    return fwd + itemsize * (n_out * cout + 2 * n_in * cin + 2 * k * cin * cout) + \
        4 * n_out * k


def relative_error(value, reference):
    value = np.asarray(value, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if value.shape != reference.shape or not np.isfinite(value).all():
        return float("inf")
    scale = math.sqrt(float(np.square(reference).sum()))   # no BLAS: cheap on any size
    error = math.sqrt(float(np.square(value - reference).sum()))
    return error / (scale if scale > 0 else 1.0)


# --------------------------------------------------------------------------
# One scene
# --------------------------------------------------------------------------


class Layer:
    """A benchmarked convolution: its rulebook, shapes, and what spconv needs."""

    def __init__(self, name, kind, cin, cout, rulebook, fine_indices, shape, k,
                 coarse_indices=None, fresh=None):
        self.name, self.kind, self.cin, self.cout = name, kind, cin, cout
        self.rulebook, self.k = rulebook, k
        self.fine_indices, self.shape = fine_indices, shape
        self.coarse_indices = coarse_indices
        self.fresh = fresh          # builds the rulebook from raw indices (strided layers)
        self.n_in, self.n_out = rulebook.n_in, rulebook.n_out

    def describe(self):
        return {"kind": self.kind, "cin": self.cin, "cout": self.cout, "n_in": self.n_in,
                "n_out": self.n_out, "K": self.k ** 3, "valid_pairs": int(self.rulebook.n_pairs)}


def build_layers(dev, indices_host, shape, channels, strided_channels):
    """The scene's layers: subm3 per channel count, k2s2 and inverse per strided count."""
    import sparsegrid as sg

    idx = dev.asarray(indices_host)
    ones = dev.xp.ones((len(indices_host), 1), dtype=np.float32)
    x = sg.SparseTensor(ones, idx, shape)
    subm = x.grid.submanifold(x.sites, 3)
    layers = [Layer(f"subm3 C{c}", "subm", c, c, subm, indices_host, shape, 3)
              for c in channels]
    if strided_channels:
        fitted = fit_shape(shape)
        xs = sg.SparseTensor(ones, idx, fitted)
        strided, coarse = xs.grid.strided(xs.sites, 2, 2)
        coarse_host = dev.to_host(coarse.indices)

        def fresh():
            t = sg.SparseTensor(ones, idx, fitted)
            return t.grid.strided(t.sites, 2, 2)[0]

        for c in strided_channels:
            layers.append(Layer(f"k2s2 C{c}", "strided", c, c, strided, indices_host,
                                fitted, 2, coarse_host, fresh))
            layers.append(Layer(f"inv k2s2 C{c}", "inverse", c, c, strided.transpose(),
                                indices_host, fitted, 2, coarse_host))
    return subm, layers


def pair_stats(rulebook, tile_rows):
    """sparsegrid.neighbours.pair_statistics at each tile height, as plain numbers."""
    from sparsegrid import neighbours

    out = {}
    for t in tile_rows:
        stats = neighbours.pair_statistics(rulebook, tile_rows=t)
        out[str(t)] = {key: (float(v) if isinstance(v, float) or "ratio" in key else int(v))
                       for key, v in stats.items()}
    return out


def scene_rows(dev, name, indices_host, shape, args, spconv, clock, on_mode=None):
    """Every row of one scene, and its statistics and checks; ``on_mode(info, rows)``
    after each mode (the caller writes its JSON then: a killed run keeps whole modes)."""
    import sparsegrid as sg

    timer, kernels, xp = dev.timer, dev.kernels, dev.xp
    n = len(indices_host)
    idx = dev.asarray(indices_host)
    ones = xp.ones((n, 1), dtype=np.float32)

    def rulebook():
        t = sg.SparseTensor(ones, idx, shape)
        return t.grid.submanifold(t.sites, 3)

    info = {"n": n, "shape": list(shape), "large": n >= TARGETS["large_scene_voxels"]}
    info["rulebook_ms"] = measure(timer, rulebook, args.repeat, args.max_ms)["ms"]
    subm, layers = build_layers(dev, indices_host, shape, args.channels, args.strided_channels)
    info["plan_ms"] = measure(timer, lambda: kernels.prepare_conv(sg.Rulebook(
        subm.in_idx, subm.out_idx, subm.offset_ptr, subm.n_in, subm.n_out, subm.filter_size,
        identity_offset=subm.identity_offset)), args.repeat, args.max_ms)["ms"]
    info["valid_pairs_subm"] = int(subm.n_pairs)
    info["mean_active_neighbours"] = subm.n_pairs / max(n, 1)
    info["pair_statistics"] = {"subm3": pair_stats(subm, args.tile_rows)}
    for layer in layers:
        if layer.kind in ("strided", "inverse") and layer.kind not in info["pair_statistics"]:
            info["pair_statistics"][layer.kind] = pair_stats(layer.rulebook, args.tile_rows)
    info["layers"] = {layer.name: layer.describe() for layer in layers}
    info["checks"] = {}
    rows = []
    check_layers = {f"subm3 C{args.check_channels}"} | {
        layer.name for layer in layers if layer.kind != "subm" and
        layer.cin == min(args.strided_channels)}
    for mode in args.modes:         # mode-major: a cut-short run keeps whole modes
        for layer in layers:
            rows += layer_rows(dev, name, layer, mode, args, spconv, clock, info,
                               layer.name in check_layers)
            dev.free_memory()
        if on_mode is not None:
            on_mode(info, rows)
    return info, rows


def _inputs(dev, layer, dtype, seed):
    """Features (n_in, Cin), weight (K, Cin, Cout) and output gradient (n_out, Cout)."""
    k3 = layer.k ** 3
    f = dev.randn((layer.n_in, layer.cin), seed).astype(dtype)
    w = dev.randn((k3, layer.cin, layer.cout), seed + 1,
                  1.0 / math.sqrt(k3 * layer.cin)).astype(dtype)
    g = dev.randn((layer.n_out, layer.cout), seed + 2).astype(dtype)
    return f, w, g


def layer_rows(dev, scene, layer, mode, args, spconv, clock, info, check):
    """sparsegrid (each algorithm), spconv and the dense equivalent for one layer and mode."""
    kernels = dev.kernels
    base = {"scene": scene, "n": info["n"], "layer": layer.name, "kind": layer.kind,
            "cin": layer.cin, "cout": layer.cout, "mode": mode,
            "valid_pairs": int(layer.rulebook.n_pairs)}
    rows = []
    with dev.precision(mode) as dtype:
        f, w, g = _inputs(dev, layer, dtype, seed=zlib.crc32(layer.name.encode()) % 1000)
        itemsize = np.dtype(dtype).itemsize
        base["dtype"] = np.dtype(dtype).name
        flop = 2.0 * layer.rulebook.n_pairs * layer.cin * layer.cout
        rb = layer.rulebook

        def forward():
            return kernels.conv_forward(f, w, rb)

        def forward_backward():
            return forward(), kernels.conv_backward(g, f, w, rb)

        passes = {"fwd": (forward, 1), "f+b": (forward_backward, 3)}
        if layer.fresh is not None:
            passes["rb+fwd"] = (lambda: kernels.conv_forward(f, w, layer.fresh()), 1)
            passes["rb+f+b"] = (lambda: (lambda r: (kernels.conv_forward(f, w, r),
                                                    kernels.conv_backward(g, f, w, r)))(
                                    layer.fresh()), 3)

        def finish(row, name, gemm_passes):
            backward = gemm_passes == 3
            row["flop"] = flop * gemm_passes
            row["min_bytes"] = min_bytes(itemsize, layer.n_in, layer.n_out, layer.cin,
                                         layer.cout, layer.k ** 3, backward)
            if "ms" in row:
                seconds = row["ms"] * 1e-3
                row["tflops"] = row["flop"] / seconds / 1e12
                row["gbps"] = row["min_bytes"] / seconds / 1e9
            return row

        for algorithm in args.algorithms:
            if mode == "fp32" and algorithm == "implicit_gemm" and not args.all_algorithms:
                for pass_name, (_, gemm_passes) in passes.items():
                    rows.append(finish(dict(base, library="sparsegrid", algorithm=algorithm,
                                            **{"pass": pass_name},
                                            skipped="not eligible in fp32 (TF32 off): "
                                                    "falls back to gather_gemm"),
                                       pass_name, gemm_passes))
                continue
            with dev.algorithm(algorithm):
                for pass_name, (fn, gemm_passes) in passes.items():
                    row = dict(base, library="sparsegrid", algorithm=algorithm,
                               **{"pass": pass_name})
                    if clock.over():
                        row["skipped"] = "time budget (--budget-s) spent"
                    else:
                        try:   # one failing row must not cost the run its other rows
                            row.update(measure(dev.timer, fn, args.repeat, args.max_ms))
                            row["peak_bytes"] = dev.peak_bytes(fn)
                            row["bit_identical"] = dev.bit_identical(_flatten(fn()),
                                                                     _flatten(fn()))
                        except Exception as error:
                            row["failed"] = failure(error)
                    rows.append(finish(row, pass_name, gemm_passes))
        rows += dense_equivalent_rows(dev, base, layer, mode, dtype, args, clock, finish)
        if spconv["available"]:
            rows += spconv_rows(dev, base, layer, mode, f, w, g, args, clock, finish)
        else:
            for pass_name, (_, gemm_passes) in passes.items():
                if layer.kind == "strided" and pass_name in ("fwd", "f+b"):
                    continue
                rows.append(finish(dict(base, library="spconv", **{"pass": pass_name},
                                        absent=spconv["error"]), pass_name, gemm_passes))
        if check and clock.over(grace=5.0):    # float64 references of 1M rows: not
            info["checks"].setdefault(layer.name, {})[mode] = {   # well past the budget
                "skipped": "time budget (--budget-s) spent"}
        elif check:   # cheap, and worth more than timings: run a little past the budget
            info["checks"].setdefault(layer.name, {})[mode] = check_layer(
                dev, layer, mode, f, w, g, args, spconv)
    return rows


def failure(error):
    """``Type: message (file:line of the innermost frame)``, for a row that failed."""
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    where = f" ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


def _flatten(value):
    out = []
    for item in (value if isinstance(value, (tuple, list)) else (value,)):
        if isinstance(item, (tuple, list)):
            out += _flatten(item)
        elif item is not None:
            out.append(item)
    return out


def dense_equivalent_rows(dev, base, layer, mode, dtype, args, clock, finish):
    """The same FLOPs as one dense GEMM of (valid_pairs x Cin) @ (Cin x Cout)."""
    pairs = int(layer.rulebook.n_pairs)
    rows_used = max(1, min(pairs, 4_000_000))
    row = dict(base, library="cublas_dense_equivalent", **{"pass": "fwd"},
               gemm_rows=rows_used)
    if clock.over():
        row["skipped"] = "time budget (--budget-s) spent"
        return [finish(row, "fwd", 1)]
    a = dev.randn((rows_used, layer.cin), 7).astype(dtype)
    b = dev.randn((layer.cin, layer.cout), 8).astype(dtype)
    try:
        with dev.cublas_tf32(mode == "tf32"):
            row.update(measure(dev.timer, lambda: dev.xp.matmul(a, b), args.repeat,
                               args.max_ms))
    except Exception as error:
        row["failed"] = failure(error)
        return [finish(row, "fwd", 1)]
    scale = pairs / rows_used
    for key in ("ms", "min_ms", "max_ms"):
        row[key] *= scale
    del a, b
    fb = dict(row, **{"pass": "f+b"})
    for key in ("ms", "min_ms", "max_ms"):
        fb[key] = 3 * row[key]
    return [finish(row, "fwd", 1), finish(fb, "f+b", 3)]


def _spconv_layer(dev, layer, mode, f, w, g, dtype):
    import spconv_baseline as sb

    return sb.DeviceLayer(layer.kind, layer.fine_indices, layer.shape, dev.to_host(w),
                          f, g, dev.name, dtype, kernel=layer.k,
                          stride=1 if layer.kind == "subm" else 2,
                          coarse_indices=layer.coarse_indices)


def spconv_rows(dev, base, layer, mode, f, w, g, args, clock, finish):
    """spconv's rows for one layer and mode (its strided layer rebuilds the pairs on
    every call: its passes are named rb+fwd / rb+f+b, beside sparsegrid's)."""
    import spconv_baseline as sb

    rows = []
    if clock.over():    # do not even build the layer (spconv tunes on its first call)
        names = ("rb+fwd", "rb+f+b") if layer.kind == "strided" else ("fwd", "f+b")
        return [finish(dict(base, library="spconv", **{"pass": name},
                            skipped="time budget (--budget-s) spent"), name, passes)
                for name, passes in zip(names, (1, 3))]
    with sb.precision(mode, dev.name) as dtype:
        try:
            sp = _spconv_layer(dev, layer, mode, f, w, g, dtype)
        except Exception as error:   # reported, not fatal: the other rows stand
            return [dict(base, library="spconv", **{"pass": "fwd"}, failed=failure(error))]
        torch = sp.torch
        timer = (timing.EventTimer(torch.cuda, "torch") if dev.name == "cuda"
                 else timing.HostTimer())
        names = ("rb+fwd", "rb+f+b") if layer.kind == "strided" else ("fwd", "f+b")
        for pass_name, fn, gemm_passes in ((names[0], sp.forward, 1),
                                           (names[1], sp.forward_backward, 3)):
            row = dict(base, library="spconv", algorithm=str(sp.layer.algo),
                       **{"pass": pass_name})
            if dev.name == "cpu":
                row["dtype"] = "float32"   # spconv's CPU build: every mode in float32
            if clock.over():
                row["skipped"] = "time budget (--budget-s) spent"
            else:
                try:
                    row.update(measure(timer, fn, args.repeat, args.max_ms))
                    row["peak_bytes"] = sp.peak_bytes("forward" if gemm_passes == 1
                                                      else "backward")
                except Exception as error:
                    row["failed"] = failure(error)
            rows.append(finish(row, pass_name, gemm_passes))
        del sp
    return rows


def check_layer(dev, layer, mode, f, w, g, args, spconv):
    """Relative L2 error of every algorithm's forward (and spconv's) against a float64
    reference on the same device, with the mode's tolerance."""
    kernels = dev.kernels
    result = {"tolerance": TOLERANCE[mode], "errors": {}}
    try:
        with dev.algorithm("gather_gemm"):
            reference = dev.to_host(kernels.conv_forward(f.astype(np.float64),
                                                         w.astype(np.float64), layer.rulebook))
    except Exception as error:
        result["errors"]["float64 reference"] = f"failed: {failure(error)}"
        result["pass"] = False
        return result
    for algorithm in args.algorithms:
        try:
            with dev.algorithm(algorithm):
                result["errors"][algorithm] = relative_error(
                    dev.to_host(kernels.conv_forward(f, w, layer.rulebook)), reference)
        except Exception as error:
            result["errors"][algorithm] = f"failed: {failure(error)}"
    if spconv["available"]:
        import spconv_baseline as sb

        try:
            with sb.precision(mode, dev.name) as dtype:
                sp = _spconv_layer(dev, layer, mode, f, w, g, dtype)
                result["errors"]["spconv"] = relative_error(sp.output(), reference)
        except Exception as error:
            result["errors"]["spconv"] = f"failed: {failure(error)}"
    result["pass"] = all(isinstance(e, float) and e <= TOLERANCE[mode]
                         for e in result["errors"].values())
    return result


# --------------------------------------------------------------------------
# Ratios, targets, summary
# --------------------------------------------------------------------------


def annotate(rows, ceilings):
    """Ratios to spconv and to the dense equivalent, % of the ceilings, and the targets."""
    index = {}
    for row in rows:
        if row["library"] in ("spconv", "cublas_dense_equivalent") and "ms" in row:
            index[(row["library"], row["scene"], row["layer"], row["mode"], row["pass"])] = row
    gemm, copy = ceilings["gemm_tflops"], ceilings["copy_gbps"]
    for row in rows:
        if "ms" not in row:
            continue
        row["pct_gemm_ceiling"] = 100.0 * row["tflops"] / gemm[row["mode"]]
        row["pct_fp16_gemm_ceiling"] = 100.0 * row["tflops"] / gemm["fp16"]
        row["pct_copy_ceiling"] = 100.0 * row["gbps"] / copy
        if row["library"] != "sparsegrid":
            continue
        key = (row["scene"], row["layer"], row["mode"], row["pass"])
        theirs = index.get(("spconv",) + key)
        dense = index.get(("cublas_dense_equivalent", row["scene"], row["layer"], row["mode"],
                           "f+b" if "b" in row["pass"].replace("rb+", "") else "fwd"))
        if dense:
            row["dense_equivalent_ms"] = dense["ms"]
            row["ratio_vs_dense"] = row["ms"] / dense["ms"]
        if theirs:
            row["spconv_ms"] = theirs["ms"]
            row["ratio_vs_spconv"] = row["ms"] / theirs["ms"]
            if theirs.get("peak_bytes") is not None and row.get("peak_bytes") is not None:
                row["spconv_peak_bytes"] = theirs["peak_bytes"]
                row["meets_memory_target"] = row["peak_bytes"] <= theirs["peak_bytes"]
        targets = {}
        if row["kind"] == "subm" and row["cin"] >= 32 and row["mode"] in ("fp16", "tf32"):
            limit = TARGETS["ratio_fwd"] if row["pass"] == "fwd" else TARGETS["ratio_fb"]
            targets["ratio_vs_spconv"] = {"limit": limit,
                                          "met": (row["ratio_vs_spconv"] <= limit)
                                          if theirs else None}
        if row["kind"] == "subm" and row["n"] >= TARGETS["large_scene_voxels"]:
            if row["cin"] <= 64:
                targets["pct_copy_ceiling"] = {
                    "limit": 100 * TARGETS["copy_fraction_c64"],
                    "met": row["pct_copy_ceiling"] >= 100 * TARGETS["copy_fraction_c64"]}
            if row["cin"] >= 128 and row["mode"] == "fp16":
                targets["pct_fp16_gemm_ceiling"] = {
                    "limit": 100 * TARGETS["fp16_gemm_fraction_c128"],
                    "met": row["pct_fp16_gemm_ceiling"] >=
                    100 * TARGETS["fp16_gemm_fraction_c128"]}
        if targets:
            row["targets"] = targets
    return rows


def summarise(rows, scenes_info):
    """Counts of targets met / missed / unmeasured for the default algorithm, checks."""
    summary = {"algorithm": "auto", "targets": {}, "skipped_rows": 0, "failed_rows": [],
               "not_bit_identical": [], "checks_failed": []}
    for row in rows:
        if "skipped" in row and "budget" in row["skipped"]:
            summary["skipped_rows"] += 1
        if "failed" in row:
            summary["failed_rows"].append(f"{row['scene']} {row['layer']} {row['mode']} "
                                          f"{row['library']} {row.get('algorithm', '')} "
                                          f"{row['pass']}: {row['failed']}")
        if row.get("bit_identical") is False:
            summary["not_bit_identical"].append(f"{row['scene']} {row['layer']} "
                                                f"{row['mode']} {row.get('algorithm')} "
                                                f"{row['pass']}")
        if row.get("algorithm") != "auto" or row["library"] != "sparsegrid":
            continue
        for name, target in row.get("targets", {}).items():
            counts = summary["targets"].setdefault(name, {"met": 0, "missed": [],
                                                          "unmeasured": 0})
            if target["met"] is None:
                counts["unmeasured"] += 1
            elif target["met"]:
                counts["met"] += 1
            else:
                counts["missed"].append(f"{row['scene']} {row['layer']} {row['mode']} "
                                        f"{row['pass']}")
        if row.get("meets_memory_target") is not None:
            counts = summary["targets"].setdefault("peak_memory", {"met": 0, "missed": [],
                                                                   "unmeasured": 0})
            if row["meets_memory_target"]:
                counts["met"] += 1
            else:
                counts["missed"].append(f"{row['scene']} {row['layer']} {row['mode']} "
                                        f"{row['pass']}")
    for scene, info in scenes_info.items():
        for layer, modes in info.get("checks", {}).items():
            for mode, check in modes.items():
                if not check["pass"]:
                    summary["checks_failed"].append(f"{scene} {layer} {mode}: "
                                                    f"{check['errors']}")
    return summary


def print_scene(name, info, rows, algorithms):
    print(f"\n{name}: {info['n']:,} sites, {info['valid_pairs_subm']:,} submanifold pairs "
          f"({info['mean_active_neighbours']:.2f} per site); rulebook "
          f"{info['rulebook_ms']:.3f} ms, plan {info['plan_ms']:.3f} ms")
    stats = info["pair_statistics"]["subm3"]
    print("  computed/valid pairs (subm3), unsorted / sorted: " + ", ".join(
        f"tile {t}: {s['ratio_unsorted']:.2f} / {s['ratio_sorted']:.2f}"
        for t, s in stats.items()))
    header = f"  {'layer':<14}{'mode':<6}{'pass':<8}" + "".join(
        f"{a[:11]:>12}" for a in algorithms) + f"{'spconv':>10}{'ratio':>7}{'TFLOP/s':>9}" \
        f"{'%gemm':>7}{'%copy':>7}{'MiB':>8}{'bits':>6}"
    print(header + "   (ms; ratio, TFLOP/s, % and MiB of auto)")
    groups = {}
    for row in rows:
        groups.setdefault((row["layer"], row["mode"], row["pass"]), []).append(row)
    for (layer, mode, pass_name), group in groups.items():
        by_algo = {r.get("algorithm"): r for r in group if r["library"] == "sparsegrid"}
        spconv = next((r for r in group if r["library"] == "spconv"), {})
        line = f"  {layer:<14}{mode:<6}{pass_name:<8}"
        for a in algorithms:
            r = by_algo.get(a, {})
            line += f"{r['ms']:12.3f}" if "ms" in r else f"{'-':>12}"
        line += f"{spconv['ms']:10.3f}" if "ms" in spconv else f"{'-':>10}"
        auto = by_algo.get("auto", {})
        line += f"{auto['ratio_vs_spconv']:7.2f}" if "ratio_vs_spconv" in auto else f"{'-':>7}"
        if "ms" in auto:
            mib = auto.get("peak_bytes")
            line += (f"{auto['tflops']:9.2f}{auto['pct_gemm_ceiling']:7.1f}"
                     f"{auto['pct_copy_ceiling']:7.1f}"
                     + (f"{mib / 2 ** 20:8.1f}" if mib is not None else f"{'-':>8}")
                     + f"{'yes' if auto.get('bit_identical') else 'NO':>6}")
        print(line)
    for layer, modes in info.get("checks", {}).items():
        for mode, check in modes.items():
            errors = ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in check["errors"].items())
            print(f"  check {layer} {mode}: {'ok' if check['pass'] else 'FAILED'} "
                  f"(tolerance {check['tolerance']:.0e}; {errors})")


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: rehearse the benchmark on the CPU backend")
    parser.add_argument("--scenes", nargs="+", default=None,
                        help=f"scenes.scene names (default {' '.join(DEFAULT_SCENES)})")
    parser.add_argument("--channels", nargs="+", type=int, default=None,
                        help="submanifold C (default 32 64 128 256)")
    parser.add_argument("--strided-channels", nargs="*", type=int, default=None,
                        help="C of the k2s2 and inverse layers (default 64; none: skip)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="precision modes, measured in this order (mode-major)")
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS,
                        default=list(ALGORITHMS))
    parser.add_argument("--all-algorithms", action="store_true",
                        help="also time implicit_gemm in fp32 (where it falls back)")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls (default 10)")
    parser.add_argument("--max-ms", type=float, default=400.0,
                        help="about this much timed work per measurement (>= 3 calls)")
    parser.add_argument("--tile-rows", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--check-channels", type=int, default=None,
                        help="C of the checked submanifold layer (default 64)")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="stop timing after this many seconds (0: no limit)")
    parser.add_argument("--no-spconv", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny scenes, C 8, one repeat: the test suite's run")
    parser.add_argument("--json", help="write the results to this file (after each scene)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.scenes = args.scenes or list(SMOKE_SCENES if smoke else DEFAULT_SCENES)
    args.channels = args.channels or ([8] if smoke else [32, 64, 128, 256])
    if args.strided_channels is None:
        args.strided_channels = [8] if smoke else [64]
    args.repeat = args.repeat or (1 if smoke else 10)
    if args.check_channels is None:
        args.check_channels = args.channels[min(1, len(args.channels) - 1)]
    if args.check_channels not in args.channels:
        parser.error(f"--check-channels {args.check_channels} is not among --channels "
                     f"{args.channels}")
    for name in ("channels", "strided_channels", "tile_rows"):
        if any(v < 1 for v in getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} must be positive ints")
    return args


def open_device(args):
    """The benchmark device and spconv's status on it (probed unless ``--no-spconv``),
    printed in one line (both GPU benchmarks start so)."""
    import spconv_baseline as sb

    dev = Device(args.device)
    spconv = ({"available": False, "error": "not requested (--no-spconv)"} if args.no_spconv
              else sb.device_status(args.device, timeout=30))
    print(f"device {args.device}: {dev.description['name']}; spconv: "
          + (f"{spconv['version']} (torch {spconv['torch']})" if spconv["available"]
             else f"absent ({spconv['error'].splitlines()[-1]})"), flush=True)
    return dev, spconv


def main(argv=None):
    args = parse_args(argv)
    clock = Clock(args.budget_s)
    import scenes

    dev, spconv = open_device(args)
    ceilings = dev.ceilings(args.smoke)
    print("ceilings: GEMM " + ", ".join(f"{m} {v:.3g}" for m, v in
                                        ceilings["gemm_tflops"].items())
          + f" TFLOP/s; copy {ceilings['copy_gbps']:.0f} GB/s", flush=True)
    results = {"device": dev.description, "args": vars(args), "ceilings": ceilings,
               "definitions": DEFINITIONS, "spconv": spconv, "scenes": {}, "rows": []}

    def write():
        if args.json:
            with open(args.json + ".part", "w") as handle:
                json.dump(results, handle, indent=1, default=str)
            os.replace(args.json + ".part", args.json)

    write()                       # the device and its ceilings, before any scene
    done_rows = []

    def on_mode(name):
        def record(info, rows):
            results["scenes"][name] = info
            results["rows"] = done_rows + rows
            results["elapsed_s"] = clock.elapsed()
            write()
        return record

    for name in args.scenes:
        if clock.over():
            results["scenes"][name] = {"skipped": "time budget (--budget-s) spent"}
            print(f"\n{name}: skipped (time budget spent)")
            continue
        indices, shape = scenes.scene(name)
        info, rows = scene_rows(dev, name, indices, shape, args, spconv, clock,
                                on_mode=on_mode(name))
        annotate(rows, ceilings)
        results["scenes"][name] = info
        done_rows += rows
        results["rows"] = list(done_rows)
        print_scene(name, info, rows, args.algorithms)
        results["summary"] = summarise(results["rows"], results["scenes"])
        results["elapsed_s"] = clock.elapsed()
        write()
    results["summary"] = summarise(results["rows"], results["scenes"])
    results["elapsed_s"] = clock.elapsed()
    write()
    summary = results["summary"]
    print(f"\nsummary ({summary['algorithm']}): " + ("; ".join(
        f"{name}: {t['met']} met, {len(t['missed'])} missed, {t['unmeasured']} unmeasured"
        for name, t in summary["targets"].items()) or "no targets evaluated"))
    for key in ("checks_failed", "not_bit_identical", "failed_rows"):
        if summary[key]:
            print(f"{key}: " + "; ".join(summary[key][:10]))
    print(f"{summary['skipped_rows']} rows skipped by the time budget; "
          f"{clock.elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
