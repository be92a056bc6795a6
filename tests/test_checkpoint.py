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
from sparsegrid.nn import checkpoint
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


# -- loading is all or nothing -------------------------------------------------------------------
from nn_helpers import bits_equal, training_snapshot  # noqa: E402


class TwoLayers(Module):
    """Two sub-modules, so that a failure in the second comes after the first's keys."""

    def __init__(self, seed, width=4):
        super().__init__()
        self.add_module("0", Net(seed))
        self.add_module("1", Net(seed + 100))
        if width != 4:
            self[1].bias = Parameter(np.zeros((1, width), np.float32))

    def __getitem__(self, i):
        return self._modules[str(i)]


def _assert_unchanged(before, model=None, optimizer=None, scheduler=None):
    after = training_snapshot(model, optimizer, scheduler)
    for part, a, b in zip(("model", "optimizer", "scheduler"), before, after):
        assert bits_equal(a, b), f"the failed load changed the {part}"


def _trained(seed=1, opt_cls=optim.Adam, **opt_kwargs):
    model = Net(seed)
    opt = opt_cls(model.parameters(), **({"lr": 0.01} | opt_kwargs))
    sched = optim.StepLR(opt, step_size=2, gamma=0.5)
    _train(model, opt, sched, rng_seed=seed + 10, steps=3)
    return model, opt, sched


def test_reproducer_shape_mismatch_in_layer_1_leaves_layer_0_alone():
    """Used to raise after layer 0 had been overwritten."""
    source = TwoLayers(1, width=5).state_dict()       # layer 1's bias is (1, 5)
    target = TwoLayers(2)
    before = training_snapshot(target)
    target[0].weight.grad = np.ones((3, 4))
    with pytest.raises(ValueError, match=r"'1\.bias'.*\(1, 5\).*\(1, 4\)"):
        target.load_state_dict(source)
    _assert_unchanged(before, target)
    assert target[0].weight.grad is not None    # not even the gradients were dropped


@pytest.mark.parametrize("bad,error,match", [
    (np.array(["a", "b", "c", "d"]), TypeError, r"'1\.running_mean'.*dtype <U1"),
    (np.zeros(4, complex), TypeError, r"'1\.running_mean'.*complex128.*float32"),
    (np.array([object()] * 4), TypeError, r"'1\.running_mean'.*object"),
    (None, TypeError, r"'1\.running_mean'"),
    ([[1.0], [1.0, 2.0]], TypeError, r"'1\.running_mean'.*must be an array"),
], ids=["strings", "complex", "objects", "None", "ragged"])
def test_uncastable_dtype_in_layer_1_changes_nothing(bad, error, match):
    source = TwoLayers(1).state_dict()
    source["1.running_mean"] = bad
    target = TwoLayers(2)
    before = training_snapshot(target)
    with pytest.raises(error, match=match):
        target.load_state_dict(source)
    _assert_unchanged(before, target)


def test_float_into_an_integer_buffer_is_refused():
    source = TwoLayers(1).state_dict()
    source["1.counts"] = source["1.counts"].astype(np.float64)
    target = TwoLayers(2)
    before = training_snapshot(target)
    with pytest.raises(TypeError, match=r"'1\.counts'.*float64.*int64"):
        target.load_state_dict(source)
    _assert_unchanged(before, target)
    # castable dtypes still load (float64 into float32, ints into floats)
    source = TwoLayers(1).state_dict()
    source["0.running_mean"] = np.arange(4)
    target.load_state_dict(source)
    assert target[0].running_mean.dtype == np.float32


def test_state_that_is_not_a_mapping_is_refused():
    with pytest.raises(TypeError, match="mapping.*list"):
        Net(1).load_state_dict([("weight", np.zeros((3, 4)))])


def test_reproducer_adam_checkpoint_into_sgd_changes_nothing(tmp_path):
    """Used to raise KeyError: 'momentum' after the model had been overwritten."""
    path = tmp_path / "adam.npz"
    save_checkpoint(path, *_trained(1))
    model, opt, sched = _trained(2, optim.SGD, lr=0.1, momentum=0.9)
    before = training_snapshot(model, opt, sched)
    with pytest.raises(ValueError, match="checkpoint .* holds Adam state; the optimizer is SGD"):
        load_checkpoint(path, model, opt, sched)
    _assert_unchanged(before, model, opt, sched)


def test_optimizer_kind_mismatch_without_metadata():
    """Plain state dicts (torch-style, no kind recorded): told apart by their names."""
    _, adam, _ = _trained(1)
    model, sgd, _ = _trained(2, optim.SGD, lr=0.1, momentum=0.9)
    before = training_snapshot(optimizer=sgd)
    with pytest.raises(ValueError, match="holds Adam/AdamW state; the optimizer is SGD"):
        sgd.load_state_dict(adam.state_dict())
    _assert_unchanged(before, optimizer=sgd)
    before = training_snapshot(optimizer=adam)
    with pytest.raises(ValueError, match="holds SGD state; the optimizer is Adam"):
        adam.load_state_dict(sgd.state_dict())
    _assert_unchanged(before, optimizer=adam)


def test_adamw_checkpoint_into_adam_is_refused(tmp_path):
    path = tmp_path / "adamw.npz"
    save_checkpoint(path, *_trained(1, optim.AdamW))
    model, opt, sched = _trained(2)
    before = training_snapshot(model, opt, sched)
    with pytest.raises(ValueError, match="holds AdamW state; the optimizer is Adam"):
        load_checkpoint(path, model, opt, sched)
    _assert_unchanged(before, model, opt, sched)


def test_schedule_kind_mismatch_changes_nothing(tmp_path):
    path = tmp_path / "step.npz"
    save_checkpoint(path, *_trained(1))
    model, opt, _ = _trained(2)
    sched = optim.ExponentialLR(opt, gamma=0.9)
    before = training_snapshot(model, opt, sched)
    with pytest.raises(ValueError, match="holds StepLR state; the scheduler is ExponentialLR"):
        load_checkpoint(path, model, opt, sched)
    _assert_unchanged(before, model, opt, sched)
    # without the recorded kind, the keys tell
    with pytest.raises(ValueError, match="does not fit this ExponentialLR.*step_size"):
        sched.load_state_dict(_trained(1)[2].state_dict())
    _assert_unchanged(before, model, opt, sched)


def test_parameter_group_mismatch_changes_nothing(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, *_trained(1))
    model = Net(2)
    opt = optim.Adam([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.01)
    sched = optim.StepLR(opt, step_size=2, gamma=0.5)
    before = training_snapshot(model, opt, sched)
    with pytest.raises(ValueError, match="1 parameter groups; this optimizer has 2"):
        load_checkpoint(path, model, opt, sched)
    _assert_unchanged(before, model, opt, sched)


def test_bad_schedule_state_changes_nothing(tmp_path):
    model, opt, sched = _trained(1)
    state = sched.state_dict()
    state["gamma"] = float("nan")
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, model, opt, scheduler=state)
    target = _trained(2)
    before = training_snapshot(*target)
    with pytest.raises(ValueError, match="gamma"):
        load_checkpoint(path, *target)
    _assert_unchanged(before, *target)


def test_optimizer_state_shape_mismatch_changes_nothing(tmp_path):
    model, opt, sched = _trained(1)
    state = opt.state_dict()
    state["state"][0]["exp_avg"] = np.zeros((2, 2))
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, model, state, sched)
    target = _trained(2)
    before = training_snapshot(*target)
    with pytest.raises(ValueError, match="'exp_avg' of parameter 0 has shape"):
        load_checkpoint(path, *target)
    _assert_unchanged(before, *target)


def _rename_entry(data, old, new):
    """Rename the file's entry ``old`` (not the metadata's reference to it), as a flipped
    bit in the zip's entry names (local header and directory) or in safetensors' header
    does."""
    assert len(old) == len(new)
    for tail in (b".npy", b'":{"dtype"'):       # .npz member name / safetensors header key
        if data.count(old + tail):
            return data.replace(old + tail, new + tail)
    raise AssertionError(f"no entry {old!r}")


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_reproducer_renamed_entry_changes_nothing(tmp_path, suffix):
    """A flipped bit in an entry's name: the metadata refers to an array the file does
    not hold. Used to raise KeyError after the model had been overwritten."""
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    path = tmp_path / f"ckpt{suffix}"
    save_checkpoint(path, *_trained(1))
    data = path.read_bytes()
    # 'optimizer/state/0/exp_avg' -> 'optimizer/state/0/exp_avf' (one bit: g = f ^ 1)
    damaged = tmp_path / f"damaged{suffix}"
    damaged.write_bytes(_rename_entry(data, b"state/0/exp_avg_sq", b"state/0/exp_avf_sq"))
    target = _trained(2)
    before = training_snapshot(*target)
    with pytest.raises(CheckpointError, match="exp_avg_sq.*does not hold"):
        load_checkpoint(damaged, *target)
    _assert_unchanged(before, *target)


def test_renamed_extra_entry_changes_nothing(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, *_trained(1), table=np.arange(3))
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(_rename_entry(path.read_bytes(), b"extra/table", b"extra/tablf"))
    target = _trained(2)
    before = training_snapshot(*target)
    with pytest.raises(CheckpointError, match="extra/table"):
        load_checkpoint(damaged, *target)
    _assert_unchanged(before, *target)


def test_successful_load_after_failed_ones(tmp_path):
    path = tmp_path / "ckpt.npz"
    a = _trained(1)
    save_checkpoint(path, *a)
    b = _trained(2)
    with pytest.raises(ValueError):
        load_checkpoint(path, b[0], optim.SGD(b[0].parameters(), lr=0.1), b[2])
    load_checkpoint(path, *b)
    _assert_same_training_state(a, b)


# -- interrupted saves: stale temporaries -------------------------------------------------------
_CHILD = r"""
import os, signal, sys, time
import numpy as np
sys.path.insert(0, {root!r})
from sparsegrid.nn import checkpoint

def slow_savez(f, **arrays):
    f.write(b"PK\x03\x04" + b"\0" * (4 << 20))   # a big partial write...
    f.flush()
    print("writing", flush=True)
    time.sleep(60)                                # ...then hang until killed

np.savez = slow_savez
checkpoint.save_checkpoint({path!r}, epoch=2, weights=np.ones(1000))
"""


def _start_hanging_save(path):
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(root=root, path=str(path))],
                             stdout=subprocess.PIPE, text=True)
    line = child.stdout.readline()
    assert line.strip() == "writing", f"the child did not start writing: {line!r}"
    return child


def _temporaries(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signame", ["SIGKILL", "SIGTERM"])
def test_killed_save_leaves_a_temporary_the_next_save_removes(tmp_path, monkeypatch, signame):
    import signal

    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, epoch=1)
    before = path.read_bytes()
    # files the cleanup must never touch
    keep = [".ckpt.npz.abcdefgh.tmp", ".ckpt.npz.backup_1.tmp",   # users' own files
            ".ckpt.npz.sparsegrid-abcdefgh.tmp.keep", ".other.npz.sparsegrid-abcdefgh.tmp",
            "ckpt.npz.sparsegrid-abcdefgh.tmp", ".ckpt.npz.sparsegrid-abcdefg.tmp",
            ".ckpt.npz.sparsegrid-abc.efgh.tmp", ".ckpt.npz.sparsegrid-ABCDEFGH.tmp",
            ".ckpt.npz.sparsegrid-future00.tmp"]
    for name in keep:
        (tmp_path / name).write_bytes(b"not yours")
    future = os.stat(path).st_mtime + 3600
    os.utime(tmp_path / ".ckpt.npz.sparsegrid-future00.tmp", (future, future))
    monkeypatch.setattr(checkpoint, "STALE_TEMP_GRACE_S", 0)   # only the lock protects

    child = _start_hanging_save(path)
    try:
        stale = [n for n in _temporaries(tmp_path) if n not in keep]
        assert len(stale) == 1 and os.path.getsize(tmp_path / stale[0]) >= 4 << 20
        # a save still running keeps its temporary (it holds a lock on it)
        save_checkpoint(tmp_path / "ckpt.npz", epoch=3)
        assert (tmp_path / stale[0]).exists()
        assert load_checkpoint(path) == {"epoch": 3}
        save_checkpoint(path, epoch=1)   # back to the first contents
        assert path.read_bytes() == before
    finally:
        child.send_signal(getattr(signal, signame))
        child.wait(timeout=30)
    assert child.returncode == -getattr(signal, signame)
    assert (tmp_path / stale[0]).exists()            # the killed save could not clean up
    # the loader never sees the partial file; the old checkpoint is intact
    assert load_checkpoint(path) == {"epoch": 1}
    assert path.read_bytes() == before
    save_checkpoint(path, epoch=4)                   # the next save of the same path
    assert not (tmp_path / stale[0]).exists()
    assert sorted(os.listdir(tmp_path)) == sorted(keep + ["ckpt.npz"])
    assert load_checkpoint(path) == {"epoch": 4}


def test_stale_temporaries_of_a_weights_file_too(tmp_path):
    pytest.importorskip("safetensors")
    path = tmp_path / "w.safetensors"
    stale = tmp_path / ".w.safetensors.sparsegrid-k2j4_9zq.tmp"
    stale.write_bytes(b"\0" * 1000)
    os.utime(stale, (1, 1))                          # long ago (beyond the grace period)
    save_state_dict(path, {"a": np.zeros(2)})
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]
    assert np.array_equal(load_state_dict(path)["a"], np.zeros(2))


def test_stale_temporary_symlink_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / ".ckpt.npz.sparsegrid-abcdefgh.tmp"
    os.symlink(victim, link)
    os.utime(link, (1, 1), follow_symlinks=False)
    save_checkpoint(tmp_path / "ckpt.npz", epoch=1)
    assert victim.read_bytes() == b"precious" and os.path.islink(link)


# -- files of neither format -------------------------------------------------------------------
_NOT_CHECKPOINTS = {
    "empty": (b"", "empty file"),
    "text": (b"this is not a checkpoint at all\n", "text 'this is not a checkpoint"),
    "json": (b'{"format": "sparsegrid.checkpoint"}', "text '{\"format\""),
    "brace_at_8": (b"12345678{not json at all", "text '12345678{"),
    "random": (bytes(np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8)), "0x"),
    "huge_header": (b"\xff" * 8 + b"{" + b"\0" * 20, "0xffffffff"),
    "zip_like": (b"PK\x01\x02 not a real zip", "zip file of another kind"),
}


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".ckpt", ""])
@pytest.mark.parametrize("kind", list(_NOT_CHECKPOINTS))
@pytest.mark.parametrize("safetensors_installed", [True, False], ids=["st", "no-st"])
def test_neither_npz_nor_safetensors(tmp_path, monkeypatch, suffix, kind, safetensors_installed):
    if not safetensors_installed:
        monkeypatch.setitem(sys.modules, "safetensors", None)
        monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    content, found = _NOT_CHECKPOINTS[kind]
    path = tmp_path / f"file{suffix}"
    path.write_bytes(content)
    for load in (load_checkpoint, load_state_dict):
        with pytest.raises(CheckpointError, match="neither an .npz nor a .safetensors") as info:
            load(path)
        assert found in str(info.value), str(info.value)


def test_truncated_safetensors_is_named(tmp_path):
    pytest.importorskip("safetensors")
    path = tmp_path / "w.safetensors"
    save_state_dict(path, {"a": np.zeros(100)})
    data = path.read_bytes()
    for cut in (20, len(data) - 10):
        short = tmp_path / f"short{cut}.safetensors"
        short.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="safetensors"):
            load_state_dict(short)


def test_zip_that_is_not_an_npz(tmp_path):
    import zipfile

    path = tmp_path / "notes.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="readme.txt.*not a .npy"):
        load_state_dict(path)


def test_real_safetensors_without_the_package_still_gives_the_hint(tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    path = tmp_path / "w.safetensors"
    save_state_dict(path, {"a": np.zeros(2)})
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        load_state_dict(path)


# -- temporaries: names, grace period, concurrent saves -------------------------------------------
def test_users_files_like_temporaries_survive(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "STALE_TEMP_GRACE_S", 0)
    mine = [".model.npz.backup_1.tmp", ".model.npz.abcdefgh.tmp",
            ".model.npz.sparsegrid-new-abcdefgh.tmp"]   # the last: a name before locking
    for name in mine:
        (tmp_path / name).write_bytes(b"precious")
        os.utime(tmp_path / name, (1, 1))              # long ago
    save_state_dict(tmp_path / "model.npz", {"w": np.ones(3)})
    assert sorted(os.listdir(tmp_path)) == sorted(mine + ["model.npz"])
    assert all((tmp_path / name).read_bytes() == b"precious" for name in mine)


@pytest.mark.parametrize("flock", [True, False])
def test_recent_temporaries_are_kept_for_the_grace_period(tmp_path, monkeypatch, flock):
    if not flock:   # a system without flock: age alone decides
        monkeypatch.setattr(checkpoint, "fcntl", None)
    recent = tmp_path / ".w.npz.sparsegrid-recent00.tmp"
    old = tmp_path / ".w.npz.sparsegrid-old00000.tmp"
    recent.write_bytes(b"x")
    old.write_bytes(b"x")
    now = os.stat(recent).st_mtime
    os.utime(recent, (now - checkpoint.STALE_TEMP_GRACE_S / 2,) * 2)
    os.utime(old, (now - checkpoint.STALE_TEMP_GRACE_S - 5,) * 2)
    save_state_dict(tmp_path / "w.npz", {"w": np.ones(3)})
    assert sorted(os.listdir(tmp_path)) == sorted([recent.name, "w.npz"])


def test_temporary_gets_its_matching_name_only_when_locked(tmp_path, monkeypatch):
    fcntl = pytest.importorskip("fcntl")
    seen = []
    real_savez = np.savez

    def spying_savez(f, **arrays):
        names = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
        assert len(names) == 1 and checkpoint._temp_pattern("w.npz").fullmatch(names[0])
        fd = os.open(tmp_path / names[0], os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):   # another process sees it locked
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        seen.append(names[0])
        real_savez(f, **arrays)

    monkeypatch.setattr(np, "savez", spying_savez)
    save_state_dict(tmp_path / "w.npz", {"w": np.ones(3)})
    assert len(seen) == 1 and sorted(os.listdir(tmp_path)) == ["w.npz"]


_SAVER = r"""
import sys
import numpy as np
sys.path.insert(0, {root!r})
from sparsegrid.nn import checkpoint
checkpoint.STALE_TEMP_GRACE_S = {grace!r}
i = {i}
for _ in range({n}):
    checkpoint.save_state_dict({path!r}, {{"w": np.full(1000, i, np.float32)}})
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX rename semantics")
@pytest.mark.parametrize("grace", [None, 0])   # 0: only the locks protect the temporaries
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_concurrent_saves_of_one_path(tmp_path, grace, suffix):
    import subprocess

    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    if grace is None:
        grace = checkpoint.STALE_TEMP_GRACE_S
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = str(tmp_path / f"m{suffix}")
    children = [subprocess.Popen(
        [sys.executable, "-c", _SAVER.format(root=root, grace=grace, i=i, n=50, path=path)],
        stderr=subprocess.PIPE, text=True) for i in range(4)]
    errors = [child.communicate(timeout=60)[1] for child in children]
    assert [child.returncode for child in children] == [0] * 4, errors
    w = load_state_dict(path)["w"]
    assert w.dtype == np.float32 and w.shape == (1000,) and w[0] in range(4)
    assert np.all(w == w[0])
    assert os.listdir(tmp_path) == [os.path.basename(path)]


def _safetensors_cases():
    rng = np.random.default_rng(0)
    dtypes = [np.bool_, np.uint8, np.int8, np.int16, np.uint16, np.float16, np.int32,
              np.uint32, np.float32, np.complex64, np.float64, np.int64, np.uint64]
    mixed = {f"t{i}_{np.dtype(dt).name}": (rng.standard_normal(7 + i) * 50).astype(dt)
             for i, dt in enumerate(dtypes)}
    mixed.update({"b": np.ones(3, np.float32), "a": np.zeros(5, np.float32),
                  "scalar": np.array(2.5), "empty": np.zeros((0, 3), np.int8),
                  "grid": np.arange(24, dtype=np.float64).reshape(2, 3, 4),
                  "big_endian": np.arange(5, dtype=">i4"),
                  "ünïcode \"name\"\n": np.ones(2, np.uint16),
                  "odd": np.ones(3, np.uint8)})   # header padding, odd-length data
    return {"mixed": mixed, "empty": {}, "one": {"w": np.ones((2, 2), np.float32)}}


@pytest.mark.parametrize("case", ["mixed", "empty", "one"])
def test_safetensors_is_written_as_safetensors_writes_it(tmp_path, case):
    st = pytest.importorskip("safetensors.numpy")
    arrays = _safetensors_cases()[case]
    path = tmp_path / "w.safetensors"
    save_state_dict(path, arrays)
    assert path.read_bytes() == st.save(arrays)
    loaded = st.load_file(str(path))
    assert sorted(loaded) == sorted(arrays)
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype.newbyteorder("=")
        assert loaded[name].shape == array.shape and np.array_equal(loaded[name], array)
    ours = load_state_dict(path)
    assert sorted(ours) == sorted(arrays)
    for name, array in arrays.items():
        assert ours[name].dtype == array.dtype.newbyteorder("=")
        assert ours[name].shape == array.shape and np.array_equal(ours[name], array)


def test_safetensors_refuses_dtypes_it_lacks(tmp_path):
    pytest.importorskip("safetensors")
    with pytest.raises(TypeError, match="safetensors has no dtype complex128"):
        save_state_dict(tmp_path / "w.safetensors", {"c": np.zeros(2, np.complex128)})
    assert os.listdir(tmp_path) == []


def test_safetensors_save_does_not_copy_the_checkpoint(tmp_path):
    import tracemalloc

    pytest.importorskip("safetensors")
    big = np.ones(50 << 20, np.uint8)   # 50 MiB
    path = tmp_path / "big.safetensors"
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        save_state_dict(path, {"big": big, "small": np.zeros(10)})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"saving allocated {peak / 2**20:.1f} MiB at once"
    assert os.path.getsize(path) > 50 << 20
    assert np.array_equal(load_state_dict(path)["big"], big)


def test_save_and_load_like_torch(tmp_path):
    """nn.save / nn.load: torch.save's values (an epoch, a state dict, nested) round-trip;
    objects and checkpoints of another kind are refused with a message."""
    import sparsegrid.nn as scn
    model = scn.Sequential(scn.SubmanifoldConvolution(2, 1, 2, 3, True))
    scn.save(7, tmp_path / "epoch.pth")
    assert scn.load(tmp_path / "epoch.pth") == 7
    scn.save(model.state_dict(), tmp_path / "model.pth")
    other = scn.Sequential(scn.SubmanifoldConvolution(2, 1, 2, 3, True))
    other.load_state_dict(scn.load(tmp_path / "model.pth", map_location="cpu"))
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        np.testing.assert_array_equal(a, b)
    scn.save({"epoch": 3, "losses": [1.5, 0.5], "w": np.arange(3)}, tmp_path / "mix.pth")
    got = scn.load(tmp_path / "mix.pth")
    assert got["epoch"] == 3 and got["losses"] == [1.5, 0.5]
    np.testing.assert_array_equal(got["w"], np.arange(3))
    with pytest.raises(TypeError, match="state_dict"):
        scn.save(model, tmp_path / "m.pth")
    scn.checkpoint.save_checkpoint(tmp_path / "ck.npz", model=model)
    with pytest.raises(scn.checkpoint.CheckpointError, match="not by save"):
        scn.load(tmp_path / "ck.npz")


def test_a_checkpoint_into_a_missing_folder_names_the_path(tmp_path):
    import sparsegrid.nn as scn
    target = tmp_path / "nope" / "model.npz"
    with pytest.raises(FileNotFoundError, match="model.npz.*does not exist"):
        scn.checkpoint.save_checkpoint(target, epoch=1)
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        scn.checkpoint.save_checkpoint(tmp_path, epoch=1)
