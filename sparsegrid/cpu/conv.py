"""Gather-GEMM-scatter convolution on NumPy (forward and backward).

For each kernel offset k: ``out[out_idx] += features[in_idx] @ W[k]``. Within one offset the
output rows are unique (the rulebook guarantees it), so the fancy-indexed ``+=`` is exact
and no ``np.add.at`` is needed. Offsets (and plan tiers) are visited in a fixed order, and
every reduction over rows (``x.T @ g``) runs in fixed chunks with single-threaded BLAS (a
threaded BLAS may split that sum), so results are bit-identical run to run and for any
thread count.

Weights are ``(K, Cin, Cout)`` or, with groups, ``(K, G, Cin/G, Cout/G)``: input channel
block g feeds output channel block g.
"""

from __future__ import annotations

import numpy as np

from . import jit
from .threads import parallel_map


def _matmul(x, w):
    """x (n, Cin) times one offset's weight: (Cin, Cout) or grouped (G, Cin/G, Cout/G)."""
    if w.ndim == 2:
        return x @ w
    groups, cin_g, _ = w.shape
    xg = x.reshape(len(x), groups, cin_g).transpose(1, 0, 2)
    return np.matmul(xg, w).transpose(1, 0, 2).reshape(len(x), groups * w.shape[-1])


def _output_channels(weight):
    return weight.shape[-1] * (weight.shape[1] if weight.ndim == 4 else 1)


def _transpose_weight(weight):
    return np.swapaxes(weight, -1, -2)


class ConvPlan:
    """Output-stationary grouping of a rulebook for faster gather-GEMM-scatter.

    Two tiers, both exact (no zero padding, no wasted products):

    * ``exact``: output rows sharing their whole set of active offsets (identity
      included) with at least ``min_rows`` others. Their neighbours are gathered into one
      ``(n, m * Cin)`` im2col matrix and multiplied by the ``m`` stacked weights; the
      result is written once (no read-modify-write).
    * ``groups``: for the other rows, the non-identity offsets are split into blocks of
      ``block`` consecutive offsets, and rows with the same active offsets within a block
      are grouped the same way, then scatter-added: once per block, not once per pair.

    Pairs of groups smaller than ``min_rows`` stay in the per-offset ``residual``.

    Attributes
    ----------
    exact : Tier
    groups : list of Tier, one per block
    residual : (in_idx, out_idx, offset_ptr)
    identity_rows : int32 array or None
        Rows whose identity product is not inside an ``exact`` group.
    identity_offset : int
    """

    __slots__ = ("exact", "groups", "residual", "identity_rows", "identity_offset")

    def __init__(self, exact, groups, residual, identity_rows, identity_offset):
        self.exact = exact
        self.groups = groups
        self.residual = residual
        self.identity_rows = identity_rows
        self.identity_offset = identity_offset


# Pairs per unit of work: groups are executed in runs of about this many neighbour rows
# (one gather, one scatter per run). Fixed, so results never depend on the thread count.
_UNIT_PAIRS = 16384


class Tier:
    """Groups of output rows that share their active offsets, stored flat.

    Attributes
    ----------
    rows : int32 (R,)
        Output rows, group after group.
    neighbours : int32 (P,)
        Input rows, row-major per group: group g's block reshapes to (n_g, m_g).
    groups : list of (row_start, row_stop, pair_start, pair_stop, offsets)
    units : list of (first_group, stop_group)
        Runs of consecutive groups executed together (one gather, one scatter).
    """

    __slots__ = ("rows", "neighbours", "groups", "units")

    def __init__(self, rows, neighbours, groups):
        self.rows = rows
        self.neighbours = neighbours
        self.groups = groups
        self.units = []
        start, pairs = 0, 0
        for g, (_, _, p0, p1, _) in enumerate(groups):
            pairs += p1 - p0
            if pairs >= _UNIT_PAIRS or g == len(groups) - 1:
                self.units.append((start, g + 1))
                start, pairs = g + 1, 0

    def __len__(self):
        return len(self.groups)


def _groups_of(code, candidates, min_rows, table, offsets):
    """Group ``candidates`` rows by ``code`` (bit j: ``offsets[j]`` active).

    Returns the groups of at least ``min_rows`` rows as (rows, neighbours, offsets) and the
    rows of the smaller groups. Rows sorted by code make each group's neighbour lists one
    contiguous run of ``table[rows][:, offsets][active]``, so all groups are cut from a
    single gather.
    """
    rows = candidates[np.argsort(code[candidates], kind="stable")]
    codes, starts, sizes = np.unique(code[rows], return_index=True, return_counts=True)
    big = sizes >= min_rows
    small_rows = rows[np.repeat(~big, sizes)]
    rows = rows[np.repeat(big, sizes)]
    codes, sizes = codes[big], sizes[big]
    sub = table[rows][:, offsets]
    neighbours = sub[sub >= 0]
    bits = (codes[:, None] >> np.arange(len(offsets))) & 1
    widths = bits.sum(axis=1)
    row_ends = np.cumsum(sizes).tolist()
    pair_ends = np.cumsum(sizes * widths).tolist()
    groups = []
    for g, (size, width) in enumerate(zip(sizes.tolist(), widths.tolist())):
        ks = tuple(offsets[j] for j in np.flatnonzero(bits[g]).tolist())
        groups.append((row_ends[g] - size, row_ends[g], pair_ends[g] - size * width,
                       pair_ends[g], ks))
    return Tier(rows, neighbours, groups), small_rows


def build_conv_plan(in_idx, out_idx, offset_ptr, n_out, identity_offset=-1, block=9,
                    min_rows=64):
    """Group a rulebook's pairs for :func:`conv_forward` (see :class:`ConvPlan`)."""
    n_offsets = len(offset_ptr) - 1
    counts = np.diff(offset_ptr)
    table = np.full((n_out, n_offsets), -1, np.int32)
    table[out_idx, np.repeat(np.arange(n_offsets), counts)] = in_idx
    active = [k for k in range(n_offsets) if k != identity_offset and counts[k] > 0]

    def codes_of(offsets):
        # Bit j of a row's code is set iff offsets[j] has a pair for that row (within one
        # offset every output row appears at most once, so += is an exact bitwise or).
        code = np.zeros(n_out, np.int64)
        for j, k in enumerate(offsets):
            code[out_idx[offset_ptr[k]:offset_ptr[k + 1]]] += np.int64(1) << j
        return code

    exact, identity_rows = Tier(np.zeros(0, np.int32), np.zeros(0, np.int32), []), None
    remaining = np.arange(n_out, dtype=np.int32)
    everything = ([identity_offset] if identity_offset >= 0 else []) + active
    if len(everything) <= 62:
        code = codes_of(everything)
        # Rows with no pairs at all (transposed rulebooks with stride > filter) keep their
        # bias; they belong to no group.
        exact, remaining = _groups_of(code, remaining[code != 0], min_rows, table, everything)
        remaining = np.concatenate([remaining, np.flatnonzero(code == 0).astype(np.int32)])
        remaining = np.sort(remaining)
        if identity_offset >= 0:
            identity_rows = remaining
    groups = []
    leftover = np.zeros(n_out, bool)
    residual_in = [np.zeros(0, np.int32)] * n_offsets
    residual_out = [np.zeros(0, np.int32)] * n_offsets
    for first in range(0, len(active), block):
        offsets = active[first:first + block]
        code = codes_of(offsets)
        big, small_rows = _groups_of(code, remaining[code[remaining] != 0], min_rows, table,
                                     offsets)
        groups.append(big)
        leftover[:] = False
        leftover[small_rows] = True
        for j, k in enumerate(offsets):
            rows = np.flatnonzero(leftover & (code >> j & 1).astype(bool)).astype(np.int32)
            residual_in[k], residual_out[k] = table[rows, k], rows
    res_ptr = np.zeros(n_offsets + 1, np.int64)
    np.cumsum([len(r) for r in residual_in], out=res_ptr[1:])
    residual = (np.concatenate(residual_in), np.concatenate(residual_out), res_ptr)
    return ConvPlan(exact, groups, residual, identity_rows, identity_offset)


def fast_plan_available(n_offsets):
    """True when :func:`build_fast_plan` gives a plan (numba importable, JIT enabled)."""
    return jit.plan_supported(n_offsets)


def build_fast_plan(in_idx, out_idx, offset_ptr, n_out, identity_offset=-1):
    """The compiled kernels' plan of a rulebook (:class:`sparsegrid.cpu.jit.JitPlan`)."""
    return jit.build_plan(in_idx, out_idx, offset_ptr, n_out)


def _stacked(weight, ks):
    return weight[list(ks)].reshape(len(ks) * weight.shape[1], weight.shape[2])


def _start_output(features, weight, n_out, bias, identity_offset, plan=None):
    """The output before the non-identity offsets: bias plus the identity offset's product.

    When a plan's exact tier overwrites most rows (identity included), the identity
    product is computed only for the others (``plan.identity_rows``); below half, the
    gather that needs costs more than the one contiguous GEMM it saves (measured).
    """
    cout = _output_channels(weight)
    rows = None if plan is None else plan.identity_rows
    if identity_offset >= 0 and rows is not None and len(rows) <= n_out // 2:
        out = np.empty((n_out, cout), features.dtype)
        rest = _matmul(features[rows], weight[identity_offset])
        if bias is not None:
            rest += bias
        out[rows] = rest
        return out
    if identity_offset >= 0:
        out = _matmul(features, weight[identity_offset])
        if bias is not None:
            out += bias
    elif bias is not None:
        out = np.empty((n_out, cout), features.dtype)
        out[...] = bias
    else:
        out = np.zeros((n_out, cout), features.dtype)
    return out


def _accumulate_pairs(out, features, weight, in_idx, out_idx, offset_ptr, skip=-1):
    for k in range(len(offset_ptr) - 1):
        start, stop = offset_ptr[k], offset_ptr[k + 1]
        if start == stop or k == skip:
            continue
        out[out_idx[start:stop]] += _matmul(features[in_idx[start:stop]], weight[k])


def _run_plan(plan, source, weight, out=None, bias=None, row_features=None):
    """Execute a :class:`ConvPlan`: ``out[rows] (=, +=) source[neighbours] @ W[offsets]``.

    With ``row_features`` (the backward pass, run on the transposed rulebook's plan) also
    returns the weight-gradient contributions ``row_features[rows].T @ gathered`` summed
    per offset, as a ``(K, C_rows, C_source)`` array, in a fixed order.
    ``out`` may be None when only the weight gradient is wanted.
    """
    want_grad = row_features is not None
    n_offsets, c_src, c_out = weight.shape
    grad = np.zeros((n_offsets, row_features.shape[1], c_src), source.dtype) \
        if want_grad else None

    def run_unit(tier, unit, overwrite):
        groups = tier.groups[unit[0]:unit[1]]
        r0, p0 = groups[0][0], groups[0][2]
        r1, p1 = groups[-1][1], groups[-1][3]
        rows = tier.rows[r0:r1]
        gathered = source[tier.neighbours[p0:p1]]
        row_values = row_features[rows] if want_grad else None
        product = np.empty((r1 - r0, c_out), source.dtype) if out is not None else None
        partials = []
        for a, b, c, d, ks in groups:
            block = gathered[c - p0:d - p0].reshape(b - a, -1)
            if out is not None:
                np.matmul(block, _stacked(weight, ks), out=product[a - r0:b - r0])
            if want_grad:
                partials.append(row_values[a - r0:b - r0].T @ block)
        if out is not None:
            if overwrite:
                if bias is not None:
                    product += bias
                out[rows] = product
            else:
                out[rows] += product
        return partials

    def run_tier(tier, overwrite):
        # The rows of one tier are disjoint, so its units may write concurrently; tiers
        # run in order, so every row sums its terms in a fixed order.
        results = parallel_map(lambda unit: run_unit(tier, unit, overwrite), tier.units,
                               [tier.groups[u[1] - 1][3] - tier.groups[u[0]][2]
                                for u in tier.units])
        if want_grad:
            for unit, partials in zip(tier.units, results):
                for (_, _, _, _, ks), partial in zip(tier.groups[unit[0]:unit[1]], partials):
                    grad[list(ks)] += partial.reshape(-1, len(ks), c_src).transpose(1, 0, 2)

    run_tier(plan.exact, True)
    for tier in plan.groups:
        run_tier(tier, False)
    in_idx, out_idx, ptr = plan.residual
    offsets = [k for k in range(len(ptr) - 1) if ptr[k] != ptr[k + 1]]

    def residual_unit(k):
        rows_out, rows_in = out_idx[ptr[k]:ptr[k + 1]], in_idx[ptr[k]:ptr[k + 1]]
        gathered = source[rows_in]
        product = gathered @ weight[k] if out is not None else None
        return product, (row_features[rows_out].T @ gathered if want_grad else None)

    for k, (product, partial) in zip(offsets, parallel_map(
            residual_unit, offsets, [ptr[k + 1] - ptr[k] for k in offsets])):
        if out is not None:
            out[out_idx[ptr[k]:ptr[k + 1]]] += product
        if want_grad:
            grad[k] += partial
    return grad


def conv_forward(features, weight, in_idx, out_idx, offset_ptr, n_out, bias=None,
                 identity_offset=-1, plan=None):
    """Sparse convolution over a rulebook.

    Parameters
    ----------
    features : (N_in, Cin) float32/float64
    weight : (K, Cin, Cout) or (K, G, Cin/G, Cout/G), same dtype as ``features``
    in_idx, out_idx : int32 (P,); offset_ptr : int64 (K + 1,)
    n_out : int
    bias : (Cout,) or None
    identity_offset : int
        An offset whose pairs are (r, r) for every row (submanifold centre): its product
        is computed without gather or scatter.
    plan : ConvPlan or JitPlan, optional
        :func:`build_conv_plan` (or, with numba, :func:`build_fast_plan`) of this rulebook:
        same result to float rounding, faster, multi-threaded (ungrouped weights only).

    Returns
    -------
    (n_out, Cout) array of ``features.dtype``
    """
    if isinstance(plan, jit.JitPlan):
        if jit.usable(features, weight, plan):
            return jit.forward(features, weight, plan, bias)
        plan = None
    use_plan = plan is not None and weight.ndim == 3
    out = _start_output(features, weight, n_out, bias, identity_offset,
                        plan if use_plan else None)
    if not use_plan:
        _accumulate_pairs(out, features, weight, in_idx, out_idx, offset_ptr, identity_offset)
    else:
        _run_plan(plan, features, weight, out, bias)
    return out


def conv_backward(grad_out, features, weight, in_idx, out_idx, offset_ptr, identity_offset=-1,
                  need_features=True, need_weight=True, transposed_plan=None):
    """Gradients of :func:`conv_forward` with respect to features and weight.

    The feature gradient is the convolution of ``grad_out`` over the transposed rulebook
    with the transposed weights; the weight gradient of offset k is
    ``features[in_idx_k].T @ grad_out[out_idx_k]``. The bias gradient is
    ``grad_out.sum(0)`` and is left to the caller.

    ``transposed_plan``, the :class:`ConvPlan` of the transposed rulebook, makes it faster
    (one gather of ``grad_out`` serves both gradients) and multi-threaded.

    Returns
    -------
    grad_features : (N_in, Cin) or None
    grad_weight : weight-shaped or None
    """
    grad_features = grad_weight = None
    weight_t = _transpose_weight(weight)
    if isinstance(transposed_plan, jit.JitPlan):
        if jit.usable(grad_out, weight, transposed_plan):
            if need_features:
                grad_features = jit.forward(grad_out, weight_t, transposed_plan)
            if need_weight:
                grad_weight = jit.weight_gradient(features, grad_out, in_idx, out_idx,
                                                  offset_ptr, identity_offset,
                                                  plan=transposed_plan)
            return grad_features, grad_weight
        transposed_plan = None
    if transposed_plan is not None and weight.ndim == 3:
        if need_features:
            grad_features = _start_output(grad_out, weight_t, len(features), None,
                                          identity_offset, transposed_plan)
        partial = _run_plan(transposed_plan, grad_out, weight_t, grad_features,
                            row_features=features if need_weight else None)
        if need_weight:
            grad_weight = partial
            if identity_offset >= 0:
                rows = transposed_plan.identity_rows
                if rows is None:
                    grad_weight[identity_offset] += _weight_product(features, grad_out, weight)
                else:
                    grad_weight[identity_offset] += _weight_product(features[rows],
                                                                    grad_out[rows], weight)
        return grad_features, grad_weight
    if need_features:
        grad_features = conv_forward(grad_out, weight_t, out_idx, in_idx, offset_ptr,
                                     len(features), identity_offset=identity_offset)
    if need_weight:
        grad_weight = np.zeros_like(weight)
        for k in range(len(offset_ptr) - 1):
            start, stop = offset_ptr[k], offset_ptr[k + 1]
            if start == stop:
                continue
            if k == identity_offset:
                x, g = features, grad_out
            else:
                x, g = features[in_idx[start:stop]], grad_out[out_idx[start:stop]]
            grad_weight[k] = _weight_product(x, g, weight)
    return grad_features, grad_weight


# Rows per partial product of a weight gradient: fixed, so the rounding never depends on
# the thread count.
_REDUCTION_CHUNK = 32768


def rows_product(x, g):
    """``x.T @ g`` summed over rows deterministically (see :func:`_weight_product`)."""
    return _weight_product(x, g)


def _weight_product(x, g, weight=None):
    """``x.T @ g`` for one offset (per group when the weight is grouped), summed over rows
    in fixed chunks, in order, with single-threaded BLAS: deterministic."""
    def partial(start):
        xs, gs = x[start:start + _REDUCTION_CHUNK], g[start:start + _REDUCTION_CHUNK]
        if weight is None or weight.ndim == 3:
            return xs.T @ gs
        groups, cin_g, cout_g = weight.shape[1:]
        xg = xs.reshape(len(xs), groups, cin_g).transpose(1, 2, 0)
        gg = gs.reshape(len(gs), groups, cout_g).transpose(1, 0, 2)
        return np.matmul(xg, gg)

    starts = range(0, max(len(x), 1), _REDUCTION_CHUNK)
    parts = parallel_map(partial, starts, [min(_REDUCTION_CHUNK, len(x) - s) for s in starts])
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total


def rule_sum(features, in_idx, out_idx, offset_ptr, n_out):
    """``out[out_idx] += features[in_idx]`` offset by offset (unit-weight convolution).

    Sum pooling, unpooling and their gradients are this with the rulebook or its transpose.
    """
    out = np.zeros((n_out, features.shape[1]), features.dtype)
    for k in range(len(offset_ptr) - 1):
        start, stop = offset_ptr[k], offset_ptr[k + 1]
        if start != stop:
            out[out_idx[start:stop]] += features[in_idx[start:stop]]
    return out
