"""Elements the generated inputs must cover, element similarity and random compositions.

Coverage: every element with Z <= 83 except the noble gases and promethium (77 elements; Tc
is included, as issue 17 asks). SevenNet-0 knows all of them.

Similarity is Pettifor's chemical scale (pymatgen ``Element.mendeleev_no``): elements close
on it substitute for one another in known crystals far more often than elements far apart,
which is why substitution and decoration screens rank candidates by it.

Oxidation states are pymatgen's ``common_oxidation_states``; a composition is charge-balanced
when one common state per element makes the formula neutral.
"""

from __future__ import annotations

import itertools
import math
from functools import cache, reduce

import numpy as np

NOBLE_GASES = frozenset({2, 10, 18, 36, 54, 86})
PROMETHIUM = 61
MAX_Z = 83
COVERED_NUMBERS = tuple(z for z in range(1, MAX_Z + 1) if z not in NOBLE_GASES and z != PROMETHIUM)
# Metalloids counted with the metals for intermetallic compositions (Zintl-like phases).
INTERMETALLIC_METALLOIDS = frozenset({5, 14, 32, 33, 51, 52})  # B Si Ge As Sb Te


@cache
def _element(z: int):
    from pymatgen.core.periodic_table import Element

    return Element.from_Z(int(z))


@cache
def mendeleev_number(z: int) -> int:
    """Pettifor's Mendeleev number of element ``z``."""
    return int(_element(z).mendeleev_no)


@cache
def oxidation_states(z: int) -> tuple[int, ...]:
    """Common non-zero oxidation states of element ``z`` (pymatgen)."""
    return tuple(int(q) for q in _element(z).common_oxidation_states if q != 0)


@cache
def anion_numbers() -> tuple[int, ...]:
    """Covered elements with a negative common oxidation state."""
    return tuple(z for z in COVERED_NUMBERS if any(q < 0 for q in oxidation_states(z)))


@cache
def cation_numbers() -> tuple[int, ...]:
    """Covered elements with a positive common oxidation state."""
    return tuple(z for z in COVERED_NUMBERS if any(q > 0 for q in oxidation_states(z)))


@cache
def intermetallic_numbers() -> tuple[int, ...]:
    """Covered metals and the metalloids B, Si, Ge, As, Sb, Te."""
    return tuple(z for z in COVERED_NUMBERS if _element(z).is_metal or z in INTERMETALLIC_METALLOIDS)


def similar_elements(z: int, window: int, exclude=()) -> list[int]:
    """Covered elements within ``window`` of ``z`` on the Mendeleev scale, nearest first.

    Args:
        z: atomic number.
        window: largest |M(z) - M(candidate)|.
        exclude: atomic numbers not to return (``z`` itself is never returned).

    Returns:
        Atomic numbers sorted by distance, then by Z.
    """
    m = mendeleev_number(z)
    out = [(abs(mendeleev_number(c) - m), c) for c in COVERED_NUMBERS if c != z and c not in set(exclude)]
    return [c for d, c in sorted(out) if d <= window]


def _draw(rng: np.random.Generator, pool, k: int, require: int | None) -> list[int] | None:
    """k distinct elements of ``pool``, containing ``require`` when given (None if impossible)."""
    pool = list(pool)
    if require is not None:
        if require not in pool:
            return None
        rest = [z for z in pool if z != require]
        return [require] + [int(z) for z in rng.choice(rest, size=k - 1, replace=False)]
    return [int(z) for z in rng.choice(pool, size=k, replace=False)]


def charge_balanced_composition(rng: np.random.Generator, n_elements: int, max_count: int = 6, require: int | None = None) -> dict[int, int] | None:
    """A neutral formula of ``n_elements`` elements (1-2 anions, the rest cations).

    One common oxidation state is drawn per element; among all count vectors in
    1..``max_count`` (reduced by their gcd) that make the formula neutral, one is drawn
    uniformly.

    Args:
        rng: random generator.
        n_elements: 2 to 4.
        max_count: largest count of one element in the reduced formula.
        require: an element the formula must contain.

    Returns:
        ``{Z: count}``, or None when the draw has no neutral formula.
    """
    n_anions = 1 if n_elements < 3 or rng.random() < 0.7 else 2
    n_cations = n_elements - n_anions
    anion_role = None
    if require is not None:
        can_be = [require in anion_numbers(), require in cation_numbers()]
        if not any(can_be):
            return None
        anion_role = can_be[0] and (not can_be[1] or rng.random() < n_anions / n_elements)
    anions = _draw(rng, anion_numbers(), n_anions, require if anion_role else None)
    if anions is None:
        return None
    cation_pool = [z for z in cation_numbers() if z not in anions]
    cations = _draw(rng, cation_pool, n_cations, require if anion_role is False else None)
    if cations is None:
        return None
    elements = cations + anions
    charges = [int(rng.choice([q for q in oxidation_states(z) if q > 0])) for z in cations]
    charges += [int(rng.choice([q for q in oxidation_states(z) if q < 0])) for z in anions]
    counts = np.array(list(itertools.product(range(1, max_count + 1), repeat=n_elements)))  # [k, n]
    neutral = counts[(counts @ np.array(charges)) == 0]
    neutral = neutral[[reduce(math.gcd, row.tolist()) == 1 for row in neutral]]
    if len(neutral) == 0:
        return None
    row = neutral[int(rng.integers(len(neutral)))]
    return {z: int(c) for z, c in zip(elements, row)}


def intermetallic_composition(rng: np.random.Generator, n_elements: int, max_count: int = 6, require: int | None = None) -> dict[int, int] | None:
    """A formula of ``n_elements`` metals/metalloids with counts 1..``max_count`` (gcd 1).

    Returns:
        ``{Z: count}``, or None when ``require`` is not a metal or metalloid.
    """
    elements = _draw(rng, intermetallic_numbers(), n_elements, require)
    if elements is None:
        return None
    counts = rng.integers(1, max_count + 1, size=n_elements)
    g = reduce(math.gcd, counts.tolist())
    return {z: int(c // g) for z, c in zip(elements, counts)}


def random_composition(
    rng: np.random.Generator,
    n_elements: int,
    intermetallic_probability: float = 0.35,
    max_count: int = 6,
    require: int | None = None,
) -> tuple[dict[int, int], str] | tuple[None, None]:
    """Charge-balanced or intermetallic composition (the kind drawn first, the other as fallback).

    Returns:
        ``(composition, kind)`` with kind ``"charge_balanced"`` or ``"intermetallic"``, or
        ``(None, None)`` when neither kind can be drawn.
    """
    kinds = ["intermetallic", "charge_balanced"]
    if rng.random() >= intermetallic_probability:
        kinds.reverse()
    for kind in kinds:
        make = intermetallic_composition if kind == "intermetallic" else charge_balanced_composition
        for _ in range(4):
            composition = make(rng, n_elements, max_count=max_count, require=require)
            if composition is not None:
                return composition, kind
    return None, None


def chemical_system(numbers) -> str:
    """Sorted element symbols joined by '-' (the split rule's key, as ``splits.chemical_systems``)."""
    from ase.data import chemical_symbols

    return "-".join(sorted(chemical_symbols[int(z)] for z in set(np.asarray(numbers).tolist())))


def atomic_volume(z: int, volume_per_atom: dict[int, float] | None = None) -> float:
    """Volume guess of one atom of element ``z``, Å^3.

    The table's value (e.g. per-element volumes fitted on relaxed pairs by
    ``perturb.fit_element_volumes``) when it has a positive one, else a sphere of 1.6 x the
    covalent radius at 52 % packing (simple cubic), which lands within ~30 % of the fitted
    volumes for most elements.
    """
    from ase.data import covalent_radii

    v = (volume_per_atom or {}).get(int(z))
    if v is not None and v > 0:
        return float(v)
    return float(4.0 / 3.0 * np.pi * (1.6 * covalent_radii[int(z)]) ** 3 * 0.52)
