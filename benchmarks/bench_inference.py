"""One-shot inference benchmarks: end-to-end throughput with its stages, forward throughput at
two model sizes, single-structure latency, and scaling with cell size.

Prints a table and writes JSON (command, device, versions, figures) to benchmarks/results/.
Structures: the real NREL DFT test inputs with 5-30 atoms (data/nrel_zintl/test.npz).

    python benchmarks/bench_inference.py [--device cuda] [--checkpoint default] [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# Appended, not put first: a package named on PYTHONPATH (an older revision, to compare
# against in the same run: scripts/gpu_compare.sh) is the one measured.
sys.path.append(str(ROOT))
import e3relax_ase  # noqa: E402
from e3relax_ase.config import ModelConfig  # noqa: E402
from e3relax_ase.geometry.canonical import canonicalize  # noqa: E402
from e3relax_ase.io.checkpoint import load_checkpoint  # noqa: E402
from e3relax_ase.nn.model import E3RelaxH2  # noqa: E402
from e3relax_ase.relax.predict import CrystalArrays, graph_from_canonical  # noqa: E402
from e3relax_ase.training.data.pairs import load_pairs  # noqa: E402


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


def stages(checkpoint, crystals, device):
    """Time each stage of OneShotRelaxer's own pipeline on one batch (seconds).

    graph_build: validation + canonical form + neighbour edges (the relaxer's ``_prepare``,
    one structure at a time on one CPU core); batching: the edges joined into one graph;
    host_to_device: the pinned copy; forward: the network; write_back: the prediction mapped
    back, sanity-checked and applied to each ``ase.Atoms`` (``_finish``). Internals are used
    so each stage is timed alone; ``end_to_end_relaxer`` times the public call.
    """
    from ase import Atoms

    from e3relax_ase.geometry.graph import graph_from_edges
    from e3relax_ase.relax.items import RelaxOptions
    from e3relax_ase.relax.predict import to_device
    from e3relax_ase.relax.prepare import prepare_item
    from e3relax_ase.relax.relaxer import OneShotRelaxer

    relaxer = OneShotRelaxer(checkpoint, device=device, dtype="float32")
    atoms = [Atoms(c.numbers, positions=c.positions, cell=c.cell, pbc=True) for c in crystals]
    out = {}
    start = time.perf_counter()
    items = []
    settings = relaxer.preparation_settings()
    for index, a in enumerate(atoms):
        try:
            items.append(prepare_item(index, str(index), a, False, False, settings))
        except ValueError:  # a refused input (overlapping atoms): counted in the time only
            pass
    out["graph_build"] = time.perf_counter() - start
    start = time.perf_counter()
    graph = graph_from_edges(
        [i.arrays.numbers for i in items],
        [i.form.positions for i in items],
        [i.form.cell for i in items],
        [i.arrays.pbc for i in items],
        [i.edges for i in items],
        torch.float32,
    )
    out["batching"] = time.perf_counter() - start
    start = time.perf_counter()
    graph_device = to_device(graph, device, torch.float32)
    synchronize(device)
    out["host_to_device"] = time.perf_counter() - start
    with torch.no_grad():
        out["forward"] = timed(lambda: relaxer.model(graph_device), device)
    predictions = relaxer.runner.forward(items)
    if hasattr(predictions, "result"):  # launched without waiting (older revisions returned the list)
        predictions = predictions.result()
    options = RelaxOptions(provenance=relaxer.finisher.provenance(relax_cell=True))  # as relax_many sets them up
    start = time.perf_counter()
    for item, prediction in zip(items, predictions):
        relaxer.finisher.finish(item, prediction, options)
    out["write_back"] = time.perf_counter() - start
    out["n_structures"] = len(items)
    out["n_edges"] = int(graph.n_edges)
    return out


def end_to_end_relaxer(checkpoint, crystals, device, repeats=2, **options):
    """ase.Atoms in, relaxed ase.Atoms out, through OneShotRelaxer.relax_many (best of ``repeats``).

    ``options``: OneShotRelaxer keywords (precision) and ``num_workers``.
    """
    from ase import Atoms

    from e3relax_ase.relax.relaxer import OneShotRelaxer

    num_workers = options.pop("num_workers", 0)
    relaxer = OneShotRelaxer(checkpoint, device=device, dtype="float32", **options)
    atoms = [Atoms(c.numbers, positions=c.positions, cell=c.cell, pbc=True) for c in crystals]
    start = time.perf_counter()
    relaxer.relax_many(atoms[:64], errors="return", num_workers=num_workers)  # warm-up (workers start)
    warm_up = time.perf_counter() - start
    best = float("inf")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        # Some real DFT inputs are refused (overlapping atoms); they count in the time, not the output.
        results = relaxer.relax_many(atoms, errors="return", num_workers=num_workers)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    relaxer.close()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "structures_per_s": len(atoms) / best,
        "seconds": best,
        "relaxed": sum(isinstance(r, Atoms) for r in results),
        "warm_up_s": warm_up,
        "num_workers": num_workers,
        "peak_gpu_memory_gib": peak,
        **options,
    }


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
    return {
        "n": len(rows),
        "median_seconds": float(np.median([r["seconds"] for r in rows])),
        "mean_seconds": float(np.mean([r["seconds"] for r in rows])),
        "median_steps": float(np.median([r["steps"] for r in rows])),
        "converged": int(sum(r["converged"] for r in rows)),
    }


# Dense peak rates (vendor datasheets, SXM parts) for the roofline columns; other GPUs get none.
PEAKS = {
    "H200": {"float32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "bytes": 4.8e12},
    "H100": {"float32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "bytes": 3.35e12},
}


def _network(model, compiled: bool):
    """``model``'s forward pass, or the relaxer's compiled one (``compiled.CompiledForward``:
    the message passing compiled with torch.compile(dynamic=True), on the first call)."""
    if not compiled:
        return model
    from e3relax_ase.nn.compiled import CompiledForward

    forward = CompiledForward(model)
    return lambda graph: forward.model(graph, message_passing=forward.message_passing)


def forward_throughput(model, graph, device, precision="float32", compiled=False):
    """Structures/s of one forward pass over ``graph``, in ``precision``, optionally compiled."""
    from e3relax_ase.nn.precision import matmul_precision

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    network = _network(model, compiled)
    start = time.perf_counter()
    with torch.no_grad(), matmul_precision(precision, device):
        network(graph)  # compiles when asked
        synchronize(device)
        first = time.perf_counter() - start
        seconds = timed(lambda: network(graph), device, repeats=5)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {
        "precision": precision,
        "compiled": compiled,
        "batch": graph.n_graphs,
        "structures_per_s": graph.n_graphs / seconds,
        "seconds": seconds,
        "first_call_s": first,
        "edges": int(graph.n_edges),
        "params": model.count_parameters(),
        "peak_gib": peak,
    }


def deviation_from_float32(model, graph, device, precision, compiled=False):
    """Largest and mean per-atom distance (Å) between float32 and ``precision`` predictions."""
    from e3relax_ase.nn.precision import matmul_precision

    network = _network(model, compiled)
    with torch.no_grad():
        exact = model(graph)
        with matmul_precision(precision, device):
            other = network(graph)
    distance = (other.positions[-1] - exact.positions[-1]).norm(dim=-1)
    return {
        "precision": precision,
        "compiled": compiled,
        "max_position_deviation_A": float(distance.max()),
        "mean_position_deviation_A": float(distance.mean()),
        "max_cell_deviation_A": float((other.cell[-1] - exact.cell[-1]).abs().max()),
    }


class _ByteCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes every (non-view) operator reads and writes: the memory traffic of an unfused run."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for leaf in torch.utils._pytree.tree_leaves((args, kwargs, out)):
                if isinstance(leaf, torch.Tensor):
                    self.bytes += leaf.numel() * leaf.element_size()
        return out


def count_work(model, graph):
    """FLOPs (matrix products, torch's flop counter) and unfused bytes of one float32 forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    # Counted with autograd on: under no_grad, torch 2.13's FlopCounterMode fails in its module
    # tracker ("Expected gradient function to be set"). The count is the same forward pass's.
    with FlopCounterMode(display=False) as flops:
        model(graph)
    with torch.no_grad():
        counter = _ByteCounter()
        with counter:
            model(graph)
    return {"flops": int(flops.get_total_flops()), "bytes_unfused": int(counter.bytes)}


def roofline(row, work, device_name):
    """Achieved FLOP/s and bytes/s of a forward row, and the fraction of the peaks."""
    seconds = row["seconds"]
    out = {"achieved_tflops": work["flops"] / seconds / 1e12, "achieved_tb_per_s_unfused": work["bytes_unfused"] / seconds / 1e12}
    peaks = next((v for k, v in PEAKS.items() if k in device_name), None)
    if peaks:
        out["fraction_of_matmul_peak"] = work["flops"] / seconds / peaks[row["precision"]]
        out["fraction_of_memory_peak_unfused"] = work["bytes_unfused"] / seconds / peaks["bytes"]
        # The time each bound alone allows; the forward can be no faster than the larger.
        out["compute_bound_s"] = work["flops"] / peaks[row["precision"]]
        out["memory_bound_s_unfused"] = work["bytes_unfused"] / peaks["bytes"]
    return out


def batch_graph(crystals, config, device):
    forms = [canonicalize(c.positions, c.cell, c.pbc) for c in crystals]
    return graph_from_canonical(crystals, forms, config.cutoff, config.max_neighbors, device, torch.float32)


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
        first_build = time.perf_counter() - start  # includes one-off kernel compilation on CUDA
        build = timed(
            lambda crystal=crystal, form=form: graph_from_canonical([crystal], [form], model.config.cutoff, model.config.max_neighbors, device, torch.float32),
            device,
            repeats=3,  # noqa: E501
        )
        with torch.no_grad():
            seconds = timed(lambda graph=graph: model(graph), device, repeats=2)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        rows.append(
            {"atoms": len(atoms), "edges": int(graph.n_edges), "graph_s": build, "graph_first_call_s": first_build, "forward_s": seconds, "peak_gib": peak}
        )
    return rows


SECTIONS = ("forward", "latency", "scaling")  # what --skip may leave out (end to end always runs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--sevennet", type=int, default=0, help="also relax this many structures with SevenNet-0 + FIRE (needs sevenn)")
    parser.add_argument("--precisions", default="float32,tf32,bf16", help="forward-pass precisions to compare")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time OneShotRelaxer(compile=True): the forward passes and end-to-end runs with the message passing compiled",
    )
    parser.add_argument("--workers", default="0,4,12", help="num_workers values of the end-to-end runs")
    parser.add_argument("--e2e-n", type=int, default=4096, help="structures of the end-to-end runs")
    parser.add_argument(
        "--e2e-batch-sizes",
        default="",
        help="also run the end-to-end path with the most workers at these batch_size values "
        "(structures per forward pass; smaller chunks let preparation overlap the network)",
    )
    parser.add_argument(
        "--paper-e2e", action="store_true", help="also run end to end with an untrained paper-size network (F = 512, T = 4), most workers, every precision"
    )
    parser.add_argument("--skip", default="", help=f"sections to leave out, of {','.join(SECTIONS)}")
    args = parser.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(SECTIONS):
        parser.error(f"--skip takes {','.join(SECTIONS)}; got {','.join(sorted(skip - set(SECTIONS)))}")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    model, info = load_checkpoint(args.checkpoint)
    model = model.to(device).float().eval()
    n = 64 if args.quick else 1024
    crystals = test_structures(n)
    precisions = args.precisions.split(",")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    results = {
        "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
        "device": device_name,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "package": str(Path(e3relax_ase.__file__).parent),
        "checkpoint": info.name,
        "checkpoint_sha256": info.sha256,
        "shipped_config": model.config.to_dict(),
        "n_structures": n,
        "mean_atoms": float(np.mean([len(c.numbers) for c in crystals])),
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"inference_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(results, indent=1))

    batch = min(n, 256)
    results["stages_seconds"] = stages(args.checkpoint, crystals[:batch], device)
    save()
    # End to end: the baseline (float32, one process) first, then each option alone, then together.
    e2e_crystals = [crystals[i % n] for i in range(64 if args.quick else args.e2e_n)]
    workers = [int(w) for w in args.workers.split(",")]
    variants = [{"num_workers": w} for w in workers]
    variants += [{"num_workers": workers[-1], "batch_size": int(b)} for b in args.e2e_batch_sizes.split(",") if b]
    variants += [{"num_workers": workers[-1], "precision": p} for p in precisions if p != "float32"]
    if args.compile:
        variants += [{"num_workers": workers[-1], "precision": p, "compile": True} for p in precisions]
    results["end_to_end"] = []
    for options in variants:
        results["end_to_end"].append(end_to_end_relaxer(args.checkpoint, e2e_crystals, device, **options))
        save()
    results["end_to_end_relaxer_structures_per_s"] = max(r["structures_per_s"] for r in results["end_to_end"])
    if args.paper_e2e:
        # The target is end to end at the paper's size: the same path with an untrained
        # F = 512, T = 4 network (its outputs are meaningless; the work per structure is not).
        # Its predictions all fail the sanity checks: their 16,384 warnings are not logged, as
        # no trained model would make them (each warning is host work the measurement would carry).
        torch.manual_seed(0)
        paper = E3RelaxH2(ModelConfig()).eval()
        logger = logging.getLogger("e3relax_ase")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            compiles = [False, True] if args.compile else [False]
            results["end_to_end_paper_F512_T4"] = [
                {
                    **end_to_end_relaxer(paper, e2e_crystals, device, num_workers=workers[-1], precision=p, **({"compile": True} if c else {})),
                    "model": "paper_F512_T4",
                }
                for c in compiles
                for p in precisions
            ]
        finally:
            logger.setLevel(level)
        save()

    if "forward" not in skip:
        forward_sections(args, results, model, crystals, precisions, device, device_name, save)
    if "latency" not in skip:
        one = [c for c in crystals if 18 <= len(c.numbers) <= 22][:1] or crystals[:1]  # ~20 atoms
        results["latency_single_s"] = timed(lambda: _predict_one(model, one, device), device, repeats=5)
        results["latency_atoms"] = len(one[0].numbers)
        results.update(relax_latency(args.checkpoint, one[0], device))
    if "scaling" not in skip:
        results["scaling"] = scaling(model, device, [1, 2, 3] if args.quick else [2, 4, 6, 8, 11])
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


def forward_sections(args, results, model, crystals, precisions, device, device_name, save):
    """Forward passes: every precision (and compiled, when asked) at both sizes, same graph."""
    torch.manual_seed(0)
    sizes = {"shipped": model, "paper_F512_T4": E3RelaxH2(ModelConfig()).to(device).eval()}
    graph = batch_graph(crystals, model.config, device)
    results["forward_batch"] = graph.n_graphs
    results["forward"], results["work"], results["deviation"] = {}, {}, []
    for name, network in sizes.items():
        results["work"][name] = count_work(network, graph)
        rows = [forward_throughput(network, graph, device, p) for p in precisions]
        if args.compile:  # the message passing compiled (one compilation per size, ~12 s on an H200 host)
            rows += [forward_throughput(network, graph, device, p, compiled=True) for p in precisions]
        for row in rows:
            row.update(roofline(row, results["work"][name], device_name))
        results["forward"][name] = rows
        save()
    for p in precisions[1:]:
        results["deviation"].append(deviation_from_float32(model, graph, device, p))
    if args.compile:
        results["deviation"] += [deviation_from_float32(model, graph, device, p, compiled=True) for p in precisions]
    # The authors' anchor batch size.
    small = batch_graph(crystals[:256], model.config, device)
    results["forward_batch256"] = {name: forward_throughput(network, small, device, "float32") for name, network in sizes.items()}
    del sizes
    save()


def min_distance_ok(c, threshold=0.5):
    from ase import Atoms

    atoms = Atoms(c.numbers, positions=c.positions, cell=c.cell, pbc=True)
    d = atoms.get_all_distances(mic=True)
    return bool((d + np.eye(len(atoms)) * 1e9).min() >= threshold)


def relax_latency(checkpoint, crystal, device, repeats=20) -> dict:
    """``OneShotRelaxer.relax`` of one ase.Atoms, as a user calls it: the first and second calls
    on a new relaxer (on CUDA the second captures the CUDA graph of its size bucket), then the
    median of ``repeats`` more (replays)."""
    from ase import Atoms

    from e3relax_ase.relax.relaxer import OneShotRelaxer

    relaxer = OneShotRelaxer(checkpoint, device=device, dtype="float32")
    atoms = Atoms(crystal.numbers, positions=crystal.positions, cell=crystal.cell, pbc=True)
    first_calls = []
    for _ in range(2):
        synchronize(device)
        start = time.perf_counter()
        relaxer.relax(atoms)
        synchronize(device)
        first_calls.append(time.perf_counter() - start)
    return {
        "latency_relax_first_s": first_calls[0],
        "latency_relax_second_s": first_calls[1],
        "latency_relax_s": timed(lambda: relaxer.relax(atoms), device, repeats=repeats),
    }


def _predict_one(model, crystals, device):
    from e3relax_ase.relax.predict import predict

    return predict(model, crystals, device, torch.float32)


def _table(r):
    print(f"\n{r['device']}  checkpoint {r['checkpoint']}  ({r['n_structures']} NREL test inputs, mean {r['mean_atoms']:.1f} atoms)")
    print("end to end (Atoms -> relaxed Atoms, OneShotRelaxer.relax_many):")
    base = r["end_to_end"][0]["structures_per_s"]
    for row in r["end_to_end"]:
        label = ", ".join(f"{k}={row[k]}" for k in ("num_workers", "batch_size", "precision", "compile") if k in row)
        print(f"  {label:45s} {row['structures_per_s']:8.0f} structures/s  ({row['structures_per_s'] / base:.2f}x)")
    for row in r.get("end_to_end_paper_F512_T4", []):
        compiled = " + compile" if row.get("compile") else ""
        print(
            f"  paper size F=512 T=4, num_workers={row['num_workers']}, {row.get('precision', 'float32') + compiled:18s}"
            f"{row['structures_per_s']:12.0f} structures/s"
        )
    if "sevennet_fire" in r:
        b = r["sevennet_fire"]
        print(
            f"SevenNet-0 + FIRE + FrechetCellFilter (fmax 0.05), {b['n']} structures: median {b['median_seconds']:.2f} s, {b['median_steps']:.0f} steps, "
            f"{b['structures_per_s']:.2f} structures/s -> best one-shot end to end is {r['speedup_vs_sevennet_fire']:.0f}x faster"
        )
    s = r["stages_seconds"]
    print(f"stages for a batch of {s['n_structures']}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in s.items() if k not in ("n_edges", "n_structures")))
    for name, rows in r.get("forward", {}).items():
        work = r["work"][name]
        print(f"forward {name}, batch {r['forward_batch']} ({work['flops'] / 1e9:.0f} GFLOP, {work['bytes_unfused'] / 1e9:.1f} GB unfused):")
        base = rows[0]["structures_per_s"]
        for row in rows:
            label = row["precision"] + (" + compile" if row["compiled"] else "")
            bound = (
                f", {row['fraction_of_matmul_peak'] * 100:.0f}% matmul peak, {row['fraction_of_memory_peak_unfused'] * 100:.0f}% HBM (unfused)"
                if "fraction_of_matmul_peak" in row
                else ""
            )
            print(f"  {label:18s} {row['structures_per_s']:9.0f} structures/s ({row['structures_per_s'] / base:.2f}x), peak {row['peak_gib']:.2f} GiB{bound}")
    for row in r.get("deviation", []):
        print(
            f"{row['precision']}{' + compile' if row.get('compiled') else ''} vs float32 (shipped): max {row['max_position_deviation_A']:.2e} Å, mean {row['mean_position_deviation_A']:.2e} Å, cell {row['max_cell_deviation_A']:.2e} Å"  # noqa: E501
        )
    if "latency_single_s" in r:
        print(f"single-structure latency ({r['latency_atoms']} atoms): {r['latency_single_s'] * 1e3:.1f} ms")
    if "latency_relax_s" in r:
        print(
            f"OneShotRelaxer.relax of that structure: {r['latency_relax_s'] * 1e3:.1f} ms (first call {r['latency_relax_first_s'] * 1e3:.0f} ms, "
            f"second {r.get('latency_relax_second_s', float('nan')) * 1e3:.0f} ms)"
        )
    for row in r.get("scaling", []):
        print(
            f"cell {row['atoms']:6d} atoms, {row['edges']:8d} edges: graph {row['graph_s'] * 1e3:.1f} ms (first call {row.get('graph_first_call_s', float('nan')) * 1e3:.0f} ms), forward {row['forward_s'] * 1e3:.1f} ms, peak {row['peak_gib']:.2f} GiB"  # noqa: E501
        )


if __name__ == "__main__":
    main()
