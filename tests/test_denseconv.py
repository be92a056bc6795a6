"""sparsegrid.denseconv.conv: dense N-D convolution with PyTorch's semantics.

Checked against an independent float64 direct sum written plainly below (loops over
output positions and kernel taps, bounds checks instead of padding), against SciPy's
correlations for single channels, between its two internal methods (``shift``: contiguous
shifted slices of the flattened padded input; ``gather``: a copied strided view per tap)
and its two layouts, its gradients against float64 central differences, float32 against
float64, and the CuPy path (the ``gpu_device`` fixture: a GPU or the host emulator)
against NumPy's.
"""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest

from sparsegrid import autodiff as ad
from sparsegrid import backend, denseconv

conv = denseconv.conv


# -- the independent reference -------------------------------------------------------------
def _as_tuple(value, d):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * d


def reference_pads(padding, kernel, dilation):
    """((lo, hi), ...) per axis as PyTorch pads: ints on both sides, 'valid' none, 'same'
    a total of d (k - 1) with the odd one on the right."""
    d = len(kernel)
    if padding == "valid":
        return ((0, 0),) * d
    if padding == "same":
        totals = [dl * (k - 1) for k, dl in zip(kernel, _as_tuple(dilation, d))]
        return tuple((t // 2, t - t // 2) for t in totals)
    return tuple((p, p) for p in _as_tuple(padding, d))


def direct_conv(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """float64 cross-correlation of channels-first x (N, Cin, *S) with w (Cout, Cin/G, *k):
    for every output position and kernel tap, the input position
    ``o * stride + tap * dilation - pad_lo``, skipped when outside the input."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    n, _, *size = x.shape
    cout, cin_g, *kernel = w.shape
    d = len(size)
    stride, dilation = _as_tuple(stride, d), _as_tuple(dilation, d)
    pads = reference_pads(padding, kernel, dilation)
    out_size = [(size[a] + pads[a][0] + pads[a][1] - dilation[a] * (kernel[a] - 1) - 1)
                // stride[a] + 1 for a in range(d)]
    cout_g = cout // groups
    out = np.zeros((n, cout, *out_size))
    for batch in range(n):
        for o in itertools.product(*[range(s) for s in out_size]):
            for co in range(cout):
                group = co // cout_g
                total = 0.0 if b is None else float(b[co])
                for tap in itertools.product(*[range(k) for k in kernel]):
                    pos = [o[a] * stride[a] + tap[a] * dilation[a] - pads[a][0]
                           for a in range(d)]
                    if all(0 <= pos[a] < size[a] for a in range(d)):
                        inputs = x[(batch, slice(group * cin_g, (group + 1) * cin_g),
                                    *pos)]
                        total += float(np.dot(inputs, w[(co, slice(None), *tap)]))
                out[(batch, co, *o)] = total
    return out


def to_last(a):
    return np.moveaxis(a, 1, -1)


def to_first(a):
    return np.moveaxis(a, -1, 1)


# (N, Cin, Cout, spatial size, kernel, stride, padding, dilation, groups)
CASES = [
    # 1-D
    (1, 1, 1, (9,), (3,), 1, 0, 1, 1),
    (2, 3, 5, (11,), (4,), 1, "same", 1, 1),
    (3, 4, 4, (10,), (3,), 2, 1, 2, 2),
    (1, 8, 8, (12,), (5,), 3, 2, 1, 4),
    (2, 2, 6, (7,), (2,), 1, "valid", 2, 2),
    (1, 4, 4, (8,), (3,), 1, 1, 1, 4),              # depthwise
    # 2-D
    (1, 1, 1, (6, 7), (3, 3), 1, 1, 1, 1),
    (2, 3, 4, (6, 7), (3, 2), 1, 0, 1, 1),
    (3, 4, 8, (5, 6), (2, 4), 1, "same", 1, 2),
    (1, 4, 6, (7, 8), (3, 3), (2, 1), (1, 2), (1, 2), 2),
    (2, 8, 4, (9, 7), (3, 3), 3, 2, 1, 4),
    (1, 2, 3, (6, 9), (3, 3), 1, "same", 2, 1),
    (2, 6, 6, (5, 5), (3, 3), 1, 1, 1, 6),          # depthwise
    (1, 2, 6, (5, 6), (3, 2), 1, "same", 1, 2),     # one input channel per group, x3
    (1, 4, 2, (6, 5), (2, 3), 2, 0, 1, 2),          # one output channel per group
    (1, 3, 2, (8, 8), (1, 1), 1, 0, 1, 1),          # 1x1
    (2, 5, 3, (5, 6), (5, 3), 1, "valid", 1, 1),    # the kernel as tall as the input
    (1, 2, 2, (3, 4), (3, 3), 1, 4, 1, 1),          # padding beyond the kernel's reach
    (1, 3, 4, (10, 10), (3, 3), 3, 0, 1, 1),        # the last row / column is never read
    # 3-D
    (1, 1, 1, (4, 5, 6), (3, 3, 3), 1, 1, 1, 1),
    (2, 2, 4, (5, 4, 6), (2, 3, 2), 1, "same", (1, 1, 2), 2),
    (1, 4, 2, (6, 6, 5), (3, 2, 3), (2, 1, 3), (1, 0, 2), 1, 2),
    (2, 4, 4, (4, 5, 4), (3, 3, 3), 1, 0, 1, 4),
]


def case_id(case):
    n, cin, cout, size, kernel, stride, padding, dilation, groups = case
    return (f"{len(size)}d-n{n}-c{cin}to{cout}-k{'x'.join(map(str, kernel))}-s{stride}"
            f"-p{padding}-d{dilation}-g{groups}").replace(" ", "")


def make_case(case, rng, dtype=np.float64):
    n, cin, cout, size, kernel, stride, padding, dilation, groups = case
    x = rng.standard_normal((n, cin) + size).astype(dtype)
    w = rng.standard_normal((cout, cin // groups) + kernel).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x, w, b, kwargs


def methods(kwargs):
    """The internal methods that apply (shift needs stride 1), and the automatic choice."""
    stride = kwargs["stride"]
    unit = all(s == 1 for s in (stride if isinstance(stride, tuple) else (stride,)))
    return [None, "gather"] + (["shift"] if unit else [])


def run(x, w, b, kwargs, layout="NCHW", method=None):
    return denseconv._conv(x, w, b, kwargs["stride"], kwargs["padding"], kwargs["dilation"],
                           kwargs["groups"], layout, method)


# -- values ------------------------------------------------------------------------------
def test_reference_is_what_pytorch_documents():
    """The reference itself, on numbers worked by hand (so it cannot share a bug)."""
    x = np.arange(5.0).reshape(1, 1, 5)
    w = np.array([1.0, 10.0]).reshape(1, 1, 2)
    # 'same' with k = 2: pad 0 on the left, 1 on the right
    assert direct_conv(x, w, padding="same").ravel().tolist() == [10, 21, 32, 43, 4]
    # stride 2, padding 1, dilation 2: positions -1+0, -1+2 | 1, 3 | 3, 5(out)
    assert direct_conv(x, w, stride=2, padding=1, dilation=2).ravel().tolist() == [10, 31, 3]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_the_direct_sum(case, rng):
    x, w, b, kwargs = make_case(case, rng)
    expected = direct_conv(x, w, b, **kwargs)
    if kwargs["padding"] == "same":
        assert expected.shape[2:] == x.shape[2:]
    for method in methods(kwargs):
        got = run(x, w, b, kwargs, "NCHW", method)
        assert type(got) is np.ndarray and got.dtype == np.float64, method
        assert got.flags.c_contiguous
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12, err_msg=method)
        got_last = run(to_last(x), w, b, kwargs, "NHWC", method)
        np.testing.assert_allclose(to_first(got_last), expected, rtol=1e-12, atol=1e-12,
                                   err_msg=f"{method} channels last")
    # the public function, no bias
    np.testing.assert_allclose(conv(x, w, **kwargs), direct_conv(x, w, None, **kwargs),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_layouts_give_the_same_numbers(case, rng):
    """Channels last is channels first transposed, bit for bit (one internal path)."""
    x, w, b, kwargs = make_case(case, rng, np.float32)
    first = conv(x, w, b, **kwargs, layout="NCHW")
    for name in ("NHWC", "channels_last", "NLC", "NDHWC"):
        last = conv(np.ascontiguousarray(to_last(x)), w, b, **kwargs, layout=name)
        assert last.flags.c_contiguous and last.dtype == np.float32
        np.testing.assert_array_equal(to_first(last), first)
    for name in ("channels_first", "NCL", "NCDHW"):
        np.testing.assert_array_equal(conv(x, w, b, **kwargs, layout=name), first)


def test_methods_agree_on_larger_grids(rng):
    """shift and gather on sizes where both run many rows (and shift's dropped rows)."""
    for size, kernel, dilation, groups in [((17, 23), (3, 3), 1, 1), ((9, 8, 7), (2, 3, 3),
                                           (2, 1, 1), 2), ((40,), (7,), 3, 4)]:
        x = rng.standard_normal((2, 8) + size)
        w = rng.standard_normal((12, 8 // groups) + kernel)
        args = (rng.standard_normal(12), 1, "same", dilation, groups, "NCHW")
        shift = denseconv._conv(x, w, *args, method="shift")
        gather = denseconv._conv(x, w, *args, method="gather")
        np.testing.assert_allclose(shift, gather, rtol=1e-12, atol=1e-12)


def test_automatic_method():
    x = np.zeros((1, 192, 200, 350), np.float32)
    w = np.zeros((48, 192, 3, 3), np.float32)
    assert denseconv._Plan(x, w, None, 1, "same", 1, 1, "NCHW", None).method == "shift"
    assert denseconv._Plan(x, w, None, 2, 1, 1, 1, "NCHW", None).method == "gather"
    small = np.zeros((3, 1, 5, 5), np.float32)
    # padding 0 on a 5x5 grid: 9 outputs per sample, 25 rows per sample on the padded grid
    assert denseconv._Plan(small, w[:1, :1], None, 1, 0, 1, 1, "NCHW", None).method == "gather"
    with pytest.raises(ValueError, match="no method 'shift'"):
        denseconv._Plan(x, w, None, 2, 1, 1, 1, "NCHW", "shift")


def test_single_channel_against_scipy(rng):
    signal = pytest.importorskip("scipy.signal")
    ndimage = pytest.importorskip("scipy.ndimage")
    for size, kernel in [((13,), (4,)), ((9, 11), (3, 2)), ((6, 7, 5), (2, 3, 3))]:
        x = rng.standard_normal(size)
        w = rng.standard_normal(kernel)
        d = len(size)
        x4, w4 = x[None, None], w[None, None]
        np.testing.assert_allclose(conv(x4, w4, padding="valid")[0, 0],
                                   signal.correlate(x, w, mode="valid"), rtol=1e-11,
                                   atol=1e-12)
        # full correlation: padding k - 1 on both sides
        full = signal.correlate(x, w, mode="full")
        np.testing.assert_allclose(conv(x4, w4, padding=tuple(k - 1 for k in kernel))[0, 0],
                                   full, rtol=1e-11, atol=1e-12)
        # stride: every s-th output of the full correlation
        strides = (2, 3, 1)[:d]
        np.testing.assert_allclose(
            conv(x4, w4, stride=strides, padding=tuple(k - 1 for k in kernel))[0, 0],
            full[tuple(slice(None, None, s) for s in strides)], rtol=1e-11, atol=1e-12)
        # dilation 2: the kernel with zeros between its taps
        dilated = np.zeros(tuple(2 * k - 1 for k in kernel))
        dilated[tuple(slice(None, None, 2) for _ in kernel)] = w
        np.testing.assert_allclose(conv(x4, w4, dilation=2)[0, 0],
                                   signal.correlate(x, dilated, mode="valid"), rtol=1e-11,
                                   atol=1e-12)
        # 'same' with an odd kernel is ndimage's zero-padded, centred correlation
        odd = rng.standard_normal((3,) * d)
        np.testing.assert_allclose(conv(x4, odd[None, None], padding="same")[0, 0],
                                   ndimage.correlate(x, odd, mode="constant", cval=0.0),
                                   rtol=1e-11, atol=1e-12)


def test_float32_agrees_with_float64(rng):
    for case in CASES:
        x, w, b, kwargs = make_case(case, rng)
        expected = conv(x, w, b, **kwargs)
        for layout in ("NCHW", "NHWC"):
            xl = x if layout == "NCHW" else to_last(x)
            got = conv(xl.astype(np.float32), w.astype(np.float32), b.astype(np.float32),
                       **kwargs, layout=layout)
            assert got.dtype == np.float32
            got = got if layout == "NCHW" else to_first(got)
            scale = np.abs(expected).max()
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * scale,
                                       err_msg=case_id(case))


def test_deterministic(rng):
    x = rng.standard_normal((2, 16, 31, 29)).astype(np.float32)
    w = rng.standard_normal((8, 16, 3, 3)).astype(np.float32)
    first = conv(x, w, padding=1)
    for _ in range(2):
        np.testing.assert_array_equal(conv(x, w, padding=1), first)


def test_empty_batch(rng):
    x = np.zeros((0, 4, 5, 6), np.float32)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    b = np.ones(6, np.float32)
    out = conv(x, w, b, padding=1, groups=2)
    assert out.shape == (0, 6, 5, 6)
    tx, tw, tb = (ad.Tensor(a, requires_grad=True) for a in (x, w, b))
    conv(tx, tw, tb, padding=1, groups=2).backward(np.zeros((0, 6, 5, 6), np.float32))
    assert tx.grad.shape == x.shape
    np.testing.assert_array_equal(tw.grad, 0)
    np.testing.assert_array_equal(tb.grad, 0)


# -- gradients --------------------------------------------------------------------------------
GRAD_CASES = [c for c in CASES if np.prod(c[3]) * c[0] * c[1] <= 400] + [
    (1, 2, 2, (5, 6), (2, 2), 1, "same", 2, 1),
    (2, 4, 4, (7,), (3,), 2, 1, 1, 4),
    (1, 2, 2, (4, 3, 5), (2, 2, 3), (1, 2, 1), (1, 0, 1), (1, 1, 2), 2),
    (2, 2, 4, (3, 4, 4), (2, 3, 2), 1, "same", 1, 2),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=case_id)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_gradients_against_finite_differences(case, layout, rng):
    x, w, b, kwargs = make_case(case, rng)
    if layout == "NHWC":
        x = np.ascontiguousarray(to_last(x))
    for method in methods(kwargs):
        err = ad.check_gradients(lambda x, w, b: run(x, w, b, kwargs, layout, method),
                                 [x, w, b], rtol=1e-6, atol=1e-7)
        assert err < 1e-6, method


def test_gradients_without_bias_and_of_some_inputs_only(rng):
    x = rng.standard_normal((2, 4, 6, 5))
    w = rng.standard_normal((6, 2, 3, 3))
    ad.check_gradients(lambda x, w: conv(x, w, padding="same", groups=2), [x, w])
    g = rng.standard_normal((2, 6, 6, 5))
    full_x, full_w = ad.Tensor(x, requires_grad=True), ad.Tensor(w, requires_grad=True)
    conv(full_x, full_w, padding="same", groups=2).backward(g)
    only_w = ad.Tensor(w, requires_grad=True)
    out = conv(x, only_w, padding="same", groups=2)
    assert isinstance(out, ad.Tensor) and out.requires_grad
    out.backward(g)
    np.testing.assert_array_equal(only_w.grad, full_w.grad)
    only_x, const_w = ad.Tensor(x, requires_grad=True), ad.Tensor(w)
    b = ad.Tensor(np.ones(6))
    conv(only_x, const_w, b, padding="same", groups=2).backward(g)
    np.testing.assert_array_equal(only_x.grad, full_x.grad)
    assert const_w.grad is None and b.grad is None
    only_b = ad.Tensor(np.ones(6), requires_grad=True)
    conv(x, w, only_b, padding="same", groups=2).backward(g)
    np.testing.assert_allclose(only_b.grad, g.sum(axis=(0, 2, 3)), rtol=1e-12)


def test_gradient_of_unread_input_is_zero(rng):
    """Stride 3 over 10 columns with a 3-wide kernel and no padding reads columns 0..8
    only; the input is cropped before padding, and column 9 gets a zero gradient."""
    x = ad.Tensor(rng.standard_normal((1, 2, 10, 10)), requires_grad=True)
    w = rng.standard_normal((3, 2, 3, 3))
    out = conv(x, w, stride=3)
    assert out.shape == (1, 3, 3, 3)
    out.backward(np.ones(out.shape))
    assert np.all(x.grad[..., 9] == 0) and np.all(x.grad[..., 9, :] == 0)
    assert np.all(x.grad[..., :9, :9] != 0)


def test_return_kinds(rng):
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    assert type(conv(x, w)) is np.ndarray
    out = conv(ad.Tensor(x), w)
    assert isinstance(out, ad.Tensor) and not out.requires_grad
    with ad.no_grad():
        out = conv(ad.Tensor(x, requires_grad=True), w)
    assert isinstance(out, ad.Tensor) and not out.requires_grad
    out = conv(x, ad.Tensor(w, requires_grad=True))
    assert out.requires_grad and out.dtype == np.float32
    np.testing.assert_array_equal(out.data, conv(x, w))


def test_float32_gradients_agree_with_float64(rng):
    x, w, b, kwargs = make_case((2, 4, 6, (7, 9), (3, 3), 1, "same", 1, 2), rng)
    g = rng.standard_normal((2, 6, 7, 9))
    grads = {}
    for dtype in (np.float64, np.float32):
        tensors = [ad.Tensor(a.astype(dtype), requires_grad=True) for a in (x, w, b)]
        conv(*tensors, **kwargs).backward(g.astype(dtype))
        grads[dtype] = [t.grad for t in tensors]
        assert all(t.grad.dtype == dtype for t in tensors)
    for g32, g64 in zip(grads[np.float32], grads[np.float64]):
        np.testing.assert_allclose(g32, g64, rtol=0, atol=1e-5 * np.abs(g64).max())


# -- CuPy ---------------------------------------------------------------------------------------
GPU_CASES = [(2, 4, 6, (7, 9), (3, 3), 1, "same", 1, 2),
             (1, 4, 4, (6, 8), (3, 2), 2, 1, (1, 2), 1),
             (1, 6, 6, (5, 4, 6), (3, 3, 2), 1, 1, 1, 6),
             (2, 2, 6, (12,), (4,), 1, "same", 2, 2)]


@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_gpu_matches_cpu(gpu_device, case, layout, rng):
    x, w, b, kwargs = make_case(case, rng, np.float32)
    if layout == "NHWC":
        x = np.ascontiguousarray(to_last(x))
    cpu_tensors = [ad.Tensor(a, requires_grad=True) for a in (x, w, b)]
    cpu_out = conv(*cpu_tensors, **kwargs, layout=layout)
    g = rng.standard_normal(cpu_out.shape).astype(np.float32)
    cpu_out.backward(g)
    gpu_tensors = [ad.Tensor(backend.to_device(a, gpu_device), requires_grad=True)
                   for a in (x, w, b)]
    gpu_g = backend.to_device(g, gpu_device)
    emulator = sys.modules["cupy_emulator"] if getattr(sys.modules["cupy"], "emulated",
                                                       False) else None
    if emulator is not None:
        emulator.syncs.clear()
    gpu_out = conv(*gpu_tensors, **kwargs, layout=layout)
    assert backend.is_cupy_array(gpu_out.data)
    gpu_out.backward(gpu_g)
    if emulator is not None:   # shapes only: nothing waits for the device
        assert emulator.syncs == []
    scale = float(np.abs(cpu_out.data).max())
    np.testing.assert_allclose(backend.to_numpy(gpu_out.data), cpu_out.data, rtol=0,
                               atol=1e-5 * scale)
    for c, d in zip(cpu_tensors, gpu_tensors):
        assert backend.is_cupy_array(d.grad)
        np.testing.assert_allclose(backend.to_numpy(d.grad), c.grad, rtol=0,
                                   atol=1e-5 * float(np.abs(c.grad).max()))
    # plain device arrays in, a device array out
    plain = conv(*(t.data for t in gpu_tensors), **kwargs, layout=layout)
    assert backend.is_cupy_array(plain)
    np.testing.assert_array_equal(backend.to_numpy(plain), backend.to_numpy(gpu_out.data))


def test_gpu_refuses_mixed_devices(gpu_device, rng):
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    with pytest.raises(TypeError):
        conv(backend.to_device(x, gpu_device), w)


# -- bad input -----------------------------------------------------------------------------
X = np.zeros((2, 4, 6, 6), np.float32)
W = np.zeros((6, 2, 3, 3), np.float32)
BAD = [
    (dict(x=np.zeros((2, 4, 6), np.float32)), ValueError, r"x must have 4 dimensions"),
    (dict(weight=np.zeros((6, 2), np.float32)), ValueError, r"weight must be \(Cout"),
    (dict(groups=1), ValueError, r"x has 4 channels but weight .* expects 2 \* 1"),
    (dict(weight=np.zeros((5, 2, 3, 3), np.float32)), ValueError,
     r"5 output channels are not divisible by groups=2"),
    (dict(groups=0), ValueError, r"groups must be positive"),
    (dict(groups=2.0), TypeError, r"groups must be an int"),
    (dict(stride=0), ValueError, r"stride must be positive"),
    (dict(stride=(1, -1)), ValueError, r"stride must be positive"),
    (dict(stride=(1, 1, 1)), ValueError, r"stride must be an int or 2 ints"),
    (dict(stride=1.5), TypeError, r"stride must be an int or a tuple"),
    (dict(stride=True), TypeError, r"stride must be an int"),
    (dict(dilation=0), ValueError, r"dilation must be positive"),
    (dict(padding=-1), ValueError, r"padding must be non-negative"),
    (dict(padding=(0, -2)), ValueError, r"padding must be non-negative"),
    (dict(padding="full"), ValueError, r"padding must be an int, 2 ints, 'same' or 'valid'"),
    (dict(padding="same", stride=2), ValueError, r"padding='same' needs stride 1"),
    (dict(weight=np.zeros((6, 2, 7, 3), np.float32)), ValueError,
     r"kernel \(7, 3\) .* larger than the padded input \(6, 6\)"),
    (dict(dilation=3), ValueError, r"spans \(7, 7\), larger than the padded input"),
    (dict(weight=np.zeros((6, 2, 3, 3), np.float64)), TypeError,
     r"weight's dtype float64 differs from x's float32"),
    (dict(x=np.zeros((2, 4, 6, 6), np.int32), weight=np.zeros((6, 2, 3, 3), np.int32)),
     TypeError, r"x must be float32 or float64"),
    (dict(x=np.zeros((2, 4, 6, 6), np.float16), weight=np.zeros((6, 2, 3, 3), np.float16)),
     TypeError, r"x must be float32 or float64"),
    (dict(bias=np.zeros(5, np.float32)), ValueError, r"bias must have shape \(6,\)"),
    (dict(bias=np.zeros((6, 1), np.float32)), ValueError, r"bias must have shape \(6,\)"),
    (dict(bias=np.zeros(6, np.float64)), TypeError, r"bias's dtype float64 differs"),
    (dict(x=[[1.0]]), TypeError, r"x must be a NumPy/CuPy array"),
    (dict(weight="w"), TypeError, r"weight must be a NumPy/CuPy array"),
    (dict(layout="NCWH"), ValueError, r"layout must be one of"),
    (dict(layout=None), ValueError, r"layout must be one of"),
    (dict(x=np.zeros((2, 4, 0, 6), np.float32)), ValueError, r"non-zero channel and spatial"),
    (dict(weight=np.zeros((6, 2, 0, 3), np.float32)), ValueError, r"non-zero sizes"),
]


@pytest.mark.parametrize("change, error, message", BAD, ids=[str(b[0])[:60] for b in BAD])
def test_bad_input(change, error, message):
    args = dict(x=X, weight=W, bias=None, stride=1, padding=0, dilation=1, groups=2,
                layout="NCHW")
    args.update(change)
    with pytest.raises(error, match=message):
        conv(**args)


def test_good_input_next_to_the_bad():
    """The baseline of test_bad_input is valid, so each error there is the change's."""
    out = conv(X, W, None, stride=1, padding=0, dilation=1, groups=2)
    assert out.shape == (2, 6, 4, 4)
    assert conv(X, W, np.zeros(6, np.float32), padding=(1, 2), dilation=(1, 2),
                groups=2).shape == (2, 6, 6, 6)
    assert conv(X, W, groups=2, stride=(3, 1)).shape == (2, 6, 2, 4)
