"""sparsegrid.io: PLY read/write and SparseTensor .npz files."""

import os
import struct
import zipfile

import numpy as np
import pytest

from sparsegrid import SparseTensor, backend
from sparsegrid.io import (FileFormatError, load_tensor, read_ply, save_tensor,
                           tensor_to_points, write_ply)


def _cloud(rng, n, dtype=np.float32):
    return (rng.standard_normal((n, 3)) * 100).astype(dtype)


# -- PLY round trips -------------------------------------------------------------------------
@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("extras", [False, True])
def test_ply_round_trip(tmp_path, rng, binary, dtype, extras):
    n = 57
    points = _cloud(rng, n, np.float64)
    colors = rng.integers(0, 256, (n, 3)) if extras else None
    labels = rng.integers(-5, 1000, n) if extras else None
    props = None
    if extras:
        props = {"intensity": rng.random(n).astype(np.float32),
                 "t": rng.random(n), "ring": rng.integers(0, 64, n).astype(np.uint8),
                 "c8": rng.integers(-128, 128, n).astype(np.int8),
                 "u16": rng.integers(0, 65536, n).astype(np.uint16),
                 "i16": rng.integers(-3000, 3000, n).astype(np.int16),
                 "u32": rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32),
                 "big": rng.integers(-2**31, 2**31, n).astype(np.int64),
                 "flag": rng.random(n) > 0.5}
    path = tmp_path / "cloud.ply"
    write_ply(path, points, colors, labels, props, binary=binary, dtype=dtype,
              comments=["made by a test"])
    r = read_ply(path)
    assert r["format"] == ("binary_little_endian" if binary else "ascii")
    assert r["points"].dtype == dtype and r["points"].shape == (n, 3)
    np.testing.assert_array_equal(r["points"], points.astype(dtype))
    assert r["comments"] == ["made by a test"]
    assert r["elements"] == {"vertex": n}
    if extras:
        assert r["colors"].dtype == np.uint8
        np.testing.assert_array_equal(r["colors"], colors)
        assert r["labels"].dtype == np.int32
        np.testing.assert_array_equal(r["labels"], labels)
        assert list(r["properties"]) == list(props)
        for name, values in props.items():
            got = r["properties"][name]
            np.testing.assert_array_equal(got, values.astype(got.dtype))
        assert r["properties"]["big"].dtype == np.int32
        assert r["properties"]["flag"].dtype == np.uint8
        assert r["properties"]["t"].dtype == np.float64
    else:
        assert "colors" not in r and "labels" not in r and r["properties"] == {}


@pytest.mark.parametrize("binary", [True, False])
def test_ply_empty_cloud(tmp_path, binary):
    path = tmp_path / "empty.ply"
    write_ply(path, np.zeros((0, 3)), np.zeros((0, 3), np.uint8), np.zeros(0, int),
              {"v": np.zeros(0, np.float32)}, binary=binary)
    r = read_ply(path)
    assert r["points"].shape == (0, 3) and r["colors"].shape == (0, 3)
    assert r["labels"].shape == (0,) and r["properties"]["v"].shape == (0,)


def test_ply_binary_exact_bytes(tmp_path):
    path = tmp_path / "tiny.ply"
    write_ply(path, np.array([[1.5, -2.0, 3.25]]), np.array([[255, 0, 7]]), np.array([42]))
    header = (b"ply\nformat binary_little_endian 1.0\nelement vertex 1\n"
              b"property float x\nproperty float y\nproperty float z\n"
              b"property uchar red\nproperty uchar green\nproperty uchar blue\n"
              b"property int label\nend_header\n")
    assert path.read_bytes() == header + struct.pack("<fffBBBi", 1.5, -2.0, 3.25, 255, 0, 7, 42)
    write_ply(path, np.array([[1.5, -2.0, 3.25]]), dtype=np.float64)
    assert path.read_bytes().endswith(b"property double z\nend_header\n"
                                      + struct.pack("<ddd", 1.5, -2.0, 3.25))


def test_ply_accepts_cupy_like_and_tensor_to_points(tmp_path, gpu_device):
    x = SparseTensor(np.ones((3, 1), np.float32), np.array([[0, 0, 0, 0], [0, 1, 2, 3],
                                                           [1, 4, 0, 1]]), (5, 5, 5))
    points = tensor_to_points(x, voxel_size=0.5, origin=(10, 0, -1))
    np.testing.assert_allclose(points, [[10.25, 0.25, -0.75], [10.75, 1.25, 0.75],
                                        [12.25, 0.25, -0.25]])
    xg = x.to(gpu_device)
    pg = tensor_to_points(xg, 0.5, (10, 0, -1))
    assert backend.is_cupy_array(pg)
    labels = xg.indices[:, 0]
    write_ply(tmp_path / "g.ply", pg, labels=labels)
    r = read_ply(tmp_path / "g.ply")
    np.testing.assert_allclose(r["points"], points)
    np.testing.assert_array_equal(r["labels"], [0, 0, 1])


# -- hand-written PLY files ------------------------------------------------------------------
def test_read_ascii_with_faces_and_comments(tmp_path):
    text = """ply
format ascii 1.0
comment written by hand
obj_info a tiny mesh
element vertex 4
property double x
property double y
property double z
property uchar red
property uchar green
property uchar blue
property ushort label
property float quality
element face 2
property list uchar int vertex_indices
property uchar flags
end_header
0 0 0 255 0 0 1 0.5
1 0 0 0 255 0 2 0.25
0 1 0 0 0 255 3 1e-3
0 0 1 10 20 30 65535 -2
3 0 1 2 7
4 0 1 2 3 1
"""
    path = tmp_path / "mesh.ply"
    path.write_text(text)
    r = read_ply(path)
    assert r["points"].dtype == np.float64
    np.testing.assert_array_equal(r["points"], [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(r["colors"][3], [10, 20, 30])
    assert r["labels"].dtype == np.uint16 and r["labels"][3] == 65535
    np.testing.assert_allclose(r["properties"]["quality"], [0.5, 0.25, 1e-3, -2])
    assert r["comments"] == ["written by hand"] and r["obj_info"] == ["a tiny mesh"]
    assert r["elements"] == {"vertex": 4, "face": 2}
    # a face row of the wrong length is refused
    path.write_text(text.replace("4 0 1 2 3 1", "4 0 1 2 1"))
    with pytest.raises(FileFormatError, match="face.*row 1"):
        read_ply(path)


def test_read_binary_with_elements_before_and_after(tmp_path):
    header = (b"ply\r\nformat binary_little_endian 1.0\r\ncomment crlf header\r\n"
              b"element camera 1\r\nproperty float view_px\r\nproperty list uchar int ids\r\n"
              b"element vertex 2\r\nproperty int8 flag\r\nproperty float32 x\r\n"
              b"property float32 y\r\nproperty float32 z\r\nproperty uint16 label\r\n"
              b"element face 1\r\nproperty list uchar int vertex_indices\r\nend_header\r\n")
    body = struct.pack("<fB2i", 1.0, 2, 5, 6)
    body += struct.pack("<bfffH", -1, 1, 2, 3, 9) + struct.pack("<bfffH", 2, 4, 5, 6, 10)
    body += struct.pack("<B3i", 3, 0, 1, 1)
    path = tmp_path / "b.ply"
    path.write_bytes(header + body)
    r = read_ply(path)
    np.testing.assert_array_equal(r["points"], [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(r["labels"], [9, 10])
    np.testing.assert_array_equal(r["properties"]["flag"], [-1, 2])
    assert r["comments"] == ["crlf header"]


def test_read_big_endian(tmp_path):
    header = (b"ply\nformat binary_big_endian 1.0\nelement vertex 2\nproperty float x\n"
              b"property float y\nproperty float z\nproperty uchar red\nproperty uchar green\n"
              b"property uchar blue\nproperty short s\nend_header\n")
    body = struct.pack(">fffBBBh", 1, 2, 3, 4, 5, 6, -7) + struct.pack(">fffBBBh", 8, 9, 10,
                                                                      11, 12, 13, 300)
    path = tmp_path / "be.ply"
    path.write_bytes(header + body)
    r = read_ply(path)
    assert r["format"] == "binary_big_endian"
    np.testing.assert_array_equal(r["points"], [[1, 2, 3], [8, 9, 10]])
    assert r["points"].dtype.isnative and r["properties"]["s"].dtype.isnative
    np.testing.assert_array_equal(r["colors"], [[4, 5, 6], [11, 12, 13]])
    np.testing.assert_array_equal(r["properties"]["s"], [-7, 300])


# -- refusals --------------------------------------------------------------------------------
def test_truncated_binary_refused(tmp_path):
    path = tmp_path / "t.ply"
    write_ply(path, np.ones((10, 3)), labels=np.arange(10))
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(FileFormatError, match=r"t\.ply.*truncated"):
        read_ply(path)
    path.write_bytes(data[:20])
    with pytest.raises(FileFormatError, match="end_header"):
        read_ply(path)


def test_truncated_ascii_refused(tmp_path):
    path = tmp_path / "t.ply"
    write_ply(path, np.ones((10, 3)), binary=False)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]))
    with pytest.raises(FileFormatError, match="truncated.*10 rows.*8"):
        read_ply(path)
    path.write_text("".join(lines[:-1]) + "1 2\n")
    with pytest.raises(FileFormatError, match="row 9.*2 values, expected 3"):
        read_ply(path)


@pytest.mark.parametrize("content, match", [
    (b"", "not a PLY file"),
    (b"\x89PNG\r\n\x1a\n garbage", "not a PLY file"),
    (b"ply\nelement vertex 1\nproperty float x\nend_header\n", "no 'format' line"),
    (b"ply\nformat binary_middle_endian 1.0\nend_header\n", "header line 2"),
    (b"ply\nformat ascii 2.0\nend_header\n", "unsupported PLY version"),
    (b"ply\nformat ascii 1.0\nproperty float x\nend_header\n", "before any element"),
    (b"ply\nformat ascii 1.0\nelement vertex 1\nproperty quad x\nend_header\n",
     "unknown property type"),
    (b"ply\nformat ascii 1.0\nelement vertex -1\nend_header\n", "count >= 0"),
    (b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float x\n"
     b"end_header\n1 2\n", "declared twice"),
    (b"ply\nformat ascii 1.0\nbogus line\nend_header\n", "unknown keyword"),
    (b"ply\nformat ascii 1.0\nelement face 0\nend_header\n", "no 'vertex' element"),
    (b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nend_header\n1\n",
     "no y z property"),
    (b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\n"
     b"property float z\nproperty uchar red\nend_header\n1 2 3 300\n", "red.*outside"),
    (b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\n"
     b"property float z\nend_header\n1 2 abc\n", "'z'"),
    (b"ply\nformat binary_little_endian 1.0\nelement vertex 1\n"
     b"property list uchar float x\nend_header\n\x01\x00\x00\x80\x3f", "list properties"),
])
def test_malformed_ply_refused(tmp_path, content, match):
    path = tmp_path / "bad.ply"
    path.write_bytes(content)
    with pytest.raises(FileFormatError, match=match) as info:
        read_ply(path)
    assert "bad.ply" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_write_ply_argument_errors(tmp_path):
    path = tmp_path / "w.ply"
    pts = np.zeros((2, 3))
    with pytest.raises(ValueError, match="points must have shape"):
        write_ply(path, np.zeros((2, 2)))
    with pytest.raises(TypeError, match="colors must be an integer"):
        write_ply(path, pts, colors=np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        write_ply(path, pts, colors=np.full((2, 3), 256))
    with pytest.raises(ValueError, match="labels must have shape"):
        write_ply(path, pts, labels=np.zeros(3, int))
    with pytest.raises(ValueError, match="reserved"):
        write_ply(path, pts, properties={"x": np.zeros(2)})
    with pytest.raises(ValueError, match="whitespace"):
        write_ply(path, pts, properties={"a b": np.zeros(2)})
    with pytest.raises(ValueError, match="32-bit"):
        write_ply(path, pts, properties={"a": np.array([0, 2**40])})
    with pytest.raises(ValueError, match="dtype must be"):
        write_ply(path, pts, dtype=np.float16)
    assert not path.exists() and os.listdir(tmp_path) == []


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "keep.ply"
    write_ply(path, np.ones((3, 3)))
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    import sparsegrid.io as sio
    monkeypatch.setattr(sio.os, "replace", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_ply(path, np.zeros((5, 3)))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.ply"]


# -- SparseTensor files ----------------------------------------------------------------------
def _tensor(rng, n=40, dtype=np.float32, shape=(9, 7, 5), batch_size=3):
    keys = rng.choice(batch_size * int(np.prod(shape)), n, replace=False)
    indices = np.stack(np.unravel_index(keys, (batch_size, *shape)), axis=1)
    return SparseTensor(rng.standard_normal((n, 4)).astype(dtype), indices, shape, batch_size)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tensor_round_trip(tmp_path, rng, dtype):
    x = _tensor(rng, dtype=dtype, batch_size=5)   # trailing samples may be empty
    path = tmp_path / "x.sgt"                     # no suffix is appended
    x.save(path)
    assert os.listdir(tmp_path) == ["x.sgt"]
    y = SparseTensor.load(path)
    np.testing.assert_array_equal(y.indices, x.indices)
    np.testing.assert_array_equal(y.features, x.features)
    assert y.features.dtype == dtype
    assert (y.spatial_shape, y.batch_size) == (x.spatial_shape, 5)
    with np.load(path) as plain:   # plain numpy, no pickle
        assert str(plain["format"]) == "sparsegrid.SparseTensor"
        assert int(plain["version"]) == 1
        np.testing.assert_array_equal(plain["spatial_shape"], [9, 7, 5])


def test_empty_tensor_round_trip(tmp_path):
    x = SparseTensor(np.zeros((0, 2), np.float64), np.zeros((0, 3), np.int32), (4, 6),
                     batch_size=2)
    save_tensor(tmp_path / "e.npz", x)
    y = load_tensor(tmp_path / "e.npz")
    assert y.n_active == 0 and y.n_channels == 2 and y.batch_size == 2
    assert y.spatial_shape == (4, 6) and y.dtype == np.float64


def test_gpu_tensor_saved_as_numpy(tmp_path, rng, gpu_device):
    x = _tensor(rng)
    xg = x.to(gpu_device)
    xg.save(tmp_path / "g.npz")
    with np.load(tmp_path / "g.npz") as plain:
        assert isinstance(plain["features"], np.ndarray)
    y = SparseTensor.load(tmp_path / "g.npz")
    assert y.device == "cpu"
    np.testing.assert_array_equal(y.features, x.features)
    z = SparseTensor.load(tmp_path / "g.npz", device=gpu_device)
    assert z.device != "cpu"
    np.testing.assert_array_equal(backend.to_numpy(z.indices), x.indices)


def test_autodiff_features_saved_as_values(tmp_path, rng):
    from sparsegrid.autodiff.core import Tensor
    x = _tensor(rng)
    t = SparseTensor(Tensor(x.features, requires_grad=True), x.indices, x.spatial_shape,
                     x.batch_size)
    t.save(tmp_path / "a.npz")
    np.testing.assert_array_equal(SparseTensor.load(tmp_path / "a.npz").features, x.features)


def _write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _members(x, **changes):
    arrays = {"format": np.array("sparsegrid.SparseTensor"), "version": np.array(1),
              "indices": x.indices, "features": x.features,
              "spatial_shape": np.array(x.spatial_shape), "batch_size": np.array(x.batch_size)}
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


def test_tensor_refusals(tmp_path, rng):
    x = _tensor(rng)
    path = tmp_path / "x.npz"
    x.save(path)
    good = path.read_bytes()
    bad = tmp_path / "bad.npz"

    def refused(match):
        with pytest.raises(FileFormatError, match=match) as info:
            load_tensor(bad)
        assert "bad.npz" in str(info.value)

    bad.write_bytes(good[: len(good) // 2])
    refused("truncated or damaged")
    bad.write_bytes(b"")
    refused("not an .npz")
    bad.write_bytes(b"hello world, not a zip")
    refused("not an .npz")
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("readme.txt", "hi")
    refused("without a 'format' member")
    _write_npz(bad, weights=np.ones(3))
    refused("without a 'format' member")
    _write_npz(bad, **_members(x, format=np.array("something.else")))
    refused("'format' member")
    _write_npz(bad, **_members(x, version=np.array(2)))
    refused("version 2")
    _write_npz(bad, **_members(x, batch_size=None))
    refused("lacks.*batch_size")
    _write_npz(bad, **_members(x, indices=x.indices.astype(np.float32)))
    refused("'indices' must be integer")
    _write_npz(bad, **_members(x, indices=x.indices[:, :3]))
    refused("'indices' must be integer")
    _write_npz(bad, **_members(x, features=x.features.astype(np.int32)))
    refused("'features' must be float32")
    _write_npz(bad, **_members(x, features=x.features[:-1]))
    refused("'features' must be float32")
    _write_npz(bad, **_members(x, spatial_shape=np.array([[9, 7, 5]])))
    refused("'spatial_shape'")
    _write_npz(bad, **_members(x, batch_size=np.array([3])))
    refused("'batch_size'")
    out_of_range = x.indices.copy()
    out_of_range[4, 2] = 7
    _write_npz(bad, **_members(x, indices=out_of_range))
    refused("row 4.*outside")
    dup = x.indices.copy()
    dup[1] = dup[0]
    _write_npz(bad, **_members(x, indices=dup))
    refused("invalid sparsegrid tensor file")
    with pytest.raises(FileNotFoundError):
        load_tensor(tmp_path / "missing.npz")
    with pytest.raises(TypeError, match="SparseTensor"):
        save_tensor(tmp_path / "y.npz", np.ones(3))


def test_writers_name_the_path_when_its_folder_is_missing_or_it_is_a_folder(tmp_path):
    pts = np.zeros((2, 3))
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        write_ply(tmp_path / "nope" / "a.ply", pts)
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        write_ply(tmp_path, pts)
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        write_ply(str(tmp_path) + "/", pts)
