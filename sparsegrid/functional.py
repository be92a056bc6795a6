"""Sparse operations on SparseTensors, written once against the kernel contract.

Each op validates its arguments, asks the tensor's Grid for a (cached) rulebook and calls
the kernel of the features' backend. The matching backward kernels live next to the
forward ones in ``sparsegrid.cpu`` (see docs/conventions.md for the op -> kernel table).

Weights are ``(K, Cin, Cout)`` with K = prod(filter_size) offsets in row-major order, last
axis fastest, or ``(K, G, Cin/G, Cout/G)`` for grouped convolutions; ``out[o] += in[i] @
W[k]`` (cross-correlation, no flip).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import backend
from .coords import (check_allocation, normalize_size, normalize_spatial_shape, pack_keys,
                     validate_indices)
from .autodiff import ops
from .autodiff.core import Tensor, data_of, is_grad_enabled, record
from .grid import Grid, Sites
from .tensor import SparseTensor, validate_sparse_features

# SCN's InputLayer mode numbers (measured behaviour: 1 keeps the first row, 2 the last).
INPUT_MODES = {0: "unique", 1: "first", 2: "last", 3: "sum", 4: "mean"}
_MODE_NAMES = ("unique", "first", "last", "sum", "mean", "max")
_GLOBAL_POOL_MODES = ("max", "mean", "sum")


def _differentiable(out, inputs, vjp):
    """Wrap an op's output by the one rule every op follows: an autodiff Tensor when any
    input is a Tensor (recording ``vjp(g) -> one gradient per input`` only when gradients
    are enabled and some input requires one), the plain array when every input is a
    plain array. A Tensor that records nothing costs one small object.

    ``inputs`` may hold None (an absent bias), which never receives a gradient.
    """
    present = [i for i, value in enumerate(inputs) if value is not None]
    if not any(isinstance(inputs[i], Tensor) for i in present):
        return out
    if not is_grad_enabled() or not any(_wants(inputs[i]) for i in present):
        return Tensor(out)

    def vjp_present(g):
        grads = vjp(g)
        return [grads[i] for i in present]

    return record(out, [inputs[i] for i in present], vjp_present)


def _wants(value):
    return isinstance(value, Tensor) and value.requires_grad


def _require_tensor(x, name="x"):
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{name} must be a SparseTensor; got {type(x).__name__}")


def _real(name, value, *, positive=False, lower=None, upper=None):
    """A finite real scalar argument as a Python float; TypeError / ValueError naming it."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":
        value = value.item()           # a 0-d real array is one number
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.integer,
                                                                     np.floating)):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__} {value!r}")
    number = float(value)
    if positive:
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"{name} must be a finite positive number; got {number}")
    elif lower is not None or upper is not None:
        if not (math.isfinite(number) and (lower is None or number >= lower)
                and (upper is None or number <= upper)):
            raise ValueError(f"{name} must be in [{lower}, {upper}]; got {number}")
    elif not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number; got {number}")
    return number


def _check_flag(name, value):
    """A bool, NumPy bool or the ints 0 / 1 (as the nn layers' flags) as a Python bool."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (numbers.Integral, np.integer)) and int(value) in (0, 1):
        return bool(int(value))
    raise TypeError(f"{name} must be a bool; got {type(value).__name__} {value!r}")


def _check_rng(rng):
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, (np.random.Generator, np.random.RandomState)):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)) "
                        f"or None; got {type(rng).__name__} {rng!r}")
    return rng


def _is_array(value):
    return isinstance(value, np.ndarray) or backend.is_cupy_array(value)


_MODULE_METHODS = {np.dtype(np.float32): "float", np.dtype(np.float64): "double",
                   np.dtype(np.float16): "half"}


def _float_dtype_hint(param_dtype, feature_dtype):
    """How to make float16/float32/float64 parameters and features agree (cast the input,
    or convert the module), for a dtype TypeError; '' for other dtypes."""
    if param_dtype not in _MODULE_METHODS or feature_dtype not in _MODULE_METHODS:
        return ""
    method = _MODULE_METHODS[np.dtype(feature_dtype)]
    return (f" (the parameters are {param_dtype}: cast the input features with "
            f".astype(np.{param_dtype}), or the parameters with .astype(np.{feature_dtype}); "
            f"for a Module, module.{method}())")


def statistics_dtype(dtype):
    """The dtype of batch-norm statistics (batch and running) for features of ``dtype``:
    float32 for float16 features (mixed precision: variances of float16 data need
    float32's range and precision), the features' own dtype otherwise."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype == np.float16 else dtype


def column_sum(g):
    """``g.sum(axis=0)`` (a bias gradient); float16 summed in float32, rounded once."""
    return ops.sum_of(g, axis=0)


def _check_channel_vector(x, name, value, op, writeable=False, statistics=False):
    """A per-channel parameter: None, or an array / autodiff Tensor of shape (C,) and the
    features' dtype (same library as the tensor) -- for ``statistics`` (running mean and
    variance), the :func:`statistics_dtype` of the features' dtype; ``writeable`` for
    buffers updated in place. TypeError / ValueError naming ``name``."""
    if value is None:
        return
    channels = x.n_channels
    data = data_of(value)
    expected = statistics_dtype(x.dtype) if statistics else x.dtype
    whose = "the features' dtype" if expected == x.dtype else \
        f"the statistics' dtype (for {x.dtype} features)"
    if not _is_array(data):
        raise TypeError(f"{name} must be a NumPy/CuPy array or an autodiff Tensor of shape "
                        f"({channels},) and {whose} {expected}; got {type(value).__name__}")
    if data.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},); got {data.shape}")
    if data.dtype != expected:
        hint = _float_dtype_hint(data.dtype, x.dtype) if expected == x.dtype else (
            " (mixed precision keeps running statistics in float32; Module.half() does)")
        raise TypeError(f"{name} must be an array of {whose} {expected}; got "
                        f"{data.dtype}{hint}")
    backend.require_same_device(name, data, "the input tensor", x.indices)   # or TypeError/ValueError
    if writeable and isinstance(data, np.ndarray) and not data.flags.writeable:
        raise ValueError(f"{name} must be a writeable array: {op} updates it in place in "
                         "training; got a read-only array (pass a copy, np.array(...))")


def _check_weight(x, weight, bias, n_offsets, name="weight"):
    """Validate a convolution weight (and bias) against the input; return Cout."""
    _check_dtype(x, weight, name)
    cin = x.n_channels
    if weight.ndim == 3:
        k, w_cin, cout = weight.shape
        groups = 1
    elif weight.ndim == 4:
        k, groups, cin_g, cout_g = weight.shape
        w_cin, cout = groups * cin_g, groups * cout_g
    else:
        raise ValueError(f"{name} must have shape (K, Cin, Cout) or (K, G, Cin/G, Cout/G); "
                         f"got {weight.shape}")
    if k != n_offsets:
        raise ValueError(f"{name} has {k} kernel offsets but the filter has {n_offsets} "
                         f"(prod(filter_size)); got shape {weight.shape}")
    if w_cin != cin:
        raise ValueError(f"{name} expects {w_cin} input channels ({groups} group(s)) but the "
                         f"input has {cin}; got shape {weight.shape}")
    _check_bias(x, bias, cout)
    return cout


def _check_dtype(x, value, name):
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        raise TypeError(f"{name} must be an array; got {type(value).__name__}")
    if dtype != x.dtype:
        hint = ""
        if dtype in _MODULE_METHODS:
            hint = (f" (the parameters are {dtype}: cast the input features with "
                    f".astype({str(dtype)!r}), or a Module with .float() / .double() / "
                    f".half())")
        raise TypeError(f"{name} must be an array of the features' dtype {x.dtype}; got "
                        f"{dtype}{hint}")
    backend.require_same_device(name, data_of(value), "the input tensor", x.indices)


def _check_bias(x, bias, cout):
    if bias is None:
        return
    _check_dtype(x, bias, "bias")
    if bias.shape != (cout,):
        raise ValueError(f"bias must have shape ({cout},); got {bias.shape}")


def _convolve(x, weight, bias, rulebook):
    features, w, b = data_of(x.features), data_of(weight), data_of(bias)
    kernels = x.kernels
    out = kernels.conv_forward(features, w, rulebook, b)

    def vjp(g):
        grad_features, grad_weight = kernels.conv_backward(
            g, features, w, rulebook, need_features=_wants(x.features),
            need_weight=_wants(weight))
        return grad_features, grad_weight, (column_sum(g) if _wants(bias) else None)

    return _differentiable(out, (x.features, weight, bias), vjp)


def submanifold_conv(x, weight, bias=None, filter_size=3, dilation=1):
    """Submanifold convolution: output sites and rows are the input's.

    ``out[o] = bias + sum_k in[o + (delta_k - f//2) * dilation] @ W[k]`` over active
    neighbours; for even f the window of axis d is ``[o - f/2, o + f/2 - 1]``.

    Parameters
    ----------
    x : SparseTensor (N, Cin)
    weight : (K, Cin, Cout) or (K, G, Cin/G, Cout/G)
    bias : (Cout,) or None
    filter_size, dilation : int or D ints
    """
    _require_tensor(x)
    filter_size = normalize_size(filter_size, x.dimension, "filter_size")
    dilation = normalize_size(dilation, x.dimension, "dilation")
    _check_weight(x, weight, bias, math.prod(filter_size))     # before building anything
    rulebook = x.grid.submanifold(x.sites, filter_size, dilation, op="submanifold_conv")
    return x.with_features(_convolve(x, weight, bias, rulebook))


def conv(x, weight, bias=None, filter_size=2, stride=2):
    """Strided convolution (SCN Convolution): spatial size (in - f) / s + 1, exactly.

    An output site is active iff its window ``[o*s, o*s + f - 1]`` holds an active input;
    output rows are sorted by (batch, x1, ..., xD). Raises ValueError when the input size
    does not fit the filter and stride (the message names sizes that would).
    """
    _require_tensor(x)
    filter_size = normalize_size(filter_size, x.dimension, "filter_size")
    stride = normalize_size(stride, x.dimension, "stride")
    _check_weight(x, weight, bias, math.prod(filter_size))
    rulebook, sites = x.grid.strided(x.sites, filter_size, stride, op="conv")
    return SparseTensor._on(_convolve(x, weight, bias, rulebook), sites, x.grid)


def randomized_conv(x, weight, bias=None, filter_size=2, stride=2, rng=None):
    """Strided convolution with randomly spaced windows (SCN RandomizedStrideConvolution
    in training mode): see :meth:`Grid.randomized_strided`. ``rng`` is a NumPy Generator.

    Output size, filter and weights as :func:`conv`; only the window starts move.
    """
    _require_tensor(x)
    filter_size = normalize_size(filter_size, x.dimension, "filter_size")
    stride = normalize_size(stride, x.dimension, "stride")
    _check_weight(x, weight, bias, math.prod(filter_size))
    rng = _check_rng(rng)
    rulebook, sites = x.grid.randomized_strided(x.sites, filter_size, stride, rng,
                                                op="randomized_conv")
    return SparseTensor._on(_convolve(x, weight, bias, rulebook), sites, x.grid)


def permutohedral_conv(x, weight, bias=None):
    """Submanifold convolution over the d*d + d + 1 offsets of a permutohedral lattice.

    ``weight`` is (d*d + d + 1, Cin, Cout) (or grouped), offsets in the order of
    :func:`sparsegrid.coords.permutohedral_offsets`; the input's coordinates should be
    lattice coordinates (see :func:`sparsegrid.coords.permutohedral_basis`).
    """
    from .coords import permutohedral_offsets
    _require_tensor(x)
    d = x.dimension
    _check_weight(x, weight, bias, d * d + d + 1)
    rulebook = x.grid.lattice(x.sites, permutohedral_offsets(d), "permutohedral",
                              op="permutohedral_conv")
    return x.with_features(_convolve(x, weight, bias, rulebook))


def neighbour_features(x, filter_size=3, dilation=1):
    """Each site's neighbours' features side by side: (N, K * C), block k holding the
    neighbour at submanifold offset k (zeros where it is inactive). ShapeContext."""
    _require_tensor(x)
    filter_size = normalize_size(filter_size, x.dimension, "filter_size")
    dilation = normalize_size(dilation, x.dimension, "dilation")
    k_total = math.prod(filter_size)
    check_allocation("neighbour_features", (x.n_active, k_total * x.n_channels),
                     x.dtype.itemsize, what="the (N, K * C) output")
    rulebook = x.grid.submanifold(x.sites, filter_size, dilation, op="neighbour_features")
    features = data_of(x.features)
    n, c = x.n_active, x.n_channels
    xp = backend.array_namespace(features)
    # one gather through the neighbour map; row n of the padded features is the zero row
    table = rulebook.derived("neighbor_map", rulebook.neighbor_map)
    padded = xp.concatenate([features, xp.zeros((1, c), features.dtype)])
    out = padded[xp.where(table >= 0, table, n)]

    def vjp(g):
        # input i at offset k feeds the output that the transposed map names at (i, k)
        back = rulebook.transpose()
        reader = back.derived("neighbor_map", back.neighbor_map)
        flat = xp.concatenate([g.reshape(n * k_total, c), xp.zeros((1, c), g.dtype)])
        cells = xp.where(reader >= 0, reader * k_total + xp.arange(k_total), n * k_total)
        return (ops.sum_of(flat[cells], axis=1),)   # float16: summed in float32

    return x.with_features(_differentiable(out.reshape(n, k_total * c), (x.features,), vjp))


def deconv(x, weight, bias=None, filter_size=2, stride=2):
    """Transposed convolution back onto the finer sites that produced ``x`` (SCN Deconvolution).

    ``out[p] = bias + sum in[q] @ W[k]`` over active coarse q with p = q*s + delta_k; the
    output sites and rows are those of the tensor the matching strided op consumed. Raises
    ValueError if no strided op with this filter and stride produced ``x``'s sites.
    """
    _require_tensor(x)
    filter_size = normalize_size(filter_size, x.dimension, "filter_size")
    stride = normalize_size(stride, x.dimension, "stride")
    _check_weight(x, weight, bias, math.prod(filter_size))
    rulebook, sites = x.grid.transposed(x.sites, filter_size, stride)
    return SparseTensor._on(_convolve(x, weight, bias, rulebook), sites, x.grid)


def full_conv(x, weight, bias=None, filter_size=2, stride=2):
    """Full (generative) transposed convolution (SCN FullConvolution).

    Output sites are all ``q*s + delta`` for active q (sorted), spatial size (in-1)*s + f,
    on a new Grid.
    """
    _require_tensor(x)
    filter_size = normalize_size(filter_size, x.dimension, "filter_size")
    stride = normalize_size(stride, x.dimension, "stride")
    k = math.prod(filter_size)
    cout = _check_weight(x, weight, bias, k)
    check_allocation("full_conv", (k * x.n_active, cout), x.dtype.itemsize,
                     what=f"output features for up to K * N = {k} * {x.n_active} new sites")
    rulebook, sites, grid = x.grid.full(x.sites, filter_size, stride, op="full_conv")
    return SparseTensor._on(_convolve(x, weight, bias, rulebook), sites, grid)


def network_in_network(x, weight, bias=None):
    """Per-site linear map (SCN NetworkInNetwork): ``features @ weight + bias``.

    ``weight`` is (Cin, Cout).
    """
    _require_tensor(x)
    _check_dtype(x, weight, "weight")
    if weight.ndim != 2 or weight.shape[0] != x.n_channels:
        raise ValueError(f"weight must have shape ({x.n_channels}, Cout); got {weight.shape}")
    _check_bias(x, bias, weight.shape[1])
    features, w, b = data_of(x.features), data_of(weight), data_of(bias)
    out = ops.matrix_product(features, w)
    if b is not None:
        out += b
    kernels = x.kernels

    def vjp(g):
        return (ops.matrix_product(g, w.T) if _wants(x.features) else None,
                kernels.rows_product(features, g) if _wants(weight) else None,
                column_sum(g) if _wants(bias) else None)

    return x.with_features(_differentiable(out, (x.features, weight, bias), vjp))


def _check_drop(x, n_features_to_drop):
    """Validate ``n_features_to_drop`` (before any rulebook is built); return it as an int."""
    if not isinstance(n_features_to_drop, (int, np.integer)) or isinstance(n_features_to_drop,
                                                                         (bool, np.bool_)):
        raise TypeError(f"n_features_to_drop must be an int; got {n_features_to_drop!r}")
    n = int(n_features_to_drop)
    if not 0 <= n < max(x.n_channels, 1):
        raise ValueError(f"n_features_to_drop must be in [0, {x.n_channels}); got {n}")
    return n


def _kept_features(x, dropped):
    features = data_of(x.features)
    return (features[:, dropped:] if dropped else features), dropped


def _pool_result(x, out, sites, grid, dropped, grad_kept):
    """Wrap a pooling output; ``grad_kept(g)`` is the gradient of the kept channels."""
    def vjp(g):
        kept = grad_kept(g)
        if not dropped:
            return (kept,)
        full = backend.array_namespace(kept).zeros((len(kept), x.n_channels), kept.dtype)
        full[:, dropped:] = kept
        return (full,)

    return SparseTensor._on(_differentiable(out, (x.features,), vjp), sites, grid)


def max_pool(x, filter_size=2, stride=2, n_features_to_drop=0):
    """Max pooling over each window's active inputs (the true maximum; SCN clamps at 0).

    Sizes and sites as :func:`conv`; the first ``n_features_to_drop`` channels are dropped.
    """
    _require_tensor(x)
    dropped = _check_drop(x, n_features_to_drop)
    return _max_pool(x, *x.grid.strided(x.sites, filter_size, stride, op="max_pool"), dropped)


def _max_pool(x, rulebook, sites, dropped):
    features, dropped = _kept_features(x, dropped)
    kernels = x.kernels
    out, argmax = kernels.max_pool_forward(features, rulebook)
    return _pool_result(x, out, sites, x.grid, dropped, lambda g: kernels.max_pool_backward(
        g, argmax, rulebook.n_in))


def randomized_max_pool(x, filter_size=2, stride=2, n_features_to_drop=0, rng=None):
    """Max pooling with randomly spaced windows (SCN RandomizedStrideMaxPooling, training)."""
    _require_tensor(x)
    dropped = _check_drop(x, n_features_to_drop)
    rng = _check_rng(rng)
    return _max_pool(x, *x.grid.randomized_strided(x.sites, filter_size, stride, rng,
                                                   op="randomized_max_pool"), dropped)


def avg_pool(x, filter_size=2, stride=2, n_features_to_drop=0):
    """Average pooling as SCN: the sum of active inputs divided by the window volume."""
    _require_tensor(x)
    dropped = _check_drop(x, n_features_to_drop)
    rulebook, sites = x.grid.strided(x.sites, filter_size, stride, op="avg_pool")
    features, dropped = _kept_features(x, dropped)
    kernels = x.kernels
    out = kernels.rule_sum(features, rulebook)
    scale = out.dtype.type(1.0 / math.prod(rulebook.filter_size))
    out *= scale

    def grad_kept(g):
        grad = kernels.rule_sum(g, rulebook.transpose())
        grad *= scale
        return grad

    return _pool_result(x, out, sites, x.grid, dropped, grad_kept)


def unpool(x, filter_size=2, stride=2, n_features_to_drop=0):
    """UnPooling: each finer site receives the sum of its coarse parents' features.

    The output sites are the finer tensor's, found as for :func:`deconv`.
    """
    _require_tensor(x)
    dropped = _check_drop(x, n_features_to_drop)
    rulebook, sites = x.grid.transposed(x.sites, filter_size, stride)
    features, dropped = _kept_features(x, dropped)
    kernels = x.kernels
    out = kernels.rule_sum(features, rulebook)
    return _pool_result(x, out, sites, x.grid, dropped, lambda g: kernels.rule_sum(
        g, rulebook.transpose()))


def batch_norm(x, weight=None, bias=None, running_mean=None, running_var=None, training=True,
               momentum=0.99, eps=1e-4, leakiness=1.0):
    """Batch normalisation over active sites (SCN BatchNormalization), then leaky activation.

    In training, normalises with the batch mean and biased variance and updates the
    running statistics in place with SCN's convention
    ``running = momentum * running + (1 - momentum) * batch`` (unbiased variance); in
    evaluation uses the running statistics. ``leakiness`` 0 gives BatchNormReLU. An empty
    input passes through.

    Arguments are checked before any work: ``training`` a bool, ``momentum`` in [0, 1],
    ``eps`` finite and positive, ``leakiness`` finite; ``weight``, ``bias``,
    ``running_mean`` and ``running_var`` None or arrays (or autodiff Tensors) of shape
    (C,) and exactly the features' dtype (no silent casts), the running statistics
    writeable in training (they are updated in place). float16 features (mixed precision)
    take float16 ``weight`` / ``bias`` and float32 running statistics; the batch statistics
    and the normalisation are computed in float32 (docs/mixed_precision.md).
    """
    _require_tensor(x)
    training = _check_flag("training", training)
    momentum = _real("momentum", momentum, lower=0, upper=1)
    eps = _real("eps", eps, positive=True)
    leakiness = _real("leakiness", leakiness)
    for name, value in (("weight", weight), ("bias", bias)):
        _check_channel_vector(x, name, value, "batch_norm")
    for name, value in (("running_mean", running_mean), ("running_var", running_var)):
        _check_channel_vector(x, name, value, "batch_norm", writeable=training,
                              statistics=True)
    if not training and (running_mean is None or running_var is None):
        raise ValueError("batch_norm in evaluation mode needs running_mean and running_var")
    return x.with_features(batch_norm_rows(x.features, weight, bias, running_mean,
                                           running_var, training, momentum, eps, leakiness))


def batch_norm_rows(features, weight, bias, running_mean, running_var, training, momentum,
                    eps, leakiness):
    """The kernel of :func:`batch_norm` on a (rows, C) array or autodiff Tensor, arguments
    already checked: statistics over rows, running statistics updated in place in
    training. Also the batch norm of dense channels-last stacks (SBNet blocks)."""
    running_mean, running_var = data_of(running_mean), data_of(running_var)
    values, w, b = data_of(features), data_of(weight), data_of(bias)
    kernels = backend.kernels(values)
    if len(values) == 0:
        return _differentiable(values.copy(), (features,), lambda g: (g,))
    if training:
        mean, var = kernels.batch_norm_statistics(values)
        n = len(values)
        if running_mean is not None:
            running_mean *= momentum
            running_mean += (1 - momentum) * mean
        if running_var is not None:
            unbiased = var * (n / (n - 1)) if n > 1 else var
            running_var *= momentum
            running_var += (1 - momentum) * unbiased
    else:
        stats = statistics_dtype(values.dtype)
        mean, var = running_mean.astype(stats), running_var.astype(stats)
    out = kernels.batch_norm_forward(values, mean, var, w, b, eps, leakiness)

    def vjp(g):
        return kernels.batch_norm_backward(g, values, mean, var, w, b, eps, leakiness,
                                           training, out=out)

    return _differentiable(out, (features, weight, bias), vjp)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Group normalisation per sample: statistics over the sample's active sites and the
    channels of each of ``num_groups`` channel groups (GroupNorm on the active sites only).

    ``weight``/``bias`` are per channel (C,) or None, of the features' dtype. Empty samples
    contribute nothing. ``num_groups`` is an int dividing C, ``eps`` finite and positive.
    The per-sample statistics take (batch_size, num_groups) arrays: checked against
    :data:`sparsegrid.coords.MAX_ALLOCATION_BYTES` first (MemoryError).
    """
    _require_tensor(x)
    channels = x.n_channels
    if not isinstance(num_groups, (int, np.integer)) or isinstance(num_groups,
                                                                  (bool, np.bool_)):
        raise TypeError(f"num_groups must be an int; got {type(num_groups).__name__} "
                        f"{num_groups!r}")
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"num_groups must be a positive divisor of the {channels} channels; "
                         f"got {num_groups!r}")
    eps = _real("eps", eps, positive=True)
    for name, value in (("weight", weight), ("bias", bias)):
        _check_channel_vector(x, name, value, "group_norm")
    # (B,) int64 counts and size, and per (sample, group): mean, var, inverse std, and the
    # two backward sums
    check_allocation("group_norm", (x.batch_size, int(num_groups)), 5 * x.dtype.itemsize + 16,
                     what="per-sample statistics (batch_size, num_groups)",
                     hint="pass the actual number of samples as batch_size")
    features, w, b = data_of(x.features), data_of(weight), data_of(bias)
    kernels = x.kernels
    n, g = x.n_active, int(num_groups)
    per = channels // g
    samples = x.indices[:, 0]
    xp = backend.array_namespace(features)
    half = features.dtype == np.float16
    if half:   # mixed precision: computed in float32, every result rounded once
        features, w, b = (None if a is None else a.astype(np.float32) for a in (features, w, b))
    size = kernels.segment_reduce(xp.ones((n, 1), features.dtype), samples, x.batch_size,
                                  "sum")[0][:, 0] * per
    count = xp.maximum(size, 1)[:, None]                                  # (B, 1)
    grouped = features.reshape(n, g, per)
    mean = kernels.segment_reduce(grouped.sum(axis=2), samples, x.batch_size, "sum")[0] / count
    centred = grouped - mean[samples][:, :, None]
    var = kernels.segment_reduce((centred * centred).sum(axis=2), samples, x.batch_size,
                                 "sum")[0] / count
    inv = (1.0 / xp.sqrt(var + eps)).astype(features.dtype)               # (B, G)
    normed = (centred * inv[samples][:, :, None]).reshape(n, channels)
    out = normed * w if w is not None else normed.copy()
    if b is not None:
        out += b
    if half:
        out = out.astype(np.float16)

    def vjp(grad):
        if half:
            return tuple(None if r is None else r.astype(np.float16)
                         for r in vjp_values(grad.astype(np.float32)))
        return vjp_values(grad)

    def vjp_values(grad):
        gy = (grad * w if w is not None else grad).reshape(n, g, per)
        y = normed.reshape(n, g, per)
        s1 = kernels.segment_reduce(gy.sum(axis=2), samples, x.batch_size, "sum")[0] / count
        s2 = kernels.segment_reduce((gy * y).sum(axis=2), samples, x.batch_size,
                                    "sum")[0] / count
        dx = (gy - s1[samples][:, :, None] - y * s2[samples][:, :, None]) * \
            inv[samples][:, :, None]
        return (dx.reshape(n, channels),
                (grad * normed).sum(axis=0) if _wants(weight) else None,
                grad.sum(axis=0) if _wants(bias) else None)

    return x.with_features(_differentiable(out, (x.features, weight, bias), vjp))


def select(x, keep):
    """The sites where the boolean ``keep`` (N,) is true, on a new Grid (SCN Sparsify).

    Rows keep their relative order; features are gathered (differentiably).
    """
    _require_tensor(x)
    keep = data_of(keep)
    xp = backend.array_namespace(x.indices)
    keep = keep if backend.is_cupy_array(keep) else np.asarray(keep)
    if keep.dtype != bool or keep.shape != (x.n_active,):
        raise ValueError(f"keep must be a boolean array of shape ({x.n_active},); got "
                         f"{keep.dtype} {keep.shape}")
    rows = xp.flatnonzero(xp.asarray(keep))
    indices = xp.ascontiguousarray(x.indices[rows])
    sites = Sites.from_indices(indices, x.spatial_shape, x.batch_size)
    return SparseTensor._on(ops.take_rows(x.features, rows), sites, Grid())


def global_pool(x, mode="max"):
    """Per-sample reduction over all active sites: dense (batch_size, C).

    ``mode`` is ``'max'`` (true maximum), ``'mean'`` or ``'sum'``; empty samples give 0.
    The (batch_size, C) output is checked against
    :data:`sparsegrid.coords.MAX_ALLOCATION_BYTES` first (MemoryError).
    """
    _require_tensor(x)
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str, one of 'max', 'mean' or 'sum'; got "
                        f"{type(mode).__name__} {mode!r}")
    if mode not in _GLOBAL_POOL_MODES:
        raise ValueError(f"mode must be 'max', 'mean' or 'sum'; got {mode!r}")
    # the output, plus the int64 arg-max rows of mode 'max', plus (B,) int64 counts
    check_allocation("global_pool", (x.batch_size, x.n_channels),
                     x.dtype.itemsize + (8 if mode == "max" else 0),
                     what="the (batch_size, C) output",
                     hint="pass the actual number of samples as batch_size")
    check_allocation("global_pool", (x.batch_size,), 8, what="per-sample counts")
    features = data_of(x.features)
    kernels = x.kernels
    out, chosen = kernels.segment_reduce(features, x.indices[:, 0], x.batch_size, mode)
    return _differentiable(out, (x.features,), lambda g: (kernels.segment_reduce_backward(
        g, x.indices[:, 0], x.batch_size, mode, chosen, x.n_active),))


class InputMap:
    """How an input layer merged rows into sites; what :func:`output_layer` inverts.

    Attributes
    ----------
    segment_ids : int64 (n_rows,)
        The output row (site) of each input row.
    chosen : array or None
        The kept row per site (modes 'first'/'last'), the arg-max rows (mode 'max').
    mode : str
    n_rows, n_sites : int
    sites : Sites or None
        The site set the input layer created: :func:`output_layer` accepts only a tensor
        on exactly these sites (for example after submanifold convolutions), never
        another batch's tensor that happens to have as many sites. None (a map made by
        hand) checks the site count only.
    """

    __slots__ = ("segment_ids", "chosen", "mode", "n_rows", "n_sites", "sites")

    def __init__(self, segment_ids, chosen, mode, n_rows, n_sites, sites=None):
        self.segment_ids = segment_ids
        self.chosen = chosen
        self.mode = mode
        self.n_rows = n_rows
        self.n_sites = n_sites
        self.sites = sites

    def __repr__(self):
        return f"InputMap(mode={self.mode!r}, n_rows={self.n_rows}, n_sites={self.n_sites})"


def input_mode_name(mode):
    """SCN mode number (0-4) or a name -> one of 'unique', 'first', 'last', 'sum', 'mean', 'max'."""
    if isinstance(mode, (int, np.integer)) and not isinstance(mode, (bool, np.bool_)):
        if int(mode) not in INPUT_MODES:
            raise ValueError(f"mode must be 0..4 (SCN) or one of {_MODE_NAMES}; got {mode}")
        return INPUT_MODES[int(mode)]
    if not isinstance(mode, str) or mode not in _MODE_NAMES:
        raise ValueError(f"mode must be 0..4 (SCN) or one of {_MODE_NAMES}; got {mode!r}")
    return mode


def input_layer(indices, features, spatial_shape, batch_size=None, mode="sum"):
    """Build a SparseTensor from rows that may repeat a site, merging duplicates.

    Parameters
    ----------
    indices : integer (n_rows, 1 + D), batch first
    features : float (n_rows, C)
    spatial_shape : D ints
    batch_size : int, optional (a lower bound is not needed: must exceed every batch index)
    mode : SCN number or name
        0 / ``'unique'``: duplicates are an error; 1 / ``'first'``: keep the first row;
        2 / ``'last'``: keep the last row; 3 / ``'sum'``; 4 / ``'mean'``; ``'max'``
        (channel-wise).

    Returns
    -------
    tensor : SparseTensor
        One row per distinct site, sorted by (batch, x1, ..., xD), on a new Grid.
    input_map : InputMap
        For :func:`output_layer` and for the backward pass.
    """
    mode = input_mode_name(mode)
    spatial_shape = normalize_spatial_shape(spatial_shape)
    indices, batch_size = validate_indices(indices, spatial_shape, batch_size)
    values = validate_sparse_features(data_of(features), len(indices))
    backend.require_same_device("features", values, "indices", indices)
    kernels = backend.kernels(indices, values)
    keys, _ = pack_keys(indices, spatial_shape, batch_size)
    unique_keys, first_rows, segment_ids = kernels.unique_inverse(keys)
    n_sites = len(unique_keys)
    if mode == "unique" and n_sites != len(indices):
        xp = backend.array_namespace(keys)
        seen = xp.zeros(len(indices), bool)
        seen[first_rows] = True
        second = int(xp.flatnonzero(~seen)[0])
        first = int(first_rows[segment_ids[second]])
        raise ValueError(f"indices rows {first} and {second} are the same site "
                         f"{indices[second].tolist()}, but mode 0 ('unique') assumes no "
                         "duplicates; use 'first', 'last', 'sum', 'mean' or 'max'")
    reduce_mode = "sum" if mode == "unique" else mode
    out, chosen = kernels.segment_reduce(values, segment_ids, n_sites, reduce_mode)
    out = _differentiable(out, (features,), lambda g: (kernels.segment_reduce_backward(
        g, segment_ids, n_sites, reduce_mode, chosen, len(values)),))
    site_indices = indices.take(first_rows, axis=0)
    sites = Sites(site_indices, spatial_shape, batch_size)
    tensor = SparseTensor._on(out, sites, Grid())
    return tensor, InputMap(segment_ids, chosen, mode, len(indices), n_sites, sites)


def _same_sites(a, b):
    """Whether two Sites are the same site set in the same row order: the same object, or
    equal indices (shape and values), spatial shape and batch size (a tensor rebuilt on
    identical indices)."""
    if a is b:
        return True
    if a.spatial_shape != b.spatial_shape or a.batch_size != b.batch_size or \
            a.indices.shape != b.indices.shape or type(a.indices) is not type(b.indices):
        return False
    return bool((a.indices == b.indices).all())


def output_layer(x, input_map):
    """Inverse of :func:`input_layer`: one row per original input row, (n_rows, C).

    Every row receives its site's features; in modes 'first'/'last' only the kept row
    does and the others get 0 (as SCN's OutputLayer).

    ``x`` must be on the very sites ``input_layer`` made with this ``input_map`` (a tensor
    derived by submanifold ops keeps them); a tensor of another batch is refused even
    when its site count matches (its rows would be silently wrong).
    """
    _require_tensor(x)
    if not isinstance(input_map, InputMap):
        raise TypeError(f"input_map must be the InputMap returned by input_layer; got "
                        f"{type(input_map).__name__}")
    if x.n_active != input_map.n_sites:
        raise ValueError(f"x has {x.n_active} sites but input_map maps {input_map.n_sites}; "
                         "pass a tensor on the input layer's sites")
    if input_map.sites is not None and not _same_sites(x.sites, input_map.sites):
        raise ValueError(f"x is not on the sites input_layer made with this input_map: both "
                         f"have {x.n_active} sites, but x's are another site set (another "
                         "batch, or a tensor rebuilt from indices); pass the input layer's "
                         "output or a tensor derived from it by submanifold ops")
    features = data_of(x.features)
    kernels = x.kernels
    if input_map.mode in ("first", "last"):
        return ops.put_rows(x.features, input_map.chosen, input_map.n_rows)
    return _differentiable(features[input_map.segment_ids], (x.features,), lambda g: (
        kernels.segment_reduce(g, input_map.segment_ids, input_map.n_sites, "sum")[0],))


def to_dense(x):
    """Dense (B, C, S1, ..., SD) array of a SparseTensor, zero at inactive sites.

    MemoryError naming the shape and the bytes, before allocating, when
    ``B * C * prod(S) * itemsize`` exceeds :data:`sparsegrid.coords.MAX_ALLOCATION_BYTES`.
    """
    _require_tensor(x)
    check_allocation("to_dense", (x.batch_size, x.n_channels, *x.spatial_shape),
                     x.dtype.itemsize, what="a dense (B, C, *spatial_shape) array",
                     hint="use .features and .indices, or crop the input")
    features = data_of(x.features)
    kernels = x.kernels
    out = kernels.scatter_to_dense(features, x.indices, x.batch_size, x.spatial_shape)
    return _differentiable(out, (x.features,),
                           lambda g: (kernels.gather_from_dense(g, x.indices),))


def from_dense(dense):
    """SparseTensor of a dense (B, C, S1, ..., SD) array, active where any channel != 0.

    Rows are sorted by (batch, x1, ..., xD); the tensor lives on a new Grid.
    """
    values = data_of(dense)
    values = values if backend.is_cupy_array(values) else np.asarray(values)
    if values.ndim < 3:
        raise ValueError(f"dense must have shape (B, C, S1, ..., SD) with D >= 1; got "
                         f"{values.shape}")
    if values.dtype.kind != "f":
        raise TypeError(f"dense must be floating point; got dtype {values.dtype}")
    # the kernel's non-zero mask is one byte per element: as large as the input itself for
    # an ordinary array, but not for a broadcast view (np.broadcast_to) of a huge shape
    check_allocation("from_dense", values.shape, 1, what="the non-zero mask of dense")
    kernels = backend.kernels(values)
    indices = kernels.dense_active_sites(values)
    spatial_shape = normalize_spatial_shape(values.shape[2:])
    features = validate_sparse_features(kernels.gather_from_dense(values, indices), len(indices),
                                 "dense")
    sites = Sites(indices, spatial_shape, values.shape[0])
    features = _differentiable(features, (dense,), lambda g: (kernels.scatter_to_dense(
        g, indices, values.shape[0], spatial_shape),))
    return SparseTensor._on(features, sites, Grid())


__all__ = [
    "avg_pool", "batch_norm", "conv", "deconv", "from_dense", "full_conv",
    "global_pool", "group_norm", "input_layer", "InputMap", "input_mode_name", "max_pool",
    "neighbour_features", "network_in_network", "output_layer", "permutohedral_conv", "randomized_conv",
    "randomized_max_pool", "select", "submanifold_conv", "to_dense", "unpool",
]
