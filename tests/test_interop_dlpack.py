"""Arrays in and out through DLPack (sparsegrid.interop): zero-copy views, the device
rules (CPU tensors as NumPy, CUDA tensors as CuPy, nothing else, no implicit copies)."""

import sys

import numpy as np
import pytest

from optional import require

import sparsegrid as sg
from sparsegrid import interop
from sparsegrid.autodiff import Tensor

INDICES = np.array([[0, 1, 2], [0, 3, 3], [1, 0, 0]])


class FakeDLPack:
    """A DLPack producer on an arbitrary device, wrapping host data."""

    def __init__(self, data, device=(1, 0)):
        self.data, self.device = np.asarray(data), device

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, *args, **kwargs):
        return self.data.__dlpack__(*args, **kwargs)


def test_torch_tensors_in_and_out_without_copies():
    torch = require("torch")
    features = torch.randn(3, 4)
    x = sg.SparseTensor(features, torch.tensor(INDICES), (4, 4))
    assert isinstance(x.features, np.ndarray) and x.indices.dtype == np.int32
    assert np.shares_memory(x.features, features.numpy())
    features[0, 0] = 42.0                              # the same memory, as documented
    assert x.features[0, 0] == 42.0
    out = sg.submanifold_conv(x, np.ones((9, 4, 2), np.float32))
    back = torch.from_dlpack(out.features)
    assert back.data_ptr() == out.features.__array_interface__["data"][0]
    assert interop.to_torch(Tensor(out.features)).data_ptr() == back.data_ptr()
    replaced = x.with_features(torch.zeros(3, 4, dtype=torch.float64))
    assert replaced.dtype == np.float64


def test_jax_arrays_in_and_out():
    jax = require("jax")
    import jax.numpy as jnp
    features = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
    x = sg.SparseTensor(features, jnp.asarray(INDICES), (4, 4))
    np.testing.assert_array_equal(x.features, np.asarray(features))
    out = sg.submanifold_conv(x, np.ones((9, 4, 2), np.float32))
    back = interop.to_jax(out.features)
    assert isinstance(back, jax.Array)
    np.testing.assert_array_equal(np.asarray(back), out.features)


def test_numpy_passes_through_and_other_values_are_left_alone():
    a = np.ones((3, 2), np.float32)
    assert interop.asarray(a) is a
    assert interop.asarray([1, 2]) == [1, 2]
    b = interop.asarray(FakeDLPack(a))
    assert np.shares_memory(a, b)
    assert interop.dlpack_device(FakeDLPack(a, (2, 1))) == ("cuda", 1)
    with pytest.raises(TypeError, match="DLPack"):
        interop.dlpack_device([1])


def test_devices_numpy_and_cupy_cannot_view_are_refused():
    with pytest.raises(TypeError, match=r"rocm:1.*move it to 'cpu' or a CUDA device"):
        sg.SparseTensor(FakeDLPack(np.ones((3, 1), np.float32), (10, 1)), INDICES, (4, 4))
    with pytest.raises(TypeError, match=r"metal:0"):
        interop.asarray(FakeDLPack(np.ones(3), (8, 0)), "features")


def test_a_cuda_tensor_without_cupy_is_not_copied_to_the_host(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)      # import cupy -> ImportError
    with pytest.raises(TypeError, match=r"features is a .* array on cuda:0.*CuPy.*never "
                                        r"copies it to the host"):
        sg.SparseTensor(FakeDLPack(np.ones((3, 1), np.float32), (2, 0)), INDICES, (4, 4))


def test_a_cuda_tensor_becomes_a_cupy_array_and_mixing_devices_is_refused():
    """On the host emulator of CuPy (tests/cupy_emulator.py), standing in for a GPU: a
    CUDA producer is viewed by cupy.from_dlpack; CPU features with CUDA indices raise
    naming both devices."""
    import cupy_emulator
    if not cupy_emulator.available():
        pytest.skip("no host C++ compiler for the CuPy emulator")
    with cupy_emulator.installed() as cupy:
        cupy.from_dlpack = lambda obj: cupy.asarray(np.array(obj.data))
        features = FakeDLPack(np.ones((3, 2), np.float32), (2, 0))
        x = sg.SparseTensor(features, FakeDLPack(INDICES, (2, 0)), (4, 4))
        assert x.device == "cuda:0"
        with pytest.raises((TypeError, ValueError), match=r"cpu.*cuda:0|cuda:0.*cpu"):
            sg.SparseTensor(np.ones((3, 2), np.float32), FakeDLPack(INDICES, (2, 0)), (4, 4))


def test_unsupported_dtypes_and_autograd_tensors_say_what_to_do():
    torch = require("torch")
    with pytest.raises(TypeError, match="NumPy could not view"):
        sg.SparseTensor(torch.ones(3, 1, dtype=torch.bfloat16), INDICES, (4, 4))
    with pytest.raises(TypeError, match=r"requires a gradient.*SparseModule.*detach"):
        sg.SparseTensor(torch.ones(3, 1, requires_grad=True), INDICES, (4, 4))
    with pytest.raises(TypeError, match="float32 or float64"):
        sg.SparseTensor(torch.ones(3, 1, dtype=torch.float16).numpy().astype(np.int8),
                        INDICES, (4, 4))
