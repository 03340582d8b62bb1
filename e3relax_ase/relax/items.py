"""What travels through ``relax_many``: the grouped options a caller may pass (``RefineOptions``,
``BatchBudget``), one structure on its way (``Item``), the options of a call
(``RelaxOptions``), and what stands in for a result that failed (``RelaxFailure``,
``PredictionError``, ``RaiseLater``), with the names messages give a structure."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from e3relax_ase.geometry.canonical import CanonicalForm
from e3relax_ase.geometry.crystal import CrystalArrays
from e3relax_ase.geometry.validation import StructureReport, structure_name
from e3relax_ase.io.structures import as_atoms


@dataclass(frozen=True)
class RefineOptions:
    """Refinement with real forces after the prediction (``relax_many(refine=...)``).

    Attributes:
        calculator: an ASE calculator, a factory returning one, or a name ("emt", "sevennet",
            "chgnet", "module:Class").
        fmax: force target, eV/Å, for the atoms and the cell rows.
        steps: optimizer step limit.
        optimizer, cell_filter: ASE names or classes (``cell_filter=None``: positions only).
        scalar_pressure: external pressure, eV/Å^3.
        mask: the cell filter's strain mask (None: every component, vacuum axes excepted).
        trajectory: a path ("{index}" and "{name}" are replaced per structure) or an open ASE
            Trajectory that every refinement appends to.
        logfile: the optimizer's log (a path or an open file).
    """

    calculator: Any
    fmax: float = 0.05
    steps: int = 500
    optimizer: Any = "FIRE"
    cell_filter: Any = "FrechetCellFilter"
    scalar_pressure: float = 0.0
    mask: Any = None
    trajectory: Any = None
    logfile: Any = None

    def optimizer_kwargs(self) -> dict:
        """Everything but the calculator, as ``refine.refine`` takes it."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "calculator"}


@dataclass(frozen=True)
class BatchBudget:
    """The most one forward pass of a call may hold; None: the relaxer's own limit. A structure
    over it still runs alone (validation keeps the relaxer's ``max_edges`` per structure)."""

    batch_size: int | None = None
    max_atoms: int | None = None
    max_edges: int | None = None


class PredictionError(RuntimeError):
    """A prediction failed its sanity checks and ``on_insane="raise"`` was asked for."""


@dataclass
class RelaxFailure:
    """Stands in the output of ``relax_many(errors="return")`` for a structure that failed."""

    index: int
    name: str
    error: Exception

    @property
    def message(self) -> str:
        return str(self.error)


@dataclass
class Item:
    """One structure on its way through ``relax_many``."""

    index: int
    given_name: str | None  # None: named on demand from ``source`` (messages only)
    kind: str  # "ase" | "pymatgen"
    atoms: Any  # the Atoms that receives the prediction
    pristine: Any  # an untouched copy of the input (trajectories only; None otherwise)
    arrays: CrystalArrays
    report: StructureReport | None  # None on a shell item (prepare.shell) until its worker's outcome
    form: CanonicalForm | None = None  # the canonical form validation searched
    edges: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # the graph's (src, dst, shift), local atom indices
    source: Any = None  # the input as given, to name it on demand
    vacuum: Any = None  # its vacuum.VacuumLayout when a periodic axis holds vacuum (``arrays`` are then as the network sees it)

    def seen_by_network(self, layout) -> None:
        """Record a vacuum layout: a slab's vacuum axes become non-periodic and its atoms sit
        together (an allowed cluster is relaxed as given, keeping its box)."""
        self.vacuum = layout
        if layout is not None and not layout.cluster:
            self.arrays = CrystalArrays(self.arrays.numbers, layout.positions, self.arrays.cell, layout.pbc)

    @property
    def validated(self) -> StructureReport:
        """``report``, which every item has by the time it reaches the network."""
        assert self.report is not None, f"item {self.index} was not validated"
        return self.report

    @property
    def keeps_cell(self) -> bool:
        """An allowed cluster keeps its box whatever ``relax_cell`` says."""
        return self.vacuum is not None and self.vacuum.cluster

    @property
    def name(self) -> str:
        if self.given_name is None:
            self.given_name = name_of(self.source, self.index)
        return self.given_name


@dataclass
class RelaxOptions:
    """The options of one ``relax_many`` call that every structure shares."""

    relax_cell: bool = True
    fix_symmetry: bool = False
    symprec: float = 0.01
    return_trajectory: bool = False
    on_insane: str = "warn"
    refine: RefineOptions | None = None  # None: no refinement
    pool: Any = None  # worker processes (num_workers > 0) that also judge predictions
    settings: Any = None  # the call's PreparationSettings
    provenance: dict = field(default_factory=dict)  # the info keys common to every structure (_provenance), once a call


@dataclass
class RaiseLater:
    """An exception to raise in order (``errors="raise"``) when its structure's turn comes."""

    error: Exception


def given_name(names, structure, index: int) -> str:
    """The caller's name for input ``index``, else one made from the structure."""
    return names[index] if names is not None else name_of(structure, index)


def name_of(structure, index: int | None) -> str:
    try:
        atoms, _ = as_atoms(structure)
    except Exception:
        return "structure" if index is None else f"structure {index}"
    return structure_name(atoms, index)
