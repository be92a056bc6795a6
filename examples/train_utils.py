"""A small classification training loop shared by the examples (NumPy + sparsegrid only;
the model and its inputs may live on a GPU, labels stay NumPy arrays).

``fit`` runs epochs of SGD-style training on batches a caller generates, shows a progress
bar per epoch (``sparsegrid.progress``: tqdm when stderr is a terminal, nothing otherwise)
and logs one summary line per epoch: training loss and accuracy, held-out accuracy, wall
time, and the mean forward / backward time per batch.
"""

from __future__ import annotations

import time

import numpy as np

from sparsegrid import autodiff as ad
from sparsegrid import backend
from sparsegrid.progress import progress


def add_device_argument(parser):
    """``--device {cpu,cuda}``; the default is ``cuda`` when CuPy sees a GPU, else ``cpu``."""
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if backend.cuda_available() else "cpu",
                        help="where the model and the batches live (default: cuda when CuPy "
                             "sees a GPU, else cpu)")


def chosen_device(parser, args):
    """``args.device``, after refusing ``cuda`` without a GPU (a usage error, exit 2)."""
    if args.device == "cuda" and not backend.cuda_available():
        parser.error("--device cuda needs CuPy and a visible NVIDIA GPU; none is available "
                     "here")
    return args.device


def evaluate(model, batches):
    """Accuracy of ``model`` (eval mode, no autodiff graph) on ``(input, labels)`` batches."""
    model.eval()
    correct = total = 0
    with ad.no_grad():
        for inputs, labels in batches:
            logits = model(inputs).data          # a Tensor (recording nothing here)
            correct += int((backend.to_numpy(logits.argmax(axis=1)) == labels).sum())
            total += len(labels)
    model.train()
    return correct / max(total, 1)


def fit(model, optimizer, train_batches, test_batches, epochs, scheduler=None, log=print):
    """Train ``model`` with softmax cross-entropy.

    Parameters
    ----------
    model : callable Module, input -> (B, n_classes) logits
    optimizer : sparsegrid.nn.optim optimizer over the model's parameters
    train_batches : callable ``epoch -> list of (input, labels)`` (fresh augmentation
        per epoch); test_batches : callable ``() -> iterable of (input, labels)``
    epochs : int
    scheduler : optional, ``step()`` after every epoch

    Returns
    -------
    list of dict, one per epoch: epoch (1-based), loss, train_accuracy, test_accuracy,
    seconds, forward_ms, backward_ms (means per training batch), lr (the epoch's learning
    rate). ``sparsegrid.plot.curve(history, keys=[...])`` draws it.
    """
    history = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        batches = train_batches(epoch)
        bar = progress(batches, desc=f"epoch {epoch:2d}/{epochs}", unit="batch")
        loss_sum = correct = seen = 0
        forward_s = backward_s = 0.0
        model.train()
        for inputs, labels in bar:
            optimizer.zero_grad()
            t0 = time.perf_counter()
            logits = model(inputs)
            loss = ad.softmax_cross_entropy(logits, labels)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            optimizer.step()
            forward_s += t1 - t0
            backward_s += t2 - t1
            loss_sum += float(loss.item()) * len(labels)
            correct += int((backend.to_numpy(logits.data.argmax(axis=1)) == labels).sum())
            seen += len(labels)
            bar.set_postfix_str(f"loss {loss_sum / seen:.4f}", refresh=False)
        bar.close()
        seconds = time.perf_counter() - start
        test_accuracy = evaluate(model, test_batches())
        record = dict(epoch=epoch, loss=loss_sum / max(seen, 1),
                      train_accuracy=correct / max(seen, 1), test_accuracy=test_accuracy,
                      seconds=seconds, forward_ms=1e3 * forward_s / len(batches),
                      backward_ms=1e3 * backward_s / len(batches),
                      lr=optimizer.param_groups[0]["lr"])
        history.append(record)
        log(f"epoch {epoch:2d}/{epochs}  loss {record['loss']:.4f}  "
            f"train {100 * record['train_accuracy']:5.1f}%  "
            f"held-out {100 * test_accuracy:5.2f}%  lr {record['lr']:.4g}  "
            f"{seconds:5.1f}s (forward {record['forward_ms']:.0f} ms + backward "
            f"{record['backward_ms']:.0f} ms per batch)")
        if scheduler is not None:
            scheduler.step()
    return history


def batches_of(n, batch_size, rng=None):
    """Index arrays covering ``range(n)`` in batches (shuffled when ``rng`` is given)."""
    order = np.arange(n) if rng is None else rng.permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
