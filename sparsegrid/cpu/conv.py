"""Gather-GEMM-reduce convolution on NumPy and SciPy (forward and backward).

For each kernel offset k: ``out[out_idx] += features[in_idx] @ W[k]``. The CPU backend
runs it output-stationary, from a plan built once per rulebook (:func:`prepare_conv`,
cached on the rulebook; nothing above ``sparsegrid.cpu`` sees it):

* the output rows are cut into blocks of about ``_BLOCK_PAIRS`` pairs. For one block, the
  input rows of its pairs are gathered into one buffer, grouped by offset, and each
  offset's group is multiplied by ``W[k]`` (a BLAS GEMM) into a product buffer;
* the products are added into the block's output rows in buffer order (offset after
  offset) by SciPy's compiled CSC product ``csc_matvecs`` with one 1 per column: one
  pass over the products, the block's rows staying in cache, no read-modify-write array
  per offset, no ``np.add.at``;
* the identity offset of a submanifold rulebook (pairs ``(r, r)``) is one contiguous GEMM
  per block, written before the sums, and the bias is added there.

Every output row sums its terms in the same order (identity, then offsets in increasing
order), blocks are fixed by the rulebook alone, and each block writes only its rows, so
blocks run on the deterministic thread pool and the bits never depend on the thread
count. Weight gradients are sums over pairs in fixed chunks added in a fixed order.

Weights are ``(K, Cin, Cout)`` or, with groups, ``(K, G, Cin/G, Cout/G)``: input channel
block g feeds output channel block g.
"""

from __future__ import annotations

import threading

import numpy as np

from .precision import float16_in_float32
from .threads import parallel_map

# Pairs per block of output rows. Fixed (not tuned per call), so the rounding of every
# output never depends on the thread count or the channel count.
_BLOCK_PAIRS = 8192
# Rows per partial product of a weight gradient: fixed, for the same reason.
_REDUCTION_CHUNK = 32768
_WEIGHT_CHUNK = 16384


def _csc_matvecs():
    """SciPy's compiled ``y += A @ x`` for a CSC matrix ``A`` and a dense row-major ``x``."""
    try:
        from scipy.sparse import _sparsetools
        return _sparsetools.csc_matvecs
    except (ImportError, AttributeError):  # pragma: no cover - other SciPy layouts
        return None


_state = {"matvecs": None, "looked": False}
_buffers = threading.local()


def _scatter_add(rows, pointers, ones, products, out):
    """``out[rows[j]] += products[j]`` for every j, in order of j (distinct rows within
    one offset's run, so this is exact): a CSC matrix with one 1 per column, times the
    products, through SciPy's compiled loop."""
    if not _state["looked"]:
        _state["matvecs"], _state["looked"] = _csc_matvecs(), True
    matvecs = _state["matvecs"]
    n_rows, width = out.shape
    n = len(rows)
    if matvecs is not None and out.flags.c_contiguous and products.flags.c_contiguous:
        matvecs(n_rows, n, width, pointers[:n + 1], rows, ones[:n], products.reshape(-1),
                out.reshape(-1))
        return
    from scipy.sparse import csc_matrix  # pragma: no cover - fallback
    out += csc_matrix((ones[:n], rows, pointers[:n + 1]), shape=(n_rows, n)) @ products


def _buffer(name, rows, width, dtype, reserve=0):
    """A per-thread scratch array (rows, width), reused; when it must grow it is made
    large enough for ``reserve`` rows at once (the longest block of the plan), so one
    convolution never leaves a trail of outgrown buffers behind."""
    key = (name, np.dtype(dtype).str)
    store = getattr(_buffers, "arrays", None)
    if store is None:
        store = _buffers.arrays = {}
    found = store.get(key)
    if found is None or found.size < rows * width:
        store.pop(key, None)
        found = store[key] = np.empty(max(rows, reserve, 1) * width, dtype)
    return found[:rows * width].reshape(rows, width)


def _matmul(x, w, out=None):
    """x (n, Cin) times one offset's weight: (Cin, Cout) or grouped (G, Cin/G, Cout/G)."""
    if w.ndim == 2:
        return np.matmul(x, w, out=out)
    groups, cin_g, cout_g = w.shape
    xg = x.reshape(len(x), groups, cin_g).transpose(1, 0, 2)
    result = np.matmul(xg, w).transpose(1, 0, 2).reshape(len(x), groups * cout_g)
    if out is None:
        return result
    out[...] = result
    return out


def _output_channels(weight):
    return weight.shape[-1] * (weight.shape[1] if weight.ndim == 4 else 1)


def _transpose_weight(weight):
    return np.swapaxes(weight, -1, -2)


class ConvPlan:
    """The CPU backend's precomputed form of one rulebook (private to ``sparsegrid.cpu``).

    Attributes
    ----------
    gather_rows : int32 (P',)
        Input rows of the non-identity pairs, block after block, by offset within a block.
    scatter_rows : int32 (P',)
        The output row of each of those pairs, relative to its block's first row.
    blocks : list of (row_start, row_stop, pair_start, pair_stop, groups)
        ``groups`` lists ``(k, start, stop)`` runs of offset k, relative to pair_start.
    identity_offset : int
    n_out : int
    """

    __slots__ = ("gather_rows", "scatter_rows", "blocks", "identity_offset", "n_out",
                 "_constants")

    def __init__(self, gather_rows, scatter_rows, blocks, identity_offset, n_out):
        self.gather_rows = gather_rows
        self.scatter_rows = scatter_rows
        self.blocks = blocks
        self.identity_offset = identity_offset
        self.n_out = n_out
        self._constants = {}

    def constants(self, dtype):
        """``(ones, pointers)`` shared by every block's one-entry-per-column CSC matrix:
        the values (1 in ``dtype``) and the column pointers ``0, 1, 2, ...`` (int32)."""
        key = np.dtype(dtype).str
        found = self._constants.get(key)
        if found is None:
            longest = max((b[3] - b[2] for b in self.blocks), default=0)
            found = self._constants[key] = (np.ones(max(longest, 1), dtype),
                                            np.arange(longest + 1, dtype=np.int32))
        return found

    def __repr__(self):
        return (f"ConvPlan(n_out={self.n_out}, pairs={len(self.gather_rows)}, "
                f"blocks={len(self.blocks)}, identity_offset={self.identity_offset})")


def _rows_sorted_per_offset(out_idx, ptr):
    """True when each offset's output rows increase (every builder's submanifold and
    strided rulebooks, and their transposes, when the sites are in key order)."""
    if len(out_idx) < 2:
        return True
    falls = out_idx[1:] < out_idx[:-1]
    inner = ptr[1:-1]
    inner = inner[(inner > 0) & (inner < len(out_idx))]
    falls[inner - 1] = False           # a new offset may start lower
    return not bool(falls.any())


def build_conv_plan(in_idx, out_idx, offset_ptr, n_out, identity_offset=-1,
                    block_pairs=None):
    """Group a rulebook's pairs into output-row blocks (see :class:`ConvPlan`).

    Works in the rulebook's own pair numbering (the identity offset's pairs are skipped,
    not copied out), with int32 temporaries below 2**31 pairs: the plan's peak memory is
    about 16 bytes per pair beyond its own 8.
    """
    block_pairs = _BLOCK_PAIRS if block_pairs is None else int(block_pairs)
    ptr = np.asarray(offset_ptr, np.int64)
    counts = np.diff(ptr)
    # the offsets that have pairs (a huge filter has mostly empty ones: nothing below
    # loops over those), identity excluded
    used = counts > 0
    if identity_offset >= 0:
        used[identity_offset] = False
    offsets = np.flatnonzero(used).tolist()
    n_used = len(offsets)
    n_pairs = int(counts[used].sum())
    index_type = np.int32 if len(in_idx) < 2**31 - 1 else np.int64
    if identity_offset >= 0:
        # the identity offset has exactly one pair per row: count everything, subtract it
        per_row = np.bincount(out_idx, minlength=n_out)
        per_row -= 1
    else:
        per_row = np.bincount(out_idx, minlength=n_out) if len(out_idx) else \
            np.zeros(n_out, np.int64)
    row_ptr = np.zeros(n_out + 1, np.int64)
    np.cumsum(per_row, out=row_ptr[1:])
    del per_row
    # Blocks: contiguous row ranges, cut where the running pair count crosses a multiple
    # of block_pairs.
    if n_out:
        level = row_ptr[:-1] // block_pairs
        starts = np.flatnonzero(np.diff(level, prepend=-1))
        del level
    else:
        starts = np.zeros(0, np.int64)
    bounds = np.append(starts, n_out)
    n_blocks = len(starts)
    # order[q]: the rulebook pair at buffer position q (by block, then offset, each
    # group's pairs in rulebook order).
    if _rows_sorted_per_offset(out_idx, ptr):
        # each (offset, block) group is one contiguous run of the rulebook's pairs
        cuts = np.zeros((n_used, n_blocks + 1), np.int64)
        for j, k in enumerate(offsets):
            cuts[j] = ptr[k] + np.searchsorted(out_idx[ptr[k]:ptr[k + 1]], bounds)
        lengths = np.diff(cuts, axis=1).T.reshape(-1)          # block-major
        first = cuts[:, :-1].T.reshape(-1)
        group_starts = np.cumsum(lengths) - lengths
        order = np.arange(n_pairs, dtype=index_type)
        order += np.repeat((first - group_starts).astype(index_type), lengths)
        group_counts = lengths
    else:
        block_of_row = np.repeat(np.arange(n_blocks, dtype=np.int64), np.diff(bounds))
        pair_ids = np.concatenate([np.arange(ptr[k], ptr[k + 1], dtype=index_type)
                                   for k in offsets]) if offsets else \
            np.zeros(0, index_type)
        group_key = block_of_row[out_idx[pair_ids]] * n_used + np.repeat(
            np.arange(n_used, dtype=np.int64), counts[offsets] if offsets else 0)
        sort = np.argsort(group_key, kind="stable")
        order = pair_ids[sort]
        group_counts = np.bincount(group_key, minlength=n_blocks * n_used)
        del block_of_row, pair_ids, group_key, sort
    gather_rows = in_idx.take(order).astype(np.int32, copy=False)
    scatter_rows = out_idx.take(order).astype(np.int32, copy=False)
    del order
    group_ptr = np.zeros(n_blocks * n_used + 1, np.int64)
    np.cumsum(group_counts, out=group_ptr[1:])
    blocks = []
    nonzero = (group_counts.reshape(n_blocks, n_used) > 0).tolist() if n_blocks else []
    group_ptr = group_ptr.tolist()
    bounds = bounds.tolist()
    row_starts = row_ptr[bounds].tolist()
    for b in range(n_blocks):
        r0, r1 = bounds[b], bounds[b + 1]
        p0, p1 = row_starts[b], row_starts[b + 1]
        if r0:
            scatter_rows[p0:p1] -= r0           # rows relative to the block
        base = b * n_used
        groups = tuple((offsets[j], group_ptr[base + j] - p0, group_ptr[base + j + 1] - p0)
                       for j, present in enumerate(nonzero[b]) if present)
        blocks.append((r0, r1, p0, p1, groups))
    return ConvPlan(gather_rows, scatter_rows, blocks, int(identity_offset), int(n_out))


def prepare_conv(rulebook):
    """The CPU backend's plan for ``rulebook``, built on first use and cached on it.

    Opaque to callers: the convolution kernels call it themselves; calling it ahead of
    time only moves the cost (benchmarks time it separately).
    """
    def build():
        # a transpose holds the same arrays, swapped: checked once for both
        partner = rulebook.transpose()
        if not partner.has_derived("cpu_conv_plan"):
            rulebook.check_pairs()
        return build_conv_plan(rulebook.in_idx, rulebook.out_idx, rulebook.offset_ptr,
                               rulebook.n_out, rulebook.identity_offset)

    return rulebook.derived("cpu_conv_plan", build)


def _run_blocks(plan, source, weight, out, identity_source=None, identity_weight=None,
                bias=None):
    """``out[rows] = identity + bias + sum_k source[gathered] @ weight[k]`` block by block.

    ``weight`` None means unit weights (sums of gathered rows: pooling, unpooling).
    ``out`` is C-contiguous (n_out, width); every row is written (rows without pairs get
    the identity term and bias, or zero).
    """
    width = out.shape[1]
    dtype = out.dtype
    ones, pointers = plan.constants(dtype)
    longest = len(ones)
    blocks = plan.blocks

    def start_rows(r0, r1):
        target = out[r0:r1]
        if identity_source is not None:
            if identity_weight is None:
                target[...] = identity_source[r0:r1]
            else:
                _matmul(identity_source[r0:r1], identity_weight, out=target)
            if bias is not None:
                target += bias
        elif bias is not None:
            target[...] = bias
        else:
            target[...] = 0

    def run(block):
        r0, r1, p0, p1, groups = block
        start_rows(r0, r1)
        if p1 == p0:
            return
        n = p1 - p0
        rows = plan.gather_rows[p0:p1]
        if weight is None:
            products = _buffer("products", n, width, dtype, longest)
            np.take(source, rows, axis=0, out=products, mode="clip")
        else:
            gathered = _buffer("gathered", n, source.shape[1], dtype, longest)
            np.take(source, rows, axis=0, out=gathered, mode="clip")
            products = _buffer("products", n, width, dtype, longest)
            for k, a, b in groups:
                _matmul(gathered[a:b], weight[k], out=products[a:b])
        _scatter_add(plan.scatter_rows[p0:p1], pointers, ones, products, out[r0:r1])

    # rows outside every block: none (blocks cover [0, n_out)); an empty plan still has to
    # write its rows
    if not blocks and plan.n_out:
        start_rows(0, plan.n_out)
    parallel_map(run, blocks, [b[3] - b[2] + (b[1] - b[0]) for b in blocks])
    return out


def _check_rows(array, n, name):
    if array.ndim != 2 or array.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n}, C) for this rulebook; got "
                         f"{array.shape}")


@float16_in_float32("features", "weight", "bias")
def conv_forward(features, weight, rulebook, bias=None):
    """Sparse convolution over a rulebook.

    Parameters
    ----------
    features : (N_in, Cin) float16/float32/float64 (float16 is computed in float32 and
        rounded once: :mod:`.precision`)
    weight : (K, Cin, Cout) or (K, G, Cin/G, Cout/G), same dtype as ``features``
    rulebook : Rulebook
        Its identity offset (pairs ``(r, r)`` for every row) is computed without gather.
    bias : (Cout,) or None

    Returns
    -------
    (n_out, Cout) array of ``features.dtype``
    """
    _check_rows(features, rulebook.n_in, "features")
    plan = prepare_conv(rulebook)
    features = np.ascontiguousarray(features)
    out = np.empty((rulebook.n_out, _output_channels(weight)), features.dtype)
    identity = plan.identity_offset
    return _run_blocks(plan, features, weight, out,
                       identity_source=features if identity >= 0 else None,
                       identity_weight=weight[identity] if identity >= 0 else None,
                       bias=bias)


@float16_in_float32("grad_out", "features", "weight")
def conv_backward(grad_out, features, weight, rulebook, need_features=True, need_weight=True):
    """Gradients of :func:`conv_forward` with respect to features and weight.

    The feature gradient is the convolution of ``grad_out`` over the transposed rulebook
    with the transposed weights; the weight gradient of offset k is
    ``features[in_idx_k].T @ grad_out[out_idx_k]``, summed over fixed chunks of pairs in a
    fixed order. The bias gradient is ``grad_out.sum(0)`` and is left to the caller.

    Returns
    -------
    grad_features : (N_in, Cin) or None
    grad_weight : weight-shaped or None
    """
    _check_rows(grad_out, rulebook.n_out, "grad_out")
    _check_rows(features, rulebook.n_in, "features")
    grad_out = np.ascontiguousarray(grad_out)
    grad_features = grad_weight = None
    if need_features:
        grad_features = conv_forward(grad_out, _transpose_weight(weight),
                                     rulebook.transpose())
    if need_weight:
        grad_weight = _weight_gradient(features, grad_out, weight, rulebook)
    return grad_features, grad_weight


def _weight_gradient(features, grad_out, weight, rulebook):
    """``grad[k] = features[in_k].T @ grad_out[out_k]``: per offset, over fixed chunks of
    ``_WEIGHT_CHUNK`` pairs (gathered into per-thread buffers), summed in chunk order."""
    identity = rulebook.identity_offset
    grouped = weight.ndim == 4
    offset_ptr = np.asarray(rulebook.offset_ptr, np.int64)
    in_idx, out_idx = rulebook.in_idx, rulebook.out_idx
    starts, stops = offset_ptr[:-1], offset_ptr[1:]
    present = np.flatnonzero(stops > starts).tolist()     # offsets with pairs only
    ptr = {k: int(starts[k]) for k in present}
    units = [(k, s, min(s + _WEIGHT_CHUNK, int(stops[k])))
             for k in present for s in range(ptr[k], int(stops[k]), _WEIGHT_CHUNK)]
    dtype = features.dtype

    def partial(unit):
        k, a, b = unit
        if k == identity:
            # pairs (r, r) for every row in order: contiguous rows, no gather
            r0, r1 = a - ptr[k], b - ptr[k]
            x, g = features[r0:r1], grad_out[r0:r1]
        else:
            x = _buffer("weight_x", b - a, features.shape[1], dtype, _WEIGHT_CHUNK)
            g = _buffer("weight_g", b - a, grad_out.shape[1], dtype, _WEIGHT_CHUNK)
            np.take(features, in_idx[a:b], axis=0, out=x, mode="clip")
            np.take(grad_out, out_idx[a:b], axis=0, out=g, mode="clip")
        return _rows_product(x, g, weight if grouped else None)

    parts = parallel_map(partial, units, [u[2] - u[1] for u in units])
    grad = np.zeros_like(weight)
    for unit, part in zip(units, parts):
        grad[unit[0]] += part
    return grad


def _rows_product(x, g, weight=None):
    """``x.T @ g`` (per group for a grouped weight)."""
    if weight is None:
        return x.T @ g
    groups, cin_g, cout_g = weight.shape[1:]
    xg = x.reshape(len(x), groups, cin_g).transpose(1, 2, 0)
    gg = g.reshape(len(g), groups, cout_g).transpose(1, 0, 2)
    return np.matmul(xg, gg)


@float16_in_float32("x", "g")
def rows_product(x, g):
    """``x.T @ g`` summed over rows in fixed chunks, in order, with single-threaded BLAS:
    the same bits for every thread count (NetworkInNetwork's weight gradient)."""
    starts = range(0, max(len(x), 1), _REDUCTION_CHUNK)
    parts = parallel_map(lambda s: x[s:s + _REDUCTION_CHUNK].T @ g[s:s + _REDUCTION_CHUNK],
                         starts, [min(_REDUCTION_CHUNK, len(x) - s) for s in starts])
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total


@float16_in_float32("features")
def rule_sum(features, rulebook):
    """``out[o] = sum of features[i]`` over the rulebook's pairs (unit-weight convolution).

    Sum pooling, unpooling and their gradients are this on the rulebook or its transpose.
    """
    _check_rows(features, rulebook.n_in, "features")
    plan = prepare_conv(rulebook)
    features = np.ascontiguousarray(features)
    out = np.empty((rulebook.n_out, features.shape[1]), features.dtype)
    identity = plan.identity_offset
    return _run_blocks(plan, features, None, out,
                       identity_source=features if identity >= 0 else None)
