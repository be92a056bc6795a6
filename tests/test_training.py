"""End-to-end training with sparsegrid alone: a small SCN network overfits a handful of
samples, a checkpoint restores training bit for bit, and the hello-world example runs."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

import sparsegrid.nn as scn
from sparsegrid import autodiff as ad
from sparsegrid.nn.checkpoint import load_checkpoint, save_checkpoint
from sparsegrid.nn.optim import SGD, Adam

ROOT = pathlib.Path(__file__).resolve().parents[1]


def toy_batch(seed=0, n=6, size=15):
    """``n`` random sparse 2-D samples (SCN batch-last coordinates) and class labels."""
    rng = np.random.default_rng(seed)
    coords, feats = [], []
    for b in range(n):
        sites = rng.choice(size * size, size=20, replace=False)
        xy = np.stack(np.unravel_index(sites, (size, size)), axis=1)
        coords.append(np.concatenate([xy, np.full((20, 1), b)], axis=1))
        feats.append(rng.standard_normal((20, 2)).astype(np.float32))
    return [np.concatenate(coords), np.concatenate(feats), n], rng.integers(0, 3, n)


def toy_model():
    scn.manual_seed(3)
    return scn.Sequential(
        scn.InputLayer(2, 15, mode=3),
        scn.SubmanifoldConvolution(2, 2, 8, 3, False),
        scn.BatchNormReLU(8),
        scn.Convolution(2, 8, 16, 3, 2, False),          # 15 -> 7
        scn.BatchNormLeakyReLU(16),
        scn.SubmanifoldConvolution(2, 16, 16, 3, True),
        scn.MaxPooling(2, 3, 2),                         # 7 -> 3
        scn.SparseToDense(2, 16),
        scn.Flatten(),
        scn.Linear(16 * 9, 3))


def step(model, optimizer, inputs, labels):
    optimizer.zero_grad()
    loss = ad.softmax_cross_entropy(model(inputs), labels)
    loss.backward()
    optimizer.step()
    return loss.item()


@pytest.mark.parametrize("optimizer_class", [SGD, Adam])
def test_small_network_overfits_a_handful_of_samples(optimizer_class):
    inputs, labels = toy_batch()
    model = toy_model()
    kwargs = dict(lr=0.05, momentum=0.9) if optimizer_class is SGD else dict(lr=0.01)
    optimizer = optimizer_class(model.parameters(), **kwargs)
    losses = [step(model, optimizer, inputs, labels) for _ in range(150)]
    assert losses[-1] < losses[0] / 100, (losses[0], losses[-1])
    model.eval()
    with ad.no_grad():
        logits = model(inputs)
    assert not isinstance(logits, ad.Tensor) or not logits.requires_grad
    assert np.array_equal(np.asarray(ad.Tensor(logits).data).argmax(axis=1), labels)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_checkpoint_round_trip_continues_bit_exactly(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    inputs, labels = toy_batch(seed=1)
    model = toy_model()
    optimizer = Adam(model.parameters(), lr=0.01, weight_decay=1e-4)
    for _ in range(3):
        step(model, optimizer, inputs, labels)
    path = tmp_path / f"model{suffix}"
    save_checkpoint(path, model, optimizer, epoch=3)
    assert path.exists()

    restored = toy_model()
    restored_optimizer = Adam(restored.parameters(), lr=0.5)   # overwritten by the load
    extra = load_checkpoint(path, restored, restored_optimizer)
    assert extra["epoch"] == 3
    for (name, a), (_, b) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    for _ in range(3):
        assert step(model, optimizer, inputs, labels) == \
            step(restored, restored_optimizer, inputs, labels)
    for (name, a), (_, b) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert np.array_equal(a, b), f"{name} diverged after restoring"


def test_hello_world_example():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "hello_world.py")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "output: (2, 32, 10, 10) float32" in result.stdout
    assert "input spatial size: (87, 87)" in result.stdout
