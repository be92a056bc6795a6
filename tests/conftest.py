import os
import pathlib
import sys
import zlib

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

GOLDEN = pathlib.Path(__file__).parent / "golden" / "scn"


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name: reproducible, different per test."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


class KernelSet:
    """One backend's kernels, called with NumPy arrays by the contract tests.

    ``cpu``: sparsegrid.cpu. ``cuda`` (where a GPU is visible) and ``emulated`` (wherever
    a host C++ compiler exists, CI included): sparsegrid.cuda behind a proxy that moves
    NumPy arguments (and rulebooks) to the device and results back, so every contract test
    runs unchanged on device arrays; ``emulated`` runs the CUDA kernel sources compiled
    for the host, on tests/cupy_emulator.py's device arrays, installed as ``cupy`` for the
    test's duration.
    """

    def __init__(self, name):
        from sparsegrid import backend
        self.name = name
        self.module = backend.backend_module("cpu") if name == "cpu" else DeviceProxy()
        self.xp = np
        self._context = None

    def bind(self):
        """Make ``cupy`` (and sparsegrid.cuda's array library) this set's, until
        :meth:`unbind`."""
        if self.name == "emulated":
            import cupy_emulator
            self._context = cupy_emulator.installed()
            self._context.__enter__()
        elif self.name == "cuda":
            from sparsegrid.cuda import _runtime
            self._context = _runtime.use(None)
        return self

    def unbind(self, _=None):
        if self.name == "emulated":
            self._context.__exit__(None, None, None)
        elif self.name == "cuda":
            from sparsegrid.cuda import _runtime
            _runtime.use(self._context)

    def asarray(self, array):
        return self.xp.asarray(array)

    def to_numpy(self, array):
        from sparsegrid import backend
        return backend.to_numpy(array)

    def __repr__(self):
        return f"KernelSet({self.name})"


class DeviceProxy:
    """sparsegrid.cuda with NumPy in and out: arguments (arrays, rulebooks) are copied to
    the device (``cupy.asarray``: the GPU's, or the emulator's), results (arrays, tuples
    of them) back to the host."""

    def __getattr__(self, name):
        from sparsegrid import cuda
        function = getattr(cuda, name)
        if not callable(function):
            return function

        def call(*args, **kwargs):
            args = [_to_device(a) for a in args]
            kwargs = {k: _to_device(v) for k, v in kwargs.items()}
            return _to_host(function(*args, **kwargs))

        call.__signature__ = __import__("inspect").signature(function)
        call.__name__ = name
        return call


def _to_device(value):
    import cupy
    from sparsegrid.rulebook import Rulebook
    if isinstance(value, np.ndarray):
        return cupy.asarray(value)
    if isinstance(value, Rulebook):
        key = f"test_device_copy_{id(cupy)}"
        return value.derived(key, lambda: _rulebook_to_device(value))
    return value


def _rulebook_to_device(rulebook):
    import cupy
    from sparsegrid.rulebook import Rulebook
    return Rulebook(cupy.asarray(rulebook.in_idx), cupy.asarray(rulebook.out_idx),
                    cupy.asarray(rulebook.offset_ptr), rulebook.n_in, rulebook.n_out,
                    rulebook.filter_size, stride=rulebook.stride, dilation=rulebook.dilation,
                    kind=rulebook.kind, identity_offset=rulebook.identity_offset,
                    transposed=rulebook.transposed)


def _to_host(value):
    from sparsegrid import backend
    if isinstance(value, tuple):
        return tuple(_to_host(v) for v in value)
    if backend.is_cupy_array(value):
        return backend.to_numpy(value)
    return value


def _emulator_available():
    import cupy_emulator
    available = cupy_emulator.available()
    if not available and os.environ.get("CI") == "true":
        raise RuntimeError("CI must run the emulated CUDA kernels: no host C++ compiler")
    return available


def _backend_names():
    from sparsegrid import backend
    names = backend.available_backends()
    return names + (["emulated"] if _emulator_available() else [])


@pytest.fixture(params=_backend_names())
def kernel_set(request):
    """Every available kernel set in turn (``cpu``; ``emulated``, the CUDA kernels on the
    host; ``cuda`` where a GPU is present): contract tests take this fixture."""
    kernel_set = KernelSet(request.param).bind()
    yield kernel_set
    kernel_set.unbind()


def _device_names():
    from sparsegrid import backend
    return (["cuda"] if "cuda" in backend.available_backends() else []) + (
        ["emulated"] if _emulator_available() else [])


@pytest.fixture(params=_device_names())
def gpu_device(request):
    """The device string ``'cuda'``, on a real GPU or on the host emulator (installed as
    ``cupy`` for the test): tests of whole ops, networks and device moves take it."""
    kernel_set = KernelSet(request.param).bind()
    yield "cuda"
    kernel_set.unbind()


@pytest.fixture
def bind_kernels(kernel_set, request):
    """Bind the test module's global ``kern`` to the kernel set under test, for modules of
    contract tests (``pytestmark = pytest.mark.usefixtures("bind_kernels")``)."""
    request.module.kern = kernel_set.module
    yield kernel_set
    request.module.kern = None
