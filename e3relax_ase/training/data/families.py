"""Chemical families of crystals, for accuracy reported per family (model cards).

One family per crystal, by the first rule that holds: elemental (one element); halide (F, Cl,
Br, I); oxide (O); chalcogenide (S, Se, Te); pnictide (N, P, As, Sb, Bi); intermetallic (no
non-metal at all); other (the rest: carbides, borides, silicides, hydrides, ...). The order
puts the most electronegative anion first, as a mixed-anion compound is usually named.
"""

from __future__ import annotations

from collections.abc import Iterable

FAMILIES = ("elemental", "halide", "oxide", "chalcogenide", "pnictide", "intermetallic", "other")

_HALOGENS = {9, 17, 35, 53}
_CHALCOGENS = {16, 34, 52}
_PNICTOGENS = {7, 15, 33, 51, 83}
# H, He, B, C, N, O, F, Ne, Si, P, S, Cl, Ar, Ge, As, Se, Br, Kr, Sb, Te, I, Xe, At, Rn
_NON_METALS = {1, 2, 5, 6, 7, 8, 9, 10, 14, 15, 16, 17, 18, 32, 33, 34, 35, 36, 51, 52, 53, 54, 85, 86}


def chemical_family(numbers: Iterable[int]) -> str:
    """The family (one of ``FAMILIES``) of a crystal with these atomic numbers."""
    elements = {int(z) for z in numbers}
    if len(elements) == 1:
        return "elemental"
    for family, anions in (("halide", _HALOGENS), ("oxide", {8}), ("chalcogenide", _CHALCOGENS), ("pnictide", _PNICTOGENS)):
        if elements & anions:
            return family
    if not elements & _NON_METALS:
        return "intermetallic"
    return "other"
