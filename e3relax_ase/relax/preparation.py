"""Preparing one structure for the network: the settings it needs from the relaxer
(``PreparationSettings``, picklable for worker processes), the vacuum search and validation
(``prepare_structure``) and its graph edges (``graph_edges``).

The relaxer runs these in its own process (``prepare``) and the worker processes run them in
theirs (``pool_prepare``): every path gives the same results because every path runs the same
functions on the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from e3relax_ase.geometry.neighbors import capped_edges
from e3relax_ase.geometry.vacuum import ClusterError, find_vacuum
from e3relax_ase.geometry.validation import InvalidStructureError, PreparedCrystal, prepare_arrays

UNNAMED = "\x00unnamed\x00"  # stands for a structure's name until it fails (naming may take time)


@dataclass
class PreparationSettings:
    """What preparing a structure needs from the relaxer (picklable, for worker processes)."""

    checks: dict  # keyword arguments of validation.prepare_arrays
    vacuum_gap: float | None = None  # Å | find vacuum along periodic axes (e3relax_ase.geometry.vacuum); None: do not look
    allow_cluster: bool = False  # relax an isolated cluster in a box (keeping the box) instead of refusing it


def prepare_structure(numbers, positions, cell, pbc, *, name: str, per_atom_arrays: dict, settings: PreparationSettings, transform=None):
    """Validate one structure for the network, after looking for vacuum along its periodic axes.

    Returns:
        (PreparedCrystal, VacuumLayout or None). With vacuum axes, the crystal was prepared as
        the network will see it: those axes non-periodic, the atoms moved together
        (``layout.positions``, ``layout.pbc``); an allowed cluster is prepared as given.

    Raises:
        InvalidStructureError: refused by validation, or an isolated cluster (``ClusterError``)
            when clusters are not allowed.
    """
    layout = find_vacuum(positions, cell, pbc, settings.vacuum_gap) if settings.vacuum_gap else None
    if layout is not None:
        if layout.cluster:
            if not settings.allow_cluster:
                raise ClusterError(
                    f"{name}: an isolated cluster or molecule in a periodic box (vacuum of {layout.describe()}), not a "
                    "crystal: the network would reshape its box; allow_cluster=True (CLI --allow-cluster) relaxes it "
                    "keeping the box"
                )
        else:
            positions, pbc, transform = layout.positions, layout.pbc, None
    prepared = prepare_arrays(numbers, positions, cell, pbc, name=name, per_atom_arrays=per_atom_arrays, transform=transform, **settings.checks)
    return prepared, layout


def graph_edges(prepared: PreparedCrystal, settings: PreparationSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The graph edges ``graph_from_canonical`` would build for the prepared crystal.

    Its neighbour search is the one validation already ran (float64 canonical positions, the
    network's cutoff), reused whatever the network's dtype: a float32 network used to cost a
    second search of the float32-rounded positions, a large share of a worker's time.
    """
    return capped_edges(*prepared.pairs, len(prepared.form.positions), settings.checks["max_neighbors"])


def named(error, name: Callable[[], str]):
    """``error`` with the ``UNNAMED`` placeholder that starts its message replaced by ``name()``
    (called only then: naming may take time); anything else as it is."""
    if isinstance(error, InvalidStructureError) and str(error).startswith(UNNAMED):
        return type(error)(name() + str(error)[len(UNNAMED) :])  # the same class (e.g. vacuum.ClusterError)
    return error
