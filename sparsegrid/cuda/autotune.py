"""Which convolution algorithm a layer runs on the GPU: the settings and the autotuner.

Two algorithms compute a sparse convolution on the CUDA backend:

``"gather_gemm"``
    Per kernel offset: gather the input rows, one cuBLAS GEMM, scatter-add into the
    outputs (:mod:`sparsegrid.cuda.conv`). Every dtype, grouped weights, exact float32.
``"implicit_gemm"``
    The fused output-stationary kernel on tensor cores (:mod:`sparsegrid.cuda.implicit_gemm`):
    float16 data, or float32 data as TF32 when TF32 is allowed (:func:`set_tf32`);
    ungrouped weights, at most 512 offsets, a GPU of compute capability 8.0 or later.
    Elsewhere a layer falls back to ``"gather_gemm"``.

:func:`set_conv_algorithm` picks one for every layer, or ``"auto"`` (the default): for each
layer shape, keyed by (pass, rows, mean pairs per row, Cin, Cout, dtype, TF32, GPU), the
first call times every eligible candidate (both algorithms, the fused kernel's tile shapes)
with CUDA events and keeps the fastest, in memory and in a JSON file
(``$SPARSEGRID_CACHE_DIR`` or ``~/.cache/sparsegrid``, ``autotune-v1.json``), so later
processes on that GPU choose the same without measuring. The fused kernel's results do not
depend on its tile shape; the two algorithms round differently (float16 gather-GEMM rounds
each offset's product), so pin the algorithm where bit-identical results across machines
matter. The environment variables ``SPARSEGRID_CONV_ALGORITHM`` and ``SPARSEGRID_TF32``
(``1``/``0``) set the defaults at import.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import threading

ALGORITHMS = ("auto", "implicit_gemm", "gather_gemm")

_lock = threading.Lock()
_settings = {
    "algorithm": os.environ.get("SPARSEGRID_CONV_ALGORITHM", "auto"),
    "tf32": os.environ.get("SPARSEGRID_TF32", "0") not in ("", "0", "false", "False"),
}
if _settings["algorithm"] not in ALGORITHMS:
    raise ValueError(f"SPARSEGRID_CONV_ALGORITHM must be one of {list(ALGORITHMS)}; got "
                     f"{_settings['algorithm']!r}")
_memory = {}
_disk_loaded = [False]


def set_conv_algorithm(name):
    """Use ``name`` (``'auto'``, ``'implicit_gemm'`` or ``'gather_gemm'``) for every
    convolution on the GPU from now on (process-wide). A pinned ``'implicit_gemm'`` still
    falls back to gather-GEMM where the fused kernel does not apply (see the module)."""
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}; got {name!r}")
    _settings["algorithm"] = name


def get_conv_algorithm():
    """The algorithm setting: ``'auto'``, ``'implicit_gemm'`` or ``'gather_gemm'``."""
    return _settings["algorithm"]


@contextlib.contextmanager
def conv_algorithm(name):
    """Context manager: :func:`set_conv_algorithm` inside, the previous setting after."""
    previous = get_conv_algorithm()
    set_conv_algorithm(name)
    try:
        yield
    finally:
        set_conv_algorithm(previous)


def set_tf32(enabled):
    """Allow (True) float32 convolutions to run on TF32 tensor cores (10-bit mantissa
    inputs, float32 accumulation), or not (False, the default: exact float32)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False; got {enabled!r}")
    _settings["tf32"] = enabled


def get_tf32():
    """Whether float32 convolutions may run as TF32."""
    return _settings["tf32"]


@contextlib.contextmanager
def tf32(enabled=True):
    """Context manager: :func:`set_tf32` inside, the previous setting after."""
    previous = get_tf32()
    set_tf32(enabled)
    try:
        yield
    finally:
        set_tf32(previous)


def cache_path():
    """The autotuner's file: ``$SPARSEGRID_CACHE_DIR/autotune-v1.json`` (default
    ``~/.cache/sparsegrid``)."""
    root = os.environ.get("SPARSEGRID_CACHE_DIR") or pathlib.Path.home() / ".cache" / "sparsegrid"
    return pathlib.Path(root) / "autotune-v1.json"


def clear(disk=False):
    """Forget the choices made in this process (and the file, with ``disk=True``)."""
    with _lock:
        _memory.clear()
        _disk_loaded[0] = False
        if disk:
            with contextlib.suppress(FileNotFoundError):
                cache_path().unlink()


def choices():
    """The choices known to this process: ``{key: candidate}`` (a copy)."""
    with _lock:
        _load_disk()
        return dict(_memory)


def layer_key(pass_name, n_rows, n_pairs, cin, cout, dtype, device_name):
    """The autotuner's key of one layer: rows rounded up to a power of two, mean pairs per
    row to a multiple of 0.5."""
    rows = 1 << max(0, math.ceil(math.log2(max(n_rows, 1))))
    kbar = round(2 * n_pairs / max(n_rows, 1)) / 2
    tf32_flag = "tf32" if _settings["tf32"] else "fp32"
    return f"{pass_name}|{rows}|{kbar:g}|{cin}|{cout}|{dtype}|{tf32_flag}|{device_name}"


def _load_disk():
    if _disk_loaded[0]:
        return
    _disk_loaded[0] = True
    try:
        found = json.loads(cache_path().read_text())
    except (FileNotFoundError, ValueError, OSError):
        return
    if isinstance(found, dict):
        for key, value in found.items():
            if isinstance(value, str):
                _memory.setdefault(key, value)


def _store_disk():
    """Write the choices atomically (a private temporary file, then a rename); a
    read-only home keeps them in this process only."""
    path = cache_path()
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(dict(sorted(_memory.items())), indent=0))
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink()


def choose(key, candidates, measure):
    """The candidate for ``key``: remembered, or the fastest of ``candidates`` (strings)
    by ``measure(candidate) -> seconds``, remembered in memory and on disk. A single
    candidate is returned without measuring (and not stored)."""
    if len(candidates) == 1:
        return candidates[0]
    with _lock:
        _load_disk()
        found = _memory.get(key)
    if found in candidates:
        return found
    times = {candidate: measure(candidate) for candidate in candidates}
    best = min(candidates, key=lambda c: (times[c], candidates.index(c)))
    with _lock:
        _memory[key] = best
        _store_disk()
    return best
