"""A stand-in for CuPy that runs sparsegrid's CUDA kernel sources on the host, over NumPy.

The CUDA backend's kernels are grid-stride loops with no shared memory, no block-level
cooperation and no atomics (``sparsegrid/cuda/kernels/common.cuh``), so one host thread
running each loop from start to end computes exactly what any launch on a GPU computes.
This module compiles the very same sources with the host C++ compiler (``g++``), behind a
small prelude that defines CUDA's keywords and built-in variables, and exposes them
through a ``RawModule`` with CuPy's calling convention. Array functions are NumPy's, with
CuPy's semantics where the two differ (``argsort``/``sort`` are stable in CuPy).

Every kernel call is checked against the compiled signature: each array argument must be
a C-contiguous NumPy array whose dtype is the pointer's element type, each scalar a NumPy
scalar of the parameter's exact type (CuPy would pass mismatched bytes silently).

Bound with ``sparsegrid.cuda._runtime.use(cupy_emulator.module())`` by the
``emulated`` kernel set (tests/conftest.py); never used outside the test suite.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import types

import numpy as np

_PRELUDE = r"""
#define SG_HOST_EMULATION 1
#include <cstring>
#include <string>
#define __global__
#define __device__
#define __forceinline__ inline
struct sg_dim3 { unsigned int x, y, z; };
static const sg_dim3 threadIdx = {0, 0, 0};
static const sg_dim3 blockIdx = {0, 0, 0};
static const sg_dim3 blockDim = {1, 1, 1};
static const sg_dim3 gridDim = {1, 1, 1};
inline float sg_half_to_float(unsigned short h) {
    _Float16 v; std::memcpy(&v, &h, 2); return (float)v;
}
inline unsigned short sg_float_to_half(float f) {
    _Float16 v = (_Float16)f; unsigned short h; std::memcpy(&h, &v, 2); return h;
}
"""

_SIGNATURES = r"""
template <typename T> struct sg_code;
#define SG_CODE(type, text) \
    template <> struct sg_code<type> { static std::string get() { return text; } };
SG_CODE(float, "f32") SG_CODE(double, "f64") SG_CODE(int, "i32") SG_CODE(long long, "i64")
SG_CODE(unsigned short, "u16") SG_CODE(unsigned char, "u8") SG_CODE(signed char, "i8")
SG_CODE(unsigned int, "u32") SG_CODE(bool, "b1")
template <typename T> struct sg_code<const T> { static std::string get() { return sg_code<T>::get(); } };
template <typename T> struct sg_code<T*> { static std::string get() { return sg_code<T>::get() + "*"; } };
template <typename... A> std::string sg_signature(void (*)(A...)) {
    std::string s; ((s += sg_code<A>::get() + ","), ...); return s;
}
"""

# dtype -> the emulated C type's code (float16 is stored as unsigned short, sg_half)
_CODES = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64",
          np.dtype(np.int32): "i32", np.dtype(np.int64): "i64", np.dtype(np.float16): "u16",
          np.dtype(np.uint16): "u16", np.dtype(np.uint8): "u8", np.dtype(np.int8): "i8",
          np.dtype(np.uint32): "u32", np.dtype(np.bool_): "b1"}
_CTYPES = {"f32": ctypes.c_float, "f64": ctypes.c_double, "i32": ctypes.c_int32,
           "i64": ctypes.c_int64, "u16": ctypes.c_uint16, "u8": ctypes.c_uint8,
           "i8": ctypes.c_int8, "u32": ctypes.c_uint32, "b1": ctypes.c_bool}

_CACHE = pathlib.Path(os.environ.get("SPARSEGRID_EMULATOR_CACHE",
                                     pathlib.Path(tempfile.gettempdir()) / "sparsegrid-emulator"))
_lock = threading.Lock()
_libraries = {}
launches = []   # (kernel name, n) of every launch since the last clear: tests may inspect
# Every call that synchronises the host with the device on a real GPU: reads of device
# values (asnumpy) and functions whose output size depends on the data. Tests count them.
syncs = []
_SIZE_FROM_DATA = ("flatnonzero", "nonzero", "argwhere", "unique")


def compiler():
    """The host C++ compiler the emulator uses, or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and any((pathlib.Path(d) / name).exists()
                        for d in os.environ.get("PATH", "").split(os.pathsep)):
            return name
    return None


class EmulatedKernel:
    def __init__(self, name, address, signature):
        self.name = name
        self._codes = [c for c in signature.split(",") if c]
        self._function = ctypes.CFUNCTYPE(None, *[
            ctypes.c_void_p if c.endswith("*") else _CTYPES[c] for c in self._codes])(address)

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        if len(args) != len(self._codes):
            raise TypeError(f"{self.name} takes {len(self._codes)} arguments; got {len(args)}")
        values = []
        for position, (arg, code) in enumerate(zip(args, self._codes)):
            where = f"{self.name} argument {position}"
            if code.endswith("*"):
                if not isinstance(arg, np.ndarray):
                    raise TypeError(f"{where} must be an array ({code}); got "
                                    f"{type(arg).__name__}")
                if _CODES.get(arg.dtype) != code[:-1]:
                    raise TypeError(f"{where} must hold {code[:-1]}; got dtype {arg.dtype}")
                if not arg.flags.c_contiguous:
                    raise TypeError(f"{where} must be C-contiguous (a kernel reads raw "
                                    "memory)")
                values.append(arg.ctypes.data if arg.size else None)
            else:
                if not isinstance(arg, np.generic) or _CODES.get(arg.dtype) != code:
                    raise TypeError(f"{where} must be a NumPy scalar of type {code}; got "
                                    f"{type(arg).__name__} {arg!r}")
                values.append(arg.item())
        launches.append((self.name, int(np.prod(grid)) * int(np.prod(block))))
        self._function(*values)


class RawModule:
    """``cupy.RawModule(code=..., options=..., name_expressions=[...])`` on the host."""

    def __init__(self, code, options=(), name_expressions=(), **kwargs):
        self._names = list(name_expressions)
        table = []
        for i, name in enumerate(self._names):
            table.append(f'extern "C" void* sg_emu_address_{i}() {{ return (void*)(&{name}); }}')
            table.append(f'extern "C" const char* sg_emu_signature_{i}() {{ static std::string s'
                         f' = sg_signature(&{name}); return s.c_str(); }}')
        text = _PRELUDE + code + "\n" + _SIGNATURES + "\n".join(table) + "\n"
        self._library = _compile(text)
        self._kernels = {}

    def get_function(self, name):
        kernel = self._kernels.get(name)
        if kernel is None:
            i = self._names.index(name)
            address = getattr(self._library, f"sg_emu_address_{i}")
            address.restype = ctypes.c_void_p
            signature = getattr(self._library, f"sg_emu_signature_{i}")
            signature.restype = ctypes.c_char_p
            kernel = self._kernels[name] = EmulatedKernel(name, address(),
                                                          signature().decode())
        return kernel


def _compile(text):
    digest = hashlib.sha256(text.encode()).hexdigest()[:24]
    with _lock:
        library = _libraries.get(digest)
        if library is not None:
            return library
        _CACHE.mkdir(parents=True, exist_ok=True)
        target = _CACHE / f"{digest}.so"
        if not target.exists():
            source = _CACHE / f"{digest}.{os.getpid()}.cpp"
            source.write_text(text)
            partial = _CACHE / f"{digest}.{os.getpid()}.so"
            result = subprocess.run([compiler(), "-std=c++17", "-O2", "-shared", "-fPIC",
                                     "-Wall", "-Werror", "-Wno-unused-function",
                                     "-o", str(partial), str(source)],
                                    capture_output=True, text=True)
            source.unlink()
            if result.returncode:
                raise RuntimeError(f"host compile of a CUDA source failed:\n{result.stderr}")
            os.replace(partial, target)
        library = _libraries[digest] = ctypes.CDLL(str(target))
        return library


def _stable_argsort(a, axis=-1, kind=None):
    return np.argsort(a, axis=axis, kind="stable")


def _stable_sort(a, axis=-1, kind=None):
    return np.sort(a, axis=axis, kind="stable")


class _Runtime:
    @staticmethod
    def getDevice():
        return 0


class _Cuda(types.SimpleNamespace):
    pass


class _Emulator(types.ModuleType):
    """NumPy, with CuPy's sort semantics, ``asnumpy`` and a host ``RawModule``."""

    def __getattr__(self, name):
        return getattr(np, name)


def _synchronising(name, function):
    def call(*args, **kwargs):
        syncs.append(name)
        return function(*args, **kwargs)
    return call


def module():
    """A fresh emulator module (binds as ``cp`` in ``sparsegrid.cuda``)."""
    emulator = _Emulator("cupy_emulator_namespace")
    emulator.argsort = _stable_argsort
    emulator.sort = _stable_sort
    emulator.asnumpy = _synchronising("asnumpy", lambda a, *args, **kw: np.array(a))
    for name in _SIZE_FROM_DATA:
        setattr(emulator, name, _synchronising(name, getattr(np, name)))
    emulator.ndarray = np.ndarray
    emulator.RawModule = RawModule
    emulator.cuda = _Cuda(runtime=_Runtime())
    emulator.is_available = lambda: True
    return emulator


def available():
    """Whether the emulator can run here (a host C++ compiler is on PATH)."""
    return compiler() is not None and sys.platform != "win32"
