"""sparsegrid.plot: headless pictures written as real PNGs, checked pixel by pixel.

Each picture is read back (``matplotlib.image.imread``) and must hold the colours it is
meant to show; inactive sites of ``image`` must look different from active zeros;
subsampling is deterministic and said; bad arguments raise; matplotlib is imported only
when a function is called, pyplot never, and any backend setting works.
"""

import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest

from optional import require
import sparsegrid as sg
from sparsegrid import backend

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def plot():
    require("matplotlib")
    from sparsegrid import plot
    return plot


def read_png(path):
    """RGB floats (H, W, 3) of a PNG file, after checking its signature."""
    import matplotlib.image
    assert pathlib.Path(path).read_bytes()[:8] == PNG_SIGNATURE
    return matplotlib.image.imread(str(path))[..., :3]


def share_near(pixels, rgb, tol=0.02):
    """Fraction of pixels within ``tol`` (max over R, G, B) of the colour ``rgb``."""
    return float((np.abs(pixels - np.asarray(rgb)[:3]).max(axis=-1) < tol).mean())


def not_blank(pixels):
    assert pixels.std() > 0.05
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10


def canvas_pixel(figure, ax, x, y):
    """The RGB of the rendered canvas at data point (x, y) of ``ax``."""
    figure.canvas.draw()
    buffer = np.asarray(figure.canvas.buffer_rgba())[..., :3] / 255.0
    px, py = ax.transData.transform((x, y))
    return buffer[buffer.shape[0] - 1 - int(round(py)), int(round(px))]


def ring_tensor(batch_size=1):
    """A 2-D tensor (30 x 40): a ring of active sites, its upper-left quarter exactly 0."""
    yy, xx = np.mgrid[:30, :40]
    radius = np.hypot(yy - 15, xx - 20)
    mask = (radius > 6) & (radius < 13)
    n = int(mask.sum())
    indices = np.stack([np.zeros(n, int), yy[mask], xx[mask]], 1)
    features = np.stack([np.sin(xx[mask] / 4.0) + 2, np.cos(yy[mask] / 4.0)], 1)
    zero = (yy[mask] < 15) & (xx[mask] < 20)
    features[zero] = 0.0
    if batch_size > 1:
        indices = np.concatenate([indices, indices + [1, 0, 0]])
        features = np.concatenate([features, -features])
    return sg.SparseTensor(features.astype(np.float32), indices.astype(np.int32), (30, 40),
                           batch_size), mask


# -- image ---------------------------------------------------------------------------------
def test_image_writes_a_png_with_inactive_sites_in_the_background_colour(plot, tmp_path):
    import matplotlib
    x, mask = ring_tensor()
    path = tmp_path / "image.png"
    figure = plot.image(x, path=path)
    pixels = read_png(path)
    not_blank(pixels)
    zero_colour = matplotlib.colormaps["viridis"](0.0)   # value 0 is the minimum here
    assert share_near(pixels, (1, 1, 1)) > 0.2           # inactive sites and margins
    assert share_near(pixels, zero_colour) > 0.01        # the active zeros
    # pixel by pixel: an inactive site is white, an active zero viridis(0), never white
    ax = figure.axes[0]
    inactive = canvas_pixel(figure, ax, 20, 15)          # the ring's hole (column, row)
    active_zero = canvas_pixel(figure, ax, 12, 12)
    assert not mask[15, 20] and mask[12, 12] and x.features[
        np.flatnonzero((x.indices[:, 1] == 12) & (x.indices[:, 2] == 12))[0], 0] == 0
    np.testing.assert_allclose(inactive, 1.0, atol=0.01)
    np.testing.assert_allclose(active_zero, zero_colour[:3], atol=0.01)
    assert "active of 1,200 sites" in ax.get_title()
    assert figure.axes[1].get_ylabel() == "channel 0"     # the colour bar


def test_image_background_colour_norm_channel_and_batch(plot, tmp_path):
    x, mask = ring_tensor(batch_size=2)
    figure = plot.image(x, channel="norm", batch=1, background="tab:red", colorbar=False)
    ax = figure.axes[0]
    assert len(figure.axes) == 1 and ax.get_title().startswith("sample 1:")
    import matplotlib.colors
    np.testing.assert_allclose(canvas_pixel(figure, ax, 20, 15),
                               matplotlib.colors.to_rgb("tab:red"), atol=0.01)
    # the norm over channels is what is drawn: compare the image array with it
    shown = ax.images[0].get_array()
    rows = x.indices[:, 0] == 1
    norm = np.linalg.norm(x.features[rows].astype(np.float64), axis=1)
    np.testing.assert_allclose(shown[x.indices[rows, 1], x.indices[rows, 2]], norm,
                               rtol=1e-6)
    assert shown.mask.sum() == (~mask).sum()
    assert plot.image(x, channel=None).axes[0].images[0].get_array().max() == \
        pytest.approx(norm.max(), rel=1e-6)


def test_image_of_a_dense_array_and_into_a_given_axes(plot, tmp_path):
    from matplotlib.figure import Figure
    picture = np.arange(12.0).reshape(3, 4)
    figure = Figure()
    axes = figure.subplots(1, 2)
    out = plot.image(picture, ax=axes[1], path=tmp_path / "dense.png")
    assert out is figure
    np.testing.assert_array_equal(axes[1].images[0].get_array(), picture)
    not_blank(read_png(tmp_path / "dense.png"))
    np.testing.assert_array_equal(plot.image(-picture, channel="norm").axes[0].images[0]
                                  .get_array(), picture)


def test_image_refuses_a_background_the_colormap_contains(plot):
    x, _ = ring_tensor()
    with pytest.raises(ValueError, match="indistinguishable from the colour of colormap 'gray'"):
        plot.image(x, cmap="gray")
    with pytest.raises(ValueError, match="'magma'"):
        plot.image(x, cmap="magma", background="black")
    with pytest.raises(ValueError, match="opaque"):
        plot.image(x, background="none")
    with pytest.raises(ValueError, match="must be a matplotlib colour"):
        plot.image(x, background="not-a-colour")
    plot.image(x, cmap="gray", background="tab:red")


@pytest.mark.parametrize("call, error, match", [
    (lambda p, x: p.image(x, channel=2), ValueError, r"channel 2 does not exist.*0\.\.1"),
    (lambda p, x: p.image(x, channel="max"), ValueError, "'norm' or None"),
    (lambda p, x: p.image(x, channel=1.0), TypeError, "channel must be an int"),
    (lambda p, x: p.image(x, batch=1), ValueError, r"batch must be in \[0, 0\]"),
    (lambda p, x: p.image(x, batch=True), TypeError, "batch must be an int"),
    (lambda p, x: p.image(x, cmap="no_such_map"), ValueError, "not a matplotlib colormap"),
    (lambda p, x: p.image(x, cmap=3), TypeError, "cmap must be"),
    (lambda p, x: p.image(x, colorbar="yes"), TypeError, "colorbar"),
    (lambda p, x: p.image(x, ax="axes"), TypeError, "ax must be a matplotlib Axes"),
    (lambda p, x: p.image(sg.SparseTensor(np.ones((1, 1), np.float32),
                                          np.zeros((1, 4), np.int32), (2, 2, 2))),
     ValueError, "2-D SparseTensor; got 3-D"),
    (lambda p, x: p.image(np.ones((2, 3, 4))), ValueError, r"2-D array \(H, W\)"),
    (lambda p, x: p.image(np.array([[1.0, np.nan]])), ValueError, "x must be finite"),
    (lambda p, x: p.image(np.ones((2, 2)), channel=1), ValueError, "one channel"),
    (lambda p, x: p.image(np.ones((2, 2)), batch=1), ValueError, "batch must be 0"),
    (lambda p, x: p.image(np.array([["a"]])), TypeError, "real numeric"),
    (lambda p, x: p.image("picture"), TypeError, "x must be an array"),
    (lambda p, x: p.image(x.with_features(np.full((x.n_active, 2), np.nan, np.float32))),
     ValueError, "must be finite"),
])
def test_image_validation(plot, call, error, match):
    x, _ = ring_tensor()
    with pytest.raises(error, match=match):
        call(plot, x)


def test_image_refuses_a_picture_too_large(plot, monkeypatch):
    from sparsegrid import coords
    x = sg.SparseTensor(np.ones((1, 1), np.float32), np.zeros((1, 3), np.int32),
                        (100_000, 100_000))
    monkeypatch.setattr(coords, "MAX_ALLOCATION_BYTES", 2**30)
    with pytest.raises(MemoryError, match="sparsegrid.plot.image"):
        plot.image(x)


# -- points --------------------------------------------------------------------------------
def labelled_cloud(rng, n=3000):
    points = rng.standard_normal((n, 3)) * [4.0, 2.0, 1.0]
    labels = (points[:, 0] > 0).astype(np.int64) + 2 * (points[:, 2] > 0)
    return points, labels


def test_points_labels_colours_and_legend(plot, tmp_path, rng):
    import matplotlib
    points, labels = labelled_cloud(rng)
    names = {0: "ground", 1: "car", 2: "tree", 3: "building"}
    path = tmp_path / "labels.png"
    figure = plot.points(points, labels=labels, label_names=names, point_size=20, path=path)
    pixels = read_png(path)
    not_blank(pixels)
    tab10 = matplotlib.colormaps["tab10"].colors
    for label in range(4):                     # labels 0..3 get tab10's first colours
        assert share_near(pixels, tab10[label]) > 0.003, label
    assert share_near(pixels, tab10[4]) < 0.0005
    legend = figure.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == list(names.values())
    assert figure.axes[0].get_title() == "3,000 points"
    # a sequence of names, and the label numbers by default
    texts = plot.points(points, labels=labels, label_names=["a", "b", "c", "d"]) \
        .axes[0].get_legend().get_texts()
    assert [t.get_text() for t in texts] == ["a", "b", "c", "d"]
    texts = plot.points(points, labels=labels + 7).axes[0].get_legend().get_texts()
    assert [t.get_text() for t in texts] == ["7", "8", "9", "10"]


def test_points_label_colours_do_not_depend_on_which_labels_are_present(plot, rng):
    points, labels = labelled_cloud(rng, 200)
    points = points[:, :2]          # a 2-D scatter keeps its colours in point order
    full = plot.points(points, labels=labels).axes[0].collections[0].get_facecolors()
    keep = labels != 0
    part = plot.points(points[keep], labels=labels[keep]).axes[0].collections[0] \
        .get_facecolors()
    np.testing.assert_array_equal(full[keep], part)
    # negative or large labels: coloured by rank, still distinct
    odd = np.where(labels == 0, -1, labels * 1000)
    colours = plot.points(points, labels=odd).axes[0].collections[0].get_facecolors()
    assert len(np.unique(colours, axis=0)) == len(np.unique(odd))


def test_points_values_colorbar_and_rgb_colours(plot, tmp_path, rng):
    import matplotlib
    points = rng.standard_normal((2000, 3))
    path = tmp_path / "values.png"
    figure = plot.points(points, values=points[:, 2], colorbar_label="height", path=path,
                         point_size=10)
    pixels = read_png(path)
    not_blank(pixels)
    assert figure.axes[1].get_ylabel() == "height"
    scatter = figure.axes[0].collections[0]
    assert scatter.get_clim() == (points[:, 2].min(), points[:, 2].max())
    # RGB colours in three dtypes draw the same colours
    rgb8 = np.zeros((2000, 3), np.uint8)
    rgb8[:1000, 0] = 255
    rgb8[1000:, 2] = 255
    faces = []
    for colors in (rgb8, rgb8.astype(np.uint16) * 257, rgb8 / 255.0):
        out = tmp_path / f"rgb_{colors.dtype}.png"
        figure = plot.points(points[:, :2], colors=colors, point_size=20, path=out)
        pixels = read_png(out)
        assert share_near(pixels, (1, 0, 0)) > 0.01 and share_near(pixels, (0, 0, 1)) > 0.01
        faces.append(figure.axes[0].collections[0].get_facecolors())
    np.testing.assert_allclose(faces[0], faces[1])
    np.testing.assert_allclose(faces[0], faces[2])
    # no colouring: one colour
    single = plot.points(points).axes[0].collections[0].get_facecolors()
    assert len(np.unique(single, axis=0)) == 1
    assert matplotlib.colors.to_hex(single[0]) == matplotlib.colors.to_hex("C0")


def test_points_subsample_is_deterministic_and_stated(plot, rng):
    points = rng.standard_normal((1000, 2))
    labels = np.zeros(1000, np.int64)
    labels[0] = 5                                            # one rare point
    expected = np.sort(np.random.default_rng(0).choice(1000, 100, replace=False))
    assert 0 not in expected
    figure = plot.points(points, labels=labels, max_points=100, title="scan")
    ax = figure.axes[0]
    np.testing.assert_array_equal(ax.collections[0].get_offsets(), points[expected])
    assert ax.get_title() == "scan\n100 of 1,000 points drawn (random subsample, seed 0)"
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["0", "5 (none drawn)"]                  # listed, and said
    again = plot.points(points, labels=labels, max_points=100).axes[0]
    np.testing.assert_array_equal(again.collections[0].get_offsets(), points[expected])
    assert again.get_title() == "100 of 1,000 points drawn (random subsample, seed 0)"
    other = plot.points(points, max_points=100, seed=1).axes[0].collections[0].get_offsets()
    assert not np.array_equal(other, points[expected])
    every = plot.points(points, max_points=None).axes[0]
    assert len(every.collections[0].get_offsets()) == 1000
    assert every.get_title() == "1,000 points"


def test_points_3d_subsample_png_is_reproducible(plot, tmp_path, rng):
    points, labels = labelled_cloud(rng, 5000)
    a = plot.points(points, labels=labels, max_points=700, path=tmp_path / "a.png")
    plot.points(points, labels=labels, max_points=700, path=tmp_path / "b.png")
    assert "700 of 5,000 points drawn" in a.axes[0].get_title()
    np.testing.assert_array_equal(read_png(tmp_path / "a.png"), read_png(tmp_path / "b.png"))


def test_points_equal_aspect(plot, rng):
    points = rng.random((500, 3)) * [100.0, 50.0, 5.0]
    ax = plot.points(points).axes[0]
    spans = [np.ptp(getter()) for getter in (ax.get_xlim3d, ax.get_ylim3d, ax.get_zlim3d)]
    box = ax.get_box_aspect()
    # the box's side lengths are proportional to the data ranges: one unit, one length
    np.testing.assert_allclose(np.asarray(box) / box[0], np.asarray(spans) / spans[0],
                               rtol=1e-6)
    assert spans[0] == pytest.approx(100 * 1.04, rel=0.02)
    # single points, flat clouds and empty clouds draw
    plot.points(np.zeros((1, 3)))
    plot.points(np.c_[rng.random((10, 2)), np.zeros(10)])
    assert plot.points(np.zeros((0, 3))).axes[0].get_title() == "0 points"
    flat = plot.points(rng.random((20, 2))).axes[0]
    assert flat.get_aspect() == 1.0


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(points=np.zeros((5, 4))), ValueError, r"\(N, 3\) or \(N, 2\)"),
    (dict(points=np.zeros(5)), ValueError, r"\(N, 3\) or \(N, 2\)"),
    (dict(points=np.array([[0, 0, np.inf]])), ValueError, "points must be finite.*row 0"),
    (dict(points=np.zeros((5, 3), bool)), TypeError, "points must be a real"),
    (dict(values=np.zeros(4)), ValueError, r"values must have shape \(5,\)"),
    (dict(values=np.array([0, 1, 2, 3, np.nan])), ValueError, "values must be finite"),
    (dict(labels=np.zeros(5, np.float64)), TypeError, "labels must be an integer"),
    (dict(labels=np.zeros(6, int)), ValueError, r"labels must have shape \(5,\)"),
    (dict(labels=np.arange(5), label_names={0: "a"}), ValueError, r"no name for label\(s\) "
                                                                  r"\[1, 2, 3, 4\]"),
    (dict(labels=np.arange(5), label_names=["a", "b"]), ValueError, "no name"),
    (dict(labels=np.arange(5), label_names="abcde"), TypeError, "label_names must be"),
    (dict(label_names=["a"]), ValueError, "pass labels too"),
    (dict(values=np.zeros(5), labels=np.zeros(5, int)), ValueError, "at most one of"),
    (dict(colors=np.zeros((5, 3), np.int64)), TypeError, "uint8.*uint16.*float"),
    (dict(colors=np.full((5, 3), 2.0)), ValueError, r"must lie in \[0, 1\]"),
    (dict(colors=np.zeros((5, 4))), ValueError, r"colors must have shape \(5, 3\)"),
    (dict(max_points=0), ValueError, "max_points must be >= 1"),
    (dict(max_points=10.0), TypeError, "max_points must be an int"),
    (dict(elev="up"), TypeError, "elev must be a number"),
    (dict(azim=np.nan), ValueError, "azim must be finite"),
    (dict(point_size=-1), ValueError, "point_size must be a finite number > 0"),
    (dict(colorbar_label="x"), ValueError, "pass values too"),
    (dict(cmap="nope", values=np.zeros(5)), ValueError, "colormap"),
    (dict(figsize=(4,)), TypeError, "figsize must be a sequence of 2"),
])
def test_points_validation(plot, kwargs, error, match):
    kwargs.setdefault("points", np.zeros((5, 3)))
    with pytest.raises(error, match=match):
        plot.points(**kwargs)


def test_points_axes_must_match_the_dimension(plot):
    from matplotlib.figure import Figure
    figure = Figure()
    flat, solid = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2, projection="3d")
    with pytest.raises(ValueError, match="3-D axes"):
        plot.points(np.zeros((3, 3)), ax=flat)
    with pytest.raises(ValueError, match="2-D axes"):
        plot.points(np.zeros((3, 2)), ax=solid)
    with pytest.raises(ValueError, match="figsize"):
        plot.points(np.zeros((3, 3)), ax=solid, figsize=(3, 3))
    assert plot.points(np.zeros((3, 3)), ax=solid) is figure


# -- voxels --------------------------------------------------------------------------------
def shell_tensor(rng):
    from sparsegrid.pointcloud import voxelize
    points = rng.standard_normal((4000, 3))
    points = 4 * points / np.linalg.norm(points, axis=1, keepdims=True)
    clouds = [points, points + [0, 0, 3]]
    result = voxelize(clouds, 0.5, features=[p[:, 2:] for p in clouds])
    return result


def test_voxels_draws_the_centres_of_one_sample(plot, tmp_path, rng, monkeypatch):
    result = shell_tensor(rng)
    x = result.tensor
    upper = (x.indices[:, 3] >= 8).astype(np.int32)
    path = tmp_path / "voxels.png"
    figure = plot.voxels(x, labels=upper, label_names=["lower", "upper"], batch=1,
                         voxel_size=result.voxel_size, origin=result.origin, path=path,
                         point_size=15)
    pixels = read_png(path)
    not_blank(pixels)
    import matplotlib
    tab10 = matplotlib.colormaps["tab10"].colors
    assert share_near(pixels, tab10[0]) > 0.005 and share_near(pixels, tab10[1]) > 0.005
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["lower", "upper"]
    rows = x.indices[:, 0] == 1
    assert ax.get_title() == f"sample 1: {int(rows.sum()):,} active voxels"
    # what reaches points(): the centres origin + (i + 0.5) * size of sample 1's rows
    seen = {}
    monkeypatch.setattr(plot, "points", lambda centres, **kw: seen.update(kw, c=centres))
    plot.voxels(x, channel=0, batch=1, voxel_size=(0.5, 0.5, 0.25), origin=(1, 2, 3))
    expected = np.array([1, 2, 3]) + (x.indices[rows, 1:] + 0.5) * [0.5, 0.5, 0.25]
    np.testing.assert_allclose(seen["c"], expected)
    np.testing.assert_allclose(seen["values"], x.features[rows, 0])
    assert seen["colorbar_label"] == "channel 0"
    plot.voxels(x, channel="norm", colors=None)
    assert seen["colorbar_label"] == "L2 norm over channels"
    rgb = np.zeros((x.n_active, 3), np.uint8)
    rgb[:, 1] = np.arange(x.n_active) % 256
    plot.voxels(x, colors=rgb, batch=1)
    np.testing.assert_array_equal(seen["colors"], rgb[rows])


def test_voxels_with_a_feature_channel_writes_a_png(plot, tmp_path, rng):
    x = shell_tensor(rng).tensor
    path = tmp_path / "channel.png"
    figure = plot.voxels(x, channel=0, path=path, cmap="coolwarm")
    not_blank(read_png(path))
    assert figure.axes[1].get_ylabel() == "channel 0"


@pytest.mark.parametrize("call, error, match", [
    (lambda p, x: p.voxels(ring_tensor()[0]), ValueError, "3-D SparseTensor; got 2-D"),
    (lambda p, x: p.voxels(np.zeros((3, 3))), TypeError, "x must be a SparseTensor"),
    (lambda p, x: p.voxels(x, batch=2), ValueError, r"batch must be in \[0, 1\]"),
    (lambda p, x: p.voxels(x, channel=1), ValueError, r"channel 1 does not exist"),
    (lambda p, x: p.voxels(x, channel=0, labels=np.zeros(x.n_active, int)), ValueError,
     "not both"),
    (lambda p, x: p.voxels(x, labels=np.zeros(3, int)), ValueError,
     r"labels must have shape \(\d+,\) \(one per row of x"),
    (lambda p, x: p.voxels(x, colors=np.zeros((3, 3), np.uint8)), ValueError,
     "colors must have shape"),
    (lambda p, x: p.voxels(x, voxel_size=(1, 2)), ValueError, "one number or 3 numbers"),
    (lambda p, x: p.voxels(x, voxel_size=0), ValueError, "voxel_size must be finite and > 0"),
    (lambda p, x: p.voxels(x, origin=np.nan), ValueError, "origin must be finite"),
    (lambda p, x: p.voxels(x, values=np.zeros(3)), TypeError, "values cannot be passed"),
    (lambda p, x: p.voxels(x, max_points=-1), ValueError, "max_points"),
])
def test_voxels_validation(plot, rng, call, error, match):
    x = shell_tensor(rng).tensor
    with pytest.raises(error, match=match):
        call(plot, x)


# -- devices -------------------------------------------------------------------------------
def test_device_arrays_are_copied_to_the_host(plot, tmp_path, gpu_device, rng):
    x, _ = ring_tensor()
    xg = x.to(gpu_device)
    assert backend.is_cupy_array(xg.features)
    np.testing.assert_array_equal(plot.image(xg).axes[0].images[0].get_array(),
                                  plot.image(x).axes[0].images[0].get_array())
    import cupy
    points, labels = labelled_cloud(rng, 300)
    figure = plot.points(cupy.asarray(points), values=cupy.asarray(points[:, 0]))
    np.testing.assert_array_equal(figure.axes[0].collections[0].get_array(), points[:, 0])
    plot.points(cupy.asarray(points), labels=cupy.asarray(labels))
    plot.image(cupy.asarray(np.eye(3)))
    v = shell_tensor(rng).tensor
    plot.voxels(v.to(gpu_device), channel=0, labels=None, path=tmp_path / "v.png")
    plot.voxels(v.to(gpu_device), labels=cupy.asarray(np.zeros(v.n_active, np.int32)))
    line = plot.curve(cupy.asarray([3.0, 2.0, 1.0])).axes[0].lines[0]
    np.testing.assert_array_equal(line.get_ydata(), [3, 2, 1])


# -- curve ---------------------------------------------------------------------------------
def fit_history(epochs=3):
    """The records of examples/train_utils.fit on a toy network (CPU, a few seconds)."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import train_utils
    finally:
        sys.path.remove(str(ROOT / "examples"))
    from nn_helpers import toy_batch, toy_model
    from sparsegrid.nn.optim import SGD
    inputs, labels = toy_batch()
    model = toy_model()
    optimizer = SGD(model.parameters(), lr=0.05, momentum=0.9)
    lines = []
    history = train_utils.fit(model, optimizer, lambda epoch: [(inputs, labels)] * 4,
                              lambda: [(inputs, labels)], epochs, log=lines.append)
    return history, lines


def test_curve_of_what_fit_returns(plot, tmp_path):
    history, _ = fit_history()
    path = tmp_path / "fit.png"
    figure = plot.curve(history, path=path, title="toy")
    not_blank(read_png(path))
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == \
        ["loss", "train_accuracy", "test_accuracy"]
    for line, key in zip(ax.lines, ("loss", "train_accuracy", "test_accuracy")):
        np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3])
        np.testing.assert_allclose(line.get_ydata(), [r[key] for r in history])
    # the docstring's example
    loss = plot.curve(history, keys="loss", logy=True).axes[0]
    assert loss.get_yscale() == "log" and loss.get_ylabel() == "loss"
    accuracy = plot.curve(history, keys=["train_accuracy", "test_accuracy"],
                          ylabel="accuracy").axes[0]
    assert len(accuracy.lines) == 2 and accuracy.get_ylabel() == "accuracy"
    timing = plot.curve(history, keys=["forward_ms", "backward_ms"], ylabel="ms").axes[0]
    assert len(timing.lines) == 2


def test_curve_sequences_dicts_gaps_and_sparse_records(plot, tmp_path):
    figure = plot.curve([3, 2, 1.5], path=tmp_path / "one.png", ylabel="loss")
    ax = figure.axes[0]
    assert ax.get_legend() is None and ax.get_xlabel() == "epoch"
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [1, 2, 3])
    not_blank(read_png(tmp_path / "one.png"))
    two = plot.curve({"sgd": np.array([2.0, 1.0]), "adam": (2.0, 0.5, 0.25)}).axes[0]
    assert [t.get_text() for t in two.get_legend().get_texts()] == ["sgd", "adam"]
    # non-finite values are not drawn, and the legend says where
    gap = plot.curve({"loss": [1.0, np.nan, 0.5, np.inf]}).axes[0]
    assert [t.get_text() for t in gap.get_legend().get_texts()] == \
        ["loss (not finite at epoch 2, 4)"]
    assert np.isnan(gap.lines[0].get_ydata()[[1, 3]]).all()
    # a key present in some records only, and x from another key
    records = [dict(step=10, loss=1.0), dict(step=20, loss=0.8, val=0.9),
               dict(step=30, loss=0.5), dict(step=40, loss=0.4, val=0.6)]
    sparse = plot.curve(records, x="step", xlabel="step").axes[0]
    np.testing.assert_array_equal(sparse.lines[1].get_xdata(), [20, 40])
    np.testing.assert_array_equal(sparse.lines[1].get_ydata(), [0.9, 0.6])
    positions = plot.curve(records, x=None, keys="loss").axes[0]
    np.testing.assert_array_equal(positions.lines[0].get_xdata(), [1, 2, 3, 4])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(history=[]), ValueError, "history is empty"),
    (dict(history={}), ValueError, "history is empty"),
    (dict(history={"a": []}), ValueError, r"history\['a'\] is empty"),
    (dict(history="loss"), TypeError, "sequence of numbers"),
    (dict(history=3.0), TypeError, "history must be"),
    (dict(history=None), TypeError, "history must be"),
    (dict(history=[True, False]), TypeError, "real numbers"),
    (dict(history=[[1, 2], [3, 4]]), ValueError, "one-dimensional"),
    (dict(history=[1, "a"]), TypeError, "real numbers"),
    (dict(history=[{"loss": 1}, 3]), TypeError, r"history\[1\] must be a dict"),
    (dict(history=[{"loss": 1}, {"loss": "x"}], keys="loss"), TypeError,
     r"history\[1\]\['loss'\] must be a number"),
    (dict(history=[{"loss": 1}], keys="lost"), ValueError, "no record has key 'lost'"),
    (dict(history=[{"name": "a", "seconds": 1.0}]), ValueError, "no numeric keys"),
    (dict(history=[1.0, 2.0], keys="loss"), ValueError, "keys selects keys"),
    (dict(history=[1.0, 0.0], logy=True), ValueError, "logy needs values > 0.*epoch 2"),
    (dict(history=[1.0], logy="yes"), TypeError, "logy must be True or False"),
    (dict(history=[{"epoch": "one", "loss": 1.0}]), TypeError, "x value"),
])
def test_curve_validation(plot, kwargs, error, match):
    with pytest.raises(error, match=match):
        plot.curve(**kwargs)


# -- save ----------------------------------------------------------------------------------
def test_save_is_atomic_keeps_the_mode_and_returns_the_path(plot, tmp_path):
    figure = plot.curve([1, 2, 3])
    path = tmp_path / "curve.png"
    assert plot.save(figure, path) is path
    first = path.read_bytes()
    assert first[:8] == PNG_SIGNATURE
    os.chmod(path, 0o600)
    assert plot.save(figure, str(path), dpi=60) == str(path)
    assert len(path.read_bytes()) < len(first)              # fewer dots per inch
    assert os.stat(path).st_mode & 0o777 == 0o600
    # a failed render leaves the old file and no temporary behind
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("render failed")
    figure.savefig = broken
    with pytest.raises(RuntimeError, match="render failed"):
        plot.save(figure, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png"]


def test_save_of_a_pyplot_free_figure_without_canvas_and_of_a_subfigure(plot, tmp_path):
    from matplotlib.figure import Figure
    figure = Figure()                           # no Agg canvas attached by the caller
    sub = figure.subfigures(1, 2)[1]
    plot.curve([1, 3, 2], ax=sub.add_subplot())
    plot.save(sub, tmp_path / "sub.png")
    not_blank(read_png(tmp_path / "sub.png"))


@pytest.mark.parametrize("args, error, match", [
    (("not a figure", "a.png"), TypeError, "figure must be a matplotlib Figure"),
    ((None, 3), TypeError, "path must be a str or os.PathLike"),
    ((None, "a.jpg"), ValueError, r"must end in '\.png'"),
    ((None, "a.png", 0), ValueError, "dpi must be a finite number > 0"),
    ((None, "a.png", "high"), TypeError, "dpi must be a number"),
])
def test_save_validation(plot, tmp_path, args, error, match):
    figure = plot.curve([1, 2])
    args = tuple(figure if a is None else (tmp_path / a if isinstance(a, str) and
                                             a.endswith("g") else a) for a in args)
    with pytest.raises(error, match=match):
        plot.save(*args)


# -- headless, lazy, thread-safe -----------------------------------------------------------
def run_python(code, **env):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, cwd=ROOT, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_matplotlib_is_imported_only_when_a_function_runs(plot):
    out = run_python(
        "import sys, sparsegrid.plot as p\n"
        "print(int('matplotlib' in sys.modules))\n"
        "p.curve([1, 2])\n"
        "print(int('matplotlib' in sys.modules), int('matplotlib.pyplot' in sys.modules))")
    assert out == ["0", "1", "0"]


def test_missing_matplotlib_names_the_extra(monkeypatch):
    from sparsegrid import plot
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for call in (lambda: plot.curve([1.0]), lambda: plot.points(np.zeros((2, 3))),
                 lambda: plot.save(None, "a.png")):
        with pytest.raises(ImportError, match=r"pip install sparsegrid\[plot\]"):
            call()


@pytest.mark.parametrize("setting", ["pdf", "module://no_such_backend", "use:svg"])
def test_any_backend_setting_works_and_pyplot_stays_unloaded(plot, tmp_path, setting):
    env = {} if setting.startswith("use:") else {"MPLBACKEND": setting}
    use = f"import matplotlib; matplotlib.use({setting[4:]!r})\n" if setting.startswith(
        "use:") else ""
    out = run_python(
        use + "import sys, numpy as np, sparsegrid as sg, sparsegrid.plot as p\n"
        "import matplotlib\n"
        "before = matplotlib.rcParams._get('backend')\n"
        f"folder = {str(tmp_path)!r}\n"
        "x = sg.SparseTensor(np.ones((2, 1), np.float32), [[0, 0, 0], [0, 1, 1]], (2, 2))\n"
        "p.image(x, path=folder + '/i.png')\n"
        "p.points(np.random.default_rng(0).random((50, 3)), path=folder + '/p.png')\n"
        "p.voxels(sg.SparseTensor(np.ones((1, 1)), [[0, 1, 1, 1]], (3, 3, 3)), channel=0,"
        " path=folder + '/v.png')\n"
        "p.curve([1, 2, 3], path=folder + '/c.png')\n"
        "print(int('matplotlib.pyplot' in sys.modules),"
        " int(matplotlib.rcParams._get('backend') == before))", **env)
    assert out == ["0", "1"]
    for name in ("i", "p", "v", "c"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE


def test_drawing_in_threads_gives_the_serial_pictures(plot, rng):
    x, _ = ring_tensor()
    points, labels = labelled_cloud(rng, 2000)

    def render(i):
        figure = (plot.image(x, channel=i % 2) if i % 2 == 0 else
                  plot.points(points, labels=labels, azim=10 * i))
        figure.canvas.draw()
        return np.asarray(figure.canvas.buffer_rgba()).copy()

    serial = [render(i) for i in range(6)]
    results = [None] * 6
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, render(i)))
               for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(serial, results):
        np.testing.assert_array_equal(a, b)


def test_color_depth_of_uint16_colours(tmp_path):
    from sparsegrid.plot import _point_colors
    dark = np.full((4, 3), 200, np.uint16)
    np.testing.assert_allclose(_point_colors(dark, 4), 200 / 255)          # auto: 8-bit
    np.testing.assert_allclose(_point_colors(dark, 4, 16), 200 / 65535)
    with pytest.raises(ValueError, match="color_depth=8"):
        _point_colors(np.full((4, 3), 300, np.uint16), 4, 8)
    with pytest.raises(ValueError, match="color_depth"):
        _point_colors(dark, 4, 12)


def test_masked_arrays_are_refused_not_drawn_with_hidden_values(plot):
    masked = np.ma.masked_array(np.ones((2, 2)), mask=[[1, 0], [0, 0]])
    with pytest.raises(ValueError, match="masked"):
        plot.image(masked)
    plot.image(np.ma.masked_array(np.ones((2, 2)), mask=False))     # nothing masked: fine
