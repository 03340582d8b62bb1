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

This module is the driver; what goes in and out of it and the sanity checks of a result are
in :mod:`.batched_results`, the Frechet cell filter maths in :mod:`.frechet`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from e3relax_ase.training.distill.batched_results import FireParams, RelaxInput, RelaxResult, RelaxStats, Teacher, TeacherOutput
from e3relax_ase.training.distill.frechet import _segment_max, _segment_sum, frechet_forces, fresh_fmax

logger = logging.getLogger(__name__)

__all__ = [
    "relax_all",
    "relax_stream",
]


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
