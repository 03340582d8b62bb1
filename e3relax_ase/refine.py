"""Refinement with real forces after the one-shot prediction, and a drop-in ASE optimizer.

``refine`` runs an ASE optimizer (FIRE by default) on a cell filter (FrechetCellFilter by
default) with any ASE calculator, and reports convergence honestly: ``converged`` is the
optimizer's own force test, and ``fmax`` is recomputed at the final geometry from the same
generalised forces ASE tests (cell rows of the filter included).

``OneShotThenOptimize`` is an ``ase.optimize.Optimizer``: it moves the structure to the
one-shot prediction before the first force call, then hands every step to FIRE/BFGS/...::

    opt = OneShotThenOptimize(FrechetCellFilter(atoms), optimizer="FIRE")
    opt.run(fmax=0.05)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from ase.optimize.optimize import DEFAULT_MAX_STEPS, Optimizer

from e3relax_ase.structures import (
    INFO_CALCULATOR,
    INFO_CONVERGED,
    INFO_FMAX,
    INFO_NSTEPS,
    vacuum_cell_mask,
)
from e3relax_ase.threads import single_threaded_blas

logger = logging.getLogger(__name__)

OPTIMIZERS = ("FIRE", "BFGS", "LBFGS", "BFGSLineSearch", "LBFGSLineSearch", "MDMin", "GPMin")
CELL_FILTERS = ("FrechetCellFilter", "UnitCellFilter", "ExpCellFilter", "StrainFilter")


@dataclass
class RefineResult:
    """Outcome of a force-based refinement."""

    converged: bool  # the optimizer's force test passed (fmax < target)
    nsteps: int  # optimizer steps taken
    fmax: float  # eV/Å, final largest generalised force (cell rows of the filter included)


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
    chgnet, module:Class) resolved by ``e3relax_ase.training.calculators.resolve_calculator``."""
    if isinstance(calculator, str):
        from e3relax_ase.training.calculators import resolve_calculator

        return resolve_calculator(calculator)()
    if isinstance(calculator, type):
        return calculator()
    if hasattr(calculator, "get_potential_energy") or hasattr(calculator, "calculate"):
        return calculator
    if callable(calculator):
        return calculator()
    raise TypeError(f"refine= expects an ASE calculator, a factory or a name, got {type(calculator).__name__}")


def _max_force(optimizable_object) -> float:
    forces = np.asarray(optimizable_object.get_forces())
    return float(np.sqrt((forces**2).sum(axis=1)).max()) if len(forces) else 0.0


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
        trajectory: path of an ASE trajectory file (``ase gui`` opens it), or None.
        logfile: optimizer log ("-" for stdout), None for quiet.

    Returns:
        A :class:`RefineResult`.
    """
    atoms.calc = make_calculator(calculator)
    target = atoms
    filter_class = cell_filter_class(cell_filter) if relax_cell else None
    if filter_class is not None:
        kwargs = {}
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
    opt = optimizer_class(optimizer)(target, logfile=logfile, trajectory=trajectory)
    try:
        with single_threaded_blas():  # the cell filter's 3x3 algebra (e3relax_ase/threads.py)
            converged = bool(opt.run(fmax=fmax, steps=steps))
    finally:
        if getattr(opt, "trajectory", None) is not None and hasattr(opt.trajectory, "close"):
            opt.trajectory.close()
    final = _max_force(target)
    result = RefineResult(converged=converged, nsteps=int(opt.nsteps), fmax=final)
    record_refinement(atoms, result, calculator)
    if not converged:
        logger.warning("refinement stopped at the maximum of %d steps with fmax %.3g eV/Å > %.3g (not converged)", steps, final, fmax)
    return result


def record_refinement(atoms, result: RefineResult, calculator=None) -> None:
    """Write the refinement outcome into ``atoms.info``."""
    atoms.info[INFO_CONVERGED] = bool(result.converged)
    atoms.info[INFO_NSTEPS] = int(result.nsteps)
    atoms.info[INFO_FMAX] = float(result.fmax)
    if calculator is not None:
        atoms.info[INFO_CALCULATOR] = calculator if isinstance(calculator, str) else type(atoms.calc).__name__


def _underlying_atoms(obj):
    """The Atoms under any stack of ASE filters."""
    from ase import Atoms

    while not isinstance(obj, Atoms) and hasattr(obj, "atoms"):
        obj = obj.atoms
    return obj


class OneShotThenOptimize(Optimizer):
    """Jump to the one-shot prediction before the first force call, then optimize with FIRE/BFGS/...

    A drop-in ASE optimizer: ``OneShotThenOptimize(atoms_or_filter).run(fmax=0.05)``. Given a
    cell filter (e.g. ``FrechetCellFilter(atoms)``) the predicted cell is applied too; given
    bare Atoms only the positions move (the predicted fractional coordinates in the input cell).
    Both ``run`` and ``irun`` jump first (ASE's ``Optimizer.run`` does not go through
    ``self.irun``). An insane prediction is skipped (a warning says so) and the optimizer starts
    from the input. At the end ``atoms.info`` records converged, nsteps and fmax.
    """

    def __init__(
        self,
        atoms,
        optimizer="FIRE",
        relaxer=None,
        checkpoint: str = "default",
        relax_cell: bool | None = None,
        fix_symmetry: bool = False,
        symprec: float = 0.01,
        restart=None,
        logfile="-",
        trajectory=None,
        append_trajectory: bool = False,
        **optimizer_kwargs,
    ):
        """
        Args:
            atoms: Atoms, or a filter over Atoms (a cell filter relaxes the cell too).
            optimizer: name or class of the optimizer that takes over after the jump.
            relaxer: a ``OneShotRelaxer``; by default one is built from ``checkpoint``.
            checkpoint: used when ``relaxer`` is None.
            relax_cell: apply the predicted cell; default True when ``atoms`` is a cell filter.
            fix_symmetry, symprec: passed to the relaxer for the jump.
            restart, logfile, trajectory, append_trajectory: as for any ASE optimizer.
            **optimizer_kwargs: passed to the optimizer (e.g. ``maxstep``).
        """
        super().__init__(atoms, restart=restart, logfile=logfile, trajectory=trajectory, append_trajectory=append_trajectory)
        self._optimizer_class = optimizer_class(optimizer)
        self._optimizer_kwargs = optimizer_kwargs
        self._relaxer = relaxer
        self._checkpoint = checkpoint
        self._relax_cell = relax_cell
        self._fix_symmetry = fix_symmetry
        self._symprec = symprec
        self._inner = None
        self.jumped = False

    def todict(self):
        description = super().todict()
        description["then"] = self._optimizer_class.__name__
        return description

    def _jump(self) -> None:
        if self.jumped:
            return
        self.jumped = True
        if self._relaxer is None:
            from e3relax_ase.relaxer import OneShotRelaxer

            self._relaxer = OneShotRelaxer(self._checkpoint)
        real = _underlying_atoms(self.atoms)
        relax_cell = self._relax_cell if self._relax_cell is not None else real is not self.atoms and hasattr(self.atoms, "orig_cell")
        self._relaxer.relax(
            real, inplace=True, relax_cell=bool(relax_cell), fix_symmetry=self._fix_symmetry, symprec=self._symprec, on_insane="input"
        )

    def step(self, f=None):
        if self._inner is None:
            # Built after the jump, so the optimizer's state starts at the predicted structure.
            self._inner = self._optimizer_class(self.atoms, logfile=None, trajectory=None, **self._optimizer_kwargs)
        self._inner.step()

    def _record(self, converged: bool) -> None:
        gradient = self.optimizable.get_gradient().reshape(-1, 3)
        fmax = float(np.sqrt((gradient**2).sum(axis=1)).max()) if len(gradient) else 0.0
        record_refinement(_underlying_atoms(self.atoms), RefineResult(bool(converged), int(self.nsteps), fmax))

    def irun(self, fmax: float = 0.05, steps: int = DEFAULT_MAX_STEPS):
        self._jump()
        converged = False
        for converged in super().irun(fmax=fmax, steps=steps):
            yield converged
        self._record(converged)

    def run(self, fmax: float = 0.05, steps: int = DEFAULT_MAX_STEPS) -> bool:
        self._jump()
        converged = super().run(fmax=fmax, steps=steps)
        self._record(converged)
        if not converged:
            logger.warning("OneShotThenOptimize stopped at %d steps without reaching fmax %.3g", self.nsteps, fmax)
        return converged
