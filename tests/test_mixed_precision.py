"""Mixed precision: float16 features and weights, float32 accumulation, float32 statistics,
loss scaling (GradScaler) and float32 master weights (docs/mixed_precision.md).

Inputs are float16-representable (drawn, then rounded to float16); the reference is the
float64 computation on those very values, so the difference is the float16 path's own
rounding. Tolerances (derived in :func:`f16_tolerance`):

* a kernel that accumulates in float32 and rounds once is off by at most half a float16
  ulp of its result (2^-11 relative) plus the float32 accumulation error (n * 2^-24 of
  ``S = sum |x| |w|`` over the n terms of an output): we allow ``2^-11 |y| + 2^-10 S``.
  The CUDA convolution rounds each offset's product to float16 before the float32 sum
  (docs/cuda.md), which costs up to 2^-11 S more: inside the same allowance. A missing or
  wrong term of size O(1) is ~1000 times larger than 2^-10 S for the small S used here.
* the CPU kernels are exactly "convert to float32, run the float32 kernel, round once":
  checked bit for bit against that.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import sparsegrid as sg
import sparsegrid.nn as scn
from conftest import KernelSet, _backend_names, _device_names
from optional import require
from sparsegrid import autodiff as ad
from sparsegrid import backend, cpu
from sparsegrid.autodiff.core import data_of
from sparsegrid.nn.amp import SkippedStepWarning
from sparsegrid.nn.optim import SGD, Adam, AdamW

U16 = 2.0 ** -11        # float16 unit roundoff (half an ulp at 1)


def f16(array):
    """The float16 values of ``array`` (what every test feeds the float16 path)."""
    return np.asarray(array).astype(np.float16)


def f16_tolerance(reference, magnitude):
    """Allowed |float16 result - float64 reference|: 2^-11 |y| + 2^-10 S, elementwise,
    ``magnitude`` being S = sum |x| |w| of the terms of each output (see the module
    docstring)."""
    return U16 * np.abs(reference) + 2 * U16 * magnitude


def assert_f16_close(actual, reference, magnitude):
    actual = backend.to_numpy(data_of(actual))
    reference = np.asarray(data_of(reference), np.float64)
    magnitude = np.asarray(data_of(magnitude), np.float64)
    assert actual.dtype == np.float16, actual.dtype
    error = np.abs(actual.astype(np.float64) - reference)
    allowed = f16_tolerance(reference, magnitude)
    worst = np.unravel_index(np.argmax(error - allowed), error.shape) if error.size else ()
    assert np.all(error <= allowed), (error[worst], allowed[worst], worst)


# -- scenes ---------------------------------------------------------------------------------------
def _scene(rng, channels=4, shape=(13, 13), n=70, batch=2):
    """A float16 SparseTensor on the CPU with float16-representable values, and its
    float64 twin on the same sites."""
    keys = rng.choice(batch * shape[0] * shape[1], n, replace=False)
    b, rest = np.divmod(keys, shape[0] * shape[1])
    x, y = np.divmod(rest, shape[1])
    indices = np.stack([b, x, y], 1).astype(np.int32)
    values = f16(rng.standard_normal((n, channels)))
    return (sg.SparseTensor(values, indices, shape, batch),
            sg.SparseTensor(values.astype(np.float64), indices, shape, batch))


@pytest.fixture(params=["cpu"] + _device_names())
def device(request):
    """``'cpu'``, and ``'cuda'`` on every device kernel set (the host emulator, a GPU)."""
    if request.param == "cpu":
        yield "cpu"
        return
    kernel_set = KernelSet(request.param).bind()
    yield "cuda"
    kernel_set.unbind()


def _weights(rng, k, cin, cout):
    """float16-representable weights, scaled so outputs stay O(1)."""
    return f16(rng.standard_normal((k, cin, cout)) / np.sqrt(k * cin))


def _on(array, device):
    return backend.to_device(array, device)


# -- SparseTensor and the CPU kernels -------------------------------------------------------------
def test_sparse_tensor_accepts_float16_and_names_other_dtypes(rng):
    x, _ = _scene(rng)
    assert x.dtype == np.float16 and x.type() == "torch.HalfTensor"
    assert x.with_features(f16(np.zeros((x.n_active, 2)))).dtype == np.float16
    assert x.type(np.float32).dtype == np.float32 and x.to(np.float16) is x
    assert x.type(np.float32).type("torch.HalfTensor").dtype == np.float16
    bad = np.ones((x.n_active, 2), np.float16)
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match=r"features row 3 is not finite"):
        sg.SparseTensor(bad, x.indices, x.spatial_shape)
    with pytest.raises(TypeError, match=r"features must be a float32 or float64 array \(or "
                                        r"float16: mixed precision\).*got dtype int8"):
        sg.SparseTensor(np.ones((x.n_active, 2), np.int8), x.indices, x.spatial_shape)


def test_bfloat16_is_refused_with_a_clear_error(rng):
    ml_dtypes = require("ml_dtypes")
    x, _ = _scene(rng)
    features = np.ones((x.n_active, 2), ml_dtypes.bfloat16)
    with pytest.raises(TypeError, match=r"^features: dtype bfloat16 is not supported \(NumPy "
                                        r"has no bfloat16 arithmetic"):
        sg.SparseTensor(features, x.indices, x.spatial_shape)
    with pytest.raises(TypeError, match=r"bfloat16 is not supported"):
        x.with_features(features)


def _float32_then_round(kernel, *args, **kwargs):
    """What a float16 CPU kernel must equal: the float32 kernel on the upcast arguments,
    each floating result rounded once to float16."""
    def up(value):
        return value.astype(np.float32) if getattr(value, "dtype", None) == np.float16 \
            else value

    result = kernel(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
    if isinstance(result, tuple):
        return tuple(r.astype(np.float16) if getattr(r, "dtype", None) == np.float32 else r
                     for r in result)
    return result.astype(np.float16)


def _assert_same_bits(got, want):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert g.dtype == w.dtype, (g.dtype, w.dtype)
        np.testing.assert_array_equal(g, w)


def test_cpu_kernels_are_float32_rounded_once_bit_for_bit(rng):
    """Every accumulating CPU kernel on float16 data equals the float32 kernel on the same
    values rounded once to float16, bit for bit (no float16 partial sums anywhere)."""
    x, _ = _scene(rng, channels=6)
    sub = x.grid.submanifold(x.sites, (3, 3), (1, 1))
    strided, _ = x.grid.strided(x.sites, (3, 3), (2, 2))
    features = data_of(x.features)
    w = _weights(rng, 9, 6, 5)
    bias = f16(rng.standard_normal(5))
    g = f16(rng.standard_normal((x.n_active, 5)))
    for kernel, args in [
            (cpu.conv_forward, (features, w, sub, bias)),
            (cpu.conv_forward, (features, _weights(rng, 9, 6, 5), strided)),
            (cpu.conv_backward, (g, features, w, sub)),
            (cpu.rule_sum, (features, strided)),
            (cpu.rows_product, (features, g)),
            (cpu.segment_reduce, (features, rng.integers(0, 9, x.n_active), 9, "sum")),
            (cpu.segment_reduce, (features, rng.integers(0, 9, x.n_active), 9, "mean")),
            (cpu.segment_reduce, (features, rng.integers(0, 9, x.n_active), 9, "max")),
            (cpu.segment_reduce_backward, (f16(rng.standard_normal((5, 6))),
                                           rng.integers(0, 5, x.n_active), 5, "mean", None,
                                           x.n_active))]:
        got = kernel(*args)
        _assert_same_bits(got, _float32_then_round(kernel, *args))
        assert (got[0] if isinstance(got, tuple) else got).dtype == np.float16


def test_batch_norm_kernels_take_float16_data_and_give_float32_statistics(kernel_set, rng):
    kern = kernel_set.module
    x = f16(rng.standard_normal((300, 5)) * 3 + 2)
    mean, var = kern.batch_norm_statistics(x)
    assert mean.dtype == np.float32 and var.dtype == np.float32
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, x64.var(0), rtol=1e-5)
    weight, bias = f16(rng.standard_normal(5)), f16(rng.standard_normal(5))
    y = kern.batch_norm_forward(x, mean, var, weight, bias, 1e-4, 0.0)
    expected = np.maximum((x64 - mean) / np.sqrt(var.astype(np.float64) + 1e-4) * weight
                          + bias, 0)
    # the normalised value is O(|weight| * 3) before the shift: a few float32 roundings
    assert_f16_close(y, expected, 4 * (np.abs(weight) + np.abs(bias)) * np.ones_like(x64))
    g = f16(rng.standard_normal(x.shape))
    grads = kern.batch_norm_backward(g, x, mean, var, weight, bias, 1e-4, 0.0, True, out=y)
    assert [a.dtype for a in grads] == [np.float16] * 3
    if kernel_set.name == "cpu":
        _assert_same_bits(grads, _float32_then_round(
            cpu.batch_norm_backward, g, x, mean, var, weight, bias, 1e-4, 0.0, True, out=y))


def test_block_scatter_adds_in_float32(rng):
    """SBNet's block scatter with overlapping blocks adds in float32 (the CPU kernel)."""
    base = f16(rng.standard_normal((1, 6, 6, 2)))
    blocks = f16(rng.standard_normal((4, 3, 3, 2)))
    indices = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]], np.int32)
    args = (blocks, indices, base, (3, 3), (0, 0), (2, 2), True)
    _assert_same_bits(cpu.block_scatter(*args), _float32_then_round(cpu.block_scatter, *args))
    inplace = base.copy()
    out = cpu.block_scatter(blocks, indices, inplace, (3, 3), (0, 0), (2, 2), True,
                            inplace=True)
    assert out is inplace
    np.testing.assert_array_equal(inplace, cpu.block_scatter(*args))


# -- every sparse layer type in float16 against float64 -------------------------------------------
def _conv_magnitude(x64, weight, rulebook, bias=None):
    """S = sum over the terms of each output of |x| |w| (the same convolution on |x|, |w|)."""
    total = cpu.conv_forward(np.abs(data_of(x64.features)), np.abs(weight.astype(np.float64)),
                             rulebook)
    return total + (np.abs(bias.astype(np.float64)) if bias is not None else 0)


def test_convolutions_in_float16(rng, device):
    x, x64 = _scene(rng)
    xd = x.to(device)
    w = _weights(rng, 9, 4, 3)
    bias = f16(rng.standard_normal(3))
    out = sg.submanifold_conv(xd, _on(w, device), _on(bias, device), 3)
    ref = sg.submanifold_conv(x64, w.astype(np.float64), bias.astype(np.float64), 3)
    assert out.dtype == np.float16
    rulebook = x64.grid.submanifold(x64.sites, (3, 3), (1, 1))
    assert_f16_close(out.features, ref.features, _conv_magnitude(x64, w, rulebook, bias))
    # strided convolution, then the deconvolution back onto the input's sites
    w2 = _weights(rng, 9, 4, 3)
    down = sg.conv(xd, _on(w2, device), None, 3, 2)
    down64 = sg.conv(x64, w2.astype(np.float64), None, 3, 2)
    strided, _ = x64.grid.strided(x64.sites, (3, 3), (2, 2))
    assert_f16_close(down.features, down64.features, _conv_magnitude(x64, w2, strided))
    w3 = _weights(rng, 9, 3, 2)
    up = sg.deconv(down, _on(w3, device), None, 3, 2)
    up64 = sg.deconv(down64, w3.astype(np.float64), None, 3, 2)
    assert up.dtype == np.float16 and up.n_active == x.n_active
    # the deconvolution's input is itself a float16 result: its rounding (2^-11 relative,
    # plus the convolution's own allowance) enters as more terms of size |down| |w|
    back = strided.transpose()
    magnitude = cpu.conv_forward(np.abs(down64.features) + 3 * _conv_magnitude(
        x64, w2, strided), np.abs(w3.astype(np.float64)), back) if down64.n_active else 0
    assert_f16_close(up.features, up64.features, magnitude)


def test_pooling_in_float16(rng, device):
    x, x64 = _scene(rng)
    xd = x.to(device)
    top = sg.max_pool(xd, 3, 2)
    np.testing.assert_array_equal(backend.to_numpy(top.features),
                                  sg.max_pool(x64, 3, 2).features.astype(np.float16))
    avg = sg.avg_pool(xd, 3, 2)
    avg64 = sg.avg_pool(x64, 3, 2)
    assert_f16_close(avg.features, avg64.features,
                     sg.avg_pool(x64.with_features(np.abs(x64.features)), 3, 2).features)
    # gradients: max pooling routes float16 values, average pooling scales them
    leaf = ad.Tensor(_on(data_of(x.features), device), requires_grad=True)
    pooled = sg.avg_pool(xd.with_features(leaf), 3, 2)
    g = f16(rng.standard_normal(pooled.features.shape))
    pooled.features.backward(_on(g, device))
    assert leaf.grad.dtype == np.float16


def test_batch_norm_layer_in_float16(rng, device):
    x, x64 = _scene(rng, n=120)
    layer = scn.BatchNormReLU(4).half()
    assert layer.running_mean.dtype == np.float32 and layer.running_var.dtype == np.float32
    assert layer.weight.dtype == np.float16
    layer64 = scn.BatchNormReLU(4).double()
    layer.to(device)
    out = layer(x.to(device))
    ref = layer64(x64)
    assert_f16_close(out.features, ref.features.data if hasattr(ref.features, "data")
                     else ref.features, 8 * np.ones(ref.features.shape))
    # running statistics: updated in float32 from float32 batch statistics
    np.testing.assert_allclose(backend.to_numpy(layer.running_mean), layer64.running_mean,
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(backend.to_numpy(layer.running_var), layer64.running_var,
                               rtol=1e-5)
    layer.eval()
    layer64.eval()
    assert_f16_close(layer(x.to(device)).features, data_of(layer64(x64).features),
                     8 * np.ones(ref.features.shape))
    with pytest.raises(TypeError, match=r"running_mean must be an array of the statistics' "
                                        r"dtype \(for float16 features\) float32; got float16"):
        sg.batch_norm(x, running_mean=np.zeros(4, np.float16), running_var=np.ones(4,
                                                                              np.float32))


def test_input_output_and_dense_layers_in_float16(rng, device):
    coords = rng.integers(0, 9, (90, 3))
    coords[:, 2] = rng.integers(0, 2, 90)           # SCN's layout: the batch last
    features = f16(rng.standard_normal((90, 3)))
    for mode in ("sum", "mean", "max", "first"):
        layer = scn.InputLayer(2, 9, mode=mode).to(device)
        x = layer([coords, features])
        x64 = scn.InputLayer(2, 9, mode=mode)([coords, features.astype(np.float64)])
        assert x.dtype == np.float16
        rows = sg.input_layer(x64.indices, np.abs(x64.features), x64.spatial_shape,
                              mode="sum")[0].features if mode != "sum" else None
        assert_f16_close(x.features, x64.features,
                         np.abs(x64.features) if rows is None else rows)
        back = scn.OutputLayer(2)(x)
        back64 = scn.OutputLayer(2)(x64)
        assert_f16_close(back.data, back64.data, np.abs(back64.data))
    dense = scn.SparseToDense(2, 3)(x)
    assert dense.dtype == np.float16
    np.testing.assert_array_equal(backend.to_numpy(dense.data),
                                  scn.SparseToDense(2, 3)(x64).data.astype(np.float16))
    again = sg.from_dense(dense.data)
    assert again.dtype == np.float16 and again.n_active == x.n_active
    linear = scn.Linear(3 * 81, 5)
    linear64 = scn.Linear(3 * 81, 5)
    linear64.load_state_dict({k: v.astype(np.float16) for k, v in linear.state_dict().items()})
    linear.half().to(device)
    linear64.double()
    head = linear(scn.Flatten()(dense))
    head64 = linear64(scn.Flatten()(scn.SparseToDense(2, 3)(x64)))
    flat64 = scn.Flatten()(scn.SparseToDense(2, 3)(x64)).data
    magnitude = np.abs(flat64) @ np.abs(linear64.weight.data.T) + np.abs(linear64.bias.data)
    assert_f16_close(head.data, head64.data, magnitude)


# -- gradients of a float16 model -----------------------------------------------------------------
def _model():
    return scn.Sequential(
        scn.SubmanifoldConvolution(2, 3, 8, 3, False), scn.BatchNormReLU(8),
        scn.Convolution(2, 8, 8, 2, 2, False), scn.BatchNormLeakyReLU(8),
        scn.Deconvolution(2, 8, 6, 2, 2, False), scn.MaxPooling(2, 2, 2),
        scn.SparseToDense(2, 6), scn.Flatten(), scn.Linear(6 * 16, 4))


def _half_and_double(seed=3):
    scn.manual_seed(seed)
    half = _model()
    state = {k: v.astype(np.float16) for k, v in half.state_dict().items()}
    half.load_state_dict(state)
    double = _model().double()
    double.load_state_dict(state)
    return half.half(), double


def _gradients(model, x, weights):
    model.zero_grad()
    out = model(x)
    loss = (out.float() if out.dtype == np.float16 else out) * weights
    ad.sum(loss).backward()
    return {name: backend.to_numpy(p.grad) for name, p in model.named_parameters()}, out


def test_float16_model_gradients_match_float64(rng, device):
    """Every parameter's gradient of a float16 model (convolutions, batch norms, pooling,
    deconvolution, a dense head) is within 2% (relative L2) of the float64 model's on the
    same float16-representable weights and inputs. float16 rounds every layer's output
    and gradient to 2^-11 relative; through nine layers and the batch-norm centring that
    grows to ~0.1-0.5% (measured); a wrong or missing gradient term is O(100%)."""
    half, double = _half_and_double()
    half.to(device)
    coords = rng.integers(0, 8, (60, 3))
    coords[:, 2] = rng.integers(0, 2, 60)
    coords = np.unique(coords, axis=0)
    features = f16(rng.standard_normal((len(coords), 3)))
    x = scn.InputLayer(2, 8).to(device)([coords, features])
    x64 = scn.InputLayer(2, 8)([coords, features.astype(np.float64)])
    weights = rng.standard_normal((2, 4))
    grads16, out16 = _gradients(half, x, _on(weights.astype(np.float32), device))
    grads64, out64 = _gradients(double, x64, weights)
    assert out16.dtype == np.float16
    for name, g64 in grads64.items():
        g16 = grads16[name]
        assert g16.dtype == np.float16, name
        error = np.linalg.norm(g16.astype(np.float64) - g64) / np.linalg.norm(g64)
        assert error < 2e-2, (name, error)


def test_float16_training_is_deterministic(rng):
    """Same float16 model, data and steps: the same bits, for 1 and 2 threads."""
    coords = rng.integers(0, 8, (60, 3))
    coords[:, 2] = rng.integers(0, 2, 60)
    coords = np.unique(coords, axis=0)
    features = f16(rng.standard_normal((len(coords), 3)))
    results = []
    before = sg.get_num_threads()
    try:
        for threads in (1, 2, 1):
            sg.set_num_threads(threads)
            half, _ = _half_and_double()
            optimizer = SGD(half.parameters(), lr=0.05, momentum=0.9)
            scaler = scn.GradScaler(init_scale=256.0)
            for _ in range(3):
                optimizer.zero_grad()
                out = half(scn.InputLayer(2, 8)([coords, features]))
                loss = ad.softmax_cross_entropy(out.float(), np.array([1, 3]))
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            results.append([p.data.copy() for p in half.parameters()])
    finally:
        sg.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_mixed_dtypes_are_refused_naming_the_argument(rng):
    """float16 features with float32 weights (or the reverse) are an error naming the
    weight and saying how to convert: no silent casts either way."""
    x, _ = _scene(rng)
    with pytest.raises(TypeError, match=r"weight must be an array of the features' dtype "
                                        r"float16; got float32 .*\.half\(\)"):
        sg.submanifold_conv(x, np.ones((9, 4, 2), np.float32))
    with pytest.raises(TypeError, match=r"weight must be an array of the features' dtype "
                                        r"float32; got float16"):
        sg.submanifold_conv(x.type(np.float32), np.ones((9, 4, 2), np.float16))
    with pytest.raises(TypeError, match=r"weight must be an array of the features' dtype "
                                        r"float16; got float32.*module\.half\(\)"):
        sg.batch_norm(x, weight=np.ones(4, np.float32))
    model = scn.SubmanifoldConvolution(2, 4, 2, 3, False)       # float32 parameters
    with pytest.raises(TypeError, match=r"features' dtype float16; got float32"):
        model(x)
    assert model.half()(x).dtype == np.float16


# -- autodiff in float16 --------------------------------------------------------------------------
def test_autodiff_ops_in_float16(rng):
    a = f16(rng.standard_normal((40, 30)))
    b = f16(rng.standard_normal((30, 7)))
    c = f16(rng.standard_normal(7))
    leaves16 = [ad.Tensor(v, requires_grad=True) for v in (a, b, c)]
    leaves64 = [ad.Tensor(v.astype(np.float64), requires_grad=True) for v in (a, b, c)]
    outs = []
    for x, y, z in (leaves16, leaves64):
        h = ad.tanh(ad.add(ad.matmul(x, y), z))
        out = ad.sum(ad.log_softmax(h))
        out.backward()
        outs.append(out)
    assert outs[0].dtype == np.float16
    assert abs(float(outs[0]) - float(outs[1])) <= 2e-3 * abs(float(outs[1]))
    for t16, t64 in zip(leaves16, leaves64):
        assert t16.grad.dtype == np.float16
        error = np.abs(t16.grad.astype(np.float64) - t64.grad)
        assert error.max() <= 1e-2 * np.abs(t64.grad).max() + 1e-3, error.max()
    # a float32 operand (a loss scale) promotes the product, but the float16 leaf's
    # gradient comes back float16
    leaf = ad.Tensor(a, requires_grad=True)
    ad.sum(ad.mul(ad.cast(leaf, np.float32), np.float32(1024.0))).backward()
    assert leaf.grad.dtype == np.float16 and np.all(leaf.grad == 1024)


def test_float16_sums_accumulate_in_float32():
    """4096 rows of halves, 3 channels: NumPy's float16 column sum runs row after row in
    float16 and sticks at 1024 (its spacing there is 1, and 1024 + 0.5 rounds back to
    even); autodiff's sum and a convolution's bias gradient (a column sum) accumulate in
    float32 and give 2048 exactly."""
    halves = np.full((4096, 3), 0.5, np.float16)
    assert np.all(halves.sum(axis=0) == 1024)                # the naive way loses half
    assert np.all(ad.sum(ad.Tensor(halves), axis=0).data == 2048)
    ones = ad.Tensor(np.ones((1, 4096), np.float16))
    assert np.all(ad.matmul(ones, ad.Tensor(halves)).data == 2048)
    sites = np.stack([np.zeros(4096), *np.divmod(np.arange(4096), 64)], 1).astype(np.int32)
    x = sg.SparseTensor(np.zeros((4096, 3), np.float16), sites, (64, 64))
    bias = ad.Tensor(np.zeros(3, np.float16), requires_grad=True)
    y = sg.submanifold_conv(x, np.zeros((1, 3, 3), np.float16), bias, 1)
    y.features.backward(halves)
    assert bias.grad.dtype == np.float16 and np.all(bias.grad == 2048)


# -- GradScaler -----------------------------------------------------------------------------------
def _param(value, dtype=np.float16):
    return scn.Parameter(np.array(value, dtype))         # a copy: steps change it in place


def test_grad_scaler_skips_a_step_with_inf_gradients_and_halves_the_scale():
    w = _param([1.0, 2.0, -1.0])
    optimizer = SGD([w], lr=0.1)
    scaler = scn.GradScaler(init_scale=1024.0)
    w.grad = np.array([1.0, np.inf, 0.0], np.float16)
    with pytest.warns(SkippedStepWarning, match=r"skipped the optimizer step.*inf or NaN at "
                                                r"loss scale 1024; update\(\) lowers the "
                                                r"scale to 512"):
        assert scaler.step(optimizer) is None
    np.testing.assert_array_equal(w.data, np.array([1.0, 2.0, -1.0], np.float16))
    assert optimizer.state_of(w) == {} and scaler.skipped_steps == 1
    scaler.update()
    assert scaler.get_scale() == 512.0
    # a NaN too
    w.grad = np.array([np.nan, 0, 0], np.float16)
    with pytest.warns(SkippedStepWarning, match="to 256"):
        scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 256.0
    # a good step: unscaled in float32, applied through the master copy
    w.grad = np.array([256.0, 512.0, -256.0], np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaler.step(optimizer)
    assert w.grad.dtype == np.float32
    np.testing.assert_array_equal(w.grad, [1.0, 2.0, -1.0])
    np.testing.assert_array_equal(w.data, f16([0.9, 1.8, -0.9]))
    scaler.update()
    assert scaler.get_scale() == 256.0


def test_grad_scaler_grows_after_growth_interval_good_steps():
    w = _param([1.0])
    optimizer = SGD([w], lr=0.0)
    scaler = scn.GradScaler(init_scale=8.0, growth_factor=4.0, backoff_factor=0.25,
                            growth_interval=3)
    scales = []
    for grad in [1, 1, 1, 1, np.inf, 1, 1, 1]:
        w.grad = np.array([grad], np.float16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkippedStepWarning)
            scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    assert scales == [8, 8, 32, 32, 8, 8, 8, 32]
    assert scaler.state_dict()["_growth_tracker"] == 0


def test_grad_scaler_scales_the_loss_and_unscales_the_gradients(rng):
    w = scn.Parameter(f16(rng.standard_normal((5, 3))))
    x = f16(rng.standard_normal((4, 5)))
    scaler = scn.GradScaler(init_scale=1024.0)
    loss = ad.sum(ad.matmul(ad.Tensor(x), w))
    scaled = scaler.scale(loss)
    assert scaled.dtype == np.float32          # a scaled loss easily overflows float16
    assert float(scaled.data) == pytest.approx(1024.0 * float(loss.data), rel=1e-3)
    scaled.backward()
    assert w.grad.dtype == np.float16
    optimizer = SGD([w], lr=0.0)
    scaler.unscale_(optimizer)
    expected = x.astype(np.float64).sum(0)[:, None] * np.ones((1, 3))
    np.testing.assert_allclose(w.grad, expected, rtol=1e-3)
    with pytest.raises(RuntimeError, match="unscale_.*already been called"):
        scaler.unscale_(optimizer)
    scaler.step(optimizer)                    # no second unscale
    with pytest.raises(RuntimeError, match="step.*already been called"):
        scaler.step(optimizer)
    scaler.update()
    with pytest.raises(RuntimeError, match="no inf checks were recorded"):
        scaler.update()
    with pytest.raises(TypeError, match="outputs must be a floating Tensor"):
        scaler.scale(np.array([1, 2]))
    assert [t.dtype for t in scaler.scale([loss, ad.Tensor(np.ones(2))])] == \
        [np.float32, np.float64]


def test_grad_scaler_disabled_is_a_pass_through():
    w = _param([1.0], np.float32)
    optimizer = SGD([w], lr=0.5)
    scaler = scn.GradScaler(enabled=False)
    loss = ad.Tensor(np.float32(3.0))
    assert scaler.scale(loss) is loss and scaler.get_scale() == 1.0
    w.grad = np.array([1.0], np.float32)
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    assert w.data[0] == 0.5 and scaler.state_dict() == {}


def test_grad_scaler_state_dict_round_trip_and_validation():
    scaler = scn.GradScaler(init_scale=128.0, growth_interval=5)
    w = _param([1.0])
    optimizer = SGD([w], lr=0.0)
    for _ in range(2):
        w.grad = np.array([1.0], np.float16)
        scaler.step(optimizer)
        scaler.update()
    state = scaler.state_dict()
    assert state == {"scale": 128.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                     "growth_interval": 5, "_growth_tracker": 2}
    other = scn.GradScaler()
    other.load_state_dict(state)
    assert other.state_dict() == state and other.get_scale() == 128.0
    for _ in range(3):
        w.grad = np.array([1.0], np.float16)
        other.step(optimizer)
        other.update()
    assert other.get_scale() == 256.0          # the restored tracker counted on
    with pytest.raises(RuntimeError, match="empty"):
        other.load_state_dict({})
    with pytest.raises(KeyError, match="_growth_tracker"):
        other.load_state_dict({k: v for k, v in state.items() if k != "_growth_tracker"})
    with pytest.raises(ValueError, match="backoff_factor must be a finite number in"):
        other.load_state_dict(dict(state, backoff_factor=1.5))
    assert other.get_scale() == 256.0          # a failed load changed nothing
    for kwargs, exc, match in [
            ({"init_scale": 0.0}, ValueError, "init_scale"),
            ({"growth_factor": 1.0}, ValueError, "growth_factor"),
            ({"backoff_factor": "0.5"}, TypeError, "backoff_factor"),
            ({"growth_interval": 0}, ValueError, "growth_interval"),
            ({"growth_interval": 2.0}, TypeError, "growth_interval"),
            ({"enabled": "yes"}, TypeError, "enabled")]:
        with pytest.raises(exc, match=match):
            scn.GradScaler(**kwargs)


# -- float32 master weights -----------------------------------------------------------------------
def test_sgd_master_weights_accumulate_updates_too_small_for_float16():
    """lr * grad = 1e-4 on a weight of 1.0: float16's spacing below 1 is 2^-11 = 4.9e-4,
    so a float16 update rounds back to 1.0 every time; the float32 master copy moves, and
    the parameter follows once the master has moved far enough."""
    assert np.float16(1.0) - np.float16(1e-4) == np.float16(1.0)   # the naive update is lost
    w = _param([1.0, -2.0])
    optimizer = SGD([w], lr=1e-4)
    for _ in range(100):
        w.grad = np.array([1.0, -1.0], np.float16)
        optimizer.step()
    master = optimizer.state_of(w)["master_param"]
    assert master.dtype == np.float32
    expected = np.array([1.0, -2.0], np.float32)
    for _ in range(100):
        expected = expected - np.float32(1e-4) * np.array([1.0, -1.0], np.float32)
    np.testing.assert_array_equal(master, expected)
    np.testing.assert_array_equal(w.data, expected.astype(np.float16))
    assert w.data[0] < 0.991 and w.dtype == np.float16


@pytest.mark.parametrize("kind", [SGD, Adam, AdamW])
def test_master_weights_follow_the_float32_update_exactly(kind, rng):
    """A float16 parameter's master copy takes exactly the float32 parameter's steps
    (on the float16 gradients), its state is float32, and Adam's eps = 1e-8 and tiny
    squared gradients are not lost to float16."""
    kwargs = dict(lr=1e-3) if kind is not SGD else dict(lr=1e-2, momentum=0.9, nesterov=True,
                                                        weight_decay=1e-4)
    start = f16(rng.standard_normal(6))
    w16, w32 = _param(start), _param(start, np.float32)
    opt16, opt32 = kind([w16], **kwargs), kind([w32], **kwargs)
    for _ in range(5):
        grad = f16(rng.standard_normal(6) * 1e-4)       # squares below float16's range
        w16.grad, w32.grad = grad, grad.astype(np.float32)
        opt16.step()
        opt32.step()
    state = opt16.state_of(w16)
    np.testing.assert_array_equal(state["master_param"], w32.data)
    np.testing.assert_array_equal(w16.data, w32.data.astype(np.float16))
    assert all(v.dtype == np.float32 for k, v in state.items() if k != "step")
    assert not np.array_equal(state["master_param"], start.astype(np.float32))


def test_master_weights_state_dict_round_trip_and_resync(rng):
    start = f16(rng.standard_normal(4))
    w = _param(start)
    optimizer = Adam([w], lr=1e-3)
    for _ in range(3):
        w.grad = f16(rng.standard_normal(4))
        optimizer.step()
    saved = optimizer.state_dict()
    assert saved["state"][0]["master_param"].dtype == np.float32
    twin = _param(w.data.copy())
    restored = Adam([twin], lr=1e-3)
    restored.load_state_dict(saved)
    assert restored.state_of(twin)["master_param"].dtype == np.float32
    assert restored.state_of(twin)["exp_avg"].dtype == np.float32
    for _ in range(2):
        grad = f16(rng.standard_normal(4))
        w.grad, twin.grad = grad, grad.copy()
        optimizer.step()
        restored.step()
    np.testing.assert_array_equal(twin.data, w.data)
    np.testing.assert_array_equal(restored.state_of(twin)["master_param"],
                                  optimizer.state_of(w)["master_param"])
    # the parameter's array replaced (a model load): the master copy is taken from it
    old_master = optimizer.state_of(w)["master_param"].copy()
    w.data = f16(np.full(4, 3.0))
    w.grad = f16(np.zeros(4))
    optimizer.step()                          # Adam's moments still move it, by ~lr
    master = optimizer.state_of(w)["master_param"]
    assert np.all(np.abs(master - 3.0) < 1e-2) and np.all(np.abs(old_master - 3.0) > 0.1)


def test_module_half_keeps_statistics_float32_and_float_restores(rng):
    model = scn.Sequential(scn.SubmanifoldConvolution(2, 3, 4, 3, False),
                           scn.BatchNormReLU(4), scn.MeanOnlyBNLeakyReLU(4))
    assert model.half() is model
    assert all(p.dtype == np.float16 for p in model.parameters())
    assert {str(b.dtype) for _, b in model.named_buffers()} == {"float32"}
    model.float()
    assert all(p.dtype == np.float32 for p in model.parameters())
    model.double()
    assert {str(b.dtype) for _, b in model.named_buffers()} == {"float64"}
    coords = rng.integers(0, 8, (30, 2))
    x = scn.InputLayer(2, 8)([coords, f16(rng.standard_normal((30, 3)))])
    model.half()
    assert model(x).dtype == np.float16


def test_gradients_of_inputs_are_float16(rng):
    """A float16 leaf's gradient through sparse ops is float16 (whatever dtype the loss)."""
    x, _ = _scene(rng)
    leaf = ad.Tensor(data_of(x.features), requires_grad=True)
    y = sg.submanifold_conv(x.with_features(leaf), _weights(rng, 9, 4, 2))
    y = sg.batch_norm(y, running_mean=np.zeros(2, np.float32),
                      running_var=np.ones(2, np.float32))
    total = ad.sum(ad.mul(ad.cast(y.features, np.float64), 3.0))
    total.backward()
    assert leaf.grad.dtype == np.float16 and np.isfinite(leaf.grad).all()


# -- found in review: means of many float16 terms, softmax, in-place parameter changes ------------
def test_float16_means_and_losses_of_many_terms_do_not_overflow():
    """A float16 sum of 10^5 terms of size ~2 overflows (65504); the mean and the mean
    losses sum and scale in float32 and round once."""
    from sparsegrid import autodiff as ad
    rng = np.random.default_rng(0)
    n, c = 40000, 10
    logits = rng.standard_normal((n, c)).astype(np.float16)
    labels = rng.integers(0, c, n)
    half = ad.Tensor(logits, requires_grad=True)
    loss16 = ad.softmax_cross_entropy(half, labels)
    loss32 = ad.softmax_cross_entropy(ad.Tensor(logits.astype(np.float32)), labels)
    assert loss16.dtype == np.float16 and abs(float(loss16.data) - float(loss32.data)) < 2e-3
    loss16.backward()
    assert np.isfinite(half.grad).all() and half.grad.dtype == np.float16
    ones = ad.Tensor(np.ones(100000, np.float16), requires_grad=True)
    mean = ad.mean(ones)
    assert float(mean.data) == 1.0
    mean.backward()
    np.testing.assert_array_equal(ones.grad, np.float16(1e-5))     # a float16 subnormal
    bce = ad.binary_cross_entropy_with_logits(ad.Tensor(np.full(100000, -2.0, np.float16)),
                                              np.ones(100000, np.float16))
    assert abs(float(bce.data) - np.log1p(np.exp(2.0))) < 2e-3


def test_float16_softmax_rounds_once_and_its_gradient_matches_float64():
    from sparsegrid import autodiff as ad
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 7)).astype(np.float16)
    g = rng.standard_normal((5, 7)).astype(np.float16)
    t = ad.Tensor(x, requires_grad=True)
    out = ad.softmax(t, axis=1)
    wide = np.exp(x.astype(np.float64) - x.astype(np.float64).max(1, keepdims=True))
    want = wide / wide.sum(1, keepdims=True)
    np.testing.assert_array_equal(out.data, want.astype(np.float16))   # one rounding
    (out * ad.Tensor(g)).sum().backward()
    g64 = g.astype(np.float64)
    want_grad = want * (g64 - (g64 * want).sum(1, keepdims=True))
    np.testing.assert_allclose(t.grad.astype(np.float64), want_grad, atol=2e-3)


def test_a_float16_parameter_changed_in_place_keeps_its_new_value():
    """The float32 master follows a change made behind the optimizer's back (written in
    place, clipped, loaded), element by element: the next step starts from it."""
    w = scn.Parameter(np.array([1.0, 2.0, 3.0], np.float16))
    opt = scn.optim.SGD([w], lr=0.1)
    w.grad = np.ones(3, np.float16)
    opt.step()
    w.data[1] = np.float16(5.0)
    w.grad = np.zeros(3, np.float16)
    opt.step()
    np.testing.assert_array_equal(w.data, np.array([0.9, 5.0, 2.9], np.float16))
    master = opt.state_of(w)["master_param"]
    assert master.dtype == np.float32 and master[1] == 5.0


def test_scaler_step_without_any_gradient_raises_as_torch():
    w = scn.Parameter(np.ones(2, np.float16))
    opt = scn.optim.SGD([w], lr=0.1)
    scaler = scn.GradScaler()
    with pytest.raises(RuntimeError, match="no inf checks"):
        scaler.step(opt)
    np.testing.assert_array_equal(w.data, np.ones(2, np.float16))


def _toy_training(device, dtype, steps=12):
    """Losses of a few GradScaler steps of nn_helpers' toy network in ``dtype`` on
    ``device`` (the fused implicit-GEMM kernel runs its float16 convolutions on a GPU)."""
    from nn_helpers import toy_batch, toy_model
    inputs, labels = toy_batch(seed=4)
    model = toy_model()
    if dtype == np.float16:
        model.half()
    feats = inputs[1].astype(dtype)
    if device == "cuda":
        import cupy
        model.cuda()
        batch = [cupy.asarray(inputs[0]), cupy.asarray(feats), inputs[2]]
    else:
        batch = [inputs[0], feats, inputs[2]]
    optimizer = scn.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = scn.GradScaler(init_scale=2.0 ** 10, enabled=dtype == np.float16)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        logits = model(batch)
        loss = ad.softmax_cross_entropy(logits.float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(backend.to_numpy(data_of(loss))))
    return losses, scaler


def test_float16_training_follows_float32_on_every_device(device):
    """The same network, data and steps in float16 (GradScaler, float32 master weights;
    on a GPU the fused tensor-core kernel) and in float32: the losses fall alike."""
    from sparsegrid.cuda import autotune
    with autotune.conv_algorithm("implicit_gemm" if device == "cuda" else "auto"):
        half, scaler = _toy_training(device, np.float16)
    full, _ = _toy_training(device, np.float32)
    assert scaler.skipped_steps == 0
    assert half[-1] < 0.5 * half[0] and full[-1] < 0.5 * full[0]
    np.testing.assert_allclose(half, full, rtol=0.05, atol=0.02)
