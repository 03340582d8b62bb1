"""Deterministic train/val/test splits of a :class:`PairSet`.

Both functions return ``{name: indices}`` with sorted int64 indices into the pair set, disjoint
and together covering every pair; the same ``seed`` always gives the same split.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from e3relax_ase.training.data.pairs import PairSet

logger = logging.getLogger(__name__)

DEFAULT_NAMES = ("train", "val", "test")


def _check_fractions(fractions: Sequence[float], names: Sequence[str]) -> np.ndarray:
    values = np.asarray(fractions, dtype=np.float64)
    if len(values) != len(names):
        raise ValueError(f"got {len(values)} fractions for {len(names)} split names")
    if np.any(values < 0) or abs(values.sum() - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {values.tolist()}")
    return values


def chemical_systems(pairset: PairSet) -> list:
    """Chemical system of each pair: its sorted set of element symbols joined by '-'.

    Returns:
        list of str, e.g. ``"As-Ba"``.
    """
    from ase.data import chemical_symbols

    out = []
    for k in range(len(pairset)):
        numbers = np.unique(pairset.numbers[pairset.atom_slice(k)])
        out.append("-".join(sorted(chemical_symbols[z] for z in numbers)))
    return out


def split_random(
    pairset: PairSet,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    names: Sequence[str] = DEFAULT_NAMES,
) -> dict:
    """Split pairs uniformly at random.

    The pairs are permuted with ``numpy.random.default_rng(seed)``; split i takes the next
    ``round(fraction_i * n)`` of them and the last split takes the rest.

    Args:
        pairset: the pairs.
        fractions: one per name, summing to 1.
        seed: random seed.
        names: split names.

    Returns:
        dict name -> sorted int64 indices.

    Raises:
        ValueError: on bad fractions.
    """
    shares = _check_fractions(fractions, names)
    n = len(pairset)
    order = np.random.default_rng(seed).permutation(n)
    sizes = [int(round(f * n)) for f in shares[:-1]]
    bounds = np.cumsum([0] + sizes)
    bounds = np.minimum(bounds, n)
    out = {}
    for i, name in enumerate(names):
        stop = bounds[i + 1] if i + 1 < len(names) else n
        out[name] = np.sort(order[bounds[i] : stop]).astype(np.int64)
    return out


def split_by_chemical_system(
    pairset: PairSet,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    names: Sequence[str] = DEFAULT_NAMES,
) -> dict:
    """Split so that every chemical system lies wholly in one split (test chemistries unseen).

    Rule: the chemical system of a pair is its sorted set of elements (:func:`chemical_systems`;
    BaAs4 and Ba3As2 share ``As-Ba``, BaAs4 and SrAs4 do not). The distinct systems are shuffled
    with ``numpy.random.default_rng(seed)`` and then, in that order, each system goes with all of
    its pairs to the split whose pair count is furthest below its target
    (``fraction * n_pairs``; ties go to the earlier name). Fractions are therefore met up to the
    size of one system.

    Args:
        pairset: the pairs.
        fractions: one per name, summing to 1.
        seed: random seed.
        names: split names.

    Returns:
        dict name -> sorted int64 indices.

    Raises:
        ValueError: on bad fractions.
    """
    shares = _check_fractions(fractions, names)
    systems = np.asarray(chemical_systems(pairset))
    unique, inverse = np.unique(systems, return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    counts = np.bincount(inverse, minlength=len(unique))
    target = shares * len(pairset)
    filled = np.zeros(len(names))
    assignment = np.empty(len(unique), dtype=np.int64)
    for system in order:
        deficit = np.where(shares > 0, target - filled, -np.inf)
        choice = int(np.argmax(deficit))
        assignment[system] = choice
        filled[choice] += counts[system]
    split_of_pair = assignment[inverse]
    out = {name: np.flatnonzero(split_of_pair == i).astype(np.int64) for i, name in enumerate(names)}
    logger.info(
        "chemical-system split: %s",
        ", ".join(f"{name} {len(idx)} pairs" for name, idx in out.items()),
    )
    return out


def split_keeping_systems(
    pairset: PairSet,
    existing: dict,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    names: Sequence[str] = DEFAULT_NAMES,
) -> dict:
    """Split new pairs so that they extend an existing chemical-system split without leaking.

    A new pair whose chemical system already lies in an existing split goes to that split, so
    a model trained on the old training split still has never seen a test chemistry. Systems
    seen nowhere before are shuffled with ``numpy.random.default_rng(seed)`` and assigned as
    in :func:`split_by_chemical_system`, with each split's count starting at its existing size
    and the targets taken on old and new pairs together.

    Args:
        pairset: the new pairs.
        existing: name -> the existing split's PairSet (names among ``names``).
        fractions: one per name, summing to 1 (the targets of the extended dataset).
        seed: random seed for the new systems.
        names: split names.

    Returns:
        dict name -> sorted int64 indices into ``pairset``.

    Raises:
        ValueError: bad fractions, an unknown split name, or an existing split that shares a
            chemical system with another (it was not a chemical-system split).
    """
    existing_systems = {name: chemical_systems(part) for name, part in existing.items()}
    split_of_pair = assign_systems_keeping(chemical_systems(pairset), existing_systems, fractions, seed, names)
    out = {name: np.flatnonzero(split_of_pair == i).astype(np.int64) for i, name in enumerate(names)}
    logger.info("extended chemical-system split: %s", ", ".join(f"{name} +{len(idx)} pairs" for name, idx in out.items()))
    return out


def assign_systems_keeping(
    systems: Sequence[str],
    existing_systems: dict,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    names: Sequence[str] = DEFAULT_NAMES,
) -> np.ndarray:
    """The rule of :func:`split_keeping_systems` on chemical-system strings.

    Lets items that are not pairs yet (generated inputs) be given their split by the same rule.

    Args:
        systems: chemical system of each new item (``chemical_systems``' format).
        existing_systems: split name -> chemical system of each existing pair.
        fractions, seed, names: as :func:`split_keeping_systems`.

    Returns:
        [n_items] int64 index into ``names`` per item.

    Raises:
        ValueError: bad fractions, an unknown split name, or a system in two existing splits.
    """
    shares = _check_fractions(fractions, names)
    unknown = set(existing_systems) - set(names)
    if unknown:
        raise ValueError(f"existing splits {sorted(unknown)} are not among {list(names)}")
    home: dict[str, int] = {}
    filled = np.zeros(len(names))
    for i, name in enumerate(names):
        if name not in existing_systems:
            continue
        filled[i] = len(existing_systems[name])
        for system in set(existing_systems[name]):
            if home.setdefault(system, i) != i:
                raise ValueError(f"chemical system {system} is in both the {names[home[system]]} and the {name} split")
    unique, inverse = np.unique(np.asarray(systems, dtype=str), return_inverse=True)
    counts = np.bincount(inverse, minlength=len(unique))
    assignment = np.full(len(unique), -1, dtype=np.int64)
    for s, system in enumerate(unique):
        if system in home:
            assignment[s] = home[system]
            filled[home[system]] += counts[s]
    target = shares * (filled.sum() + counts[assignment < 0].sum())
    for s in np.random.default_rng(seed).permutation(len(unique)):
        if assignment[s] >= 0:
            continue
        deficit = np.where(shares > 0, target - filled, -np.inf)
        assignment[s] = int(np.argmax(deficit))
        filled[assignment[s]] += counts[s]
    return assignment[inverse].astype(np.int64)
