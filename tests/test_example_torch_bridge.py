"""examples/torch_bridge.py trains a torch model around a sparsegrid backbone (on a
synthetic stand-in for the MNIST cache, so no download is needed)."""

import pathlib
import subprocess
import sys

import numpy as np

from optional import require

ROOT = pathlib.Path(__file__).resolve().parents[1]


def synthetic_digits(path):
    """A cache file in load_mnist5k's format: 5,000 28x28 images of ten easy classes
    (a horizontal bar whose length is 2 + 2 * label, anywhere on the picture), sorted by
    label like the real one."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import datasets
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 500)
    images = np.zeros((5000, 28, 28), np.uint8)
    rows = rng.integers(4, 24, 5000)
    first = rng.integers(2, 6, 5000)
    for step in range(20):
        on = step < 2 + 2 * labels
        images[np.flatnonzero(on), rows[on], first[on] + step] = 200
    datasets._save_npz(path, images=images, labels=labels.astype(np.int64))


def test_torch_bridge_example_trains(tmp_path):
    require("torch")
    synthetic_digits(tmp_path / "mnist5k.npz")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "torch_bridge.py"), "--epochs", "3",
         "--train", "1280", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, cwd=ROOT / "examples",
        env={"SPARSEGRID_DATA": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "of them in the sparsegrid backbone" in result.stdout
    accuracy = float(result.stdout.split("final held-out accuracy ")[1].split("%")[0])
    assert accuracy > 40, result.stdout       # chance is 10%
