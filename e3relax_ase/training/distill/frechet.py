"""The Frechet cell filter's maths, batched: per-crystal sums and maxima, the adjoint of the
matrix exponential's Frechet derivative, the generalised forces and the fresh fmax.

The degrees of freedom are those of ASE 3.29 ``FrechetCellFilter``, described in
:mod:`e3relax_ase.training.distill.batched_relax`, the driver that uses them.
"""

from __future__ import annotations

import torch

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
