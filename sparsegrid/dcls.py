"""DCLS: dilated convolution with learnable spacings (Khalfaoui-Hassani et al., ICLR 2023).

Each of a filter's ``kernel_count`` taps has a weight and a learnable, fractional position
inside a large "dilated" kernel; :func:`construct_kernel` spreads every tap onto the
integer cells of the dense kernel by interpolation, so the positions learn by gradient
descent, and :func:`dcls_conv` convolves with the constructed kernel
(:func:`sparsegrid.denseconv.conv`, dilation 1). On NumPy and CuPy arrays or autodiff
Tensors; differentiable with respect to the weights, the positions ``P`` and the spreads
``SIG``. Semantics: dcls 0.1.1's construct modules, except for the axis convention below.

The construction. For tap ``k`` of the filter ``(o, c)``, its position along kernel axis
``d`` is ``q_d = P[d, o, c, k] + dilated_kernel_size[d] // 2`` (``P = 0`` is the centre
cell ``n_d // 2``), and it puts ``weight[o, c, k] * X_k(i)`` into every cell ``i`` of the
``n_1 x ... x n_D`` kernel, with ``t_d = i_d - q_d``:

- ``'v0'``: floor-based bilinear, unnormalised -- the ``2^D`` cells around ``q`` get the
  products of ``1 - r_d`` (cell ``floor(q_d)``) and ``r_d`` (cell ``floor(q_d) + 1``),
  ``r_d = q_d - floor(q_d)``; a corner outside the kernel is dropped with its mass.
- ``'v1'``: bilinear, normalised -- ``prod_d relu(1 - |t_d|)``, divided by its sum over
  the kernel ``+ 1e-7``.
- ``'gauss'``: ``exp(-1/2 sum_d (t_d / (|SIG_d| + 0.27))^2)``, normalised (sum ``+ 1e-7``).
- ``'max'``: ``prod_d relu(|SIG_d| + 1 - |t_d|)``, normalised (sum ``+ 1e-7``).

The gradients are the plain derivatives of these formulas, through the normaliser, with
PyTorch's conventions at kinks (``|x|' = sign(x)``, 0 at 0; ``relu'(0) = 0``): bilinear
position gradients are 0 exactly at integer positions, and a ``'max'`` spread of exactly
0 (its DCLS initialisation) receives gradient 0.

**Axis convention.** ``P[d]`` moves a tap along kernel axis ``d`` (the kernel's dimension
``2 + d``), centred on ``dilated_kernel_size[d] // 2``, for square and non-square kernels
alike. dcls 0.1.1's ``'v1'``, ``'gauss'`` and ``'max'`` compare ``P[d]`` with the cell
index of axis ``D - 1 - d`` while centring it on ``dilated_kernel_size[d] // 2`` (its
``'v0'`` uses axis ``d``), which breaks non-square kernels; :func:`from_dcls_positions`
converts upstream positions to this convention (an exact reproduction of upstream's
kernels, square or not).

How it computes. Every version's ``X_k`` is a product of one profile per axis,
``X_k(i) = prod_d h_{k,d}(i_d)``, so its sum over the kernel is the product of the
profiles' sums and the kernel of a filter is
``K = sum_k a_k h_{k,1} (x) ... (x) h_{k,D}`` with ``a_k = w_k / (prod_d S_{k,d} + 1e-7)``:
one batched GEMM ``(a h_1)^T (n_1, KC) @ (h_2 (x) ... (x) h_D) (KC, n_2 ... n_D)`` per
filter, vectorised over every (Cout, Cin/groups) filter at once, with no scatter (hence
deterministic on the GPU) and no ``(KC, n_1, ..., n_D)`` interpolation array. The
backward pass is two GEMMs of the same size and per-axis reductions.

The construct-free path (:func:`dcls_conv` ``method='construct_free'``, bilinear versions):
every tap's ``2^D`` integer corners and coefficients, grouped by kernel cell; one
denseconv GEMM per distinct touched cell (:func:`touched_kernel_cells`) instead of one per
cell of the dilated kernel; the same results to rounding. ``method='auto'`` takes it when
at most :data:`AUTO_TOUCHED_FRACTION` of the cells are touched ('gauss' / 'max' touch
every cell: always constructed).
"""

from __future__ import annotations

import copy
import numbers

import numpy as np

from . import backend, denseconv
from .autodiff.core import Tensor, data_of, record

__all__ = ["METHODS", "VERSIONS", "construct_kernel", "dcls_conv", "from_dcls_positions",
           "position_limits", "touched_kernel_cells"]

#: The interpolations of :func:`construct_kernel`.
VERSIONS = ("v0", "v1", "gauss", "max")
NORMALISER_EPS = 1e-7        # added to every normalised tap's sum, as DCLS
GAUSS_SIG_OFFSET = 0.27      # 'gauss': standard deviation |SIG| + 0.27
MAX_SIG_OFFSET = 1.0         # 'max': half-width |SIG| + 1
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_SPREAD_VERSIONS = ("gauss", "max")
#: ``dcls_conv``'s ways to compute: build the dense kernel, or convolve per touched offset.
METHODS = ("auto", "construct", "construct_free")
#: The versions the construct-free path computes (the bilinear ones: 2^D corners a tap).
CONSTRUCT_FREE_VERSIONS = ("v0", "v1")
#: ``method='auto'`` convolves construct-free when at most this fraction of the dilated
#: kernel's cells is touched by some tap.
AUTO_TOUCHED_FRACTION = 0.5


# -- argument checks -------------------------------------------------------------------------
def _is_int(value):
    return isinstance(value, (numbers.Integral, np.integer)) and \
        not isinstance(value, (bool, np.bool_))


def _array(value, name, where):
    data = data_of(value)
    if not (hasattr(data, "shape") and hasattr(data, "dtype") and hasattr(data, "ndim")):
        raise TypeError(f"{where}: {name} must be a NumPy/CuPy array or an autodiff Tensor; "
                        f"got {type(value).__name__}")
    return data


def _version(version, where):
    if not isinstance(version, str) or version not in VERSIONS:
        raise ValueError(f"{where}: version must be one of {VERSIONS}; got {version!r}")
    return version


def _kernel_size(value, ndim, where):
    """``dilated_kernel_size`` (an int or ``ndim`` ints) as a tuple of positive ints."""
    if _is_int(value):
        sizes = (int(value),) * ndim
    elif isinstance(value, (tuple, list)) and all(_is_int(v) for v in value):
        if len(value) != ndim:
            raise ValueError(f"{where}: dilated_kernel_size must be an int or {ndim} ints (one "
                             f"per kernel axis: P has {ndim}); got {len(value)}: "
                             f"{tuple(value)!r}")
        sizes = tuple(int(v) for v in value)
    else:
        raise TypeError(f"{where}: dilated_kernel_size must be an int or a tuple of {ndim} "
                        f"ints; got {type(value).__name__} {value!r}")
    if any(n < 1 for n in sizes):
        raise ValueError(f"{where}: dilated_kernel_size must be positive; got {sizes!r}")
    return sizes


def position_limits(dilated_kernel_size):
    """The largest ``|P[d]|`` per axis, ``dilated_kernel_size[d] // 2``: DCLS's clamp range
    (and what ``check_range`` accepts). For an even size ``n`` the upper end is position
    ``n``, one cell past the last one: a bilinear tap there has no mass inside."""
    return tuple(int(n) // 2 for n in dilated_kernel_size)


def _check_inputs(weight, P, SIG, dilated_kernel_size, version, check_range, where):
    """The arrays, the sizes, the namespace; raises TypeError/ValueError naming the
    argument."""
    version = _version(version, where)
    w = _array(weight, "weight", where)
    p = _array(P, "P", where)
    sig = None
    if version in _SPREAD_VERSIONS:
        if SIG is None:
            raise ValueError(f"{where}: version {version!r} needs SIG (the spreads, shaped "
                             "as P); only 'v0' and 'v1' take SIG=None")
        sig = _array(SIG, "SIG", where)
    elif SIG is not None:
        _array(SIG, "SIG", where)          # checked, then ignored: v0/v1 have no spread
    if not isinstance(check_range, (bool, np.bool_)):
        raise TypeError(f"{where}: check_range must be a bool; got {check_range!r}")
    if w.ndim != 3:
        raise ValueError(f"{where}: weight must be (Cout, Cin/groups, kernel_count); got "
                         f"shape {tuple(w.shape)}")
    if 0 in w.shape:
        raise ValueError(f"{where}: weight must have non-zero sizes; got shape "
                         f"{tuple(w.shape)}")
    if p.ndim != 4 or tuple(p.shape[1:]) != tuple(w.shape) or p.shape[0] < 1:
        raise ValueError(f"{where}: P must be (ndim, Cout, Cin/groups, kernel_count) = "
                         f"(ndim, {', '.join(str(s) for s in w.shape)}) for weight of shape "
                         f"{tuple(w.shape)}; got shape {tuple(p.shape)}")
    if sig is not None and tuple(sig.shape) != tuple(p.shape):
        raise ValueError(f"{where}: SIG must have P's shape {tuple(p.shape)}; got "
                         f"{tuple(sig.shape)}")
    for name, array in (("weight", w), ("P", p), ("SIG", sig)):
        if array is not None and array.dtype not in _DTYPES:
            raise TypeError(f"{where}: {name} must be float32 or float64; got {array.dtype}")
    for name, array in (("P", p), ("SIG", sig)):
        if array is not None and array.dtype != w.dtype:
            raise TypeError(f"{where}: {name}'s dtype {array.dtype} differs from weight's "
                            f"{w.dtype}; convert one (astype)")
    xp = backend.array_namespace(w, p, sig)
    backend.require_same_device("P", p, "weight", w)
    if sig is not None:
        backend.require_same_device("SIG", sig, "weight", w)
    sizes = _kernel_size(dilated_kernel_size, int(p.shape[0]), where)
    if check_range:
        _check_positions(p, sizes, xp, where)
    return w, p, sig, sizes, version, xp


def _check_positions(p, sizes, xp, where):
    """ValueError unless every ``|P[d]| <= sizes[d] // 2`` (NaN fails too). One reduction
    and one host read (a device synchronisation on a GPU)."""
    limits = xp.asarray(np.array(position_limits(sizes), dtype=p.dtype)).reshape(-1, 1, 1, 1)
    outside = ~(xp.abs(p) <= limits)
    if not bool(outside.any()):
        return
    bad = backend.to_numpy(outside.reshape(p.shape[0], -1).any(axis=1))
    axis = int(np.flatnonzero(bad)[0])
    values = backend.to_numpy(p[axis])
    worst = values[backend.to_numpy(outside[axis])]
    example = worst[np.argmax(np.where(np.isnan(worst), np.inf, np.abs(worst)))]
    lim = position_limits(sizes)[axis]
    raise ValueError(f"{where}: P lies outside the dilated kernel: P[{axis}] must be in "
                     f"[-{lim}, {lim}] (dilated_kernel_size[{axis}] = {sizes[axis]}, positions "
                     f"centred on {lim}); found {float(example)!r} "
                     f"({int(bad.sum())} axis/axes affected). Clamp it (the modules' "
                     f"clamp_parameters(), after each optimizer step) or pass "
                     f"check_range=False")


# -- the construction ------------------------------------------------------------------------
def _profile(q, sig, n, version, xp, derivatives):
    """One axis's interpolation profile ``h`` (B, KC, n) of taps at positions ``q``
    (B, KC), and with ``derivatives`` also ``dh/dq`` and ``dh/dSIG`` (None without SIG)."""
    cells = xp.arange(n, dtype=q.dtype)
    qe = q[..., None]
    if version == "v0":
        floor = xp.floor(qe)
        frac = qe - floor
        low, high = cells == floor, cells == floor + 1
        h = (1 - frac) * low + frac * high
        if not derivatives:
            return h, None, None
        return h, high.astype(q.dtype) - low.astype(q.dtype), None
    t = cells - qe
    if version == "gauss":
        spread = xp.abs(sig[..., None]) + GAUSS_SIG_OFFSET
        z = t / spread
        h = xp.exp(-0.5 * (z * z))
        if not derivatives:
            return h, None, None
        dq = h * z / spread
        return h, dq, dq * z * xp.sign(sig[..., None])
    half_width = 1.0 if version == "v1" else xp.abs(sig[..., None]) + MAX_SIG_OFFSET
    height = half_width - xp.abs(t)
    active = height > 0
    h = height * active
    if not derivatives:
        return h, None, None
    dq = xp.sign(t) * active
    dsig = xp.sign(sig[..., None]) * active if version == "max" else None
    return h, dq, dsig


def _outer(profiles, xp):
    """``(B, KC, n_2 * ... * n_D)``: the products of the profiles of axes 2..D (ones for
    D = 1)."""
    if not profiles:
        return None
    result = profiles[0]
    for h in profiles[1:]:
        result = (result[..., :, None] * h[..., None, :]).reshape(
            result.shape[0], result.shape[1], -1)
    return result


def _product_of(values, skip=None):
    result = None
    for i, v in enumerate(values):
        if i == skip:
            continue
        result = v if result is None else result * v
    return result


def construct_kernel(weight, P, SIG, dilated_kernel_size, version="gauss", check_range=True):
    """The dense DCLS kernel: every tap's weight interpolated at its learnable position.

    Parameters
    ----------
    weight : array or Tensor
        ``(Cout, Cin/groups, KC)``, float32 or float64: one weight per tap (``KC`` taps,
        dcls's ``kernel_count``).
    P : array or Tensor
        ``(D, Cout, Cin/groups, KC)``, same dtype and device: ``P[d]`` is each tap's
        offset along kernel axis ``d`` from the centre cell ``dilated_kernel_size[d] // 2``
        (fractional; see the module docstring for the axis convention and
        :func:`from_dcls_positions` for dcls 0.1.1's).
    SIG : array or Tensor or None
        The spreads, shaped as ``P``: required by ``'gauss'`` (standard deviation
        ``|SIG| + 0.27`` per axis) and ``'max'`` (half-width ``|SIG| + 1``); ``'v0'`` and
        ``'v1'`` take None (an array is checked and ignored).
    dilated_kernel_size : int or D ints (>= 1)
        The size of the constructed kernel.
    version : {'gauss', 'v1', 'v0', 'max'}
        The interpolation (formulas in the module docstring).
    check_range : bool
        Refuse positions outside the dilated kernel, ``|P[d]| > dilated_kernel_size[d] //
        2`` (and NaN). One host read of a flag (a device synchronisation on a GPU); pass
        False to skip it (a tap outside then keeps whatever its interpolation leaves
        inside: nothing for ``'v0'`` / ``'v1'`` far away, a Gaussian tail for ``'gauss'``).

    Returns
    -------
    ``(Cout, Cin/groups, *dilated_kernel_size)`` of weight's dtype, on its device: a Tensor
    when any input is one (recording the gradients of those that require one), a plain
    array otherwise.

    Raises
    ------
    TypeError / ValueError naming the argument: an unknown version, shapes that do not
    match (weight ``(Cout, Cin/g, KC)``, P ``(D, Cout, Cin/g, KC)``, SIG as P), a missing
    SIG for 'gauss' / 'max', non-positive or wrongly many dilated sizes, dtypes other than
    one of float32 / float64 shared by all, arrays on two devices, and (``check_range``) P
    outside the dilated kernel.
    """
    where = "construct_kernel"
    w, p, sig, sizes, version, xp = _check_inputs(weight, P, SIG, dilated_kernel_size,
                                                  version, check_range, where)
    uses_sig = version in _SPREAD_VERSIONS
    need_w = isinstance(weight, Tensor) and weight.requires_grad
    need_p = isinstance(P, Tensor) and P.requires_grad
    need_sig = uses_sig and isinstance(SIG, Tensor) and SIG.requires_grad

    cout, cin_g, kc = (int(s) for s in w.shape)
    d_axes = len(sizes)
    b = cout * cin_g
    w2 = w.reshape(b, kc)
    positions = [p[d].reshape(b, kc) + (n // 2) for d, n in enumerate(sizes)]
    spreads = [sig[d].reshape(b, kc) if uses_sig else None for d in range(len(sizes))]
    profiles = [_profile(q, s, n, version, xp, False)[0]
                for q, s, n in zip(positions, spreads, sizes)]
    normalised = version != "v0"
    if normalised:
        sums = [h.sum(axis=-1) for h in profiles]                     # (B, KC) each
        scale = 1 / (_product_of(sums) + NORMALISER_EPS)
        a = w2 * scale
    else:
        a = w2
    first = a[..., None] * profiles[0]                               # (B, KC, n_1)
    rest = _outer(profiles[1:], xp)                                  # (B, KC, R) or None
    if rest is None:
        kernel = first.sum(axis=1)
    else:
        kernel = xp.matmul(xp.swapaxes(first, 1, 2), rest)           # (B, n_1, R)
    kernel = xp.ascontiguousarray(kernel).reshape((cout, cin_g) + sizes)

    inputs = (weight, P, SIG) if uses_sig else (weight, P)
    if not any(isinstance(v, Tensor) for v in inputs):
        return kernel

    def vjp(g):
        g = g.astype(w.dtype, copy=False).reshape(b, sizes[0], -1)   # (B, n_1, R)
        if rest is None:
            grad_first = xp.broadcast_to(g.reshape(b, 1, sizes[0]), first.shape)
        else:
            grad_first = xp.matmul(rest, xp.swapaxes(g, 1, 2))       # (B, KC, n_1)
        grad_a = (grad_first * profiles[0]).sum(axis=-1)             # (B, KC)
        grads = [None, None, None] if uses_sig else [None, None]
        if need_w:
            grads[0] = (grad_a * scale if normalised else grad_a).reshape(w.shape)
        if not (need_p or need_sig):
            return tuple(grads)
        grad_h = [grad_first * a[..., None]]
        if d_axes > 1:
            grad_rest = xp.matmul(first, g)                          # (B, KC, R)
            grad_h.extend(_split_outer(grad_rest, profiles[1:], b, kc))
        if normalised:
            grad_z = -grad_a * a * scale                              # d/d(prod of sums)
            for d in range(d_axes):
                others = _product_of(sums, skip=d)
                grad_sum = grad_z if others is None else grad_z * others
                grad_h[d] = grad_h[d] + grad_sum[..., None]
        # the profiles' derivatives, recomputed here: less memory held across the
        # convolution that usually follows
        dq, dsig = [], []
        for q, s, n in zip(positions, spreads, sizes):
            _, h_q, h_s = _profile(q, s, n, version, xp, True)
            dq.append(h_q)
            dsig.append(h_s)
        if need_p:
            grads[1] = xp.stack([(gh * h_q).sum(axis=-1) for gh, h_q in zip(grad_h, dq)]
                                ).reshape(p.shape)
        if need_sig:
            grads[2] = xp.stack([(gh * h_s).sum(axis=-1) for gh, h_s in zip(grad_h, dsig)]
                                ).reshape(p.shape)
        return tuple(grads)

    return record(kernel, inputs, vjp)


def _split_outer(grad_rest, profiles, b, kc):
    """Given the gradient ``(B, KC, n_2 ... n_D)`` of the outer product of ``profiles``
    (axes 2..D), each profile's gradient ``(B, KC, n_d)``."""
    if len(profiles) == 1:
        return [grad_rest]
    sizes = [h.shape[-1] for h in profiles]
    full = grad_rest.reshape((b, kc) + tuple(sizes))
    grads = []
    for d in range(len(profiles)):
        t = full
        for e, h in enumerate(profiles):
            if e == d:
                continue
            shape = [b, kc] + [1] * len(sizes)
            shape[2 + e] = sizes[e]
            t = (t * h.reshape(shape)).sum(axis=2 + e, keepdims=True)
        grads.append(t.reshape(b, kc, sizes[d]))
    return grads


# -- the convolution -------------------------------------------------------------------------
def dcls_conv(x, weight, P, SIG, bias, dilated_kernel_size, stride=1, padding=0, groups=1,
              version="gauss", check_range=True, layout="NCHW", method="auto"):
    """DCLS convolution: PyTorch's cross-correlation of ``x`` with the DCLS kernel, either
    constructed (:func:`construct_kernel`, then :func:`sparsegrid.denseconv.conv` with
    dilation 1) or construct-free (one GEMM per integer kernel offset some tap touches).

    Parameters
    ----------
    x : array or Tensor
        ``(N, Cin, S1, ..., SD)`` (channels first, as DCLS; ``layout='NHWC'`` etc. for
        channels last, as :func:`~sparsegrid.denseconv.conv`).
    weight, P, SIG, dilated_kernel_size, version, check_range
        As :func:`construct_kernel`; ``weight`` is ``(Cout, Cin/groups, KC)``.
    bias : array or Tensor or None
        ``(Cout,)``.
    stride, padding, groups
        As :func:`~sparsegrid.denseconv.conv` (``padding`` ints, ``'same'`` or
        ``'valid'``; DCLS layers usually pad ``dilated_kernel_size // 2``).
    method : {'auto', 'construct', 'construct_free'}
        ``'construct'`` builds the dense ``(Cout, Cin/g, *n)`` kernel and convolves with
        all ``prod(n)`` of its cells. ``'construct_free'`` (bilinear versions ``'v0'`` /
        ``'v1'`` only) spreads each tap onto its ``2^D`` integer corners, groups the (tap,
        corner) pairs by kernel offset and runs one GEMM per distinct offset touched by
        some filter, on shifted views of the padded input: the cost follows the number of
        touched offsets (:func:`touched_kernel_cells`), not ``prod(n)``; same result to
        rounding, same gradients. ``'auto'`` (default) takes construct-free when the
        version is bilinear and at most :data:`AUTO_TOUCHED_FRACTION` of the cells are
        touched, else construct (``'gauss'`` / ``'max'`` touch every cell: always
        construct). Deciding costs one host read of the touched offsets (bilinear only); the
        construct-free path itself reads a few sizes back on a GPU (the touched cells,
        boolean selections), so it pays off on large kernels, not tiny ones.

    Returns
    -------
    ``(N, Cout, O1, ..., OD)`` with ``O = floor((S + 2 pad - n) / stride) + 1``; a Tensor
    when any input is one.

    Raises
    ------
    The errors of :func:`construct_kernel` and of :func:`~sparsegrid.denseconv.conv`
    (channels not matching ``groups``, a dilated kernel larger than the padded input, ...);
    ValueError for an unknown ``method`` or ``'construct_free'`` with 'gauss' / 'max'.
    """
    where = "dcls_conv"
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"{where}: method must be one of {METHODS}; got {method!r}")
    xd = _array(x, "x", where)
    pd, wd = data_of(P), data_of(weight)
    if getattr(pd, "ndim", None) == 4 and xd.ndim != int(pd.shape[0]) + 2:
        raise ValueError(f"{where}: x must have {int(pd.shape[0]) + 2} dimensions (N, C, S1, "
                         f"..., SD) for P of shape {tuple(pd.shape)} (D = {int(pd.shape[0])} "
                         f"kernel axes); got shape {tuple(xd.shape)}")
    if hasattr(wd, "dtype") and xd.dtype != wd.dtype:
        raise TypeError(f"{where}: x's dtype {xd.dtype} differs from weight's {wd.dtype}; "
                        f"convert one (astype)")
    w, p, _, sizes, version, xp = _check_inputs(weight, P, SIG, dilated_kernel_size,
                                                version, check_range, where)
    if method == "construct_free" and version not in CONSTRUCT_FREE_VERSIONS:
        raise ValueError(f"{where}: method='construct_free' computes the bilinear versions "
                         f"{CONSTRUCT_FREE_VERSIONS}; version {version!r} touches every cell "
                         f"of the kernel (use 'construct' or 'auto')")
    if method != "construct" and version in CONSTRUCT_FREE_VERSIONS:
        corners = _Corners(w, p, sizes, version, xp)
        if method == "construct_free" or \
                len(corners.touched) <= AUTO_TOUCHED_FRACTION * corners.cells:
            backend.require_same_device("x", xd, "weight", w)
            kernel = _compact_kernel(weight, P, corners)
            return _offset_conv(x, kernel, corners.taps, sizes, bias, stride, padding,
                                groups, layout)
    kernel = construct_kernel(weight, P, SIG, dilated_kernel_size, version, False)
    return denseconv.conv(x, kernel, bias, stride=stride, padding=padding, dilation=1,
                          groups=groups, layout=layout)


def touched_kernel_cells(P, dilated_kernel_size, version="v1"):
    """The integer kernel offsets (cells of the dilated kernel, as a ``(S, D)`` int array,
    row-major order) that some tap of a bilinear version touches: the cells the
    construct-free path of :func:`dcls_conv` runs one GEMM for. ``P`` as
    :func:`construct_kernel`'s (a ``'v1'`` tap at an integer position touches one cell, a
    ``'v0'`` tap also the next one: its position gradient lives there)."""
    where = "touched_kernel_cells"
    version = _version(version, where)
    if version not in CONSTRUCT_FREE_VERSIONS:
        raise ValueError(f"{where}: version must be one of {CONSTRUCT_FREE_VERSIONS}; got "
                         f"{version!r}")
    p = _array(P, "P", where)
    if p.ndim != 4:
        raise ValueError(f"{where}: P must be (ndim, Cout, Cin/groups, kernel_count); got "
                         f"shape {tuple(p.shape)}")
    xp = backend.array_namespace(p)
    sizes = _kernel_size(dilated_kernel_size, int(p.shape[0]), where)
    corners = _Corners(xp.ones(p.shape[1:], p.dtype), p, sizes, version, xp)
    return np.array(corners.taps, dtype=np.int64).reshape(-1, len(sizes))


class _Corners:
    """Every (filter, tap, corner) of a bilinear version: its kernel cell, coefficient and
    position derivative, and the distinct cells touched (one host read)."""

    def __init__(self, w, p, sizes, version, xp):
        d_axes = len(sizes)
        self.sizes, self.version, self.xp = sizes, version, xp
        self.shape = tuple(int(s) for s in w.shape)
        cout, cin_g, kc = self.shape
        b = self.b = cout * cin_g
        self.cells = int(np.prod(sizes))
        self.normalised = version == "v1"
        bits = xp.asarray(np.array([0, 1], dtype=p.dtype))
        self.coef, self.dcoef, valid, cell = [], [], [], []
        for d, n in enumerate(sizes):
            q = p[d].reshape(b, kc) + (n // 2)
            f = xp.floor(q)
            r = (q - f)[..., None]                                   # (B, KC, 1)
            c = f[..., None] + bits                                  # (B, KC, 2) cells
            ok = (c >= 0) & (c <= n - 1)
            sign = 2 * bits - 1                                      # -1, +1
            if version == "v1":
                # relu(1 - |t|): zero derivative at integer positions (PyTorch's kinks);
                # the upper corner of an integer position carries neither mass nor gradient
                moving = (r > 0)
                ok = ok & ((bits == 0) | moving)
                dc = sign * moving
            else:
                dc = sign + 0 * r
            self.coef.append(xp.where(ok, (1 - bits) * (1 - r) + bits * r, 0))
            self.dcoef.append(xp.where(ok, dc, 0))
            valid.append(ok)
            cell.append(xp.where(ok, c, 0).astype(np.int64))
        # corners: (B, KC, 2, ..., 2) -> (B, KC, 2^D), axis 0's bit slowest
        lin = xp.zeros((b, kc) + (1,) * d_axes, np.int64)
        keep = xp.ones((b, kc) + (1,) * d_axes, bool)
        pitch = 1
        for d in range(d_axes - 1, -1, -1):
            shape = (b, kc) + tuple(2 if e == d else 1 for e in range(d_axes))
            lin = lin + cell[d].reshape(shape) * pitch
            keep = keep & valid[d].reshape(shape)
            pitch *= sizes[d]
        corners = 2 ** d_axes
        lin = xp.broadcast_to(lin, (b, kc) + (2,) * d_axes).reshape(b, kc, corners)
        self.keep = xp.broadcast_to(keep, (b, kc) + (2,) * d_axes).reshape(b, kc, corners)
        touched = backend.to_numpy(xp.unique(lin[self.keep])).astype(np.int64)
        if touched.size == 0:           # every tap off the kernel: one zero GEMM
            touched = np.zeros(1, np.int64)
        self.touched = touched
        self.taps = [tuple(int(v) for v in np.unravel_index(t, sizes)) for t in touched]
        slot = xp.searchsorted(xp.asarray(touched), lin)
        slot = xp.minimum(slot, touched.size - 1)
        rows = xp.arange(b, dtype=np.int64).reshape(b, 1, 1) * touched.size
        self.key = (rows + slot)[self.keep]                          # (kept,)

    def expand(self, per_axis, d_skip=None, replace=None):
        """The product over axes of ``per_axis[d]`` (B, KC, 2), as (B, KC, 2^D); axis
        ``d_skip`` takes ``replace`` instead."""
        xp, b, kc = self.xp, self.b, self.shape[2]
        d_axes = len(self.sizes)
        out = None
        for d in range(d_axes):
            v = replace if d == d_skip else per_axis[d]
            shape = (b, kc) + tuple(2 if e == d else 1 for e in range(d_axes))
            v = v.reshape(shape)
            out = v if out is None else out * v
        return xp.broadcast_to(out, (b, kc) + (2,) * d_axes).reshape(b, kc, -1)


def _compact_kernel(weight, P, corners):
    """The kernel restricted to the touched cells, ``(Cout, Cin/g, S)``: each tap's weight
    times its corner coefficients, summed per cell (a Tensor when an input is one)."""
    xp = corners.xp
    w = data_of(weight)
    cout, cin_g, kc = corners.shape
    b, s = corners.b, len(corners.touched)
    w2 = w.reshape(b, kc)
    sums = [c.sum(axis=-1) for c in corners.coef] if corners.normalised else None
    if corners.normalised:
        scale = 1 / (_product_of(sums) + NORMALISER_EPS)
        a = w2 * scale
    else:
        a = w2
    profile = corners.expand(corners.coef)                           # (B, KC, 2^D)
    values = (a[..., None] * profile)[corners.keep]
    # per cell, the sum of its (tap, corner) terms: a segment sum in float64, in term order
    # (deterministic on every backend; CuPy's bincount with weights adds with atomics)
    kernel, _ = backend.kernels(values).segment_reduce(
        values.astype(np.float64).reshape(-1, 1), corners.key, b * s, "sum")
    kernel = kernel.reshape(-1).astype(w.dtype)
    kernel = kernel.reshape(cout, cin_g, s)
    inputs = (weight, P)
    if not any(isinstance(v, Tensor) for v in inputs):
        return kernel
    need_w = isinstance(weight, Tensor) and weight.requires_grad
    need_p = isinstance(P, Tensor) and P.requires_grad

    def vjp(g):
        g = g.astype(w.dtype, copy=False).reshape(-1)
        gv = xp.zeros(corners.keep.shape, w.dtype)
        gv[corners.keep] = g[corners.key]                            # (B, KC, 2^D)
        grad_a = (gv * profile).sum(axis=-1)                         # (B, KC)
        grads = [None, None]
        if need_w:
            grads[0] = (grad_a * scale if corners.normalised else grad_a).reshape(w.shape)
        if need_p:
            grad_z = -grad_a * a * scale if corners.normalised else None
            ga = gv * a[..., None]
            per_axis = []
            for d in range(len(corners.sizes)):
                part = (ga * corners.expand(corners.coef, d, corners.dcoef[d])).sum(axis=-1)
                if corners.normalised:
                    others = _product_of(sums, skip=d)
                    grad_sum = grad_z if others is None else grad_z * others
                    part = part + grad_sum * corners.dcoef[d].sum(axis=-1)
                per_axis.append(part)
            grads[1] = xp.stack(per_axis).reshape(data_of(P).shape)
        return tuple(grads)

    return record(kernel, inputs, vjp)


class _KernelShape:
    """What :class:`sparsegrid.denseconv._Plan` reads of a weight: shape, ndim, dtype."""

    def __init__(self, shape, dtype):
        self.shape, self.ndim, self.dtype = tuple(shape), len(shape), dtype


def _offset_conv(x, kernel, taps, sizes, bias, stride, padding, groups, layout):
    """The convolution with a kernel of size ``sizes`` that is zero outside the cells
    ``taps``: ``kernel`` ``(Cout, Cin/g, len(taps))`` holds those cells. denseconv's plan
    and GEMMs, over the listed taps only (forward by its shift or gather path, backward by
    its gather path, which takes any set of taps)."""
    xd = data_of(x)
    kd = data_of(kernel)
    bd = None if bias is None else _array(bias, "bias", "dcls_conv")
    xp = backend.array_namespace(xd, kd, bd)
    if bd is not None:
        backend.require_same_device("bias", bd, "x", xd)
    cout, cin_g, s = (int(v) for v in kd.shape)
    plan = denseconv._Plan(xd, _KernelShape((cout, cin_g) + tuple(sizes), kd.dtype), bd,
                           stride, padding, 1, groups, layout, None)
    plan.taps = list(taps)
    plan.offsets = [sum(t * pt for t, pt in zip(tap, plan.pitch)) for tap in plan.taps]
    w_taps = xp.ascontiguousarray(
        kd.reshape(plan.groups, plan.cout_g, cin_g, s).transpose(3, 0, 2, 1))
    back = copy.copy(plan)
    back.method = "gather"           # the gather backward takes any subset of the taps
    return denseconv._run(x, kernel, bias, xd, bd, plan, w_taps, kd.shape, xp, back)


# -- dcls 0.1.1's positions -----------------------------------------------------------------
def from_dcls_positions(P, SIG, dilated_kernel_size, version):
    """Positions and spreads of dcls 0.1.1's construct modules, in this module's axis
    convention: ``construct_kernel(weight, *from_dcls_positions(P, SIG, n, version), n,
    version)`` is the kernel dcls 0.1.1 builds from ``(weight, P, SIG)``.

    dcls 0.1.1's ``'v1'``, ``'gauss'`` and ``'max'`` compare ``P[d]`` (centred on
    ``n[d] // 2``) with the cell index of kernel axis ``D - 1 - d``, so along axis ``e =
    D - 1 - d`` the tap sits at ``P[d] + n[d] // 2``: here that is
    ``P'[e] = P[d] + n[d] // 2 - n[e] // 2`` and ``SIG'[e] = SIG[d]`` (for square kernels
    simply ``P[::-1]``, ``SIG[::-1]``). Its ``'v0'`` already uses axis ``d``: returned
    unchanged. For a non-square kernel the converted positions may lie outside this
    convention's clamp range (upstream's taps could sit outside its kernel); construct
    with ``check_range=False`` to reproduce them.

    Parameters
    ----------
    P, SIG : arrays (NumPy or CuPy) ``(D, Cout, Cin/groups, KC)``; ``SIG`` None for 'v0' /
        'v1' (as dcls registers it).
    dilated_kernel_size : int or D ints; version : one of :data:`VERSIONS`.

    Returns
    -------
    ``(P', SIG')``: new arrays (``SIG'`` None when ``SIG`` is None).
    """
    where = "from_dcls_positions"
    version = _version(version, where)
    p = _array(P, "P", where)
    if p.ndim != 4:
        raise ValueError(f"{where}: P must be (ndim, Cout, Cin/groups, kernel_count); got "
                         f"shape {tuple(p.shape)}")
    sig = None if SIG is None else _array(SIG, "SIG", where)
    if sig is not None and tuple(sig.shape) != tuple(p.shape):
        raise ValueError(f"{where}: SIG must have P's shape {tuple(p.shape)}; got "
                         f"{tuple(sig.shape)}")
    sizes = _kernel_size(dilated_kernel_size, int(p.shape[0]), where)
    xp = backend.array_namespace(p, sig)
    if version == "v0":
        return p.copy(), None if sig is None else sig.copy()
    d_axes = len(sizes)
    shift = np.array([sizes[d] // 2 - sizes[d_axes - 1 - d] // 2 for d in range(d_axes)],
                     dtype=p.dtype)[::-1]      # indexed by the new axis e = D - 1 - d
    new_p = xp.ascontiguousarray(p[::-1]) + xp.asarray(shift.copy()).reshape(-1, 1, 1, 1)
    new_sig = None if sig is None else xp.ascontiguousarray(sig[::-1])
    return new_p, new_sig
