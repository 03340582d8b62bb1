"""The one on-disk format of (unrelaxed, relaxed) crystal pairs: saving and loading it, and
writing pairs as extended XYZ. The in-memory class, :class:`PairSet`, lives in :mod:`.pairset`
and is importable from here too.

A pair file is a compressed ``.npz`` holding flat arrays (``N`` = total atoms, ``n`` = pairs)::

    ids                      [n]        str      | pair identifier, unique
    n_atoms                  [n]        int64    | atoms per pair
    offsets                  [n + 1]    int64    | atoms of pair k are offsets[k]:offsets[k + 1]
    numbers                  [N]        int64    | atomic numbers, same order in both structures
    pos_unrelaxed            [N, 3]     float64  | Cartesian positions of the input, Å
    pos_relaxed              [N, 3]     float64  | Cartesian positions after relaxation, Å
    cell_unrelaxed           [n, 3, 3]  float64  | input cell, rows are lattice vectors, Å
    cell_relaxed             [n, 3, 3]  float64  | relaxed cell, rows are lattice vectors, Å
    pbc                      [n, 3]     bool     | optional; absent means all True
    energy_per_atom_relaxed  [n]        float64  | optional; eV/atom, NaN = unknown
    format                   []         str      | optional; "e3relax-pairs"
    format_version           []         int64    | optional; 1
    metadata                 []         str      | optional; JSON dict for the whole dataset
    info                     []         str      | optional; JSON list, one free dict per pair

Relaxed positions are stored exactly as the source gives them (never unwrapped or aligned to the
unrelaxed ones): consumers that compare positions must handle periodic images themselves.
Loading needs only numpy and never unpickles (``allow_pickle=False``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from e3relax_ase.io.files import atomic_write
from e3relax_ase.keys import (
    PAIR_CELL_RELAXED,
    PAIR_CELL_UNRELAXED,
    PAIR_ENERGY_PER_ATOM_RELAXED,
    PAIR_FORMAT,
    PAIR_FORMAT_VERSION,
    PAIR_IDS,
    PAIR_INFO,
    PAIR_METADATA,
    PAIR_N_ATOMS,
    PAIR_NUMBERS,
    PAIR_OFFSETS,
    PAIR_PBC,
    PAIR_POS_RELAXED,
    PAIR_POS_UNRELAXED,
    PAIR_REQUIRED,
)
from e3relax_ase.training.data.pair_frames import to_jsonable
from e3relax_ase.training.data.pairset import Pair, PairSet

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "Pair", "PairSet", "load_pairs", "save_pairs", "save_pairs_extxyz"]

logger = logging.getLogger(__name__)

FORMAT_NAME = "e3relax-pairs"
FORMAT_VERSION = 1


# --- files --------------------------------------------------------------------------------
def _refuse_input(path: Path, inputs: Iterable) -> None:
    for item in inputs:
        other = Path(item)
        same = other.resolve() == path.resolve()
        if not same and other.exists() and path.exists():
            same = os.path.samefile(other, path)
        if same:
            raise ValueError(f"refusing to overwrite input file {str(other)!r}")


def save_pairs(path: str | os.PathLike, pairset: PairSet, inputs: Iterable = ()) -> Path:
    """Write ``pairset`` in the pair format (compressed npz), atomically.

    Args:
        path: destination file (written as given, no suffix added).
        pairset: the pairs; validated first.
        inputs: paths this data was read from; writing over any of them is refused.

    Returns:
        The destination path.

    Raises:
        ValueError: if ``path`` is one of ``inputs`` or the pair set is invalid.
    """
    path = Path(path)
    _refuse_input(path, inputs)
    pairset.validate()
    arrays = {
        PAIR_IDS: np.asarray(pairset.ids, dtype=str),
        PAIR_N_ATOMS: pairset.n_atoms,
        PAIR_OFFSETS: pairset.offsets,
        PAIR_NUMBERS: pairset.numbers,
        PAIR_POS_UNRELAXED: pairset.pos_unrelaxed,
        PAIR_POS_RELAXED: pairset.pos_relaxed,
        PAIR_CELL_UNRELAXED: pairset.cell_unrelaxed,
        PAIR_CELL_RELAXED: pairset.cell_relaxed,
        PAIR_PBC: pairset.pbc,
        PAIR_ENERGY_PER_ATOM_RELAXED: pairset.energy_per_atom_relaxed,
        PAIR_FORMAT: np.array(FORMAT_NAME),
        PAIR_FORMAT_VERSION: np.array(FORMAT_VERSION, dtype=np.int64),
        PAIR_METADATA: np.array(json.dumps(to_jsonable(pairset.metadata), sort_keys=True)),
    }
    if any(pairset.info):
        arrays[PAIR_INFO] = np.array(json.dumps([to_jsonable(d) for d in pairset.info]))
    # allow_pickle=True is numpy's default, spelled out so that mypy does not match **arrays against it.
    atomic_write(path, lambda f: np.savez_compressed(f, allow_pickle=True, **arrays), binary=True, suffix=".npz")
    logger.info("wrote %d pairs to %s", len(pairset), path)
    return path


def load_pairs(path: str | os.PathLike, validate: bool = True) -> PairSet:
    """Read a pair file (this format, or any npz with the required arrays).

    Args:
        path: the ``.npz`` file.
        validate: run :meth:`PairSet.validate` after loading.

    Returns:
        The PairSet.

    Raises:
        ValueError: if arrays are missing, the format is foreign or newer, or validation fails.
    """
    with np.load(path, allow_pickle=False) as data:
        files = set(data.files)
        missing = [name for name in PAIR_REQUIRED if name not in files]
        if missing:
            raise ValueError(f"{path}: not a pair file, missing arrays {', '.join(missing)}")
        if PAIR_FORMAT in files and str(data[PAIR_FORMAT]) != FORMAT_NAME:
            raise ValueError(f"{path}: {PAIR_FORMAT} is {str(data[PAIR_FORMAT])!r}, expected {FORMAT_NAME!r}")
        if PAIR_FORMAT_VERSION in files and int(data[PAIR_FORMAT_VERSION]) > FORMAT_VERSION:
            raise ValueError(f"{path}: {PAIR_FORMAT_VERSION} {int(data[PAIR_FORMAT_VERSION])} is newer than {FORMAT_VERSION}")
        arrays = {name: data[name] for name in PAIR_REQUIRED}  # PairSet's fields carry the arrays' names
        pbc = data[PAIR_PBC] if PAIR_PBC in files else None
        energy = data[PAIR_ENERGY_PER_ATOM_RELAXED] if PAIR_ENERGY_PER_ATOM_RELAXED in files else None
        metadata = json.loads(str(data[PAIR_METADATA])) if PAIR_METADATA in files else {}
        info = json.loads(str(data[PAIR_INFO])) if PAIR_INFO in files else None
    pairset = PairSet(**arrays, pbc=pbc, energy_per_atom_relaxed=energy, metadata=metadata, info=info)
    return pairset.validate() if validate else pairset


def save_pairs_extxyz(path: str | os.PathLike, pairset: PairSet, inputs: Iterable = ()) -> Path:
    """Write pairs as extended XYZ, frames alternating unrelaxed / relaxed, atomically.

    Each frame's ``info`` carries ``pair_id`` and ``role``; the relaxed frame also carries the
    pair's free ``info`` (e.g. ``converged``, ``steps``, ``teacher``) and its energy, so that
    :func:`e3relax_ase.training.data.importers.import_extxyz` reads the file back unchanged.

    Args:
        path: destination ``.extxyz`` file.
        pairset: the pairs.
        inputs: paths this data was read from; writing over any of them is refused.

    Returns:
        The destination path.

    Raises:
        ValueError: if ``path`` is one of ``inputs``.
    """
    from ase.io import write

    path = Path(path)
    _refuse_input(path, inputs)
    frames = [atoms for pair in pairset.to_atoms_pairs() for atoms in pair]
    atomic_write(path, lambda f: write(f, frames, format="extxyz"), suffix=".extxyz")
    logger.info("wrote %d pairs to %s", len(pairset), path)
    return path
