"""SparseConvNet's ``ClassificationTrainValidate``: the training loop of its handwriting
examples, with SCN's parameters, schedule and printout.

``ClassificationTrainValidate(model, dataset, p)`` trains ``model`` for
``p['n_epochs']`` epochs with SGD (Nesterov momentum, weight decay) at SCN's exponentially
decaying learning rate, ``lr = initial_lr * exp((1 - epoch) * lr_decay)``, and after every
epoch evaluates it, printing SCN's lines::

    {epoch} train: top1=..% top5=..% nll:.. time:..s
    {epoch} test:  top1=..% top5=..% nll:.. time:..s {m} MultiplyAdds/sample {h} HiddenStates/sample

(top-1 / top-5 are error rates). It writes SCN's files to the working directory: the
confusion matrices ('train confusion matrix.csv' / '.png', 'test confusion matrix.csv'
/ '.png': row = true class, column = the summed softmax) and, with ``p['check_point']``,
'epoch.pth' and 'model.pth' (sparsegrid's checkpoint and weights files under SCN's names),
from which a later run resumes.
"""

from __future__ import annotations

import math
import os
import struct
import sys
import time
import zlib

import numpy as np

from .. import backend
from ..autodiff import ops
from ..autodiff.core import Tensor, data_of, no_grad
from ..tensor import SparseTensor

__all__ = ["ClassificationTrainValidate", "updateStats"]

_DEFAULTS = (("n_epochs", 100), ("initial_lr", 1e-1), ("lr_decay", 4e-2),
             ("weight_decay", 1e-4), ("momentum", 0.9), ("check_point", False))


def _index_add(target, rows, values):
    """``target[rows[i]] += values[i]`` for (N, C) ``values``, repeated rows summed
    (torch's ``index_add_``), by the backend's segment sum (deterministic on both)."""
    sums, _ = backend.kernels(values).segment_reduce(values, rows, len(target), "sum")
    target += sums
    return target


def _softmax(logits):
    xp = backend.array_namespace(logits)
    shifted = xp.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _labels(target, like, what="target"):
    """Integer class labels (N,) on the device of ``like``."""
    target = data_of(target)
    if hasattr(target, "detach"):                     # a torch tensor
        target = target.detach().cpu().numpy()
    if not (isinstance(target, np.ndarray) or backend.is_cupy_array(target)):
        target = np.asarray(target)
    if target.dtype.kind not in "iu":
        raise TypeError(f"ClassificationTrainValidate: batch[{what!r}] must hold integer "
                        f"class labels; got dtype {target.dtype}")
    return backend.to_device(target, backend.device_of(like)).astype(np.int64)


def updateStats(stats, output, target, loss):
    """SCN's ``updateStats``: add one batch to ``stats`` (a dict, filled on first use).

    Keys: ``'n'`` samples, ``'nll'`` the summed loss (``loss * batch size``), ``'top1'`` /
    ``'top5'`` the samples whose label is the best / among the best 5 (or all classes,
    when fewer) of ``output`` (N, C), and ``'confusion matrix'`` (C, C): row = true
    class, the summed softmax of the outputs. Ties between scores rank the lower class
    index first (a stable sort).
    """
    scores = data_of(output)
    if scores.ndim != 2:
        raise ValueError(f"ClassificationTrainValidate: the model must return (N, classes) "
                         f"scores; got shape {scores.shape}")
    target = _labels(target, scores)
    batch, n_classes = scores.shape
    if target.shape != (batch,):
        raise ValueError(f"ClassificationTrainValidate: target must have shape ({batch},); "
                         f"got {target.shape}")
    if batch and (int(target.min()) < 0 or int(target.max()) >= n_classes):
        raise ValueError(f"ClassificationTrainValidate: target labels must be in [0, "
                         f"{n_classes}); got values in [{int(target.min())}, "
                         f"{int(target.max())}]")
    xp = backend.array_namespace(scores)
    if not stats:
        stats.update({"top1": 0, "top5": 0, "n": 0, "nll": 0.0,
                      "confusion matrix": xp.zeros((n_classes, n_classes), scores.dtype)})
    stats["n"] += batch
    stats["nll"] += loss * batch
    scores32 = scores.astype(np.float32)              # SCN ranks output.float()
    own = xp.take_along_axis(scores32, target[:, None], axis=1)
    classes = xp.arange(n_classes)[None, :]
    rank = (scores32 > own).sum(axis=1) + ((scores32 == own) & (classes < target[:, None])).sum(
        axis=1)
    stats["top1"] += int((rank < 1).sum())
    stats["top5"] += int((rank < min(5, n_classes)).sum())
    _index_add(stats["confusion matrix"], target, _softmax(scores))


def _batches(source, name):
    """The batches of ``dataset[name]``: an iterable (SCN's DataLoader), or a function
    returning one (SCN's older examples' ``dataset['train']()``)."""
    if hasattr(source, "__iter__"):
        return iter(source)
    if callable(source):
        return iter(source())
    raise TypeError(f"ClassificationTrainValidate: dataset[{name!r}] must be an iterable of "
                    f"batches or a function returning one; got {type(source).__name__}")


def _moved(value, device):
    """``value`` (an input batch: InputLayerInput, list/tuple of arrays, SparseTensor,
    array, Tensor) with its arrays on ``device``; numbers and None stay."""
    from .layers import InputLayerInput
    if isinstance(value, InputLayerInput):
        return value.to(device)
    if isinstance(value, SparseTensor):
        return value.to(device)
    if isinstance(value, Tensor):
        return ops.to_device(value, device)
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(v, device) for v in value)
    if hasattr(value, "detach") and hasattr(value, "numpy"):   # a torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray) or backend.is_cupy_array(value):
        return backend.to_device(value, device)
    return value


def _batch_items(batch, keys):
    if not hasattr(batch, "__getitem__") or any(k not in batch for k in keys):
        raise TypeError(f"ClassificationTrainValidate: each batch must be a dict with keys "
                        f"{list(keys)}; got {type(batch).__name__}"
                        + (f" with keys {list(batch)}" if isinstance(batch, dict) else ""))
    return batch


def _write_confusion(stats, which):
    """SCN's confusion-matrix files: '<which> confusion matrix.csv' (the sums) and '.png'
    (each row scaled to 255, 8-bit grey)."""
    from ..io import _atomic_write
    cm = np.array(backend.to_numpy(stats["confusion matrix"]), np.float64)
    _atomic_write(f"{which} confusion matrix.csv",
                  lambda f: np.savetxt(f, cm, delimiter=","))
    cm *= 255 / (cm.sum(1, keepdims=True) + 1e-9)
    image = cm.astype(np.uint8)
    _atomic_write(f"{which} confusion matrix.png", lambda f: f.write(_png_gray(image)))


def _png_gray(image):
    """An 8-bit greyscale PNG of ``image`` (H, W) uint8 (no dependency)."""
    h, w = image.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), image], axis=1).tobytes()  # filter 0

    def chunk(tag, data):
        return (struct.pack(">I", len(data)) + tag + data +
                struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _errors(stats):
    n = max(stats["n"], 1)
    return (100 * (1 - 1.0 * stats["top1"] / n), 100 * (1 - 1.0 * stats["top5"] / n),
            stats["nll"] / n)


def _counters():
    package = sys.modules[__package__]
    return package.forward_pass_multiplyAdd_count, package.forward_pass_hidden_states


def _reset_counters():
    package = sys.modules[__package__]
    package.forward_pass_multiplyAdd_count = 0
    package.forward_pass_hidden_states = 0


def _per_sample(stats):
    mult_adds, states = _counters()
    n = max(stats["n"], 1)
    return "%.3e MultiplyAdds/sample %.3e HiddenStates/sample" % (mult_adds / n, states / n)


def _check_p(p):
    if not isinstance(p, dict):
        raise TypeError(f"ClassificationTrainValidate: p must be a dict of options; got "
                        f"{type(p).__name__}")
    for key in ("n_epochs", "test_reps"):
        value = p[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or \
                value < (0 if key == "n_epochs" else 1):
            raise ValueError(f"ClassificationTrainValidate: p[{key!r}] must be an int >= "
                             f"{0 if key == 'n_epochs' else 1}; got {value!r}")
    for key in ("initial_lr", "lr_decay", "weight_decay", "momentum"):
        value = p[key]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer,
                                                             np.floating)) or \
                not math.isfinite(value):
            raise ValueError(f"ClassificationTrainValidate: p[{key!r}] must be a finite "
                             f"number; got {value!r}")


def ClassificationTrainValidate(model, dataset, p):
    """Train and validate a classifier as SparseConvNet's ``ClassificationTrainValidate``.

    Parameters
    ----------
    model : Module
        Maps ``batch['input']`` to (N, classes) scores.
    dataset : dict
        ``dataset['train']`` and ``dataset['val']``: iterables of batches (SCN's
        DataLoaders), or functions returning one (SCN's older ``dataset['train']()``),
        read once per epoch. A batch is a dict with ``'input'`` (what the model takes,
        e.g. an ``InputLayerInput``) and ``'target'`` (integer labels (N,)); with
        ``test_reps > 1`` also ``'idx'``, each validation sample's index (N,).
    p : dict
        SCN's options; missing ones are filled in with SCN's defaults (and ``p`` is
        updated, as SCN does):

        ``n_epochs`` (100), ``initial_lr`` (0.1), ``lr_decay`` (0.04), ``weight_decay``
        (1e-4), ``momentum`` (0.9), ``check_point`` (False), ``use_cuda`` (whether CuPy
        sees a GPU; ``use_gpu`` is read as ``use_cuda``, as SCN), ``test_reps`` (1).
        ``epoch`` is set to the first epoch trained.

    Training: SGD with Nesterov momentum, ``weight_decay``, and at epoch ``e`` (from 1)
    the rate ``initial_lr * exp((1 - e) * lr_decay)`` (:class:`~sparsegrid.nn.optim.
    ExponentialDecayLR`); the loss is the cross-entropy of the scores. Validation runs in
    evaluation mode without recording gradients, after resetting
    ``sparsegrid.nn.forward_pass_multiplyAdd_count`` and ``forward_pass_hidden_states``,
    whose totals per sample it prints. With ``test_reps > 1`` the validation set is run
    ``test_reps`` times and the scores of each sample (by ``batch['idx']``, which must
    number the samples 0..N-1, each once per pass) summed, printing each repetition.

    ``check_point``: after each epoch, 'epoch.pth' (the epoch) and 'model.pth' (the
    weights) are written; a run finding 'epoch.pth' restarts after that epoch from
    'model.pth' (printing SCN's "Restarting at epoch ..."). As in SCN the optimizer's
    momentum is not saved.

    Returns
    -------
    list of dict
        One per epoch: ``{'epoch', 'lr', 'train': {'top1', 'top5', 'nll'}, 'test': {...}}``
        (error rates in percent, as printed; ``'test'`` holds the last repetition's).
        SCN returns nothing.

    Raises
    ------
    TypeError, ValueError
        For a malformed ``dataset``, batch or option (naming it); for targets that are not
        class labels of the scores.
    """
    from .checkpoint import load_checkpoint, load_state_dict, save_checkpoint, \
        save_state_dict
    from .optim import SGD, ExponentialDecayLR
    for key, value in _DEFAULTS:
        p.setdefault(key, value)
    if "use_gpu" in p:                       # SCN: back compatibility
        p["use_cuda"] = p.pop("use_gpu")
    if "use_cuda" not in p:
        p["use_cuda"] = backend.cuda_available()
    if p["use_cuda"]:
        model.cuda()
    p.setdefault("test_reps", 1)
    _check_p(p)
    if not isinstance(dataset, dict) or "train" not in dataset or "val" not in dataset:
        raise TypeError("ClassificationTrainValidate: dataset must be a dict with 'train' and "
                        "'val' batches")
    device = "cuda" if p["use_cuda"] else None
    optimizer = SGD(model.parameters(), lr=p["initial_lr"], momentum=p["momentum"],
                    weight_decay=p["weight_decay"], nesterov=True)
    if p["check_point"] and os.path.isfile("epoch.pth"):
        p["epoch"] = int(load_checkpoint("epoch.pth")["epoch"]) + 1
        print("Restarting at epoch " + str(p["epoch"]) + " from model.pth ..")
        model.load_state_dict(load_state_dict("model.pth"))
    else:
        p["epoch"] = 1
    schedule = ExponentialDecayLR(optimizer, p["lr_decay"])
    for _ in range(p["epoch"] - 1):
        schedule.step()                       # the rate of the epoch resumed at
    print(p)
    print("#parameters", sum(int(np.prod(x.shape)) for x in model.parameters()))
    history = []
    for epoch in range(p["epoch"], p["n_epochs"] + 1):
        model.train()
        stats = {}
        start = time.time()
        lr = optimizer.param_groups[0]["lr"]
        for batch in _batches(dataset["train"], "train"):
            batch = _batch_items(batch, ("input", "target"))
            inputs, target = batch["input"], batch["target"]
            if device:
                inputs, target = _moved(inputs, device), _moved(target, device)
            optimizer.zero_grad()
            output = model(inputs)
            loss = ops.softmax_cross_entropy(output, _labels(target, data_of(output)))
            updateStats(stats, output, target, loss.item())
            loss.backward()
            optimizer.step()
        if not stats:
            raise ValueError("ClassificationTrainValidate: dataset['train'] gave no batches")
        train = _errors(stats)
        print(epoch, "train: top1=%.2f%% top5=%.2f%% nll:%.2f time:%.1fs" %
              (*train, time.time() - start))
        _write_confusion(stats, "train")
        if p["check_point"]:
            save_checkpoint("epoch.pth", epoch=epoch)
            save_state_dict("model.pth", model.state_dict())
        schedule.step()

        model.eval()
        _reset_counters()
        start = time.time()
        with no_grad():
            if p["test_reps"] == 1:
                stats = {}
                for batch in _batches(dataset["val"], "val"):
                    batch = _batch_items(batch, ("input", "target"))
                    inputs, target = batch["input"], batch["target"]
                    if device:
                        inputs, target = _moved(inputs, device), _moved(target, device)
                    output = model(inputs)
                    loss = ops.softmax_cross_entropy(output, _labels(target, data_of(output)))
                    updateStats(stats, output, target, loss.item())
                if not stats:
                    raise ValueError("ClassificationTrainValidate: dataset['val'] gave no "
                                     "batches")
                test = _errors(stats)
                print(epoch, "test:  top1=%.2f%% top5=%.2f%% nll:%.2f time:%.1fs" %
                      (*test, time.time() - start), _per_sample(stats))
            else:
                predictions = targets = None
                for rep in range(1, p["test_reps"] + 1):
                    scores, labels, rows = _validation_pass(model, dataset["val"], device)
                    # rows is a permutation (checked): plain indexing adds each once
                    if rep == 1:
                        predictions, targets = scores * 0, labels * 0
                        targets[rows] = labels
                    elif len(rows) != len(predictions):
                        raise ValueError("ClassificationTrainValidate: dataset['val'] gave "
                                         f"{len(rows)} samples in repetition {rep}, "
                                         f"{len(predictions)} in the first")
                    predictions[rows] += scores
                    loss = ops.softmax_cross_entropy(Tensor(predictions / rep), targets)
                    stats = {}
                    updateStats(stats, predictions, targets, loss.item())
                    test = _errors(stats)
                    print(epoch, "test rep ", rep,
                          ": top1=%.2f%% top5=%.2f%% nll:%.2f time:%.1fs" %
                          (*test, time.time() - start), _per_sample(stats))
        _write_confusion(stats, "test")
        history.append({"epoch": epoch, "lr": lr,
                        "train": dict(zip(("top1", "top5", "nll"), train)),
                        "test": dict(zip(("top1", "top5", "nll"), test))})
    return history


def _validation_pass(model, source, device):
    """One pass over the validation batches: the scores, labels and sample indices,
    concatenated; the indices checked to number the samples 0..N-1 once each."""
    scores, labels, rows = [], [], []
    for batch in _batches(source, "val"):
        batch = _batch_items(batch, ("input", "target", "idx"))
        inputs = _moved(batch["input"], device) if device else batch["input"]
        output = data_of(model(inputs))
        scores.append(output)
        labels.append(_labels(batch["target"], output))
        rows.append(_labels(batch["idx"], output, "idx"))
    if not scores:
        raise ValueError("ClassificationTrainValidate: dataset['val'] gave no batches")
    xp = backend.array_namespace(scores[0])
    scores, labels, rows = (xp.concatenate(a) for a in (scores, labels, rows))
    n = len(rows)
    if n and (int(rows.min()) < 0 or int(rows.max()) >= n or len(xp.unique(rows)) != n):
        raise ValueError(f"ClassificationTrainValidate: with test_reps > 1, batch['idx'] must "
                         f"number the {n} validation samples 0..{n - 1}, each once per pass")
    return scores, labels, rows
