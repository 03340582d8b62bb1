"""One-shot inference benchmarks: end-to-end throughput with its stages, forward throughput at
two model sizes, single-structure latency, and scaling with cell size.

Prints a table and writes JSON (command, device, versions, figures) to benchmarks/results/.
Structures: the real NREL DFT test inputs with 5-30 atoms (data/nrel_zintl/test.npz).

    python benchmarks/bench_inference.py [--device cuda] [--checkpoint default] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e3relax_ase.checkpoint import load_checkpoint  # noqa: E402
from e3relax_ase.config import ModelConfig  # noqa: E402
from e3relax_ase.model import E3RelaxH2  # noqa: E402
from e3relax_ase.predict import CrystalArrays, graph_from_canonical  # noqa: E402
from e3relax_ase.canonical import canonicalize  # noqa: E402
from e3relax_ase.training.pairs import load_pairs  # noqa: E402


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats=3):
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def test_structures(n: int, min_atoms=5, max_atoms=30):
    pairs = load_pairs(ROOT / "data" / "nrel_zintl" / "test.npz")
    chosen = [k for k in range(len(pairs)) if min_atoms <= pairs.n_atoms[k] <= max_atoms]
    crystals = []
    for i in range(n):
        k = chosen[i % len(chosen)]
        atoms = slice(pairs.offsets[k], pairs.offsets[k + 1])
        crystals.append(CrystalArrays(pairs.numbers[atoms], pairs.pos_unrelaxed[atoms], pairs.cell_unrelaxed[k], np.ones(3, bool)))
    return crystals


def stages(model, crystals, device, dtype):
    """Time each stage of the end-to-end pipeline on one batch (seconds)."""
    out = {}
    start = time.perf_counter()
    forms = [canonicalize(c.positions, c.cell, c.pbc) for c in crystals]
    out["canonicalize"] = time.perf_counter() - start
    start = time.perf_counter()
    graph = graph_from_canonical(crystals, forms, model.config.cutoff, model.config.max_neighbors, "cpu", dtype)
    out["graph_build_cpu"] = time.perf_counter() - start
    if device.type == "cuda":
        start = time.perf_counter()
        graph_gpu = graph_from_canonical(crystals, forms, model.config.cutoff, model.config.max_neighbors, device, dtype)
        synchronize(device)
        out["graph_build_gpu"] = time.perf_counter() - start
    start = time.perf_counter()
    graph = graph.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else graph
    synchronize(device)
    out["host_to_device"] = time.perf_counter() - start
    with torch.no_grad():
        out["forward"] = timed(lambda: model(graph), device)
        output = model(graph)
    start = time.perf_counter()
    positions = output.positions[-1].double().cpu().numpy()
    cells = output.cell[-1].double().cpu().numpy()
    bounds = np.concatenate([[0], np.cumsum([len(c.numbers) for c in crystals])])
    for i, form in enumerate(forms):
        form.restore(positions[bounds[i] : bounds[i + 1]], cells[i])
    out["write_back"] = time.perf_counter() - start
    out["n_edges"] = int(graph.n_edges)
    return out


def end_to_end_relaxer(checkpoint, crystals, device):
    """ase.Atoms in, relaxed ase.Atoms out, through OneShotRelaxer.relax_many."""
    from ase import Atoms

    from e3relax_ase.relaxer import OneShotRelaxer

    relaxer = OneShotRelaxer(checkpoint, device=device, dtype="float32")
    atoms = [Atoms(c.numbers, positions=c.positions, cell=c.cell, pbc=True) for c in crystals]
    relaxer.relax_many(atoms[:8], errors="return")
    synchronize(device)
    start = time.perf_counter()
    # Some real DFT inputs are refused (overlapping atoms); they count in the time, not the output.
    results = relaxer.relax_many(atoms, errors="return")
    synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, sum(isinstance(r, Atoms) for r in results)


def sevennet_fire(crystals, device, n, fmax=0.05):
    """The alternative users would pick: SevenNet-0 + FIRE + FrechetCellFilter through ASE."""
    from ase import Atoms
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE
    from sevenn.calculator import SevenNetCalculator

    calculator = SevenNetCalculator(model="7net-0", device=str(device))
    rows = []
    for c in crystals[: n + 1]:
        atoms = Atoms(c.numbers, positions=c.positions, cell=c.cell, pbc=True)
        atoms.calc = calculator
        optimizer = FIRE(FrechetCellFilter(atoms), logfile=None)
        start = time.perf_counter()
        try:
            converged = optimizer.run(fmax=fmax, steps=500)
        except (ValueError, FloatingPointError, RuntimeError):  # a relaxation that blew up
            converged = False
        rows.append({"seconds": time.perf_counter() - start, "steps": optimizer.get_number_of_steps(), "converged": bool(converged)})
    rows = rows[1:]  # the first one warms up the model
    return {"n": len(rows), "median_seconds": float(np.median([r["seconds"] for r in rows])),
            "mean_seconds": float(np.mean([r["seconds"] for r in rows])),
            "median_steps": float(np.median([r["steps"] for r in rows])),
            "converged": int(sum(r["converged"] for r in rows))}


def forward_throughput(config, crystals, device, batch):
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = E3RelaxH2(config).to(device).eval()
    forms = [canonicalize(c.positions, c.cell, c.pbc) for c in crystals[:batch]]
    graph = graph_from_canonical(crystals[:batch], forms, config.cutoff, config.max_neighbors, device, torch.float32)
    with torch.no_grad():
        seconds = timed(lambda: model(graph), device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"batch": batch, "structures_per_s": batch / seconds, "seconds": seconds, "edges": int(graph.n_edges),
            "params": model.count_parameters(), "peak_gib": peak}


def scaling(model, device, sizes):
    from ase.build import bulk

    rows = []
    for n in sizes:
        atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((n, n, n))
        atoms.rattle(0.05, seed=0)
        crystal = CrystalArrays(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc)
        form = canonicalize(crystal.positions, crystal.cell, crystal.pbc, reduce=False)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        graph = graph_from_canonical([crystal], [form], model.config.cutoff, model.config.max_neighbors, device, torch.float32)
        synchronize(device)
        build = time.perf_counter() - start
        with torch.no_grad():
            seconds = timed(lambda: model(graph), device, repeats=2)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        rows.append({"atoms": len(atoms), "edges": int(graph.n_edges), "graph_s": build, "forward_s": seconds, "peak_gib": peak})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--sevennet", type=int, default=0, help="also relax this many structures with SevenNet-0 + FIRE (needs sevenn)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    model, info = load_checkpoint(args.checkpoint)
    model = model.to(device).float().eval()
    n = 64 if args.quick else 1024
    crystals = test_structures(n)
    results = {
        "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "checkpoint": info.name, "checkpoint_sha256": info.sha256, "shipped_config": model.config.to_dict(),
        "n_structures": n, "mean_atoms": float(np.mean([len(c.numbers) for c in crystals])),
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"inference_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(results, indent=1))

    batch = min(n, 256)
    st = stages(model, crystals[:batch], device, torch.float32)
    results["stages_batch"] = batch
    results["stages_seconds"] = st
    e2e, n_ok = end_to_end_relaxer(args.checkpoint, crystals, device)
    results["end_to_end_relaxer_structures_per_s"] = n / e2e
    results["end_to_end_relaxed_ok"] = n_ok
    save()
    results["forward"] = {
        "shipped": [forward_throughput(model.config, crystals, device, b) for b in ([64] if args.quick else [256, 1024])],
        "paper_F512_T4": [forward_throughput(ModelConfig(), crystals, device, b) for b in ([16] if args.quick else [256, 1024])],
    }
    # single-structure latency (~20 atoms)
    one = [c for c in crystals if 18 <= len(c.numbers) <= 22][:1] or crystals[:1]
    results["latency_single_s"] = timed(lambda: _predict_one(model, one, device), device, repeats=5)
    results["latency_atoms"] = len(one[0].numbers)
    sizes = [1, 2, 3] if args.quick else [2, 4, 6, 8, 11]
    results["scaling"] = scaling(model, device, sizes)
    save()
    if args.sevennet:
        try:
            baseline = sevennet_fire([c for c in crystals if min_distance_ok(c)], device, args.sevennet)
        except ImportError as exc:  # the baseline is optional; the rest of the figures stand
            results["sevennet_fire_error"] = str(exc)
        else:
            baseline["structures_per_s"] = 1.0 / baseline["mean_seconds"]
            results["sevennet_fire"] = baseline
            results["speedup_vs_sevennet_fire"] = results["end_to_end_relaxer_structures_per_s"] / baseline["structures_per_s"]
    save()
    print(json.dumps(results, indent=1))
    _table(results)


def min_distance_ok(c, threshold=0.5):
    from ase import Atoms

    atoms = Atoms(c.numbers, positions=c.positions, cell=c.cell, pbc=True)
    d = atoms.get_all_distances(mic=True)
    return bool((d + np.eye(len(atoms)) * 1e9).min() >= threshold)


def _predict_one(model, crystals, device):
    from e3relax_ase.predict import predict

    return predict(model, crystals, device, torch.float32)


def _table(r):
    print(f"\n{r['device']}  checkpoint {r['checkpoint']}  ({r['n_structures']} structures, mean {r['mean_atoms']:.1f} atoms)")
    print(f"end to end (Atoms -> relaxed Atoms, OneShotRelaxer): {r['end_to_end_relaxer_structures_per_s']:.0f} structures/s ({r['end_to_end_relaxed_ok']} relaxed, the rest refused)")
    if "sevennet_fire" in r:
        b = r["sevennet_fire"]
        print(f"SevenNet-0 + FIRE + FrechetCellFilter (fmax 0.05), {b['n']} structures: median {b['median_seconds']:.2f} s, {b['median_steps']:.0f} steps, {b['structures_per_s']:.2f} structures/s -> one-shot is {r['speedup_vs_sevennet_fire']:.0f}x faster")
    s = r["stages_seconds"]
    print("stages for a batch of %d: " % r["stages_batch"] + ", ".join(f"{k} {v*1e3:.1f} ms" for k, v in s.items() if k != "n_edges"))
    for name, rows in r["forward"].items():
        for row in rows:
            print(f"forward {name:14s} batch {row['batch']:5d}: {row['structures_per_s']:9.0f} structures/s, peak {row['peak_gib']:.2f} GiB, {row['params']} params")
    print(f"single-structure latency ({r['latency_atoms']} atoms): {r['latency_single_s']*1e3:.1f} ms")
    for row in r["scaling"]:
        print(f"cell {row['atoms']:6d} atoms, {row['edges']:8d} edges: graph {row['graph_s']*1e3:.1f} ms, forward {row['forward_s']*1e3:.1f} ms, peak {row['peak_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
