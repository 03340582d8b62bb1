"""Batched FIRE with a Frechet cell filter: many crystals relaxed at once through one teacher call.

Every crystal carries its own FIRE state (velocity, dt, alpha, count of downhill steps) and
converges on its own. Finished crystals leave the batch and new ones stream in, so a GPU
teacher always sees a full batch.

The degrees of freedom and the step follow ASE 3.29 ``FIRE(FrechetCellFilter(atoms))``
with its defaults, so that a crystal relaxed here ends where ASE would take it:

* the deformation gradient F maps the input cell to the current one,
  ``cell = cell_init @ F.T`` (rows are lattice vectors, see ``e3relax_ase.keys``);
* atom DOFs are positions pulled back to the input cell, ``positions = positions_ref @ F.T``,
  and their forces are ``forces @ F``;
* cell DOFs are ``n_atoms * logm(F)`` (ASE's default ``exp_cell_factor``); their force is the
  derivative of the energy along the matrix logarithm, from the virial ``-volume * stress``,
  divided by ``n_atoms``;
* fmax is the largest row norm of those (n_atoms + 3) x 3 generalised forces, cell rows
  included, and a crystal has converged when fmax < the target (strict, as ASE).

The teacher is any callable mapping a batch to energies, forces and stresses (ASE sign:
positive = tensile, eV/Å^3); see ``Teacher``. State is float64; teachers may compute in float32.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from e3relax_ase.keys import MIN_DISTANCE, VOLUME_RATIO_RANGE

logger = logging.getLogger(__name__)

__all__ = [
    "FireParams",
    "RelaxInput",
    "RelaxResult",
    "RelaxStats",
    "Teacher",
    "TeacherOutput",
    "check_sane",
    "min_interatomic_distance",
    "relax_all",
    "relax_stream",
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
# Frechet cell filter maths (batched)
# ---------------------------------------------------------------------------------------


def _segment_sum(values: torch.Tensor, batch: torch.Tensor, n_graphs: int) -> torch.Tensor:
    """Sum per-atom rows [n_atoms, ...] into [n_graphs] (all trailing dims summed)."""
    flat = values.reshape(values.shape[0], -1).sum(dim=1)
    out = torch.zeros(n_graphs, dtype=values.dtype, device=values.device)
    return out.index_add_(0, batch, flat)


def _segment_max(values: torch.Tensor, batch: torch.Tensor, n_graphs: int) -> torch.Tensor:
    out = torch.full((n_graphs,), -torch.inf, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, batch, values, reduce="amax", include_self=True)


def expm_frechet_adjoint(log_deform: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """G with G[m, n] = <L(A, E_mn), U> for every unit matrix E_mn, batched.

    L(A, E) is the Frechet derivative of the matrix exponential at A along E. Since
    <L(A, E), U> = <E, L(A^T, U)> (Frobenius product), G = L(A^T, U), read off the upper-right
    block of expm([[A^T, U], [0, A^T]]): one 6x6 exponential per crystal instead of ASE's nine
    ``expm_frechet`` calls.

    Args:
        log_deform: A = logm(F), [n_graphs, 3, 3].
        direction: U, [n_graphs, 3, 3].

    Returns:
        G, [n_graphs, 3, 3].
    """
    n_graphs = log_deform.shape[0]
    block = torch.zeros(n_graphs, 6, 6, dtype=log_deform.dtype, device=log_deform.device)
    a_t = log_deform.transpose(1, 2)
    block[:, :3, :3] = a_t
    block[:, 3:, 3:] = a_t
    block[:, :3, 3:] = direction
    return torch.linalg.matrix_exp(block)[:, :3, 3:]


def frechet_forces(
    forces: torch.Tensor,
    stress: torch.Tensor,
    cell: torch.Tensor,
    log_deform: torch.Tensor,
    deform: torch.Tensor,
    batch: torch.Tensor,
    n_atoms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised forces on the Frechet-filter DOFs (ASE ``get_forces_frechet``).

    Args:
        forces: Cartesian forces [n_atoms, 3], eV/Å.
        stress: stress [n_graphs, 3, 3], ASE sign, eV/Å^3.
        cell: current cell [n_graphs, 3, 3] (rows).
        log_deform: logm(F) [n_graphs, 3, 3].
        deform: F [n_graphs, 3, 3].
        batch: [n_atoms] crystal index.
        n_atoms: [n_graphs] atoms per crystal (the exp_cell_factor).

    Returns:
        (forces_ref [n_atoms, 3], forces_cell [n_graphs, 3, 3]).
    """
    volume = torch.linalg.det(cell).abs()  # [n_graphs]
    virial = -volume[:, None, None] * stress
    ucf_grad = virial @ torch.linalg.inv(deform.transpose(1, 2))
    forces_cell = expm_frechet_adjoint(log_deform, ucf_grad) / n_atoms.to(stress.dtype)[:, None, None]
    forces_ref = torch.einsum("ni,nij->nj", forces, deform[batch])
    return forces_ref, forces_cell


def fresh_fmax(forces: torch.Tensor, stress: torch.Tensor, cell: torch.Tensor, batch: torch.Tensor, n_atoms: torch.Tensor) -> torch.Tensor:
    """fmax on a Frechet filter whose reference is the current cell (F = I), per crystal.

    Returns:
        [n_graphs] max over Cartesian force rows and rows of virial / n_atoms, eV/Å.
    """
    volume = torch.linalg.det(cell).abs()
    virial = -volume[:, None, None] * stress / n_atoms.to(stress.dtype)[:, None, None]
    f_atoms = _segment_max(torch.linalg.norm(forces, dim=1), batch, cell.shape[0])
    return torch.maximum(f_atoms, torch.linalg.norm(virial, dim=2).amax(dim=1))


# ---------------------------------------------------------------------------------------
# Batched FIRE state
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class _FireState:
    """Per-crystal FIRE state of the crystals now in the batch (device tensors)."""

    numbers: torch.Tensor  # [n_atoms] int64
    batch: torch.Tensor  # [n_atoms] int64
    n_atoms: torch.Tensor  # [n_graphs] int64
    positions_init: torch.Tensor  # [n_atoms, 3]
    cell_init: torch.Tensor  # [n_graphs, 3, 3]
    positions_ref: torch.Tensor  # [n_atoms, 3] | positions pulled back to cell_init
    cell_dof: torch.Tensor  # [n_graphs, 3, 3] | n_atoms * logm(F)
    vel_atoms: torch.Tensor  # [n_atoms, 3]
    vel_cell: torch.Tensor  # [n_graphs, 3, 3]
    dt: torch.Tensor  # [n_graphs]
    alpha: torch.Tensor  # [n_graphs]
    n_pos: torch.Tensor  # [n_graphs] int64 | downhill steps since the last reset (ASE Nsteps)
    n_steps: torch.Tensor  # [n_graphs] int64 | FIRE steps taken
    started: torch.Tensor  # [n_graphs] bool | False until the first step (ASE vel is None)
    keys: list

    @property
    def n_graphs(self) -> int:
        return len(self.keys)

    def log_deform(self) -> torch.Tensor:
        return self.cell_dof / self.n_atoms.to(self.cell_dof.dtype)[:, None, None]

    def geometry(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Current (positions, cell, F, logm F)."""
        log_f = self.log_deform()
        deform = torch.linalg.matrix_exp(log_f)
        cell = self.cell_init @ deform.transpose(1, 2)
        positions = torch.einsum("ni,nji->nj", self.positions_ref, deform[self.batch])
        return positions, cell, deform, log_f


def _empty_state(device: torch.device, dtype: torch.dtype) -> _FireState:
    return _FireState(
        numbers=torch.zeros(0, device=device, dtype=torch.int64),
        batch=torch.zeros(0, device=device, dtype=torch.int64),
        n_atoms=torch.zeros(0, device=device, dtype=torch.int64),
        positions_init=torch.zeros(0, 3, device=device, dtype=dtype),
        cell_init=torch.zeros(0, 3, 3, device=device, dtype=dtype),
        positions_ref=torch.zeros(0, 3, device=device, dtype=dtype),
        cell_dof=torch.zeros(0, 3, 3, device=device, dtype=dtype),
        vel_atoms=torch.zeros(0, 3, device=device, dtype=dtype),
        vel_cell=torch.zeros(0, 3, 3, device=device, dtype=dtype),
        dt=torch.zeros(0, device=device, dtype=dtype),
        alpha=torch.zeros(0, device=device, dtype=dtype),
        n_pos=torch.zeros(0, device=device, dtype=torch.int64),
        n_steps=torch.zeros(0, device=device, dtype=torch.int64),
        started=torch.zeros(0, device=device, dtype=torch.bool),
        keys=[],
    )


def _append(state: _FireState, items: list[RelaxInput], params: FireParams) -> _FireState:
    """New crystals join the batch with a fresh FIRE state (F = identity)."""
    if not items:
        return state
    dev, dt = state.cell_init.device, state.cell_init.dtype
    n_new = torch.tensor([len(x.numbers) for x in items], device=dev, dtype=torch.int64)
    numbers = torch.as_tensor(np.concatenate([np.asarray(x.numbers) for x in items]), device=dev)
    positions = torch.as_tensor(np.concatenate([np.asarray(x.positions) for x in items]), device=dev, dtype=dt)
    cells = torch.as_tensor(np.stack([np.asarray(x.cell) for x in items]), device=dev, dtype=dt)
    batch_new = torch.repeat_interleave(torch.arange(len(items), device=dev), n_new) + state.n_graphs
    g = len(items)
    return _FireState(
        numbers=torch.cat([state.numbers, numbers.to(torch.int64)]),
        batch=torch.cat([state.batch, batch_new]),
        n_atoms=torch.cat([state.n_atoms, n_new]),
        positions_init=torch.cat([state.positions_init, positions]),
        cell_init=torch.cat([state.cell_init, cells]),
        positions_ref=torch.cat([state.positions_ref, positions]),
        cell_dof=torch.cat([state.cell_dof, torch.zeros(g, 3, 3, device=dev, dtype=dt)]),
        vel_atoms=torch.cat([state.vel_atoms, torch.zeros_like(positions)]),
        vel_cell=torch.cat([state.vel_cell, torch.zeros(g, 3, 3, device=dev, dtype=dt)]),
        dt=torch.cat([state.dt, torch.full((g,), params.dt, device=dev, dtype=dt)]),
        alpha=torch.cat([state.alpha, torch.full((g,), params.alpha_start, device=dev, dtype=dt)]),
        n_pos=torch.cat([state.n_pos, torch.zeros(g, device=dev, dtype=torch.int64)]),
        n_steps=torch.cat([state.n_steps, torch.zeros(g, device=dev, dtype=torch.int64)]),
        started=torch.cat([state.started, torch.zeros(g, device=dev, dtype=torch.bool)]),
        keys=state.keys + [x.key for x in items],
    )


def _select(state: _FireState, keep: torch.Tensor, dropped: set[int] | None = None) -> _FireState:
    """Keep the crystals where ``keep [n_graphs]`` is True, renumbering ``batch``.

    ``dropped`` (the host-side indices where ``keep`` is False) spares a device read.
    """
    atom_keep = keep[state.batch]
    new_index = torch.cumsum(keep.to(torch.int64), 0) - 1
    if dropped is None:
        dropped = {i for i, m in enumerate(keep.tolist()) if not m}
    return _FireState(
        numbers=state.numbers[atom_keep],
        batch=new_index[state.batch[atom_keep]],
        n_atoms=state.n_atoms[keep],
        positions_init=state.positions_init[atom_keep],
        cell_init=state.cell_init[keep],
        positions_ref=state.positions_ref[atom_keep],
        cell_dof=state.cell_dof[keep],
        vel_atoms=state.vel_atoms[atom_keep],
        vel_cell=state.vel_cell[keep],
        dt=state.dt[keep],
        alpha=state.alpha[keep],
        n_pos=state.n_pos[keep],
        n_steps=state.n_steps[keep],
        started=state.started[keep],
        keys=[k for i, k in enumerate(state.keys) if i not in dropped],
    )


def _fire_step(state: _FireState, forces_ref: torch.Tensor, forces_cell: torch.Tensor, params: FireParams) -> None:
    """One ASE FIRE step for every crystal in the batch, each with its own dt/alpha (in place)."""
    b, g = state.batch, state.n_graphs
    vf = _segment_sum(forces_ref * state.vel_atoms, b, g) + (forces_cell * state.vel_cell).sum((1, 2))
    f2 = _segment_sum(forces_ref * forces_ref, b, g) + (forces_cell * forces_cell).sum((1, 2))
    v2 = _segment_sum(state.vel_atoms * state.vel_atoms, b, g) + (state.vel_cell * state.vel_cell).sum((1, 2))

    downhill = state.started & (vf > 0.0)
    uphill = state.started & ~(vf > 0.0)

    # Velocity mixing v <- (1 - a) v + a |v| f/|f| on downhill crystals.
    mix = torch.where(downhill, state.alpha * torch.sqrt(v2) / torch.sqrt(f2).clamp_min(1e-300), 0.0)
    keep_v = torch.where(downhill, 1.0 - state.alpha, 1.0)
    keep_v = torch.where(uphill, 0.0, keep_v)  # reset velocity after an uphill step
    state.vel_atoms = keep_v[b, None] * state.vel_atoms + mix[b, None] * forces_ref
    state.vel_cell = keep_v[:, None, None] * state.vel_cell + mix[:, None, None] * forces_cell

    grow = downhill & (state.n_pos > params.n_min)
    state.dt = torch.where(grow, torch.clamp(state.dt * params.f_inc, max=params.dt_max), state.dt)
    state.alpha = torch.where(grow, state.alpha * params.f_alpha, state.alpha)
    state.n_pos = torch.where(downhill, state.n_pos + 1, state.n_pos)

    state.alpha = torch.where(uphill, torch.full_like(state.alpha, params.alpha_start), state.alpha)
    state.dt = torch.where(uphill, state.dt * params.f_dec, state.dt)
    state.n_pos = torch.where(uphill, torch.zeros_like(state.n_pos), state.n_pos)

    # v += dt f ; dr = dt v, its norm over the crystal's whole DOF vector capped at max_step.
    state.vel_atoms = state.vel_atoms + state.dt[b, None] * forces_ref
    state.vel_cell = state.vel_cell + state.dt[:, None, None] * forces_cell
    dr_atoms = state.dt[b, None] * state.vel_atoms
    dr_cell = state.dt[:, None, None] * state.vel_cell
    norm_dr = torch.sqrt(_segment_sum(dr_atoms * dr_atoms, b, g) + (dr_cell * dr_cell).sum((1, 2)))
    scale = torch.where(norm_dr > params.max_step, params.max_step / norm_dr.clamp_min(1e-300), 1.0)
    state.positions_ref = state.positions_ref + scale[b, None] * dr_atoms
    state.cell_dof = state.cell_dof + scale[:, None, None] * dr_cell

    state.started = torch.ones_like(state.started)
    state.n_steps = state.n_steps + 1


# ---------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------


def relax_stream(
    structures: Iterable[RelaxInput],
    teacher: Teacher | Callable[..., TeacherOutput],
    params: FireParams = FireParams(),
    *,
    max_atoms: int = 4096,
    max_graphs: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    stats: RelaxStats | None = None,
    stop: Callable[[], bool] | None = None,
) -> Iterator[RelaxResult]:
    """Relax crystals as a stream; yields each result as soon as its crystal is done.

    The batch is refilled after every step up to ``max_atoms`` atoms (and ``max_graphs``
    crystals, if given). Order of results is completion order; use ``RelaxResult.key``.

    Args:
        structures: crystals to relax (consumed lazily).
        teacher: batched energy/force/stress callable, see ``Teacher``.
        params: FIRE settings.
        max_atoms: atom budget of one teacher call. A crystal larger than it runs alone.
        max_graphs: optional cap on crystals per call.
        device: where the state lives and the teacher is called.
        dtype: dtype of the optimizer state.
        stats: optional counters, updated in place.
        stop: checked before every teacher call; when it returns True the stream ends and the
            crystals still in the batch are abandoned (no result).

    Yields:
        RelaxResult per crystal.
    """
    device = torch.device(device)
    stats = stats if stats is not None else RelaxStats()
    source = iter(structures)
    pending: RelaxInput | None = None
    exhausted = False
    state = _empty_state(device, dtype)
    n_atoms_in = 0

    while True:
        if stop is not None and stop():
            return
        # Refill the batch.
        new: list[RelaxInput] = []
        while not exhausted:
            if pending is None:
                pending = next(source, None)
                if pending is None:
                    exhausted = True
                    break
            n = len(pending.numbers)
            full = n_atoms_in + n > max_atoms or (max_graphs is not None and state.n_graphs + len(new) >= max_graphs)
            if full and (state.n_graphs + len(new)) > 0:
                break
            new.append(pending)
            n_atoms_in += n
            pending = None
        state = _append(state, new, params)
        if state.n_graphs == 0:
            return

        positions, cell, deform, log_f = state.geometry()
        out = teacher(positions, cell, state.numbers, state.batch, state.n_atoms)
        energy = out.energy.to(dtype)
        forces_ref, forces_cell = frechet_forces(out.forces.to(dtype), out.stress.to(dtype), cell, log_f, deform, state.batch, state.n_atoms)
        g = state.n_graphs
        fmax_atoms = _segment_max(torch.linalg.norm(forces_ref, dim=1), state.batch, g)
        fmax = torch.maximum(fmax_atoms, torch.linalg.norm(forces_cell, dim=2).amax(dim=1))
        fmax_f = fresh_fmax(out.forces.to(dtype), out.stress.to(dtype), cell, state.batch, state.n_atoms)
        stats.n_calls += 1
        stats.n_atom_evals += int(state.numbers.shape[0])
        stats.n_graph_evals += g

        finite = torch.isfinite(energy) & torch.isfinite(fmax)
        volume_ratio = torch.linalg.det(cell) / torch.linalg.det(state.cell_init)
        diverged = finite & ((volume_ratio > params.volume_ratio_abort) | (volume_ratio < 1.0 / params.volume_ratio_abort))
        converged = finite & ~diverged & (fmax < params.fmax)
        if params.fresh_check:
            converged &= fmax_f < params.fmax
        out_of_steps = state.n_steps >= params.max_steps
        done = converged | ~finite | diverged | out_of_steps

        # One device-to-host read per step decides everything below (which crystals are done);
        # the old driver read done.any(), keep.all() and keep.tolist() separately.
        done_index = torch.nonzero(done).flatten().tolist()
        if done_index:
            yield from _collect(state, done_index, converged, finite, diverged, positions, cell, energy, fmax, fmax_f, stats)
            keep = ~done
            forces_ref = forces_ref[keep[state.batch]]
            forces_cell = forces_cell[keep]
            state = _select(state, keep, set(done_index))
            n_atoms_in = int(state.numbers.shape[0])
        if state.n_graphs:
            _fire_step(state, forces_ref, forces_cell, params)


def _collect(state, done_index, converged, finite, diverged, positions, cell, energy, fmax, fmax_fresh, stats):
    """Results of the crystals ``done_index`` (host list), copying only their rows to the host.

    The old driver copied the whole batch's positions and state to the host whenever any
    crystal finished, which on a large batch happens at nearly every step.
    """
    device = state.n_atoms.device
    graphs = torch.tensor(done_index, device=device, dtype=torch.int64)
    atom_mask = torch.zeros(state.n_graphs, dtype=torch.bool, device=device)
    atom_mask[graphs] = True
    atom_mask = atom_mask[state.batch]  # atoms of the done crystals, in batch order
    per_graph = torch.stack([energy[graphs], fmax[graphs], fmax_fresh[graphs]]).detach()
    flags = torch.stack([converged[graphs], finite[graphs], diverged[graphs]])
    cpu = {
        "positions": positions[atom_mask].detach().cpu().numpy(),
        "positions_init": state.positions_init[atom_mask].detach().cpu().numpy(),
        "numbers": state.numbers[atom_mask].cpu().numpy(),
        "cell": cell[graphs].detach().cpu().numpy(),
        "cell_init": state.cell_init[graphs].detach().cpu().numpy(),
        "n_atoms": state.n_atoms[graphs].cpu().numpy(),
        "n_steps": state.n_steps[graphs].cpu().numpy(),
        "per_graph": per_graph.cpu().numpy(),
        "flags": flags.cpu().numpy(),
    }
    offsets = np.concatenate([[0], np.cumsum(cpu["n_atoms"])])
    for j, k in enumerate(done_index):
        a, z = offsets[j], offsets[j + 1]
        is_converged, is_finite, is_diverged = (bool(f) for f in cpu["flags"][:, j])
        if not is_finite:
            status = "nonfinite"
        elif is_diverged:
            status = "diverged"
        elif is_converged:
            status = "converged"
        else:
            status = "max_steps"
        stats.n_finished += 1
        stats.n_converged += int(status == "converged")
        yield RelaxResult(
            key=state.keys[k],
            numbers=cpu["numbers"][a:z].copy(),
            positions_init=cpu["positions_init"][a:z].copy(),
            cell_init=cpu["cell_init"][j].copy(),
            positions=cpu["positions"][a:z].copy(),
            cell=cpu["cell"][j].copy(),
            energy=float(cpu["per_graph"][0, j]),
            fmax=float(cpu["per_graph"][1, j]),
            fmax_fresh=float(cpu["per_graph"][2, j]),
            n_steps=int(cpu["n_steps"][j]),
            converged=status == "converged",
            status=status,
        )


def relax_all(structures: Iterable[RelaxInput], teacher, params: FireParams = FireParams(), **kwargs) -> list[RelaxResult]:
    """Relax every crystal; results come back in input order with the inputs' keys."""
    inputs = list(structures)
    indexed = [dataclasses.replace(s, key=i) for i, s in enumerate(inputs)]
    results = sorted(relax_stream(indexed, teacher, params, **kwargs), key=lambda r: r.key)
    for r in results:
        r.key = inputs[r.key].key
    return results


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
