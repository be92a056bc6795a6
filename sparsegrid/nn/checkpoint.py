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

Every file is written atomically: to a temporary file in the destination folder, flushed
to disk, then renamed over ``path`` with :func:`os.replace`, so an interrupted save
leaves the previous file (or none), never a truncated one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping

import numpy as np

from .. import backend
from ..autodiff.core import Tensor

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "save_state_dict",
           "load_state_dict"]

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


def _decode(value, arrays):
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    if isinstance(value, dict):
        if "__array__" in value:
            array = arrays[value["__array__"]]
            return array[()] if value.get("__scalar__") else array
        if "__tuple__" in value:
            return tuple(_decode(v, arrays) for v in value["__tuple__"])
        if "__items__" in value:
            return {_decode(k, arrays): _decode(v, arrays) for k, v in value["__items__"]}
        return {k: _decode(v, arrays) for k, v in value.items()}
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


def _umask():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _write_arrays(path, arrays):
    """Write ``arrays`` (name -> NumPy array) to ``path`` atomically, in the format its
    suffix names (``.safetensors``, else ``.npz``)."""
    path = os.fspath(path)
    safetensors = _import_safetensors() if _is_safetensors_path(path) else None
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    try:
        if safetensors is None:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
        else:
            os.close(fd)
            safetensors.save_file(arrays, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        try:
            mode = os.stat(path).st_mode & 0o7777
        except OSError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable (POSIX); harmless to skip elsewhere
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _read_arrays(path):
    """``{name: array}`` from an ``.npz`` or ``.safetensors`` file, told apart by content."""
    path = os.fspath(path)
    with open(path, "rb") as f:  # FileNotFoundError stays as it is
        head = f.read(9)
    try:
        if head[:2] == b"PK":
            with np.load(path, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        if len(head) == 9 and head[8:9] == b"{":
            safetensors = _import_safetensors()
            return {name: np.array(array, copy=True)
                    for name, array in safetensors.load_file(path).items()}
    except ImportError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path!r} could not be read as an .npz or .safetensors file "
                              f"(corrupted or truncated?): {type(exc).__name__}: {exc}") from exc
    raise CheckpointError(f"{path!r} is neither an .npz nor a .safetensors file")


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
    return meta.get("sections", {})


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
        with the ``safetensors`` package (``safetensors.numpy.save_file``); any other name
        as an uncompressed ``.npz`` archive (no suffix is appended).
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
    for name, obj in zip(_SECTIONS, (model, optimizer, scheduler)):
        if obj is not None:
            sections[name] = _encode(_state_of(obj, name), (name,), arrays)
    sections["extra"] = _encode(dict(extra), ("extra",), arrays)
    meta = {"format": FORMAT, "version": VERSION, "sections": sections}
    try:
        text = json.dumps(meta, ensure_ascii=True)
    except ValueError as exc:  # a circular reference
        raise TypeError(f"cannot store this checkpoint: {exc}") from exc
    arrays[META_KEY] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    _write_arrays(path, arrays)


def load_checkpoint(path, model=None, optimizer=None, scheduler=None, strict=True):
    """Load a file written by :func:`save_checkpoint` into the given objects.

    The model is loaded first (``model.load_state_dict(state, strict=strict)``), then
    the optimizer and the schedule (``load_state_dict(state)``).

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
        (a ValueError) for a corrupted, truncated or foreign file.
    KeyError
        For missing keys or parts (see ``strict``).
    """
    arrays = _read_arrays(path)
    sections = _read_meta(path, arrays)
    for name, obj in zip(_SECTIONS, (model, optimizer, scheduler)):
        if obj is None:
            continue
        if name not in sections:
            if strict:
                raise KeyError(f"{os.fspath(path)!r} holds no {name} state "
                               f"(it has: {sorted(s for s in sections if s != 'extra')})")
            continue
        state = _decode(sections[name], arrays)
        if name == "model":
            obj.load_state_dict(state, strict=strict)
        else:
            obj.load_state_dict(state)
    return _decode(sections.get("extra", {}), arrays)


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
    sections = _read_meta(path, arrays)
    if "model" not in sections:
        raise KeyError(f"checkpoint {os.fspath(path)!r} holds no model state")
    return _decode(sections["model"], arrays)
