"""``scn.ClassificationTrainValidate`` (sparsegrid.nn.trainer): SCN's options, schedule,
printout, files and top-1 / top-5 statistics, on a tiny synthetic handwriting set of
strokes (SCN's Assamese/Chinese examples' input form: InputLayerInput of batch-last
coordinates and (dx, dy, 1) features)."""

from __future__ import annotations

import math
import re
import struct
import zlib

import numpy as np
import pytest

import sparsegrid.nn as scn
from sparsegrid import autodiff as ad
from sparsegrid import backend
from sparsegrid.nn.optim import SGD, ExponentialDecayLR
from sparsegrid.nn.trainer import updateStats

N_CLASSES = 3


class Model(scn.Module):
    """VGG+-shaped, as SCN's Assamese example: a SparseVggNet down to 1 x 1, a Linear head."""

    def __init__(self):
        super().__init__()
        self.sparseModel = scn.Sequential(
            scn.SparseVggNet(2, 3, [["C", 8], "MP", ["C", 8, 4], "MP"]),
            scn.Convolution(2, 12, 16, 3, 1, False),
            scn.BatchNormReLU(16),
            scn.SparseToDense(2, 16))
        self.spatial_size = self.sparseModel.input_spatial_size(np.array([1, 1]))
        self.inputLayer = scn.InputLayer(2, self.spatial_size, 2)
        self.linear = scn.Linear(16, N_CLASSES)

    def forward(self, x):
        x = self.inputLayer(x)
        x = self.sparseModel(x)
        x = ad.reshape(x, (-1, 16))
        return self.linear(x)


def _strokes(rng, n, size):
    """``n`` samples: class 0 a horizontal stroke, 1 a vertical one, 2 a diagonal."""
    coords, feats, targets = [], [], []
    for b in range(n):
        c = int(rng.integers(N_CLASSES))
        length = int(rng.integers(5, 9))
        start = rng.integers(2, size - length - 2, 2)
        step = [(0, 1), (1, 0), (1, 1)][c]
        t = np.arange(length)[:, None]
        xy = start + t * np.array(step)
        coords.append(np.concatenate([xy, np.full((length, 1), b)], 1).astype(np.float64))
        direction = (np.array(step) / np.linalg.norm(step)).astype(np.float32)
        feats.append(np.concatenate([np.tile(direction, (length, 1)),
                                     np.ones((length, 1), np.float32)], 1))
        targets.append(c)
    return {"input": scn.InputLayerInput(np.concatenate(coords), np.concatenate(feats)),
            "target": np.array(targets), "idx": None}


def _dataset(seed=0, size=15, n_train=3, n_val=2, batch=8):
    rng = np.random.default_rng(seed)
    train = [_strokes(rng, batch, size) for _ in range(n_train)]
    val = [_strokes(rng, batch, size) for _ in range(n_val)]
    for i, b in enumerate(val):
        b["idx"] = np.arange(i * batch, (i + 1) * batch)
    return train, val


LINE_TRAIN = re.compile(r"^(\d+) train: top1=(\d+\.\d\d)% top5=(\d+\.\d\d)% nll:(\d+\.\d\d) "
                        r"time:\d+\.\ds$")
LINE_TEST = re.compile(r"^(\d+) test:  top1=(\d+\.\d\d)% top5=(\d+\.\d\d)% nll:(\d+\.\d\d) "
                       r"time:\d+\.\ds (\d\.\d{3}e[+-]\d\d) MultiplyAdds/sample "
                       r"(\d\.\d{3}e[+-]\d\d) HiddenStates/sample$")


def _run(tmp_path, monkeypatch, p, dataset=None, seed=1):
    monkeypatch.chdir(tmp_path)
    scn.manual_seed(seed)
    model = Model()
    train, val = _dataset() if dataset is None else dataset
    history = scn.ClassificationTrainValidate(model, {"train": train, "val": val}, p)
    return model, history


def test_defaults_printout_and_files(tmp_path, monkeypatch, capsys):
    p = {"n_epochs": 3, "use_cuda": False}
    model, history = _run(tmp_path, monkeypatch, p)
    # SCN's defaults were filled in
    assert p == {"n_epochs": 3, "initial_lr": 0.1, "lr_decay": 0.04, "weight_decay": 1e-4,
                 "momentum": 0.9, "check_point": False, "use_cuda": False, "test_reps": 1,
                 "epoch": 1}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(p)
    n_params = sum(int(np.prod(x.shape)) for x in model.parameters())
    assert lines[1] == f"#parameters {n_params}"
    train = [LINE_TRAIN.match(line) for line in lines[2::2]]
    test = [LINE_TEST.match(line) for line in lines[3::2]]
    assert len(lines) == 8 and all(train) and all(test)
    assert [int(m.group(1)) for m in train] == [1, 2, 3]
    for m, h in zip(train, history):
        assert float(m.group(2)) == pytest.approx(h["train"]["top1"], abs=0.006)
        assert float(m.group(4)) == pytest.approx(h["train"]["nll"], abs=0.006)
    # top-5 of 3 classes: always right
    assert all(float(m.group(3)) == 0 for m in train + test)
    # the counters per sample: what the last evaluation added, over its 16 samples
    assert float(test[-1].group(5)) == pytest.approx(
        scn.forward_pass_multiplyAdd_count / 16, rel=1e-3)
    assert float(test[-1].group(6)) == pytest.approx(scn.forward_pass_hidden_states / 16,
                                                     rel=1e-3)
    assert scn.forward_pass_multiplyAdd_count > 0
    # SCN's schedule: lr = initial_lr * exp((1 - epoch) * lr_decay)
    assert [h["lr"] for h in history] == pytest.approx(
        [0.1 * math.exp((1 - e) * 0.04) for e in (1, 2, 3)], rel=1e-12)
    for which in ("train", "test"):
        cm = np.loadtxt(tmp_path / f"{which} confusion matrix.csv", delimiter=",")
        assert cm.shape == (N_CLASSES, N_CLASSES)
        n = 24 if which == "train" else 16
        assert cm.sum() == pytest.approx(n, rel=1e-5)        # one softmax row per sample
        image = _read_png(tmp_path / f"{which} confusion matrix.png")
        expected = (cm * (255 / (cm.sum(1, keepdims=True) + 1e-9))).astype(np.uint8)
        np.testing.assert_array_equal(image, expected)


def _read_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    assert (depth, colour) == (8, 0)
    chunks, pos = {}, 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == \
            zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + length
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height,
                                                                            width + 1)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:]


def test_training_learns_the_strokes(tmp_path, monkeypatch):
    _, history = _run(tmp_path, monkeypatch, {"n_epochs": 12, "use_cuda": False,
                                              "initial_lr": 0.1, "lr_decay": 0.05})
    assert history[-1]["train"]["nll"] < 0.5 * history[0]["train"]["nll"]
    assert history[-1]["train"]["top1"] < 20 and history[-1]["test"]["top1"] < 40


def test_same_steps_as_a_hand_written_sgd_nesterov_loop(tmp_path, monkeypatch):
    p = {"n_epochs": 2, "use_cuda": False, "initial_lr": 0.05, "lr_decay": 0.3,
         "weight_decay": 1e-3, "momentum": 0.8}
    model, _ = _run(tmp_path, monkeypatch, p)
    train, _ = _dataset()
    scn.manual_seed(1)
    ref = Model()
    opt = SGD(ref.parameters(), lr=0.05, momentum=0.8, weight_decay=1e-3, nesterov=True)
    schedule = ExponentialDecayLR(opt, 0.3)
    for epoch in (1, 2):
        ref.train()
        for batch in train:
            opt.zero_grad()
            loss = ad.softmax_cross_entropy(ref(batch["input"]), batch["target"])
            loss.backward()
            opt.step()
        schedule.step()
        ref.eval()
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_check_point_restarts_after_the_saved_epoch(tmp_path, monkeypatch, capsys):
    p = {"n_epochs": 2, "use_cuda": False, "check_point": True}
    model, _ = _run(tmp_path, monkeypatch, p)
    assert (tmp_path / "epoch.pth").is_file() and (tmp_path / "model.pth").is_file()
    capsys.readouterr()
    p2 = {"n_epochs": 3, "use_cuda": False, "check_point": True}
    fresh, history = _run(tmp_path, monkeypatch, p2, seed=7)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Restarting at epoch 3 from model.pth .."
    assert p2["epoch"] == 3 and [h["epoch"] for h in history] == [3]
    assert history[0]["lr"] == pytest.approx(0.1 * math.exp(-2 * 0.04), rel=1e-12)
    # nothing left to do: the weights are the saved ones
    p3 = {"n_epochs": 2, "use_cuda": False, "check_point": True}
    again, history = _run(tmp_path, monkeypatch, p3, seed=9)
    assert history == []
    for (name, a), b in zip(again.state_dict().items(), fresh.state_dict().values()):
        assert a.shape == b.shape, name


def test_test_reps_sums_the_scores_of_each_sample(tmp_path, monkeypatch, capsys):
    train, val = _dataset()
    # the validation batches in another order each pass: idx puts them back
    passes = iter([val, val[::-1], val])
    source = lambda: next(passes)      # noqa: E731 - SCN's older dataset['val']() form
    _run(tmp_path, monkeypatch, {"n_epochs": 1, "use_cuda": False, "test_reps": 3},
         dataset=(train, source))
    lines = capsys.readouterr().out.splitlines()
    reps = [line for line in lines if " test rep " in line]
    assert [line.split(" : ")[0] for line in reps] == ["1 test rep  1", "1 test rep  2",
                                                        "1 test rep  3"]
    assert all("MultiplyAdds/sample" in line for line in reps)
    bad = [dict(b, idx=np.zeros(8, int)) for b in val]
    with pytest.raises(ValueError, match="number the 16 validation samples"):
        _run(tmp_path, monkeypatch, {"n_epochs": 1, "use_cuda": False, "test_reps": 2},
             dataset=(train, bad))


def test_use_gpu_is_read_as_use_cuda(tmp_path, monkeypatch):
    p = {"n_epochs": 0, "use_gpu": False}
    _run(tmp_path, monkeypatch, p)
    assert p["use_cuda"] is False and "use_gpu" not in p


def test_update_stats_against_a_sort(rng):
    scores = rng.standard_normal((50, 7)).astype(np.float32)
    scores[3, :] = 0                                      # ties: stable, lower index first
    target = rng.integers(0, 7, 50)
    target[3] = 2
    stats = {}
    updateStats(stats, ad.Tensor(scores), target, 1.5)
    updateStats(stats, scores[:10], target[:10], 0.5)
    order = np.argsort(-scores, axis=1, kind="stable")
    correct = order == target[:, None]
    assert stats["n"] == 60 and stats["nll"] == pytest.approx(1.5 * 50 + 0.5 * 10)
    assert stats["top1"] == correct[:, :1].sum() + correct[:10, :1].sum()
    assert stats["top5"] == correct[:, :5].sum() + correct[:10, :5].sum()
    probs = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    cm = np.zeros((7, 7))
    np.add.at(cm, target, probs)
    np.add.at(cm, target[:10], probs[:10])
    np.testing.assert_allclose(stats["confusion matrix"], cm, rtol=1e-5)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 7\)"):
        updateStats({}, scores, np.full(50, 7), 0.0)
    with pytest.raises(TypeError, match="integer class labels"):
        updateStats({}, scores, np.zeros(50), 0.0)


def test_bad_datasets_and_options_are_named(tmp_path, monkeypatch):
    train, val = _dataset()
    with pytest.raises(TypeError, match="'train' and 'val'"):
        monkeypatch.chdir(tmp_path)
        scn.ClassificationTrainValidate(Model(), {"train": train}, {"use_cuda": False})
    with pytest.raises(TypeError, match=r"keys \['input', 'target'\]"):
        _run(tmp_path, monkeypatch, {"n_epochs": 1, "use_cuda": False},
             dataset=([{"input": train[0]["input"]}], val))
    with pytest.raises(TypeError, match="iterable of batches"):
        _run(tmp_path, monkeypatch, {"n_epochs": 1, "use_cuda": False}, dataset=(3, val))
    with pytest.raises(ValueError, match="gave no batches"):
        _run(tmp_path, monkeypatch, {"n_epochs": 1, "use_cuda": False}, dataset=([], val))
    for key, value in (("n_epochs", -1), ("initial_lr", float("nan")), ("test_reps", 0),
                       ("momentum", "high")):
        with pytest.raises(ValueError, match=key):
            _run(tmp_path, monkeypatch, {key: value, "use_cuda": False})


def test_use_cuda_trains_on_the_gpu_as_on_the_cpu(gpu_device, tmp_path, monkeypatch):
    p_cpu = {"n_epochs": 2, "use_cuda": False, "test_reps": 2}
    cpu_model, cpu_history = _run(tmp_path, monkeypatch, p_cpu)
    p_gpu = {"n_epochs": 2, "use_cuda": True, "test_reps": 2}
    gpu_model, gpu_history = _run(tmp_path, monkeypatch, p_gpu)
    assert all(backend.is_cupy_array(p.data) for p in gpu_model.parameters())
    for a, b in zip(cpu_history, gpu_history):
        for part in ("train", "test"):
            for key in ("top1", "top5", "nll"):
                assert a[part][key] == pytest.approx(b[part][key], abs=1e-3)
    for (name, a), b in zip(cpu_model.state_dict().items(), gpu_model.state_dict().values()):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4, err_msg=name)
