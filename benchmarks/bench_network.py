"""Whole networks on the GPU: sparsegrid beside spconv 2.3.8, same input, same process.

Run on a machine with an NVIDIA GPU and CuPy (spconv optional: without it its rows are
reported absent, with the reason)::

    python benchmarks/bench_network.py --json /tmp/net.json
    python benchmarks/bench_network.py --networks spconv_basic --sizes 120k --modes fp16
    python benchmarks/bench_network.py --device cpu --smoke          # CPU rehearsal

Networks:

  spconv_basic    spconv's own benchmark network (``Net`` in spconv 2.3.8's
                  ``spconv/benchmark/basic.py``, the network of its test/benchmark.py and
                  docs/BENCHMARK.md): 14 submanifold 3x3x3 convolutions without bias in
                  seven pairs, 3->64, 64->64, then 64->96, 96->96, 96->128, 128->128,
                  128->160, 160->160, 160->192, 192->192, 192->224, 224->224, 224->256,
                  256->256, with a 2x2x2 / 2 max pooling between consecutive pairs (6
                  poolings); no normalisation, no activation. sparsegrid:
                  SubmanifoldConvolution and MaxPooling(3, 2, 2); spconv: SubMConv3d
                  (one indice_key per resolution) and SparseMaxPool3d(2, 2). Input: LiDAR
                  batches (``lidar_120k``, ``lidar_900k``: spconv's docs time it on 120k
                  Waymo voxels and on 8 shifted copies, ~900k), 3 input channels. spconv's
                  docs report 13.0 ms fp16 forward / 12.4 ms backward at 120k on an A100.
                  sparsegrid's weights are copied into spconv's layers, so the outputs are
                  compared too.
  scn_unet        SparseConvNet's U-Net as its ScanNet example builds it: a submanifold
                  3->m layer, ``sparsegrid.nn.UNet(3, reps, [m, 2m, ..., 7m])`` (per level
                  BN-ReLU + submanifold 3x3x3 blocks, a 2x2x2 / 2 strided convolution down,
                  the level below, a 2x2x2 transposed convolution up, the skip
                  concatenated), then BN-ReLU; m = 32, reps = 1. spconv: the same tree of
                  BatchNorm1d + ReLU, SubMConv3d, SparseConv3d(2, 2) and
                  SparseInverseConv3d(2) on its indice_key, features concatenated (its own
                  weights: timing only). Input: indoor batches (``room_120k``,
                  ``room_900k``).

Spatial shapes are the scenes' padded up to multiples of 2^levels (every pooling and
strided layer divides exactly), the same for both libraries. Precision modes
(``--modes``, default fp16 and tf32; fp32 also possible): as bench_conv_cuda.py. For
sparsegrid every algorithm of ``--algorithms`` (``sparsegrid.cuda.conv_algorithm``).

Passes, each from the raw indices (every call builds the input tensor and so every
rulebook, as spconv builds its pairs on every call of its benchmark): ``fwd`` (forward
without gradients), ``f+b`` (forward with gradients and the backward of
``(out * g).sum()``: parameter and input gradients), ``bwd`` (that backward alone, timed
after an untimed forward, as spconv's docs time "backward"). Medians of ``--repeat`` CUDA
event timings after two warm-ups (perf_counter on the CPU); peak memory of one ``f+b``
(CuPy MemoryHook / torch.cuda.max_memory_allocated, as bench_conv_cuda.py). Targets
(issue 11): the whole network <= 0.8x spconv's time forward, <= 0.9x forward+backward,
in fp16 and TF32, for ``auto``.

``--device cpu`` rehearses every path but the CUDA-only calls on the CPU backend (its
float16 kernels compute in float32; spconv's CPU build runs every mode in float32); ``--smoke`` shrinks the networks (channels / 8, U-Net of 4 levels)
onto tiny scenes with one repeat. ``--budget-s`` stops timing after that many seconds
(later rows listed as skipped); ``--json`` is rewritten after every network and size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (HERE, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import bench_conv_cuda as layers_bench  # noqa: E402  (Device, measure, Clock)

NETWORKS = ("spconv_basic", "scn_unet")
SCENE_FAMILY = {"spconv_basic": "lidar", "scn_unet": "room"}
BASIC_PLANES = [(3, 64), (64, 64), (64, 96), (96, 96), (96, 128), (128, 128), (128, 160),
                (160, 160), (160, 192), (192, 192), (192, 224), (224, 224), (224, 256),
                (256, 256)]
TOLERANCE = {"fp32": 1e-4, "tf32": 2e-2, "fp16": 2e-2}
TARGETS = {"fwd": 0.8, "f+b": 0.9}


# --------------------------------------------------------------------------
# The networks, in both libraries
# --------------------------------------------------------------------------


def basic_planes(scale):
    """spconv_basic's (nIn, nOut) per submanifold layer, channels divided by ``scale``
    (the input's 3 kept)."""
    return [(a if a == 3 else max(1, a // scale), max(1, b // scale)) for a, b in BASIC_PLANES]


def sparsegrid_basic(scale, relu_before_pool=False):
    """spconv_basic in sparsegrid.nn; ``relu_before_pool``: a ReLU before each pooling,
    which is max(0, max over the window): spconv's pooling where it starts from zero
    (its CPU build does), for the output check only."""
    import sparsegrid.nn as scn

    net = scn.Sequential()
    for i, (a, b) in enumerate(basic_planes(scale)):
        if i and i % 2 == 0:
            if relu_before_pool:
                net.add(scn.ReLU())
            net.add(scn.MaxPooling(3, 2, 2))
        net.add(scn.SubmanifoldConvolution(3, a, b, 3, False))
    return net


def spconv_basic(torch, spconv, scale):
    layers = []
    for i, (a, b) in enumerate(basic_planes(scale)):
        if i and i % 2 == 0:
            layers.append(spconv.SparseMaxPool3d(2, 2))
        layers.append(spconv.SubMConv3d(a, b, 3, bias=False, indice_key=f"c{i // 2}"))
    return spconv.SparseSequential(*layers)


def unet_planes(m, levels):
    return [m * (i + 1) for i in range(levels)]


def sparsegrid_unet(m, levels, reps):
    import sparsegrid.nn as scn

    return scn.Sequential(scn.SubmanifoldConvolution(3, 3, m, 3, False),
                          scn.UNet(3, reps, unet_planes(m, levels)),
                          scn.BatchNormReLU(m))


def spconv_unet(torch, spconv, m, levels, reps):
    """sparsegrid.nn.UNet's tree (non-residual blocks, ReLU) in spconv's modules."""
    nn = torch.nn

    def block(a, b, depth):
        return spconv.SparseSequential(nn.BatchNorm1d(a, eps=1e-4), nn.ReLU(),
                                       spconv.SubMConv3d(a, b, 3, bias=False,
                                                         indice_key=f"subm{depth}"))

    class Level(nn.Module):
        def __init__(self, planes, depth):
            super().__init__()
            self.pre = spconv.SparseSequential(*[block(planes[0], planes[0], depth)
                                                 for _ in range(reps)])
            self.deeper = len(planes) > 1
            if self.deeper:
                self.down = spconv.SparseSequential(
                    nn.BatchNorm1d(planes[0], eps=1e-4), nn.ReLU(),
                    spconv.SparseConv3d(planes[0], planes[1], 2, 2, bias=False,
                                        indice_key=f"down{depth}"))
                self.inner = Level(planes[1:], depth + 1)
                self.up = spconv.SparseSequential(
                    nn.BatchNorm1d(planes[1], eps=1e-4), nn.ReLU(),
                    spconv.SparseInverseConv3d(planes[1], planes[0], 2, bias=False,
                                               indice_key=f"down{depth}"))
                self.post = spconv.SparseSequential(*[
                    block(planes[0] * (2 if i == 0 else 1), planes[0], depth)
                    for i in range(reps)])

        def forward(self, x):
            x = self.pre(x)
            if not self.deeper:
                return x
            branch = self.up(self.inner(self.down(x)))
            joined = x.replace_feature(torch.cat([x.features, branch.features], 1))
            return self.post(joined)

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = spconv.SubMConv3d(3, m, 3, bias=False, indice_key="subm0")
            self.body = Level(unet_planes(m, levels), 0)
            self.last = spconv.SparseSequential(nn.BatchNorm1d(m, eps=1e-4), nn.ReLU())

        def forward(self, x):
            return self.last(self.body(self.first(x)))

    return UNet()


def padded_shape(shape, levels):
    """``shape`` rounded up to multiples of 2 ** levels."""
    step = 2 ** levels
    return tuple(int(-(-s // step) * step) for s in shape)


# --------------------------------------------------------------------------
# One network on one input
# --------------------------------------------------------------------------


class _Passes:
    """backward and forward_backward from a subclass's forward_graph and self.grad."""

    def backward(self, out):
        out.features.backward(self.grad)
        return out

    def forward_backward(self):
        return self.backward(self.forward_graph())


class SparsegridNet(_Passes):
    """A sparsegrid network on the device, called from the raw indices every time."""

    def __init__(self, dev, model, indices, shape, features, grad_seed):
        import sparsegrid as sg
        from sparsegrid import autodiff as ad

        self.dev, self.sg, self.ad = dev, sg, ad
        self.model = model.to(dev.name)
        self.indices = dev.asarray(indices)
        self.shape = shape
        self.features = features
        self.grad_seed = grad_seed
        self.grad = None

    def _input(self):
        return self.sg.SparseTensor(self.ad.Tensor(self.features), self.indices, self.shape)

    def forward(self):
        with self.ad.no_grad():
            return self.model(self._input())

    def forward_graph(self):
        self.model.zero_grad()
        out = self.model(self._input())
        if self.grad is None or self.grad.shape != out.features.shape:
            self.grad = self.dev.randn(out.features.shape, self.grad_seed).astype(
                out.features.data.dtype)
        return out

    def output(self):
        """Output sites (host int32) and features (host float64)."""
        out = self.forward()
        values = out.features
        values = values.data if isinstance(values, self.ad.Tensor) else values
        return (self.dev.to_host(out.indices).astype(np.int32),
                self.dev.to_host(values).astype(np.float64))


class SpconvNet(_Passes):
    """The spconv network on the same input (features given as device / host arrays)."""

    def __init__(self, torch, spconv, model, indices, shape, features, device, dtype,
                 grad_seed):
        self.torch, self.spconv = torch, spconv
        dev = torch.device(device)
        self.model = model.to(dev, dtype).train()
        self.indices = torch.from_numpy(np.ascontiguousarray(indices, np.int32)).to(dev)
        self.shape = list(shape)
        self.batch = int(indices[:, 0].max()) + 1 if len(indices) else 1
        if isinstance(features, np.ndarray):
            self.features = torch.from_numpy(np.ascontiguousarray(features)).to(dev, dtype)
        else:
            self.features = torch.from_dlpack(features).to(dev, dtype).contiguous()
        self.device, self.grad_seed, self.grad = dev, grad_seed, None

    def _input(self, features):
        return self.spconv.SparseConvTensor(features, self.indices, self.shape, self.batch)

    def forward(self):
        with self.torch.no_grad():
            return self.model(self._input(self.features))

    def forward_graph(self):
        self.model.zero_grad(set_to_none=True)
        leaf = self.features.detach().requires_grad_(True)
        out = self.model(self._input(leaf))
        if self.grad is None or self.grad.shape != out.features.shape:
            gen = self.torch.Generator(device="cpu").manual_seed(self.grad_seed)
            self.grad = self.torch.randn(tuple(out.features.shape), generator=gen).to(
                self.device, out.features.dtype)
        return out

    def output(self):
        out = self.forward()
        return (out.indices.cpu().numpy().astype(np.int32),
                out.features.detach().float().cpu().numpy().astype(np.float64))

    def load_from(self, sg_model):
        """Copy the submanifold weights of a sparsegrid spconv_basic, in layer order."""
        import spconv_baseline as sb
        import sparsegrid.nn as scn

        ours = [m for m in sg_model.modules() if isinstance(m, scn.SubmanifoldConvolution)]
        theirs = [m for m in self.model.modules() if isinstance(m, self.spconv.SubMConv3d)]
        if len(ours) != len(theirs):
            raise ValueError(f"load_from: {len(ours)} sparsegrid and {len(theirs)} spconv "
                             "submanifold layers")
        with self.torch.no_grad():
            for a, b in zip(ours, theirs):
                data = a.weight.data
                host = data.get() if hasattr(data, "get") else np.asarray(data)
                b.weight.copy_(self.torch.from_numpy(sb.weight_to_spconv_kernel(
                    host.astype(np.float32), 3)).to(b.weight.device, b.weight.dtype))


def time_passes(timer, net, args, clock):
    """fwd, f+b and bwd measurements (dicts), or skipped markers."""
    out = {}
    for name in ("fwd", "f+b", "bwd"):
        if clock.over():
            out[name] = {"skipped": "time budget (--budget-s) spent"}
            continue
        if name == "fwd":
            out[name] = layers_bench.measure(timer, net.forward, args.repeat, args.max_ms)
        elif name == "f+b":
            out[name] = layers_bench.measure(timer, net.forward_backward, args.repeat,
                                             args.max_ms)
        else:
            count = max(1, args.repeat)
            first = out.get("f+b", {}).get("ms")
            if count > 3 and first:
                count = max(3, min(count, int(args.max_ms / first)))
            times = sorted(timer.times_after_setup_ms(net.forward_graph, net.backward,
                                                      count, warmup=1))
            out[name] = {"ms": float(np.median(times)), "min_ms": times[0],
                         "max_ms": times[-1], "repeats": len(times)}
    return out


def sparsegrid_model(network, args, dtype_name, relu_before_pool=False):
    import sparsegrid.nn as scn

    scn.manual_seed(0)
    if network == "spconv_basic":
        model = sparsegrid_basic(args.scale, relu_before_pool)
    else:
        model = sparsegrid_unet(args.unet_m, args.unet_levels, args.unet_reps)
    return model.astype(dtype_name)


def network_rows(dev, network, scene_name, indices, shape, args, spconv, clock):
    """Every row of one network on one input, and its output checks."""
    import spconv_baseline as sb

    n = len(indices)
    base = {"network": network, "scene": scene_name, "n": n, "shape": list(shape)}
    rows, checks = [], {}
    features32 = dev.randn((n, 3), 11)
    for mode in args.modes:
        with dev.precision(mode) as dtype:
            features = features32.astype(dtype)
            head = dict(base, mode=mode, dtype=np.dtype(dtype).name)
            outputs = {}
            for algorithm in args.algorithms:
                row = dict(head, library="sparsegrid", algorithm=algorithm)
                if clock.over():
                    rows.append(dict(row, skipped="time budget (--budget-s) spent"))
                    continue
                try:   # one failing configuration must not cost the run the others
                    with dev.algorithm(algorithm):
                        net = SparsegridNet(dev, sparsegrid_model(network, args,
                                                                  np.dtype(dtype).name),
                                            indices, shape, features, grad_seed=5)
                        row["passes"] = time_passes(dev.timer, net, args, clock)
                        if not clock.over():
                            row["peak_bytes_fb"] = dev.peak_bytes(net.forward_backward)
                            outputs[algorithm] = net.output()
                            row["bit_identical_fwd"] = bool(np.array_equal(
                                outputs[algorithm][1], net.output()[1]))
                        del net
                except Exception as error:
                    row["failed"] = layers_bench.failure(error)
                rows.append(row)
                dev.free_memory()
            sp_out = None
            if spconv["available"] and not clock.over():
                row = dict(head, library="spconv")
                try:
                    with sb.precision(mode, dev.name) as torch_dtype:
                        torch, spmod = sb.import_for_device(dev.name)
                        torch.manual_seed(0)
                        if network == "spconv_basic":
                            model = spconv_basic(torch, spmod, args.scale)
                        else:
                            model = spconv_unet(torch, spmod, args.unet_m, args.unet_levels,
                                                args.unet_reps)
                        net = SpconvNet(torch, spmod, model, indices, shape, features,
                                        dev.name, torch_dtype, grad_seed=5)
                        if network == "spconv_basic":
                            net.load_from(sparsegrid_model(network, args, "float32"))
                        timer = (layers_bench.timing.EventTimer(torch.cuda, "torch")
                                 if dev.name == "cuda" else layers_bench.timing.HostTimer())
                        row["passes"] = time_passes(timer, net, args, clock)
                        row["peak_bytes_fb"] = sb.torch_peak_bytes(net.forward_backward,
                                                                   dev.name)
                        if network == "spconv_basic":
                            sp_out = net.output()
                        del net, model
                        if dev.name == "cuda":
                            torch.cuda.empty_cache()
                except Exception as error:   # reported; sparsegrid's rows stand
                    row["failed"] = layers_bench.failure(error)
                rows.append(row)
            elif not spconv["available"]:
                rows.append(dict(head, library="spconv", absent=spconv["error"]))
            if network == "spconv_basic" and outputs and clock.over(grace=5.0):
                checks[mode] = {"pass": True, "tolerance": TOLERANCE[mode], "errors": {},
                                "skipped": "time budget (--budget-s) spent"}
            elif network == "spconv_basic" and outputs:   # a little past the budget
                try:
                    checks[mode] = check_outputs(dev, network, args, indices, shape,
                                                 features, outputs, sp_out, mode)
                except Exception as error:
                    checks[mode] = {"pass": False, "tolerance": TOLERANCE[mode],
                                    "errors": {"check": f"failed: "
                                               f"{layers_bench.failure(error)}"}}
    annotate(rows)
    return rows, checks


def check_outputs(dev, network, args, indices, shape, features, outputs, sp_out, mode):
    """Each output against sparsegrid's network in float64 (gather-GEMM, same device).

    spconv's against two references, the plain one and one with a ReLU before each
    pooling (max(0, window max): spconv's CPU pooling starts from zero), since which one
    its device kernels follow is for the run to find out: the nearer one counts, and
    ``spconv_pooling`` says which it was."""
    def reference_output(relu_before_pool):
        with dev.algorithm("gather_gemm"), dev.sg_cuda.tf32(False):
            ref_net = SparsegridNet(dev, sparsegrid_model(network, args, "float64",
                                                          relu_before_pool),
                                    indices, shape, features.astype(np.float64), grad_seed=5)
            return ref_net.output()

    ref_sites, reference = reference_output(False)
    import spconv_baseline as sb

    result = {"tolerance": TOLERANCE[mode], "errors": {}}
    for algorithm, (sites, values) in outputs.items():
        if not np.array_equal(sites, ref_sites):
            result["errors"][algorithm] = "output sites differ from the reference's"
            continue
        result["errors"][algorithm] = layers_bench.relative_error(values, reference)
    if sp_out is not None:
        sites, values = sp_out
        try:
            perm = sb.match_rows(ref_sites, sites)
            plain = layers_bench.relative_error(values[perm], reference)
            zero_start = layers_bench.relative_error(values[perm], reference_output(True)[1])
            result["errors"]["spconv"] = min(plain, zero_start)
            result["spconv_pooling"] = ("window max" if plain <= zero_start else
                                        "max(0, window max): starts from zero")
            result["spconv_errors_plain_and_zero_start"] = [plain, zero_start]
        except ValueError as error:
            result["errors"]["spconv"] = f"output sites differ: {error}"
    result["pass"] = all(isinstance(e, float) and e <= TOLERANCE[mode]
                         for e in result["errors"].values())
    return result


def annotate(rows):
    """Ratios to spconv per pass, the targets, peak memory against spconv's."""
    theirs = {(r["network"], r["scene"], r["mode"]): r for r in rows
              if r["library"] == "spconv" and "passes" in r}
    for row in rows:
        if row["library"] != "sparsegrid" or "passes" not in row:
            continue
        other = theirs.get((row["network"], row["scene"], row["mode"]))
        if other is None:
            continue
        row["ratio_vs_spconv"], row["targets"] = {}, {}
        for name, measured in row["passes"].items():
            mine, ref = measured.get("ms"), other["passes"].get(name, {}).get("ms")
            if mine is None or not ref:
                continue
            row["ratio_vs_spconv"][name] = mine / ref
            if name in TARGETS and row["mode"] in ("fp16", "tf32"):
                row["targets"][name] = {"limit": TARGETS[name],
                                        "met": mine / ref <= TARGETS[name]}
        if row.get("peak_bytes_fb") is not None and other.get("peak_bytes_fb") is not None:
            row["spconv_peak_bytes_fb"] = other["peak_bytes_fb"]
            row["meets_memory_target"] = row["peak_bytes_fb"] <= other["peak_bytes_fb"]


def print_rows(rows, checks):
    for row in rows:
        label = row["library"] + (f" {row['algorithm']}" if "algorithm" in row else "")
        line = f"  {row['network']:<13}{row['scene']:<12}{row['mode']:<6}{label:<26}"
        if "passes" in row:
            for name in ("fwd", "f+b", "bwd"):
                p = row["passes"].get(name, {})
                line += f"{p['ms']:10.2f}" if "ms" in p else f"{'-':>10}"
            ratio = row.get("ratio_vs_spconv", {})
            line += "".join(f"{ratio[k]:7.2f}" if k in ratio else f"{'-':>7}"
                            for k in ("fwd", "f+b"))
            peak = row.get("peak_bytes_fb")
            line += f"{peak / 2 ** 20:9.1f}" if peak is not None else f"{'-':>9}"
        else:
            reason = row.get("skipped") or row.get("failed") or row.get("absent", "")
            line += "  " + reason.splitlines()[-1][:70]
        print(line)
    for mode, check in checks.items():
        errors = ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in check["errors"].items())
        pooling = f"; spconv pooling: {check['spconv_pooling']}" if "spconv_pooling" in check \
            else ""
        print(f"  output check {mode}: {'ok' if check['pass'] else 'FAILED'} (tolerance "
              f"{check['tolerance']:.0e}; {errors}{pooling})")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    parser.add_argument("--sizes", nargs="+", default=None,
                        help="input sizes: scenes <family>_<size> (default 120k 900k)")
    parser.add_argument("--modes", nargs="+", choices=layers_bench.MODES,
                        default=["fp16", "tf32"])
    parser.add_argument("--algorithms", nargs="+", choices=layers_bench.ALGORITHMS,
                        default=["auto", "implicit_gemm", "gather_gemm"])
    parser.add_argument("--repeat", type=int, default=None, help="timed calls (default 10)")
    parser.add_argument("--max-ms", type=float, default=1500.0,
                        help="about this much timed work per measurement (>= 3 calls)")
    parser.add_argument("--scale", type=int, default=None,
                        help="spconv_basic's channels divided by this (default 1)")
    parser.add_argument("--unet-m", type=int, default=None, help="U-Net width m (32)")
    parser.add_argument("--unet-levels", type=int, default=None, help="U-Net levels (7)")
    parser.add_argument("--unet-reps", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="stop timing after this many seconds (0: no limit)")
    parser.add_argument("--no-spconv", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="channels / 8, a 4-level U-Net of m 8, tiny scenes, 1 repeat")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.sizes = args.sizes or (["smoke"] if smoke else ["120k", "900k"])
    args.repeat = args.repeat or (1 if smoke else 10)
    args.scale = args.scale or (8 if smoke else 1)
    args.unet_m = args.unet_m or (8 if smoke else 32)
    args.unet_levels = args.unet_levels or (4 if smoke else 7)
    for name in ("repeat", "scale", "unet_m", "unet_levels", "unet_reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive int")
    return args


def main(argv=None):
    args = parse_args(argv)
    clock = layers_bench.Clock(args.budget_s)
    import scenes

    dev, spconv = layers_bench.open_device(args)
    results = {"device": dev.description, "args": vars(args), "spconv": spconv,
               "targets": TARGETS, "inputs": {}, "rows": [], "checks": {}}

    def write():
        results["elapsed_s"] = clock.elapsed()
        if args.json:
            with open(args.json + ".part", "w") as handle:
                json.dump(results, handle, indent=1, default=str)
            os.replace(args.json + ".part", args.json)

    write()                       # the device and spconv's status, before any network

    print(f"  {'network':<13}{'scene':<12}{'mode':<6}{'library':<26}{'fwd ms':>10}"
          f"{'f+b ms':>10}{'bwd ms':>10}{'r fwd':>7}{'r f+b':>7}{'MiB f+b':>9}")
    for size in args.sizes:          # the smaller inputs of every network first
        for network in args.networks:
            levels = 6 if network == "spconv_basic" else args.unet_levels - 1
            family = SCENE_FAMILY[network]
            scene_name = f"smoke_{family}" if size == "smoke" else f"{family}_{size}"
            if clock.over():
                results["rows"].append({"network": network, "scene": scene_name,
                                        "skipped": "time budget (--budget-s) spent"})
                continue
            indices, shape = scenes.scene(scene_name)
            shape = padded_shape(shape, levels)
            results["inputs"][f"{network} {scene_name}"] = {"n": len(indices),
                                                            "shape": list(shape)}
            rows, checks = network_rows(dev, network, scene_name, indices, shape, args,
                                        spconv, clock)
            results["rows"] += rows
            if checks:
                results["checks"][f"{network} {scene_name}"] = checks
            print_rows(rows, checks)
            write()
    met = [r for r in results["rows"] if r.get("algorithm") == "auto" and r.get("targets")]
    summary = {"met": [], "missed": []}
    for row in met:
        for name, target in row["targets"].items():
            summary["met" if target["met"] else "missed"].append(
                f"{row['network']} {row['scene']} {row['mode']} {name}")
    summary["failed"] = [f"{r['network']} {r['scene']} {r.get('mode')} {r.get('library')} "
                         f"{r.get('algorithm', '')}: {r['failed']}"
                         for r in results["rows"] if "failed" in r]
    summary["checks_failed"] = [f"{key} {mode}: {check['errors']}"
                                for key, modes in results["checks"].items()
                                for mode, check in modes.items() if not check["pass"]]
    results["summary"] = summary
    write()
    print(f"targets (auto): {len(summary['met'])} met, {len(summary['missed'])} missed"
          + (f" ({'; '.join(summary['missed'])})" if summary["missed"] else "")
          + f"; {clock.elapsed():.0f} s")
    for key in ("failed", "checks_failed"):
        if summary[key]:
            print(f"{key}: " + "; ".join(summary[key][:10]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
