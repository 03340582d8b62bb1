"""What goes in and out of the batched FIRE driver (:mod:`.batched_relax`), and whether a
result is sane enough to keep.

The teacher's interface (:class:`Teacher`, :class:`TeacherOutput`), the FIRE settings
(:class:`FireParams`), one crystal in (:class:`RelaxInput`) and out (:class:`RelaxResult`),
the run's counters (:class:`RelaxStats`), and the checks a relaxed crystal must pass before it
becomes a training pair (:func:`check_sane`, :func:`min_interatomic_distance`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from e3relax_ase.keys import MIN_DISTANCE, VOLUME_RATIO_RANGE

__all__ = [
    "FireParams",
    "RelaxInput",
    "RelaxResult",
    "RelaxStats",
    "Teacher",
    "TeacherOutput",
    "check_sane",
    "min_interatomic_distance",
]


class TeacherOutput(NamedTuple):
    """What a teacher returns for a batch of crystals."""

    energy: torch.Tensor  # [n_graphs] | total energy per crystal | eV
    forces: torch.Tensor  # [n_atoms, 3] | Cartesian forces | eV/Å
    stress: torch.Tensor  # [n_graphs, 3, 3] | stress, ASE sign (positive = tensile) | eV/Å^3


class Teacher(Protocol):
    """A batched energy/force/stress model.

    Called with float64 tensors on the relaxation device: ``positions [n_atoms, 3]`` (Å),
    ``cell [n_graphs, 3, 3]`` (rows = lattice vectors), ``numbers [n_atoms]`` int64,
    ``batch [n_atoms]`` int64 (crystal of each atom, sorted) and ``n_atoms [n_graphs]`` int64.
    All crystals are periodic along all three axes. A crystal the teacher cannot evaluate
    may get a non-finite energy: the driver then drops it as failed.
    """

    def __call__(
        self,
        positions: torch.Tensor,
        cell: torch.Tensor,
        numbers: torch.Tensor,
        batch: torch.Tensor,
        n_atoms: torch.Tensor,
    ) -> TeacherOutput: ...


@dataclasses.dataclass(frozen=True)
class FireParams:
    """FIRE settings; the defaults are ASE 3.29's ``FIRE`` defaults and a 0.02 eV/Å target.

    ``volume_ratio_abort`` is not in ASE: a crystal whose volume leaves
    [1/volume_ratio_abort, volume_ratio_abort] times its input volume is stopped as diverged,
    to spend no more teacher calls on an exploding or collapsing cell.
    """

    fmax: float = 0.02  # eV/Å (cell rows in eV/Å too, after the 1/n_atoms scaling)
    max_steps: int = 500
    dt: float = 0.1
    max_step: float = 0.2  # largest norm of one crystal's whole DOF update
    dt_max: float = 1.0
    n_min: int = 5
    f_inc: float = 1.1
    f_dec: float = 0.5
    alpha_start: float = 0.1
    f_alpha: float = 0.99
    volume_ratio_abort: float = 4.0
    fresh_check: bool = False


@dataclasses.dataclass
class RelaxInput:
    """One crystal to relax (all periodic)."""

    numbers: np.ndarray  # [n_atoms] int
    positions: np.ndarray  # [n_atoms, 3] Å
    cell: np.ndarray  # [3, 3] rows = lattice vectors, Å
    key: Any = None  # the caller's identifier, handed back in the result


@dataclasses.dataclass
class RelaxResult:
    """Outcome of one relaxation; ``positions``/``cell`` are the last evaluated geometry."""

    key: Any
    numbers: np.ndarray  # [n_atoms]
    positions_init: np.ndarray  # [n_atoms, 3]
    cell_init: np.ndarray  # [3, 3]
    positions: np.ndarray  # [n_atoms, 3]
    cell: np.ndarray  # [3, 3]
    energy: float  # eV, at the returned geometry
    fmax: float  # eV/Å, generalised (cell rows included), at the returned geometry
    fmax_fresh: float  # eV/Å, max of Cartesian force and virial/n_atoms row norms
    n_steps: int  # FIRE steps taken (ASE's ``nsteps``)
    converged: bool  # fmax < FireParams.fmax was tested and held
    status: str  # "converged" | "max_steps" | "nonfinite" | "diverged"


@dataclasses.dataclass
class RelaxStats:
    """Counters a long run reports (teacher calls, atoms evaluated, crystals finished)."""

    n_calls: int = 0
    n_atom_evals: int = 0
    n_graph_evals: int = 0
    n_finished: int = 0
    n_converged: int = 0


# ---------------------------------------------------------------------------------------
# Sanity of a result
# ---------------------------------------------------------------------------------------


def min_interatomic_distance(positions: np.ndarray, cell: np.ndarray, cutoff: float = 3.0) -> float:
    """Shortest distance between two atoms or an atom and its periodic image (Å), periodic in 3D.

    Exact when it is below ``cutoff``; inf when no pair is that close. The neighbour search
    the network's graph uses (``graph.periodic_pairs``).
    """
    from e3relax_ase.geometry.graph import periodic_pairs

    distances = periodic_pairs(np.asarray(positions, dtype=float), np.asarray(cell, dtype=float), np.ones(3, dtype=bool), cutoff)[3]
    return float(distances.min()) if len(distances) else float("inf")


def check_sane(result: RelaxResult, *, min_distance: float = MIN_DISTANCE, volume_ratio: tuple[float, float] = VOLUME_RATIO_RANGE) -> str | None:
    """Why a relaxed crystal should not be kept, or None if it is sane.

    Checks: finite geometry and energy, positive cell determinant, shortest interatomic
    distance above ``min_distance`` and relaxed/input volume ratio inside ``volume_ratio``.
    """
    if not (np.all(np.isfinite(result.positions)) and np.all(np.isfinite(result.cell)) and np.isfinite(result.energy)):
        return "nonfinite"
    det = float(np.linalg.det(result.cell))
    det0 = float(np.linalg.det(result.cell_init))
    if det <= 0.0 or det0 <= 0.0:
        return "cell_handedness"
    ratio = det / det0
    if not (volume_ratio[0] <= ratio <= volume_ratio[1]):
        return "volume_ratio"
    if min_interatomic_distance(result.positions, result.cell, cutoff=min_distance + 0.5) <= min_distance:
        return "min_distance"
    return None
