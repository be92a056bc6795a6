"""The fused implicit-GEMM convolution of the CUDA backend (kernels/implicit_gemm.cu).

One kernel per pass, output-stationary, on tensor cores, no atomics:

* :func:`forward`: ``out = act(bias + sum_k x[kmap_k] @ W[k])`` over the rulebook's neighbour
  map with its rows sorted by neighbour mask (:func:`sparsegrid.neighbours.mask_order`,
  cached on the rulebook and reused by every layer at that resolution);
* :func:`feature_gradient`: the same kernel over the transposed rulebook's map with the
  per-offset transposed weights;
* :func:`weight_gradient`: a deterministic split-K: the sorted rows cut into a fixed number
  of slices (a function of the shapes only), one float32 partial product per (slice,
  offset, tile), summed in slice order and rounded once.

float16 (and bfloat16) data multiply as m16n8k16, float32 data as TF32 m16n8k8, all with
float32 accumulation; the result is rounded once to the data type. Channels need not be
multiples of 8: a generic variant zero-fills the tails (the 16-byte-copy variants are used
when channels and pointers allow). :mod:`sparsegrid.cuda.conv` decides per layer whether
this kernel or gather-GEMM-scatter runs (:mod:`sparsegrid.cuda.autotune`).
"""

from __future__ import annotations

import time

import numpy as np

from .. import neighbours
from . import _compile, autotune
from ._runtime import cp

THREADS = 128
MAX_OFFSETS = 512           # SG_IG_MAX_K in the kernel
#: Largest float32 workspace of the weight gradient's split-K (bytes).
WGRAD_WORKSPACE = 64 << 20
#: At most this many split-K slices, at least ~4096 rows each.
WGRAD_MAX_SLICES = 64
WGRAD_SLICE_ROWS = 4096
ACTIVATIONS = {None: 0, "relu": 1, "leaky_relu": 2}

_capability = {}


def storage_type(dtype):
    """The kernel's C storage type for ``dtype``, or None where the kernel does not
    apply: float16 -> ``sg_half``, bfloat16 -> ``sg_bf16``, float32 -> ``float`` (TF32)
    only while :func:`sparsegrid.cuda.autotune.get_tf32` is on."""
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        return "sg_half"
    if dtype.name == "bfloat16":
        return "sg_bf16"
    if dtype == np.float32 and autotune.get_tf32():
        return "float"
    return None


def device_capability():
    """(major, minor) compute capability of the current GPU (cached per device)."""
    device = cp.cuda.runtime.getDevice()
    found = _capability.get(device)
    if found is None:
        text = str(cp.cuda.Device(device).compute_capability)
        found = _capability[device] = (int(text[:-1]), int(text[-1]))
    return found


_names = {}


def clear_cache():
    """Forget the devices' capabilities and names (after
    :func:`sparsegrid.cuda._runtime.use` binds another array library)."""
    _capability.clear()
    _names.clear()


def device_name():
    """The current GPU's name and capability, as the autotuner keys it (cached per
    device: a layer asks on every call)."""
    device = cp.cuda.runtime.getDevice()
    found = _names.get(device)
    if found is None:
        name = cp.cuda.runtime.getDeviceProperties(device)["name"]
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
        major, minor = device_capability()
        found = _names[device] = f"{name} sm_{major}{minor}"
    return found


def ineligible(features, weight, rulebook):
    """Why the fused kernel cannot run this convolution (a string), or None if it can."""
    if storage_type(features.dtype) is None:
        return f"dtype {features.dtype} (float16, or float32 with TF32 on)"
    if weight.ndim != 3:
        return "grouped weights"
    if rulebook.n_offsets > MAX_OFFSETS:
        return f"{rulebook.n_offsets} offsets (at most {MAX_OFFSETS})"
    if device_capability() < (8, 0):
        return f"compute capability {device_capability()} (needs 8.0)"
    return None


def _vector_width(c_type):
    return 4 if c_type == "float" else 8


def _aligned(*arrays):
    for array in arrays:
        pointer = getattr(getattr(array, "data", None), "ptr", None)
        if pointer is None or pointer % 16:
            return False
    return True


def _vectorised(c_type, cin, cout, *arrays):
    width = _vector_width(c_type)
    return cin % width == 0 and cout % width == 0 and _aligned(*arrays)


def tiles(c_type, vectorised):
    """The tile shapes (BM, BN, BK) the kernel is instantiated with for this case."""
    if vectorised:
        return list(_compile.IG_TILES[c_type])
    return [_compile.IG_GENERIC_TILE[c_type]]


def default_tile(c_type, vectorised, n_rows, cout):
    """The tile a pinned ``'implicit_gemm'`` uses without measuring: wide rows for many
    rows, output-channel tiles no wider than needed."""
    options = tiles(c_type, vectorised)
    if len(options) == 1:
        return options[0]
    bn = 32 if cout <= 32 else (64 if cout <= 64 or n_rows < 200_000 else 128)
    bm = 128 if n_rows >= 200_000 and bn >= 64 else 64
    for tile in options:
        if tile[0] == bm and tile[1] == bn:
            return tile
    return options[0]


def tile_name(tile):
    return "implicit_gemm:" + "x".join(str(t) for t in tile)


def parse_tile(candidate):
    return tuple(int(t) for t in candidate.split(":", 1)[1].split("x"))


def _module_key(c_type):
    return f"implicit_gemm.cu:{c_type}"


def _check_arguments(features, weight, rulebook, bias=None, grad_out=None):
    """Shapes and dtypes the kernels rely on (CuPy would pass a wrong pointer type or a
    short array to them silently): ValueError / TypeError naming the argument."""
    if features.ndim != 2 or features.shape[0] != rulebook.n_in:
        raise ValueError(f"features must have shape ({rulebook.n_in}, Cin) for this "
                         f"rulebook; got {features.shape}")
    if weight.ndim != 3 or weight.shape[0] != rulebook.n_offsets or \
            weight.shape[1] != features.shape[1]:
        raise ValueError(f"weight must have shape ({rulebook.n_offsets}, "
                         f"{features.shape[1]}, Cout); got {weight.shape}")
    for name, array, shape in (("weight", weight, None), ("bias", bias, (weight.shape[2],)),
                               ("grad_out", grad_out, (rulebook.n_out, weight.shape[2]))):
        if array is None:
            continue
        if array.dtype != features.dtype:
            raise TypeError(f"{name} must have the features' dtype {features.dtype}; got "
                            f"{array.dtype}")
        if shape is not None and tuple(array.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}; got {tuple(array.shape)}")


def forward(features, weight, rulebook, bias=None, *, tile=None, activation=None,
            slope=0.01):
    """``act(bias + conv(features, weight))`` on the rulebook by the fused kernel.

    Parameters
    ----------
    features : (n_in, Cin) CuPy array, float16 (or float32 with TF32 on)
    weight : (K, Cin, Cout), the features' dtype
    rulebook : Rulebook on the same device
    bias : (Cout,) or None
    tile : (BM, BN, BK) or None (:func:`default_tile`)
    activation : None, ``'relu'`` or ``'leaky_relu'`` (``slope`` for negative values),
        applied to the float32 sum before rounding
    """
    reason = ineligible(features, weight, rulebook)
    if reason is not None:
        raise TypeError(f"the fused implicit-GEMM kernel does not apply: {reason}")
    _check_arguments(features, weight, rulebook, bias)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}; got {activation!r}")
    c_type = storage_type(features.dtype)
    features = cp.ascontiguousarray(features)
    weight = cp.ascontiguousarray(weight)
    cin, cout = weight.shape[1], weight.shape[2]
    out = cp.empty((rulebook.n_out, cout), dtype=features.dtype)
    vectorised = _vectorised(c_type, cin, cout, features, weight, out)
    if tile is None:
        tile = default_tile(c_type, vectorised, rulebook.n_out, cout)
    if tuple(tile) not in tiles(c_type, vectorised):
        raise ValueError(f"tile must be one of {tiles(c_type, vectorised)}; got {tile}")
    if rulebook.n_out == 0 or cout == 0:
        return out
    if cin == 0 or rulebook.n_pairs == 0:
        out[...] = 0 if bias is None else bias
        return _activate(out, activation, slope)
    order = neighbours.mask_order(rulebook)
    bm, bn, _ = tile
    masks = order.tile_masks(bm)
    has_bias = bias is not None
    bias_array = cp.ascontiguousarray(bias) if has_bias else features
    name = _compile.ig_conv_name(c_type, tile, vectorised)
    kernel = _compile.function(_module_key(c_type), name)
    grid = (order.n_pad // bm, -(-cout // bn))
    kernel(grid, (THREADS,), (
        features, weight, bias_array, order.kmap, order.order, masks, out,
        np.int32(order.n_out), np.int32(order.n_pad), np.int32(order.n_offsets),
        np.int32(masks.shape[1]), np.int32(cin), np.int32(cout), np.int32(has_bias),
        np.int32(ACTIVATIONS[activation]), np.float32(slope)))
    return out


def _activate(out, activation, slope):
    if activation == "relu":
        out[...] = cp.maximum(out, 0)
    elif activation == "leaky_relu":
        out[...] = cp.where(out < 0, out * out.dtype.type(slope), out)
    return out


def feature_gradient(grad_out, weight, rulebook, *, tile=None):
    """d(loss)/d(features) of :func:`forward` (without activation): the fused kernel over
    the transposed rulebook with W[k].T (a contiguous (K, Cout, Cin) copy)."""
    return forward(grad_out, cp.ascontiguousarray(cp.swapaxes(weight, 1, 2)),
                   rulebook.transpose(), tile=tile)


def wgrad_slices(n_pad, chunk_rows, n_offsets, cin, cout):
    """(rows per slice, slices) of the weight gradient's split-K: a function of the
    shapes only, so the summation order is fixed for a layer."""
    chunks = n_pad // chunk_rows
    budget = max(1, WGRAD_WORKSPACE // max(1, 4 * n_offsets * cin * cout))
    slices = max(1, min(WGRAD_MAX_SLICES, budget, -(-n_pad // WGRAD_SLICE_ROWS)))
    per_slice = -(-chunks // slices) * chunk_rows
    return per_slice, -(-n_pad // per_slice)


def weight_gradient(features, grad_out, weight, rulebook):
    """d(loss)/d(weight) of :func:`forward`: (K, Cin, Cout) in the features' dtype, each
    entry a float32 sum over the pairs of its offset in a fixed order, rounded once."""
    reason = ineligible(features, weight, rulebook)
    if reason is not None:
        raise TypeError(f"the fused implicit-GEMM kernel does not apply: {reason}")
    _check_arguments(features, weight, rulebook, grad_out=grad_out)
    c_type = storage_type(features.dtype)
    features = cp.ascontiguousarray(features)
    grad_out = cp.ascontiguousarray(grad_out)
    n_offsets, cin, cout = weight.shape
    if rulebook.n_pairs == 0 or cin == 0 or cout == 0:
        return cp.zeros(weight.shape, dtype=weight.dtype)
    order = neighbours.mask_order(rulebook)
    bm, bn, bk = _compile.IG_WGRAD_TILE[c_type]
    masks = order.tile_masks(bk)
    per_slice, slices = wgrad_slices(order.n_pad, bk, n_offsets, cin, cout)
    vectorised = _vectorised(c_type, cin, cout, features, grad_out)
    partial = cp.empty((slices, n_offsets, cin, cout), dtype=np.float32)
    kernel = _compile.function(_module_key(c_type), _compile.ig_wgrad_name(c_type, vectorised))
    grid = (-(-cin // bm) * -(-cout // bn), n_offsets, slices)
    kernel(grid, (THREADS,), (
        features, grad_out, order.kmap, order.order, masks, partial, np.int32(order.n_out),
        np.int32(order.n_pad), np.int32(n_offsets), np.int32(masks.shape[1]),
        np.int32(cin), np.int32(cout), np.int32(per_slice)))
    out = cp.empty(weight.shape, dtype=weight.dtype)
    _compile.launch(_module_key(c_type), f"wgrad_reduce<{c_type}>", out.size, partial, out,
                    np.int64(out.size), np.int32(slices))
    return out


def measure(run, repeat=3):
    """Seconds one call of ``run()`` takes on the GPU: the median of ``repeat`` runs after
    one warm-up, timed with CUDA events (perf_counter after a synchronisation where the
    array library has no events)."""
    run()
    events = getattr(cp.cuda, "Event", None)
    times = []
    for _ in range(repeat):
        if events is not None:
            start, stop = events(), events()
            start.record()
            run()
            stop.record()
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop) * 1e-3)
        else:
            begin = time.perf_counter()
            run()
            times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]
