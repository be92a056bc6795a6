"""The array library the CUDA backend runs on: CuPy, resolved on first use.

Every module of ``sparsegrid.cuda`` reaches CuPy through :data:`cp`, a namespace that
imports CuPy the first time one of its attributes is read, so importing
``sparsegrid.cuda`` imports nothing (``import sparsegrid`` never imports CuPy, and the
modules can be imported on machines without it). :func:`use` rebinds the namespace to
another CuPy-compatible module: the test suite's host emulator
(``tests/cupy_emulator.py``), which runs the same kernel sources, compiled by the host
C++ compiler, over NumPy arrays on machines without a GPU.
"""

from __future__ import annotations

import threading


class _CuPyNamespace:
    """Attribute access forwarded to CuPy (imported on first use) or to a stand-in."""

    def __init__(self):
        object.__setattr__(self, "_module", None)
        object.__setattr__(self, "_lock", threading.Lock())

    def _load(self):
        with self._lock:
            if self._module is None:
                try:
                    import cupy
                except ImportError as error:   # pragma: no cover - depends on the machine
                    raise RuntimeError("sparsegrid's CUDA backend needs CuPy: pip install "
                                       "'sparsegrid[cuda]' (cupy-cuda12x or cupy-cuda13x)"
                                       ) from error
                object.__setattr__(self, "_module", cupy)
        return self._module

    def __getattr__(self, name):
        module = self._module if self._module is not None else self._load()
        return getattr(module, name)

    def __setattr__(self, name, value):
        raise AttributeError("sparsegrid.cuda._runtime.cp is read-only; use use(module)")

    @property
    def module(self):
        """The module in use (CuPy or a stand-in), loading CuPy if none is bound yet."""
        return self._module if self._module is not None else self._load()


cp = _CuPyNamespace()


def use(module):
    """Bind :data:`cp` to ``module`` (None: CuPy again, on next use); returns the previous
    binding. For the test suite's emulator; not part of the public API."""
    previous = cp._module
    object.__setattr__(cp, "_module", module)
    from . import _compile, implicit_gemm
    _compile.clear_cache()
    implicit_gemm.clear_cache()
    return previous


def read(array):
    """``array`` copied to the host (a NumPy array): the backend's one way to read device
    values, so every host synchronisation it makes is this call (or a CuPy function that
    must learn an output size: ``flatnonzero``, ``argwhere``)."""
    return cp.asnumpy(array)
