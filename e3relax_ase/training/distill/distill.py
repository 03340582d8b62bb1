"""Distil (unrelaxed, relaxed) training pairs from seed crystals with any ASE calculator.

Each seed is perturbed into user-like inputs (:mod:`e3relax_ase.training.data.perturb`), every input
is relaxed with FIRE on a ``FrechetCellFilter`` (positions and cell) until the largest generalised
force is <= ``fmax``, and only converged, sane results are kept.

Convergence is measured honestly: after FIRE stops, the forces are recomputed on a *fresh*
``FrechetCellFilter`` (reference cell = final cell), whose cell rows are exactly virial / n_atoms;
if that exceeds ``fmax`` FIRE continues from there (up to ``steps`` in total). A pair is kept only
if every atomic force and every row of virial / n_atoms is <= ``fmax`` in eV/Å.

Sanity rules for a kept pair: finite positions and cells, det(cell) > 0 for both structures, no
interatomic distance (periodic images included) below ``keys.MIN_DISTANCE`` in either structure,
and V_relaxed / V_unrelaxed in ``keys.VOLUME_RATIO_RANGE``.

Runs inline with ``n_workers=1``, else over ``n_workers`` spawned processes (CPU); each worker
builds its calculator once from the picklable factory. Inputs are drawn in the parent before any
work is dispatched, so results do not depend on ``n_workers``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from e3relax_ase.keys import MIN_DISTANCE, VOLUME_RATIO_RANGE
from e3relax_ase.relax.calculators import resolve_calculator
from e3relax_ase.relax.threads import single_threaded_blas
from e3relax_ase.training.data.pairs import PairSet
from e3relax_ase.training.data.perturb import make_user_like_inputs

logger = logging.getLogger(__name__)

_MAX_ROUNDS = 10  # fresh-filter restarts of FIRE; each one makes at least one step

_WORKER: dict = {}


@dataclass
class DistillReport:
    """What :func:`make_pairs` did.

    Attributes:
        teacher: calculator name.
        n_seeds: seeds given.
        n_inputs: perturbed inputs relaxed.
        n_kept: pairs returned.
        rejected: reason -> count (``not converged``, ``input too close``, ``error``,
            ``element not supported by teacher``, a sanity rule, ...).
        fmax: force criterion, eV/Å.
        steps: largest number of FIRE steps per input.
        median_steps: median FIRE steps over kept pairs.
        n_workers: processes used.
        wall_s: wall time, s.
    """

    teacher: str
    n_seeds: int
    n_inputs: int
    n_kept: int
    rejected: dict = field(default_factory=dict)
    fmax: float = 0.02
    steps: int = 0
    median_steps: float = float("nan")
    n_workers: int = 1
    wall_s: float = 0.0

    def as_dict(self) -> dict:
        """JSON-able dict of the report."""
        return asdict(self)

    def summary(self) -> str:
        """One line for logs and the CLI."""
        rejected = ", ".join(f"{k}: {v}" for k, v in sorted(self.rejected.items())) or "none"
        return (
            f"{self.n_kept}/{self.n_inputs} pairs kept from {self.n_seeds} seeds with {self.teacher} "
            f"(fmax {self.fmax} eV/Å, median {self.median_steps:g} steps, {self.wall_s:.1f} s on "
            f"{self.n_workers} worker(s)); rejected: {rejected}"
        )


def max_generalised_force(atoms) -> float:
    """Largest row norm of a fresh ``FrechetCellFilter``'s forces (atoms and virial / n_atoms).

    Args:
        atoms: ``ase.Atoms`` with a calculator.

    Returns:
        eV/Å.
    """
    from ase.filters import FrechetCellFilter

    forces = FrechetCellFilter(atoms).get_forces()  # [n_atoms + 3, 3]
    return float(np.linalg.norm(forces, axis=1).max())


def relax_structure(atoms, calculator, fmax: float = 0.02, steps: int = 500) -> tuple:
    """Relax positions and cell with FIRE + FrechetCellFilter until honestly converged.

    Args:
        atoms: ``ase.Atoms`` (not modified).
        calculator: an ASE calculator (reused; it is attached to a copy).
        fmax: force criterion on atoms and virial / n_atoms, eV/Å.
        steps: most FIRE steps in total.

    Returns:
        ``(relaxed_atoms, converged, n_steps, fmax_final)``.
    """
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    atoms = atoms.copy()
    atoms.calc = calculator
    n_steps = 0
    with single_threaded_blas():
        for _ in range(_MAX_ROUNDS):
            force = max_generalised_force(atoms)
            if force <= fmax or n_steps >= steps:
                break
            optimizer = FIRE(FrechetCellFilter(atoms), logfile=None)
            optimizer.run(fmax=fmax, steps=steps - n_steps)
            n_steps += max(int(optimizer.nsteps), 1)
        else:
            force = max_generalised_force(atoms)
    return atoms, force <= fmax, n_steps, force


def min_distance(atoms) -> float:
    """Shortest interatomic distance including periodic images (inf if none below 3 Å)."""
    from e3relax_ase.geometry.validation import neighbor_pairs

    distances = neighbor_pairs(atoms.positions, atoms.cell.array, atoms.pbc, 3.0)[2]
    return float(distances.min()) if len(distances) else float("inf")


def sanity_problem(unrelaxed, relaxed) -> str | None:
    """Why a relaxed pair is not sane, or None (rules in the module docstring)."""
    for atoms in (unrelaxed, relaxed):
        if not (np.isfinite(atoms.positions).all() and np.isfinite(atoms.cell.array).all()):
            return "not finite"
        if np.linalg.det(atoms.cell.array) <= 0:
            return "det(cell) <= 0"
    if min_distance(relaxed) < MIN_DISTANCE:
        return "atoms too close"
    ratio = relaxed.get_volume() / unrelaxed.get_volume()
    if not VOLUME_RATIO_RANGE[0] <= ratio <= VOLUME_RATIO_RANGE[1]:
        return "volume ratio out of range"
    return None


def _relax_task(args) -> dict:
    """Relax one input with the worker's calculator; never raises."""
    index, atoms, fmax, steps = args
    start = time.perf_counter()
    try:
        relaxed, converged, n_steps, force = relax_structure(atoms, _WORKER["calculator"], fmax, steps)
        energy = float(relaxed.get_potential_energy()) / len(relaxed)
        result = {
            "positions": relaxed.positions.copy(),
            "cell": relaxed.cell.array.copy(),
            "energy_per_atom": energy,
            "converged": bool(converged),
            "steps": int(n_steps),
            "fmax_final": force,
        }
    except Exception as exc:  # a teacher may fail in many ways; record and go on
        logger.warning("input %d failed: %s", index, exc)
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["index"] = index
    result["wall_s"] = time.perf_counter() - start
    return result


def _init_worker(factory: Callable) -> None:
    _WORKER["calculator"] = factory()


def _run_all(tasks: list, factory: Callable, n_workers: int) -> list:
    if n_workers <= 1 or len(tasks) <= 1:
        _init_worker(factory)
        try:
            return [_relax_task(t) for t in tasks]
        finally:
            _WORKER.clear()
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the teacher may hold threads (torch) or a GPU context.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(n_workers, mp_context=context, initializer=_init_worker, initargs=(factory,)) as pool:
        return list(pool.map(_relax_task, tasks, chunksize=1))


def _unique_ids(ids: Iterable[str]) -> list:
    seen: Counter = Counter()
    out = []
    for pair_id in ids:
        seen[pair_id] += 1
        out.append(pair_id if seen[pair_id] == 1 else f"{pair_id}_{seen[pair_id] - 1}")
    return out


def make_pairs(
    seeds: Sequence,
    calculator: str | Callable = "emt",
    n_per_seed: int = 1,
    rng: np.random.Generator | int = 0,
    fmax: float = 0.02,
    steps: int = 500,
    n_workers: int = 1,
    strain: float = 0.04,
    rattle: float = 0.1,
    volume_range: Sequence[float] | None = None,
    substitute: float = 0.0,
    allowed_elements: Iterable[int] | None = None,
    teacher: str | None = None,
) -> tuple:
    """Perturb seeds, relax them with a teacher calculator and keep converged, sane pairs.

    Args:
        seeds: relaxed ``ase.Atoms`` (``info["seed_id"]`` names them); not modified.
        calculator: a name for :func:`resolve_calculator` or a zero-argument factory returning an
            ASE calculator (picklable when ``n_workers > 1``).
        n_per_seed: perturbed inputs per seed.
        rng: generator or integer seed for the perturbations.
        fmax: force criterion, eV/Å (atoms and virial / n_atoms).
        steps: most FIRE steps per input.
        n_workers: processes; 1 runs inline.
        strain: symmetric strain magnitude (see :func:`perturb.strain`).
        rattle: Gaussian rattle per component, Å.
        volume_range: ``(low, high)`` volume factor, or None.
        substitute: probability of an element substitution per input.
        allowed_elements: elements substitutions may introduce; default: the teacher's
            supported elements when it declares them (EMT), else all.
        teacher: name recorded in the pairs; default: the factory's ``name``.

    Returns:
        ``(PairSet, DistillReport)``. Each pair's ``info`` holds ``seed_id``, ``perturbation``,
        ``steps``, ``converged``, ``teacher``, ``fmax``, ``fmax_final``.

    Raises:
        ValueError, ImportError: for a bad calculator name or perturbation parameters.
    """
    start = time.perf_counter()
    factory = resolve_calculator(calculator) if isinstance(calculator, str) else calculator
    teacher = teacher or getattr(factory, "name", None) or repr(factory)
    if allowed_elements is None:
        allowed_elements = getattr(factory, "elements", None)
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    inputs = make_user_like_inputs(
        seeds,
        n_per_seed,
        generator,
        strain_magnitude=strain,
        rattle_stdev=rattle,
        volume_range=volume_range,
        substitute_probability=substitute,
        allowed_elements=allowed_elements,
    )
    rejected: Counter = Counter()
    supported = getattr(factory, "elements", None)
    tasks = []
    for i, atoms in enumerate(inputs):
        if supported is not None and not set(atoms.numbers.tolist()) <= set(supported):
            rejected["element not supported by teacher"] += 1
        elif min_distance(atoms) < MIN_DISTANCE:
            rejected["input too close"] += 1
        else:
            tasks.append((i, atoms, float(fmax), int(steps)))
    logger.info("relaxing %d inputs with %s on %d worker(s)", len(tasks), teacher, n_workers)
    results = _run_all(tasks, factory, n_workers)

    pairs, infos, ids, kept_steps = [], [], [], []
    for result in sorted(results, key=lambda r: r["index"]):
        unrelaxed = inputs[result["index"]]
        if "error" in result:
            rejected["error"] += 1
            continue
        if not result["converged"]:
            rejected["not converged"] += 1
            continue
        relaxed = unrelaxed.copy()
        relaxed.set_cell(result["cell"], scale_atoms=False)
        relaxed.positions = result["positions"]
        problem = sanity_problem(unrelaxed, relaxed)
        if problem:
            rejected[problem] += 1
            continue
        from ase.calculators.singlepoint import SinglePointCalculator

        relaxed.calc = SinglePointCalculator(relaxed, energy=result["energy_per_atom"] * len(relaxed))
        pairs.append((unrelaxed, relaxed))
        kept_steps.append(result["steps"])
        ids.append(f"{unrelaxed.info['seed_id']}-{result['index'] % max(n_per_seed, 1)}")
        infos.append(
            {
                "seed_id": unrelaxed.info["seed_id"],
                "perturbation": unrelaxed.info["perturbation"],
                "steps": result["steps"],
                "converged": True,
                "teacher": teacher,
                "fmax": float(fmax),
                "fmax_final": round(result["fmax_final"], 6),
            }
        )
    metadata = {
        "teacher": teacher,
        "made_by": "e3relax_ase.training.distill.distill.make_pairs",
        "relaxation": {"optimizer": "FIRE", "filter": "FrechetCellFilter", "fmax": float(fmax), "steps": int(steps)},
        "perturbation": {"strain": strain, "rattle": rattle, "volume_range": volume_range, "substitute": substitute},
        "rng_seed": rng if isinstance(rng, int) else None,
    }
    pairset = PairSet.from_atoms_pairs(pairs, ids=_unique_ids(ids), info=infos, metadata=metadata)
    report = DistillReport(
        teacher=teacher,
        n_seeds=len(seeds),
        n_inputs=len(inputs),
        n_kept=len(pairset),
        rejected=dict(rejected),
        fmax=float(fmax),
        steps=int(steps),
        median_steps=float(np.median(kept_steps)) if kept_steps else float("nan"),
        n_workers=int(n_workers),
        wall_s=time.perf_counter() - start,
    )
    logger.info("%s", report.summary())
    return pairset, report
