"""Refinement with real forces after the one-shot prediction.

``refine`` runs an ASE optimizer (FIRE by default) on a cell filter (FrechetCellFilter by
default) with any ASE calculator, and reports convergence honestly. The optimizer's own test
measures forces through its filter, whose reference cell is where the refinement started (the
one-shot prediction): once the cell has moved, its atomic and cell rows differ from what a
filter built on the final structure reads (docs/relaxer.md has measured figures), and a result
could be called converged with an atomic force above fmax. So when the optimizer stops, the
final structure is evaluated afresh: the largest atomic force, and the cell rows
of a filter of the same kind built on the final structure (its virial over the atom count, as
ASE counts it), reported separately. ``converged`` is true only when both are below fmax. When
the optimizer stopped on its own test but the fresh one fails, it carries on from there with a
fresh filter, within the same ``steps``.
The drop-in optimizer that jumps to the prediction first is ``relax.optimizer``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from e3relax_ase.io.structures import (
    INFO_CALCULATOR,
    INFO_CONVERGED,
    INFO_FMAX,
    INFO_FMAX_ATOMS,
    INFO_FMAX_CELL,
    INFO_NSTEPS,
    vacuum_cell_mask,
)
from e3relax_ase.relax.threads import single_threaded_blas

logger = logging.getLogger(__name__)

OPTIMIZERS = ("FIRE", "BFGS", "LBFGS", "BFGSLineSearch", "LBFGSLineSearch", "MDMin", "GPMin")
CELL_FILTERS = ("FrechetCellFilter", "UnitCellFilter", "ExpCellFilter", "StrainFilter")


MAX_FRESH_STARTS = 10  # times the optimizer is restarted with a fresh filter after stopping too early


@dataclass
class RefineResult:
    """Outcome of a force-based refinement (every force evaluated afresh at the end)."""

    converged: bool  # fmax_atoms < target and (cell relaxed) fmax_cell < target
    nsteps: int  # optimizer steps taken, in all
    fmax: float  # eV/Å, max(fmax_atoms, fmax_cell)
    fmax_atoms: float | None = None  # eV/Å, largest atomic force (constraints applied)
    fmax_cell: float | None = None  # eV/Å, largest cell row of a filter built on the final structure; None without a cell filter


def optimizer_class(optimizer):
    """An ASE optimizer class from its name (e.g. "FIRE") or the class itself.

    Raises:
        ValueError: for an unknown name.
    """
    if isinstance(optimizer, type):
        return optimizer
    import ase.optimize

    if optimizer not in OPTIMIZERS or not hasattr(ase.optimize, optimizer):
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)} or an Optimizer class")
    return getattr(ase.optimize, optimizer)


def cell_filter_class(cell_filter):
    """An ASE cell filter class from its name or the class itself (None stays None).

    Raises:
        ValueError: for an unknown name.
    """
    if cell_filter is None or isinstance(cell_filter, type):
        return cell_filter
    import ase.filters

    if cell_filter not in CELL_FILTERS or not hasattr(ase.filters, cell_filter):
        raise ValueError(f"unknown cell filter {cell_filter!r}; use one of {', '.join(CELL_FILTERS)}, a class, or None")
    return getattr(ase.filters, cell_filter)


def make_calculator(calculator):
    """An ASE calculator from an instance, a zero-argument factory, or a name (emt, sevennet,
    chgnet, module:Class) resolved by ``e3relax_ase.relax.calculators.resolve_calculator``."""
    if isinstance(calculator, str):
        from e3relax_ase.relax.calculators import resolve_calculator

        return resolve_calculator(calculator)()
    if isinstance(calculator, type):
        return calculator()
    if hasattr(calculator, "get_potential_energy") or hasattr(calculator, "calculate"):
        return calculator
    if callable(calculator):
        return calculator()
    raise TypeError(f"refine= expects an ASE calculator, a factory or a name, got {type(calculator).__name__}")


def _largest_row(rows) -> float:
    rows = np.asarray(rows).reshape(-1, 3)
    return float(np.sqrt((rows**2).sum(axis=1)).max()) if len(rows) else 0.0


def fresh_forces(atoms, filter_class=None, **filter_kwargs) -> tuple[float, float | None]:
    """(largest atomic force, largest cell row of a ``filter_class`` built on ``atoms`` now),
    eV/Å; the second is None without a filter. The atoms' calculator must be attached.

    A filter built now has the current cell as its reference, so its cell rows are the
    virial (with the pressure term and mask) over its ``cell_factor``, whatever the path.
    """
    fmax_atoms = _largest_row(atoms.get_forces())
    if filter_class is None:
        return fmax_atoms, None
    rows = np.asarray(filter_class(atoms, **filter_kwargs).get_forces())
    cell_rows = rows[len(atoms) :] if len(rows) > len(atoms) else rows  # StrainFilter has only cell rows
    return fmax_atoms, _largest_row(cell_rows)


def refine(
    atoms,
    calculator,
    *,
    fmax: float = 0.05,
    steps: int = 500,
    optimizer="FIRE",
    cell_filter="FrechetCellFilter",
    relax_cell: bool = True,
    scalar_pressure: float = 0.0,
    mask=None,
    trajectory=None,
    logfile=None,
) -> RefineResult:
    """Relax ``atoms`` in place with real forces; records the outcome in ``atoms.info``.

    Args:
        atoms: the structure (usually the one-shot prediction); its constraints apply.
        calculator: an ASE calculator, a zero-argument factory, or a name (see ``make_calculator``).
        fmax: force target, eV/Å (cell rows of the filter count, as in ASE).
        steps: maximum optimizer steps.
        optimizer: name or ASE Optimizer class.
        cell_filter: name or class of the cell filter; None relaxes positions only.
        relax_cell: False relaxes positions only whatever ``cell_filter`` says.
        scalar_pressure: external pressure, eV/Å^3 (``ase.units.GPa`` converts).
        mask: the filter's mask; by default the vacuum axes of slabs / 2D cells are frozen.
        trajectory: path of an ASE trajectory file (``ase gui`` opens it), an open ASE
            Trajectory to append every step to (it is left open), or None.
        logfile: optimizer log ("-" for stdout, a path, or an open file), None for quiet.

    Returns:
        A :class:`RefineResult`.
    """
    atoms.calc = make_calculator(calculator)
    target = atoms
    filter_class = cell_filter_class(cell_filter) if relax_cell else None
    kwargs = {}  # the filter's
    if filter_class is not None:
        if mask is None:
            try:
                mask = vacuum_cell_mask(atoms.cell.array, atoms.pbc)
            except ValueError as exc:
                logger.warning("%s: relaxing positions only, not the cell", exc)
                filter_class = None
        if mask is not None:
            kwargs["mask"] = mask
        if scalar_pressure and filter_class is not None:
            kwargs["scalar_pressure"] = scalar_pressure
        if filter_class is not None:
            target = filter_class(atoms, **kwargs)
    elif scalar_pressure:
        logger.warning("scalar_pressure is ignored when the cell is not relaxed")
    optimizer = optimizer_class(optimizer)
    shared = trajectory is not None and hasattr(trajectory, "write")  # an open Trajectory: our observer writes to it
    nsteps = 0  # fresh (the forces afresh) is set by the first pass of the loop, which always runs
    with single_threaded_blas():  # the cell filter's 3x3 algebra (e3relax_ase/relax/threads.py)
        for start in range(MAX_FRESH_STARTS + 1):
            if start:  # the optimizer stopped on its own test, the fresh one disagrees: a fresh filter
                target = filter_class(atoms, **kwargs) if filter_class is not None else atoms
            # After a restart, later steps go to the same file (ASE would start it afresh).
            opt = optimizer(target, logfile=logfile, trajectory=None if shared else trajectory, append_trajectory=bool(start))
            if shared:
                opt.attach(trajectory.write, interval=1, atoms=atoms)
            try:
                opt.run(fmax=fmax, steps=steps - nsteps)
            finally:
                if getattr(opt, "trajectory", None) is not None and hasattr(opt.trajectory, "close") and not shared:
                    opt.trajectory.close()
            nsteps += int(opt.nsteps)
            fresh = fresh_forces(atoms, filter_class, **kwargs)
            if below_target(fresh, fmax) or nsteps >= steps:
                break
            logger.info("the optimizer stopped at fmax < %.3g on its own filter, but afresh %s: continuing", fmax, shown_forces(fresh))
    fmax_atoms, fmax_cell = fresh
    result = RefineResult(
        converged=below_target(fresh, fmax), nsteps=nsteps, fmax=max(fmax_atoms, fmax_cell or 0.0), fmax_atoms=fmax_atoms, fmax_cell=fmax_cell
    )
    record_refinement(atoms, result, calculator)
    if not result.converged:
        logger.warning("refinement stopped after %d of %d steps with %s > %.3g eV/Å (not converged)", nsteps, steps, shown_forces(fresh), fmax)
    return result


def below_target(fresh: tuple, fmax: float) -> bool:
    return all(value is None or value < fmax for value in fresh)


def shown_forces(fresh: tuple) -> str:
    fmax_atoms, fmax_cell = fresh
    return f"largest atomic force {fmax_atoms:.3g}" + ("" if fmax_cell is None else f", cell {fmax_cell:.3g} eV/Å")


def record_refinement(atoms, result: RefineResult, calculator=None) -> None:
    """Write the refinement outcome into ``atoms.info``."""
    atoms.info[INFO_CONVERGED] = bool(result.converged)
    atoms.info[INFO_NSTEPS] = int(result.nsteps)
    atoms.info[INFO_FMAX] = float(result.fmax)
    if result.fmax_atoms is not None:
        atoms.info[INFO_FMAX_ATOMS] = float(result.fmax_atoms)
    if result.fmax_cell is not None:
        atoms.info[INFO_FMAX_CELL] = float(result.fmax_cell)
    if calculator is not None:
        atoms.info[INFO_CALCULATOR] = calculator if isinstance(calculator, str) else type(atoms.calc).__name__


def same_kind_of_filter(obj) -> tuple:
    """(class, keyword arguments) of a new cell filter like ``obj``; (None, {}) for bare Atoms or
    a filter whose settings cannot be read (its cell rows are then not reported)."""
    from ase import Atoms

    if isinstance(obj, Atoms) or not hasattr(obj, "orig_cell"):
        return None, {}
    names = ("mask", "scalar_pressure", "hydrostatic_strain", "constant_volume")
    return type(obj), {name: getattr(obj, name) for name in names if hasattr(obj, name)}


def underlying_atoms(obj):
    """The Atoms under any stack of ASE filters."""
    from ase import Atoms

    while not isinstance(obj, Atoms) and hasattr(obj, "atoms"):
        obj = obj.atoms
    return obj
