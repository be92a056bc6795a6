"""Independent dense references: every sparse op recomputed on the zero-filled grid.

Nothing here uses sparsegrid's rulebooks or kernels: convolutions are sums of shifted /
strided slices of dense NumPy arrays, so a bug in the sparse code cannot hide in both.
"""

from __future__ import annotations

import itertools

import numpy as np

# Central finite differences are generic arithmetic, shared with the library's gradcheck.
from sparsegrid.autodiff.gradcheck import numerical_gradient  # noqa: F401
from sparsegrid.cpu.threads import _from_ctypes as _CTYPES_CONTROLLERS


def random_sites(rng, spatial_shape, batch_size, density=0.3, empty_batches=()):
    """Unique random sites (N, 1 + D) int32, shuffled rows; some batches may be empty."""
    cells = int(np.prod(spatial_shape))
    rows = []
    for b in range(batch_size):
        if b in empty_batches:
            continue
        n = max(1, int(round(density * cells)))
        flat = rng.choice(cells, size=min(n, cells), replace=False)
        coords = np.stack(np.unravel_index(flat, spatial_shape), axis=1)
        rows.append(np.concatenate([np.full((len(coords), 1), b), coords], axis=1))
    if not rows:
        return np.zeros((0, len(spatial_shape) + 1), np.int32)
    indices = np.concatenate(rows).astype(np.int32)
    return indices[rng.permutation(len(indices))]


def to_dense(features, indices, batch_size, spatial_shape):
    dense = np.zeros((batch_size, features.shape[1], *spatial_shape), features.dtype)
    for row, (b, *coords) in enumerate(indices.tolist()):
        dense[(b, slice(None), *coords)] = features[row]
    return dense


def occupancy(indices, batch_size, spatial_shape):
    occ = np.zeros((batch_size, *spatial_shape), bool)
    for b, *coords in indices.tolist():
        occ[(b, *coords)] = True
    return occ


def at_sites(dense, indices):
    """Rows (N, C) of dense (B, C, *S) at the given sites (pure Python indexing)."""
    return np.stack([dense[(b, slice(None), *c)] for b, *c in indices.tolist()]) \
        if len(indices) else np.zeros((0, dense.shape[1]), dense.dtype)


def _offsets(filter_size):
    return list(itertools.product(*[range(f) for f in filter_size]))


def _apply(weight_k, block):
    """block (B, Cin, *S) times one offset's weight (Cin, Cout) -> (B, Cout, *S)."""
    return np.einsum("bc...,cd->bd...", block, weight_k)


def expand_groups(weight):
    """(K, G, Cin/G, Cout/G) -> block-diagonal (K, Cin, Cout)."""
    if weight.ndim == 3:
        return weight
    k, g, ci, co = weight.shape
    full = np.zeros((k, g * ci, g * co), weight.dtype)
    for j in range(g):
        full[:, j * ci:(j + 1) * ci, j * co:(j + 1) * co] = weight[:, j]
    return full


def submanifold_conv(dense, weight, filter_size, dilation):
    """out[o] = sum_k in[o + (delta_k - f//2) * dilation] @ W[k] on the full grid."""
    weight = expand_groups(weight)
    spatial = dense.shape[2:]
    offsets = [tuple((d - f // 2) * dl for d, f, dl in zip(delta, filter_size, dilation))
               for delta in _offsets(filter_size)]
    pad = [max(abs(o[a]) for o in offsets) for a in range(len(spatial))]
    padded = np.pad(dense, [(0, 0), (0, 0)] + [(p, p) for p in pad])
    out = np.zeros((dense.shape[0], weight.shape[2], *spatial), dense.dtype)
    for k, off in enumerate(offsets):
        view = padded[(slice(None), slice(None),
                       *[slice(p + o, p + o + s) for p, o, s in zip(pad, off, spatial)])]
        out += _apply(weight[k], view)
    return out


def _window_views(dense, filter_size, stride):
    spatial = dense.shape[2:]
    out_shape = [(s - f) // st + 1 for s, f, st in zip(spatial, filter_size, stride)]
    for delta in _offsets(filter_size):
        yield dense[(slice(None), slice(None),
                     *[slice(d, d + (o - 1) * st + 1, st)
                       for d, o, st in zip(delta, out_shape, stride)])]


def strided_conv(dense, weight, filter_size, stride):
    """out[o] = sum_k in[o * s + delta_k] @ W[k]; out = (in - f) / s + 1."""
    weight = expand_groups(weight)
    views = list(_window_views(dense, filter_size, stride))
    out = np.zeros((dense.shape[0], weight.shape[2], *views[0].shape[2:]), dense.dtype)
    for k, view in enumerate(views):
        out += _apply(weight[k], view)
    return out


def strided_occupancy(occ, filter_size, stride):
    """Active outputs of a strided op: some active input in the window."""
    views = list(_window_views(occ[:, None], filter_size, stride))
    return np.logical_or.reduce(views)[:, 0]


def max_pool(dense, occ, filter_size, stride):
    """Max over ACTIVE inputs only (inactive cells are -inf), -inf where none."""
    masked = np.where(occ[:, None], dense, -np.inf)
    return np.maximum.reduce(list(_window_views(masked, filter_size, stride)))


def sum_pool(dense, filter_size, stride):
    return np.add.reduce(list(_window_views(dense, filter_size, stride)))


def transposed_conv(dense, weight, filter_size, stride):
    """fine[q * s + delta_k] += coarse[q] @ W[k]; fine = (in - 1) * s + f."""
    weight = expand_groups(weight)
    coarse = dense.shape[2:]
    fine = [(n - 1) * s + f for n, f, s in zip(coarse, filter_size, stride)]
    out = np.zeros((dense.shape[0], weight.shape[2], *fine), dense.dtype)
    for k, delta in enumerate(_offsets(filter_size)):
        target = (slice(None), slice(None),
                  *[slice(d, d + (n - 1) * s + 1, s) for d, n, s in zip(delta, coarse, stride)])
        out[target] += _apply(weight[k], dense)
    return out


def transposed_occupancy(occ, filter_size, stride):
    out = transposed_conv(occ[:, None].astype(np.float64),
                          np.ones((int(np.prod(filter_size)), 1, 1)), filter_size, stride)
    return out[:, 0] > 0


# --- helpers added for the dense-equivalence and gradient tests -------------------------

def active_sites(occ):
    """Sites (N, 1 + D) int32 of a boolean (B, *S) occupancy, lexicographic order."""
    return np.argwhere(occ).astype(np.int32)


def is_lexsorted(indices):
    """True when rows are strictly increasing in (batch, x1, ..., xD) order."""
    rows = [tuple(r) for r in np.asarray(indices).tolist()]
    return all(a < b for a, b in zip(rows, rows[1:]))


def unpool(dense, filter_size, stride):
    """fine[q * s + delta] += coarse[q] for every offset (transposed unit-weight sum)."""
    channels = dense.shape[1]
    eye = np.broadcast_to(np.eye(channels, dtype=dense.dtype),
                          (int(np.prod(filter_size)), channels, channels))
    return transposed_conv(dense, eye, filter_size, stride)


def global_pool(features, indices, batch_size, mode):
    """Per-sample reduction by a Python loop over samples; empty samples give 0."""
    out = np.zeros((batch_size, features.shape[1]), features.dtype)
    for b in range(batch_size):
        rows = features[indices[:, 0] == b]
        if len(rows):
            out[b] = {"max": np.max, "mean": np.mean, "sum": np.sum}[mode](rows, axis=0)
    return out


def input_layer(indices, features, mode):
    """Dict-based duplicate merging: (sorted site rows, merged features, site of each row).

    ``mode`` is one of 'first', 'last', 'sum', 'mean', 'max' ('unique' reduces as 'sum').
    """
    groups = {}
    for row, site in enumerate(map(tuple, np.asarray(indices).tolist())):
        groups.setdefault(site, []).append(row)
    sites = sorted(groups)
    merged = np.zeros((len(sites), features.shape[1]), features.dtype)
    for s, site in enumerate(sites):
        rows = features[groups[site]]
        if mode == "first":
            merged[s] = rows[0]
        elif mode == "last":
            merged[s] = rows[-1]
        elif mode in ("sum", "unique"):
            merged[s] = rows.sum(axis=0)
        elif mode == "mean":
            merged[s] = rows.mean(axis=0)
        elif mode == "max":
            merged[s] = rows.max(axis=0)
        else:
            raise ValueError(mode)
    site_of_row = {site: s for s, site in enumerate(sites)}
    row_site = np.array([site_of_row[tuple(r)] for r in np.asarray(indices).tolist()], np.int64)
    kept = {site: (groups[site][0] if mode == "first" else groups[site][-1]) for site in sites}
    kept_rows = np.array([kept[site] for site in sites], np.int64)
    return np.array(sites, np.int32).reshape(len(sites), -1), merged, row_site, kept_rows


def batch_norm(x, weight, bias, mean, var, eps, leakiness):
    """(x - mean) / sqrt(var + eps) * weight + bias, then x if x > 0 else leakiness * x."""
    y = (x - mean) / np.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return np.where(y > 0, y, leakiness * y)


def rulebook_conv(features, weight, rulebook, bias=None):
    """Brute-force convolution over a rulebook's pairs (np.add.at per offset; tests only).

    ``weight`` (K, Cin, Cout) or grouped (K, G, Cin/G, Cout/G)."""
    w = expand_groups(weight) if weight.ndim == 4 else weight
    out = np.zeros((rulebook.n_out, w.shape[2]), np.result_type(features, w))
    ptr = rulebook.offset_ptr
    for k in range(len(ptr) - 1):
        rows_in = rulebook.in_idx[ptr[k]:ptr[k + 1]]
        rows_out = rulebook.out_idx[ptr[k]:ptr[k + 1]]
        np.add.at(out, rows_out, features[rows_in] @ w[k])
    if bias is not None:
        out += bias
    return out


def submanifold_conv_vjp(dense, weight, grad_out, filter_size, dilation):
    """Vector-Jacobian product of :func:`submanifold_conv` on the full grid.

    ``dense`` (B, Cin, *S) input, ``weight`` (K, Cin, Cout) ungrouped, ``grad_out``
    (B, Cout, *S) the cotangent. Returns ``(grad_input (B, Cin, *S), grad_weight
    (K, Cin, Cout))`` of ``sum(grad_out * submanifold_conv(dense, weight))``: the input
    gradient scatters back along the negated offsets, grad_in[i] += G[i - off_k] @ W[k].T,
    and grad_W[k] = sum over the grid of in[o + off_k] (outer) G[o]. On a sparse tensor's
    zero-filled grid with ``grad_out`` zero off its sites, these restricted to the active
    sites are the sparse op's gradients (inactive inputs are zero and unused).
    """
    spatial = dense.shape[2:]
    offsets = [tuple((d - f // 2) * dl for d, f, dl in zip(delta, filter_size, dilation))
               for delta in _offsets(filter_size)]
    pad = [max(abs(o[a]) for o in offsets) for a in range(len(spatial))]
    width = [(0, 0), (0, 0)] + [(p, p) for p in pad]
    padded_in, padded_g = np.pad(dense, width), np.pad(grad_out, width)
    grad_in = np.zeros_like(dense)
    grad_w = np.zeros_like(weight)
    for k, off in enumerate(offsets):
        shifted_in = padded_in[(slice(None), slice(None),
                                *[slice(p + o, p + o + s) for p, o, s in zip(pad, off, spatial)])]
        shifted_g = padded_g[(slice(None), slice(None),
                              *[slice(p - o, p - o + s) for p, o, s in zip(pad, off, spatial)])]
        grad_w[k] = np.einsum("bcn,bdn->cd", shifted_in.reshape(*shifted_in.shape[:2], -1),
                              grad_out.reshape(*grad_out.shape[:2], -1))
        grad_in += _apply(weight[k].T, shifted_g)
    return grad_in, grad_w


def conv_problem(seed, shape, channels, density):
    """A random submanifold-convolution problem: (tensor, weight, output gradient), float32."""
    import sparsegrid as sg
    rng = np.random.default_rng(seed)
    indices = random_sites(rng, shape, 1, density=density)
    x = sg.SparseTensor(rng.standard_normal((len(indices), channels)).astype(np.float32),
                        indices, shape)
    weight = rng.standard_normal((27, channels, channels)).astype(np.float32)
    grad = rng.standard_normal((len(indices), channels)).astype(np.float32)
    return x, weight, grad


def conv_step(x, weight, grad):
    """Forward and backward of a submanifold convolution through autodiff: copies of the
    output, the feature gradient and the weight gradient."""
    import sparsegrid as sg
    from sparsegrid.autodiff import Tensor
    features = Tensor(x.features, requires_grad=True)
    w = Tensor(weight, requires_grad=True)
    y = sg.submanifold_conv(x.with_features(features), w)
    y.features.backward(grad)
    return (np.array(y.features.data), np.array(features.grad), np.array(w.grad))


def blas_limited(n):
    """Context: every BLAS at ``n`` threads, as a process started with OPENBLAS_NUM_THREADS=n
    would have it (threadpoolctl when installed, else sparsegrid's ctypes controllers as
    they were when this module was imported: tests may monkeypatch the live name)."""
    try:
        import threadpoolctl
    except ImportError:
        threadpoolctl = None
    if threadpoolctl is not None:
        return threadpoolctl.threadpool_limits(n, user_api="blas")
    controllers = _CTYPES_CONTROLLERS()
    before = [c.get() for c in controllers]

    class Limit:
        def __enter__(self):
            for c in controllers:
                c.set(n)

        def __exit__(self, *exc):
            for c, b in zip(controllers, before):
                c.set(b)

    return Limit()


