"""The GPU benchmark scripts stay runnable: their smallest settings on the CPU (slow: ~1-2 min)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.paths import ROOT


def run(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_bench_inference_quick_on_cpu(tmp_path):
    out = tmp_path / "inference.json"
    stdout = run(["benchmarks/bench_inference.py", "--device", "cpu", "--quick", "--precisions", "float32,bf16", "--workers", "0", "--out", str(out)], tmp_path)
    results = json.loads(out.read_text())
    assert results["end_to_end"][0]["relaxed"] > 0
    assert {row["precision"] for row in results["forward"]["paper_F512_T4"]} == {"float32", "bf16"}
    assert results["work"]["shipped"]["flops"] > 0 and results["deviation"][0]["max_position_deviation_A"] > 0
    assert "single-structure latency" in stdout


@pytest.mark.slow
def test_bench_inference_end_to_end_options_on_cpu(tmp_path):
    """The end-to-end-only run of scripts/gpu_inference.sh's options: batch sizes, the paper's size, --skip."""
    out = tmp_path / "e2e.json"
    stdout = run(
        [
            "benchmarks/bench_inference.py",
            "--device",
            "cpu",
            "--quick",
            "--precisions",
            "float32",
            "--workers",
            "0,1",
            "--e2e-batch-sizes",
            "16",
            "--paper-e2e",
            "--skip",
            "forward,latency,scaling",
            "--out",
            str(out),
        ],
        tmp_path,
    )
    results = json.loads(out.read_text())
    assert [row.get("batch_size") for row in results["end_to_end"]] == [None, None, 16]
    (paper,) = results["end_to_end_paper_F512_T4"]
    assert paper["relaxed"] > 0 and paper["num_workers"] == 1 and paper["model"] == "paper_F512_T4"
    assert "forward" not in results and "scaling" not in results and "paper size F=512 T=4" in stdout


@pytest.mark.slow
def test_bench_multi_gpu_relax_api_on_cpu_with_two_processes(tmp_path):
    out = tmp_path / "api.json"
    run(
        ["benchmarks/bench_multi_gpu.py", "relax-api", "--gpus", "2", "--n", "24", "--workers", "0", "--work", str(tmp_path / "work"), "--out", str(out)],
        tmp_path,
    )
    results = json.loads(out.read_text())
    assert results["one_gpu"]["relaxed"] == results["torchrun_gpus2"]["relaxed"] > 0
    assert results["torchrun_gpus2"]["world_size"] == 2


@pytest.mark.slow
def test_bench_host_waits_and_compare_results_on_cpu(tmp_path):
    """The host diagnostics (waits, worker time, main-thread samples) and the old/new comparer."""
    out = tmp_path / "waits.json"
    stdout = run(["benchmarks/bench_host_waits.py", "--device", "cpu", "--n", "96", "--workers", "1", "--sample", "--out", str(out)], tmp_path)
    (row,) = json.loads(out.read_text())["runs"]
    assert row["structures_per_s"] > 0 and row["worker_prepare_us"] > 0 and row["worker_judge_us"] > 0
    assert row["main_thread_inclusive"]["relaxer.py:relax_many"] > 0.5 and "main thread, inclusive" in stdout
    inference = tmp_path / "e2e.json"
    run(
        [
            "benchmarks/bench_inference.py",
            "--device",
            "cpu",
            "--quick",
            "--precisions",
            "float32",
            "--workers",
            "0",
            "--skip",
            "forward,scaling",
            "--out",
            str(inference),
        ],
        tmp_path,
    )
    table = run(["benchmarks/compare_results.py", str(inference), str(inference)], tmp_path)
    assert "end to end, num_workers=0 (structures/s)" in table and "relax() of one structure (ms)" in table and " 1.00" in table


@pytest.mark.slow
def test_bench_processes_per_gpu_on_cpu(tmp_path):
    out = tmp_path / "processes.json"
    stdout = run(
        ["benchmarks/bench_processes_per_gpu.py", "--device", "cpu", "--n", "24", "--configs", "1x0,2x0", "--warm-up-s", "15", "--out", str(out)], tmp_path
    )
    rows = json.loads(out.read_text())["configs"]
    assert [(r["processes"], r["workers_per_process"]) for r in rows] == [(1, 0), (2, 0)]
    assert all(r["relaxed"] > 0 and r["structures_per_s"] > 0 for r in rows) and "2 process(es)" in stdout


@pytest.mark.slow
def test_bench_host_stages_on_cpu_and_compared(tmp_path):
    """The host-stage costs of this package, lined up against themselves by compare_results."""
    out = tmp_path / "stages.json"
    stdout = run(["benchmarks/bench_host_stages.py", "--n", "256", "--out", str(out)], tmp_path)
    stages = json.loads(out.read_text())["us_per_structure"]
    assert set(stages) == {"niggli_ase", "niggli_batched", "worker_prepare", "worker_judge", "main_thread"}
    assert all(value > 0 for value in stages.values()) and "worker_prepare" in stdout
    table = run(["benchmarks/compare_results.py", str(out), str(out)], tmp_path)
    assert "host stage worker_judge (µs per structure)" in table and " 1.00" in table


@pytest.mark.slow
def test_bench_inference_compiled_rows_on_cpu(tmp_path):
    """--compile adds the compiled forward, deviation and end-to-end rows (needs a C++ compiler)."""
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("Inductor on a CPU needs a C++ compiler")
    out = tmp_path / "compiled.json"
    run(
        [
            "benchmarks/bench_inference.py",
            "--device",
            "cpu",
            "--quick",
            "--precisions",
            "float32",
            "--workers",
            "0",
            "--compile",
            "--skip",
            "latency,scaling",
            "--out",
            str(out),
        ],
        tmp_path,
    )
    results = json.loads(out.read_text())
    assert [row["compiled"] for row in results["forward"]["shipped"]] == [False, True]
    assert any(row.get("compile") for row in results["end_to_end"])
    assert any(row["compiled"] for row in results["deviation"])


@pytest.mark.slow
def test_bench_cpu_latency_on_cpu(tmp_path):
    """The CPU latency benchmark, with its stage timers wrapped around the relaxer's own functions."""
    out = tmp_path / "latency.json"
    run(["benchmarks/bench_cpu_latency.py", "--threads", "1", "--repeats", "2", "--rounds", "1", "--out", str(out)], tmp_path)
    results = json.loads(out.read_text())
    entry = next(iter(results["results"].values()))
    assert entry and set(results["stage_meaning"]) >= {"validate", "network", "judge", "apply_provenance"}


@pytest.mark.slow
def test_bench_teachers_on_three_nrel_inputs_on_cpu(tmp_path):
    """The teacher comparison (issue 17) on 3 NREL train inputs with two sevenn teachers (and
    CHGNet when installed): every teacher relaxes the same inputs and is scored against DFT."""
    pytest.importorskip("sevenn")
    out = tmp_path / "teachers.json"
    stdout = run(
        ["benchmarks/bench_teachers.py", "--n", "3", "--device", "cpu", "--teachers", "7net-0,7net-mf-0:PBE,chgnet-0.3.0", "--out", str(out)], tmp_path
    )
    results = json.loads(out.read_text())
    assert results["inputs"]["n_selected"] == 3 and results["inputs"]["pairs"].endswith("nrel_zintl/train.npz")
    for spec in ("7net-0", "7net-mf-0:PBE"):
        row = results["teachers"][spec]
        assert sum(row["statuses"].values()) == 3 and row["speed"]["structures_per_s"] > 0
        assert row["converged"]["n"] == row["statuses"].get("converged", 0)
    chgnet = results["teachers"]["chgnet-0.3.0"]
    assert "skipped" in chgnet or sum(chgnet["statuses"].values()) == 3
    common = results["common"]
    assert common["n"] >= 1 and common["unrelaxed_input"]["n"] == common["n"]
    # A relaxation by a universal potential lands nearer the DFT structure than the input does.
    assert common["7net-0"]["coord_mae_A_mean"] < common["unrelaxed_input"]["coord_mae_A_mean"]
    assert "every teacher converged" in stdout and {"command", "machine", "versions"} <= set(results)


@pytest.mark.slow
def test_bench_distill_throughput_runs_and_compares(tmp_path):
    """The old-vs-new driver benchmark on the CPU with the toy teacher; against itself the two
    drivers must agree bit for bit."""
    out = tmp_path / "driver.json"
    run(
        [
            "benchmarks/bench_distill_throughput.py",
            "--old-module",
            "e3relax_ase/training/distill/batched_relax.py",
            "--teacher",
            "toy",
            "--n",
            "60",
            "--repeats",
            "1",
            "--out",
            str(out),
        ],
        tmp_path,
    )
    results = json.loads(out.read_text())
    assert results["same_results"] == {"same_keys": True, "same_status_and_steps": True, "max_position_diff_A": 0.0, "max_cell_diff_A": 0.0}
    assert results["best"]["new"]["finished"] == 60 and results["best"]["old"]["teacher_calls"] > 0


@pytest.mark.slow
def test_bench_cli_old_and_new_write_the_same_frames_on_cpu(tmp_path):
    # The old code is this checkout's package copied aside: the comparison machinery (two
    # processes, wait4, the frame-by-frame check) runs, and must find the outputs identical.
    old = tmp_path / "old"
    old.mkdir()
    shutil.copytree(ROOT / "e3relax_ase", old / "e3relax_ase", symlinks=True, ignore=shutil.ignore_patterns("checkpoints", "__pycache__"))
    (old / "e3relax_ase" / "checkpoints").symlink_to(ROOT / "checkpoints")  # the registry, as in the checkout
    out = tmp_path / "cli.json"
    args = ["benchmarks/bench_cli.py", "--n", "6", "--inputs", "extxyz,cifs", "--cif-files", "3", "--device", "cpu"]
    run(args + ["--old-tree", str(old), "--work", str(tmp_path / "work"), "--out", str(out)], tmp_path)
    runs = json.loads(out.read_text())["runs"]
    for kind in ("extxyz", "cifs"):
        assert runs[kind]["new"]["exit_code"] == runs[kind]["old"]["exit_code"] == 0 and runs[kind]["new"]["n_ok"] == runs[kind]["structures"]
        assert runs[kind]["old_vs_new"]["same_frames"] and runs[kind]["old_vs_new"]["max_position_difference_A"] == 0.0
