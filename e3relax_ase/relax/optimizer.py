"""A drop-in ASE optimizer that starts from the one-shot prediction.

``OneShotThenOptimize`` is an ``ase.optimize.Optimizer``: it moves the structure to the
one-shot prediction before the first force call, then hands every step to FIRE/BFGS/...::

    opt = OneShotThenOptimize(FrechetCellFilter(atoms), optimizer="FIRE")
    opt.run(fmax=0.05)

It sits above both ``relaxer`` (the jump) and ``refine`` (the honest convergence record), so
that neither of those imports the other's caller.
"""

from __future__ import annotations

import logging

from ase.optimize.optimize import DEFAULT_MAX_STEPS, Optimizer

from e3relax_ase.relax.refine import (
    RefineResult,
    below_target,
    fresh_forces,
    optimizer_class,
    record_refinement,
    same_kind_of_filter,
    shown_forces,
    underlying_atoms,
)
from e3relax_ase.relax.relaxer import OneShotRelaxer

logger = logging.getLogger(__name__)


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
            self._relaxer = OneShotRelaxer(self._checkpoint)
        real = underlying_atoms(self.atoms)
        relax_cell = self._relax_cell if self._relax_cell is not None else real is not self.atoms and hasattr(self.atoms, "orig_cell")
        self._relaxer.relax(real, inplace=True, relax_cell=bool(relax_cell), fix_symmetry=self._fix_symmetry, symprec=self._symprec, on_insane="input")

    def step(self, f=None):
        if self._inner is None:
            # Built after the jump, so the optimizer's state starts at the predicted structure.
            self._inner = self._optimizer_class(self.atoms, logfile=None, trajectory=None, **self._optimizer_kwargs)
        self._inner.step()

    def _record(self, converged: bool, fmax: float) -> None:
        """Record the outcome, every force evaluated afresh (as ``refine`` does); the caller
        still gets the optimizer's own verdict from ``run``."""
        atoms = underlying_atoms(self.atoms)
        filter_class, filter_kwargs = same_kind_of_filter(self.atoms)
        fresh = fresh_forces(atoms, filter_class, **filter_kwargs)
        result = RefineResult(below_target(fresh, fmax), int(self.nsteps), max(fresh[0], fresh[1] or 0.0), *fresh)
        record_refinement(atoms, result)
        if converged and not result.converged:
            logger.warning("the optimizer converged on its own filter, but evaluated afresh %s > %.3g eV/Å", shown_forces(fresh), fmax)

    # ASE's Optimizer itself puts fmax before Dynamics' steps; these keep Optimizer's signature.
    def irun(self, fmax: float = 0.05, steps: int = DEFAULT_MAX_STEPS):  # type: ignore[override]
        self._jump()
        converged = False
        for converged in super().irun(fmax=fmax, steps=steps):
            yield converged
        self._record(converged, fmax)

    def run(self, fmax: float = 0.05, steps: int = DEFAULT_MAX_STEPS) -> bool:  # type: ignore[override]
        self._jump()
        converged = super().run(fmax=fmax, steps=steps)
        self._record(converged, fmax)
        if not converged:
            logger.warning("OneShotThenOptimize stopped at %d steps without reaching fmax %.3g", self.nsteps, fmax)
        return converged
