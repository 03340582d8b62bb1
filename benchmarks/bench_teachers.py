"""Which teacher is closest to DFT: offline universal potentials against the NREL DFT relaxations.

Issue 17, deliverable 1. Every teacher relaxes the same NREL real-DFT inputs (the train split
only: data/nrel_zintl/train.npz, so the held-out splits stay unseen by any choice made here)
with the project's batched FIRE + Frechet cell filter (training/distill/batched_relax.py, the
distillation's optimizer: ASE 3.29 FIRE defaults, fmax 0.02 eV/Å with the fresh-filter check,
at most 500 steps). Each relaxed structure is compared with the DFT-relaxed one:

* volume error: V_teacher / V_DFT - 1, median and 90th percentile of its absolute value (%),
  and the median signed value (a teacher that is systematically too soft shows here);
* coordinate MAE (Å): ``metrics.structure_errors`` (each atom on the image of the DFT cell
  nearest its DFT position, the crystal's rigid translation removed), mean and median;
* speed: structures and atom-steps per second in the timed loop (after a warm-up).

Figures are given over each teacher's converged structures and over the structures every
teacher converged ("common"), which is the fair comparison. The unrelaxed input is reported
the same way as a baseline (what the DFT relaxation changed).

Teachers (``--teachers``; only models whose weights ship inside their wheel, nothing is
downloaded): the sevenn wheel's ``7net-0`` (SevenNet-0, 11Jul2024, today's teacher),
``7net-0_22May2024``, ``7net-l3i5``, ``7net-mf-0:PBE`` and ``7net-mf-0:R2SCAN`` (one
multi-fidelity model, two heads); the chgnet wheel's ``chgnet-0.3.0``, ``chgnet-0.2.0`` and
``chgnet-r2scan``. A teacher whose package is missing is skipped and said so in the JSON.
(MACE-MP, MatterSim, ORB, MatGL and fairchem fetch their weights at run time.)

    python benchmarks/bench_teachers.py --n 3 --device cpu --out /tmp/teachers.json   # smoke test
    python3 benchmarks/bench_teachers.py --n 2000 --device cuda --out $OUT/teachers_h200.json
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SEVENN_TEACHERS = ("7net-0", "7net-0_22May2024", "7net-l3i5", "7net-mf-0:PBE", "7net-mf-0:R2SCAN")
CHGNET_TEACHERS = ("chgnet-0.3.0", "chgnet-0.2.0", "chgnet-r2scan")
DEFAULT_TEACHERS = SEVENN_TEACHERS + CHGNET_TEACHERS
GPA = 1.0 / 160.21766208  # eV/Å^3 per GPa


class CHGNetTeacher:
    """CHGNet behind the batched teacher interface: one ``predict_structure`` call per batch.

    CHGNet builds its graphs from pymatgen structures on the host; its stress ``s`` is in GPa
    with ASE's sign (``CHGNetCalculator`` hands it to ASE as is, times the GPa factor).
    """

    def __init__(self, version: str, device: str):
        import chgnet
        from chgnet.model import CHGNet

        self.model = CHGNet.load(model_name=version, use_device=device, verbose=False)
        self.name = f"CHGNet {version}"
        self.version = chgnet.__version__

    def __call__(self, positions, cell, numbers, batch, n_atoms):
        from pymatgen.core import Lattice, Structure

        from e3relax_ase.training.distill.batched_results import TeacherOutput

        pos, cells, z = positions.cpu().numpy(), cell.cpu().numpy(), numbers.cpu().numpy()
        offsets = np.concatenate([[0], np.cumsum(n_atoms.cpu().numpy())])
        structures = [
            Structure(Lattice(cells[k]), z[offsets[k] : offsets[k + 1]], pos[offsets[k] : offsets[k + 1]], coords_are_cartesian=True) for k in range(len(cells))
        ]
        energy = np.full(len(structures), np.nan)
        forces = np.zeros((len(z), 3))
        stress = np.zeros((len(structures), 3, 3))
        try:
            predictions = self.model.predict_structure(structures, task="efs", batch_size=len(structures))
            if isinstance(predictions, dict):  # one structure in, one dict out
                predictions = [predictions]
        except (ValueError, RuntimeError):  # an isolated atom in one crystal fails the whole call
            predictions = None
        for k, s in enumerate(structures):
            if predictions is None:
                try:
                    p = self.model.predict_structure(s, task="efs")
                except (ValueError, RuntimeError):
                    continue
            else:
                p = predictions[k]
            n = len(s)
            energy[k] = float(p["e"]) * n
            forces[offsets[k] : offsets[k + 1]] = p["f"]
            stress[k] = np.asarray(p["s"]) * GPA

        def t(x):
            return torch.as_tensor(x, dtype=positions.dtype, device=positions.device)

        return TeacherOutput(t(energy), t(forces), t(stress))


def make_teacher(spec: str, device: str):
    """A batched teacher for a ``--teachers`` entry (see the module docstring)."""
    if spec.startswith("chgnet-"):
        return CHGNetTeacher(spec[len("chgnet-") :], device)
    from e3relax_ase.training.distill.teacher_sevennet import SevenNetTeacher

    model, _, modal = spec.partition(":")
    return SevenNetTeacher(model, device=device, modal=modal or None)


def select(n_pairs: int, n: int, seed: int) -> np.ndarray:
    """``n`` pair indices drawn without replacement with ``seed`` (all when n <= 0), sorted."""
    if n <= 0 or n >= n_pairs:
        return np.arange(n_pairs)
    return np.sort(np.random.default_rng(seed).permutation(n_pairs)[:n])


def inputs_of(pairs, indices):
    from e3relax_ase.training.distill.batched_results import RelaxInput

    for k in indices:
        s = pairs.atom_slice(int(k))
        yield RelaxInput(
            numbers=pairs.numbers[s].astype(np.int64),
            positions=pairs.pos_unrelaxed[s].astype(np.float64),
            cell=pairs.cell_unrelaxed[int(k)].astype(np.float64),
            key=int(k),
        )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def relax_with(teacher, pairs, indices, args) -> dict:
    """Relax the selected inputs with one teacher; results by pair index and the loop's rates."""
    from e3relax_ase.training.distill.batched_relax import relax_stream
    from e3relax_ase.training.distill.batched_results import FireParams, RelaxStats

    params = FireParams(fmax=args.fmax, max_steps=args.max_steps, fresh_check=True)
    warm = RelaxStats()
    for _ in relax_stream(
        inputs_of(pairs, indices[:8]), teacher, params, max_atoms=args.max_atoms, device=args.device, stats=warm, stop=lambda: warm.n_calls >= 3
    ):
        pass
    stats = RelaxStats()
    _sync(args.device)
    start = time.perf_counter()
    deadline = start + args.time_budget if args.time_budget else None
    results = {}
    for r in relax_stream(
        inputs_of(pairs, indices),
        teacher,
        params,
        max_atoms=args.max_atoms,
        device=args.device,
        stats=stats,
        stop=(lambda: time.perf_counter() > deadline) if deadline else None,
    ):
        results[int(r.key)] = r
    _sync(args.device)
    elapsed = time.perf_counter() - start
    return {
        "results": results,
        "timing": {
            "loop_s": round(elapsed, 2),
            "finished": stats.n_finished,
            "converged": stats.n_converged,
            "abandoned_at_time_budget": len(indices) - stats.n_finished,
            "teacher_calls": stats.n_calls,
            "structures_per_s": round(stats.n_finished / elapsed, 3),
            "atom_steps_per_s": round(stats.n_atom_evals / elapsed, 1),
            "mean_structures_per_call": round(stats.n_graph_evals / max(stats.n_calls, 1), 1),
        },
    }


def errors_against_dft(pairs, indices, positions, cells) -> dict:
    """Per-structure volume error (V / V_DFT - 1) and coordinate MAE (Å) of given geometries.

    Args:
        pairs: the NREL pairs (relaxed = DFT).
        indices: pair indices.
        positions: per index, [n_atoms, 3] Å; cells: per index, [3, 3].
    """
    from e3relax_ase.training.train.metrics import structure_errors

    if len(indices) == 0:
        return {"volume_rel": np.zeros(0), "coord_mae": np.zeros(0)}
    slices = [pairs.atom_slice(int(k)) for k in indices]
    n_atoms = torch.tensor([s.stop - s.start for s in slices])
    batch = torch.repeat_interleave(torch.arange(len(indices)), n_atoms)
    d = torch.float64
    errs = structure_errors(
        torch.tensor(np.concatenate(positions), dtype=d),
        torch.tensor(np.stack(cells), dtype=d),
        torch.tensor(np.concatenate([pairs.pos_relaxed[s] for s in slices]), dtype=d),
        torch.tensor(pairs.cell_relaxed[np.asarray(indices)], dtype=d),
        batch,
    )
    v_pred = np.abs(np.linalg.det(np.stack(cells)))
    v_dft = np.abs(np.linalg.det(pairs.cell_relaxed[np.asarray(indices)]))
    return {"volume_rel": v_pred / v_dft - 1.0, "coord_mae": errs["coord_mae"].numpy()}


def summary_of(errs: dict) -> dict:
    v, c = np.abs(errs["volume_rel"]) * 100, errs["coord_mae"]
    if len(c) == 0:
        return {"n": 0}
    return {
        "n": int(len(c)),
        "volume_abs_err_pct_median": round(float(np.median(v)), 3),
        "volume_abs_err_pct_p90": round(float(np.percentile(v, 90)), 3),
        "volume_err_pct_median_signed": round(float(np.median(errs["volume_rel"]) * 100), 3),
        "coord_mae_A_mean": round(float(np.mean(c)), 4),
        "coord_mae_A_median": round(float(np.median(c)), 4),
        "coord_mae_A_p90": round(float(np.percentile(c, 90)), 4),
    }


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    from importlib import metadata

    for name in ("ase", "sevenn", "chgnet", "pymatgen", "e3relax-ase"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine(device: str) -> dict:
    out = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default=str(ROOT / "data" / "nrel_zintl" / "train.npz"))
    parser.add_argument("--n", type=int, default=2000, help="inputs drawn with --seed (0 = the whole file)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teachers", default=",".join(DEFAULT_TEACHERS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fmax", type=float, default=0.02)
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--max-atoms", type=int, default=4096, help="atoms per teacher call")
    parser.add_argument("--time-budget", type=float, default=0.0, help="seconds per teacher (0 = none); unfinished structures are left out and counted")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from e3relax_ase.training.data.pairs import load_pairs

    if Path(args.pairs).name != "train.npz":
        print(f"warning: {args.pairs} is not a train split; the choice of teacher should see training data only", file=sys.stderr)
    pairs = load_pairs(args.pairs)
    indices = select(len(pairs), args.n, args.seed)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else f"main({argv})",
        "machine": machine(args.device),
        "versions": versions(),
        "inputs": {
            "pairs": str(Path(args.pairs).relative_to(ROOT)) if Path(args.pairs).resolve().is_relative_to(ROOT) else args.pairs,
            "n_pairs_in_file": len(pairs),
            "n_selected": int(len(indices)),
            "seed": args.seed,
            "atoms_selected": int(pairs.n_atoms[indices].sum()),
            "pair_ids_first": [str(i) for i in pairs.ids[indices[:5]]],
        },
        "relaxation": {
            "optimizer": "batched FIRE + Frechet cell filter (e3relax_ase.training.distill.batched_relax)",
            "fmax": args.fmax,
            "max_steps": args.max_steps,
            "fresh_check": True,
            "max_atoms_per_call": args.max_atoms,
        },
        "teachers": {},
    }
    baseline = errors_against_dft(
        pairs, indices, [pairs.pos_unrelaxed[pairs.atom_slice(int(k))] for k in indices], [pairs.cell_unrelaxed[int(k)] for k in indices]
    )
    report["unrelaxed_input"] = summary_of(baseline)
    converged_by: dict[str, set] = {}
    per_structure: dict[str, dict] = {}
    for spec in [t for t in args.teachers.split(",") if t]:
        try:
            teacher = make_teacher(spec, args.device)
        except (ImportError, ValueError, FileNotFoundError) as exc:
            report["teachers"][spec] = {"skipped": f"{type(exc).__name__}: {exc}"}
            print(f"{spec}: skipped ({exc})", file=sys.stderr)
            continue
        run = relax_with(teacher, pairs, indices, args)
        results = run["results"]
        statuses = {}
        for r in results.values():
            statuses[r.status] = statuses.get(r.status, 0) + 1
        converged = sorted(k for k, r in results.items() if r.converged)
        errs = errors_against_dft(pairs, converged, [results[k].positions for k in converged], [results[k].cell for k in converged])
        converged_by[spec] = set(converged)
        per_structure[spec] = {k: (v, c) for k, v, c in zip(converged, errs["volume_rel"], errs["coord_mae"])}
        steps = [results[k].n_steps for k in converged]
        report["teachers"][spec] = {
            "name": getattr(teacher, "name", spec),
            "package_version": getattr(teacher, "version", None),
            "statuses": statuses,
            "median_steps_converged": float(np.median(steps)) if steps else None,
            "converged": summary_of(errs),
            "speed": run["timing"],
        }
        print(json.dumps({spec: report["teachers"][spec]["converged"] | {"structures_per_s": run["timing"]["structures_per_s"]}}), flush=True)
        del teacher
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    common = sorted(set.intersection(*converged_by.values())) if converged_by else []
    report["common"] = {
        "n": len(common),
        "unrelaxed_input": summary_of(
            errors_against_dft(pairs, common, [pairs.pos_unrelaxed[pairs.atom_slice(k)] for k in common], [pairs.cell_unrelaxed[k] for k in common])
        ),
    }
    for spec, rows in per_structure.items():
        errs = {"volume_rel": np.array([rows[k][0] for k in common]), "coord_mae": np.array([rows[k][1] for k in common])}
        report["common"][spec] = summary_of(errs)
    report["per_structure"] = {
        "indices": [int(k) for k in indices],
        **{spec: {str(k): [round(float(v), 5), round(float(c), 5)] for k, (v, c) in rows.items()} for spec, rows in per_structure.items()},
    }

    lines = [f"{'teacher':<20} {'n':>6} {'|dV/V| med %':>13} {'p90 %':>8} {'dV/V med %':>11} {'coord MAE Å':>12} {'struct/s':>9}"]
    for spec, row in [("unrelaxed input", {"converged": report["common"]["unrelaxed_input"], "speed": {}})] + [
        (s, {"converged": report["common"].get(s, {}), "speed": report["teachers"][s].get("speed", {})}) for s in per_structure
    ]:
        c = row["converged"]
        if not c.get("n"):
            continue
        lines.append(
            f"{spec:<20} {c['n']:>6} {c['volume_abs_err_pct_median']:>13.2f} {c['volume_abs_err_pct_p90']:>8.2f} "
            f"{c['volume_err_pct_median_signed']:>11.2f} {c['coord_mae_A_mean']:>12.4f} "
            f"{row['speed'].get('structures_per_s', float('nan')):>9.2f}"
        )
    table = "\n".join(lines)
    report["table_common"] = table
    print(f"On the {len(common)} structures every teacher converged:\n{table}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
