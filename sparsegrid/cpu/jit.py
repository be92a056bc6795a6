"""Optional compiled fast path for the CPU convolution (numba).

When numba imports, :func:`conv_forward`/:func:`conv_backward` in ``cpu/conv.py`` run on
kernels compiled by numba instead of NumPy's gather / GEMM / scatter; without numba (or with
``SPARSEGRID_JIT=0``, or after ``set_jit_enabled(False)``) everything runs as before.
``import sparsegrid`` never imports numba: this module imports it on first use.

Forward (and the feature gradient, which is the same kernel on the transposed rulebook with
the transposed weight) is output-stationary and fused: the rulebook's pairs are regrouped
once per rulebook into CSR form (``row_ptr``, input rows, offsets; within a row by increasing
offset) and, for each block of 128 output rows, the kernel accumulates ``bias + sum x[i] @
W[k]`` in vector registers, offset after offset, and writes each output row once. Output
channels are processed in tiles of a fixed width (64, 32, 16, 8 for float32 on AVX-512 CPUs;
see ``FORWARD_TILES``) whose loops are generated as straight-line code on explicit SIMD
vectors (``_jit_kernels.py``, written by :func:`generate_source`, using the operations of
``_simd.py``: 512-bit vectors on AVX-512, 256-bit ones elsewhere, see :func:`vector_bits`);
within a block, the rows that use the same offset are processed several at a time so each
weight vector feeds several rows. Every output row is summed in the same order (bias, then
its pairs by increasing offset, each over input channels in order, with fused multiply-adds)
whatever the block, the grouping, the vector width or the thread count: results are
bit-identical for any number of threads and for either vector width.

The weight gradient ``grad_w[k] = sum over pairs (i, o) of x[i]^T g[o]`` is compiled too
(:func:`weight_gradient`): it walks the transposed rulebook's plan (the feature gradient's,
CSR by input row), so a block of 256 consecutive input rows touches each ``x`` row once and
its neighbours' ``g`` rows while they are in cache, for all offsets at once (per-offset
sweeps over the whole of ``x`` and ``g``, as gathers + BLAS per offset do, are memory-bound
on the large scenes). Within a block the pairs are bucketed by offset; for each offset,
register tiles of ``grad_w[k]`` (on AVX-512, 6 input channels by 64 output channels for
float32, or 12 by 32, 16 by 16, 16 by 8; see ``WGRAD_TILES``) are loaded, updated with one
fused multiply-add per pair and value, and stored (generated vector code, like the
forward); output channels beyond a multiple of 8 use a generic loop. Each fixed unit of
8,192 input rows sums its pairs, in row order, into its own partial ``(K, Cin, Cout)``; the
partials are added in unit order. Without a plan, or above ``WGRAD_MAX_PRODUCT`` = 128 x
128 channels (where the AVX2 tiles stop beating BLAS), it gathers each offset's rows into
fixed chunks of pairs and multiplies them with single-threaded BLAS, chunks added in a
fixed order. Either way the bits never depend on the thread count.

Smaller compiled kernels: the submanifold rulebook walk (:func:`sparsegrid.cpu.rules`
``submanifold_rules``; the NumPy builder's arrays), max pooling (one pass over the
rulebook's pairs, offset by offset: the NumPy kernel's values and arg-maxes, and its
gradient summed in the same float64 order, so the same bits) and the batch-norm backward
pass (two fused passes over the rows, sums in float64; used by ``cpu/norm.py``).

Threads: rows are split into fixed units run on sparsegrid's own pool
(:func:`sparsegrid.cpu.threads.parallel_map`; the kernels release the GIL), so numba's
threading layer is never used and the thread count is ``sparsegrid.get_num_threads()``.

Compiled code is cached on disk (numba ``cache=True``: ``__pycache__`` next to the package,
else numba's user-wide cache dir, or ``NUMBA_CACHE_DIR``); when no cache location is writable
the kernels are compiled in memory on every run.
"""

from __future__ import annotations

import contextlib
import os
import threading

import numpy as np

from .threads import parallel_map

_state = {"enabled": None, "kernels": None, "error": None, "bits": None}
_lock = threading.Lock()

# Output rows per block inside a kernel, and rows per unit of parallel work (a multiple of
# the block). Fixed: neither changes any result bit, but fixed units keep the work split
# independent of the thread count.
BLOCK_ROWS = 128
UNIT_ROWS = 4096
# Pairs per partial product of the weight gradient (as conv._REDUCTION_CHUNK).
REDUCTION_CHUNK = 32768
# Weight gradient: input rows per block (pairs bucketed by offset) and per unit of work /
# partial sum, both fixed; the compiled kernel is used while Cin * Cout <= WGRAD_MAX_PRODUCT.
WGRAD_BLOCK_ROWS = 256
WGRAD_UNIT_ROWS = 8192
WGRAD_MAX_PRODUCT = 128 * 128
# Above this many kernel offsets the per-block offset table costs more than it saves.
MAX_OFFSETS = 4096

_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
SUPPORTED_DTYPES = (_F32, _F64)
# The generated kernels work on explicit SIMD vectors (``_simd.py``). Their register tiles
# are sized for the vector registers of the CPU: 512-bit vectors where it has AVX-512F
# (32 registers), else 256-bit ones in tiles that fit AVX2's 16 registers (tuned by
# compiling for ``NUMBA_CPU_NAME=haswell``: the 32-register tiles spilled and ran 1.3-1.9x
# slower there). Chosen by :func:`vector_bits`; the arithmetic, and so every result bit,
# is the same for both.
#
# Forward (and feature gradient): (tile width T in output channels, vector lanes L, output
# rows R that share each weight load), widest first; channels left over (fewer than 8) use
# the generic loop.
FORWARD_TILES = {
    (512, _F32): ((64, 16, 4), (32, 16, 6), (16, 16, 8), (8, 8, 8)),
    (512, _F64): ((32, 8, 4), (16, 8, 6), (8, 8, 8)),
    (256, _F32): ((32, 8, 2), (16, 8, 6), (8, 8, 8)),
    (256, _F64): ((16, 4, 2), (8, 4, 6)),
}
# Weight gradient: (register-tile width S in output channels, lanes L, input-channel rows
# per register tile, then the smaller row counts for the remainder). The kernel of width S
# serves every Cout that is a multiple of S (tile after tile); the first S dividing the
# channels (less their remainder modulo 8) is used.
WGRAD_TILES = {
    (512, _F32): ((64, 16, (6, 2)), (32, 16, (12, 4)), (16, 16, (16, 8)), (8, 8, (16, 8))),
    (512, _F64): ((32, 8, (6, 2)), (16, 8, (12, 4)), (8, 8, (16, 8))),
    (256, _F32): ((16, 8, (6, 2)), (8, 8, (12, 4))),
    (256, _F64): ((8, 4, (6, 2)),),
}


def _env_enabled():
    return os.environ.get("SPARSEGRID_JIT", "1").strip().lower() not in ("0", "false", "no",
                                                                         "off")


def set_jit_enabled(flag):
    """Use the numba kernels when numba is importable (True), never (False), or as the
    ``SPARSEGRID_JIT`` environment variable says (None, the default)."""
    if flag is not None and not isinstance(flag, bool):
        raise ValueError(f"flag must be True, False or None; got {flag!r}")
    _state["enabled"] = flag


def jit_enabled():
    """True when the compiled kernels will be used (numba importable and not disabled)."""
    flag = _state["enabled"]
    if flag is None:
        flag = _env_enabled()
    return bool(flag) and _kernels() is not None


def _kernels():
    """The compiled-kernel module, imported (with numba) on first use; None without numba."""
    if _state["kernels"] is None and _state["error"] is None:
        with _lock:
            if _state["kernels"] is None and _state["error"] is None:
                try:
                    from . import _jit_kernels
                except ImportError as error:  # numba missing or broken
                    _state["error"] = error
                else:
                    _state["kernels"] = _jit_kernels
    return _state["kernels"]


def _njit(fn):
    """numba.njit for the kernels: no GIL, fused multiply-adds, cached on disk if possible."""
    import numba

    options = dict(nogil=True, fastmath={"contract"})
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError:  # no writable cache location: compile in memory every run
        return numba.njit(**options)(fn)


@contextlib.contextmanager
def _vectorising():
    """Let LLVM's SLP vectoriser turn the generated straight-line tiles into vector code
    (numba leaves it off by default) while our kernels compile."""
    from numba.core import config

    with _lock:
        before = config.SLP_VECTORIZE
        config.SLP_VECTORIZE = 1
        try:
            yield
        finally:
            config.SLP_VECTORIZE = before


class JitPlan:
    """CSR form of a rulebook for the compiled kernels: the pairs of output row ``o`` are
    ``[row_ptr[o], row_ptr[o + 1])`` of ``in_rows`` / ``offsets``, by increasing offset."""

    __slots__ = ("row_ptr", "in_rows", "offsets", "n_offsets")

    def __init__(self, row_ptr, in_rows, offsets, n_offsets):
        self.row_ptr = row_ptr
        self.in_rows = in_rows
        self.offsets = offsets
        self.n_offsets = n_offsets

    @property
    def n_out(self):
        return len(self.row_ptr) - 1

    @property
    def nbytes(self):
        return self.row_ptr.nbytes + self.in_rows.nbytes + self.offsets.nbytes


def plan_supported(n_offsets):
    return jit_enabled() and n_offsets <= MAX_OFFSETS


def build_plan(in_idx, out_idx, offset_ptr, n_out):
    """:class:`JitPlan` of a rulebook (counting sort by output row, O(pairs))."""
    kernels = _kernels()
    in_idx = np.ascontiguousarray(in_idx, dtype=np.int32)
    out_idx = np.ascontiguousarray(out_idx, dtype=np.int32)
    offset_ptr = np.ascontiguousarray(offset_ptr, dtype=np.int64)
    n_offsets = len(offset_ptr) - 1
    with _vectorising():
        row_ptr, in_rows, offsets = kernels.build_csr(in_idx, out_idx, offset_ptr, int(n_out))
    return JitPlan(row_ptr, in_rows, offsets, n_offsets)


# LLVM CPU names with AVX-512F, for ``NUMBA_CPU_NAME`` (numba then compiles for that CPU's
# own features unless ``NUMBA_CPU_FEATURES`` is set).
_AVX512_CPUS = frozenset({
    "knl", "knm", "skylake-avx512", "skx", "cascadelake", "cooperlake", "cannonlake",
    "icelake-client", "icelake-server", "rocketlake", "tigerlake", "sapphirerapids",
    "emeraldrapids", "graniterapids", "graniterapids-d", "diamondrapids", "znver4",
    "znver5", "x86-64-v4"})


def vector_bits():
    """Width in bits (512 or 256) of the vectors the kernels' register tiles are sized
    for: 512 where the CPU numba compiles for has AVX-512F, else 256. That CPU is described
    by ``NUMBA_CPU_FEATURES`` when set, else named by ``NUMBA_CPU_NAME`` (``generic`` or
    ``haswell`` for a portable cache: 256), else the host. Only speed depends on it, never
    a result bit."""
    if _state["bits"] is None:
        _state["bits"] = _bits_for(*_numba_target())
    return _state["bits"]


def _numba_target():
    """(features, cpu name) numba compiles for: either may be None (not set)."""
    try:
        from numba.core import config
        return config.CPU_FEATURES, config.CPU_NAME
    except Exception:  # pragma: no cover - numba's config unavailable
        return None, None


def _bits_for(features, cpu_name):
    if features is None and cpu_name not in (None, "", "host"):
        return 512 if cpu_name in _AVX512_CPUS else 256
    if features is None:
        try:
            import llvmlite.binding as llvm
            features = llvm.get_host_cpu_features().flatten()
        except Exception:  # pragma: no cover - feature query unavailable
            features = ""
    return 512 if "+avx512f" in features.split(",") else 256


def forward_tiles(cout, dtype, bits=None):
    """``(start, width, lanes, rows)`` of the output-channel tiles of the forward kernel:
    the widest generated tiles first, then the rest (``lanes`` None: generic loop)."""
    table = FORWARD_TILES[(vector_bits() if bits is None else bits, np.dtype(dtype))]
    tiles, start = [], 0
    for width, lanes, rows in table:
        while cout - start >= width:
            tiles.append((start, width, lanes, rows))
            start += width
    if start < cout:
        tiles.append((start, cout - start, None, None))
    return tiles


def usable(features, weight, plan):
    return (isinstance(plan, JitPlan) and weight.ndim == 3
            and features.dtype in SUPPORTED_DTYPES and weight.dtype == features.dtype
            and jit_enabled())


def forward(features, weight, plan, bias=None, bits=None):
    """``out[o] = bias + sum over o's pairs (i, k) of features[i] @ weight[k]``.

    ``bits`` picks the register tiles (512 or 256; default :func:`vector_bits`)."""
    kernels = _kernels()
    dtype = features.dtype
    n_out, cout = plan.n_out, weight.shape[2]
    n_k, cin = weight.shape[0], weight.shape[1]
    out = np.empty((n_out, cout), dtype)
    if n_out == 0 or cout == 0:
        return out
    x = np.ascontiguousarray(features)
    b = np.zeros(cout, dtype) if bias is None else np.asarray(bias, dtype)
    calls = []
    for start, width, lanes, rows in forward_tiles(cout, dtype, bits):
        w = np.ascontiguousarray(weight[:, :, start:start + width])
        bt = np.ascontiguousarray(b[start:start + width])
        if lanes is None:
            calls.append((kernels.conv_rows_any, (w, bt), start))
        else:
            kernel = getattr(kernels, f"conv_t{width}_l{lanes}_r{rows}")
            calls.append((kernel, (w.reshape(n_k * cin, width), bt.reshape(1, width), n_k),
                          start))
    with _vectorising():  # compile here (main thread), run below on the pool
        for kernel, operands, start in calls:
            kernel(x, *operands, plan.row_ptr, plan.in_rows, plan.offsets, out, start, 0, 0)
    units = list(range(0, n_out, UNIT_ROWS))

    def run(first):
        last = min(n_out, first + UNIT_ROWS)
        for kernel, operands, start in calls:
            kernel(x, *operands, plan.row_ptr, plan.in_rows, plan.offsets, out, start, first,
                   last)

    sizes = [int(plan.row_ptr[min(n_out, u + UNIT_ROWS)] - plan.row_ptr[u]) * x.shape[1] * cout
             // 64 + 1 for u in units]
    parallel_map(run, units, sizes)
    return out


def weight_gradient(features, grad_out, in_idx, out_idx, offset_ptr, identity_offset,
                    plan=None, method=None, bits=None):
    """``grad_weight[k] = sum over offset k's pairs (i, o) of features[i]^T grad_out[o]``.

    ``plan`` is the transposed rulebook's :class:`JitPlan` (CSR by input row). With it,
    and ``Cin * Cout <= WGRAD_MAX_PRODUCT``, the compiled kernel runs (``"compiled"``), else
    gathers + BLAS per offset (``"blas"``); ``method`` forces one (tests). Both sum in a
    fixed order: the bits never depend on the thread count. ``bits`` picks the compiled
    kernel's register tiles (512 or 256; default :func:`vector_bits`).
    """
    if method is None:
        method = wgrad_method(features.shape[1], grad_out.shape[1], plan)
    if method == "compiled":
        if not isinstance(plan, JitPlan):
            raise ValueError("the compiled weight gradient needs the transposed JitPlan")
        return _weight_gradient_compiled(features, grad_out, plan, bits)
    if method != "blas":
        raise ValueError(f"method must be 'compiled', 'blas' or None; got {method!r}")
    return _weight_gradient_blas(features, grad_out, in_idx, out_idx, offset_ptr,
                                 identity_offset)


def wgrad_method(cin, cout, plan):
    """Which weight-gradient kernel :func:`weight_gradient` runs: ``"compiled"`` with a
    transposed plan and ``cin * cout <= WGRAD_MAX_PRODUCT`` (measured on the benchmark
    scenes: 0.25-0.66x the time of gathers + BLAS up to 128 x 128 channels with 512-bit
    tiles, 0.85-0.98x at 256 x 256; 0.6-1.03x up to 128 x 128 with AVX2 tiles), else
    ``"blas"``. Depends on the shapes only, so the choice (and the bits) is the same for
    any thread count and vector width."""
    if isinstance(plan, JitPlan) and cin * cout <= WGRAD_MAX_PRODUCT:
        return "compiled"
    return "blas"


def _wgrad_split(cout, dtype, bits=None):
    """``(width, name)``: the first ``width`` output channels run on the generated kernel
    ``name`` (None: none); the rest, fewer than 8, on the generic one."""
    width = cout - cout % 8
    table = WGRAD_TILES.get((vector_bits() if bits is None else bits, np.dtype(dtype)), ())
    for cols, lanes, row_counts in table:
        if width and width % cols == 0:
            return width, _wgrad_name(cols, lanes, row_counts)
    return 0, None


def _weight_gradient_compiled(features, grad_out, plan, bits=None):
    kernels = _kernels()
    x = np.ascontiguousarray(features)
    g = np.ascontiguousarray(grad_out)
    n_rows, cin = x.shape
    cout, n_k = g.shape[1], plan.n_offsets
    if plan.n_out != n_rows:
        raise ValueError(f"plan has {plan.n_out} rows, features {n_rows}")
    grad = np.zeros((n_k, cin, cout), x.dtype)
    if n_rows == 0 or cin == 0 or cout == 0 or n_k == 0:
        return grad
    width, name = _wgrad_split(cout, x.dtype, bits)
    calls = []  # (kernel, g columns, accumulator shape, first output channel, width)
    if width:
        main = g if width == cout else np.ascontiguousarray(g[:, :width])
        calls.append((getattr(kernels, name), main, (n_k * cin, width),
                      0, width))
    if width < cout:
        calls.append((kernels.wgrad_rows_any, np.ascontiguousarray(g[:, width:]),
                      (n_k, cin, cout - width), width, cout - width))

    def run_range(first, last):
        parts = []
        for kernel, g_part, shape, _, _ in calls:
            acc = np.zeros(shape, x.dtype)
            if len(shape) == 2:  # generated: accumulator rows k * cin + c
                kernel(x, g_part, plan.row_ptr, plan.in_rows, plan.offsets, acc, n_k, first,
                       last)
            else:
                kernel(x, g_part, plan.row_ptr, plan.in_rows, plan.offsets, acc, first, last)
            parts.append(acc.reshape(n_k, cin, -1))
        return parts

    with _vectorising():  # compile here (main thread), run below on the pool
        run_range(0, 0)
    units = list(range(0, n_rows, WGRAD_UNIT_ROWS))
    sizes = [int(plan.row_ptr[min(n_rows, u + WGRAD_UNIT_ROWS)] - plan.row_ptr[u]) * cin * cout
             // 64 + 1 for u in units]
    results = parallel_map(lambda u: run_range(u, min(n_rows, u + WGRAD_UNIT_ROWS)), units,
                           sizes)
    for parts in results:  # added in unit order
        for (_, _, _, start, size), acc in zip(calls, parts):
            if size == cout:
                grad += acc
            else:
                grad[:, :, start:start + size] += acc
    return grad


def _weight_gradient_blas(features, grad_out, in_idx, out_idx, offset_ptr, identity_offset):
    """Gathers with compiled loops into fixed chunks of pairs, single-threaded BLAS per
    chunk, chunks added in order."""
    kernels = _kernels()
    x = np.ascontiguousarray(features)
    g = np.ascontiguousarray(grad_out)
    n_offsets = len(offset_ptr) - 1
    cin, cout = x.shape[1], g.shape[1]
    grad = np.zeros((n_offsets, cin, cout), x.dtype)
    units = []
    for k in range(n_offsets):
        start, stop = int(offset_ptr[k]), int(offset_ptr[k + 1])
        for s in range(start, stop, REDUCTION_CHUNK):
            units.append((k, s, min(stop, s + REDUCTION_CHUNK)))
    with _vectorising():
        kernels.gather_rows(x, in_idx, 0, 0, np.empty((0, cin), x.dtype))

    def run(unit):
        k, s, e = unit
        if k == identity_offset:
            # (r, r) pairs in row order: no gather needed
            first = int(in_idx[s])
            return x[first:first + e - s].T @ g[first:first + e - s]
        xs = np.empty((e - s, cin), x.dtype)
        gs = np.empty((e - s, cout), x.dtype)
        kernels.gather_rows(x, in_idx, s, e, xs)
        kernels.gather_rows(g, out_idx, s, e, gs)
        return xs.T @ gs

    parts = parallel_map(run, units, [(e - s) * cin * cout // 64 + 1 for _, s, e in units])
    for (k, _, _), part in zip(units, parts):
        grad[k] += part
    return grad


# --- code generation -------------------------------------------------------------------

_HEADER = '''"""numba kernels of sparsegrid.cpu.jit (generated by sparsegrid.cpu.jit.generate_source;
do not edit: change the generator and regenerate, a test checks they agree)."""

import numpy as np

from ._simd import fma, load4, load8, load16, splat4, splat8, splat16, store4, store8, store16
from .jit import _njit

BLOCK_ROWS = {block}
WGRAD_BLOCK_ROWS = {wblock}


@_njit
def build_csr(in_idx, out_idx, offset_ptr, n_out):
    """Pairs regrouped by output row (counting sort; within a row by increasing offset)."""
    n_pairs = len(in_idx)
    row_ptr = np.zeros(n_out + 1, np.int64)
    for p in range(n_pairs):
        row_ptr[out_idx[p] + 1] += 1
    for o in range(n_out):
        row_ptr[o + 1] += row_ptr[o]
    fill = row_ptr[:-1].copy()
    in_rows = np.empty(n_pairs, np.int32)
    offsets = np.empty(n_pairs, np.int16)
    for k in range(len(offset_ptr) - 1):
        for p in range(offset_ptr[k], offset_ptr[k + 1]):
            o = out_idx[p]
            q = fill[o]
            in_rows[q] = in_idx[p]
            offsets[q] = k
            fill[o] = q + 1
    return row_ptr, in_rows, offsets


@_njit
def max_pool_pairs(x, in_idx, out_idx, offset_ptr, out, argmax):
    """For each pair in rulebook order (by offset): where ``x[i, c] > out[o, c]``, take it
    and record ``i`` in ``argmax[o, c]``. Each offset's outputs are distinct, so this is
    the NumPy kernel's offset-by-offset result exactly (strict >: ties keep the earliest
    offset; NaN never wins)."""
    channels = x.shape[1]
    for p in range(offset_ptr[0], offset_ptr[len(offset_ptr) - 1]):
        i = in_idx[p]
        o = out_idx[p]
        for c in range(channels):
            v = x[i, c]
            if v > out[o, c]:
                out[o, c] = v
                argmax[o, c] = i


@_njit
def max_pool_grad(g, argmax, total):
    """``total[argmax[o, c], c] += g[o, c]`` in (o, c) order (float64 ``total``, as the NumPy
    kernel's bincount); cells without an arg-max (-1) send nothing."""
    n_out, channels = g.shape
    for o in range(n_out):
        for c in range(channels):
            a = argmax[o, c]
            if a >= 0:
                total[a, c] += g[o, c]


@_njit
def batch_norm_grad(g, x, ref, leak, k, invstd, mean, n_rows, gx):
    """Batch-norm backward in two passes over the rows: the per-channel sums of the
    activation-masked gradient ``gg`` (``g`` where ``ref > 0``, else ``leak * g``; pass
    ``leak = 1`` for no activation) and of ``gg * x``, in float64 and row order; then
    ``gx = k * (gg - sum(gg) / n - xhat * mean(gg * xhat))`` with ``xhat = (x - mean) *
    invstd`` folded into per-channel coefficients, or ``gx = k * gg`` when ``n_rows`` is 0
    (running statistics: mean and invstd are constants). Returns (sum gg, sum gg * x)."""
    n, channels = g.shape
    sum_g = np.zeros(channels, np.float64)
    sum_gx = np.zeros(channels, np.float64)
    for r in range(n):
        for c in range(channels):
            v = g[r, c] if ref[r, c] > 0 else g[r, c] * leak
            sum_g[c] += v
            sum_gx[c] += v * x[r, c]
    coef_x = np.zeros(channels, np.float64)
    const = np.zeros(channels, np.float64)
    if n_rows > 0:
        for c in range(channels):
            m2 = invstd[c] * (sum_gx[c] - mean[c] * sum_g[c]) / n_rows
            coef_x[c] = -k[c] * invstd[c] * m2
            const[c] = k[c] * (mean[c] * invstd[c] * m2 - sum_g[c] / n_rows)
    for r in range(n):
        for c in range(channels):
            v = g[r, c] if ref[r, c] > 0 else g[r, c] * leak
            if n_rows > 0:
                gx[r, c] = v * k[c] + x[r, c] * coef_x[c] + const[c]
            else:
                gx[r, c] = v * k[c]
    return sum_g, sum_gx


@_njit
def submanifold_walk(keys, skeys, rows, first, f_last, symmetric):
    """Submanifold pairs by merge walks over sorted unique keys: the pairs of the NumPy
    builder, in its order. Column c of the filter holds offsets c * f_last + j, whose
    packed deltas are first[c] + j; as keys[i] + first[c] increases with i, its lower
    bound in skeys (keys + a sentinel) only moves forward, and within the column key + j
    sits at the previous position, plus one if the previous key was found. With
    ``symmetric`` (odd filters) only the columns up to the centre are walked: every other
    offset k gets the pairs of K - 1 - k swapped, and the centre is the identity. The walk
    records, per site and column, the lower bound and a bit per found offset; the pairs are
    then counted and written from those (f_last <= 32; larger filters use NumPy)."""
    n = len(keys)
    n_cols = len(first)
    k_total = n_cols * f_last
    centre = k_total // 2
    last_col = (n_cols - 1) // 2 if symmetric else n_cols - 1
    base = np.empty((last_col + 1, n), np.int64)
    found = np.zeros((last_col + 1, n), np.uint32)
    counts = np.zeros(k_total, np.int64)
    for c in range(last_col + 1):
        j0 = f_last // 2 + 1 if symmetric and c == last_col else 0
        p = 0
        for i in range(n):
            q = keys[i] + first[c]
            while skeys[p] < q:
                p += 1
            base[c, i] = p
            pos = p
            bits = 0
            for j in range(f_last):
                if skeys[pos] == q + j:
                    pos += 1
                    bits |= 1 << j
                    if j >= j0:
                        counts[c * f_last + j] += 1
            found[c, i] = bits
    if symmetric:
        counts[centre] = n
        for k in range(k_total):
            col = k // f_last
            if col > last_col or (col == last_col and k < centre):
                counts[k] = counts[k_total - 1 - k]
    offset_ptr = np.zeros(k_total + 1, np.int64)
    for k in range(k_total):
        offset_ptr[k + 1] = offset_ptr[k] + counts[k]
    in_idx = np.empty(offset_ptr[k_total], np.int32)
    out_idx = np.empty(offset_ptr[k_total], np.int32)
    cursor = offset_ptr[:-1].copy()
    for c in range(last_col + 1):
        j0 = f_last // 2 + 1 if symmetric and c == last_col else 0
        for i in range(n):
            bits = found[c, i]
            if bits:
                pos = base[c, i]
                for j in range(f_last):
                    if bits & (1 << j):
                        if j >= j0:
                            k = c * f_last + j
                            t = cursor[k]
                            in_idx[t] = rows[pos]
                            out_idx[t] = rows[i]
                            cursor[k] = t + 1
                        pos += 1
    if symmetric:
        start = offset_ptr[centre]
        for i in range(n):
            in_idx[start + i] = i
            out_idx[start + i] = i
        for k in range(k_total):
            col = k // f_last
            if col > last_col or (col == last_col and k < centre):
                a = offset_ptr[k]
                b = offset_ptr[k_total - 1 - k]
                for t in range(counts[k]):
                    in_idx[a + t] = out_idx[b + t]
                    out_idx[a + t] = in_idx[b + t]
    return in_idx, out_idx, offset_ptr


@_njit
def gather_rows(src, idx, start, stop, out):
    """out[p] = src[idx[start + p]] for p < stop - start."""
    c = src.shape[1]
    for p in range(stop - start):
        i = idx[start + p]
        for j in range(c):
            out[p, j] = src[i, j]


@_njit
def conv_rows_any(x, w, b, row_ptr, in_rows, offsets, out, j0, o_start, o_stop):
    """out[o, j0:j0+T] = b + sum over o's pairs of x[i] @ w[k] (any tile width T)."""
    cin = x.shape[1]
    width = w.shape[2]
    acc = np.empty(width, out.dtype)
    for o in range(o_start, o_stop):
        for j in range(width):
            acc[j] = b[j]
        for q in range(row_ptr[o], row_ptr[o + 1]):
            i = in_rows[q]
            k = offsets[q]
            for c in range(cin):
                xv = x[i, c]
                for j in range(width):
                    acc[j] += xv * w[k, c, j]
        for j in range(width):
            out[o, j0 + j] = acc[j]


@_njit
def wgrad_rows_any(x, g, row_ptr, nbr, offsets, acc, r_start, r_stop):
    """acc[k] += x[r]^T g[o] over the pairs (o, k) of rows r_start <= r < r_stop (any
    width): pairs in row order, within a row by increasing offset."""
    cin = x.shape[1]
    width = g.shape[1]
    for r in range(r_start, r_stop):
        for q in range(row_ptr[r], row_ptr[r + 1]):
            o = nbr[q]
            k = offsets[q]
            for c in range(cin):
                xv = x[r, c]
                for j in range(width):
                    acc[k, c, j] += xv * g[o, j]
'''

_TILE = '''

@_njit
def {name}(x, w, b, n_k, row_ptr, in_rows, offsets, out, j0, o_start, o_stop):
    """out[o, j0:j0+{T}] = b + sum over o's pairs (i, k) of x[i] @ w[k * cin:(k + 1) * cin]
    (w: (K * Cin, {T}), b: (1, {T})), in vectors of {L} lanes.

    Per block of output rows, the pairs are bucketed by offset; the rows of one offset are
    taken {R} at a time (each weight vector feeds {R} accumulators). Each row's sum runs in
    the same order whatever the grouping: bias, then its pairs by increasing offset, each
    over the input channels in order, one fused multiply-add per term.
    """
    cin = x.shape[1]
    most = 0
    for r0 in range(o_start, o_stop, BLOCK_ROWS):
        r1 = min(o_stop, r0 + BLOCK_ROWS)
        most = max(most, row_ptr[r1] - row_ptr[r0])
    rows = np.empty(most, np.int64)
    ins = np.empty(most, np.int64)
    ends = np.empty(n_k + 1, np.int64)
    acc = np.empty((BLOCK_ROWS, {T}), out.dtype)
    for r0 in range(o_start, o_stop, BLOCK_ROWS):
        nb = min(o_stop, r0 + BLOCK_ROWS) - r0
        p0 = row_ptr[r0]
        for k in range(n_k + 1):
            ends[k] = 0
        for q in range(p0, row_ptr[r0 + nb]):
            ends[offsets[q] + 1] += 1
        for k in range(n_k):
            ends[k + 1] += ends[k]
        for r in range(nb):
{bias}
            for q in range(row_ptr[r0 + r], row_ptr[r0 + r + 1]):
                k = offsets[q]
                pos = ends[k]
                rows[pos] = r
                ins[pos] = in_rows[q]
                ends[k] = pos + 1
        t = 0
        for k in range(n_k):
            stop = ends[k]
            kc = k * cin
            while t + {R} <= stop:
{multi}
                t += {R}
            while t < stop:
{single}
                t += 1
        for r in range(nb):
{copy}
'''


_WGRAD = '''

@_njit
def {name}(x, g, row_ptr, nbr, offsets, acc, n_k, r_start, r_stop):
    """acc[k * cin + c] += x[r, c] * g[o] over the pairs (o, k) of rows r_start <= r <
    r_stop; g (n, W) and acc (K * Cin, W) with W a multiple of {S}, in vectors of {L} lanes.

    Per block of rows the pairs are bucketed by offset (row order kept); for each offset,
    register tiles of acc ({rows} input channels by {S} output channels; for each group of
    input channels, tile after tile) are loaded, updated pair after pair, and stored. Every
    acc value sums its pairs in row order whatever the tiling, one fused multiply-add each.
    """
    cin = x.shape[1]
    n_tiles = g.shape[1] // {S}
    most = 0
    for r0 in range(r_start, r_stop, WGRAD_BLOCK_ROWS):
        r1 = min(r_stop, r0 + WGRAD_BLOCK_ROWS)
        most = max(most, row_ptr[r1] - row_ptr[r0])
    xr = np.empty(most, np.int64)
    gr = np.empty(most, np.int64)
    ends = np.empty(n_k + 1, np.int64)
    for r0 in range(r_start, r_stop, WGRAD_BLOCK_ROWS):
        r1 = min(r_stop, r0 + WGRAD_BLOCK_ROWS)
        for k in range(n_k + 1):
            ends[k] = 0
        for q in range(row_ptr[r0], row_ptr[r1]):
            ends[offsets[q] + 1] += 1
        for k in range(n_k):
            ends[k + 1] += ends[k]
        for r in range(r0, r1):
            for q in range(row_ptr[r], row_ptr[r + 1]):
                k = offsets[q]
                pos = ends[k]
                xr[pos] = r
                gr[pos] = nbr[q]
                ends[k] = pos + 1
        t0 = 0
        for k in range(n_k):
            t1 = ends[k]
            if t1 > t0:
                kc = k * cin
                c0 = 0
{body}
            t0 = t1
'''


def _forward_name(width, lanes, rows):
    return f"conv_t{width}_l{lanes}_r{rows}"


def _wgrad_name(cols, lanes, row_counts):
    return f"wgrad_s{cols}_l{lanes}_r{row_counts[0]}"


def _wgrad_block(rows, cols, lanes, indent):
    """One register tile: acc[kc + c0:kc + c0 + rows, j:j + cols] over pairs t0 <= t < t1."""
    pad = " " * indent
    vecs = range(cols // lanes)
    lines = [f"{pad}j = jt * {cols}"]
    for u in range(rows):
        lines += [f"{pad}a{u}_{v} = load{lanes}(acc, kc + c0 + {u}, j + {v * lanes})" for v in vecs]
    lines.append(f"{pad}for t in range(t0, t1):")
    lines.append(f"{pad}    i = xr[t]")
    lines.append(f"{pad}    o = gr[t]")
    lines += [f"{pad}    g{v} = load{lanes}(g, o, j + {v * lanes})" for v in vecs]
    for u in range(rows):
        lines.append(f"{pad}    x{u} = splat{lanes}(x[i, c0 + {u}])")
        lines += [f"{pad}    a{u}_{v} = fma(x{u}, g{v}, a{u}_{v})" for v in vecs]
    for u in range(rows):
        lines += [f"{pad}store{lanes}(acc, kc + c0 + {u}, j + {v * lanes}, a{u}_{v})" for v in vecs]
    return "\n".join(lines)


def _wgrad_body(cols, lanes, row_counts, indent):
    steps = []
    for rows in tuple(row_counts) + ((1,) if 1 not in row_counts else ()):
        steps.append(f"{' ' * indent}while c0 + {rows} <= cin:\n"
                     f"{' ' * (indent + 4)}for jt in range(n_tiles):\n"
                     f"{_wgrad_block(rows, cols, lanes, indent + 8)}\n"
                     f"{' ' * (indent + 4)}c0 += {rows}")
    return "\n".join(steps)


def _rows_block(rows, width, lanes, indent):
    """``rows`` output rows of one offset: registers a{u}_{v} += x[i{u}, c] * w[kc + c]."""
    pad = " " * indent
    vecs = range(width // lanes)
    lines = []
    for u in range(rows):
        lines.append(f"{pad}s{u} = rows[t + {u}]")
        lines.append(f"{pad}i{u} = ins[t + {u}]")
        lines += [f"{pad}a{u}_{v} = load{lanes}(acc, s{u}, {v * lanes})" for v in vecs]
    lines.append(f"{pad}for c in range(cin):")
    lines += [f"{pad}    w{v} = load{lanes}(w, kc + c, {v * lanes})" for v in vecs]
    for u in range(rows):
        lines.append(f"{pad}    x{u} = splat{lanes}(x[i{u}, c])")
        lines += [f"{pad}    a{u}_{v} = fma(x{u}, w{v}, a{u}_{v})" for v in vecs]
    for u in range(rows):
        lines += [f"{pad}store{lanes}(acc, s{u}, {v * lanes}, a{u}_{v})" for v in vecs]
    return "\n".join(lines)


def generate_source():
    """Source of ``_jit_kernels.py``: the fixed kernels, then one forward and one
    weight-gradient kernel per distinct tile of ``FORWARD_TILES`` / ``WGRAD_TILES``."""
    src = _HEADER.format(block=BLOCK_ROWS, wblock=WGRAD_BLOCK_ROWS)
    forward = sorted({t for tiles in FORWARD_TILES.values() for t in tiles}, reverse=True)
    for width, lanes, rows in forward:
        vecs = range(width // lanes)
        bias = "\n".join(f"{' ' * 12}store{lanes}(acc, r, {v * lanes}, "
                         f"load{lanes}(b, 0, {v * lanes}))" for v in vecs)
        copy = "\n".join(f"{' ' * 12}store{lanes}(out, r0 + r, j0 + {v * lanes}, "
                         f"load{lanes}(acc, r, {v * lanes}))" for v in vecs)
        src += _TILE.format(name=_forward_name(width, lanes, rows), T=width, L=lanes, R=rows,
                            bias=bias, copy=copy,
                            multi=_rows_block(rows, width, lanes, 16),
                            single=_rows_block(1, width, lanes, 16))
    wgrad = sorted({t for tiles in WGRAD_TILES.values() for t in tiles}, reverse=True)
    for cols, lanes, row_counts in wgrad:
        src += _WGRAD.format(name=_wgrad_name(cols, lanes, row_counts), S=cols, L=lanes,
                             rows=row_counts[0],
                             body=_wgrad_body(cols, lanes, row_counts, 16))
    return src


def _write_source():  # pragma: no cover - development helper
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_jit_kernels.py")
    with open(path, "w") as handle:
        handle.write(generate_source())
    return path


if __name__ == "__main__":  # pragma: no cover
    print(_write_source())
