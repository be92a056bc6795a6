"""End-to-end training with sparsegrid alone: a small SCN network overfits a handful of
samples, and the hello-world example runs. (A checkpoint restoring training bit for bit:
test_checkpoint.py.)"""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from nn_helpers import step, toy_batch, toy_model
from sparsegrid import autodiff as ad
from sparsegrid.nn.optim import SGD, Adam

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
    # one kind of output under no_grad too: a Tensor that records nothing
    assert isinstance(logits, ad.Tensor) and not logits.requires_grad and logits._inputs == ()
    assert np.array_equal(logits.data.argmax(axis=1), labels)


def test_hello_world_example():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "hello_world.py")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "output: (2, 32, 10, 10) float32" in result.stdout
    assert "input spatial size: (87, 87)" in result.stdout
