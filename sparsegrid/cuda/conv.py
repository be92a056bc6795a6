"""Gather-GEMM-scatter convolution on the GPU (forward and backward).

Per kernel offset k with pairs: gather the input rows (``cupy.take``), multiply by W[k]
(cuBLAS through ``cupy.matmul``), add the products into their output rows
(``scatter_add_rows``: within one offset each output row appears once, so a thread per
(row, channel) and no atomics). Offsets run one after another in increasing order, the
identity offset of a submanifold rulebook first (one GEMM over all rows, no gather) with
the bias, so every output sums its terms in a fixed order: the same bits run after run.

float16 data: the GEMMs take float16 inputs with float32 compute (cuBLAS), each offset's
product is rounded to float16, and the offsets are summed in a float32 accumulator rounded
once at the end.

The backend's plan (:func:`prepare_conv`, cached on the rulebook) is the rulebook's
``offset_ptr`` on the host and the offsets that have pairs: read once per rulebook, so a
layer launches its kernels without reading anything back.
"""

from __future__ import annotations

import contextlib

import numpy as np

from . import _compile, autotune, implicit_gemm
from ._runtime import cp


class ConvPlan:
    """The CUDA backend's host-side view of one rulebook (private to ``sparsegrid.cuda``).

    Attributes
    ----------
    ptr : list of int
        ``offset_ptr`` on the host.
    offsets : list of int
        Offsets with pairs, identity excluded, increasing.
    identity_offset, n_in, n_out : int
    in_idx, out_idx : int32 C-contiguous device arrays
        The rulebook's pairs as the kernels read them (a rulebook built from other
        integer arrays is converted once here, never reinterpreted).
    """

    __slots__ = ("ptr", "offsets", "identity_offset", "n_in", "n_out", "in_idx", "out_idx")

    def __init__(self, ptr, identity_offset, n_in, n_out, in_idx, out_idx):
        self.in_idx = cp.ascontiguousarray(in_idx, dtype=np.int32)
        self.out_idx = cp.ascontiguousarray(out_idx, dtype=np.int32)
        self.ptr = [int(p) for p in ptr]
        self.identity_offset = int(identity_offset)
        self.offsets = [k for k in range(len(ptr) - 1)
                        if self.ptr[k + 1] > self.ptr[k] and k != self.identity_offset]
        self.n_in, self.n_out = int(n_in), int(n_out)

    def __repr__(self):
        return (f"ConvPlan(n_out={self.n_out}, pairs={self.ptr[-1] if self.ptr else 0}, "
                f"offsets={len(self.offsets)}, identity_offset={self.identity_offset})")


def prepare_conv(rulebook):
    """The CUDA backend's plan for ``rulebook``, built on first use and cached on it (and
    shared with its transpose). Checks the rulebook's invariants once
    (:meth:`Rulebook.check_pairs`: a few host reads)."""
    def build():
        partner = rulebook.transpose()
        if partner.has_derived("cuda_conv_plan"):
            found = partner.derived("cuda_conv_plan", None)
            return ConvPlan(found.ptr, found.identity_offset, rulebook.n_in, rulebook.n_out,
                            found.out_idx, found.in_idx)
        ptr = rulebook.check_pairs()          # offset_ptr on the host, invariants checked
        return ConvPlan(ptr, rulebook.identity_offset, rulebook.n_in, rulebook.n_out,
                        rulebook.in_idx, rulebook.out_idx)

    return rulebook.derived("cuda_conv_plan", build)


def _check_rows(array, n, name):
    if array.ndim != 2 or array.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n}, C) for this rulebook; got "
                         f"{array.shape}")


def _check_dtypes(features, weight, bias):
    """The kernels are instantiated per data type: weight and bias must be the features'."""
    for name, array in (("weight", weight), ("bias", bias)):
        if array is not None and array.dtype != features.dtype:
            raise TypeError(f"{name} must have the features' dtype {features.dtype}; got "
                            f"{array.dtype}")


def _output_channels(weight):
    return weight.shape[-1] * (weight.shape[1] if weight.ndim == 4 else 1)


def _matmul(x, w):
    """x (n, Cin) times one offset's weight (Cin, Cout) or grouped (G, Cin/G, Cout/G)."""
    if w.ndim == 2:
        return cp.matmul(x, w)
    groups, cin_g, cout_g = w.shape
    xg = x.reshape(len(x), groups, cin_g).transpose(1, 0, 2)
    return cp.ascontiguousarray(cp.matmul(xg, w).transpose(1, 0, 2)).reshape(
        len(x), groups * cout_g)


@contextlib.contextmanager
def cublas_compute(dtype):
    """While :func:`sparsegrid.cuda.set_tf32` is on, cuBLAS float32 GEMMs inside run as
    TF32 (CuPy's compute-type switch for float32, restored afterwards), so gather-GEMM
    honours the setting as the fused kernel does. A no-op for other dtypes, with TF32
    off, or where the array library has no such switch (the test suite's emulator)."""
    linalg = getattr(getattr(cp, "_core", None), "_routines_linalg", None)
    if np.dtype(dtype) != np.float32 or not autotune.get_tf32() or linalg is None:
        yield
        return
    previous = linalg.get_compute_type(np.dtype(np.float32))
    linalg.set_compute_type(np.dtype(np.float32), linalg.COMPUTE_TYPE_TF32)
    try:
        yield
    finally:
        linalg.set_compute_type(np.dtype(np.float32), previous)


def _accumulator(dtype):
    return _compile.ACCUMULATOR[np.dtype(dtype)]


def _finish(acc, dtype):
    """The accumulator as ``dtype`` (a no-op unless float16 data summed in float32)."""
    if acc.dtype == dtype:
        return acc
    out = cp.empty(acc.shape, dtype=dtype)
    _compile.launch("conv.cu", _compile.typed("store_rounded", dtype, True), acc.size, acc,
                    out, np.int64(acc.size))
    return out


def _scatter_add(products, rows, acc):
    _compile.launch("conv.cu", _compile.typed("scatter_add_rows", products.dtype, True),
                    products.size, cp.ascontiguousarray(products), rows, acc,
                    np.int64(len(rows)), np.int64(acc.shape[1]))


def _choose(pass_name, features, weight, rulebook, cout, run):
    """``'gather_gemm'`` or an ``'implicit_gemm:BMxBNxBK'`` candidate for one pass of one
    layer (:mod:`sparsegrid.cuda.autotune`); ``run(candidate)`` performs the pass."""
    setting = autotune.get_conv_algorithm()
    if setting == "gather_gemm" or implicit_gemm.ineligible(features, weight, rulebook):
        return "gather_gemm"
    c_type = implicit_gemm.storage_type(features.dtype)
    cin = features.shape[1]
    vectorised = implicit_gemm._vectorised(c_type, cin, cout, features, weight)
    if pass_name == "wgrad":
        fused = ["implicit_gemm"]
    else:
        fused = [implicit_gemm.tile_name(t) for t in implicit_gemm.tiles(c_type, vectorised)]
    if setting == "implicit_gemm":
        if pass_name == "wgrad":
            return "implicit_gemm"
        return implicit_gemm.tile_name(implicit_gemm.default_tile(
            c_type, vectorised, rulebook.n_out, cout))
    if getattr(cp.cuda, "Event", None) is None:     # nothing to time with: no measuring
        return fused[0] if pass_name == "wgrad" else implicit_gemm.tile_name(
            implicit_gemm.default_tile(c_type, vectorised, rulebook.n_out, cout))
    key = autotune.layer_key(pass_name, rulebook.n_out, rulebook.n_pairs, cin, cout,
                             str(features.dtype), implicit_gemm.device_name())
    return autotune.choose(key, ["gather_gemm", *fused],
                           lambda candidate: implicit_gemm.measure(lambda: run(candidate)))


def conv_forward(features, weight, rulebook, bias=None):
    """Sparse convolution over a rulebook: (n_out, Cout) of ``features.dtype``.

    ``weight`` (K, Cin, Cout) or grouped (K, G, Cin/G, Cout/G), ``bias`` (Cout,) or None.
    Runs the fused implicit-GEMM kernel or gather-GEMM-scatter, as
    :mod:`sparsegrid.cuda.autotune` decides for the layer.
    """
    _check_rows(features, rulebook.n_in, "features")
    _check_dtypes(features, weight, bias)

    def run(candidate):
        if candidate == "gather_gemm":
            return _gather_gemm_forward(features, weight, rulebook, bias)
        return implicit_gemm.forward(features, weight, rulebook, bias,
                                     tile=implicit_gemm.parse_tile(candidate))

    return run(_choose("forward", features, weight, rulebook, _output_channels(weight), run))


def _gather_gemm_forward(features, weight, rulebook, bias=None):
    with cublas_compute(features.dtype):
        return _gather_gemm_forward_body(features, weight, rulebook, bias)


def _gather_gemm_forward_body(features, weight, rulebook, bias=None):
    plan = prepare_conv(rulebook)
    dtype = features.dtype
    features = cp.ascontiguousarray(features)
    width = _output_channels(weight)
    acc_type = _accumulator(dtype)
    identity = plan.identity_offset
    if identity >= 0:
        acc = _matmul(features, weight[identity]).astype(acc_type, copy=False)
        if bias is not None:
            acc += bias.astype(acc_type, copy=False)
    elif bias is not None:
        acc = cp.empty((plan.n_out, width), dtype=acc_type)
        acc[...] = bias.astype(acc_type, copy=False)
    else:
        acc = cp.zeros((plan.n_out, width), dtype=acc_type)
    for k in plan.offsets:
        a, b = plan.ptr[k], plan.ptr[k + 1]
        gathered = cp.take(features, plan.in_idx[a:b], axis=0)
        _scatter_add(_matmul(gathered, weight[k]), plan.out_idx[a:b], acc)
    return _finish(acc, dtype)


def conv_backward(grad_out, features, weight, rulebook, need_features=True, need_weight=True):
    """Gradients of :func:`conv_forward` w.r.t. features (the convolution of ``grad_out``
    over the transposed rulebook with transposed weights) and weight (per offset
    ``features[in_k].T @ grad_out[out_k]``, one GEMM each). Bias: left to the caller."""
    _check_rows(grad_out, rulebook.n_out, "grad_out")
    _check_rows(features, rulebook.n_in, "features")
    _check_dtypes(features, weight, None)
    if grad_out.dtype != features.dtype:
        raise TypeError(f"grad_out must have the features' dtype {features.dtype}; got "
                        f"{grad_out.dtype}")
    grad_out = cp.ascontiguousarray(grad_out)
    features = cp.ascontiguousarray(features)
    grad_features = grad_weight = None
    if need_features:
        transposed = rulebook.transpose()
        weight_t = cp.swapaxes(weight, -1, -2)

        def run_features(candidate):
            if candidate == "gather_gemm":
                return _gather_gemm_forward(grad_out, weight_t, transposed)
            return implicit_gemm.feature_gradient(grad_out, weight, rulebook,
                                                  tile=implicit_gemm.parse_tile(candidate))

        grad_features = run_features(_choose("dgrad", grad_out, weight_t, transposed,
                                             features.shape[1], run_features))
    if need_weight:
        def run_weight(candidate):
            if candidate == "gather_gemm":
                return _weight_gradient(features, grad_out, weight, rulebook)
            return implicit_gemm.weight_gradient(features, grad_out, weight, rulebook)

        grad_weight = run_weight(_choose("wgrad", features, weight, rulebook,
                                         _output_channels(weight), run_weight))
    return grad_features, grad_weight


def _rows_product(x, g, grouped_weight=None):
    if grouped_weight is None:
        return cp.matmul(x.T, g)
    groups, cin_g, cout_g = grouped_weight.shape[1:]
    xg = x.reshape(len(x), groups, cin_g).transpose(1, 2, 0)
    gg = g.reshape(len(g), groups, cout_g).transpose(1, 0, 2)
    return cp.matmul(xg, gg)


def _weight_gradient(features, grad_out, weight, rulebook):
    with cublas_compute(features.dtype):
        return _weight_gradient_body(features, grad_out, weight, rulebook)


def _weight_gradient_body(features, grad_out, weight, rulebook):
    plan = prepare_conv(rulebook)
    grouped = weight if weight.ndim == 4 else None
    grad = cp.zeros(weight.shape, dtype=weight.dtype)
    identity = plan.identity_offset
    if identity >= 0:
        grad[identity] = _rows_product(features, grad_out, grouped)
    for k in plan.offsets:
        a, b = plan.ptr[k], plan.ptr[k + 1]
        x = cp.take(features, plan.in_idx[a:b], axis=0)
        g = cp.take(grad_out, plan.out_idx[a:b], axis=0)
        grad[k] = _rows_product(x, g, grouped)
    return grad


def rows_product(x, g):
    """``x.T @ g`` (one cuBLAS GEMM: reproducible on one stream and GPU; TF32 for float32
    while TF32 is on)."""
    with cublas_compute(x.dtype):
        return cp.matmul(cp.ascontiguousarray(x).T, cp.ascontiguousarray(g))


def rule_sum(features, rulebook):
    """``out[o] = sum of features[i]`` over the rulebook's pairs (unit-weight convolution):
    sum pooling, unpooling and their gradients. One launch per offset with pairs."""
    _check_rows(features, rulebook.n_in, "features")
    plan = prepare_conv(rulebook)
    dtype = features.dtype
    features = cp.ascontiguousarray(features)
    acc_type = _accumulator(dtype)
    channels = features.shape[1]
    if plan.identity_offset >= 0:
        acc = features.astype(acc_type, copy=True)
    else:
        acc = cp.zeros((plan.n_out, channels), dtype=acc_type)
    name = _compile.typed("gather_scatter_add", dtype, True)
    for k in plan.offsets:
        a, b = plan.ptr[k], plan.ptr[k + 1]
        _compile.launch("conv.cu", name, (b - a) * channels, features,
                        plan.in_idx[a:b], plan.out_idx[a:b], acc, np.int64(b - a),
                        np.int64(channels))
    return _finish(acc, dtype)
