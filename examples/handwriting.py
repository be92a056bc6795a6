"""Online handwriting recognition as in SparseConvNet's Chinese / Assamese examples.

Each character is a sequence of pen strokes (from the KanjiVG package on PyPI, fetched
once through pip into ~/.cache/sparsegrid or $SPARSEGRID_DATA). A sample is the strokes
after a random affine distortion (rotation, stretch, shear, shift), drawn into a 63x63
picture: the sites the pen passes are active, with 3 features (1 and the pen's unit
direction), as SCN's examples. Every epoch draws fresh training distortions; the held-out
set is distortions never seen in training (its own random stream).

Network (SCN's layers and builders; InputLayer mode 1 keeps the first row of a site the
pen visits twice, as SCN's stroke renderer):
    InputLayer(2, 63x63, mode=1) -> SparseVggNet C16 C16 MP C32 C32 MP C48 C48 MP C64 C64 MP
    -> SubmanifoldConvolution 64->96 -> BatchNormReLU -> SparseToDense (B, 96, 3, 3)
    -> Flatten -> Linear(864, n_classes)

    python examples/handwriting.py [--classes 200] [--epochs 8] [--per-class 24]
                                   [--device {cpu,cuda}] [--dtype {float32,float16}]

``--dtype float16`` trains in mixed precision as examples/mnist_sparse.py does (float16
model, float32 loss and batch-norm statistics, GradScaler, float32 master weights).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import sparsegrid
import sparsegrid.nn as scn
from sparsegrid import backend
from sparsegrid.nn.optim import SGD, ExponentialDecayLR

from datasets import batch_sparse, kanjivg_classes, random_affine, render_strokes
from mnist_sparse import add_dtype_argument, for_dtype, report_scaler
from train_utils import add_device_argument, batches_of, chosen_device, fit

OUTPUT_SIZE = 3


def build_model(n_classes):
    body = scn.Sequential(
        scn.SparseVggNet(2, 3, [['C', 16], ['C', 16], 'MP',
                                ['C', 32], ['C', 32], 'MP',
                                ['C', 48], ['C', 48], 'MP',
                                ['C', 64], ['C', 64], 'MP']),
        scn.SubmanifoldConvolution(2, 64, 96, 3, False),
        scn.BatchNormReLU(96),
        scn.SparseToDense(2, 96))
    size = body.input_spatial_size(np.array([OUTPUT_SIZE, OUTPUT_SIZE]))
    model = scn.Sequential(scn.InputLayer(2, size, mode=1), body, scn.Flatten(),
                           scn.Linear(96 * OUTPUT_SIZE ** 2, n_classes))
    return model, int(size[0])


def make_input(characters, picks, size, rng, device="cpu"):
    """[coords (batch last), features, batch size] of freshly distorted samples: rotations
    and shears up to 0.3 and stretches up to 30% per axis, as SCN's Chinese example; the
    arrays on ``device``."""
    samples = [render_strokes(characters[c][1], size=size, distort=True,
                              affine=random_affine(rng, rotation=0.3, scale=0.3, shear=0.3))
               for c in picks]
    coords, features = batch_sparse(samples)
    return [backend.to_device(coords, device), backend.to_device(features, device),
            len(picks)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--per-class", type=int, default=24,
                        help="training samples per class per epoch (fresh distortions)")
    parser.add_argument("--test-per-class", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    add_device_argument(parser)
    add_dtype_argument(parser)
    args = parser.parse_args()
    device = chosen_device(parser, args)
    print(f"device: {device}, dtype: {args.dtype}")
    if args.threads:
        sparsegrid.set_num_threads(args.threads)

    characters = kanjivg_classes(args.classes)
    print(f"{len(characters)} KanjiVG characters: "
          f"{''.join(chr(c) for c, _ in characters[:12])}... "
          f"({min(len(s) for _, s in characters)}-{max(len(s) for _, s in characters)} "
          f"strokes); {sparsegrid.get_num_threads()} thread(s)")
    scn.manual_seed(args.seed)
    model, size = build_model(len(characters))
    model.to(device)
    print(f"input field {size}x{size}, "
          f"{sum(p.data.size for p in model.parameters())} parameters")

    labels = np.repeat(np.arange(len(characters)), args.per_class)
    rng = np.random.default_rng(args.seed)

    def train_batches(epoch):
        return [(make_input(characters, labels[b], size, rng, device), labels[b])
                for b in batches_of(len(labels), args.batch_size, rng)]

    test_rng = np.random.default_rng(10_000 + args.seed)   # distortions never trained on
    test_labels = np.repeat(np.arange(len(characters)), args.test_per_class)
    test_batches = [(make_input(characters, test_labels[b], size, test_rng, device),
                     test_labels[b])
                    for b in batches_of(len(test_labels), 250)]
    print(f"{len(labels)} fresh training samples per epoch; {len(test_labels)} held-out")

    optimizer = SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                    weight_decay=1e-4)
    scheduler = ExponentialDecayLR(optimizer, decay=0.2)
    model, optimizer, scaler = for_dtype(args.dtype, model, optimizer)
    start = time.perf_counter()
    history = fit(model, optimizer, train_batches, lambda: test_batches, args.epochs,
                  scheduler)
    minutes = (time.perf_counter() - start) / 60
    report_scaler(scaler)
    print(f"final held-out accuracy {100 * history[-1]['test_accuracy']:.2f}% on "
          f"{len(test_labels)} freshly distorted samples of {len(characters)} characters, "
          f"{minutes:.1f} min of training")


if __name__ == "__main__":
    main()
