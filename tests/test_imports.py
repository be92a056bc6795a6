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


#: Modules that are bridges to a framework, importing it at the top (and only these).
BRIDGES = {"sparsegrid.interop.torch": "torch", "sparsegrid.interop.jax": "jax"}

#: Optional dependencies no other module may import at import time.
OPTIONAL = ("scipy", "cupy", "numba", "threadpoolctl", "torch", "jax", "laspy", "lazrs",
            "matplotlib", "tqdm", "safetensors", "open3d", "dask", "mpi4py")


def test_importing_every_module_loads_neither_numba_nor_cupy():
    names = sorted(m.name for m in pkgutil.walk_packages(sparsegrid.__path__, "sparsegrid."))
    assert "sparsegrid.cpu.conv" in names and "sparsegrid.nn.layers" in names
    assert set(BRIDGES) <= set(names)
    loaded = _run("import importlib, sys\n"
                  f"for name in {names!r}:\n"
                  f"    if name not in {sorted(BRIDGES)!r}: importlib.import_module(name)\n"
                  f"print(*(int(m in sys.modules) for m in {OPTIONAL!r}))")
    allowed = {"scipy", "threadpoolctl", "safetensors"}   # SciPy kernels, thread control
    imported = [m for m, flag in zip(OPTIONAL, loaded) if flag == "1" and m not in allowed]
    assert imported == [], f"importing sparsegrid's modules imported {imported}"


@pytest.mark.parametrize("name", sorted(BRIDGES))
def test_the_bridges_import_only_their_framework(name):
    framework = BRIDGES[name]
    pytest.importorskip(framework)
    loaded = _run(f"import sys, {name}\n"
                  f"print(*(int(m in sys.modules) for m in ('cupy', 'torch', 'jax')))")
    expected = {m: "1" if m == framework else "0" for m in ("cupy", "torch", "jax")}
    assert loaded == list(expected.values())


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
