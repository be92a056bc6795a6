"""The device surface: SparseTensor / Module ``.to`` / ``.cuda`` / ``.cpu``, optimizer state
that follows its parameters, checkpoints that are NumPy on disk, errors when devices mix,
and the examples' ``--device`` flag (docs/devices.md).

The CPU half runs everywhere. The ``test_gpu_*`` tests take the ``gpu_device`` fixture
(tests/conftest.py): a real GPU where CuPy sees one, and the host emulator of CuPy
(tests/cupy_emulator.py, installed as ``cupy`` for the test) wherever a C++ compiler is,
so they run in CI too; the example run on ``--device cuda`` (a subprocess) needs a real
GPU.
"""

from __future__ import annotations

import copy
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import sparsegrid as sg
import sparsegrid.nn as scn
from nn_helpers import deep_equal, step, toy_batch, toy_model
from sparsegrid import autodiff as ad
from sparsegrid import backend
from sparsegrid.nn import checkpoint
from sparsegrid.nn.optim import SGD, Adam, AdamW

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

gpu = pytest.mark.skipif(not backend.cuda_available(), reason="needs a GPU")
no_gpu = pytest.mark.skipif(backend.cuda_available(), reason="a GPU is available here")

BAD_DEVICES = [("tpu", ValueError), ("cuda:x", ValueError), ("cpu:0", ValueError),
               ("", ValueError), (-1, ValueError), (True, TypeError), (1.5, TypeError),
               (None, TypeError), (["cpu"], TypeError)]


def _tensor(rng, dtype=np.float32, channels=3, requires_grad=False):
    indices = np.array([[0, 1, 2], [0, 1, 3], [0, 4, 4], [1, 0, 0], [1, 5, 6], [1, 5, 5]],
                       np.int32)
    features = rng.standard_normal((len(indices), channels)).astype(dtype)
    if requires_grad:
        features = ad.Tensor(features, requires_grad=True)
    return sg.SparseTensor(features, indices, (7, 8), batch_size=3)


def _net(seed=5, channels=3, dtype=np.float64):
    scn.manual_seed(seed)
    model = scn.Sequential(scn.SubmanifoldConvolution(2, channels, 8, 3, True),
                           scn.BatchNormReLU(8), scn.SparseToDense(2, 8))
    return model.astype(dtype)


# -- SparseTensor ---------------------------------------------------------------------------
def test_tensor_on_the_cpu_stays_itself(rng):
    x = _tensor(rng)
    assert x.device == "cpu"
    assert x.to("cpu") is x and x.cpu() is x and x.to(" CPU ") is x
    y = sg.submanifold_conv(x, np.ones((9, 3, 2), np.float32))
    assert y.device == "cpu" and y.to("cpu") is y
    t = _tensor(rng, requires_grad=True)
    assert t.cpu() is t and t.cpu().features.requires_grad


@pytest.mark.parametrize("device, error", BAD_DEVICES)
def test_malformed_devices_are_refused_naming_the_device(rng, device, error):
    with pytest.raises(error, match="device"):
        backend.parse_device(device)
    with pytest.raises(error, match="device"):
        _tensor(rng).to(device)
    with pytest.raises(error, match="device"):
        _net().to(device)


def test_cuda_refuses_the_cpu(rng):
    with pytest.raises(ValueError, match=r"cuda\(device\).*'cpu'.*\.cpu\(\)"):
        _tensor(rng).cuda("cpu")
    with pytest.raises(ValueError, match=r"cuda\(device\).*'cpu'"):
        _net().cuda("cpu")


def test_module_to_a_dtype_points_to_astype():
    with pytest.raises(TypeError, match="astype"):
        _net().to(np.float32)
    with pytest.raises(TypeError, match="astype"):
        _net().to(np.dtype("float64"))


@no_gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1", 0, "gpu"])
def test_without_a_gpu_moving_there_is_a_clear_runtime_error(rng, device):
    x, model = _tensor(rng, requires_grad=True), _net()
    before = [p.data for p in model.parameters()]
    for move in (lambda: x.to(device), lambda: model.to(device),
                 lambda: ad.to_device(x.features, device)):
        with pytest.raises(RuntimeError, match=f"device {device!r} needs CuPy and a visible "
                                               "NVIDIA GPU"):
            move()
    with pytest.raises(RuntimeError, match="'cuda' needs CuPy"):
        x.cuda()
    with pytest.raises(RuntimeError, match="'cuda' needs CuPy"):
        model.cuda()
    assert all(p.data is b for p, b in zip(model.parameters(), before))   # untouched


def test_autodiff_to_device_on_the_same_device_is_identity(rng):
    t = ad.Tensor(rng.standard_normal((3, 2)), requires_grad=True)
    assert ad.to_device(t, "cpu") is t
    plain = rng.standard_normal((3, 2))
    wrapped = ad.to_device(plain, "cpu")
    assert isinstance(wrapped, ad.Tensor) and wrapped.data is plain
    assert not wrapped.requires_grad


def test_mixed_device_errors_name_both_devices():
    error = backend.mixed_devices_error("features", "cpu", "indices", "cuda:0")
    assert isinstance(error, TypeError)
    assert "features are on cpu but indices on cuda:0" in str(error)
    assert "never copies" in str(error)
    error = backend.mixed_devices_error("weight", "cuda:1", "the input tensor", "cuda:0")
    assert isinstance(error, ValueError)
    assert "weight is on cuda:1 but the input tensor on cuda:0" in str(error)


def test_a_layer_refuses_an_input_on_another_device(rng, monkeypatch):
    """The check every layer makes on entry (with the module's devices faked: CuPy arrays
    cannot exist without a GPU; the real thing is test_gpu_mixing_devices_raises)."""
    model = _net(dtype=np.float32)
    conv = model[0]
    monkeypatch.setattr(conv, "_devices", lambda: ["cuda:0"])
    with pytest.raises(TypeError, match=r"SubmanifoldConvolution's parameters are on cuda:0 "
                                        r"but the input on cpu.*model\.to\('cpu'\)"):
        model(_tensor(rng))
    linear = scn.Linear(3, 2)
    monkeypatch.setattr(linear, "_devices", lambda: ["cuda:1"])
    with pytest.raises(TypeError, match="Linear's parameters are on cuda:1 but the input on "
                                        "cpu"):
        linear(np.ones((4, 3), np.float32))


# -- Module -----------------------------------------------------------------------------------
def test_module_to_cpu_keeps_every_object():
    model = toy_model()
    inputs, labels = toy_batch()
    params = list(model.parameters())
    datas = [p.data for p in params]
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9)
    step(model, optimizer, inputs, labels)
    grads = [p.grad for p in params]
    buffers = [b for _, b in model.named_buffers()]
    assert model.to("cpu") is model and model.cpu() is model
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert all(p.data is d for p, d in zip(params, datas))               # no copies
    assert all(p.grad is g for p, g in zip(params, grads))
    assert all(a is b for (_, a), b in zip(model.named_buffers(), buffers))
    assert optimizer.param_groups[0]["params"] == params


def test_module_to_moves_shared_parameters_once():
    shared = scn.NetworkInNetwork(3, 3)
    model = scn.Sequential(shared, shared)
    assert model.to("cpu") is model
    assert len(list(model.parameters())) == 1


def test_state_dict_is_numpy_copies():
    model = toy_model()
    state = model.state_dict()
    for (name, param) in model.named_parameters():
        assert type(state[name]) is np.ndarray and state[name] is not param.data
        assert np.array_equal(state[name], param.data)


def test_load_state_dict_accepts_tensors():
    model, other = _net(1), _net(2)
    state = {key: ad.Tensor(value) for key, value in model.state_dict().items()}
    other.load_state_dict(state)
    assert deep_equal(other.state_dict(), model.state_dict())


# -- optimizers and checkpoints on the CPU --------------------------------------------------------
@pytest.mark.parametrize("make", [lambda ps: SGD(ps, lr=0.05, momentum=0.9, nesterov=True,
                                                 weight_decay=1e-3),
                                  lambda ps: Adam(ps, lr=0.01, amsgrad=True),
                                  lambda ps: AdamW(ps, lr=0.01)])
def test_optimizer_and_checkpoint_round_trip_unchanged_by_to_cpu(tmp_path, make):
    inputs, labels = toy_batch()
    plain, moved = toy_model(), toy_model()
    opt_plain, opt_moved = make(plain.parameters()), make(moved.parameters())
    losses = []
    for _ in range(2):
        losses.append((step(plain, opt_plain, inputs, labels),
                       step(moved.to("cpu"), opt_moved, inputs, labels)))
    assert all(a == b for a, b in losses)
    assert deep_equal(plain.state_dict(), moved.state_dict())
    saved = opt_moved.state_dict()
    assert all(type(v) is np.ndarray for entry in saved["state"].values()
               for v in entry.values() if hasattr(v, "shape"))
    path = tmp_path / "ckpt.npz"
    checkpoint.save_checkpoint(path, moved, opt_moved)
    restored = toy_model()
    opt_restored = make(restored.parameters())
    checkpoint.load_checkpoint(path, restored.to("cpu"), opt_restored)
    assert deep_equal(restored.state_dict(), plain.state_dict())
    assert deep_equal(opt_restored.state_dict(), opt_plain.state_dict())
    assert step(restored, opt_restored, inputs, labels) == step(plain, opt_plain, inputs,
                                                                labels)


# -- the examples' --device flag ------------------------------------------------------------------
def _run_example(*args):
    return subprocess.run([sys.executable, str(EXAMPLES / "hello_world.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=EXAMPLES)


def test_hello_world_device_cpu():
    result = _run_example("--device", "cpu")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "device: cpu"
    assert "output: (2, 32, 10, 10) float32" in lines
    assert any(line.startswith("training loss over 3 SGD steps: ") for line in lines)


def test_hello_world_refuses_an_unknown_device():
    result = _run_example("--device", "tpu")
    assert result.returncode == 2 and "invalid choice: 'tpu'" in result.stderr


@no_gpu
def test_hello_world_device_cuda_without_a_gpu_is_a_usage_error():
    result = _run_example("--device", "cuda")
    assert result.returncode == 2
    assert "--device cuda needs CuPy and a visible NVIDIA GPU" in result.stderr


def test_training_examples_parse_the_device_flag(monkeypatch):
    import argparse
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import train_utils
    parser = argparse.ArgumentParser()
    train_utils.add_device_argument(parser)
    args = parser.parse_args(["--device", "cpu"])
    assert train_utils.chosen_device(parser, args) == "cpu"
    default = parser.parse_args([])
    assert default.device == ("cuda" if backend.cuda_available() else "cpu")
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "cuda:0"])
    for name in ("mnist_sparse.py", "handwriting.py"):
        text = (EXAMPLES / name).read_text()
        assert "add_device_argument(parser)" in text and "model.to(device)" in text


# -- on a GPU (or the host emulator of CuPy) -----------------------------------------
def _cupy():
    import cupy
    return cupy


def _current_gpu():
    return f"cuda:{_cupy().cuda.runtime.getDevice()}"


def _host(array):
    return backend.to_numpy(array.data if isinstance(array, ad.Tensor) else array)


def _device_step(model, optimizer, inputs, labels):
    """One training step with a squared-error loss against one-hot labels, on the
    logits' device (test_gpu_examples_loss covers the examples' softmax cross-entropy)."""
    optimizer.zero_grad()
    logits = model(inputs)
    target = np.eye(logits.shape[1], dtype=logits.dtype)[labels]
    loss = ad.mse_loss(logits, backend.to_device(target, backend.device_of(logits.data)))
    loss.backward()
    optimizer.step()
    return float(loss.item())


def test_gpu_tensor_round_trip(gpu_device, rng):
    cupy = _cupy()
    x = _tensor(rng)
    y = x.cuda()
    assert y.device == _current_gpu() and x.device == "cpu"
    assert isinstance(y.features, cupy.ndarray) and isinstance(y.indices, cupy.ndarray)
    assert y.grid is not x.grid and y.sites is not x.sites
    assert y.spatial_shape == x.spatial_shape and y.batch_size == x.batch_size == 3
    assert y.cuda() is y and y.to(y.device) is y and y.to("cuda") is y
    assert x.to(_current_gpu()).device == y.device
    back = y.cpu()
    assert back.device == "cpu" and back.grid is not x.grid
    assert isinstance(back.features, np.ndarray) and isinstance(back.indices, np.ndarray)
    np.testing.assert_array_equal(back.features, x.features)
    np.testing.assert_array_equal(back.indices, x.indices)
    np.testing.assert_array_equal(cupy.asnumpy(y.indices), x.indices)
    assert "backend=cupy" in repr(y)


def test_gpu_tensor_move_is_differentiable(gpu_device, rng):
    cupy = _cupy()
    x = _tensor(rng, dtype=np.float64, requires_grad=True)
    leaf = x.features
    y = x.cuda()
    assert y.features.requires_grad and isinstance(y.features.data, cupy.ndarray)
    loss = ad.sum(y.features * y.features)
    loss.backward()
    assert isinstance(leaf.grad, np.ndarray)                  # back on the source device
    np.testing.assert_allclose(leaf.grad, 2 * leaf.data, rtol=1e-12)
    # and the other way: a GPU leaf, a loss on the CPU
    g = ad.Tensor(cupy.asarray(leaf.data), requires_grad=True)
    h = ad.to_device(g, "cpu")
    assert isinstance(h.data, np.ndarray) and h.requires_grad
    ad.sum(h * 3.0).backward()
    assert isinstance(g.grad, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(g.grad), np.full(leaf.shape, 3.0))
    plain = x.detach().cuda()
    assert not isinstance(plain.features, ad.Tensor)


def test_gpu_network_matches_the_cpu(gpu_device, rng):
    cupy = _cupy()
    x = _tensor(rng, dtype=np.float64)
    cpu_model, gpu_model = _net(), _net()
    params = list(gpu_model.parameters())
    assert gpu_model.cuda() is gpu_model
    assert list(gpu_model.parameters()) == params            # the same Parameter objects
    assert all(isinstance(p.data, cupy.ndarray) for p in params)
    assert all(isinstance(b, cupy.ndarray) for _, b in gpu_model.named_buffers())
    out_cpu = cpu_model(x)
    out_gpu = gpu_model(x.cuda())
    assert isinstance(out_gpu.data, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(out_gpu.data), out_cpu.data, rtol=1e-9,
                               atol=1e-12)
    weights = np.linspace(-1, 1, out_cpu.data.size).reshape(out_cpu.shape)
    ad.sum(out_cpu * weights).backward()
    ad.sum(out_gpu * cupy.asarray(weights)).backward()
    for (name, p_cpu), p_gpu in zip(cpu_model.named_parameters(), gpu_model.parameters()):
        assert isinstance(p_gpu.grad, cupy.ndarray), name
        np.testing.assert_allclose(cupy.asnumpy(p_gpu.grad), p_cpu.grad, rtol=1e-8,
                                   atol=1e-10, err_msg=name)
    for (name, b_cpu), (_, b_gpu) in zip(cpu_model.named_buffers(),
                                         gpu_model.named_buffers()):
        np.testing.assert_allclose(cupy.asnumpy(b_gpu), b_cpu, rtol=1e-9, err_msg=name)
    # and back: .cpu() moves the gradients too
    gpu_model.cpu()
    assert all(isinstance(p.data, np.ndarray) and isinstance(p.grad, np.ndarray)
               for p in params)


def test_gpu_input_layer_takes_cupy_arrays(gpu_device):
    cupy = _cupy()
    inputs, _ = toy_batch()
    layer = scn.InputLayer(2, 15, mode=3)
    on_cpu = layer(inputs)
    on_gpu = layer([cupy.asarray(inputs[0]), cupy.asarray(inputs[1]), inputs[2]])
    assert on_gpu.device == _current_gpu()
    np.testing.assert_array_equal(cupy.asnumpy(on_gpu.indices), on_cpu.indices)
    np.testing.assert_allclose(cupy.asnumpy(on_gpu.features.data), on_cpu.features.data,
                               rtol=1e-6)
    with pytest.raises(TypeError, match="features are on cpu but coords on cuda"):
        layer([cupy.asarray(inputs[0]), inputs[1]])


@pytest.mark.parametrize("make", [lambda ps: SGD(ps, lr=0.05, momentum=0.9, nesterov=True,
                                                 weight_decay=1e-3),
                                  lambda ps: Adam(ps, lr=0.01, amsgrad=True),
                                  lambda ps: AdamW(ps, lr=0.01)])
def test_gpu_training_matches_the_cpu_and_state_follows(gpu_device, make):
    cupy = _cupy()
    inputs, labels = toy_batch()
    gpu_inputs = [cupy.asarray(inputs[0]), cupy.asarray(inputs[1].astype(np.float64)),
                  inputs[2]]
    cpu_inputs = [inputs[0], inputs[1].astype(np.float64), inputs[2]]
    cpu_model, gpu_model = toy_model().double(), toy_model().double()
    opt_cpu, opt_gpu = make(cpu_model.parameters()), make(gpu_model.parameters())
    # one step on the CPU for both, then the second model moves: its state must follow
    assert _device_step(cpu_model, opt_cpu, cpu_inputs, labels) == \
        _device_step(gpu_model, opt_gpu, cpu_inputs, labels)
    gpu_model.cuda()
    for _ in range(2):
        loss_cpu = _device_step(cpu_model, opt_cpu, cpu_inputs, labels)
        loss_gpu = _device_step(gpu_model, opt_gpu, gpu_inputs, labels)
        np.testing.assert_allclose(float(loss_gpu), loss_cpu, rtol=1e-8)
    for p_cpu, p_gpu in zip(cpu_model.parameters(), gpu_model.parameters()):
        assert isinstance(p_gpu.data, cupy.ndarray)
        np.testing.assert_allclose(cupy.asnumpy(p_gpu.data), p_cpu.data, rtol=1e-7,
                                   atol=1e-10)
        for name, value in opt_gpu.state_of(p_gpu).items():
            if hasattr(value, "shape"):
                assert isinstance(value, cupy.ndarray), name      # the state followed
                np.testing.assert_allclose(cupy.asnumpy(value),
                                           opt_cpu.state_of(p_cpu)[name], rtol=1e-7,
                                           atol=1e-12)
    saved = opt_gpu.state_dict()                                # NumPy on the host
    assert all(type(v) is np.ndarray for entry in saved["state"].values()
               for v in entry.values() if hasattr(v, "shape"))
    # the state follows back to the CPU as well
    gpu_model.cpu()
    _device_step(gpu_model, opt_gpu, cpu_inputs, labels)
    assert all(isinstance(v, np.ndarray) for p in gpu_model.parameters()
               for v in opt_gpu.state_of(p).values() if hasattr(v, "shape"))


def test_gpu_gradient_on_another_device_raises(gpu_device):
    cupy = _cupy()
    p = scn.Parameter(cupy.zeros(3, np.float32))
    p.grad = np.ones(3, np.float32)
    with pytest.raises(TypeError, match="a parameter is on cuda:.* but its gradient on cpu"):
        SGD([p], lr=0.1).step()


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_gpu_checkpoints_cross_devices(gpu_device, tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    cupy = _cupy()
    inputs, labels = toy_batch()
    gpu_inputs = [cupy.asarray(inputs[0]), cupy.asarray(inputs[1]), inputs[2]]
    gpu_model = toy_model().cuda()
    opt_gpu = Adam(gpu_model.parameters(), lr=0.01)
    _device_step(gpu_model, opt_gpu, gpu_inputs, labels)
    state = gpu_model.state_dict()
    assert all(type(v) is np.ndarray for v in state.values())
    # saved from the GPU, loaded onto the CPU
    path = tmp_path / f"from_gpu{suffix}"
    checkpoint.save_checkpoint(path, gpu_model, opt_gpu, epoch=1)
    cpu_model = toy_model()
    opt_cpu = Adam(cpu_model.parameters(), lr=0.01)
    assert checkpoint.load_checkpoint(path, cpu_model, opt_cpu) == {"epoch": 1}
    assert all(isinstance(p.data, np.ndarray) for p in cpu_model.parameters())
    assert deep_equal(cpu_model.state_dict(), state)
    assert deep_equal(opt_cpu.state_dict(), opt_gpu.state_dict())
    # saved from the CPU, loaded onto the GPU: each array on its parameter's device
    path = tmp_path / f"from_cpu{suffix}"
    checkpoint.save_checkpoint(path, cpu_model, opt_cpu)
    fresh = toy_model().cuda()
    opt_fresh = Adam(fresh.parameters(), lr=0.01)
    checkpoint.load_checkpoint(path, fresh, opt_fresh)
    device = _current_gpu()
    assert all(backend.device_of(p.data) == device for p in fresh.parameters())
    assert all(backend.device_of(b) == device for _, b in fresh.named_buffers())
    assert all(backend.device_of(v) == device for p in fresh.parameters()
               for v in opt_fresh.state_of(p).values() if hasattr(v, "shape"))
    assert deep_equal(fresh.state_dict(), state)
    # weights files, and a state dict of CuPy arrays
    checkpoint.save_state_dict(tmp_path / f"w{suffix}", gpu_model.state_dict())
    other = toy_model()
    other.load_state_dict(checkpoint.load_state_dict(tmp_path / f"w{suffix}"))
    assert deep_equal(other.state_dict(), state)
    other.load_state_dict({k: cupy.asarray(v) for k, v in state.items()})
    assert all(isinstance(p.data, np.ndarray) for p in other.parameters())
    assert deep_equal(other.state_dict(), state)
    # the loaded model trains on in step with the one saved
    assert np.isclose(_device_step(fresh, opt_fresh, gpu_inputs, labels),
                      _device_step(gpu_model, opt_gpu, gpu_inputs, labels), rtol=1e-5)


def test_gpu_mixing_devices_raises(gpu_device, rng):
    cupy = _cupy()
    device = _current_gpu()
    x = _tensor(rng)
    model = _net(dtype=np.float32).cuda()
    with pytest.raises(TypeError, match=f"parameters are on {device} but the input on cpu"):
        model(x)
    with pytest.raises(TypeError, match=f"parameters are on cpu but the input on {device}"):
        _net(dtype=np.float32)(x.cuda())
    features, indices = x.features, x.indices
    with pytest.raises(TypeError, match=f"features are on {device} but indices on cpu"):
        sg.SparseTensor(cupy.asarray(features), indices, x.spatial_shape)
    with pytest.raises(TypeError, match=f"features are on cpu but indices on {device}"):
        sg.SparseTensor(features, cupy.asarray(indices), x.spatial_shape)
    with pytest.raises(TypeError, match=f"features are on cpu but this tensor's indices "
                                        f"on {device}"):
        x.cuda().with_features(features)
    with pytest.raises(TypeError, match=f"weight is on {device} but the input tensor on cpu"):
        sg.submanifold_conv(x, cupy.ones((9, 3, 2), np.float32))
    weight = ad.Tensor(np.ones((9, 3, 2), np.float32))
    with pytest.raises(TypeError, match=f"weight is on cpu but the input tensor on {device}"):
        sg.submanifold_conv(x.cuda(), weight)


def test_gpu_model_deepcopy_and_second_move_copy_nothing(gpu_device):
    cupy = _cupy()
    model = _net().cuda()
    datas = [p.data for p in model.parameters()]
    model.cuda()
    model.to(_current_gpu())
    assert all(p.data is d for p, d in zip(model.parameters(), datas))
    twin = copy.deepcopy(model)
    assert all(isinstance(p.data, cupy.ndarray) for p in twin.parameters())


@gpu
def test_gpu_hello_world_runs():
    result = _run_example("--device", "cuda")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "device: cuda"
    assert "output: (2, 32, 10, 10) float32" in lines
    assert any("backend=cupy" in line for line in lines)
    default = _run_example()
    assert default.returncode == 0 and default.stdout.startswith("device: cuda\n")


def test_gpu_examples_loss(gpu_device):
    """The examples' loss (softmax cross-entropy) trains on the GPU as on the CPU."""
    cupy = _cupy()
    inputs, labels = toy_batch()
    gpu_inputs = [cupy.asarray(inputs[0]), cupy.asarray(inputs[1].astype(np.float64)),
                  inputs[2]]
    cpu_inputs = [inputs[0], inputs[1].astype(np.float64), inputs[2]]
    cpu_model, gpu_model = toy_model().double(), toy_model().double().cuda()
    opt_cpu = SGD(cpu_model.parameters(), lr=0.05, momentum=0.9)
    opt_gpu = SGD(gpu_model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        np.testing.assert_allclose(step(gpu_model, opt_gpu, gpu_inputs, labels),
                                   step(cpu_model, opt_cpu, cpu_inputs, labels), rtol=1e-8)
    for p_cpu, p_gpu in zip(cpu_model.parameters(), gpu_model.parameters()):
        np.testing.assert_allclose(cupy.asnumpy(p_gpu.data), p_cpu.data, rtol=1e-7,
                                   atol=1e-10)


_EMULATED_EXAMPLE = """
import runpy, sys
sys.path.insert(0, {tests!r})
import cupy_emulator
cupy_emulator.installed().__enter__()
sys.argv = [{script!r}, *{args!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_hello_world_on_the_emulated_gpu():
    """examples/hello_world.py --device cuda end to end, on the host emulator of CuPy
    (installed as ``cupy`` in the child process): the example's GPU path runs in CI."""
    import cupy_emulator
    if not cupy_emulator.available():
        pytest.skip("no host C++ compiler")
    script = str(EXAMPLES / "hello_world.py")
    code = _EMULATED_EXAMPLE.format(tests=str(pathlib.Path(__file__).parent), script=script,
                                    args=["--device", "cuda"])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, cwd=EXAMPLES)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "device: cuda"
    assert "output: (2, 32, 10, 10) float32" in lines
    assert any("backend=cupy" in line for line in lines)
    assert any(line.startswith("training loss over 3 SGD steps: ") for line in lines)
