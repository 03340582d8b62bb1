"""From plain arrays to predicted arrays: canonical form -> graph -> network -> caller's frame.

This is the one place where the network meets data; the ASE/pymatgen layer (``relaxer``) and
the training code both call it, so invariance to how the input is written holds everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from e3relax_ase.canonical import CanonicalForm, canonicalize
from e3relax_ase.graph import CrystalGraph, build_graph
from e3relax_ase.model import E3RelaxH2


@dataclass
class CrystalArrays:
    """One crystal as plain arrays (lengths in Å, cell rows are lattice vectors)."""

    numbers: np.ndarray  # [n_atoms] int
    positions: np.ndarray  # [n_atoms, 3]
    cell: np.ndarray  # [3, 3]
    pbc: np.ndarray  # [3] bool


@dataclass
class Prediction:
    """Every layer's predicted structure in the caller's basis and periodic images."""

    positions: np.ndarray  # [n_layers, n_atoms, 3] Å
    cell: np.ndarray  # [n_layers, 3, 3] Å


def graph_from_canonical(
    crystals: Sequence[CrystalArrays], forms: Sequence[CanonicalForm], cutoff: float, max_neighbors: int, device, dtype
) -> CrystalGraph:
    """Build the batched graph of crystals already in canonical form."""
    return build_graph(
        [torch.as_tensor(c.numbers, dtype=torch.long, device=device) for c in crystals],
        [torch.as_tensor(f.positions, dtype=dtype, device=device) for f in forms],
        [torch.as_tensor(f.cell, dtype=dtype, device=device) for f in forms],
        [torch.as_tensor(np.asarray(c.pbc, dtype=bool), device=device) for c in crystals],
        cutoff,
        max_neighbors,
    )


@torch.no_grad()
def predict(
    model: E3RelaxH2,
    crystals: Sequence[CrystalArrays],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    reduce_cell: bool = True,
) -> list[Prediction]:
    """Predict the relaxed structures of a batch of crystals in one forward pass.

    Args:
        model: the network (already on ``device``, in ``dtype``).
        crystals: the inputs.
        device, dtype: where and in which precision to run.
        reduce_cell: Niggli-reduce 3D-periodic cells before the network.

    Returns:
        One ``Prediction`` per crystal, in the caller's lattice basis and atom images.
    """
    forms = [canonicalize(c.positions, c.cell, c.pbc, reduce=reduce_cell) for c in crystals]
    graph = graph_from_canonical(crystals, forms, model.config.cutoff, model.config.max_neighbors, device, dtype)
    output = model(graph)
    positions = output.positions.to(torch.float64).cpu().numpy()  # [T, n_atoms, 3]
    cells = output.cell.to(torch.float64).cpu().numpy()  # [T, n_graphs, 3, 3]
    bounds = np.concatenate([[0], np.cumsum([len(c.numbers) for c in crystals])])
    predictions = []
    for index, form in enumerate(forms):
        p, c = form.restore(positions[:, bounds[index] : bounds[index + 1]], cells[:, index])
        predictions.append(Prediction(p, c))
    return predictions
