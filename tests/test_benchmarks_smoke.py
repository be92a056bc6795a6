"""The GPU benchmarks' CPU rehearsals: ``bench_conv_cuda.py`` and ``bench_network.py`` with
``--device cpu --smoke`` must run and write every row they promise, so the scripts a GPU
session runs in one call cannot rot while no GPU is there.

Both run in child processes (as the GPU session runs them), side by side. Where spconv is
not importable (the test environment has no spconv), its rows must say why they are
absent instead of failing.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
MODES = ("fp32", "tf32", "fp16")
ALGORITHMS = ("gather_gemm", "implicit_gemm", "auto")


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    """Run both scripts once (in parallel) and load their JSON."""
    folder = tmp_path_factory.mktemp("bench_smoke")
    runs = {}
    for name in ("bench_conv_cuda", "bench_network"):
        out = folder / f"{name}.json"
        runs[name] = (out, subprocess.Popen(
            [sys.executable, str(BENCH / f"{name}.py"), "--device", "cpu", "--smoke",
             "--json", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    results = {}
    for name, (out, process) in runs.items():
        stdout, stderr = process.communicate(timeout=240)
        assert process.returncode == 0, f"{name} failed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
        results[name] = (json.loads(out.read_text()), stdout)
    return results


def _spconv_ok(row, status):
    """A spconv row is measured, or says spconv is absent when it is."""
    if status["available"]:
        return "ms" in row or "skipped" in row
    return row.get("absent") == status["error"] and "ms" not in row


def test_layer_benchmark_rows(smoke_results):
    result, stdout = smoke_results["bench_conv_cuda"]
    assert set(result["ceilings"]["gemm_tflops"]) == set(MODES)
    assert result["ceilings"]["copy_gbps"] > 0
    assert set(result["scenes"]) == {"smoke_lidar", "smoke_room"}
    rows = result["rows"]
    for scene, info in result["scenes"].items():
        assert info["n"] > 0 and info["valid_pairs_subm"] >= info["n"]
        for kind in ("subm3", "strided", "inverse"):
            for tile in ("32", "64", "128"):
                stats = info["pair_statistics"][kind][tile]
                assert stats["computed_sorted"] <= stats["computed_unsorted"]
                assert stats["ratio_sorted"] >= 1.0 - 1e-12
        for layer in ("subm3 C8", "k2s2 C8", "inv k2s2 C8"):
            for mode in MODES:
                check = info["checks"][layer][mode]
                assert check["pass"], (scene, layer, mode, check)
                assert set(ALGORITHMS) <= set(check["errors"])
                mine = [r for r in rows if (r["scene"], r["layer"], r["mode"]) ==
                        (scene, layer, mode)]
                passes = ("fwd", "f+b", "rb+fwd", "rb+f+b") if layer.startswith("k2s2") \
                    else ("fwd", "f+b")
                for algorithm in ALGORITHMS:
                    for pass_name in passes:
                        found = [r for r in mine if r["library"] == "sparsegrid" and
                                 r["algorithm"] == algorithm and r["pass"] == pass_name]
                        assert len(found) == 1, (scene, layer, mode, algorithm, pass_name)
                        row = found[0]
                        if mode == "fp32" and algorithm == "implicit_gemm":
                            assert "not eligible" in row["skipped"]
                            continue
                        assert row["ms"] > 0 and row["tflops"] > 0 and row["gbps"] > 0
                        assert row["bit_identical"] is True
                        assert isinstance(row["peak_bytes"], int)
                        assert row["flop"] == 2.0 * row["valid_pairs"] * 8 * 8 * (
                            3 if "b" in pass_name.replace("rb+", "") else 1)
                        assert row["ratio_vs_dense"] > 0
                        assert row["dtype"] == ("float16" if mode == "fp16" else "float32")
                dense = [r for r in mine if r["library"] == "cublas_dense_equivalent"]
                assert {r["pass"] for r in dense} == {"fwd", "f+b"}
                theirs = [r for r in mine if r["library"] == "spconv"]
                assert theirs and all(_spconv_ok(r, result["spconv"]) for r in theirs)
    assert result["summary"]["failed_rows"] == []
    assert result["summary"]["not_bit_identical"] == []
    assert result["summary"]["checks_failed"] == []
    assert "summary (auto)" in stdout


def test_network_benchmark_rows(smoke_results):
    result, stdout = smoke_results["bench_network"]
    rows = result["rows"]
    for network, scene in (("spconv_basic", "smoke_lidar"), ("scn_unet", "smoke_room")):
        for mode in ("fp16", "tf32"):
            mine = [r for r in rows if (r["network"], r["scene"], r.get("mode")) ==
                    (network, scene, mode)]
            for algorithm in ALGORITHMS:
                row = next(r for r in mine if r.get("algorithm") == algorithm)
                assert all(row["passes"][p]["ms"] > 0 for p in ("fwd", "f+b", "bwd"))
                assert isinstance(row["peak_bytes_fb"], int)
                assert row["bit_identical_fwd"] is True
                assert row["dtype"] == ("float16" if mode == "fp16" else "float32")
            theirs = [r for r in mine if r["library"] == "spconv"]
            assert len(theirs) == 1
            if result["spconv"]["available"]:
                assert "passes" in theirs[0] or "failed" in theirs[0]
            else:
                assert theirs[0]["absent"] == result["spconv"]["error"]
    checks = result["checks"]["spconv_basic smoke_lidar"]
    assert all(checks[mode]["pass"] for mode in ("fp16", "tf32")), checks
    assert result["summary"]["failed"] == [] and result["summary"]["checks_failed"] == []
    assert "targets (auto)" in stdout
