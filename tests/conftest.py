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
    """One backend's kernels and how to move test data to and from its arrays."""

    def __init__(self, name):
        from sparsegrid import backend
        self.name = name
        self.module = backend.backend_module(name)
        self.xp = np if name == "cpu" else __import__("cupy")

    def asarray(self, array):
        return self.xp.asarray(array)

    def to_numpy(self, array):
        from sparsegrid import backend
        return backend.to_numpy(array)

    def __repr__(self):
        return f"KernelSet({self.name})"


def _backend_names():
    from sparsegrid import backend
    return backend.available_backends()


@pytest.fixture(params=_backend_names())
def kernel_set(request):
    """Every available kernel set in turn (``cpu``; ``cuda`` where a GPU is present):
    contract tests take this fixture and run on each."""
    return KernelSet(request.param)


@pytest.fixture
def bind_kernels(kernel_set, request):
    """Bind the test module's global ``kern`` to the kernel set under test, for modules of
    contract tests (``pytestmark = pytest.mark.usefixtures("bind_kernels")``)."""
    request.module.kern = kernel_set.module
    yield kernel_set
    request.module.kern = None
