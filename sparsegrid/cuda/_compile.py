"""Kernel sources of the CUDA backend, compiled with ``cupy.RawModule`` on first use.

Each source in ``kernels/`` is compiled once per device (NVRTC, through CuPy; CuPy keeps
the binary in its on-disk kernel cache, so later processes only load it) with every
template instantiation the backend calls listed as a name expression. :data:`SOURCES` is
the complete list: the CI test compiles each entry for several architectures with the
same options, so a kernel that fails to compile cannot land.
"""

from __future__ import annotations

import pathlib
import threading

import numpy as np

from ._runtime import cp

KERNEL_DIR = pathlib.Path(__file__).parent / "kernels"
PRELUDE = "common.cuh"

#: NVRTC options passed to RawModule (CuPy adds the architecture and ``-ftz=true``).
OPTIONS = ("--std=c++17",)

#: The C type of each floating dtype a kernel is instantiated for, and the type sums of
#: it accumulate in (float16 data accumulates in float32).
C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double",
           np.dtype(np.float16): "sg_half"}
ACCUMULATOR = {np.dtype(np.float32): np.dtype(np.float32),
               np.dtype(np.float64): np.dtype(np.float64),
               np.dtype(np.float16): np.dtype(np.float32)}


def _typed(name, *params):
    return [f"{name}<{', '.join(p)}>" for p in params]


_T_A = [(C_TYPES[d], C_TYPES[ACCUMULATOR[d]]) for d in C_TYPES]
_T = [(C_TYPES[d],) for d in C_TYPES]

#: source file -> every kernel name (template instantiations spelled out) it provides.
SOURCES = {
    "index.cu": ["neighbour_search"],
    "rules.cu": ["window_candidates"],
    "conv.cu": (_typed("scatter_add_rows", *_T_A) + _typed("gather_scatter_add", *_T_A)
                + _typed("store_rounded", *_T_A)),
    "pool.cu": _typed("max_pool_offset", *_T) + _typed("ordered_cell_sum", *_T),
    "segment.cu": (_typed("segment_chunks", *_T_A) + _typed("segment_finish", *_T_A)
                   + _typed("scatter_rows", *_T)
                   + _typed("scatter_cells", *_T)),
    "dense.cu": _typed("scatter_dense", *_T) + _typed("gather_dense", *_T),
    "blocks.cu": _typed("block_gather", *_T) + _typed("block_scatter", *_T_A),
}

#: The fused implicit-GEMM convolution (kernels/implicit_gemm.cu): the C type of each
#: storage type it runs on (float32 data runs as TF32), its tile shapes (BM, BN, BK) with
#: 16-byte copies, the tile of its generic variant (channels that do not allow 16-byte
#: copies), and the weight gradient's tile (input channels, output channels, rows per
#: chunk). BK: input channels per chunk.
IG_TYPES = {"float16": "sg_half", "bfloat16": "sg_bf16", "float32": "float"}
IG_TILES = {
    "sg_half": ((64, 32, 32), (64, 64, 32), (128, 64, 32), (128, 128, 32)),
    "sg_bf16": ((64, 32, 32), (64, 64, 32), (128, 64, 32), (128, 128, 32)),
    "float": ((64, 32, 16), (64, 64, 16), (128, 64, 16), (128, 128, 16)),
}
IG_GENERIC_TILE = {"sg_half": (64, 64, 32), "sg_bf16": (64, 64, 32), "float": (64, 64, 16)}
IG_WGRAD_TILE = {"sg_half": (64, 64, 32), "sg_bf16": (64, 64, 32), "float": (64, 64, 16)}


def ig_conv_name(c_type, tile, vec):
    """The name expression of one instantiation of ``implicit_gemm_conv``."""
    bm, bn, bk = tile
    return f"implicit_gemm_conv<{c_type}, {bm}, {bn}, {bk}, {'true' if vec else 'false'}>"


def ig_wgrad_name(c_type, vec):
    """The name expression of one instantiation of ``implicit_gemm_wgrad``."""
    bm, bn, bk = IG_WGRAD_TILE[c_type]
    return f"implicit_gemm_wgrad<{c_type}, {bm}, {bn}, {bk}, {'true' if vec else 'false'}>"


# conv._choose relies on the generic tile being one of the tiles (the same name either way)
assert all(IG_GENERIC_TILE[c] in IG_TILES[c] for c in IG_TILES)

# One module per storage type ("file:type" keys): a process compiles only what it runs.
for _c in IG_TILES:
    SOURCES[f"implicit_gemm.cu:{_c}"] = (
        [ig_conv_name(_c, tile, True) for tile in IG_TILES[_c]]
        + [ig_conv_name(_c, IG_GENERIC_TILE[_c], False)]
        + [ig_wgrad_name(_c, vec) for vec in (True, False)]
        + [f"wgrad_reduce<{_c}>"])

#: Threads per block of every launch (the kernels are grid-stride loops, so the launch
#: shape changes speed only, never results).
BLOCK = 256
_MAX_BLOCKS = 65535 * 8

_modules = {}
_lock = threading.Lock()


def source_file(key):
    """The file of a :data:`SOURCES` key (``'file.cu'``, or ``'file.cu:part'`` for a
    module holding part of a file's instantiations)."""
    return key.split(":", 1)[0]


def source_text(key):
    """The full text NVRTC compiles for a :data:`SOURCES` key: the shared prelude, then
    the file."""
    prelude = (KERNEL_DIR / PRELUDE).read_text()
    return prelude + "\n" + (KERNEL_DIR / source_file(key)).read_text()


def clear_cache():
    """Forget compiled modules (after :func:`sparsegrid.cuda._runtime.use`)."""
    with _lock:
        _modules.clear()
        _functions.clear()


def _module(filename):
    device = cp.cuda.runtime.getDevice()
    key = (filename, device)
    module = _modules.get(key)
    if module is None:
        with _lock:
            module = _modules.get(key)
            if module is None:
                module = cp.RawModule(code=source_text(filename), options=OPTIONS,
                                      name_expressions=list(SOURCES[filename]))
                _modules[key] = module
    return module


_functions = {}


def function(filename, name):
    """The compiled kernel ``name`` (as listed in :data:`SOURCES`) of ``filename`` on the
    current device, looked up once (RawModule.get_function builds a new kernel object on
    every call)."""
    key = (filename, name, cp.cuda.runtime.getDevice())
    found = _functions.get(key)
    if found is None:
        if name not in SOURCES[filename]:
            raise KeyError(f"{name} is not listed in SOURCES[{filename!r}]")
        found = _functions[key] = _module(filename).get_function(name)
    return found


def typed(name, dtype, with_accumulator=False):
    """``name<T>`` or ``name<T, A>`` for a float dtype; TypeError for other dtypes."""
    dtype = np.dtype(dtype)
    if dtype not in C_TYPES:
        raise TypeError(f"the CUDA kernels take float16, float32 or float64 data; got {dtype}")
    if with_accumulator:
        return f"{name}<{C_TYPES[dtype]}, {C_TYPES[ACCUMULATOR[dtype]]}>"
    return f"{name}<{C_TYPES[dtype]}>"


def launch(filename, name, n_items, *args):
    """Run kernel ``name`` over ``n_items`` work items (a grid-stride loop; nothing is
    launched for none). Arguments are CuPy arrays (C-contiguous) and NumPy scalars."""
    n_items = int(n_items)
    if n_items <= 0:
        return
    blocks = min(-(-n_items // BLOCK), _MAX_BLOCKS)
    function(filename, name)((blocks,), (BLOCK,), args)
