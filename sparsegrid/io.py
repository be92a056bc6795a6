"""Files: PLY point clouds (read and write, no dependency) and SparseTensor ``.npz`` files.

PLY (:func:`write_ply`, :func:`read_ply`)
    Binary little-endian, binary big-endian (read only) and ASCII; vertex ``x y z``,
    ``red green blue`` (uchar), ``label`` (int) and any other scalar vertex property;
    comments and ``obj_info`` lines; other elements (faces, edges, ...) skipped. Written
    as MeshLab and CloudCompare expect: ``x y z`` float (float32 by default, double on
    request), ``red green blue`` uchar, ``label`` int.

SparseTensor files (:func:`save_tensor`, :func:`load_tensor`)
    An uncompressed ``.npz`` that plain ``numpy.load(path)`` reads (no pickle), members
    ``format`` (the string ``"sparsegrid.SparseTensor"``), ``version`` (int64, 1),
    ``indices`` (int32 (N, 1 + D)), ``features`` ((N, C) float32 or float64),
    ``spatial_shape`` (int64 (D,)) and ``batch_size`` (int64 scalar).

LAS and LAZ (:func:`write_las`, :func:`read_las`; needs ``pip install sparsegrid[las]``)
    Through laspy (imported only when called), LAZ through its ``lazrs`` backend. Read:
    real float64 coordinates, 16-bit colour, classification, intensity, every other
    dimension and the extra bytes, in chunks (with a progress bar on a terminal).
    Write: LAS 1.1-1.4, point formats 0-10 (chosen from what is given by default),
    millimetre scale and an offset at the data's floor by default, int32 overflow
    refused; ``.laz`` names are compressed.

Every file is written atomically (a hidden temporary in the destination folder, flushed
to disk, then :func:`os.replace`), so an interrupted write leaves the previous file (or
none), never a truncated one. Every malformed, truncated or foreign file is refused with
a :class:`FileFormatError` (a ValueError) naming the file and what is wrong.
"""

from __future__ import annotations

import os
import re
import tempfile

import numpy as np

from . import _files, backend
from .autodiff.core import data_of

__all__ = ["FileFormatError", "write_ply", "read_ply", "tensor_to_points", "save_tensor",
           "load_tensor", "TENSOR_FORMAT", "TENSOR_VERSION", "read_las", "write_las",
           "LasCloud"]

TENSOR_FORMAT = "sparsegrid.SparseTensor"
TENSOR_VERSION = 1


class FileFormatError(ValueError):
    """A file that is malformed, truncated, of another kind or of a newer version."""


# -- atomic writes -------------------------------------------------------------------------
def _atomic_write(path, write):
    """Call ``write(binary_file)`` on a temporary next to ``path``, flush and fsync it,
    then rename it over ``path`` (the old file's permissions are kept)."""
    path = os.fspath(path)
    folder = _files.destination_folder(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.sparsegrid-",
                               suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _files.replace_keeping_mode(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _files.fsync_folder(folder)


def _host(value, name):
    """A NumPy array from a NumPy/CuPy array, an autodiff Tensor or array-like."""
    value = data_of(value)
    if backend.is_cupy_array(value):
        return backend.to_numpy(value)
    try:
        return np.asarray(value)
    except Exception as exc:
        raise TypeError(f"{name} must be an array; got {type(value).__name__}") from exc


# -- PLY -----------------------------------------------------------------------------------
# PLY type name -> NumPy dtype (native-endian; byte order added per file)
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
# NumPy dtype -> the PLY name written (the classic names every reader knows)
_WRITE_NAMES = {"i1": "char", "u1": "uchar", "i2": "short", "u2": "ushort", "i4": "int",
                "u4": "uint", "f4": "float", "f8": "double"}
_FORMATS = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}
_RESERVED = ("x", "y", "z", "red", "green", "blue", "label")
_NAME = re.compile(r"^[^\s]+$")
_MAX_HEADER = 1 << 20


def _ascii_format(code):
    return {"f4": "%.9g", "f8": "%.17g"}.get(code, "%d")


def _check_property_name(name):
    if not isinstance(name, str) or not _NAME.match(name) or not name.isascii():
        raise ValueError(f"PLY property names must be non-empty ASCII without whitespace; "
                         f"got {name!r}")


def _integer_column(values, name, n):
    """An integer column narrowed to a PLY type (int64 must fit int32 / uint32)."""
    if values.dtype == bool:
        return values.astype(np.uint8)
    code = values.dtype.str[1:]
    if code in _WRITE_NAMES:
        return values
    target = np.int32 if np.issubdtype(values.dtype, np.signedinteger) else np.uint32
    info = np.iinfo(target)
    if not n or (info.min <= int(values.min()) and int(values.max()) <= info.max):
        return values.astype(target)
    raise ValueError(f"{name} holds values outside PLY's 32-bit integer types")


def write_ply(path, points, colors=None, labels=None, properties=None, binary=True,
              dtype=np.float32, comments=()):
    """Write a point cloud as a PLY file (atomically; no dependency).

    Parameters
    ----------
    path : str or os.PathLike
        Destination, used exactly as given.
    points : (N, 3) float array (NumPy, CuPy or an autodiff Tensor)
        Written as ``x y z`` of type ``float`` (``dtype=np.float32``) or ``double``
        (``dtype=np.float64``).
    colors : (N, 3) integer array in [0, 255], optional
        ``red green blue`` as ``uchar``. Floats are refused (scale and cast them first).
    labels : (N,) integer array, optional
        ``label`` as ``int`` (values must fit int32).
    properties : mapping of name to (N,) array, optional
        More scalar vertex properties, in the given order, each typed after its array:
        int8..uint32 and float32/float64 as themselves, bool as uchar, int64/uint64 as
        int/uint when the values fit (else ValueError). Names are ASCII without
        whitespace and none of x, y, z, red, green, blue, label.
    binary : bool
        ``binary_little_endian`` (default) or ``ascii`` (floats written with enough
        digits to read back exactly).
    dtype : np.float32 or np.float64
    comments : sequence of str
        ``comment`` lines of the header (one line each).

    Raises
    ------
    TypeError, ValueError
        For wrong kinds, shapes, value ranges or names (naming the argument).
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64; got {dtype}")
    points = _host(points, "points")
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3); got {points.shape}")
    if not (np.issubdtype(points.dtype, np.floating) or np.issubdtype(points.dtype, np.integer)):
        raise TypeError(f"points must be a float array; got dtype {points.dtype}")
    n = len(points)
    columns = [(axis, points[:, i].astype(dtype)) for i, axis in enumerate("xyz")]
    if colors is not None:
        colors = _host(colors, "colors")
        if colors.ndim != 2 or colors.shape != (n, 3):
            raise ValueError(f"colors must have shape ({n}, 3); got {colors.shape}")
        if colors.dtype == bool or not np.issubdtype(colors.dtype, np.integer):
            raise TypeError(f"colors must be an integer array in [0, 255] (uint8); got dtype "
                            f"{colors.dtype} (scale floats and cast them first)")
        if n and (int(colors.min()) < 0 or int(colors.max()) > 255):
            raise ValueError("colors must lie in [0, 255]")
        columns += [(c, colors[:, i].astype(np.uint8)) for i, c in
                    enumerate(("red", "green", "blue"))]
    if labels is not None:
        labels = _host(labels, "labels")
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},); got {labels.shape}")
        if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"labels must be an integer array; got dtype {labels.dtype}")
        if n and (int(labels.min()) < np.iinfo(np.int32).min
                  or int(labels.max()) > np.iinfo(np.int32).max):
            raise ValueError("labels must fit int32 (PLY's 'int')")
        columns.append(("label", labels.astype(np.int32)))
    for name, values in dict(properties or {}).items():
        _check_property_name(name)
        if name in _RESERVED:
            raise ValueError(f"property {name!r} is reserved (use points / colors / labels)")
        if name in (c[0] for c in columns):
            raise ValueError(f"property {name!r} given twice")
        values = _host(values, f"properties[{name!r}]")
        if values.shape != (n,):
            raise ValueError(f"properties[{name!r}] must have shape ({n},); got "
                             f"{values.shape}")
        if np.issubdtype(values.dtype, np.floating):
            values = values.astype(np.float64 if values.dtype == np.float64 else np.float32)
        elif np.issubdtype(values.dtype, np.integer) or values.dtype == bool:
            values = _integer_column(values, f"properties[{name!r}]", n)
        else:
            raise TypeError(f"properties[{name!r}] must be an integer, bool or float array; "
                            f"got dtype {values.dtype}")
        columns.append((name, values))
    lines = ["ply", "format " + ("binary_little_endian" if binary else "ascii") + " 1.0"]
    for comment in comments:
        comment = str(comment)
        if "\n" in comment or "\r" in comment or not comment.isascii():
            raise ValueError(f"comments must be single ASCII lines; got {comment!r}")
        lines.append(("comment " + comment).rstrip())
    lines.append(f"element vertex {n}")
    lines += [f"property {_WRITE_NAMES[v.dtype.str[1:]]} {name}" for name, v in columns]
    lines.append("end_header")
    header = ("\n".join(lines) + "\n").encode("ascii")

    def write(f):
        f.write(header)
        if binary:
            record = np.empty(n, dtype=[(name, "<" + v.dtype.str[1:]) for name, v in columns])
            for name, v in columns:
                record[name] = v
            f.write(record.tobytes())
        else:
            fmt = " ".join(_ascii_format(v.dtype.str[1:]) for _, v in columns) + "\n"
            lists = [v.tolist() for _, v in columns]
            chunk = []
            for row in zip(*lists):
                chunk.append(fmt % row)
                if len(chunk) == 65536:
                    f.write("".join(chunk).encode("ascii"))
                    chunk = []
            f.write("".join(chunk).encode("ascii"))

    _atomic_write(path, write)


class _Element:
    def __init__(self, name, count):
        self.name, self.count, self.properties = name, count, []  # (name, type, count type)

    @property
    def has_lists(self):
        return any(p[2] is not None for p in self.properties)


def _parse_header(data, where):
    """``(format, elements, comments, obj_info, data offset)`` of a PLY file's bytes."""
    if not data.startswith(b"ply"):
        raise FileFormatError(f"{where!r} is not a PLY file: it does not start with 'ply' "
                              f"(found {data[:16]!r})")
    end = re.search(rb"(?m)^end_header[ \t]*\r?\n", data[:_MAX_HEADER])
    if end is None:
        if len(data) < _MAX_HEADER and b"end_header" not in data:
            raise FileFormatError(f"{where!r}: PLY header has no 'end_header' line "
                                  "(truncated or not a PLY file)")
        raise FileFormatError(f"{where!r}: PLY header has no 'end_header' line in its first "
                              f"{_MAX_HEADER} bytes")
    try:
        text = data[:end.start()].decode("ascii")
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"{where!r}: PLY header is not ASCII ({exc})") from exc
    lines = text.splitlines()
    if lines[0].strip() != "ply":
        raise FileFormatError(f"{where!r}: the first PLY header line must be 'ply'; got "
                              f"{lines[0]!r}")
    fmt, elements, comments, obj_info = None, [], [], []
    for number, line in enumerate(lines[1:], start=2):
        words = line.split()

        def bad(why):
            return FileFormatError(f"{where!r}: PLY header line {number} ({line!r}): {why}")

        if not words:
            continue
        key = words[0]
        if key == "comment":
            comments.append(line.split(None, 1)[1] if len(words) > 1 else "")
        elif key == "obj_info":
            obj_info.append(line.split(None, 1)[1] if len(words) > 1 else "")
        elif key == "format":
            if fmt is not None:
                raise bad("a second 'format' line")
            if len(words) != 3 or words[1] not in _FORMATS:
                raise bad("expected 'format ascii|binary_little_endian|binary_big_endian 1.0'")
            if words[2] not in ("1.0", "1"):
                raise bad(f"unsupported PLY version {words[2]}")
            fmt = words[1]
        elif key == "element":
            if len(words) != 3 or not words[2].isdigit():
                raise bad("expected 'element <name> <count>' with a count >= 0")
            if any(e.name == words[1] for e in elements):
                raise bad(f"element {words[1]!r} declared twice")
            elements.append(_Element(words[1], int(words[2])))
        elif key == "property":
            if not elements:
                raise bad("a property before any element")
            if len(words) == 5 and words[1] == "list":
                count_type, item_type, name = words[2], words[3], words[4]
                if count_type not in _PLY_TYPES or item_type not in _PLY_TYPES:
                    raise bad("unknown list type")
                if _PLY_TYPES[count_type][0] == "f":
                    raise bad("a list's count type must be an integer type")
                prop = (name, _PLY_TYPES[item_type], _PLY_TYPES[count_type])
            elif len(words) == 3 and words[1] != "list":
                if words[1] not in _PLY_TYPES:
                    raise bad(f"unknown property type {words[1]!r}")
                prop = (words[2], _PLY_TYPES[words[1]], None)
            else:
                raise bad("expected 'property <type> <name>' or "
                          "'property list <count type> <item type> <name>'")
            if any(p[0] == prop[0] for p in elements[-1].properties):
                raise bad(f"property {prop[0]!r} declared twice")
            elements[-1].properties.append(prop)
        else:
            raise bad(f"unknown keyword {key!r}")
    if fmt is None:
        raise FileFormatError(f"{where!r}: PLY header has no 'format' line")
    return fmt, elements, comments, obj_info, end.end()


def _binary_skip_lists(data, offset, element, order, where):
    """The offset after a binary element with list properties (walked row by row)."""
    for row in range(element.count):
        for name, code, count_code in element.properties:
            if count_code is None:
                offset += int(code[1])
                continue
            size = int(count_code[1])
            if offset + size > len(data):
                raise FileFormatError(f"{where!r}: PLY data truncated in element "
                                      f"{element.name!r} row {row}")
            count = int(np.frombuffer(data, order + count_code, 1, offset)[0])
            if count < 0:
                raise FileFormatError(f"{where!r}: element {element.name!r} row {row}: "
                                      f"list {name!r} has a negative length {count}")
            offset += size + count * int(code[1])
        if offset > len(data):
            raise FileFormatError(f"{where!r}: PLY data truncated in element "
                                  f"{element.name!r} row {row}")
    return offset


def _read_binary(data, offset, elements, order, where):
    for element in elements:
        if element.name == "vertex":
            if element.has_lists:
                raise FileFormatError(f"{where!r}: list properties in the vertex element are "
                                      "not supported")
            dtype = np.dtype([(p[0], order + p[1]) for p in element.properties])
            need = dtype.itemsize * element.count
            if len(data) - offset < need:
                raise FileFormatError(
                    f"{where!r}: PLY data truncated: the {element.count} vertices need "
                    f"{need} bytes at offset {offset}; the file has {len(data) - offset}")
            record = np.frombuffer(data, dtype, element.count, offset)
            return {p[0]: record[p[0]].astype(p[1]) for p in element.properties}
        if element.has_lists:
            offset = _binary_skip_lists(data, offset, element, order, where)
        else:
            offset += sum(int(p[1][1]) for p in element.properties) * element.count
            if offset > len(data):
                raise FileFormatError(f"{where!r}: PLY data truncated in element "
                                      f"{element.name!r}")
    raise FileFormatError(f"{where!r}: PLY file has no 'vertex' element")


def _read_ascii(data, offset, elements, where):
    try:
        text = data[offset:].decode("ascii")
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"{where!r}: ASCII PLY body holds non-ASCII bytes ({exc})") from exc
    lines = [line for line in text.splitlines() if line.strip()]
    cursor = 0
    vertex = None
    for element in elements:
        rows = lines[cursor:cursor + element.count]
        if len(rows) < element.count:
            raise FileFormatError(f"{where!r}: PLY data truncated: element {element.name!r} "
                                  f"declares {element.count} rows, the file holds "
                                  f"{len(rows)}")
        first_line = cursor
        cursor += element.count
        if element.has_lists:
            for i, row in enumerate(rows):
                words, at = row.split(), 0
                for name, code, count_code in element.properties:
                    if count_code is not None:
                        try:
                            at += 1 + int(words[at])
                        except (ValueError, IndexError):
                            raise FileFormatError(
                                f"{where!r}: element {element.name!r} row {i}: bad length "
                                f"of list {name!r} in {row!r}") from None
                    else:
                        at += 1
                if at != len(words):
                    raise FileFormatError(f"{where!r}: element {element.name!r} row {i}: "
                                          f"expected {at} values, found {len(words)} "
                                          f"({row!r})")
            if element.name == "vertex":
                raise FileFormatError(f"{where!r}: list properties in the vertex element are "
                                      "not supported")
            continue
        if element.name != "vertex":
            continue
        width = len(element.properties)
        table = [row.split() for row in rows]
        for i, words in enumerate(table):
            if len(words) != width:
                raise FileFormatError(f"{where!r}: vertex row {i} (data line "
                                      f"{first_line + i + 1}) has {len(words)} values, "
                                      f"expected {width}: {rows[i]!r}")
        table = np.array(table, dtype=str).reshape(element.count, width)
        vertex = {}
        for j, (name, code, _) in enumerate(element.properties):
            column = table[:, j]
            try:
                if code[0] == "f":
                    vertex[name] = column.astype(np.float64).astype(code)
                else:
                    values = column.astype(np.int64)
                    info = np.iinfo(code)
                    if len(values) and (values.min() < info.min or values.max() > info.max):
                        raise ValueError(f"values outside [{info.min}, {info.max}]")
                    vertex[name] = values.astype(code)
            except (ValueError, OverflowError) as exc:
                raise FileFormatError(f"{where!r}: vertex property {name!r} "
                                      f"({np.dtype(code).name}): {exc}") from None
    if vertex is None:
        raise FileFormatError(f"{where!r}: PLY file has no 'vertex' element")
    return vertex


def read_ply(path):
    """Read a PLY point cloud (ASCII, binary little- or big-endian).

    Returns
    -------
    dict
        ``'points'``: (N, 3) float array from ``x y z`` (their type: float32 for
        ``float``, float64 for ``double``; float64 when they differ or are integers);
        ``'colors'``: (N, 3) uint8 when ``red green blue`` are all ``uchar`` (else they
        stay in ``'properties'``); ``'labels'``: (N,) ``label`` in its integer type;
        ``'properties'``: every other scalar vertex property, name -> (N,) array in
        the file's type (native byte order), in the file's order; ``'comments'``,
        ``'obj_info'``: lists of str; ``'format'``: ``'ascii'``,
        ``'binary_little_endian'`` or ``'binary_big_endian'``; ``'elements'``: name ->
        row count, every element of the header.

    Other elements are skipped: in ASCII every row is parsed (list properties included)
    and checked; in binary the elements before the vertices are walked (list rows one
    by one) and those after them are not read at all, so damage there goes unnoticed.
    List properties of the vertex element itself are refused.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    FileFormatError
        (a ValueError) for a file that is not PLY, a malformed header, truncated data,
        rows of the wrong length, values outside their type, or no vertex ``x y z``.
    """
    where = os.fspath(path)
    with open(where, "rb") as f:
        data = f.read()
    fmt, elements, comments, obj_info, offset = _parse_header(data, where)
    if fmt == "ascii":
        vertex = _read_ascii(data, offset, elements, where)
    else:
        vertex = _read_binary(data, offset, elements, _FORMATS[fmt], where)
    missing = [a for a in "xyz" if a not in vertex]
    if missing:
        raise FileFormatError(f"{where!r}: the vertex element has no {' '.join(missing)} "
                              "property")
    axes = [vertex.pop(a) for a in "xyz"]
    kinds = {a.dtype for a in axes}
    point_dtype = kinds.pop() if len(kinds) == 1 and axes[0].dtype.kind == "f" else np.float64
    points = np.empty((len(axes[0]), 3), point_dtype)
    for i, a in enumerate(axes):
        points[:, i] = a
    result = {"points": points}
    if all(c in vertex and vertex[c].dtype == np.uint8 for c in ("red", "green", "blue")):
        result["colors"] = np.stack([vertex.pop(c) for c in ("red", "green", "blue")], axis=1)
    if "label" in vertex and vertex["label"].dtype.kind in "iu":
        result["labels"] = vertex.pop("label")
    result["properties"] = vertex
    result["comments"] = comments
    result["obj_info"] = obj_info
    result["format"] = fmt
    result["elements"] = {e.name: e.count for e in elements}
    return result


def tensor_to_points(x, voxel_size=1, origin=0):
    """Voxel centres of a SparseTensor as float64 points ``origin + (i + 0.5) * size``.

    ``voxel_size`` and ``origin``: one number or D numbers (as :func:`voxelize`
    returns them). Returns an (N, D) float64 array in the tensor's array library, row
    aligned with ``x.indices`` (all samples; select one with ``x.indices[:, 0] == b``).
    """
    d = x.dimension
    size = np.broadcast_to(np.asarray(voxel_size, np.float64), (d,))
    start = np.broadcast_to(np.asarray(origin, np.float64), (d,))
    if not np.all(np.isfinite(size)) or np.any(size <= 0):
        raise ValueError(f"voxel_size must be finite and > 0; got {voxel_size!r}")
    if not np.all(np.isfinite(start)):
        raise ValueError(f"origin must be finite; got {origin!r}")
    indices = x.indices
    xp = backend.array_namespace(indices)
    coords = indices[:, 1:].astype(np.float64)
    return xp.asarray(start) + (coords + 0.5) * xp.asarray(size)


# -- SparseTensor files --------------------------------------------------------------------
def save_tensor(path, x):
    """Write a SparseTensor to an ``.npz`` file (atomically; see the module notes).

    ``path`` is used exactly as given (no ``.npz`` is appended). CuPy arrays are saved
    as NumPy arrays; autodiff Tensor features are saved as their values (no graph).
    """
    from .tensor import SparseTensor
    if not isinstance(x, SparseTensor):
        raise TypeError(f"x must be a SparseTensor; got {type(x).__name__}")
    arrays = {
        "format": np.array(TENSOR_FORMAT),
        "version": np.array(TENSOR_VERSION, np.int64),
        "indices": np.ascontiguousarray(backend.to_numpy(x.indices), np.int32),
        "features": np.ascontiguousarray(backend.to_numpy(data_of(x.features))),
        "spatial_shape": np.asarray(x.spatial_shape, np.int64),
        "batch_size": np.array(x.batch_size, np.int64),
    }
    _atomic_write(path, lambda f: np.savez(f, **arrays))


_TENSOR_KEYS = ("format", "version", "indices", "features", "spatial_shape", "batch_size")


def load_tensor(path, device=None):
    """Read a SparseTensor written by :func:`save_tensor` (NumPy arrays, or on
    ``device`` when given: ``'cpu'``, ``'cuda'``, ``'cuda:N'``).

    The indices are validated as the constructor does (ranges, duplicates).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    FileFormatError
        (a ValueError) for a file that is not an ``.npz``, a truncated or damaged one,
        another program's ``.npz``, a newer format version, members of the wrong shape
        or dtype, or indices the constructor refuses.
    """
    from .tensor import SparseTensor
    where = os.fspath(path)
    with open(where, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK":
        raise FileFormatError(f"{where!r} is not a sparsegrid tensor file: not an .npz "
                              f"(zip) archive (starts with {head!r})")
    try:
        with np.load(where, allow_pickle=False) as npz:
            names = list(npz.files)
            if "format" not in names:
                raise FileFormatError(f"{where!r} is not a sparsegrid tensor file: an .npz "
                                      f"without a 'format' member (members: {names})")
            arrays = {name: npz[name] for name in _TENSOR_KEYS if name in names}
    except FileFormatError:
        raise
    except Exception as exc:
        raise FileFormatError(f"{where!r} could not be read as an .npz file (truncated or "
                              f"damaged?): {type(exc).__name__}: {exc}") from exc
    marker = arrays["format"]
    if marker.shape != () or marker.dtype.kind != "U" or str(marker) != TENSOR_FORMAT:
        raise FileFormatError(f"{where!r} is not a sparsegrid tensor file: its 'format' "
                              f"member is {marker!r}")
    missing = [k for k in _TENSOR_KEYS if k not in arrays]
    if missing:
        raise FileFormatError(f"{where!r}: sparsegrid tensor file lacks {missing}")

    def bad(why):
        return FileFormatError(f"{where!r}: invalid sparsegrid tensor file: {why}")

    version, indices, features = arrays["version"], arrays["indices"], arrays["features"]
    shape, batch = arrays["spatial_shape"], arrays["batch_size"]
    if version.shape != () or version.dtype.kind not in "iu":
        raise bad(f"'version' must be an integer scalar; got {version.dtype} {version.shape}")
    if int(version) > TENSOR_VERSION or int(version) < 1:
        raise bad(f"format version {int(version)} (this sparsegrid reads 1 to "
                  f"{TENSOR_VERSION})")
    if shape.ndim != 1 or shape.dtype.kind not in "iu" or not 1 <= len(shape) <= 10:
        raise bad(f"'spatial_shape' must be 1..10 integers; got {shape.dtype} {shape.shape}")
    if batch.shape != () or batch.dtype.kind not in "iu":
        raise bad(f"'batch_size' must be an integer scalar; got {batch.dtype} {batch.shape}")
    d = len(shape)
    if indices.dtype.kind not in "iu" or indices.ndim != 2 or indices.shape[1] != d + 1:
        raise bad(f"'indices' must be integer (N, {d + 1}); got {indices.dtype} "
                  f"{indices.shape}")
    if features.dtype not in (np.float32, np.float64) or features.ndim != 2 \
            or features.shape[0] != indices.shape[0]:
        raise bad(f"'features' must be float32/float64 ({indices.shape[0]}, C); got "
                  f"{features.dtype} {features.shape}")
    try:
        x = SparseTensor(np.ascontiguousarray(features), indices,
                         tuple(int(s) for s in shape), int(batch))
    except (TypeError, ValueError) as exc:
        raise bad(str(exc)) from exc
    return x if device is None else x.to(device)


# -- LAS / LAZ (through laspy) -------------------------------------------------------------
# The point formats each LAS version allows (the LAS specifications 1.1 to 1.4).
_LAS_VERSIONS = {"1.1": (0, 1), "1.2": (0, 1, 2, 3), "1.3": (0, 1, 2, 3, 4, 5),
                 "1.4": tuple(range(11))}
# Dimensions that write_las takes from its own arguments, not from ``properties``.
_LAS_RESERVED = ("x", "y", "z", "X", "Y", "Z", "red", "green", "blue", "classification")
_LAS_EXTRA_TYPES = ("u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8")
_INT32 = np.iinfo(np.int32)


def _import_laspy(caller):
    try:
        import laspy
    except ImportError as exc:
        raise ImportError(f"{caller} needs laspy, which is not installed: pip install "
                          f"sparsegrid[las]  (laspy with the lazrs LAZ backend)") from exc
    return laspy


def _require_laz_backend(laspy, what, where):
    if not laspy.LazBackend.detect_available():
        raise ImportError(f"{what} {where!r} needs a LAZ backend for laspy and none is "
                          "installed: pip install sparsegrid[las]  (or pip install lazrs)")


class LasCloud:
    """What :func:`read_las` returns: a LAS/LAZ file's points and attributes.

    Attributes (also readable as ``cloud["points"]`` etc., like :func:`read_ply`'s dict)
    ----------
    points : float64 (N, 3)
        Real coordinates ``X * scale + offset`` (the file's integers, scaled and offset).
    colors : uint16 (N, 3) or None
        ``red green blue`` as stored (16-bit; files written from 8-bit colour may hold
        ``c * 257`` or, as some producers do, the 8-bit value itself); None when the
        point format has no colour (formats 0, 1, 4, 6, 9).
    labels : uint8 (N,)
        The classification (0..31 in formats 0-5, 0..255 in formats 6-10).
    intensity : uint16 (N,)
    properties : dict of name -> array
        Every other dimension of the point format, in the file's order (``return_number``,
        ``gps_time``, ``scan_angle_rank`` or ``scan_angle``, ... as laspy names them; bit
        fields as uint8), then the extra-bytes dimensions (scaled to float64 when the file
        gives them a scale or offset; (N, k) for array-typed ones).
    header : dict
        ``version`` (str, ``"1.2"``), ``point_format`` (int), ``point_count``,
        ``compressed`` (bool: LAZ), ``scales``, ``offsets``, ``mins``, ``maxs`` (float64
        (3,) each), ``wkt`` (the WKT coordinate system string, or None when the file has
        no WKT record; GeoTIFF keys are not decoded), ``extra_dimensions`` (list of
        names), ``generating_software``, ``system_identifier`` (str).
    """

    __slots__ = ("points", "colors", "labels", "intensity", "properties", "header")
    _fields = __slots__

    def __init__(self, points, colors, labels, intensity, properties, header):
        self.points, self.colors, self.labels = points, colors, labels
        self.intensity, self.properties, self.header = intensity, properties, header

    def __getitem__(self, key):
        if key not in self._fields:
            raise KeyError(key)
        return getattr(self, key)

    def keys(self):
        return list(self._fields)

    def get(self, key, default=None):
        return getattr(self, key) if key in self._fields else default

    def __len__(self):
        return len(self.points)

    def __repr__(self):
        return (f"LasCloud({len(self.points)} points, LAS {self.header['version']} format "
                f"{self.header['point_format']}, colors={self.colors is not None}, "
                f"properties={list(self.properties)})")


def _las_wkt(laspy, header):
    for record in list(header.vlrs or []) + list(getattr(header, "evlrs", None) or []):
        if isinstance(record, laspy.vlrs.known.WktCoordinateSystemVlr):
            text = record.string
            if isinstance(text, bytes):
                text = text.decode("utf-8", "replace")
            return text.rstrip("\0") or None
    return None


def read_las(path, progress=None, chunk_size=1_000_000):
    """Read a LAS or LAZ point cloud through laspy (``pip install sparsegrid[las]``).

    Parameters
    ----------
    path : str or os.PathLike
        A LAS file, or a LAZ file (compressed: recognised by its header, not its name;
        decompressing needs laspy's ``lazrs`` or ``laszip`` backend).
    progress : bool or None
        A progress bar over the points (:func:`sparsegrid.progress.progress`): None (the
        default) shows one when stderr is a terminal and tqdm is installed, True whenever
        tqdm is installed, False never.
    chunk_size : int
        Points decoded per chunk (laspy's chunk iterator): memory beyond the result is
        about one chunk.

    Returns
    -------
    LasCloud
        ``points`` float64 (N, 3) real coordinates, ``colors`` uint16 (N, 3) or None,
        ``labels`` uint8 (N,) classification, ``intensity`` uint16 (N,), ``properties``
        (every other dimension, extra bytes included) and ``header`` (a dict: version,
        point format, scales, offsets, bounds, WKT, ...). See :class:`LasCloud`.

    Raises
    ------
    ImportError
        When laspy is not installed, or a LAZ file is given and no LAZ backend is.
    FileNotFoundError
        If ``path`` does not exist.
    FileFormatError
        (a ValueError) for a file that is not LAS/LAZ, a damaged header, or point data
        that is truncated or cannot be decoded; the message names the file.
    """
    from .progress import progress as progress_bar
    laspy = _import_laspy("read_las")
    where = os.fspath(path)
    if progress is not None and not isinstance(progress, (bool, np.bool_)):
        raise TypeError(f"progress must be None, True or False; got {progress!r}")
    if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, (int, np.integer)) \
            or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    with open(where, "rb") as f:
        head = f.read(4)
        if head != b"LASF":
            raise FileFormatError(f"{where!r} is not a LAS/LAZ file: it does not start with "
                                  f"'LASF' (found {head!r})")
        f.seek(0)
        try:
            reader = laspy.open(f, closefd=False)
        except Exception as exc:
            raise FileFormatError(f"{where!r}: unreadable LAS header: "
                                  f"{type(exc).__name__}: {exc}") from exc
        with reader:
            header = reader.header
            if header.are_points_compressed:
                _require_laz_backend(laspy, "reading the LAZ file", where)
            n = int(header.point_count)
            pf = header.point_format
            scales = np.array(header.scales, np.float64)
            offsets = np.array(header.offsets, np.float64)
            if not (np.all(np.isfinite(scales)) and np.all(scales != 0)
                    and np.all(np.isfinite(offsets))):
                # a damaged header would silently turn every coordinate into the offset
                # (scale 0) or NaN
                raise FileFormatError(f"{where!r}: damaged LAS header: scales "
                                      f"{scales.tolist()} must be finite and non-zero and "
                                      f"offsets {offsets.tolist()} finite")
            size = os.fstat(f.fileno()).st_size
            need = int(header.offset_to_point_data) + n * int(pf.size)
            if not header.are_points_compressed and need > size:
                # checked before allocating: a damaged count must not ask for terabytes
                raise FileFormatError(f"{where!r}: LAS point data truncated: the header "
                                      f"declares {n} points of {pf.size} bytes from offset "
                                      f"{header.offset_to_point_data} ({need} bytes); the "
                                      f"file has {size}")
            names = list(pf.dimension_names)
            extra = list(pf.extra_dimension_names)
            # dtypes and shapes of every dimension as laspy returns them (scaled extra
            # bytes come back as float64)
            empty = laspy.ScaleAwarePointRecord.zeros(0, header=header)
            has_rgb = all(c in names for c in ("red", "green", "blue"))
            skip = {"X", "Y", "Z", "classification", "intensity"}
            if has_rgb:
                skip |= {"red", "green", "blue"}
            points = np.empty((n, 3), np.float64)
            colors = np.empty((n, 3), np.uint16) if has_rgb else None
            columns = {name: np.empty((n,) + np.asarray(empty[name]).shape[1:],
                                      np.asarray(empty[name]).dtype)
                       for name in names if name not in skip}
            labels = np.empty(n, np.asarray(empty["classification"]).dtype)
            intensity = np.empty(n, np.asarray(empty["intensity"]).dtype)
            done = 0
            bar = progress_bar(total=n, desc=f"reading {os.path.basename(where)}",
                               unit="pt", enable=progress, unit_scale=True)
            try:
                for chunk in reader.chunk_iterator(int(chunk_size)):
                    m = len(chunk)
                    if done + m > n:
                        raise FileFormatError(f"{where!r}: holds more points than the "
                                              f"{n} its header declares")
                    rows = slice(done, done + m)
                    for i, axis in enumerate("xyz"):
                        points[rows, i] = chunk[axis]
                    if has_rgb:
                        for i, c in enumerate(("red", "green", "blue")):
                            colors[rows, i] = chunk[c]
                    labels[rows] = chunk["classification"]
                    intensity[rows] = chunk["intensity"]
                    for name, column in columns.items():
                        column[rows] = np.asarray(chunk[name])
                    done += m
                    bar.update(m)
            except (FileFormatError, MemoryError, KeyboardInterrupt):
                raise
            except Exception as exc:
                raise FileFormatError(f"{where!r}: LAS point data could not be decoded "
                                      f"after {done} of {n} points (truncated or damaged?): "
                                      f"{type(exc).__name__}: {exc}") from exc
            finally:
                bar.close()
            if done != n:
                raise FileFormatError(f"{where!r}: LAS point data truncated: the header "
                                      f"declares {n} points, the file holds {done}")
            info = {
                "version": str(header.version),
                "point_format": int(pf.id),
                "point_count": n,
                "compressed": bool(header.are_points_compressed),
                "scales": np.array(header.scales, np.float64),
                "offsets": np.array(header.offsets, np.float64),
                "mins": np.array(header.mins, np.float64),
                "maxs": np.array(header.maxs, np.float64),
                "wkt": _las_wkt(laspy, header),
                "extra_dimensions": extra,
                "generating_software": str(header.generating_software).rstrip("\0"),
                "system_identifier": str(header.system_identifier).rstrip("\0"),
            }
    return LasCloud(points, colors, labels, intensity, columns, info)


def _las_vector(name, value, positive=False):
    """One number or 3 numbers -> float64 (3,), finite (and > 0 with ``positive``)."""
    value = _host(value, name)
    if value.dtype == bool or value.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be a number or 3 numbers; got dtype {value.dtype}")
    if value.ndim > 1 or value.size not in (1, 3):
        raise ValueError(f"{name} must be a number or 3 numbers (x, y, z); got shape "
                         f"{value.shape}")
    value = np.broadcast_to(value.astype(np.float64).reshape(-1), (3,)).copy()
    if not np.all(np.isfinite(value)) or (positive and np.any(value <= 0)):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}; got "
                         f"{value.tolist()}")
    return value


def _las_point_format(version, colors, names, point_format):
    """The point format: the one given (checked against the version and colours), else
    the smallest of the version that holds the colours and gps_time / nir when given."""
    allowed = _LAS_VERSIONS[version]
    if point_format is not None:
        if isinstance(point_format, (bool, np.bool_)) or \
                not isinstance(point_format, (int, np.integer)):
            raise TypeError(f"point_format must be None or an int; got {point_format!r}")
        point_format = int(point_format)
        if point_format not in allowed:
            raise ValueError(f"point_format {point_format} is not allowed in LAS {version} "
                             f"(it allows {list(allowed)})")
        if colors and point_format not in (2, 3, 5, 7, 8, 10):
            raise ValueError(f"colors were given but point format {point_format} has no "
                             "colour (use 2, 3, 5, 7, 8 or 10, or point_format=None)")
        return point_format
    if "nir" in names and not colors:
        raise ValueError("properties['nir'] needs colors too (point format 8 stores RGB and "
                         "NIR together)")
    if version == "1.4":
        return 8 if "nir" in names else 7 if colors else 6
    gps = "gps_time" in names
    return (3 if gps else 2) if colors else (1 if gps else 0)


def _las_dimension_range(info):
    """``(low, high)`` of an integer standard dimension (bit fields by their bits)."""
    if info.kind.name == "BitField":
        return 0, 2 ** info.num_bits - 1
    bits = info.num_bits
    if info.kind.name == "SignedInteger":
        return -2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def write_las(path, points, colors=None, labels=None, properties=None, scale=0.001,
              offset=None, point_format=None, version="1.4", intensity=None):
    """Write a point cloud as LAS, or LAZ when ``path`` ends in ``.laz`` (atomically).

    Parameters
    ----------
    path : str or os.PathLike
        Destination, used exactly as given. A name ending in ``.laz`` (any case) is
        compressed (needs laspy's ``lazrs`` or ``laszip`` backend).
    points : (N, 3) float (or integer) array (NumPy, CuPy or an autodiff Tensor)
        Real coordinates, finite. Stored as int32 ``round((p - offset) / scale)`` per
        axis, so reading back gives them within ``scale / 2``.
    colors : (N, 3) integer array, optional
        LAS colour is 16-bit: a **uint8** array is scaled to 16 bits (``c * 257``, so 255
        becomes 65535, the convention of PDAL and LAStools); any other integer dtype is
        stored as it is and must lie in [0, 65535]. Floats are refused.
    labels : (N,) integer array, optional
        The classification: 0..31 in point formats 0-5, 0..255 in formats 6-10.
        Default: zeros.
    properties : mapping of name -> array, optional
        A name of a standard dimension of the point format (``intensity``, ``gps_time``,
        ``return_number``, ``user_data``, ``point_source_id``, ``scan_angle_rank`` /
        ``scan_angle``, ``nir``, ...) sets that dimension (integers that must fit it:
        bit fields by their bit count; ``gps_time`` finite floats). Any other name
        becomes an extra-bytes dimension typed after its array: (N,) or (N, 2) / (N, 3)
        of uint8..int64, float32, float64 (bool as uint8); names are ASCII, at most 32
        characters. A standard dimension of another point format only (``gps_time`` for
        an explicit format 0, say) is a ValueError.
    scale : float or 3 floats
        Metres (file units) per integer step, per axis; > 0. Default 0.001 (millimetres).
    offset : 3 floats, optional
        Subtracted before scaling. Default: the floor of each axis's minimum (0 for no
        points), so UTM-sized coordinates keep millimetres.
    point_format : int, optional
        Default: chosen from what is given. LAS 1.4: 6, 7 with colours, 8 with colours
        and ``nir``. Earlier versions: 0, 1 with ``gps_time``, 2 with colours, 3 with
        both.
    version : str
        ``"1.1"``, ``"1.2"``, ``"1.3"`` or ``"1.4"`` (default).
    intensity : (N,) integer array in [0, 65535], optional
        The intensity dimension (the same as ``properties={"intensity": ...}``; giving
        both is an error). A :class:`LasCloud` read by :func:`read_las` is written back
        whole by ``write_las(path, c.points, c.colors, c.labels, c.properties,
        intensity=c.intensity, point_format=c.header["point_format"],
        version=c.header["version"], scale=c.header["scales"],
        offset=c.header["offsets"])``.

    Raises
    ------
    ImportError
        When laspy is not installed, or for ``.laz`` when no LAZ backend is.
    TypeError, ValueError
        For wrong kinds, shapes or values (naming the argument): non-finite points,
        colours outside [0, 65535], labels outside the point format's range, coordinates
        that do not fit int32 at the given scale and offset (never wrapped), a format the
        version does not allow, or a property that does not fit its dimension.
    """
    laspy = _import_laspy("write_las")
    where = os.fspath(path)
    compress = where.lower().endswith(".laz")
    if compress:
        _require_laz_backend(laspy, "writing the LAZ file", where)
    if not isinstance(version, str):
        raise TypeError(f"version must be a str such as '1.4'; got {version!r}")
    if version not in _LAS_VERSIONS:
        raise ValueError(f"version must be one of {list(_LAS_VERSIONS)}; got {version!r}")

    points = _host(points, "points")
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3); got {points.shape}")
    if points.dtype == bool or points.dtype.kind not in "iuf":
        raise TypeError(f"points must be a float array; got dtype {points.dtype}")
    points = points.astype(np.float64)
    n = len(points)
    if not np.all(np.isfinite(points)):
        row = int(np.flatnonzero(~np.isfinite(points).all(axis=1))[0])
        raise ValueError(f"points must be finite; row {row} is {points[row].tolist()}")

    if colors is not None:
        colors = _host(colors, "colors")
        if colors.shape != (n, 3):
            raise ValueError(f"colors must have shape ({n}, 3); got {colors.shape}")
        if colors.dtype == bool or colors.dtype.kind not in "iu":
            raise TypeError(f"colors must be an integer array (uint8, scaled to 16 bits, or "
                            f"0..65535); got dtype {colors.dtype}")
        if colors.dtype == np.uint8:
            colors = colors.astype(np.uint16) * np.uint16(257)
        else:
            if n and (int(colors.min()) < 0 or int(colors.max()) > 65535):
                raise ValueError(f"colors must lie in [0, 65535] (LAS stores 16-bit colour); "
                                 f"got [{int(colors.min())}, {int(colors.max())}]")
            colors = colors.astype(np.uint16)

    if labels is not None:
        labels = _host(labels, "labels")
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},); got {labels.shape}")
        if labels.dtype == bool or labels.dtype.kind not in "iu":
            raise TypeError(f"labels must be an integer array; got dtype {labels.dtype}")

    properties = dict(properties or {})
    if intensity is not None:
        if "intensity" in properties:
            raise ValueError("intensity was given both as intensity= and in properties")
        properties["intensity"] = intensity
    props = {}
    for name, values in properties.items():
        if not isinstance(name, str) or not name or not name.isascii() or len(name) > 32 \
                or "\0" in name:
            raise ValueError(f"LAS property names must be ASCII strings of 1..32 "
                             f"characters; got {name!r}")
        if name in _LAS_RESERVED:
            raise ValueError(f"property {name!r} is reserved (use points / colors / labels)")
        values = _host(values, f"properties[{name!r}]")
        if values.shape[:1] != (n,) or values.ndim > 2:
            raise ValueError(f"properties[{name!r}] must have shape ({n},) or ({n}, k); got "
                             f"{values.shape}")
        props[name] = values

    fmt = _las_point_format(version, colors is not None, props, point_format)
    format_info = laspy.PointFormat(fmt)
    standard = set(format_info.dimension_names)
    every_standard = {d for i in range(11) for d in laspy.PointFormat(i).dimension_names}
    if labels is not None and n:
        high = 31 if fmt <= 5 else 255
        if int(labels.min()) < 0 or int(labels.max()) > high:
            raise ValueError(f"labels must lie in [0, {high}] for LAS point format {fmt}; "
                             f"got [{int(labels.min())}, {int(labels.max())}]"
                             + (" (formats 6-10 of LAS 1.4 allow 0..255)" if fmt <= 5
                                else ""))
    extra_params = []
    for name, values in props.items():
        if name in standard:
            info = format_info.dimension_by_name(name)
            if values.ndim != 1:
                raise ValueError(f"properties[{name!r}] must have shape ({n},); got "
                                 f"{values.shape}")
            if info.kind.name == "FloatingPoint":
                if values.dtype == bool or values.dtype.kind not in "iuf":
                    raise TypeError(f"properties[{name!r}] must be a number array; got "
                                    f"dtype {values.dtype}")
                if not np.all(np.isfinite(values)):
                    raise ValueError(f"properties[{name!r}] must be finite")
                if np.dtype(info.dtype) == np.float32 and values.size and \
                        float(np.abs(values).max()) > float(np.finfo(np.float32).max):
                    raise ValueError(f"properties[{name!r}]: LAS dimension {name} is float32; "
                                     f"values up to {float(np.abs(values).max()):g} do not "
                                     f"fit its range (+-{float(np.finfo(np.float32).max):g})")
                continue
            if values.dtype.kind not in "iub":
                raise TypeError(f"properties[{name!r}] (LAS dimension {name}) must be an "
                                f"integer array; got dtype {values.dtype}")
            low, high = _las_dimension_range(info)
            if n and (int(values.min()) < low or int(values.max()) > high):
                raise ValueError(f"properties[{name!r}] must lie in [{low}, {high}] (LAS "
                                 f"point format {fmt}); got [{int(values.min())}, "
                                 f"{int(values.max())}]")
        elif name in every_standard:
            holders = [i for i in range(11) if name in laspy.PointFormat(i).dimension_names]
            raise ValueError(f"properties[{name!r}] is a standard dimension of LAS point "
                             f"formats {holders}, not of format {fmt} (LAS {version}); "
                             "choose another point_format / version, or rename it to store "
                             "it as extra bytes")
        else:
            if values.dtype == bool:
                values = props[name] = values.astype(np.uint8)
            code = values.dtype.str[1:]
            if code not in _LAS_EXTRA_TYPES:
                raise TypeError(f"properties[{name!r}]: extra bytes must be uint8..int64, "
                                f"float32 or float64; got dtype {values.dtype}")
            if values.ndim == 2 and values.shape[1] not in (2, 3):
                raise ValueError(f"properties[{name!r}]: array-typed extra bytes hold 2 or 3 "
                                 f"values per point; got shape {values.shape}")
            kind = code if values.ndim == 1 else f"{values.shape[1]}{code}"
            extra_params.append(laspy.ExtraBytesParams(name=name, type=kind))

    scale = _las_vector("scale", scale, positive=True)
    if offset is None:
        offset = np.floor(points.min(axis=0)) if n else np.zeros(3)
    else:
        offset = _las_vector("offset", offset)
    integers = np.rint((points - offset) / scale)
    if n:
        low, high = integers.min(axis=0), integers.max(axis=0)
        for i, axis in enumerate("xyz"):
            if low[i] < _INT32.min or high[i] > _INT32.max:
                raise ValueError(
                    f"points {axis} in [{float(points[:, i].min())!r}, "
                    f"{float(points[:, i].max())!r}] does not fit LAS's int32 at scale "
                    f"{float(scale[i])!r} and offset {float(offset[i])!r} "
                    f"(it needs integers in [{low[i]:.0f}, {high[i]:.0f}]); use a coarser "
                    "scale or an offset nearer the data")
    integers = integers.astype(np.int32)

    header = laspy.LasHeader(point_format=fmt, version=version)
    header.scales = scale
    header.offsets = offset
    header.generating_software = "sparsegrid"
    if extra_params:
        header.add_extra_dims(extra_params)
    las = laspy.LasData(header, points=laspy.ScaleAwarePointRecord.zeros(n, header=header))
    las.X, las.Y, las.Z = integers[:, 0], integers[:, 1], integers[:, 2]
    if colors is not None:
        las.red, las.green, las.blue = colors[:, 0], colors[:, 1], colors[:, 2]
    if labels is not None:
        las.classification = labels.astype(np.uint8)
    for name, values in props.items():
        if name in standard:
            dtype = np.asarray(las[name]).dtype
            las[name] = values.astype(dtype)
        else:
            las[name] = values

    _atomic_write(where, lambda f: las.write(f, do_compress=compress))
