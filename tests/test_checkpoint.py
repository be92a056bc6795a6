"""sparsegrid.nn.checkpoint: saving and loading training state (.npz / .safetensors).

A checkpoint of a small SCN network and its optimizer, restored into a fresh model, continues
training bit for bit; the file formats: strict keys, corrupted and foreign files,
interrupted saves, the safetensors install hint.
"""

import math
import os
import sys

import numpy as np
import pytest

from nn_helpers import deep_equal as _deep_equal
from nn_helpers import step, toy_batch, toy_model
from sparsegrid import autodiff as ad
from sparsegrid.autodiff import Tensor
from sparsegrid.nn import Module, Parameter
from sparsegrid.nn import optim
from sparsegrid.nn.checkpoint import (CheckpointError, load_checkpoint, load_state_dict,
                                      save_checkpoint, save_state_dict)
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


# -- checkpoints ---------------------------------------------------------------------------------
class Net(Module):
    def __init__(self, seed):
        super().__init__()
        r = np.random.default_rng(seed)
        self.weight = Parameter(r.standard_normal((3, 4)))
        self.bias = Parameter(r.standard_normal((1, 4)).astype(np.float32))
        self.register_buffer("running_mean", r.standard_normal(4).astype(np.float32))
        self.register_buffer("counts", r.integers(0, 2 ** 40, size=3, dtype=np.int64))

    def forward(self, x):
        return ad.add(ad.matmul(x, self.weight), self.bias)


def _train(model, opt, sched, rng_seed, steps):
    r = np.random.default_rng(rng_seed)
    for _ in range(steps):
        x, target = Tensor(r.standard_normal((5, 3))), Tensor(r.standard_normal((5, 4)))
        opt.zero_grad()
        diff = ad.sub(model(x), target)
        ad.sum(ad.mul(diff, diff)).backward()
        opt.step()
        sched.step()


def _setup(seed):
    model = Net(seed)
    opt = optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.95), amsgrad=True,
                     weight_decay=1e-3)
    sched = optim.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _assert_same_training_state(a, b):
    (model_a, opt_a, sched_a), (model_b, opt_b, sched_b) = a, b
    assert _deep_equal(dict(model_a.state_dict()), dict(model_b.state_dict()))
    assert _deep_equal(opt_a.state_dict(), opt_b.state_dict())
    assert _deep_equal(sched_a.state_dict(), sched_b.state_dict())


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_checkpoint_round_trip(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    a = _setup(seed=1)
    _train(*a, rng_seed=10, steps=3)
    path = tmp_path / f"ckpt{suffix}"
    save_checkpoint(path, *a, epoch=3, note="x", history=[1.5, 2.5])
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left behind

    b = _setup(seed=2)
    assert not np.array_equal(a[0].weight.data, b[0].weight.data)
    extra = load_checkpoint(str(path), *b)
    assert extra == {"epoch": 3, "note": "x", "history": [1.5, 2.5]}
    assert type(extra["epoch"]) is int and type(extra["history"][0]) is float
    _assert_same_training_state(a, b)
    assert b[0].bias.data.dtype == np.float32 and b[0].counts.dtype == np.int64
    assert b[1].param_groups[0]["betas"] == (0.8, 0.95)
    assert b[1].param_groups[0]["lr"] == a[1].param_groups[0]["lr"] == 0.005
    assert b[2].last_epoch == 3

    _train(*a, rng_seed=20, steps=3)
    _train(*b, rng_seed=20, steps=3)
    _assert_same_training_state(a, b)
    assert np.array_equal(a[0].weight.data, b[0].weight.data)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_state_dict_file_round_trip(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    state = {"w": np.random.default_rng(0).standard_normal((2, 3)),
             "w32": np.arange(6, dtype=np.float32).reshape(3, 2) / 7,
             "n": np.array([2 ** 62, -1], dtype=np.int64),
             "mask": np.array([True, False]),
             "scalar": np.array(1.25)}
    path = tmp_path / f"weights{suffix}"
    save_state_dict(path, state)
    loaded = load_state_dict(path)
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape
        assert np.array_equal(loaded[key], value)
    # a model's weights only, and a checkpoint read as weights
    model = Net(3)
    save_state_dict(path, model.state_dict())
    fresh = Net(4)
    fresh.load_state_dict(load_state_dict(path))
    assert _deep_equal(dict(fresh.state_dict()), dict(model.state_dict()))
    save_checkpoint(tmp_path / f"c{suffix}", model)
    assert _deep_equal(load_state_dict(tmp_path / f"c{suffix}"), dict(model.state_dict()))


def test_checkpoint_exact_path_and_other_values(tmp_path):
    path = tmp_path / "model.ckpt"  # not .npz: np.savez would append a suffix to a name
    value = {"nested": {1: (2, "three"), "f32": np.float32(0.1), "none": None},
             "arr": np.arange(5, dtype=np.int16), "nan": float("nan"), "big": 2 ** 70,
             "__odd": [True, -0.0]}
    save_checkpoint(path, config=value, epoch=7)
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt"]
    extra = load_checkpoint(path)
    got = extra["config"]
    assert extra["epoch"] == 7
    assert got["nested"][1] == (2, "three") and got["nested"]["none"] is None
    assert got["nested"]["f32"].dtype == np.float32 and got["nested"]["f32"] == np.float32(0.1)
    assert got["arr"].dtype == np.int16 and np.array_equal(got["arr"], np.arange(5))
    assert math.isnan(got["nan"]) and got["big"] == 2 ** 70
    assert got["__odd"] == [True, -0.0] and math.copysign(1, got["__odd"][1]) == -1
    with pytest.raises(TypeError, match="not supported"):
        save_checkpoint(tmp_path / "bad.npz", thing=object())
    assert not (tmp_path / "bad.npz").exists()


def test_checkpoint_strict_keys(tmp_path):
    model = Net(5)
    state = model.state_dict()
    del state["counts"]
    path = tmp_path / "partial.npz"
    save_checkpoint(path, model=state)
    with pytest.raises(KeyError, match="counts"):
        load_checkpoint(path, model=Net(6))
    fresh = Net(6)
    counts = fresh.counts.copy()
    load_checkpoint(path, model=fresh, strict=False)
    assert np.array_equal(fresh.weight.data, model.weight.data)
    assert np.array_equal(fresh.counts, counts)
    # asking for a part the checkpoint does not hold
    opt = optim.SGD(fresh.parameters(), lr=0.1)
    with pytest.raises(KeyError, match="optimizer"):
        load_checkpoint(path, optimizer=opt)
    load_checkpoint(path, optimizer=opt, strict=False)


def test_corrupted_and_foreign_files(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="neither"):
        load_checkpoint(garbage)

    path = tmp_path / "good.npz"
    a = _setup(seed=1)
    save_checkpoint(path, *a, epoch=1)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(truncated)
    flipped = bytearray(data)
    start = data.index(b"model/weight.npy")
    flipped[start + 200: start + 208] = bytes(8)  # inside the weight's values
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError):
        load_checkpoint(damaged, *_setup(seed=2))

    foreign = tmp_path / "foreign.npz"
    with open(foreign, "wb") as f:
        np.savez(f, weights=np.ones(3))
    with pytest.raises(CheckpointError, match="not a sparsegrid checkpoint"):
        load_checkpoint(foreign)
    assert np.array_equal(load_state_dict(foreign)["weights"], np.ones(3))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.npz")


def test_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, epoch=1)
    before = path.read_bytes()

    def crash(f, **arrays):
        f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, epoch=2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]
    assert load_checkpoint(path) == {"epoch": 1}


def test_safetensors_missing_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        save_state_dict(tmp_path / "w.safetensors", {"a": np.zeros(1)})
    assert os.listdir(tmp_path) == []
