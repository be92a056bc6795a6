"""Optional compiled fast path for the CPU convolution (numba).

When numba imports, :func:`conv_forward`/:func:`conv_backward` in ``cpu/conv.py`` run on
kernels compiled by numba instead of NumPy's gather / GEMM / scatter; without numba (or with
``SPARSEGRID_JIT=0``, or after ``set_jit_enabled(False)``) everything runs as before.
``import sparsegrid`` never imports numba: this module imports it on first use.

Forward (and the feature gradient, which is the same kernel on the transposed rulebook with
the transposed weight) is output-stationary and fused: the rulebook's pairs are regrouped
once per rulebook into CSR form (``row_ptr``, input rows, offsets; within a row by increasing
offset) and, for each block of 128 output rows, the kernel accumulates ``bias + sum x[i] @
W[k]`` in registers, offset after offset, and writes each output row once. Output channels
are processed in tiles of a fixed width (64, 32, 16, 8 for float32; 32, 16, 8 for float64)
whose loops are generated as straight-line code (``_jit_kernels.py``, written by
:func:`generate_source`) so that LLVM keeps the accumulators in vector registers; within a
block, the rows that use the same offset are processed two or four at a time so each weight
load feeds several rows. Every output row is summed in the same order (bias, then its pairs
by increasing offset, each over input channels in order, with fused multiply-adds) whatever
the block, the grouping or the thread count: results are bit-identical for any number of
threads.

The weight gradient gathers each offset's rows with compiled loops into contiguous buffers
of a fixed number of pairs and multiplies them with single-threaded BLAS; partial products
are added in a fixed order (as the NumPy path does), so it is deterministic too.

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

_state = {"enabled": None, "kernels": None, "error": None}
_lock = threading.Lock()

# Output rows per block inside a kernel, and rows per unit of parallel work (a multiple of
# the block). Fixed: neither changes any result bit, but fixed units keep the work split
# independent of the thread count.
BLOCK_ROWS = 128
UNIT_ROWS = 4096
# Pairs per partial product of the weight gradient (as conv._REDUCTION_CHUNK).
REDUCTION_CHUNK = 32768
# Above this many kernel offsets the per-block offset table costs more than it saves.
MAX_OFFSETS = 4096

# Channel tile widths with generated kernels, and rows processed together for each.
TILES = {np.dtype(np.float32): (64, 32, 16, 8), np.dtype(np.float64): (32, 16, 8)}
ROWS_TOGETHER = {64: 2, 32: 4, 16: 4, 8: 4}
SUPPORTED_DTYPES = tuple(TILES)


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


def _tiles(cout, dtype):
    """(start, width) of the channel tiles: widest generated tiles first, then the rest."""
    tiles, start = [], 0
    for width in TILES[dtype]:
        while cout - start >= width:
            tiles.append((start, width))
            start += width
    if start < cout:
        tiles.append((start, cout - start))
    return tiles


def usable(features, weight, plan):
    return (isinstance(plan, JitPlan) and weight.ndim == 3 and features.dtype in TILES
            and weight.dtype == features.dtype and jit_enabled())


def forward(features, weight, plan, bias=None):
    """``out[o] = bias + sum over o's pairs (i, k) of features[i] @ weight[k]``."""
    kernels = _kernels()
    dtype = features.dtype
    n_out, cout = plan.n_out, weight.shape[2]
    out = np.empty((n_out, cout), dtype)
    if n_out == 0 or cout == 0:
        return out
    x = np.ascontiguousarray(features)
    b = np.zeros(cout, dtype) if bias is None else np.asarray(bias, dtype)
    calls = []
    for start, width in _tiles(cout, dtype):
        w = np.ascontiguousarray(weight[:, :, start:start + width])
        bt = np.ascontiguousarray(b[start:start + width])
        if width in ROWS_TOGETHER and width in TILES[dtype]:
            kernel = getattr(kernels, f"conv_rows_{width}")
        else:
            kernel = kernels.conv_rows_any
        calls.append((kernel, w, bt, start))
    with _vectorising():  # compile here (main thread), run below on the pool
        for kernel, w, bt, start in calls:
            kernel(x, w, bt, plan.row_ptr, plan.in_rows, plan.offsets, out, start, 0, 0)
    units = list(range(0, n_out, UNIT_ROWS))

    def run(first):
        last = min(n_out, first + UNIT_ROWS)
        for kernel, w, bt, start in calls:
            kernel(x, w, bt, plan.row_ptr, plan.in_rows, plan.offsets, out, start, first, last)

    sizes = [int(plan.row_ptr[min(n_out, u + UNIT_ROWS)] - plan.row_ptr[u]) * x.shape[1] * cout
             // 64 + 1 for u in units]
    parallel_map(run, units, sizes)
    return out


def weight_gradient(features, grad_out, in_idx, out_idx, offset_ptr, identity_offset):
    """``grad_weight[k] = features[in_k].T @ grad_out[out_k]`` in fixed chunks of pairs,
    gathered with compiled loops, multiplied with single-threaded BLAS, added in order."""
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

from .jit import _njit

BLOCK_ROWS = {block}


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
'''

_TILE = '''

@_njit
def conv_rows_{T}(x, w, b, row_ptr, in_rows, offsets, out, j0, o_start, o_stop):
    """out[o, j0:j0+{T}] = b + sum over o's pairs of x[i] @ w[k], w of width {T}.

    Per block of output rows, the pairs are bucketed by offset; the rows of one offset are
    taken {R} at a time (each weight value feeds {R} accumulators). Each row's sum runs in
    the same order whatever the grouping: bias, then its pairs by increasing offset.
    """
    cin = x.shape[1]
    n_k = w.shape[0]
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
            for j in range({T}):
                acc[r, j] = b[j]
            for q in range(row_ptr[r0 + r], row_ptr[r0 + r + 1]):
                k = offsets[q]
                pos = ends[k]
                rows[pos] = r
                ins[pos] = in_rows[q]
                ends[k] = pos + 1
        t = 0
        for k in range(n_k):
            stop = ends[k]
            while t + {R} <= stop:
{multi}
                t += {R}
            while t < stop:
{single}
                t += 1
        for r in range(nb):
            for j in range({T}):
                out[r0 + r, j0 + j] = acc[r, j]
'''


def _rows_block(rows, width, indent):
    pad = " " * indent
    lines = []
    for u in range(rows):
        lines.append(f"{pad}s{u} = rows[t + {u}]")
        lines.append(f"{pad}i{u} = ins[t + {u}]")
        lines += [f"{pad}a{u}_{j} = acc[s{u}, {j}]" for j in range(width)]
    lines.append(f"{pad}for c in range(cin):")
    lines += [f"{pad}    x{u} = x[i{u}, c]" for u in range(rows)]
    for j in range(width):
        lines.append(f"{pad}    wv = w[k, c, {j}]")
        lines += [f"{pad}    a{u}_{j} += x{u} * wv" for u in range(rows)]
    for u in range(rows):
        lines += [f"{pad}acc[s{u}, {j}] = a{u}_{j}" for j in range(width)]
    return "\n".join(lines)


def generate_source():
    """Source of ``_jit_kernels.py``."""
    src = _HEADER.format(block=BLOCK_ROWS)
    for width in sorted(ROWS_TOGETHER, reverse=True):
        rows = ROWS_TOGETHER[width]
        src += _TILE.format(T=width, R=rows, multi=_rows_block(rows, width, 16),
                            single=_rows_block(1, width, 16))
    return src


def _write_source():  # pragma: no cover - development helper
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_jit_kernels.py")
    with open(path, "w") as handle:
        handle.write(generate_source())
    return path


if __name__ == "__main__":  # pragma: no cover
    print(_write_source())
