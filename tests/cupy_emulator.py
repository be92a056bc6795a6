"""A stand-in for CuPy that runs sparsegrid's CUDA kernel sources on the host.

The CUDA backend's kernels are grid-stride loops with no shared memory, no block-level
cooperation and no atomics (``sparsegrid/cuda/kernels/common.cuh``), so one host thread
running each loop from start to end computes exactly what any launch on a GPU computes.
Modules whose source uses ``__syncthreads`` (the fused implicit-GEMM convolution) run
"cooperatively" instead: one fiber (ucontext) per CUDA thread of a block, resumed
round-robin on the calling thread, blocks one after another (a function-static
``__shared__`` array is then the block's shared memory); ``__syncthreads`` and the
warp-wide exchanges of ``mma.sync``, emulated lane by lane from the PTX ISA's fragment
layouts (``sg_emu_mma``), yield to the scheduler. Deterministic; no OS threads.
This module compiles the very same sources with the host C++ compiler (``g++``), behind a
small prelude that defines CUDA's keywords and built-in variables, and exposes them
through a ``RawModule`` with CuPy's calling convention.

Device arrays are :class:`ndarray`, a wrapper around a NumPy array that behaves as a CuPy
array does where the difference matters: NumPy will not convert it implicitly
(``np.asarray(x)`` raises TypeError: use ``.get()`` / ``cupy.asnumpy``), NumPy arrays and
device arrays do not mix in one operation, CuPy functions refuse NumPy arrays, indexing and
reductions give 0-d device arrays (not scalars; no ``__index__``), only names CuPy 14 has
exist (``tests/cupy_names.py``), and sorts are stable. Every host synchronisation a real
GPU would make is recorded in :data:`syncs` (reads of values, conversions to Python
scalars, calls whose output size depends on the data, boolean-mask indexing).

Every kernel call is checked against the compiled signature: each array argument must be
a C-contiguous NumPy array whose dtype is the pointer's element type, each scalar a NumPy
scalar of the parameter's exact type (CuPy would pass mismatched bytes silently).

The test suite installs it as ``cupy`` (``sys.modules``) for the ``emulated`` kernel set and
device (tests/conftest.py), so the whole library runs on it as on a GPU; never used outside
the test suite.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import threading
import types

import numpy as np

from cupy_names import MODULE_NAMES, NDARRAY_NAMES

_PRELUDE = r"""
#define SG_HOST_EMULATION 1
#include <ucontext.h>
#include <cmath>
#include <functional>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
struct sg_dim3 { unsigned int x, y, z; };
// Grid-stride kernels run on the calling thread as one thread of one block; cooperative
// kernels (shared memory, __syncthreads) on one host thread per CUDA thread, one block
// after another (so a function-static __shared__ array is the block's shared memory).
static thread_local sg_dim3 threadIdx = {0, 0, 0};
static thread_local sg_dim3 blockIdx = {0, 0, 0};
static thread_local sg_dim3 blockDim = {1, 1, 1};
static thread_local sg_dim3 gridDim = {1, 1, 1};
inline float sg_half_to_float(unsigned short h) {
    _Float16 v; std::memcpy(&v, &h, 2); return (float)v;
}
inline unsigned short sg_float_to_half(float f) {
    _Float16 v = (_Float16)f; unsigned short h; std::memcpy(&h, &v, 2); return h;
}
// Cooperative kernels run as fibers on the calling thread (ucontext): one fiber per CUDA
// thread of the block, resumed round-robin in thread order. Every barrier (__syncthreads,
// and the warp-wide exchanges of the emulated mma.sync) yields to the scheduler, which
// resumes every fiber once per round; all threads of a block execute the same barriers in
// the same order (the kernels' control flow is block-uniform), so a round ends exactly at
// the next barrier. Deterministic, and no OS threads.
struct sg_emu_lane { unsigned a[4]; unsigned b[2]; };
struct sg_emu_block {
    std::vector<ucontext_t> fibers;
    ucontext_t scheduler;
    std::vector<std::unique_ptr<char[]>> stacks;
    std::vector<char> done;
    unsigned current = 0;
    std::function<void()> body;
    std::vector<sg_emu_lane> lanes;
};
static thread_local sg_emu_block* sg_emu_current = nullptr;
inline void sg_emu_yield() {
    sg_emu_block* b = sg_emu_current;
    swapcontext(&b->fibers[b->current], &b->scheduler);
}
inline void __syncthreads() { sg_emu_yield(); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline float sg_emu_value(int kind, unsigned short bits16, unsigned bits32) {
    if (kind == 0) return sg_half_to_float(bits16);
    unsigned u = kind == 1 ? ((unsigned)bits16 << 16) : bits32;
    float f; std::memcpy(&f, &u, 4); return f;
}
// mma.sync.m16n8k16 (kind 0: f16, 1: bf16) or m16n8k8 (kind 2: tf32), f32 accumulators:
// every lane publishes its fragments, then computes its own four outputs from the
// warp's A (16 x K) and B (K x 8), with the fragment layouts of the PTX ISA
// (g = lane / 4, t = lane % 4).
inline void sg_emu_mma(int kind, float* d, const unsigned* a, const unsigned* b) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    sg_emu_lane* lanes = sg_emu_current->lanes.data() + warp * 32;
    std::memcpy(lanes[lane].a, a, 16);
    std::memcpy(lanes[lane].b, b, 8);
    sg_emu_yield();
    const int kdim = kind == 2 ? 8 : 16;
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        const unsigned* ra = lanes[l].a;
        const unsigned* rb = lanes[l].b;
        if (kind == 2) {
            A[g][t] = sg_emu_value(2, 0, ra[0]);
            A[g + 8][t] = sg_emu_value(2, 0, ra[1]);
            A[g][t + 4] = sg_emu_value(2, 0, ra[2]);
            A[g + 8][t + 4] = sg_emu_value(2, 0, ra[3]);
            B[t][g] = sg_emu_value(2, 0, rb[0]);
            B[t + 4][g] = sg_emu_value(2, 0, rb[1]);
        } else {
            for (int h = 0; h < 2; ++h) {
                A[g][2 * t + h] = sg_emu_value(kind, (unsigned short)(ra[0] >> (16 * h)), 0);
                A[g + 8][2 * t + h] = sg_emu_value(kind, (unsigned short)(ra[1] >> (16 * h)), 0);
                A[g][2 * t + 8 + h] = sg_emu_value(kind, (unsigned short)(ra[2] >> (16 * h)), 0);
                A[g + 8][2 * t + 8 + h] =
                    sg_emu_value(kind, (unsigned short)(ra[3] >> (16 * h)), 0);
                B[2 * t + h][g] = sg_emu_value(kind, (unsigned short)(rb[0] >> (16 * h)), 0);
                B[2 * t + 8 + h][g] = sg_emu_value(kind, (unsigned short)(rb[1] >> (16 * h)), 0);
            }
        }
    }
    const int g = lane >> 2, t = lane & 3;
    for (int q = 0; q < 4; ++q) {
        const int row = g + (q >> 1) * 8, col = 2 * t + (q & 1);
        float sum = 0.0f;
        for (int k = 0; k < kdim; ++k) sum += A[row][k] * B[k][col];
        d[q] += sum;
    }
    sg_emu_yield();                  // no lane overwrites its fragments before all read
}
static std::mutex sg_emu_launch_lock;
inline void sg_emu_fiber_entry() {
    sg_emu_block* b = sg_emu_current;
    for (unsigned z = 0; z < gridDim.z; ++z)
        for (unsigned y = 0; y < gridDim.y; ++y)
            for (unsigned x = 0; x < gridDim.x; ++x) {
                blockIdx = {x, y, z};
                b->body();
                sg_emu_yield();      // the block ends together: its shared memory is reused
            }
    b->done[b->current] = 1;
}
template <auto F> struct sg_emu_launch;
template <typename... A, void (*F)(A...)> struct sg_emu_launch<F> {
    static void run(unsigned gx, unsigned gy, unsigned gz, unsigned bx, A... args) {
        std::lock_guard<std::mutex> guard(sg_emu_launch_lock);  // one block's shared memory
        const std::size_t stack = 256 * 1024;
        sg_emu_block block;
        block.body = [&]() { F(args...); };
        block.lanes.resize(((bx + 31) / 32) * 32);
        block.fibers.resize(bx);
        block.done.assign(bx, 0);
        sg_emu_block* previous = sg_emu_current;
        sg_emu_current = &block;
        blockDim = {bx, 1, 1};
        gridDim = {gx, gy, gz};
        for (unsigned t = 0; t < bx; ++t) {
            block.stacks.emplace_back(new char[stack]);
            getcontext(&block.fibers[t]);
            block.fibers[t].uc_stack.ss_sp = block.stacks[t].get();
            block.fibers[t].uc_stack.ss_size = stack;
            block.fibers[t].uc_link = &block.scheduler;
            makecontext(&block.fibers[t], sg_emu_fiber_entry, 0);
        }
        for (bool running = true; running;) {
            running = false;
            for (unsigned t = 0; t < bx; ++t) {
                if (block.done[t]) continue;
                running = true;
                block.current = t;
                threadIdx = {t, 0, 0};
                swapcontext(&block.scheduler, &block.fibers[t]);
            }
        }
        threadIdx = {0, 0, 0};
        blockIdx = {0, 0, 0};
        blockDim = {1, 1, 1};
        gridDim = {1, 1, 1};
        sg_emu_current = previous;
    }
};
"""

_SIGNATURES = r"""
template <typename T> struct sg_code;
#define SG_CODE(type, text) \
    template <> struct sg_code<type> { static std::string get() { return text; } };
SG_CODE(float, "f32") SG_CODE(double, "f64") SG_CODE(int, "i32") SG_CODE(long long, "i64")
SG_CODE(unsigned short, "u16") SG_CODE(unsigned char, "u8") SG_CODE(signed char, "i8")
SG_CODE(unsigned int, "u32") SG_CODE(bool, "b1")
#ifdef SG_HAS_BF16
SG_CODE(sg_bf16, "u16")
#endif
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


def compiler():
    """The host C++ compiler the emulator uses, or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and any((pathlib.Path(d) / name).exists()
                        for d in os.environ.get("PATH", "").split(os.pathsep)):
            return name
    return None


class EmulatedKernel:
    def __init__(self, name, address, signature, cooperative=False):
        self.name = name
        self._codes = [c for c in signature.split(",") if c]
        self._cooperative = cooperative
        launch = [ctypes.c_uint] * 4 if cooperative else []    # grid x, y, z, block x
        self._function = ctypes.CFUNCTYPE(None, *launch, *[
            ctypes.c_void_p if c.endswith("*") else _CTYPES[c] for c in self._codes])(address)

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        if len(args) != len(self._codes):
            raise TypeError(f"{self.name} takes {len(self._codes)} arguments; got {len(args)}")
        values = []
        for position, (arg, code) in enumerate(zip(args, self._codes)):
            where = f"{self.name} argument {position}"
            if code.endswith("*"):
                if not isinstance(arg, ndarray):
                    raise TypeError(f"{where} must be a device array ({code}); got "
                                    f"{type(arg).__name__}")
                arg = arg._a
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
        if self._cooperative:
            grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
            block = tuple(int(b) for b in block)
            if any(b != 1 for b in block[1:]) or not 1 <= block[0] <= 1024 or min(grid) < 1:
                raise ValueError(f"{self.name}: the emulator runs blocks of x threads only "
                                 f"(1-1024) on a non-empty grid; got grid {grid}, block {block}")
            self._function(*grid, block[0], *values)
            return
        self._function(*values)


class RawModule:
    """``cupy.RawModule(code=..., options=..., name_expressions=[...])`` on the host."""

    def __init__(self, code, options=(), name_expressions=(), **kwargs):
        self._names = list(name_expressions)
        # kernels with block-level cooperation run one host thread per CUDA thread
        self._cooperative = re.search(r"__syncthreads\s*\(", re.sub(r"//[^\n]*", "", code)) \
            is not None
        table = []
        for i, name in enumerate(self._names):
            target = f"&sg_emu_launch<&{name}>::run" if self._cooperative else f"&{name}"
            table.append(f'extern "C" void* sg_emu_address_{i}() {{ return (void*)({target}); }}')
            table.append(f'extern "C" const char* sg_emu_signature_{i}() {{ static std::string s'
                         f' = sg_signature(&{name}); return s.c_str(); }}')
        bf16 = "#define SG_HAS_BF16 1\n" if "struct sg_bf16" in code else ""
        text = (_PRELUDE + code + "\n" + bf16 + _SIGNATURES + "\n".join(table) + "\n")
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
                                                          signature().decode(),
                                                          self._cooperative)
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
                                     "-pthread", "-Wall", "-Werror",
                                     "-Wno-unused-function", "-Wno-unknown-pragmas",
                                     "-o", str(partial), str(source)],
                                    capture_output=True, text=True)
            source.unlink()
            if result.returncode:
                raise RuntimeError(f"host compile of a CUDA source failed:\n{result.stderr}")
            os.replace(partial, target)
        library = _libraries[digest] = ctypes.CDLL(str(target))
        return library


class Device:
    """``cupy.cuda.Device``: one emulated GPU, number 0."""

    #: the emulated GPU's compute capability, as CuPy spells it (sm_90: the fused
    #: tensor-core kernels apply)
    compute_capability = "90"

    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        if self.id != 0:
            raise RuntimeError(f"the emulator has one device (0); got {self.id}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def use(self):
        return self

    def synchronize(self):
        syncs.append("Device.synchronize")

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id} (emulated)>"


def _is_host_array(value):
    return isinstance(value, np.ndarray) and value.ndim > 0


def _unwrap(value, strict=True, where="a CuPy function"):
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, (list, tuple)):
        items = [_unwrap(v, strict, where) for v in value]
        return type(value)(items) if isinstance(value, tuple) else items
    if strict and _is_host_array(value):
        raise TypeError(f"Unsupported type <class 'numpy.ndarray'> in {where} (a NumPy array "
                        "passed where CuPy needs a device array: cupy.asarray it first)")
    return value


def _wrap(value):
    if isinstance(value, np.ndarray):
        return ndarray(value)
    if isinstance(value, np.generic):
        return ndarray(np.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


class ndarray:
    """A device array of the emulator (see the module docstring)."""

    __slots__ = ("_a",)
    __array_priority__ = 100

    def __init__(self, data):
        object.__setattr__(self, "_a", data)

    # -- the NumPy protocols: no implicit conversion, no mixing -------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use "
                        "`.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        args = _unwrap(inputs, where=f"numpy.{ufunc.__name__}")
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = _unwrap(out, where=f"numpy.{ufunc.__name__}(out=)")
        result = getattr(ufunc, method)(*args, **kwargs)
        if out is not None:
            return out[0] if isinstance(out, tuple) and len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types, args, kwargs):
        if func.__name__ not in MODULE_NAMES:
            raise TypeError(f"numpy.{func.__name__} has no CuPy implementation")
        where = f"numpy.{func.__name__}"
        result = func(*_unwrap(args, where=where), **{k: _unwrap(v, where=where)
                                                        for k, v in kwargs.items()})
        out = kwargs.get("out")
        return out if out is not None else _wrap(result)

    # -- attributes and methods: only what cupy.ndarray has -----------------------------
    def __getattr__(self, name):
        if name not in NDARRAY_NAMES:
            raise AttributeError(f"'cupy.ndarray' object has no attribute '{name}'")
        if name == "device":
            return Device(0)
        if name == "data":          # a MemoryPointer: tests of alignment read .ptr
            return types.SimpleNamespace(ptr=self._a.ctypes.data)
        if name in ("get", "item", "tolist"):
            syncs.append(f"ndarray.{name}")
            if name == "get":
                return lambda stream=None, order="C", out=None, blocking=True: np.array(
                    self._a, order=order)
            return getattr(self._a, name)
        value = getattr(self._a, name)
        if not callable(value):
            return _wrap(value) if isinstance(value, np.ndarray) else value
        if name in ("nonzero",):
            syncs.append(f"ndarray.{name}")

        def method(*args, **kwargs):
            where = f"cupy.ndarray.{name}"
            result = value(*_unwrap(args, where=where),
                           **{k: _unwrap(v, where=where) for k, v in kwargs.items()})
            if kwargs.get("out") is not None:
                return kwargs["out"]
            return _wrap(result)
        return method

    def __setattr__(self, name, value):
        if name == "shape":
            self._a.shape = value
            return
        raise AttributeError(f"cannot set attribute {name!r} of a cupy.ndarray")

    @property
    def shape(self):
        return self._a.shape

    @property
    def dtype(self):
        return self._a.dtype

    @property
    def ndim(self):
        return self._a.ndim

    @property
    def size(self):
        return self._a.size

    @property
    def T(self):
        return ndarray(self._a.T)

    # -- indexing ---------------------------------------------------------------------
    @staticmethod
    def _key(key):
        key = _unwrap(key, strict=False)
        parts = key if isinstance(key, tuple) else (key,)
        if any(isinstance(k, np.ndarray) and k.dtype == bool for k in parts):
            syncs.append("boolean mask indexing")
        return key

    def __getitem__(self, key):
        return _wrap(np.asarray(self._a[self._key(key)]))

    def __setitem__(self, key, value):
        self._a[self._key(key)] = _unwrap(value, where="cupy.ndarray.__setitem__")

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        for i in range(len(self._a)):
            yield self[i]

    # -- conversions to Python: each a synchronisation ---------------------------------
    def _scalar(self, kind):
        syncs.append(f"ndarray.__{kind.__name__}__")
        if self._a.size != 1:
            raise TypeError("only size-1 arrays can be converted to Python scalars")
        return kind(self._a.reshape(-1)[0])

    def __int__(self):
        return self._scalar(int)

    def __float__(self):
        return self._scalar(float)

    def __bool__(self):
        return self._scalar(bool)

    def __complex__(self):
        return self._scalar(complex)

    def __repr__(self):
        return repr(self._a).replace("array(", "array(", 1)

    __str__ = __repr__
    __hash__ = None

    def __copy__(self):
        return ndarray(self._a.copy())

    def __deepcopy__(self, memo):
        return ndarray(self._a.copy())

    def __reduce__(self):
        return (_from_host, (self._a.copy(),))


def _from_host(array):
    return ndarray(np.array(array, copy=True))


def _binary(ufunc, reflected=False):
    def method(self, other):
        if reflected:
            return self.__array_ufunc__(ufunc, "__call__", other, self)
        return self.__array_ufunc__(ufunc, "__call__", self, other)
    return method


def _inplace(ufunc):
    def method(self, other):
        self.__array_ufunc__(ufunc, "__call__", self, other, out=(self,))
        return self
    return method


for _name, _ufunc in [("add", np.add), ("sub", np.subtract), ("mul", np.multiply),
                      ("truediv", np.true_divide), ("floordiv", np.floor_divide),
                      ("mod", np.remainder), ("pow", np.power), ("matmul", np.matmul),
                      ("and", np.bitwise_and), ("or", np.bitwise_or), ("xor", np.bitwise_xor),
                      ("lshift", np.left_shift), ("rshift", np.right_shift)]:
    setattr(ndarray, f"__{_name}__", _binary(_ufunc))
    setattr(ndarray, f"__r{_name}__", _binary(_ufunc, reflected=True))
    setattr(ndarray, f"__i{_name}__", _inplace(_ufunc))
for _name, _ufunc in [("eq", np.equal), ("ne", np.not_equal), ("lt", np.less),
                      ("le", np.less_equal), ("gt", np.greater), ("ge", np.greater_equal)]:
    setattr(ndarray, f"__{_name}__", _binary(_ufunc))
for _name, _ufunc in [("neg", np.negative), ("pos", np.positive), ("abs", np.absolute),
                      ("invert", np.invert)]:
    setattr(ndarray, f"__{_name}__",
            (lambda u: lambda self: self.__array_ufunc__(u, "__call__", self))(_ufunc))
ndarray.__divmod__ = lambda self, other: self.__array_ufunc__(np.divmod, "__call__", self,
                                                              other)


# -- the module ---------------------------------------------------------------------------

_HOST_INPUT_OK = {"asarray", "array", "asanyarray", "asnumpy", "get_array_module",
                  "result_type", "iinfo", "finfo", "dtype", "issubdtype", "can_cast",
                  "promote_types", "isscalar"}
# (bincount: CuPy checks the ids' sign and reads their maximum to size the output)
_SIZE_FROM_DATA = {"flatnonzero", "nonzero", "argwhere", "unique", "bincount"}


def _asarray(a, dtype=None, order=None, *, blocking=False):
    if isinstance(a, ndarray):
        return ndarray(np.asarray(a._a, dtype=dtype, order=order))
    return ndarray(np.array(_unwrap(a, strict=False), dtype=dtype, order=order, copy=True))


def _array(a, dtype=None, copy=True, order="K", ndmin=0, **kwargs):
    data = a._a if isinstance(a, ndarray) else _unwrap(a, strict=False)
    return ndarray(np.array(data, dtype=dtype, copy=True if not isinstance(a, ndarray)
                            else copy, order=order, ndmin=ndmin))


def _asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if isinstance(a, ndarray):
        syncs.append("asnumpy")
        return np.array(a._a, order=order)
    return np.asarray(a, order=order)


def _function(name, function):
    def call(*args, **kwargs):
        strict = name not in _HOST_INPUT_OK
        where = f"cupy.{name}"
        if name in _SIZE_FROM_DATA or (name == "where" and len(args) + len(kwargs) == 1):
            syncs.append(name)
        if name in ("argsort", "sort"):
            kwargs["kind"] = "stable"
        result = function(*_unwrap(args, strict, where),
                          **{k: _unwrap(v, strict, where) for k, v in kwargs.items()})
        if kwargs.get("out") is not None:
            return kwargs["out"]
        return _wrap(result)
    call.__name__ = name
    return call


class _RandomState:
    """``cupy.random.RandomState``: device draws (NumPy's generator, same API subset)."""

    def __init__(self, seed=None):
        self._state = np.random.RandomState(None if seed is None else int(seed) % 2**32)

    def random_sample(self, size=None, dtype=float):
        return ndarray(np.asarray(self._state.random_sample(size)).astype(dtype))

    def standard_normal(self, size=None, dtype=float):
        return ndarray(np.asarray(self._state.standard_normal(size)).astype(dtype))


_RANDOM = types.SimpleNamespace(RandomState=_RandomState)


class _Runtime:
    @staticmethod
    def getDevice():
        return 0

    @staticmethod
    def getDeviceCount():
        return 1

    @staticmethod
    def getDeviceProperties(device):
        return {"name": b"host emulator", "totalGlobalMem": 0}

    @staticmethod
    def deviceSynchronize():
        syncs.append("deviceSynchronize")


class _Emulator(types.ModuleType):
    """CuPy's namespace on the host (see the module docstring)."""

    def __getattr__(self, name):
        if name not in MODULE_NAMES:
            raise AttributeError(f"module 'cupy' has no attribute '{name}'")
        if name == "random":
            return _RANDOM
        if name in ("linalg", "fft", "testing", "polynomial", "lib", "sparse"):
            raise AttributeError(f"the emulator provides no cupy.{name}")
        value = getattr(np, name)
        if isinstance(value, type) or not callable(value):
            return value            # dtypes, constants
        function = _function(name, value)
        setattr(self, name, function)
        return function


def module():
    """A fresh emulator module, to install as ``cupy``."""
    emulator = _Emulator("cupy")
    emulator.__version__ = "emulated"
    emulator.ndarray = ndarray
    emulator.asarray = _asarray
    emulator.array = _array
    emulator.asnumpy = _asnumpy
    emulator.RawModule = RawModule
    emulator.cuda = types.SimpleNamespace(Device=Device, runtime=_Runtime(),
                                          is_available=lambda: True)
    emulator.is_available = lambda: True
    emulator.get_array_module = lambda *arrays: (
        emulator if any(isinstance(a, ndarray) for a in arrays) else np)
    emulator.emulated = True
    return emulator


def available():
    """Whether the emulator can run here (a host C++ compiler is on PATH)."""
    return compiler() is not None and sys.platform != "win32"


class installed:
    """Context manager: the emulator as ``cupy`` (``sys.modules``) and as the array
    library of ``sparsegrid.cuda``; both restored on exit."""

    def __init__(self):
        self.module = module()

    def __enter__(self):
        from sparsegrid.cuda import _runtime
        self._previous_module = sys.modules.get("cupy")
        sys.modules["cupy"] = self.module
        self._previous_binding = _runtime.use(self.module)
        return self.module

    def __exit__(self, *exc):
        from sparsegrid.cuda import _runtime
        if self._previous_module is None:
            sys.modules.pop("cupy", None)
        else:
            sys.modules["cupy"] = self._previous_module
        _runtime.use(self._previous_binding)
        return False
