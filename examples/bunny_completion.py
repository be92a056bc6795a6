"""Shape completion: restore a cut-away part of the Stanford Bunny with a generative network.

Data: the 50,000 vertices of the Stanford Bunny inside the ``pymeshfix==0.18.1`` wheel
(fetched once through pip into ~/.cache/sparsegrid, or $SPARSEGRID_DATA), or any PLY
point cloud given with ``--input``.

Task. Every sample is the shape in a random pose -- any rotation about the vertical axis
(z), a size of 85-95 % of the grid (scale jitter), its bounding box centred -- voxelised
into an ``R^3`` grid (the voxels its points fall into: a surface shell, about 2,100 voxels
at R = 32). A random region is then cut away: half the samples lose every voxel beyond a
random plane, the others every voxel inside a ball around one of their voxels, with the
plane or the radius placed so that 10-30 % of the voxels go. The network sees the rest
and must give back the whole shape.

Network (MinkowskiEngine's completion network in miniature, on sparsegrid.nn; every
convolution is followed by BatchNormReLU):

    encoder    R: 2 x SubmanifoldConvolution f3 (1 -> 16 -> 16 channels), then
               3 x [Convolution f2 s2 -> SubmanifoldConvolution f3]  to R/2, R/4, R/8
               (32, 48, 64 channels)
    bottleneck R/8: the union with a zero tensor on every cell of the R/8 grid, so the
               decoder can grow back cells the cut emptied entirely; 2 x Submanifold f3
    decoder    3 x [GenerativeConvolutionTranspose f2 s2 (all 8 children of every site)
               -> Union with the encoder's tensor at that scale (skip)
               -> SubmanifoldConvolution f3 -> NetworkInNetwork c -> 1: occupancy logits
               -> Pruning: keep the sites with logit > 0]  to R/4, R/2, R

Loss: binary cross-entropy (``autodiff.binary_cross_entropy_with_logits``; sparsegrid.nn
has no loss layer for it) of the occupancy logits against the true occupancy of every
generated site, summed over the three scales (a cell of scale R/2^k is occupied when any
voxel of the full shape lies in it). In training the pruning also keeps every true site,
as MinkowskiEngine's example does, so the finer scales learn on the right sites from the
first step; evaluation keeps only what the network predicts. Adam (lr 4e-3, cosine
schedule), batches of 4 freshly drawn poses and cuts.

Evaluation: held-out poses and cuts (their own seeded random stream, independent of the
training stream). Printed: the IoU of the completed voxel set against the full shape, the
IoU of the input alone (the baseline: the input is a subset of the shape, so its IoU is
the fraction kept), and inside the cut region (the half-space or ball, where the input
has nothing): the share of the removed voxels restored and the IoU there. A PNG shows
input, completion and truth side by side for the first held-out sample (sparsegrid.plot;
needs matplotlib); ``--ply`` writes its completed voxels.

    python examples/bunny_completion.py [--steps 1500] [--resolution 32] [--batch-size 4]
        [--seed 0] [--out bunny_completion.png] [--ply completed.ply] [--input shape.ply]
        [--device {cpu,cuda}] [--threads N]

Measured results and the design choices: docs/pointcloud.md, "Shape completion example".
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time

import numpy as np

import sparsegrid
import sparsegrid.nn as scn
from sparsegrid import autodiff as ad
from sparsegrid import backend
from sparsegrid.generative import union
from sparsegrid.nn.optim import Adam, CosineAnnealingLR
from sparsegrid.pointcloud import voxelize
from sparsegrid.progress import progress

from datasets import load_bunny
from train_utils import add_device_argument, chosen_device

LEVELS = 3                      # strided steps: R -> R/2 -> R/4 -> R/8
CHANNELS = (16, 32, 48, 64)     # per scale R, R/2, R/4, R/8
SIZE = (0.85, 0.95)             # of the grid: every rotation about the vertical axis fits
CUT = (0.10, 0.30)              # fraction of the voxels cut away


# ----------------------------------------------------------------------------- samples

def canonical(points):
    """The shape centred on its vertical axis, base at z = 0, in units of its largest
    extent over every rotation about that axis (so every yaw fits a unit box)."""
    points = np.asarray(points, np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or not np.isfinite(points).all():
        raise ValueError(f"the shape must be finite (N, 3) points; got an array of shape "
                         f"{points.shape}" + ("" if points.ndim != 2 or points.shape[1] != 3
                                              else " with NaN or inf"))
    if len(points) == 0:
        raise ValueError("the shape has no points")
    low, high = points.min(axis=0), points.max(axis=0)
    centred = points - np.array([(low[0] + high[0]) / 2, (low[1] + high[1]) / 2, low[2]])
    radius = np.sqrt((centred[:, :2] ** 2).sum(axis=1)).max()
    extent = max(2 * radius, high[2] - low[2])
    if not extent > 0:
        raise ValueError("the shape needs points spread over some extent; got a single point")
    return centred / extent


def rotation(axis, angle):
    """The (3, 3) rotation by ``angle`` about the unit ``axis`` (Rodrigues)."""
    x, y, z = axis
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def posed_voxels(shape, resolution, rng):
    """The voxels (int64 (n, 3), sorted) of ``shape`` (in :func:`canonical` form) in a
    random pose: any rotation about the vertical axis, a size of 85-95 % of the grid,
    its bounding box centred in the grid."""
    points = shape @ rotation((0.0, 0.0, 1.0), rng.uniform(0, 2 * math.pi)).T
    low, high = points.min(axis=0), points.max(axis=0)
    points = (points - (low + high) / 2) * (rng.uniform(*SIZE) * resolution) + resolution / 2
    voxels = voxelize(points, 1.0, origin=(0, 0, 0), bounds=(0, resolution)).tensor
    return voxels.indices[:, 1:].astype(np.int64)


def random_cut(voxels, rng):
    """Cut 10-30 % of ``voxels`` away: beyond a random plane or inside a ball.

    Returns ``(removed, region)``: a boolean mask over the voxels and the region, a
    tuple ``("plane", normal, offset)`` (cells with ``centre . normal > offset``) or
    ``("ball", centre, radius)``; :func:`in_region` tests any cells against it.
    """
    fraction = rng.uniform(*CUT)
    centres = voxels + 0.5
    if rng.random() < 0.5:
        normal = rng.normal(size=3)
        normal /= np.linalg.norm(normal)
        offset = np.quantile(centres @ normal, 1 - fraction)
        region = ("plane", normal, offset)
    else:
        centre = centres[rng.integers(len(voxels))]
        radius = np.quantile(np.linalg.norm(centres - centre, axis=1), fraction)
        region = ("ball", centre, radius)
    return in_region(region, voxels), region


def in_region(region, voxels):
    """Which cells (int (n, 3)) have their centre in the cut region."""
    kind, where, size = region
    centres = voxels + 0.5
    if kind == "plane":
        return centres @ where > size
    return np.linalg.norm(centres - where, axis=1) <= size


def make_samples(shape, resolution, n, rng):
    """``n`` samples: dicts of the full voxels, the input (what the cut leaves) and the
    region."""
    samples = []
    for _ in range(n):
        full = posed_voxels(shape, resolution, rng)
        removed, region = random_cut(full, rng)
        samples.append(dict(full=full, partial=full[~removed], region=region))
    return samples


def keys(coords, batch, size):
    """int64 keys of (batch, x, y, z) cells of a ``size^3`` grid (sortable, unique)."""
    coords = np.asarray(coords, np.int64)
    return ((np.asarray(batch, np.int64) * size + coords[:, 0]) * size
            + coords[:, 1]) * size + coords[:, 2]


def make_batch(samples, resolution, device):
    """The network's input tensor and the sorted occupancy keys of the full shapes at
    every decoder scale (level k: cells of 2^k voxels)."""
    partial = [s["partial"] for s in samples]
    batch = np.repeat(np.arange(len(samples)), [len(p) for p in partial])
    indices = np.column_stack([batch, np.concatenate(partial)]).astype(np.int32)
    features = np.ones((len(indices), 1), np.float32)
    x = sparsegrid.SparseTensor(backend.to_device(features, device),
                                backend.to_device(indices, device), (resolution,) * 3,
                                batch_size=len(samples))
    full = [s["full"] for s in samples]
    full_batch = np.repeat(np.arange(len(samples)), [len(f) for f in full])
    full = np.concatenate(full)
    targets = [np.unique(keys(full >> k, full_batch, resolution >> k)) for k in range(LEVELS)]
    return x, targets


def occupied(x, target_keys):
    """Which sites of ``x`` (NumPy bool (N,)) are cells of the full shape."""
    indices = backend.to_numpy(x.indices)
    return np.isin(keys(indices[:, 1:], indices[:, 0], x.spatial_shape[0]), target_keys)


# ----------------------------------------------------------------------------- network

def subm(c_in, c_out, filter_size=3):
    return [scn.SubmanifoldConvolution(3, c_in, c_out, filter_size, False),
            scn.BatchNormReLU(c_out)]


class CompletionNet(scn.Module):
    """Encoder of strided sparse convolutions, a dense coarsest grid, and a decoder of
    generative transposed convolutions with an occupancy classifier and pruning at each
    scale (see the module docstring)."""

    def __init__(self, channels=CHANNELS):
        super().__init__()
        c = channels
        self.encode0 = scn.Sequential(*subm(1, c[0]), *subm(c[0], c[0]))
        for k in range(LEVELS):
            self.add_module(f"down{k + 1}", scn.Sequential(
                scn.Convolution(3, c[k], c[k + 1], 2, 2, False), scn.BatchNormReLU(c[k + 1]),
                *subm(c[k + 1], c[k + 1])))
        self.bottleneck = scn.Sequential(*subm(c[LEVELS], c[LEVELS]),
                                         *subm(c[LEVELS], c[LEVELS]))
        for k in reversed(range(LEVELS)):
            self.add_module(f"up{k}", scn.Sequential(
                scn.GenerativeConvolutionTranspose(3, c[k + 1], c[k], 2, 2, False),
                scn.BatchNormReLU(c[k])))
            self.add_module(f"refine{k}", scn.Sequential(*subm(c[k], c[k])))
            self.add_module(f"classify{k}", scn.NetworkInNetwork(c[k], 1, True))
        self.union = scn.Union()
        self.prune = scn.Pruning()

    def forward(self, x, targets=None):
        """``x``: the partial input (features: ones). Returns the completed tensor (the
        sites kept at full resolution) and, per decoder scale from coarse to fine, the
        logits tensor and the NumPy occupancy of its sites (None without ``targets``)."""
        skips = [self.encode0(x)]
        for k in range(LEVELS):
            skips.append(getattr(self, f"down{k + 1}")(skips[-1]))
        h = self.bottleneck(dense_grid(skips[-1]))
        outputs = []
        for k in reversed(range(LEVELS)):
            h = getattr(self, f"up{k}")(h)
            h = getattr(self, f"refine{k}")(self.union(h, skips[k]))
            logits = getattr(self, f"classify{k}")(h)
            keep = backend.to_numpy(logits.features.data[:, 0]) > 0
            target = None if targets is None else occupied(h, targets[k])
            outputs.append((logits, target))
            if self.training and target is not None and k > 0:
                keep = keep | target
            h = self.prune(h, backend.to_device(keep, x.device))
        return h, outputs


def dense_grid(x):
    """``x`` on every cell of its grid (zero features where it has none): the union with
    a zero tensor on all cells."""
    size = x.spatial_shape
    cells = np.indices((x.batch_size,) + size).reshape(1 + len(size), -1).T
    xp = backend.array_namespace(x.indices)
    zeros = sparsegrid.SparseTensor(
        xp.zeros((len(cells), x.n_channels), x.dtype),
        backend.to_device(cells.astype(np.int32), x.device), size, x.batch_size)
    return union(x, zeros)


def completion_loss(outputs):
    """Sum over scales of the mean binary cross-entropy of the occupancy logits."""
    total = 0.0
    for logits, target in outputs:
        target = backend.to_device(target.astype(np.float32)[:, None], logits.device)
        total = total + ad.binary_cross_entropy_with_logits(logits.features, target)
    return total


# ----------------------------------------------------------------------------- evaluation

def iou(a, b):
    """|a & b| / |a | b| of two sets of int64 keys (1 when both are empty)."""
    union_size = len(np.union1d(a, b))
    return len(np.intersect1d(a, b)) / union_size if union_size else 1.0


def evaluate(model, samples, resolution, device, batch_size):
    """Per held-out sample: the completed voxels and the scores (see the docstring)."""
    model.eval()
    results = []
    with ad.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            x, _ = make_batch(chunk, resolution, device)
            completed, _ = model(x)
            indices = backend.to_numpy(completed.indices)
            for b, sample in enumerate(chunk):
                predicted = indices[indices[:, 0] == b, 1:].astype(np.int64)
                results.append(score(sample, predicted, resolution))
    model.train()
    return results


def score(sample, predicted, resolution):
    """IoUs of the completion and of the input alone, overall and in the cut region."""
    full, partial, region = sample["full"], sample["partial"], sample["region"]
    k_full, k_part, k_pred = (keys(v, 0, resolution) for v in (full, partial, predicted))
    removed = np.setdiff1d(k_full, k_part)
    inside_full = k_full[in_region(region, full)]
    inside_pred = k_pred[in_region(region, predicted)]
    return dict(predicted=predicted, iou=iou(k_pred, k_full), input_iou=iou(k_part, k_full),
                restored=len(np.intersect1d(removed, k_pred)) / max(len(removed), 1),
                region_iou=iou(inside_pred, inside_full),
                precision=len(np.intersect1d(k_pred, k_full)) / max(len(k_pred), 1))


def report(results, kinds):
    """Print the held-out means, overall and per kind of cut."""
    def mean(key, rows=slice(None)):
        return float(np.mean(np.array([r[key] for r in results])[rows]))

    print(f"held-out ({len(results)} poses and cuts, drawn apart from the training ones):")
    print(f"  IoU input alone     {mean('input_iou'):.4f}   (the baseline)")
    print(f"  IoU completed       {mean('iou'):.4f}   (precision {mean('precision'):.4f})")
    print(f"  cut region: restored {100 * mean('restored'):.1f}% of the removed voxels, "
          f"IoU {mean('region_iou'):.4f} (input alone: 0)")
    kinds = np.array(kinds)
    for kind, name in (("plane", "half-space cuts"), ("ball", "ball cuts")):
        rows = kinds == kind
        if rows.any():
            print(f"  {name + ':':16} {int(rows.sum()):3d} samples, IoU completed "
                  f"{mean('iou', rows):.4f} vs input alone {mean('input_iou', rows):.4f}")
    better = sum(r["iou"] > r["input_iou"] for r in results)
    print(f"  the completion beats the input alone on {better} of {len(results)} samples")


# ----------------------------------------------------------------------------- picture

# Labels of the picture; sparsegrid.plot colours label i with tab10's colour i.
INPUT, CUT_AWAY, RESTORED, WRONG = 7, 1, 2, 3          # grey, orange, green, red
LABEL_NAMES = {INPUT: "input", CUT_AWAY: "cut away", RESTORED: "restored",
               WRONG: "not in the shape"}


def picture(path, sample, predicted, resolution):
    """Input / completion / truth side by side, one 3-D panel each (sparsegrid.plot).

    Completion: the input's voxels grey, restored true voxels green, voxels the shape does
    not have red; truth: the input grey, the voxels the cut removed orange.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as error:
        raise ImportError("the picture needs matplotlib: pip install sparsegrid[plot]") \
            from error
    from sparsegrid import plot

    full, partial = sample["full"], sample["partial"]
    k_full, k_part, k_pred = (keys(v, 0, resolution) for v in (full, partial, predicted))
    predicted_labels = np.where(np.isin(k_pred, k_part), INPUT,
                                np.where(np.isin(k_pred, k_full), RESTORED, WRONG))
    panels = [("input (what the cut left)", partial, np.full(len(partial), INPUT)),
              ("completed by the network", predicted, predicted_labels),
              ("ground truth", full, np.where(np.isin(k_full, k_part), INPUT, CUT_AWAY))]
    figure = Figure(figsize=(16, 5.5))
    for i, (title, voxels, labels) in enumerate(panels, 1):
        ax = figure.add_subplot(1, 3, i, projection="3d")
        indices = np.column_stack([np.zeros(len(voxels), np.int32), voxels])
        x = sparsegrid.SparseTensor(np.ones((len(voxels), 1), np.float32),
                                    indices.astype(np.int32), (resolution,) * 3)
        plot.voxels(x, labels=labels.astype(np.int64), label_names=LABEL_NAMES, ax=ax,
                    title=f"{title}: {len(voxels)} voxels", elev=20, azim=-60,
                    point_size=8.0)
        ax.set(xlim=(0, resolution), ylim=(0, resolution), zlim=(0, resolution))
        ax.set_box_aspect((1, 1, 1))    # one scale for the three panels
        ax.get_legend().remove()        # one legend for all three, below them
    palette = ["C7", "C1", "C2", "C3"]
    handles = [Line2D([], [], linestyle="", marker="o", markersize=8, markeredgewidth=0,
                      markerfacecolor=colour, label=LABEL_NAMES[label])
               for label, colour in zip((INPUT, CUT_AWAY, RESTORED, WRONG), palette)]
    figure.legend(handles=handles, loc="lower center", ncol=4)
    plot.save(figure, path, dpi=80)


# ----------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="training batches")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--resolution", type=int, default=32,
                        help="voxels per side, a multiple of 8 (default 32)")
    parser.add_argument("--eval-samples", type=int, default=32,
                        help="held-out poses and cuts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input", default=None,
                        help="a PLY point cloud to complete instead of the Stanford Bunny")
    parser.add_argument("--out", default="bunny_completion.png",
                        help="the PNG picture ('' for none)")
    parser.add_argument("--ply", default=None,
                        help="write the completed voxels of the first held-out sample here")
    parser.add_argument("--threads", type=int, default=None,
                        help="sparsegrid threads (default: SPARSEGRID_NUM_THREADS or cores)")
    add_device_argument(parser)
    args = parser.parse_args()
    began = time.perf_counter()
    device = chosen_device(parser, args)
    if args.resolution < 8 or args.resolution % 8:
        parser.error(f"--resolution must be a multiple of 8 (three halvings); got "
                     f"{args.resolution}")
    for name in ("steps", "batch_size", "eval_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.out and not args.out.lower().endswith(".png"):
        parser.error(f"--out must name a .png file (or be '' for no picture); got {args.out!r}")
    if args.out and importlib.util.find_spec("matplotlib") is None:   # before training
        parser.error("the picture needs matplotlib: pip install sparsegrid[plot] (or pass "
                     "--out '' for no picture)")
    if args.threads:
        sparsegrid.set_num_threads(args.threads)

    if args.input:
        from sparsegrid.io import read_ply
        points, what = read_ply(args.input)["points"], args.input
    else:
        points, what = load_bunny(), "the Stanford Bunny"
    shape = canonical(points)
    R = args.resolution
    train_rng = np.random.default_rng([args.seed, 0])
    held_out = make_samples(shape, R, args.eval_samples, np.random.default_rng([args.seed, 1]))
    sizes = [len(s["full"]) for s in held_out]
    print(f"shape: {what}, {len(points)} points; grid {R}^3, {np.mean(sizes):.0f} voxels "
          f"per pose on average; device {device}, {sparsegrid.get_num_threads()} thread(s)")

    scn.manual_seed(args.seed)
    model = CompletionNet()
    model.to(device)
    n_params = sum(p.data.size for p in model.parameters())
    print(f"network: {n_params} parameters; training {args.steps} steps of "
          f"{args.batch_size} random poses and cuts")
    optimizer = Adam(model.parameters(), lr=args.lr)
    schedule = CosineAnnealingLR(optimizer, args.steps)
    start = time.perf_counter()
    bar = progress(range(1, args.steps + 1), desc="training", unit="step")
    running = None
    for step in bar:
        x, targets = make_batch(make_samples(shape, R, args.batch_size, train_rng), R, device)
        optimizer.zero_grad()
        _, outputs = model(x, targets)
        loss = completion_loss(outputs)
        loss.backward()
        optimizer.step()
        schedule.step()
        value = float(loss.item())
        running = value if running is None else 0.95 * running + 0.05 * value
        bar.set_postfix_str(f"loss {running:.4f}")
        if step % max(args.steps // 6, 1) == 0 or step == args.steps:
            bar.write(f"step {step:4d}/{args.steps}  loss {running:.4f}  "
                      f"{time.perf_counter() - start:6.1f}s")
    train_s = time.perf_counter() - start

    results = evaluate(model, held_out, R, device, args.batch_size)
    eval_s = time.perf_counter() - start - train_s
    report(results, [s["region"][0] for s in held_out])
    first = results[0]
    if args.out:
        picture(args.out, held_out[0], first["predicted"], R)
        print(f"wrote {args.out}")
    if args.ply:
        from sparsegrid.io import write_ply
        truth = keys(held_out[0]["full"], 0, R)
        labels = np.isin(keys(first["predicted"], 0, R), truth).astype(np.int32)
        write_ply(args.ply, first["predicted"] + 0.5, labels=labels)
        print(f"wrote {args.ply} ({len(first['predicted'])} voxel centres; label 1 = true voxel)")
    print(f"wall time: training {train_s:.1f}s, evaluation {eval_s:.1f}s, whole run "
          f"{time.perf_counter() - began:.1f}s")


if __name__ == "__main__":
    main()
