"""One crystal as plain arrays: what every layer above passes to the network's input side."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CrystalArrays:
    """One crystal as plain arrays (lengths in Å, cell rows are lattice vectors)."""

    numbers: np.ndarray  # [n_atoms] int
    positions: np.ndarray  # [n_atoms, 3]
    cell: np.ndarray  # [3, 3]
    pbc: np.ndarray  # [3] bool
