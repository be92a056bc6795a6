"""sparsegrid.nn.checkpoint: saving and loading training state (.npz / .safetensors).

A checkpoint of a small SCN network and its optimizer, restored into a fresh model, continues
training bit for bit. (The file-format details -- strict keys, corrupted and foreign files,
interrupted saves, the safetensors install hint -- are in test_optim.py.)
"""

import numpy as np
import pytest

from nn_helpers import step, toy_batch, toy_model
from sparsegrid.nn.checkpoint import load_checkpoint, save_checkpoint
from sparsegrid.nn.optim import Adam


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
