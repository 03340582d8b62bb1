"""Distillation driver throughput: an older ``batched_relax`` against this one, in one call.

Issue 17, deliverable 4, asks for twice today's kept pairs per GPU-hour, with the pairs
unchanged. This runs the same inputs through two copies of the batched FIRE + Frechet driver
(``--old-module``: a file, e.g. ``git show REV:e3relax_ase/training/distill/batched_relax.py``,
``training/batched_relax.py`` in revisions before the training/ split; and
the package's own) with the same teacher and atom budget, alternating old and new
``--repeats`` times, and reports for each: wall time, the teacher's share of it (timed around
each call, synchronised on CUDA), the driver's own time per FIRE step (wall minus teacher,
divided by teacher calls), structures and atom-steps per second. It also checks that both
drivers give the same results (statuses, steps, largest position and cell difference).

Teachers: ``toy`` (a stateless harmonic pull of each atom to the nearest quarter point of
its cell and of the volume to 12 Å^3 per atom: nearly free, so the driver's host work is
what is measured), or ``sevennet`` (SevenNet-0 from the sevenn wheel, what distillation runs).

    git show a9dfbac:e3relax_ase/training/batched_relax.py > /tmp/old_batched_relax.py
    python benchmarks/bench_distill_throughput.py --old-module /tmp/old_batched_relax.py --teacher toy --n 1000
    python3 benchmarks/bench_distill_throughput.py --old-module .gpu/old_batched_relax.py --teacher sevennet \\
        --device cuda --n 6000 --max-atoms 6144 --out $OUT/distill_driver_h200.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class ToyTeacher:
    """Harmonic wells at the nearest quarter point of the cell, and a volume spring.

    E = k/2 sum |r - w(r)|^2 + B/2 (V - V0)^2 / V0 with V0 = 12 Å^3 per atom; the wells w move
    with the cell and are not differentiated (a descent direction is all FIRE needs here).
    """

    def __init__(self, k: float = 2.0, bulk_modulus: float = 0.5, volume_per_atom: float = 12.0):
        self.k, self.bulk, self.v_atom = k, bulk_modulus, volume_per_atom
        self.seconds = 0.0

    def __call__(self, positions, cell, numbers, batch, n_atoms):
        from e3relax_ase.training.distill.batched_results import TeacherOutput

        frac = torch.einsum("ni,nij->nj", positions, torch.linalg.inv(cell)[batch])
        wells = torch.einsum("ni,nij->nj", torch.round(frac * 4.0) / 4.0, cell[batch])
        delta = positions - wells
        forces = -self.k * delta
        volume = torch.linalg.det(cell).abs()
        v0 = self.v_atom * n_atoms.to(positions.dtype)
        energy = torch.zeros_like(volume).index_add_(0, batch, 0.5 * self.k * (delta * delta).sum(1))
        energy = energy + 0.5 * self.bulk * (volume - v0) ** 2 / v0
        pressure = self.bulk * (volume - v0) / v0  # dE/dV; ASE stress = (1/V) dE/deps = dE/dV (isotropic)
        stress = pressure[:, None, None] * torch.eye(3, dtype=positions.dtype, device=positions.device)
        return TeacherOutput(energy, forces, stress)


class TimedTeacher:
    """Wraps a teacher and adds the time of its calls (synchronised on CUDA) to ``seconds``."""

    def __init__(self, teacher, device: str):
        self.teacher, self.cuda = teacher, device.startswith("cuda")
        self.seconds = 0.0

    def __call__(self, *args):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.teacher(*args)
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        return out


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_inputs(args) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(numbers, positions, cell) of the first ``--n`` inputs of a make-inputs file or a pair file."""
    with np.load(args.inputs, allow_pickle=False) as d:
        arrays = {k: d[k] for k in d.files}
    positions = arrays.get("positions", arrays.get("pos_unrelaxed"))
    cells = arrays.get("cells", arrays.get("cell_unrelaxed"))
    offsets = arrays["offsets"]
    n = min(args.n, len(offsets) - 1) if args.n > 0 else len(offsets) - 1
    return [
        (
            arrays["numbers"][offsets[k] : offsets[k + 1]].astype(np.int64),
            positions[offsets[k] : offsets[k + 1]].astype(np.float64),
            cells[k].astype(np.float64),
        )
        for k in range(n)
    ]


def run_driver(module, inputs, teacher, args) -> dict:
    params = module.FireParams(fmax=args.fmax, max_steps=args.max_steps, fresh_check=True)
    stream = (module.RelaxInput(numbers=z, positions=p, cell=c, key=k) for k, (z, p, c) in enumerate(inputs))
    stats = module.RelaxStats()
    timed = TimedTeacher(teacher, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = {r.key: r for r in module.relax_stream(stream, timed, params, max_atoms=args.max_atoms, device=args.device, stats=stats)}
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {
        "results": results,
        "row": {
            "wall_s": round(wall, 3),
            "teacher_s": round(timed.seconds, 3),
            "driver_s": round(wall - timed.seconds, 3),
            "teacher_calls": stats.n_calls,
            "driver_ms_per_step": round(1000 * (wall - timed.seconds) / max(stats.n_calls, 1), 3),
            "structures_per_s": round(stats.n_finished / wall, 2),
            "atom_steps_per_s": round(stats.n_atom_evals / wall, 1),
            "finished": stats.n_finished,
            "converged": stats.n_converged,
        },
    }


def compare(a: dict, b: dict) -> dict:
    """How far two drivers' results differ (same inputs, same teacher)."""
    keys = sorted(a)
    same_status = all(a[k].status == b[k].status and a[k].n_steps == b[k].n_steps for k in keys)
    dpos = max((float(np.abs(a[k].positions - b[k].positions).max()) for k in keys), default=0.0)
    dcell = max((float(np.abs(a[k].cell - b[k].cell).max()) for k in keys), default=0.0)
    return {"same_keys": sorted(a) == sorted(b), "same_status_and_steps": same_status, "max_position_diff_A": dpos, "max_cell_diff_A": dcell}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-module", required=True, help="path of the older batched_relax.py")
    parser.add_argument("--inputs", default=str(ROOT / "data" / "nrel_zintl" / "train.npz"), help="make-inputs .npz or pair .npz (its unrelaxed structures)")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--teacher", choices=["toy", "sevennet"], default="toy")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-atoms", type=int, default=4096)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--fmax", type=float, default=0.02)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from e3relax_ase.training.distill import batched_relax as new

    old = load_module(Path(args.old_module), "old_batched_relax")
    inputs = load_inputs(args)
    if args.teacher == "toy":
        teacher = ToyTeacher()
    else:
        from e3relax_ase.training.distill.teacher_sevennet import SevenNetTeacher

        teacher = SevenNetTeacher("7net-0", device=args.device)
    runs = {"old": [], "new": []}
    last = {}
    for _ in range(args.repeats):
        for label, module in (("old", old), ("new", new)):
            out = run_driver(module, inputs, teacher, args)
            runs[label].append(out["row"])
            last[label] = out["results"]
            print(json.dumps({label: out["row"]}), flush=True)
    best = {label: min(rows, key=lambda r: r["wall_s"]) for label, rows in runs.items()}
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else f"main({argv})",
        "machine": {
            "platform": platform.platform(),
            "cpu_count": __import__("os").cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "inputs": {"file": args.inputs, "n": len(inputs), "atoms": int(sum(len(z) for z, _, _ in inputs))},
        "settings": {
            "teacher": args.teacher,
            "max_atoms": args.max_atoms,
            "max_steps": args.max_steps,
            "fmax": args.fmax,
            "old_module": args.old_module,
            "repeats": args.repeats,
        },
        "runs": runs,
        "best": best,
        "new_over_old": {
            "structures_per_s": round(best["new"]["structures_per_s"] / best["old"]["structures_per_s"], 3),
            "driver_ms_per_step": round(best["new"]["driver_ms_per_step"] / max(best["old"]["driver_ms_per_step"], 1e-9), 3),
        },
        "same_results": compare(last["old"], last["new"]),
    }
    print(json.dumps({k: report[k] for k in ("best", "new_over_old", "same_results")}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
