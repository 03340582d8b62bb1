"""A pair as two ASE frames (extxyz and the other ASE formats): the frame ``info`` keys,
JSON-able ``info`` values, and the check and merge of a pair's two frames.

Used by :class:`~e3relax_ase.training.data.pairset.PairSet` (its ASE conversion) and by the
importers; the pair file itself is :mod:`e3relax_ase.training.data.pairs`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Keys of extxyz ``info`` that describe a frame's place in a pair rather than the pair itself.
PAIR_ID_KEY = "pair_id"
ROLE_KEY = "role"
ROLE_UNRELAXED = "unrelaxed"
ROLE_RELAXED = "relaxed"


def to_jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays (as ASE puts into ``info``) into plain JSON types.

    Args:
        value: any value found in an ``Atoms.info`` dict or a metadata dict.

    Returns:
        The value made of dict/list/str/int/float/bool/None; unknown objects become ``str``.
    """
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    logger.warning("info value of type %s stored as its string", type(value).__name__)
    return str(value)


def check_same_atoms(pair_id: str, unrelaxed, relaxed) -> None:
    """Refuse a pair whose two structures differ in atom count, species or order.

    Args:
        pair_id: named in the error message.
        unrelaxed: ``ase.Atoms``.
        relaxed: ``ase.Atoms``.

    Raises:
        ValueError: one line naming the pair and the first difference.
    """
    if len(unrelaxed) != len(relaxed):
        raise ValueError(f"pair {pair_id!r}: unrelaxed has {len(unrelaxed)} atoms but relaxed has {len(relaxed)}")
    diff = np.flatnonzero(unrelaxed.numbers != relaxed.numbers)
    if diff.size:
        i = int(diff[0])
        su, sr = unrelaxed.get_chemical_symbols()[i], relaxed.get_chemical_symbols()[i]
        what = "order" if sorted(unrelaxed.numbers) == sorted(relaxed.numbers) else "species"
        raise ValueError(f"pair {pair_id!r}: atom {i} is {su} unrelaxed but {sr} relaxed ({what} differ)")


def merge_frame_info(info_unrelaxed: dict, info_relaxed: dict) -> dict:
    """Merge the ``info`` of the two frames of a pair into one per-pair dict.

    Args:
        info_unrelaxed: ``Atoms.info`` of the unrelaxed frame.
        info_relaxed: ``Atoms.info`` of the relaxed frame.

    Returns:
        JSON-able dict without ``pair_id``/``role``; a key whose values differ keeps the relaxed
        value and gains ``unrelaxed_<key>`` with the unrelaxed one.
    """
    skip = {PAIR_ID_KEY, ROLE_KEY}
    merged = {k: to_jsonable(v) for k, v in info_relaxed.items() if k not in skip}
    for k, v in info_unrelaxed.items():
        if k in skip:
            continue
        v = to_jsonable(v)
        if k not in merged:
            merged[k] = v
        elif merged[k] != v:
            merged[f"unrelaxed_{k}"] = v
    return merged


def _energy_per_atom(atoms) -> float:
    calc = getattr(atoms, "calc", None)
    if calc is None:
        return float("nan")
    try:
        return float(calc.get_potential_energy(atoms)) / len(atoms)
    except Exception:  # no energy stored (single-point calculators raise various errors)
        return float("nan")
