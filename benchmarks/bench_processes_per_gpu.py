"""Aggregate throughput of several relaxing processes sharing one GPU.

One ``relax_many`` process is bound by its main thread's host work (converting each input,
joining the graph, writing each prediction into its Atoms; ``bench_host_waits.py``), not by the
GPU or its workers. So P processes, each with W workers and its share of the structures, may
go faster together. Each configuration starts P processes that load the model, warm up, then
start together at an agreed time; the aggregate is all structures over the span from the first
start to the last end.

    python benchmarks/bench_processes_per_gpu.py [--device cuda] [--n 16384]
        [--configs 1x14,2x7,3x4,4x3] [--model default|paper] [--precision float32|tf32] [--compile]

Prints a table and writes JSON (command, device, versions, figures) to
benchmarks/results/processes_per_gpu_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # a package named on PYTHONPATH first is the one measured
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_pipeline import result_header, write_result  # noqa: E402


def child(args) -> None:
    """One relaxing process: its share (every P-th structure), timed from the agreed start."""
    import torch
    from ase import Atoms
    from bench_inference import test_structures

    from e3relax_ase.relax.relaxer import OneShotRelaxer

    logging.disable(logging.WARNING)  # the sanity warnings of uncertain inputs
    crystals = test_structures(1024)
    share = [crystals[i % len(crystals)] for i in range(args.rank, args.n, args.processes)]
    atoms = [Atoms(c.numbers, positions=c.positions, cell=c.cell, pbc=True) for c in share]
    model = args.model
    if model == "paper":  # untrained, at the paper's size: the work per structure, not the outputs
        from e3relax_ase.config import ModelConfig
        from e3relax_ase.nn.model import E3RelaxH2

        torch.manual_seed(0)
        model = E3RelaxH2(ModelConfig()).eval()
    device = torch.device(args.device)
    relaxer = OneShotRelaxer(model, device=device, dtype="float32", precision=args.precision, **({"compile": True} if args.compile else {}))
    relaxer.relax_many(atoms[:256], errors="return", num_workers=args.workers)  # workers start, kernels warm
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    while time.time() < args.start_at:
        time.sleep(0.001)
    start = time.time()
    results = relaxer.relax_many(atoms, errors="return", num_workers=args.workers)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = time.time()
    relaxer.close()
    relaxed = sum(isinstance(r, Atoms) for r in results)
    print(json.dumps({"rank": args.rank, "n": len(atoms), "relaxed": relaxed, "start": start, "end": end}), flush=True)


def run_config(args, processes: int, workers: int) -> dict:
    start_at = time.time() + args.warm_up_s
    command = [
        sys.executable,
        __file__,
        "--child",
        "--device",
        args.device,
        "--n",
        str(args.n),
        "--model",
        args.model,
        "--precision",
        args.precision,
        "--processes",
        str(processes),
        "--workers",
        str(workers),
        "--start-at",
        str(start_at),
    ]
    command += ["--compile"] if args.compile else []
    children = [subprocess.Popen([*command, "--rank", str(rank)], stdout=subprocess.PIPE, text=True) for rank in range(processes)]
    rows = []
    for process in children:
        out, _ = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"a relaxing process failed (exit {process.returncode})")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    first, last = min(r["start"] for r in rows), max(r["end"] for r in rows)
    late = max(r["start"] for r in rows) - start_at
    if late > 0.5:
        print(f"note: a process started {late:.2f} s late (raise --warm-up-s)", file=sys.stderr)
    return {
        "processes": processes,
        "workers_per_process": workers,
        "structures_per_s": args.n / (last - first),
        "seconds": last - first,
        "relaxed": sum(r["relaxed"] for r in rows),
        "start_spread_s": max(r["start"] for r in rows) - first,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n", type=int, default=16384, help="structures in all (NREL test inputs of 5-30 atoms, repeated)")
    parser.add_argument("--configs", default="1x14,2x7,3x4,4x3", help="PROCESSESxWORKERS, comma-separated")
    parser.add_argument("--model", default="default", help="a checkpoint, or 'paper' (untrained F = 512, T = 4)")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--compile", action="store_true", help="OneShotRelaxer(compile=True) (give --warm-up-s time for the compilation)")
    parser.add_argument("--warm-up-s", type=float, default=25.0, help="time for every process to load and warm up")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    import torch

    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    rows = [run_config(args, p, w) for p, w in configs]
    device = torch.device(args.device)
    results = {
        **result_header(str(device)),
        "model": args.model,
        "precision": args.precision,
        "compile": args.compile,
        "n_structures": args.n,
        "configs": rows,
    }
    write_result(results, args.out, f"processes_per_gpu_{device.type}.json")
    base = rows[0]["structures_per_s"]
    print(
        f"{results['device']}, {results['cpu_count']} cores, model {args.model} ({args.precision}{', compiled' if args.compile else ''}), {args.n} structures"
    )
    for r in rows:
        print(
            f"  {r['processes']} process(es) x {r['workers_per_process']:2d} workers: {r['structures_per_s']:8.0f} structures/s "
            f"({r['structures_per_s'] / base:.2f}x)"
        )


if __name__ == "__main__":
    main()
