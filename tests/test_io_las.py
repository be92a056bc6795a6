"""sparsegrid.io: LAS / LAZ files through laspy (read_las, write_las)."""

import os
import sys

import numpy as np
import pytest

from optional import require
from sparsegrid import backend
from sparsegrid.autodiff.core import Tensor
from sparsegrid.io import FileFormatError, LasCloud, read_las, write_las, write_ply


@pytest.fixture
def laspy():
    return require("laspy")


@pytest.fixture
def lazrs():
    return require("lazrs", "LAZ compression")


def _utm_cloud(rng, n, scale=0.001):
    """UTM-sized coordinates (5e5 m east, 5e6 m north) on the ``scale`` grid and off it."""
    base = np.array([512_345.0, 5_123_456.0, 87.0])
    return base + rng.uniform(0, [800.0, 600.0, 40.0], (n, 3))


def _suffix_backend(suffix, request):
    if suffix == ".laz":
        request.getfixturevalue("lazrs")


# -- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".las", ".laz"])
@pytest.mark.parametrize("version", ["1.2", "1.4"])
@pytest.mark.parametrize("with_colors", [False, True])
@pytest.mark.parametrize("with_extras", [False, True])
def test_las_round_trip(tmp_path, rng, laspy, request, suffix, version, with_colors,
                        with_extras):
    _suffix_backend(suffix, request)
    n = 1000
    points = _utm_cloud(rng, n)
    colors = rng.integers(0, 65536, (n, 3)).astype(np.uint16) if with_colors else None
    high = 31 if version == "1.2" else 255
    labels = rng.integers(0, high + 1, n)
    intensity = rng.integers(0, 65536, n).astype(np.uint16)
    props = {"intensity": intensity, "gps_time": rng.uniform(0, 1e6, n),
             "return_number": rng.integers(1, 6, n), "user_data": rng.integers(0, 256, n)}
    if with_extras:
        props.update({"height": rng.standard_normal(n).astype(np.float32),
                      "t64": rng.standard_normal(n),
                      "ring": rng.integers(0, 128, n).astype(np.uint8),
                      "offset16": rng.integers(-30000, 30000, n).astype(np.int16),
                      "id64": rng.integers(-2**62, 2**62, n),
                      "normal": rng.standard_normal((n, 3)),
                      "flag": rng.random(n) > 0.5})
    path = tmp_path / f"cloud{suffix}"
    write_las(path, points, colors, labels, props, version=version)
    r = read_las(path)
    assert isinstance(r, LasCloud) and len(r) == n
    expected_format = {("1.2", False): 1, ("1.2", True): 3, ("1.4", False): 6,
                       ("1.4", True): 7}[version, with_colors]
    h = r.header
    assert (h["version"], h["point_format"], h["point_count"]) == (version, expected_format, n)
    assert h["compressed"] == (suffix == ".laz")
    np.testing.assert_array_equal(h["scales"], [0.001] * 3)
    np.testing.assert_array_equal(h["offsets"], np.floor(points.min(axis=0)))
    np.testing.assert_allclose(h["mins"], points.min(axis=0), atol=0.0005 + 1e-9)
    # millimetres kept at UTM size: every coordinate within scale / 2 (+ float64 rounding)
    assert r.points.dtype == np.float64 and r.points.shape == (n, 3)
    assert np.abs(r.points - points).max() <= 0.0005 + 1e-9
    # the stored integers are exactly round((p - offset) / scale), checked with laspy itself
    raw = laspy.read(path)
    expected = np.rint((points - h["offsets"]) / 0.001).astype(np.int64)
    np.testing.assert_array_equal(np.stack([raw.X, raw.Y, raw.Z], axis=1), expected)
    if with_colors:
        assert r.colors.dtype == np.uint16
        np.testing.assert_array_equal(r.colors, colors)
    else:
        assert r.colors is None
    np.testing.assert_array_equal(r.labels, labels)
    np.testing.assert_array_equal(r.intensity, intensity)
    np.testing.assert_array_equal(r["properties"]["gps_time"], props["gps_time"])
    np.testing.assert_array_equal(r.properties["return_number"], props["return_number"])
    np.testing.assert_array_equal(r.properties["user_data"], props["user_data"])
    if with_extras:
        assert h["extra_dimensions"] == ["height", "t64", "ring", "offset16", "id64",
                                         "normal", "flag"]
        for name in ("height", "t64", "ring", "offset16", "id64", "normal"):
            got = r.properties[name]
            assert got.dtype == props[name].dtype and got.shape == props[name].shape, name
            np.testing.assert_array_equal(got, props[name])
        np.testing.assert_array_equal(r.properties["flag"], props["flag"].astype(np.uint8))
    else:
        assert h["extra_dimensions"] == []


def test_las_exact_on_the_scale_grid(tmp_path, rng, laspy):
    """Coordinates that are whole millimetres come back to float64 rounding, at 5e6 m."""
    n = 500
    mm = rng.integers(0, 10**9, (n, 3)) + np.array([5 * 10**8, 5 * 10**9, 0])
    points = mm / 1000.0
    write_las(tmp_path / "a.las", points)
    r = read_las(tmp_path / "a.las")
    np.testing.assert_allclose(r.points, points, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(np.rint(r.points * 1000).astype(np.int64), mm)


def test_las_per_axis_scale_and_explicit_offset(tmp_path, rng, laspy):
    points = _utm_cloud(rng, 200)
    write_las(tmp_path / "a.las", points, scale=(0.01, 0.01, 0.0001),
              offset=(500_000, 5_000_000, 0))
    r = read_las(tmp_path / "a.las")
    np.testing.assert_array_equal(r.header["scales"], [0.01, 0.01, 0.0001])
    np.testing.assert_array_equal(r.header["offsets"], [500_000, 5_000_000, 0])
    err = np.abs(r.points - points).max(axis=0)
    assert np.all(err <= np.array([0.005, 0.005, 0.00005]) + 1e-9)
    assert err[0] > 0.0001   # the coarse axes really were rounded to centimetres


def test_las_uint8_colors_scale_to_16_bits(tmp_path, rng, laspy):
    colors = rng.integers(0, 256, (50, 3)).astype(np.uint8)
    colors[0] = [0, 128, 255]
    write_las(tmp_path / "a.las", rng.random((50, 3)), colors)
    r = read_las(tmp_path / "a.las")
    np.testing.assert_array_equal(r.colors, colors.astype(np.uint16) * 257)
    np.testing.assert_array_equal(r.colors[0], [0, 128 * 257, 65535])
    # other integer dtypes are stored as they are
    write_las(tmp_path / "b.las", rng.random((50, 3)), colors.astype(np.int64))
    np.testing.assert_array_equal(read_las(tmp_path / "b.las").colors, colors)


def test_las_point_format_choice_and_explicit(tmp_path, rng, laspy):
    n = 20
    p = rng.random((n, 3))
    rgb = rng.integers(0, 65536, (n, 3)).astype(np.uint16)
    cases = [({}, "1.2", 0), ({"colors": rgb}, "1.2", 2), ({"colors": rgb}, "1.3", 2),
             ({"properties": {"gps_time": np.zeros(n)}}, "1.2", 1), ({}, "1.4", 6),
             ({"colors": rgb, "properties": {"nir": np.ones(n, np.uint16)}}, "1.4", 8),
             ({"point_format": 3}, "1.2", 3), ({"point_format": 0}, "1.4", 0),
             ({"colors": rgb, "point_format": 10}, "1.4", 10)]
    for i, (kwargs, version, fmt) in enumerate(cases):
        path = tmp_path / f"{i}.las"
        write_las(path, p, version=version, **kwargs)
        r = read_las(path)
        assert (r.header["version"], r.header["point_format"]) == (version, fmt), kwargs
        np.testing.assert_array_equal(r.labels, np.zeros(n))
        if "colors" in kwargs:
            np.testing.assert_array_equal(r.colors, rgb)
    assert "nir" in read_las(tmp_path / "5.las").properties


def test_las_empty_and_single_point(tmp_path, laspy, lazrs):
    for suffix in (".las", ".laz"):
        path = tmp_path / f"empty{suffix}"
        write_las(path, np.zeros((0, 3)), np.zeros((0, 3), np.uint16), np.zeros(0, int),
                  {"extra": np.zeros(0, np.float32)})
        r = read_las(path)
        assert r.points.shape == (0, 3) and r.colors.shape == (0, 3) and r.labels.shape == (0,)
        assert r.properties["extra"].dtype == np.float32 and r.properties["extra"].shape == (0,)
        np.testing.assert_array_equal(r.header["offsets"], [0, 0, 0])
        write_las(path, [[1.25, -2.5, 3.0]], labels=[7])
        r = read_las(path)
        np.testing.assert_array_equal(r.points, [[1.25, -2.5, 3.0]])
        np.testing.assert_array_equal(r.labels, [7])
        np.testing.assert_array_equal(r.header["offsets"], [1, -3, 3])


def test_las_chunked_read_matches_one_chunk(tmp_path, rng, laspy, lazrs):
    n = 2345
    points = _utm_cloud(rng, n)
    colors = rng.integers(0, 65536, (n, 3)).astype(np.uint16)
    labels = rng.integers(0, 256, n)
    for suffix in (".las", ".laz"):
        path = tmp_path / f"c{suffix}"
        write_las(path, points, colors, labels, {"v": rng.standard_normal(n)})
        whole = read_las(path, progress=False)
        for chunk, bar in ((1, False), (100, None), (999, True)):
            part = read_las(path, progress=bar, chunk_size=chunk)
            for key in ("points", "colors", "labels", "intensity"):
                np.testing.assert_array_equal(part[key], whole[key])
            assert list(part.properties) == list(whole.properties)
            for name in whole.properties:
                np.testing.assert_array_equal(part.properties[name], whole.properties[name])


def test_las_reads_what_laspy_writes(tmp_path, rng, laspy):
    """A file made by laspy alone (scaled extra bytes, a WKT record) reads as laspy does."""
    n = 300
    header = laspy.LasHeader(point_format=3, version="1.2")
    header.scales = [0.01, 0.01, 0.01]
    header.offsets = [600_000, 4_000_000, 0]
    header.add_extra_dims([laspy.ExtraBytesParams("amplitude", "u2", scales=[0.5],
                                                  offsets=[10.0])])
    wkt = 'PROJCS["WGS 84 / UTM zone 10N",GEOGCS["WGS 84"]]'
    header.vlrs.append(laspy.vlrs.known.WktCoordinateSystemVlr(wkt))
    las = laspy.LasData(header)
    las.x = 600_000 + rng.uniform(0, 100, n)
    las.y = 4_000_000 + rng.uniform(0, 100, n)
    las.z = rng.uniform(0, 10, n)
    las.classification = rng.integers(0, 32, n).astype(np.uint8)
    las.red = rng.integers(0, 65536, n).astype(np.uint16)
    las.intensity = rng.integers(0, 65536, n).astype(np.uint16)
    las.amplitude = 10.0 + 0.5 * rng.integers(0, 1000, n)
    las.write(tmp_path / "ref.las")
    ref = laspy.read(tmp_path / "ref.las")
    r = read_las(tmp_path / "ref.las")
    np.testing.assert_array_equal(r.points, np.stack([ref.x, ref.y, ref.z], axis=1))
    np.testing.assert_array_equal(r.colors[:, 0], ref.red)
    np.testing.assert_array_equal(r.labels, ref.classification)
    np.testing.assert_array_equal(r.intensity, ref.intensity)
    assert r.properties["amplitude"].dtype == np.float64
    np.testing.assert_array_equal(r.properties["amplitude"], np.asarray(ref.amplitude))
    assert r.header["wkt"] == wkt
    assert r.header["extra_dimensions"] == ["amplitude"]
    assert r.header["version"] == "1.2" and r.header["point_format"] == 3
    assert write_las.__module__ == "sparsegrid.io"
    # sparsegrid's own files carry no WKT
    write_las(tmp_path / "mine.las", r.points)
    assert read_las(tmp_path / "mine.las").header["wkt"] is None


def test_las_accepts_tensor_and_gpu_arrays(tmp_path, rng, laspy, gpu_device):
    points = _utm_cloud(rng, 40)
    labels = rng.integers(0, 20, 40)
    write_las(tmp_path / "a.las", Tensor(points), labels=backend.to_device(labels, gpu_device),
              properties={"v": backend.to_device(np.arange(40.0), gpu_device)})
    r = read_las(tmp_path / "a.las")
    assert np.abs(r.points - points).max() <= 0.0005 + 1e-9
    np.testing.assert_array_equal(r.labels, labels)
    np.testing.assert_array_equal(r.properties["v"], np.arange(40.0))


def test_las_write_is_atomic(tmp_path, rng, laspy, monkeypatch):
    path = tmp_path / "a.las"
    write_las(path, rng.random((10, 3)))
    before = path.read_bytes()

    def broken(self, destination, do_compress=None, laz_backend=None):
        destination.write(b"LASF partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(laspy.LasData, "write", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_las(path, rng.random((20, 3)))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.las"]


# -- refusals -----------------------------------------------------------------------------------
def test_las_refuses_foreign_and_damaged_files(tmp_path, rng, laspy, lazrs):
    ply = tmp_path / "cloud.ply"
    write_ply(ply, rng.random((5, 3)))
    with pytest.raises(FileFormatError, match=r"cloud\.ply.*not a LAS/LAZ file"):
        read_las(ply)
    (tmp_path / "empty.las").write_bytes(b"")
    with pytest.raises(FileFormatError, match="empty.las"):
        read_las(tmp_path / "empty.las")
    with pytest.raises(FileNotFoundError):
        read_las(tmp_path / "missing.las")
    n = 5000
    points = _utm_cloud(rng, n)
    for suffix in (".las", ".laz"):
        good = tmp_path / f"good{suffix}"
        write_las(good, points, rng.integers(0, 65536, (n, 3)).astype(np.uint16))
        data = good.read_bytes()
        point_size = 36   # format 7
        cuts = {"header": data[:100], "half": data[:len(data) // 2],
                "end": data[:-40]}
        if suffix == ".las":   # a cut at a point boundary: a short read, not a decode error
            cuts["boundary"] = data[:len(data) - 10 * point_size]
        for name, cut in cuts.items():
            bad = tmp_path / f"bad_{name}{suffix}"
            bad.write_bytes(cut)
            with pytest.raises(FileFormatError, match=f"bad_{name}"):
                read_las(bad)
        if suffix == ".las":   # a damaged count is refused before anything is allocated
            damaged = bytearray(data)
            damaged[247:255] = (10**12).to_bytes(8, "little")   # LAS 1.4's point count
            (tmp_path / "bad_count.las").write_bytes(bytes(damaged))
            with pytest.raises(FileFormatError, match=r"bad_count.*declares 1000000000000"):
                read_las(tmp_path / "bad_count.las")
        damaged = bytearray(data)
        damaged[96:100] = (len(data) + 10).to_bytes(4, "little")  # points past the end
        (tmp_path / f"bad_size{suffix}").write_bytes(bytes(damaged))
        with pytest.raises(FileFormatError, match="bad_size"):
            read_las(tmp_path / f"bad_size{suffix}")


def _bad(rng, n=10):
    return rng.random((n, 3))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"points": np.zeros((4, 2))}, ValueError, r"points must have shape \(N, 3\)"),
    ({"points": np.zeros((4, 3), bool)}, TypeError, "points must be a float array"),
    ({"points": np.array([[0, 0, np.nan]] * 4)}, ValueError, "points must be finite; row 0"),
    ({"points": np.array([[0, 0, 0], [0, np.inf, 0]] * 2)}, ValueError, "row 1"),
    ({"colors": np.zeros((4, 3), np.float32)}, TypeError, "colors must be an integer"),
    ({"colors": np.zeros((3, 3), np.uint8)}, ValueError, r"colors must have shape \(4, 3\)"),
    ({"colors": np.full((4, 3), 65536)}, ValueError, r"colors must lie in \[0, 65535\]"),
    ({"colors": np.full((4, 3), -1)}, ValueError, r"colors must lie in \[0, 65535\]"),
    ({"labels": np.full(4, 256)}, ValueError, r"labels must lie in \[0, 255\].*format 6"),
    ({"labels": np.full(4, -1)}, ValueError, r"labels must lie in \[0, 255\]"),
    ({"labels": np.full(4, 32), "version": "1.2"}, ValueError,
     r"\[0, 31\] for LAS point format 0.*allow 0..255"),
    ({"labels": np.full(4, 32), "version": "1.4", "point_format": 3}, ValueError,
     r"\[0, 31\]"),
    ({"labels": np.zeros(4, np.float64)}, TypeError, "labels must be an integer"),
    ({"labels": np.zeros(3, int)}, ValueError, r"labels must have shape \(4,\)"),
    ({"version": 1.4}, TypeError, "version must be a str"),
    ({"version": "2.0"}, ValueError, "version must be one of"),
    ({"version": "1.2", "point_format": 6}, ValueError, "not allowed in LAS 1.2"),
    ({"point_format": 11}, ValueError, "not allowed"),
    ({"point_format": True}, TypeError, "point_format must be None or an int"),
    ({"point_format": 6, "colors": np.zeros((4, 3), np.uint8)}, ValueError, "has no colour"),
    ({"scale": 0}, ValueError, "scale must be finite and > 0"),
    ({"scale": (0.01, 0.01)}, ValueError, "scale must be a number or 3 numbers"),
    ({"scale": np.nan}, ValueError, "scale must be finite"),
    ({"offset": (0, 0, np.inf)}, ValueError, "offset must be finite"),
    ({"offset": "zero"}, TypeError, "offset must be a number or 3 numbers"),
    ({"properties": {"x": np.zeros(4)}}, ValueError, "'x' is reserved"),
    ({"properties": {"classification": np.zeros(4)}}, ValueError, "reserved"),
    ({"properties": {"a" * 33: np.zeros(4)}}, ValueError, "1..32 characters"),
    ({"properties": {"v": np.zeros(3)}}, ValueError, r"must have shape \(4,\)"),
    ({"properties": {"v": np.zeros((4, 4))}}, ValueError, "2 or 3 values per point"),
    ({"properties": {"v": np.zeros(4, np.float16)}}, TypeError, "extra bytes must be"),
    ({"properties": {"v": np.array(["a"] * 4)}}, TypeError, "extra bytes must be"),
    ({"properties": {"scan_angle_rank": np.zeros(4, int)}}, ValueError,
     r"standard dimension of LAS point formats \[0, 1, 2, 3, 4, 5\], not of format 6"),
    ({"properties": {"gps_time": np.zeros(4)}, "point_format": 0}, ValueError,
     "standard dimension"),
    ({"properties": {"return_number": np.full(4, 16)}}, ValueError,
     r"'return_number'\] must lie in \[0, 15\]"),
    ({"properties": {"return_number": np.full(4, 8)}, "version": "1.2"}, ValueError,
     r"must lie in \[0, 7\]"),
    ({"properties": {"intensity": np.full(4, 70000)}}, ValueError, r"\[0, 65535\]"),
    ({"properties": {"intensity": np.zeros(4)}}, TypeError, "must be an integer array"),
    ({"properties": {"gps_time": np.array([0, 1, np.nan, 2])}}, ValueError, "finite"),
    ({"properties": {"nir": np.zeros(4, np.uint16)}}, ValueError, "nir'\\] needs colors"),
])
def test_write_las_refuses_bad_input(tmp_path, laspy, kwargs, error, match):
    args = {"points": np.random.default_rng(0).random((4, 3)), **kwargs}
    path = tmp_path / "a.las"
    with pytest.raises(error, match=match):
        write_las(path, **args)
    assert not path.exists()


def test_write_las_refuses_int32_overflow_never_wraps(tmp_path, laspy):
    wide = np.array([[0.0, 0.0, 0.0], [3_000_000.0, 1.0, 1.0]])  # 3e9 mm > 2**31 - 1
    with pytest.raises(ValueError, match=r"points x .* does not fit LAS's int32 at scale "
                                         r"0\.001"):
        write_las(tmp_path / "a.las", wide)
    utm = np.array([[512_345.0, 5_123_456.0, 10.0]])
    with pytest.raises(ValueError, match="points y"):
        write_las(tmp_path / "a.las", utm, offset=0)        # 5.1e9 mm from 0
    write_las(tmp_path / "a.las", utm, offset=0, scale=0.01)  # 5.1e8 cm fits
    np.testing.assert_allclose(read_las(tmp_path / "a.las").points, utm, atol=0.005)
    # the largest extent that fits at mm from the default offset
    edge = np.array([[0.0, 0, 0], [2_147_483.647, 0, 0]])
    write_las(tmp_path / "b.las", edge)
    np.testing.assert_allclose(read_las(tmp_path / "b.las").points, edge, atol=1e-6)
    with pytest.raises(ValueError, match="int32"):
        write_las(tmp_path / "c.las", edge + [[0, 0, 0], [0.001, 0, 0]])


def test_read_las_argument_checks(tmp_path, rng, laspy):
    write_las(tmp_path / "a.las", rng.random((3, 3)))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        read_las(tmp_path / "a.las", chunk_size=0)
    with pytest.raises(TypeError, match="progress must be None, True or False"):
        read_las(tmp_path / "a.las", progress="yes")


# -- missing dependencies ------------------------------------------------------------------------
def test_las_without_laspy_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "laspy", None)     # `import laspy` raises ImportError
    with pytest.raises(ImportError, match=r"read_las needs laspy.*pip install sparsegrid\[las\]"):
        read_las(tmp_path / "a.las")
    with pytest.raises(ImportError, match=r"write_las needs laspy.*sparsegrid\[las\]"):
        write_las(tmp_path / "a.las", np.zeros((1, 3)))


def test_laz_without_a_backend_names_lazrs(tmp_path, rng, laspy, lazrs, monkeypatch):
    points = rng.random((10, 3))
    write_las(tmp_path / "a.laz", points)
    monkeypatch.setattr(laspy.LazBackend, "detect_available", staticmethod(lambda: ()))
    with pytest.raises(ImportError, match=r"reading the LAZ file .*a\.laz.*pip install "
                                          r"sparsegrid\[las\].*lazrs"):
        read_las(tmp_path / "a.laz")
    with pytest.raises(ImportError, match=r"writing the LAZ file .*b\.laz.*lazrs"):
        write_las(tmp_path / "b.laz", points)
    assert not (tmp_path / "b.laz").exists()
    write_las(tmp_path / "c.las", points)             # plain LAS needs no backend
    assert read_las(tmp_path / "c.las").points.shape == (10, 3)


def test_import_sparsegrid_io_does_not_import_laspy():
    import subprocess
    out = subprocess.run([sys.executable, "-c", "import sys, sparsegrid, sparsegrid.io; "
                          "print(int('laspy' in sys.modules), int('lazrs' in sys.modules))"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "0"]


def test_review_regressions(tmp_path):
    """A float32 standard dimension refuses values beyond float32 (no silent inf); a
    damaged scale or offset is refused on reading; a cloud read is written back whole,
    intensity included."""
    import struct
    require("laspy")
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 10, (5, 3))
    with pytest.raises(ValueError, match="float32"):
        write_las(tmp_path / "a.las", pts, properties={"x_t": np.full(5, 1e39)},
                     point_format=9)
    write_las(tmp_path / "b.las", pts, intensity=np.arange(5) + 100, version="1.2",
                 colors=rng.integers(0, 65535, (5, 3)).astype(np.uint16))
    c = read_las(tmp_path / "b.las")
    np.testing.assert_array_equal(c.intensity, np.arange(5) + 100)
    write_las(tmp_path / "c.las", c.points, c.colors, c.labels, c.properties,
                 intensity=c.intensity, point_format=c.header["point_format"],
                 version=c.header["version"], scale=c.header["scales"],
                 offset=c.header["offsets"])
    d = read_las(tmp_path / "c.las")
    np.testing.assert_array_equal(d.points, c.points)
    np.testing.assert_array_equal(d.intensity, c.intensity)
    np.testing.assert_array_equal(d.colors, c.colors)
    with pytest.raises(ValueError, match="both"):
        write_las(tmp_path / "e.las", pts, intensity=np.ones(5, int),
                     properties={"intensity": np.ones(5, int)})
    raw = bytearray((tmp_path / "b.las").read_bytes())
    raw[131:139] = struct.pack("<d", 0.0)                 # the x scale
    (tmp_path / "bad.las").write_bytes(bytes(raw))
    with pytest.raises(FileFormatError, match="damaged LAS header"):
        read_las(tmp_path / "bad.las")
