"""Single-structure latency on the CPU with the shipped default checkpoint, end to end through
``OneShotRelaxer("default", device="cpu", dtype=...).relax(atoms)`` (ase.Atoms in, relaxed Atoms
out) and through the bare ``predict`` call, in float32 and float64 with 1 and 2 torch threads,
with a per-stage breakdown, on three 20-atom crystals so that no figure is one structure's:

* a low-symmetry real input: the first 20-atom crystal of the NREL test split (as given);
* a cubic crystal: SrTiO3 perovskite, a 2x2x1 supercell, rattled 0.05 A (seed 0);
* a slab: Al(111), 2x2x5 atoms with 7.5 A of vacuum on each side, rattled 0.05 A (seed 0).

Then ``relax_many`` throughput on the CPU: the first 200 crystals of the NREL test split in one
call, per dtype and thread count.

    python benchmarks/bench_cpu_latency.py [--threads 1,2] [--repeats 20] [--rounds 3] [--compare-heap]

Every thread count runs in its own process (``torch.set_num_threads`` before anything else),
``--rounds`` rounds in rotating order, ``--repeats`` timed calls per crystal per dtype per round
after 3 warm-up calls; medians over all rounds are reported, with the 10th and 90th
percentiles, so other load on the machine shows up in the spread (the 1-minute load average is
recorded before and after). The stage breakdown comes from separate calls with timers wrapped
around the relaxer's steps (not included in the end-to-end figures); "other" is the end-to-end
time not in any stage. ``--compare-heap`` also runs every configuration with
``E3RELAX_KEEP_HEAP=0`` (glibc's malloc defaults: what the relaxer did before
e3relax_ase.relax.heap) and records its figures and page faults beside.

Writes JSON (command, machine, versions, figures) to benchmarks/results/cpu_latency.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "cpu_latency.json"
DTYPES = ("float32", "float64")
MANY = 200  # crystals in the relax_many throughput call
STAGES = (
    # (label, what is timed): see child()
    ("validate", "prepare_structure: vacuum search, checks, Niggli reduction, canonical form, neighbour search (float64)"),
    ("edges", "graph_edges: neighbour cap (and, in float32, the search again in float32)"),
    ("graph", "graph_from_edges: the batched CPU graph"),
    ("network", "the model's forward pass"),
    ("predict_rest", "predict minus the forward pass: centroid correction, back to the caller's basis"),
    ("judge", "judge_here: the sanity checks (distance proof or close-pair search, volume, vacuum axes) and confidence"),
    ("apply_provenance", "_finish: apply through constraints, info keys"),
)


def _nrel_test() -> list:
    """The NREL test split's unrelaxed inputs, as Atoms (read once for both uses below)."""
    from e3relax_ase.training.data.pairs import load_pairs

    return [unrelaxed for unrelaxed, _ in load_pairs(ROOT / "data" / "nrel_zintl" / "test.npz").to_atoms_pairs()]


def _structures(nrel: list) -> dict:
    """The three 20-atom crystals of the module docstring, by name."""
    from ase.build import fcc111
    from ase.spacegroup import crystal

    from e3relax_ase.training.data.pair_frames import PAIR_ID_KEY

    real = next(atoms for atoms in nrel if len(atoms) == 20)
    cubic = crystal(["Sr", "Ti", "O"], [(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0)], spacegroup=221, cellpar=[3.9, 3.9, 3.9, 90, 90, 90]) * (2, 2, 1)
    cubic.rattle(0.05, seed=0)
    slab = fcc111("Al", size=(2, 2, 5), vacuum=7.5)
    slab.rattle(0.05, seed=0)
    return {f"{real.info[PAIR_ID_KEY]} (NREL test, low symmetry)": real, "SrTiO3 2x2x1 rattled (cubic)": cubic, "Al(111) slab 2x2x5 rattled": slab}


# --- child: one thread count, both dtypes -------------------------------------------------------


def child(args) -> None:
    import torch

    torch.set_num_threads(int(args.threads))
    import logging
    import resource

    from e3relax_ase.relax import heap
    from e3relax_ase.relax.predict import CrystalArrays, predict
    from e3relax_ase.relax.relaxer import OneShotRelaxer

    logging.disable(logging.WARNING)  # insane predictions are flagged with a warning on every call
    nrel = _nrel_test()
    structures = _structures(nrel)
    many = nrel[:MANY]  # the first MANY crystals (relax_many throughput)
    result = {"threads": int(args.threads), "structures": {name: len(atoms) for name, atoms in structures.items()}}
    for dtype in DTYPES:
        relaxer = OneShotRelaxer("default", device="cpu", dtype=dtype)
        per_structure = {}
        for name, atoms in structures.items():
            crystal = CrystalArrays(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc)
            for _ in range(3):
                relaxer.relax(atoms)
            relax, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(args.repeats):
                start = time.perf_counter()
                relaxer.relax(atoms)
                relax.append(time.perf_counter() - start)
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.repeats
            bare = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                predict(relaxer.model, [crystal], "cpu", relaxer.dtype)
                bare.append(time.perf_counter() - start)
            per_structure[name] = {
                "relax_s": relax,
                "predict_s": bare,
                "minor_page_faults_per_relax": faults,
                "stages_s": _stages(relaxer, atoms, args.repeats),
            }
        start = time.perf_counter()
        relaxed = relaxer.relax_many(many)
        many_s = time.perf_counter() - start
        result[dtype] = {
            "per_structure": per_structure,
            "relax_many": {"structures": len(many), "atoms": int(sum(len(a) for a in many)), "seconds": many_s, "ok": sum(r is not None for r in relaxed)},
        }
        result["checkpoint"] = relaxer.info.name
    result["heap_kept"] = heap.keep_freed_heap()
    print(json.dumps(result))


def _stages(relaxer, atoms, repeats: int) -> dict:
    """Per-stage times of ``repeats`` more relax calls, from timers wrapped around each step."""
    import numpy as np

    spent: dict[str, list[float]] = {}
    originals = []

    def timed(owner, attribute, label):
        function = getattr(owner, attribute)
        originals.append((owner, attribute, function))

        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                spent.setdefault(label, []).append(time.perf_counter() - start)

        setattr(owner, attribute, wrapper)

    # Each step is wrapped where relax_many looks it up (e3relax_ase/relax/: prepare, runner,
    # pipeline, finish).
    import e3relax_ase.relax.pipeline as pipeline_module
    import e3relax_ase.relax.prepare as prepare_module
    import e3relax_ase.relax.runner as runner_module

    timed(prepare_module, "prepare_structure", "validate")
    timed(prepare_module, "graph_edges", "edges")
    timed(runner_module, "graph_from_edges", "graph")
    timed(relaxer.model, "forward", "network")  # instance attribute: nn.Module.__call__ finds it
    timed(runner_module, "predict", "_predict_total")
    timed(pipeline_module, "judge_here", "judge")  # the relaxer judges a chunk before finishing its items
    timed(relaxer.finisher, "finish", "apply_provenance")
    totals = []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            relaxer.relax(atoms)
            totals.append(time.perf_counter() - start)
    finally:
        for owner, attribute, function in reversed(originals):
            if owner is relaxer.model or owner is relaxer.finisher:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, function)
    per_call = {label: np.asarray(times) for label, times in spent.items()}
    per_call["predict_rest"] = per_call.pop("_predict_total") - per_call["network"]
    per_call["other"] = np.asarray(totals) - sum(per_call[label] for label, _ in STAGES)
    per_call["total"] = np.asarray(totals)
    return {label: values.tolist() for label, values in per_call.items()}


# --- parent ---------------------------------------------------------------------------------------


def _cpu_model() -> str:
    """The CPU's model name, with family/model numbers (a VM may show only a generic name)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']}{', VM' if 'hypervisor' in fields.get('flags', '') else ''})"
    return name


def _run_child(threads: int, repeats: int, keep_heap: bool) -> dict:
    env = dict(os.environ, E3RELAX_KEEP_HEAP="1" if keep_heap else "0", PYTHONPATH=str(ROOT))
    command = [sys.executable, __file__, "--child", "--threads", str(threads), "--repeats", str(repeats)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({threads} threads):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(samples: list[float]) -> dict:
    import numpy as np

    ms = 1e3 * np.asarray(samples)
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)), "p90_ms": float(np.percentile(ms, 90)), "n": len(ms)}


def parent(args) -> None:
    import numpy as np
    import torch

    threads = [int(t) for t in args.threads.split(",")]
    variants = [True, False] if args.compare_heap else [True]
    configs = [(keep, t) for keep in variants for t in threads]
    runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    load_before = os.getloadavg()[0]
    start = time.time()
    for round_index in range(args.rounds):
        shift = round_index % len(configs)
        for keep, t in configs[shift:] + configs[:shift]:
            runs[(keep, t)].append(_run_child(t, args.repeats, keep))
            print(f"round {round_index + 1}/{args.rounds}: {t} thread(s), kept heap {keep}: done", file=sys.stderr)
    results = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
        "what": "OneShotRelaxer('default', device='cpu', dtype=...).relax(atoms) end to end on three 20-atom crystals "
        "(low-symmetry real input, rattled cubic supercell, rattled slab) and the bare predict() call, medians over "
        "rounds x repeats (rotating order, one process per thread count); relax_many of the first 200 NREL test crystals",
        "machine": {
            "cpu_model": _cpu_model(),
            "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "platform": platform.platform(),
            "load_average_1min_before": load_before,
            "load_average_1min_after": os.getloadavg()[0],
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "seconds": round(time.time() - start, 1),
        "rounds": args.rounds,
        "repeats_per_round": args.repeats,
        "stage_meaning": dict(STAGES),
    }
    first = runs[configs[0]][0]
    results.update({"checkpoint": first["checkpoint"], "structures": first["structures"]})
    names = list(first["structures"])
    for keep in variants:
        table = {}
        for t in threads:
            entry = {}
            for dtype in DTYPES:
                done = runs[(keep, t)]
                per_structure = {}
                for name in names:
                    parts = [run[dtype]["per_structure"][name] for run in done]
                    stages = {}
                    for label in [s for s, _ in STAGES] + ["other", "total"]:
                        stages[label] = round(1e3 * float(np.median([x for part in parts for x in part["stages_s"][label]])), 3)
                    per_structure[name] = {
                        "relax": _summary([x for part in parts for x in part["relax_s"]]),
                        "predict": _summary([x for part in parts for x in part["predict_s"]]),
                        "minor_page_faults_per_relax": float(np.median([part["minor_page_faults_per_relax"] for part in parts])),
                        "stages_median_ms": stages,
                    }
                pooled = [x for run in done for name in names for x in run[dtype]["per_structure"][name]["relax_s"]]
                many = [run[dtype]["relax_many"] for run in done]
                entry[dtype] = {
                    "relax_all_structures": _summary(pooled),
                    "per_structure": per_structure,
                    "relax_many": {
                        "structures": many[0]["structures"],
                        "atoms": many[0]["atoms"],
                        "structures_per_s_median": float(np.median([m["structures"] / m["seconds"] for m in many])),
                        "seconds": [round(m["seconds"], 3) for m in many],
                        "ok": many[0]["ok"],
                    },
                }
            entry["heap_kept"] = runs[(keep, t)][0]["heap_kept"]
            table[f"{t}_thread" + ("s" if t > 1 else "")] = entry
        results["results" if keep else "without_kept_heap"] = table
    results["default_dtype"] = "float64 (OneShotRelaxer dtype='auto' on a CPU)"
    results["target"] = "relax median <= 35 ms with 2 threads in the default dtype, over the three crystals (issue #19)"
    out = Path(args.out) if args.out else OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{'threads':>7} {'dtype':>8} {'structure':<45} {'relax ms':>9} {'p10-p90':>13} {'predict ms':>10}  heap")
    for keep in variants:
        table = results["results" if keep else "without_kept_heap"]
        for key, entry in table.items():
            for dtype in DTYPES:
                rows = [(name, e) for name, e in entry[dtype]["per_structure"].items()] + [
                    ("all three", {"relax": entry[dtype]["relax_all_structures"], "predict": None})
                ]
                for name, e in rows:
                    predict_ms = f"{e['predict']['median_ms']:10.1f}" if e["predict"] else " " * 10
                    print(
                        f"{key.split('_')[0]:>7} {dtype:>8} {name[:45]:<45} {e['relax']['median_ms']:9.1f} "
                        f"{e['relax']['p10_ms']:6.1f}-{e['relax']['p90_ms']:<6.1f} {predict_ms}  {'kept' if entry['heap_kept'] else 'malloc defaults'}"
                    )
                m = entry[dtype]["relax_many"]
                print(
                    f"{key.split('_')[0]:>7} {dtype:>8} relax_many of {m['structures']} NREL test crystals ({m['atoms']} atoms): {m['structures_per_s_median']:.1f} structures/s"  # noqa: E501
                )
    print("stages (ms, median), kept heap:")
    for key, entry in results["results"].items():
        for dtype in DTYPES:
            for name, e in entry[dtype]["per_structure"].items():
                print(f"  {key} {dtype} {name[:30]}: " + ", ".join(f"{k} {v:.2f}" for k, v in e["stages_median_ms"].items()))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (one child process each)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per dtype per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare-heap", action="store_true", help="also run with E3RELAX_KEEP_HEAP=0 (glibc defaults)")
    parser.add_argument("--out", default=None, help=f"JSON file (default {OUT.relative_to(ROOT)})")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
