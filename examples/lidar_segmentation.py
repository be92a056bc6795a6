"""Ground / non-ground segmentation of an aerial LiDAR tile with a sparse 3-D UNet.

Data: the Autzen tile ``tests/data/autzen_trim.laz`` inside the laspy 2.7.0 source
distribution (fetched once through pip into ~/.cache/sparsegrid, or $SPARSEGRID_DATA):
110,000 points of a park in Oregon, RGB, coordinates in US survey feet (NAD83 HARN
Lambert), classes 1 (unclassified: trees, buildings, and also many points on the ground)
and 2 (ground). Any LAS/LAZ file (or a PLY with a ``label`` property) can be given with
``--input``; its classification ``--ground-class`` (default 2) is the positive class.

Split: the tile is cut at the middle of its x range; the **west half (smaller x) trains**,
the **east half is held out** and only evaluated. Each half is read, featurised and
voxelized on its own, so nothing of the held-out half reaches training.

Features per point, from the coordinates and colours only (never from the labels): RGB in
[0, 1]; ``log(1 + height above the lowest point)`` of the 3 x 3 block of square cells
around the point, for cells of 2, 5, 15 and 40 file units; and the point's rank by height
among the points of its 3- and 8-unit cell (0 lowest, 1 highest). Standardised with the
training half's mean and standard deviation (kept in the checkpoint).

Voxels: ``sparsegrid.pointcloud.voxelize`` at 1 file unit (a foot here: one point per
voxel nearly everywhere), features averaged, labels by majority vote; the per-point
prediction is the voxel's, through the inverse map. Training augments every step with a
random rotation about the vertical axis, a mirror and a 5 % scale jitter, over the whole
training half (61,415 points: one sample).

Network: SubmanifoldConvolution(C -> 16) -> UNet(3, reps 1, [16, 32, 48, 64, 80, 96],
2x2x2 strided convolutions down and deconvolutions up) -> BatchNormReLU ->
NetworkInNetwork(16 -> 2); softmax cross-entropy, Adam with a cosine schedule. After
training the decision threshold on the ground logit's margin is chosen to maximise the mean
IoU of the *training* half, and kept in the checkpoint.

Printed: per-class IoU, mean IoU and accuracy on the held-out half (and on the training
half). Written to ``--out-dir``: ``lidar_unet.npz`` (checkpoint: model, optimizer, schedule
and everything inference needs), ``predictions.ply`` (the whole file labelled in one pass,
coloured by predicted class, with ``label`` = the predicted LAS class, the file's class as
``true_class`` and ``held_out``), ``predictions.png`` (a picture of it, through
``sparsegrid.plot``).

The Autzen classification marks only part of the points on the ground as ground: ground
and unclassified points lie interleaved on the same surfaces, so a classifier that sees
the true labels of each point's 8 nearest neighbours reaches only 0.48 mean IoU, and the
per-point mean IoU this example reaches is far below what cleanly labelled tiles give
(docs/pointcloud.md, "LiDAR segmentation example", has the measured numbers).

    python examples/lidar_segmentation.py [--steps 200] [--input FILE.laz] [--out-dir DIR]
        [--voxel-size 1] [--planes 16,32,48,64,80,96] [--max-points N] [--seed 0]
        [--device {cpu,cuda}] [--threads N]
    python examples/lidar_segmentation.py label CHECKPOINT INPUT.laz|.las|.ply
        OUTPUT.ply|.laz|.las [--device {cpu,cuda}]

``label`` loads a checkpoint and labels a file it has never seen: read, features, voxels,
one forward pass, the inverse map, write. A LAS/LAZ output keeps the input's points (its
scale and offset when the input is LAS), colours and intensity, with the predicted class
(2 ground, 1 other) as its classification; a PLY output holds float64 ``x y z``, colours by
predicted class, ``label`` and ``ground_margin``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

import sparsegrid
import sparsegrid.nn as scn
from sparsegrid import autodiff as ad
from sparsegrid import backend
from sparsegrid.io import read_las, read_ply, write_las, write_ply
from sparsegrid.nn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from sparsegrid.nn.optim import Adam, CosineAnnealingLR
from sparsegrid.pointcloud import voxelize
from sparsegrid.progress import progress

from train_utils import add_device_argument, chosen_device

CHECKPOINT_KIND = "sparsegrid.examples.lidar_segmentation"
CHECKPOINT_VERSION = 1
HEIGHT_CELLS = (2.0, 5.0, 15.0, 40.0)   # file units: heights above local minima
RANK_CELLS = (3.0, 8.0)                 # file units: height ranks within cells
CLASS_NAMES = ("non-ground", "ground")
OTHER_CLASS = 1                         # the LAS class written for non-ground predictions
#: RGB of the two predicted classes in the output files (green vegetation, brown ground).
CLASS_COLORS = np.array([[46, 139, 87], [181, 137, 84]], np.uint8)


# ----------------------------------------------------------------------------- reading

def read_cloud(path):
    """``(points float64 (N, 3), colors (N, 3) or None, classes int (N,) or None, las)``
    of a LAS/LAZ file (``las``: its :class:`sparsegrid.io.LasCloud`) or a PLY file
    (``label`` as classes; ``las`` None)."""
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"LASF":
        cloud = read_las(path)
        return cloud.points, cloud.colors, cloud.labels.astype(np.int64), cloud
    if magic[:3] == b"ply":
        cloud = read_ply(path)
        classes = cloud.get("labels")
        return (cloud["points"].astype(np.float64), cloud.get("colors"),
                None if classes is None else classes.astype(np.int64), None)
    raise SystemExit(f"{path}: neither a LAS/LAZ file (LASF) nor a PLY file (ply); "
                     f"it starts with {magic!r}")


def unit_colors(colors):
    """Colours as float64 in [0, 1]: uint8 by 255; 16-bit colours by 65535, unless no
    value exceeds 255 (8-bit values stored in LAS's 16-bit fields, as in the Autzen
    tile), then by 255."""
    colors = np.asarray(colors)
    if colors.dtype == np.uint8 or (len(colors) and int(colors.max()) <= 255):
        return colors.astype(np.float64) / 255.0
    return colors.astype(np.float64) / 65535.0


# ----------------------------------------------------------------------------- features

def _cell_keys(xy, size):
    """Integer cell coordinates ``floor(xy / size)``, shifted to start at 1 (a free
    border for the neighbour lookups) and the row width of their packed key."""
    cells = np.floor(xy / size).astype(np.int64)
    cells -= cells.min(axis=0) - 1
    width = int(cells[:, 1].max()) + 2
    return cells[:, 0] * width + cells[:, 1], width


def height_above_local_minimum(points, size):
    """``z`` minus the lowest ``z`` of the 3 x 3 cells of side ``size`` around the point."""
    keys, width = _cell_keys(points[:, :2], size)
    cells, inverse = np.unique(keys, return_inverse=True)
    lowest = np.full(len(cells), np.inf)
    np.minimum.at(lowest, inverse, points[:, 2])
    around = lowest.copy()
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            wanted = cells + dx * width + dy
            at = np.minimum(np.searchsorted(cells, wanted), len(cells) - 1)
            found = cells[at] == wanted
            around = np.where(found, np.minimum(around, lowest[at]), around)
    return points[:, 2] - around[inverse]


def height_rank_in_cell(points, size):
    """The point's rank by ``z`` among the points of its cell, scaled to [0, 1] (0: the
    lowest; a point alone in its cell gets 0)."""
    keys, _ = _cell_keys(points[:, :2], size)
    order = np.lexsort((points[:, 2], keys))
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    counts = np.diff(np.r_[starts, len(keys)])
    position = np.arange(len(keys)) - np.repeat(starts, counts)
    rank = np.empty(len(keys))
    rank[order] = position / np.maximum(np.repeat(counts, counts) - 1, 1)
    return rank


def point_features(points, colors):
    """(N, 3 + 4 + 2) float64 features: RGB, log heights above local minima, height ranks."""
    if colors is None:
        raise SystemExit("the network takes RGB as input features, and this file has no "
                         "colours (LAS point formats 2, 3, 5, 7, 8, 10, or PLY red green blue)")
    columns = [unit_colors(colors)]
    columns += [np.log1p(np.maximum(height_above_local_minimum(points, s), 0))[:, None]
                for s in HEIGHT_CELLS]
    columns += [height_rank_in_cell(points, s)[:, None] for s in RANK_CELLS]
    return np.hstack(columns)


# ----------------------------------------------------------------------------- voxels

def voxel_input(points, features, config, device, labels=None, rng=None):
    """A one-sample SparseTensor of the (centred, optionally augmented) points.

    Returns ``(tensor, inverse, voxel labels or None)``: ``inverse`` maps each point to
    its voxel's row (on ``device``). The spatial shape is padded to a multiple of
    ``config['multiple']`` so that every strided level of the UNet fits.
    """
    centred = points - points.mean(axis=0)
    if rng is not None:   # rotation about z, a mirror, a small scale jitter
        angle = rng.uniform(0, 2 * np.pi)
        c, s = np.cos(angle), np.sin(angle)
        centred = centred @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).T
        if rng.random() < 0.5:
            centred[:, 0] = -centred[:, 0]
        centred = centred * rng.uniform(0.95, 1.05)
    on = lambda a: backend.to_device(np.ascontiguousarray(a), device)  # noqa: E731
    normalised = ((features - config["feature_mean"]) / config["feature_std"]).astype(np.float32)
    result = voxelize(on(centred), config["voxel_size"], features=on(normalised),
                      reduce="mean", labels=None if labels is None else on(labels))
    x = result.tensor
    multiple = config["multiple"]
    shape = tuple(-(-int(s) // multiple) * multiple for s in x.spatial_shape)
    x = sparsegrid.SparseTensor(x.features, x.indices, shape, 1)
    voxel_labels = None if labels is None else backend.to_numpy(result.labels)
    return x, result.inverse, voxel_labels


# ----------------------------------------------------------------------------- network

def build_model(n_features, planes, reps=1):
    """SubM3(C -> planes[0]) -> UNet -> BatchNormReLU -> NetworkInNetwork(-> 2 logits)."""
    return scn.Sequential(
        scn.SubmanifoldConvolution(3, n_features, planes[0], 3, False),
        scn.UNet(3, reps, list(planes), residual_blocks=False),
        scn.BatchNormReLU(planes[0]),
        scn.NetworkInNetwork(planes[0], len(CLASS_NAMES), True))


def ground_margin(model, points, colors, config, device):
    """Per point: ground logit minus non-ground logit (float64, NumPy), in eval mode."""
    features = point_features(points, colors)
    x, inverse, _ = voxel_input(points, features, config, device)
    model.eval()
    with ad.no_grad():
        logits = model(x).features.data
    model.train()
    margin = logits[:, 1].astype(np.float64) - logits[:, 0].astype(np.float64)
    return backend.to_numpy(margin[inverse])


def iou_table(predicted, truth):
    """Per-class IoU (NaN for a class absent from both), mean IoU over the present
    classes, and accuracy, of binary per-point labels."""
    ious = []
    for k in range(len(CLASS_NAMES)):
        union = np.count_nonzero((predicted == k) | (truth == k))
        both = np.count_nonzero((predicted == k) & (truth == k))
        ious.append(both / union if union else float("nan"))
    return ious, float(np.nanmean(ious)), float(np.mean(predicted == truth))


def best_threshold(margin, truth):
    """The margin threshold in [-3, 3] (step 0.05) with the best mean IoU (ties: nearest 0)."""
    candidates = np.round(np.arange(-3, 3.0001, 0.05), 2)
    scores = [iou_table((margin > t).astype(np.int64), truth)[1] for t in candidates]
    order = np.lexsort((np.abs(candidates), -np.asarray(scores)))
    return float(candidates[order[0]])


def print_ious(name, predicted, truth):
    ious, mean, accuracy = iou_table(predicted, truth)
    for k, value in enumerate(ious):
        print(f"{name} IoU {CLASS_NAMES[k]:<10s} {value:.4f}  "
              f"({np.count_nonzero(truth == k)} points)")
    print(f"{name} mean IoU {mean:.4f}  accuracy {accuracy:.4f}  ({len(truth)} points)")
    return ious, mean, accuracy


# ----------------------------------------------------------------------------- outputs

def las_class(predicted, ground_class):
    """Predicted binary labels as LAS classes: ``ground_class`` or 1 (unclassified)."""
    return np.where(predicted == 1, ground_class, OTHER_CLASS).astype(np.int64)


def save_picture(points, classes, ground_class, path, title):
    """The labelled cloud as a PNG through ``sparsegrid.plot.points`` (skipped, with a
    note, where matplotlib is missing)."""
    try:
        from sparsegrid import plot
        plot.points(points - points.min(axis=0), labels=classes,
                    label_names={OTHER_CLASS: "non-ground", ground_class: "ground"},
                    title=title, path=path, elev=35, azim=-75)
    except ImportError as exc:
        print(f"no picture written: {exc}")
        return None
    return path


def write_labelled(path, points, predicted, margin, ground_class, source=None,
                   extra_properties=None):
    """``predicted`` (binary per point) as a PLY (colours by class, ``label``,
    ``ground_margin``) or a LAS/LAZ file (the source's colours, intensity, scale and
    offset kept; the predicted class as classification)."""
    path = pathlib.Path(path)
    classes = las_class(predicted, ground_class)
    if path.suffix.lower() == ".ply":
        properties = {"ground_margin": margin.astype(np.float32)}
        properties.update(extra_properties or {})
        write_ply(path, points, CLASS_COLORS[predicted], classes, properties,
                  dtype=np.float64)
    elif path.suffix.lower() in (".las", ".laz"):
        kwargs, properties = {}, {}
        colors = None
        if source is not None:
            colors = source.colors
            properties["intensity"] = source.intensity
            kwargs = dict(scale=source.header["scales"], offset=source.header["offsets"])
        write_las(path, points, colors, classes, properties, **kwargs)
    else:
        raise SystemExit(f"{path}: the output must end in .ply, .las or .laz")
    return path


# ----------------------------------------------------------------------------- training

def parse_planes(text):
    try:
        planes = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"planes must be comma-separated ints; got {text!r}")
    if not planes or min(planes) < 1:
        raise argparse.ArgumentTypeError(f"planes must be positive ints; got {text!r}")
    return planes


def train_main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="a LAS/LAZ file (default: the Autzen tile)")
    parser.add_argument("--out-dir", default="lidar_segmentation_out")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--voxel-size", type=float, default=1.0,
                        help="in the file's units (default 1: a foot for Autzen)")
    parser.add_argument("--planes", type=parse_planes, default=[16, 32, 48, 64, 80, 96])
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--ground-class", type=int, default=2)
    parser.add_argument("--max-points", type=int, default=None,
                        help="use a seeded random subsample of this many points")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    add_device_argument(parser)
    args = parser.parse_args(argv)
    device = chosen_device(parser, args)
    if args.threads:
        sparsegrid.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.input is None:
        from datasets import load_autzen
        args.input = load_autzen()
    points, colors, classes, _ = read_cloud(args.input)
    if classes is None:
        parser.error(f"{args.input} has no classification / label to train on")
    rng = np.random.default_rng(args.seed)
    if args.max_points is not None and args.max_points < len(points):
        keep = np.sort(rng.choice(len(points), args.max_points, replace=False))
        points, classes = points[keep], classes[keep]
        colors = None if colors is None else colors[keep]
    truth = (classes == args.ground_class).astype(np.int64)
    middle = (points[:, 0].min() + points[:, 0].max()) / 2
    halves = {"train": points[:, 0] < middle, "held-out": points[:, 0] >= middle}
    print(f"{args.input}: {len(points)} points, {truth.mean():.1%} ground (class "
          f"{args.ground_class}); split at x = {middle:.2f}: train (west) "
          f"{halves['train'].sum()}, held-out (east) {halves['held-out'].sum()} points; "
          f"device {device}, {sparsegrid.get_num_threads()} thread(s)")

    train = halves["train"]
    train_points, train_colors, train_truth = points[train], colors[train], truth[train]
    features = point_features(train_points, train_colors)
    config = {"kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION,
              "voxel_size": float(args.voxel_size), "planes": list(args.planes),
              "reps": int(args.reps), "n_features": int(features.shape[1]),
              "feature_mean": features.mean(axis=0),
              "feature_std": features.std(axis=0) + 1e-6,
              "multiple": 2 ** (len(args.planes) - 1),
              "height_cells": list(HEIGHT_CELLS), "rank_cells": list(RANK_CELLS),
              "class_names": list(CLASS_NAMES), "ground_class": int(args.ground_class),
              "threshold": 0.0}

    scn.manual_seed(args.seed)
    model = build_model(config["n_features"], config["planes"], config["reps"])
    model.to(device)
    n_params = sum(p.data.size for p in model.parameters())
    optimizer = Adam(model.parameters(), lr=args.lr)
    scheduler = CosineAnnealingLR(optimizer, max(args.steps, 1))
    print(f"UNet planes {config['planes']}, {n_params} parameters; {args.steps} steps on "
          f"the training half, voxel size {args.voxel_size}")
    train_start = time.perf_counter()
    running = []
    for step in progress(range(1, args.steps + 1), desc="training", unit="step"):
        x, voxel_labels = _augmented(train_points, features, config, device, train_truth,
                                     rng)
        optimizer.zero_grad()
        logits = model(x).features
        loss = ad.softmax_cross_entropy(logits, voxel_labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
        running.append(float(loss.item()))
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step:4d}/{args.steps}  loss {np.mean(running):.4f}  "
                  f"{time.perf_counter() - train_start:6.1f}s", flush=True)
            running = []
    train_seconds = time.perf_counter() - train_start

    margin_train = ground_margin(model, train_points, train_colors, config, device)
    config["threshold"] = best_threshold(margin_train, train_truth)
    print(f"threshold on the ground margin, chosen on the training half: "
          f"{config['threshold']:+.2f}")
    print_ious("train", (margin_train > config["threshold"]).astype(np.int64), train_truth)
    held = halves["held-out"]
    margin_held = ground_margin(model, points[held], colors[held], config, device)
    ious, mean_iou, accuracy = print_ious(
        "held-out", (margin_held > config["threshold"]).astype(np.int64), truth[held])

    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "lidar_unet.npz"
    save_checkpoint(checkpoint, model, optimizer, scheduler, config=config, step=args.steps,
                    held_out_iou=[float(v) for v in ious], held_out_mean_iou=mean_iou,
                    held_out_accuracy=accuracy, source=str(args.input))
    # the whole file in one pass, exactly as `label` does it
    margin = ground_margin(model, points, colors, config, device)
    predicted = (margin > config["threshold"]).astype(np.int64)
    ply = write_labelled(out / "predictions.ply", points, predicted, margin,
                         config["ground_class"], extra_properties={
                             "true_class": classes.astype(np.int32),
                             "held_out": held.astype(np.uint8)})
    png = save_picture(points, las_class(predicted, config["ground_class"]),
                       config["ground_class"], out / "predictions.png",
                       f"predicted classes (held-out mean IoU {mean_iou:.3f})")
    print(f"wrote {checkpoint}, {ply}" + (f", {png}" if png else ""))
    print(f"training {train_seconds:.1f}s, total {time.perf_counter() - start:.1f}s")


def _augmented(points, features, config, device, truth, rng):
    """One augmented training sample: ``(tensor, voxel labels)``."""
    x, _, voxel_labels = voxel_input(points, features, config, device, truth, rng)
    return x, voxel_labels


# ----------------------------------------------------------------------------- labelling

def load_model(checkpoint, device):
    """The model and the configuration saved by training (plain inference afterwards)."""
    try:
        extra = load_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise SystemExit(f"{checkpoint} is not a checkpoint of lidar_segmentation.py: {exc}")
    config = extra.get("config")
    if not isinstance(config, dict) or config.get("kind") != CHECKPOINT_KIND:
        raise SystemExit(f"{checkpoint} is not a checkpoint of lidar_segmentation.py")
    if config.get("version") != CHECKPOINT_VERSION:
        raise SystemExit(f"{checkpoint} has version {config.get('version')}; this script "
                         f"reads {CHECKPOINT_VERSION}")
    if list(config["height_cells"]) != list(HEIGHT_CELLS) or \
            list(config["rank_cells"]) != list(RANK_CELLS):
        raise SystemExit(f"{checkpoint} was trained with other feature cells "
                         f"({config['height_cells']}, {config['rank_cells']})")
    model = build_model(config["n_features"], config["planes"], config["reps"])
    load_checkpoint(checkpoint, model=model)
    model.to(device)
    return model, config


def label_main(argv):
    parser = argparse.ArgumentParser(
        prog="lidar_segmentation.py label",
        description="Label a LAS/LAZ/PLY file with a checkpoint of lidar_segmentation.py")
    parser.add_argument("checkpoint")
    parser.add_argument("input", help="a LAS, LAZ or PLY file with colours")
    parser.add_argument("output", help="a .ply, .las or .laz path")
    parser.add_argument("--threads", type=int, default=None)
    add_device_argument(parser)
    args = parser.parse_args(argv)
    device = chosen_device(parser, args)
    if args.threads:
        sparsegrid.set_num_threads(args.threads)
    start = time.perf_counter()
    model, config = load_model(args.checkpoint, device)
    points, colors, classes, source = read_cloud(args.input)
    margin = ground_margin(model, points, colors, config, device)
    predicted = (margin > config["threshold"]).astype(np.int64)
    write_labelled(args.output, points, predicted, margin, config["ground_class"], source)
    print(f"labelled {len(points)} points of {args.input}: {predicted.mean():.1%} ground; "
          f"wrote {args.output} in {time.perf_counter() - start:.1f}s")
    if classes is not None and len(classes):
        print_ious("file", predicted, (classes == config["ground_class"]).astype(np.int64))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "label":
        label_main(sys.argv[2:])
    else:
        train_main(sys.argv[1:])
