"""The README's code and the examples run as shown."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "the README shows no Python code"
    namespace = {}  # blocks build on each other, as a reader runs them
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["w"].grad.shape == (27, 1, 4)
    assert list(namespace["size"]) == [19, 19]
    assert namespace["out"].shape == (2, 16, 4, 4)


def test_quickstart_example_runs():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "deconvolution 2/2, 32 -> 16" in result.stdout
    assert "Grid(5 cached rulebooks)" in result.stdout


def test_sbnet_lidar_example_runs(tmp_path):
    out = tmp_path / "bev.png"
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "sbnet_lidar.py"),
                             "--channels", "8", "--blocks", "1", "--repeat", "1",
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "blocks active" in result.stdout and "block-sparse" in result.stdout
    difference = float(result.stdout.split("max difference ")[1].split()[0])
    assert difference < 1e-5
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
