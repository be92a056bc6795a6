"""Importing sparsegrid loads neither numba nor CuPy (nor SciPy, until a kernel needs it),
and the kernel contract is one explicit list that the CPU backend implements."""

import inspect
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


def test_no_module_mentions_numba():
    import pathlib
    root = pathlib.Path(sparsegrid.__file__).parent.parent
    offenders = [str(p.relative_to(root)) for folder in ("sparsegrid", "tests", "benchmarks",
                                                         "examples")
                 for p in (root / folder).rglob("*.py")
                 if p.name != "test_imports.py" and "import numba" in p.read_text()]
    assert offenders == []


@pytest.mark.parametrize("name", backend.KERNEL_CONTRACT)
def test_every_backend_provides_the_contract(kernel_set, name):
    function = getattr(kernel_set.module, name, None)
    assert callable(function), f"{kernel_set.name} lacks {name}"


def test_contract_signatures_agree_across_backends():
    modules = [backend.backend_module(n) for n in backend.available_backends()]
    for name in backend.KERNEL_CONTRACT:
        signatures = {str(inspect.signature(getattr(m, name))) for m in modules}
        assert len(signatures) == 1, (name, signatures)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.backend_module("tpu")
