"""Supercells 2x1x1 ... 2x2x2 of small cells, so that the model sees large cells of known bonding.

A supercell of a relaxed small cell is relaxed too; what makes it a lesson is the rattle and
the strain the start applies afterwards (``starts.hard_start``), which no longer respect the
small cell's periodicity, so atoms that were images of one another move differently.
"""

from __future__ import annotations

import numpy as np

REPETITIONS = ((2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (1, 2, 2), (2, 2, 2))


def random_supercell(atoms, rng: np.random.Generator, max_atoms: int = 64):
    """A supercell of ``atoms`` by a repetition drawn among those that stay within ``max_atoms``.

    Returns:
        ``(supercell, repetition)``, or ``(None, None)`` when even 2x1x1 is too large.
    """
    fitting = [r for r in REPETITIONS if len(atoms) * int(np.prod(r)) <= max_atoms]
    if not fitting:
        return None, None
    repetition = fitting[int(rng.integers(len(fitting)))]
    out = atoms.repeat(repetition)
    out.info = {}
    return out, list(repetition)
