"""Importing sparsegrid loads neither numba nor CuPy (nor SciPy, until a kernel needs it),
and the kernel contract is one explicit list that the CPU backend implements."""

import inspect
import re
import pkgutil
import subprocess
import sys

import pytest

import sparsegrid
from sparsegrid import backend


def _run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.split()


def test_importing_every_module_loads_neither_numba_nor_cupy():
    names = sorted(m.name for m in pkgutil.walk_packages(sparsegrid.__path__, "sparsegrid."))
    assert "sparsegrid.cpu.conv" in names and "sparsegrid.nn.layers" in names
    loaded = _run("import importlib, sys\n"
                  f"for name in {names!r}: importlib.import_module(name)\n"
                  "print(int('numba' in sys.modules), int('cupy' in sys.modules))")
    assert loaded == ["0", "0"], "numba or cupy was imported"


def test_import_sparsegrid_is_light():
    loaded = _run("import sys, sparsegrid\n"
                  "print(*(int(m in sys.modules) for m in ('scipy', 'cupy', 'numba', "
                  "'threadpoolctl')))")
    assert loaded == ["0", "0", "0", "0"]


def test_nothing_mentions_numba_or_its_switches():
    """No source, test, benchmark, example, packaging or CI file refers to numba, the JIT
    switches or the removed plan API (the docs may mention them as history)."""
    import pathlib
    root = pathlib.Path(sparsegrid.__file__).parent.parent
    files = [p for folder in ("sparsegrid", "tests", "benchmarks", "examples")
             for p in (root / folder).rglob("*.py") if p.name != "test_imports.py"]
    files += [root / "pyproject.toml", root / ".ci" / "run", root / "README.md"]
    words = (r"numba", r"SPARSEGRID_JIT", r"\bjit_enabled", r"\bconv_plan\b",
             r"PLAN_MAX_OFFSETS", r"fast_plan_available", r"transposed_plan",
             r"sparsegrid\[fast\]")
    offenders = [(str(p.relative_to(root)), w) for p in files if p.exists()
                 for w in words if re.search(w, p.read_text())]
    assert offenders == []


@pytest.mark.parametrize("name", backend.KERNEL_CONTRACT)
def test_every_backend_has_the_contract_signature(kernel_set, name):
    """Every backend's function has the signature written in the contract, so the
    backends agree with each other and with the table the CUDA backend is written to."""
    function = getattr(kernel_set.module, name, None)
    assert callable(function), f"{kernel_set.name} lacks {name}"
    got = str(inspect.signature(function))
    assert got == backend.KERNEL_SIGNATURES[name], (kernel_set.name, name, got)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.backend_module("tpu")
