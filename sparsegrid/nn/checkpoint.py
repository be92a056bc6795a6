"""Training checkpoints and weight files: ``.npz`` or ``.safetensors``, one file each.

File layout
-----------
A *checkpoint* (:func:`save_checkpoint`) is a flat table of named arrays:

* ``model/<state_dict key>`` -- the model's parameters and buffers;
* ``optimizer/state/<index>/<name>`` -- the optimizer's per-parameter arrays;
* ``scheduler/...``, ``extra/<name>...`` -- any arrays inside those;
* ``__sparsegrid_checkpoint__`` -- a ``uint8`` array holding UTF-8 JSON that describes
  everything else: ``{"format": "sparsegrid.checkpoint", "version": 1, "sections":
  {"model": ..., "optimizer": ..., "scheduler": ..., "extra": ...}}``. Each section is the
  object's ``state_dict()`` (or the ``extra`` dict) written as JSON in which every array is
  replaced by ``{"__array__": "<key of the array in the table>"}`` (with ``"__scalar__":
  true`` for NumPy scalars such as ``np.float32(1.5)``), tuples by ``{"__tuple__": [...]}``
  and dicts whose keys are not all plain strings (the optimizer's integer parameter
  indices) by ``{"__items__": [[key, value], ...]}``. Python ints, floats (including
  NaN/inf), strings, bools and None are stored as JSON values and round-trip exactly.

The same layout is used for both formats: the JSON lives in the reserved array, never in
safetensors' own string metadata, so either file converts to the other by copying arrays.
Arrays keep their dtype and bits exactly (floating, integer and boolean dtypes; object
arrays are refused).

A *weights file* (:func:`save_state_dict`) is a plain table of the state dict's arrays
under their own keys, with no reserved entry, readable by any ``.npz``/safetensors tool.

Every file is written atomically: to a hidden temporary file in the destination folder
(``.<name>.sparsegrid-<8 random characters>.tmp``, held under an exclusive ``flock`` from
before it has that name until it is renamed), flushed to disk, then renamed over ``path``
with :func:`os.replace`, so an interrupted save leaves the previous file (or none), never a
truncated one; the loaders read only ``path``. A save that is killed (SIGKILL, SIGTERM,
power loss) cannot remove its temporary; a later save of the same path removes such stale
temporaries (only names of exactly that pattern, not locked by a save still running and
at least :data:`STALE_TEMP_GRACE_S` seconds older than the new save's own; without
``flock``, by age alone).

Files are recognised by content, never by suffix: a zip archive of ``.npy`` members is an
``.npz``; a little-endian header length that fits the file followed by a JSON object is a
safetensors file; anything else is a :class:`CheckpointError` that says what was found.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import struct
import sys
import tempfile
from collections.abc import Mapping

try:
    import fcntl
except ImportError:  # Windows: stale temporaries are recognised by age alone
    fcntl = None

import numpy as np

from .. import _files, backend
from ..autodiff.core import Tensor

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "save_state_dict",
           "load_state_dict", "save", "load"]

META_KEY = "__sparsegrid_checkpoint__"
FORMAT = "sparsegrid.checkpoint"
VERSION = 1
_SECTIONS = ("model", "optimizer", "scheduler")


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint or weights file (corrupted, truncated,
    another program's, or from a newer sparsegrid)."""


# -- encoding values -----------------------------------------------------------------------
def _as_numpy(value):
    """A NumPy array from an array, a Tensor, a CuPy array or a torch tensor; else None."""
    if isinstance(value, Tensor):
        value = value.data
    if hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "numpy"):
        return value.detach().cpu().numpy()  # a torch tensor
    if isinstance(value, np.ndarray) or backend.is_cupy_array(value):
        return backend.to_numpy(value)
    return None


def _contiguous(array):
    # (np.ascontiguousarray would turn a 0-d array into a 1-d one)
    return array if array.flags.c_contiguous else np.array(array, order="C", copy=True)


def _array_key(path, arrays):
    key = "/".join(path)
    if key in arrays or key == META_KEY:
        n = 2
        while f"{key}#{n}" in arrays:
            n += 1
        key = f"{key}#{n}"
    return key


def _check_storable(array, where):
    if array.dtype.hasobject or array.dtype.kind in "OV":
        raise TypeError(f"cannot store {where}: arrays of dtype {array.dtype} are not "
                        "supported (numeric and boolean arrays only)")


def _encode(value, path, arrays):
    """JSON-able description of ``value``; arrays are moved into ``arrays``."""
    where = "/".join(path)
    if isinstance(value, np.generic):
        array = np.asarray(value)
        _check_storable(array, where)
        key = _array_key(path, arrays)
        arrays[key] = array
        return {"__array__": key, "__scalar__": True}
    array = _as_numpy(value)
    if array is not None:
        _check_storable(array, where)
        key = _array_key(path, arrays)
        arrays[key] = _contiguous(array)
        return {"__array__": key}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, path + (str(i),), arrays)
                              for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, path + (str(i),), arrays) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, path + (k,), arrays) for k, v in value.items()}
        items = []
        for k, v in value.items():
            if not (k is None or isinstance(k, (bool, int, float, str, tuple))):
                raise TypeError(f"cannot store {where}: dict key {k!r} of type "
                                f"{type(k).__name__}")
            items.append([_encode(k, path + ("key",), arrays),
                          _encode(v, path + (str(k),), arrays)])
        return {"__items__": items}
    raise TypeError(f"cannot store {where or 'value'} in a checkpoint: values of type "
                    f"{type(value).__name__} are not supported (use arrays, numbers, "
                    "strings, bools, None, and lists/tuples/dicts of them)")


def _decode(value, arrays, path="checkpoint"):
    """The value ``_encode`` described; a reference to an array the file does not hold
    (a damaged file: a flipped bit renames an entry) is a CheckpointError."""
    if isinstance(value, list):
        return [_decode(v, arrays, path) for v in value]
    if isinstance(value, dict):
        if "__array__" in value:
            key = value["__array__"]
            if not isinstance(key, str) or key not in arrays:
                raise CheckpointError(
                    f"{path!r}: the checkpoint's metadata refers to array {key!r}, which "
                    "the file does not hold (corrupted: a damaged entry name?)")
            array = arrays[key]
            return array[()] if value.get("__scalar__") else array
        if "__tuple__" in value:
            return tuple(_decode(v, arrays, path) for v in value["__tuple__"])
        if "__items__" in value:
            items = value["__items__"]
            if not isinstance(items, list) or not all(
                    isinstance(item, list) and len(item) == 2 for item in items):
                raise CheckpointError(f"{path!r}: the checkpoint's metadata is corrupted "
                                      "(a malformed '__items__' entry)")
            try:
                return {_decode(k, arrays, path): _decode(v, arrays, path)
                        for k, v in items}
            except TypeError as exc:  # an unhashable key
                raise CheckpointError(f"{path!r}: the checkpoint's metadata is corrupted "
                                      f"({exc})") from exc
        return {k: _decode(v, arrays, path) for k, v in value.items()}
    return value


# -- files ---------------------------------------------------------------------------------
def _is_safetensors_path(path):
    return os.fspath(path).lower().endswith(".safetensors")


def _import_safetensors():
    try:
        import safetensors.numpy
    except ImportError as exc:
        raise ImportError("writing or reading .safetensors files needs the 'safetensors' "
                          "package: pip install safetensors") from exc
    return safetensors.numpy


_TEMP_MARK = ".sparsegrid-"          # in every temporary's name: ``.<name>.sparsegrid-...``
_NEW_MARK = _TEMP_MARK + "new-"      # the name a temporary has before it is locked

# Stale temporaries younger than this many seconds (by mtime, against the current save's
# own temporary, in the file system's clock) are never removed, locked or not.
STALE_TEMP_GRACE_S = 60.0

# flock errors that mean "this file system has no flock" (age alone protects temporaries)
_NO_FLOCK_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOLCK", "EOPNOTSUPP",
                                                               "ENOTSUP", "ENOSYS")
                             if hasattr(errno, name))


def _temp_pattern(basename):
    """The names of the temporaries :func:`_write_arrays` holds for ``basename`` while it
    writes them: ``.<basename>.sparsegrid-<8 characters of tempfile's alphabet>.tmp``. The
    random part has no dot, so another target's temporaries never match; the names a
    temporary has before it is locked (``.<basename>.sparsegrid-new-<8>.tmp``) do not
    match either."""
    return re.compile(re.escape("." + basename + _TEMP_MARK) + r"[a-z0-9_]{8}"
                      + re.escape(".tmp"))


def _remove_stale_temporaries(folder, basename, own_name, now_ns):
    """Remove temporaries of an earlier, interrupted save of ``basename`` in ``folder``
    (a killed process cannot remove its own): files whose name matches
    :func:`_temp_pattern` exactly, last modified at least :data:`STALE_TEMP_GRACE_S`
    seconds before ``now_ns`` (the current save's own temporary's time, in the file
    system's clock) and, where ``flock`` works, not locked by a save still running (every
    save holds an exclusive ``flock`` on its temporary from before it has such a name until
    it is renamed over the target; the kernel drops it when the process dies). Nothing else
    is touched; failures are ignored (this is housekeeping)."""
    pattern = _temp_pattern(basename)
    grace_ns = int(STALE_TEMP_GRACE_S * 1e9)
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if name == own_name or not pattern.fullmatch(name):
            continue
        candidate = os.path.join(folder, name)
        try:
            fd = os.open(candidate, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or now_ns - info.st_mtime_ns < grace_ns:
                continue
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in _NO_FLOCK_ERRNOS:
                        continue  # a save in progress holds it (or the lock failed)
            try:  # the name must still be this file (not replaced meanwhile)
                same = os.stat(candidate, follow_symlinks=False)
            except OSError:
                continue
            if (same.st_dev, same.st_ino) == (info.st_dev, info.st_ino):
                try:
                    os.unlink(candidate)
                except OSError:
                    pass
        finally:
            os.close(fd)


# safetensors' dtype names, in the order of its ``Dtype`` enum (safetensors sorts the
# tensors of a file by this rank, descending, then by name)
_SAFETENSORS_DTYPES = {  # NumPy dtype name -> (safetensors name, rank)
    "bool": ("BOOL", 0), "uint8": ("U8", 4), "int8": ("I8", 5),
    "float8_e5m2": ("F8_E5M2", 6), "float8_e4m3fn": ("F8_E4M3", 7),
    "int16": ("I16", 9), "uint16": ("U16", 10), "float16": ("F16", 11),
    "bfloat16": ("BF16", 12), "int32": ("I32", 13), "uint32": ("U32", 14),
    "float32": ("F32", 15), "complex64": ("C64", 16), "float64": ("F64", 17),
    "int64": ("I64", 18), "uint64": ("U64", 19),
}


def _safetensors_layout(arrays, metadata=None):
    """``(header bytes, [(name, array), ...] in file order)`` of the safetensors file of
    ``arrays``, laid out as ``safetensors.numpy.save`` lays it out (byte for byte): an
    8-byte little-endian length, the JSON header padded with spaces to a multiple of 8,
    then each array's little-endian C-order bytes."""
    entries = []
    for name, array in arrays.items():
        try:
            dtype, rank = _SAFETENSORS_DTYPES[array.dtype.name]
        except KeyError:
            raise TypeError(f"cannot store {name!r} in a .safetensors file: safetensors has "
                            f"no dtype {array.dtype} (use an .npz file)") from None
        entries.append((-rank, name, dtype, array))
    entries.sort(key=lambda entry: (entry[0], entry[1]))
    header = {}
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    order = []
    for _, name, dtype, array in entries:
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        order.append((name, array))
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def _write_safetensors(f, header, order):
    """Write a :func:`_safetensors_layout` to the open binary file ``f``, one array at a
    time, from the arrays' own memory (only a big-endian array is copied, alone)."""
    f.write(header)
    for _, array in order:
        if array.dtype.byteorder == ">" or (array.dtype.byteorder == "="
                                            and sys.byteorder == "big"):
            array = array.astype(array.dtype.newbyteorder("<"))
        array = _contiguous(array)
        if array.nbytes:
            f.write(array.reshape(-1).view(np.uint8))


def _lock_new_temporary(folder, basename):
    """Create a new temporary for ``basename`` in ``folder``, locked (where ``flock``
    works) before it gets a name :func:`_temp_pattern` matches, so that no other save's
    cleanup ever takes an unlocked one for stale. Returns ``(fd, path)``."""
    fd, new = tempfile.mkstemp(prefix="." + basename + _NEW_MARK, suffix=".tmp", dir=folder)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # our own new file: nobody else locks it
            except OSError as exc:
                if exc.errno not in _NO_FLOCK_ERRNOS:
                    raise
                # a file system without flock: age alone protects it
        random_part = os.path.basename(new)[len("." + basename + _NEW_MARK):-len(".tmp")]
        tmp = os.path.join(folder, "." + basename + _TEMP_MARK + random_part + ".tmp")
        try:  # a hard link never replaces another save's temporary of the same name
            os.link(new, tmp)
        except FileExistsError:
            raise
        except OSError:  # no hard links here: a rename (the lock follows the inode)
            if os.path.lexists(tmp):
                raise FileExistsError(errno.EEXIST, "temporary name in use", tmp) from None
            os.rename(new, tmp)
        else:
            os.unlink(new)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(new)
        except OSError:
            pass
        raise
    return fd, tmp


def _write_arrays(path, arrays):
    """Write ``arrays`` (name -> NumPy array) to ``path`` atomically, in the format its
    suffix names (``.safetensors``, else ``.npz``).

    The data go to a hidden temporary next to ``path`` (held under an exclusive ``flock``
    while it is written), which is flushed and renamed over ``path``; stale temporaries
    of earlier saves of the same path that were killed (SIGKILL, SIGTERM, power loss) are
    removed first (see :func:`_remove_stale_temporaries`)."""
    path = os.fspath(path)
    safetensors = None
    if _is_safetensors_path(path):
        _import_safetensors()   # the format is written here, but needs the package to read
        safetensors = _safetensors_layout(arrays)
    folder = _files.destination_folder(path)
    basename = os.path.basename(path)
    for attempt in range(100):
        try:
            fd, tmp = _lock_new_temporary(folder, basename)
            break
        except FileExistsError:  # the random name of another save's temporary: again
            if attempt == 99:
                raise
    try:
        _remove_stale_temporaries(folder, basename, os.path.basename(tmp),
                                  os.fstat(fd).st_mtime_ns)
        f = os.fdopen(fd, "wb", closefd=False)
        try:
            if safetensors is None:
                np.savez(f, **arrays)
            else:
                # written here, not with save_file() (which would replace the file and
                # drop our lock) nor save() (which holds the whole file in memory)
                _write_safetensors(f, *safetensors)
            f.flush()
        finally:
            f.close()
        os.fsync(fd)
        _files.replace_keeping_mode(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        os.close(fd)
    _files.fsync_folder(folder)


def _describe_content(head, size):
    """What a file that is neither format looks like, for the error message."""
    if size == 0:
        return "an empty file (0 bytes)"
    sample = head[:32]
    try:
        text = sample.decode("utf-8")
        printable = all(ch.isprintable() or ch in "\t\r\n" for ch in text)
    except UnicodeDecodeError:
        printable = False
    if printable:
        return f"{size} bytes starting with text {text!r}"
    return f"{size} bytes starting with 0x{sample[:16].hex()}"


_MAX_SAFETENSORS_HEADER = 100_000_000   # safetensors' own limit on its JSON header


def _safetensors_header(head, size):
    """True if ``head`` (the file's first bytes) starts like a safetensors file: a
    little-endian u64 header length N that fits in the file, then N bytes of JSON
    holding an object. Checked here, so that a file of another kind is never mistaken for
    one (and never asks for the safetensors package to be installed)."""
    if len(head) < 10:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    if not 2 <= length <= min(_MAX_SAFETENSORS_HEADER, size - 8) or head[8:9] != b"{":
        return False
    return True


def _read_arrays(path):
    """``{name: array}`` from an ``.npz`` or ``.safetensors`` file, told apart by content
    (never by the suffix); anything else is a CheckpointError saying what was found."""
    path = os.fspath(path)
    with open(path, "rb") as f:  # FileNotFoundError stays as it is
        size = os.fstat(f.fileno()).st_size
        head = f.read(4096)
        is_safetensors = _safetensors_header(head, size)
        if is_safetensors:
            (length,) = struct.unpack("<Q", head[:8])
            f.seek(8)
            header = f.read(length)
            try:
                is_safetensors = isinstance(json.loads(header.decode("utf-8")), dict)
            except (ValueError, UnicodeDecodeError):
                is_safetensors = False
    if head[:4] == b"PK\x03\x04" or head[:4] == b"PK\x05\x06":
        try:
            with np.load(path, allow_pickle=False) as npz:
                if not hasattr(npz, "files"):
                    raise ValueError("not an .npz archive")
                arrays = {}
                for name in npz.files:
                    array = npz[name]
                    if not isinstance(array, np.ndarray):   # a zip member that is no .npy
                        raise ValueError(f"zip member {name!r} is not a .npy array")
                    arrays[name] = array
                return arrays
        except Exception as exc:
            raise CheckpointError(f"{path!r} could not be read as an .npz file (corrupted "
                                  f"or truncated?): {type(exc).__name__}: {exc}") from exc
    if is_safetensors:
        safetensors = _import_safetensors()   # a real safetensors file: the hint is right
        try:
            return {name: np.array(array, copy=True)
                    for name, array in safetensors.load_file(path).items()}
        except Exception as exc:
            raise CheckpointError(f"{path!r} could not be read as a .safetensors file "
                                  f"(corrupted or truncated?): {type(exc).__name__}: "
                                  f"{exc}") from exc
    if head[:2] == b"PK":
        found = f"a zip file of another kind or a damaged one ({_describe_content(head, size)})"
    elif len(head) >= 9 and head[8:9] == b"{":
        found = ("what looks like a truncated or damaged .safetensors file "
                 f"({_describe_content(head, size)})")
    else:
        found = _describe_content(head, size)
    raise CheckpointError(f"{path!r} is neither an .npz nor a .safetensors file: found "
                          f"{found}")


def _read_meta(path, arrays):
    if META_KEY not in arrays:
        raise CheckpointError(f"{os.fspath(path)!r} is a plain array file, not a sparsegrid "
                              "checkpoint (no metadata entry); read weights-only files with "
                              "load_state_dict()")
    raw = arrays[META_KEY]
    try:
        meta = json.loads(raw.astype(np.uint8).tobytes().decode("utf-8"))
        ok = isinstance(meta, dict) and meta.get("format") == FORMAT
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{os.fspath(path)!r}: the checkpoint's metadata is "
                              f"corrupted ({exc})") from exc
    if not ok:
        raise CheckpointError(f"{os.fspath(path)!r}: unrecognised checkpoint metadata")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{os.fspath(path)!r} was written by a newer sparsegrid "
                              f"(checkpoint format version {meta['version']}; this one reads "
                              f"up to {VERSION})")
    sections = meta.get("sections", {})
    kinds = meta.get("kinds", {})
    if not isinstance(sections, dict) or not isinstance(kinds, dict):
        raise CheckpointError(f"{os.fspath(path)!r}: the checkpoint's metadata is corrupted "
                              "(sections or kinds are not objects)")
    return sections, kinds


def _state_of(obj, what):
    if isinstance(obj, Mapping):
        return obj
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    raise TypeError(f"{what} must have a state_dict() method or be a dict; got "
                    f"{type(obj).__name__}")


# -- public API ----------------------------------------------------------------------------
def save_checkpoint(path, model=None, optimizer=None, scheduler=None, **extra):
    """Save a model, an optimizer, a schedule and extra values to one file, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination, used exactly as given. A name ending in ``.safetensors`` is written
        in the safetensors format (byte for byte what ``safetensors.numpy.save`` writes,
        streamed array by array; reading it back needs the ``safetensors`` package); any
        other name as an uncompressed ``.npz`` archive (no suffix is appended).
    model, optimizer, scheduler : object with ``state_dict()``, or dict, optional
        Saved as ``model.state_dict()`` etc. (a dict is saved as it is).
    **extra
        Anything else to keep (epoch, metrics, configuration): arrays, NumPy scalars,
        ints, floats, strings, bools, None, and lists, tuples and dicts of them.
        Returned by :func:`load_checkpoint`.

    Raises
    ------
    TypeError
        For a value that cannot be stored (see above).
    ImportError
        For a ``.safetensors`` path when ``safetensors`` is not installed.

    Notes
    -----
    See the module docstring for the file layout.
    """
    arrays = {}
    sections = {}
    kinds = {}
    for name, obj in zip(_SECTIONS, (model, optimizer, scheduler)):
        if obj is not None:
            sections[name] = _encode(_state_of(obj, name), (name,), arrays)
            if name != "model" and not isinstance(obj, Mapping):
                kinds[name] = type(obj).__name__
    sections["extra"] = _encode(dict(extra), ("extra",), arrays)
    meta = {"format": FORMAT, "version": VERSION, "sections": sections}
    if kinds:  # optional (readers of version 1 ignore it): checked by load_checkpoint
        meta["kinds"] = kinds
    try:
        text = json.dumps(meta, ensure_ascii=True)
    except ValueError as exc:  # a circular reference
        raise TypeError(f"cannot store this checkpoint: {exc}") from exc
    arrays[META_KEY] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    _write_arrays(path, arrays)


def load_checkpoint(path, model=None, optimizer=None, scheduler=None, strict=True):
    """Load a file written by :func:`save_checkpoint` into the given objects.

    All or nothing: the whole file is read and decoded, and the model's, optimizer's and
    schedule's states are all checked against their targets (keys, shapes, dtypes; the
    optimizer's and schedule's kind and parameter groups) before anything is assigned, so
    after an error every object is exactly as it was. (Objects of other libraries, which
    cannot be checked without loading, are loaded first, with their own
    ``load_state_dict``, and may still fail after one another.)

    Parameters
    ----------
    path : str or os.PathLike
        A checkpoint, ``.npz`` or ``.safetensors`` (recognised by content).
    model, optimizer, scheduler : object with ``load_state_dict``, optional
        Objects to restore; None skips that part.
    strict : bool, optional
        Passed to the model's ``load_state_dict`` (missing or unexpected keys raise a
        KeyError). Also, with ``strict`` an object given for a part the checkpoint lacks
        raises a KeyError; without, that object is left as it is.

    Returns
    -------
    dict
        The ``extra`` values given to :func:`save_checkpoint` (arrays come back as NumPy
        arrays, tuples as tuples).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        (a ValueError) for a corrupted, truncated or foreign file (including one whose
        metadata refers to an array the file does not hold).
    ValueError, TypeError
        For state that does not fit its target: a shape or dtype, another kind of
        optimizer or schedule ("checkpoint holds Adam state; the optimizer is SGD"),
        other parameter groups, an invalid hyper-parameter.
    KeyError
        For missing keys or parts (see ``strict``).
    """
    arrays = _read_arrays(path)
    where = os.fspath(path)
    sections, kinds = _read_meta(path, arrays)
    # 1. decode everything (a damaged file fails here, before anything is touched)
    states = {}
    for name, obj in zip(_SECTIONS, (model, optimizer, scheduler)):
        if obj is None:
            continue
        if name not in sections:
            if strict:
                raise KeyError(f"{where!r} holds no {name} state "
                               f"(it has: {sorted(s for s in sections if s != 'extra')})")
            continue
        if not hasattr(obj, "load_state_dict"):
            raise TypeError(f"{name} must have a load_state_dict() method; got "
                            f"{type(obj).__name__}")
        if name in kinds and kinds[name] != type(obj).__name__:
            raise ValueError(f"checkpoint {where!r} holds {kinds[name]} state; the {name} "
                             f"is {type(obj).__name__}")
        states[name] = (obj, _decode(sections[name], arrays, where))
    extra = _decode(sections.get("extra", {}), arrays, where)
    # 2. check every part against its target (all of them before any is changed)
    prepared, plain = [], []
    for name, (obj, state) in states.items():
        prepare = getattr(obj, "_prepare_load", None)
        commit = getattr(obj, "_commit_load", None)
        if callable(prepare) and callable(commit):
            # Module._prepare_load returns (plan, missing, unexpected)
            plan = prepare(state, strict)[0] if name == "model" else prepare(state)
            prepared.append((commit, plan))
        else:  # another library's object: it can only be loaded, not checked first
            plain.append((name, obj, state))
    # 3. assign: the objects that could not be checked first (they may still raise), then
    # the checked ones, which cannot fail
    for name, obj, state in plain:
        if name == "model":
            obj.load_state_dict(state, strict=strict)
        else:
            obj.load_state_dict(state)
    for commit, plan in prepared:
        commit(plan)
    return extra


def save_state_dict(path, state):
    """Save a flat dict of arrays (model weights) as ``.npz`` or ``.safetensors``.

    Parameters
    ----------
    path : str or os.PathLike
        Destination, used exactly as given; ``.safetensors`` selects that format, any
        other name ``.npz``. Written atomically.
    state : mapping of str to array
        NumPy/CuPy arrays, Tensors or torch tensors (e.g. ``model.state_dict()``).

    Raises
    ------
    TypeError
        For a non-string key or a value that is not an array.
    """
    arrays = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"state dict keys must be strings; got {key!r}")
        if key == META_KEY:
            raise ValueError(f"{META_KEY!r} is a reserved name")
        array = _as_numpy(value)
        if array is None:
            if isinstance(value, np.generic):
                array = np.asarray(value)
            else:
                raise TypeError(f"state[{key!r}] is a {type(value).__name__}, not an array "
                                "(use save_checkpoint to keep other values)")
        _check_storable(array, key)
        arrays[key] = _contiguous(array)
    _write_arrays(path, arrays)


def load_state_dict(path):
    """Read a weights file written by :func:`save_state_dict` (or by other tools).

    Parameters
    ----------
    path : str or os.PathLike
        An ``.npz`` or ``.safetensors`` file (recognised by content). Given a checkpoint
        from :func:`save_checkpoint`, its model state is returned.

    Returns
    -------
    dict
        Key to NumPy array (each a writable copy), in the file's order.

    Raises
    ------
    CheckpointError
        For a corrupted or foreign file.
    KeyError
        For a checkpoint that holds no model state.
    """
    arrays = _read_arrays(path)
    if META_KEY not in arrays:
        return arrays
    sections, _ = _read_meta(path, arrays)
    if "model" not in sections:
        raise KeyError(f"checkpoint {os.fspath(path)!r} holds no model state")
    return _decode(sections["model"], arrays, os.fspath(path))


# -- torch.save / torch.load's shape ---------------------------------------------------------
def save(obj, f):
    """``torch.save(obj, f)``'s counterpart: write ``obj`` to the file ``f`` atomically.

    ``obj`` may be anything a checkpoint's extra values may be: arrays (NumPy, CuPy or
    autodiff Tensors, stored as NumPy), NumPy scalars, ints, floats, strings, bools, None,
    and lists, tuples and dicts of them -- so a ``state_dict()`` (of a module, optimizer
    or schedule), an epoch number or a dict of both. Objects are not pickled: a module
    itself is refused (save its ``state_dict()``). The file is a sparsegrid checkpoint
    (``.npz``, or ``.safetensors`` for that suffix) whatever its name (``epoch.pth``).
    Ported SCN scripts use it for their ``torch.save(...)`` lines.
    """
    if hasattr(obj, "state_dict") and hasattr(obj, "parameters"):
        raise TypeError("save() stores values, not objects: save model.state_dict() and "
                        "load it with model.load_state_dict(load(f))")
    save_checkpoint(f, object=obj)


def load(f, map_location=None):
    """``torch.load(f)``'s counterpart: the value :func:`save` wrote to ``f`` (arrays
    come back as NumPy arrays; ``map_location`` is accepted for torch's signature and
    ignored: a module's ``load_state_dict`` puts arrays on its own device)."""
    extra = load_checkpoint(f)
    if "object" not in extra:
        raise CheckpointError(f"{os.fspath(f)!r} is a checkpoint written by "
                              "save_checkpoint, not by save(); read it with load_checkpoint")
    return extra["object"]
