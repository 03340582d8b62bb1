"""Training loss: periodicity-aware Cartesian displacement (PACD) plus lattice L1, every layer."""

from __future__ import annotations

import itertools

import torch

from e3relax_ase.nn.scatter import scatter_mean

# The 27 lattice translations {-1, 0, 1}^3 searched when aligning a predicted atom to its target.
IMAGE_SHIFTS = torch.tensor(list(itertools.product((-1, 0, 1), repeat=3)), dtype=torch.float64)  # [27, 3]


def align_to_target(positions_pred: torch.Tensor, positions_target: torch.Tensor, cell_target: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Move each predicted atom by the lattice translation of the TRUE cell that brings it nearest its target.

    The choice of translation is not differentiated; the aligned coordinate is.

    Args:
        positions_pred: [n_atoms, 3] (or [T, n_atoms, 3] for every layer at once).
        positions_target: [n_atoms, 3].
        cell_target: [n_graphs, 3, 3] relaxed cells (rows).
        batch: [n_atoms].

    Returns:
        Aligned predicted positions, same shape as ``positions_pred``.
    """
    shifts = IMAGE_SHIFTS.to(device=positions_pred.device, dtype=positions_pred.dtype)
    translations = torch.einsum("kc,ncx->nkx", shifts, cell_target[batch])  # [n_atoms, 27, 3]
    with torch.no_grad():
        candidates = positions_pred.unsqueeze(-2) + translations  # [..., n_atoms, 27, 3]
        distance = (candidates - positions_target.unsqueeze(-2)).square().sum(-1)
        best = distance.argmin(dim=-1)  # [..., n_atoms]
    chosen = torch.gather(translations.expand(best.shape + (27, 3)), -2, best[..., None, None].expand(best.shape + (1, 3)))
    return positions_pred + chosen.squeeze(-2)


def pacd_loss(positions_pred, positions_target, cell_target, batch) -> torch.Tensor:
    """Mean |aligned prediction - target| over atoms and xyz (L1), each crystal's rigid
    translation removed; [T, ...] input gives [T].

    The translation is removed because it means nothing for a crystal: prediction and target
    share the fractional-centroid frame, and what remains between them is the centroid times
    the error of the strain, which depends on where the crystal was written, not on its
    relaxation (the same reason ``metrics.structure_errors`` removes it from coord_mae).
    """
    aligned = align_to_target(positions_pred, positions_target, cell_target, batch)
    error = aligned - positions_target  # [..., n_atoms, 3]
    n_graphs = cell_target.shape[0]
    by_atom = error.movedim(-2, 0)  # [n_atoms, ..., 3]
    rigid = scatter_mean(by_atom, batch, n_graphs).to(error.dtype)[batch].movedim(0, -2)
    return (error - rigid).abs().mean(dim=(-1, -2))


def lattice_loss(cell_pred: torch.Tensor, cell_target: torch.Tensor) -> torch.Tensor:
    """Mean |predicted - relaxed lattice vector components| (L1); [T, ...] input gives [T]."""
    return (cell_pred - cell_target).abs().mean(dim=(-1, -2, -3))


def relaxation_loss(output, positions_target, cell_target, batch, layer_weights=None, lattice_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """sum_t alpha_t (PACD_t + lattice_weight lattice_t) over the layers of a ``ModelOutput``.

    Args:
        output: ModelOutput (positions [T, n_atoms, 3], cell [T, n_graphs, 3, 3]).
        positions_target, cell_target, batch: the relaxed structures.
        layer_weights: alpha_t, [T]; ones by default.
        lattice_weight: weight of the lattice term relative to PACD.

    Returns:
        (total loss, dict of the last layer's PACD and lattice terms as detached tensors;
        kept on the device so a training step needs no host synchronisation)
    """
    pacd = pacd_loss(output.positions, positions_target, cell_target, batch)  # [T]
    lattice = lattice_loss(output.cell, cell_target)  # [T]
    if layer_weights is None:
        layer_weights = torch.ones_like(pacd)
    else:
        layer_weights = torch.as_tensor(layer_weights, dtype=pacd.dtype, device=pacd.device)
    total = (layer_weights * (pacd + lattice_weight * lattice)).sum()
    return total, {"pacd": pacd[-1].detach(), "lattice": lattice[-1].detach()}
