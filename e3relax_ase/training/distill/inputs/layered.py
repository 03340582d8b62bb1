"""Slabs, layered cells and MX2 sheets: crystals with vacuum along one axis, pbc kept True.

Kinds (``LAYER_KINDS``):

* ``slab``: a bulk crystal cut along a low-index plane (``ase.build.surface``), 1-4 layers,
  with 10-16 Å of vacuum: a surface model as users build them;
* ``layered``: the same cut with a 2.5-5 Å gap, a stack of sheets whose spacing the
  relaxation has to find (van der Waals-like materials, intercalation hosts);
* ``mx2``: a 2H or 1T sheet of a transition metal and a chalcogen (``ase.build.mx2``), 1x1
  to 4x4 in plane, with a 3-12 Å gap.

The cells stay periodic along all three axes (the teacher and the model treat every input as
3D-periodic), with the vacuum or gap along the third lattice vector.
"""

from __future__ import annotations

import numpy as np

LAYER_KINDS = ("slab", "layered", "mx2")
MILLER_INDICES = ((1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))
MX2_METALS = (22, 23, 24, 25, 26, 27, 28, 40, 41, 42, 43, 44, 45, 46, 72, 73, 74, 75, 76, 77, 78, 50)  # Ti..Pt, Sn
MX2_CHALCOGENS = (8, 16, 34, 52)  # O S Se Te


def cut_slab(bulk, rng: np.random.Generator, gap_range, max_atoms: int = 64):
    """A slab of ``bulk`` along a random low-index plane with a gap drawn from ``gap_range`` Å.

    Returns:
        ``(atoms, record)`` with record ``{"miller", "layers", "gap"}``, or ``(None, None)``
        when even one layer has more than ``max_atoms`` atoms.
    """
    from ase.build import surface

    miller = MILLER_INDICES[int(rng.integers(len(MILLER_INDICES)))]
    layers = int(rng.integers(1, 5))
    gap = float(rng.uniform(*gap_range))
    while layers >= 1:
        slab = surface(bulk, miller, layers, vacuum=gap / 2.0)
        if len(slab) <= max_atoms:
            break
        layers -= 1
    else:
        return None, None
    slab.pbc = True
    slab.info = {}
    return slab, {"miller": list(miller), "layers": layers, "gap": round(gap, 4)}


def mx2_sheet(rng: np.random.Generator, max_atoms: int = 64):
    """A 2H or 1T MX2 sheet with a random metal and chalcogen (see module docstring).

    Returns:
        ``(atoms, record)`` with record ``{"formula", "phase", "size", "a", "gap"}``.
    """
    from ase.build import mx2
    from ase.data import chemical_symbols, covalent_radii

    metal = int(rng.choice(MX2_METALS))
    chalcogen = int(rng.choice(MX2_CHALCOGENS))
    phase = "2H" if rng.random() < 0.5 else "1T"
    # MoS2's a = 3.18 Å scaled by the bond length guess (sum of covalent radii).
    bond = covalent_radii[metal] + covalent_radii[chalcogen]
    a = 3.18 * bond / (covalent_radii[42] + covalent_radii[16])
    thickness = 3.19 * bond / (covalent_radii[42] + covalent_radii[16])
    n_max = int(np.floor(np.sqrt(max_atoms / 3)))
    size = (int(rng.integers(1, n_max + 1)), int(rng.integers(1, n_max + 1)), 1)
    gap = float(rng.uniform(3.0, 12.0))
    formula = f"{chemical_symbols[metal]}{chemical_symbols[chalcogen]}2"
    atoms = mx2(formula=formula, kind=phase, a=a, thickness=thickness, size=size, vacuum=gap / 2.0)
    atoms.pbc = True
    atoms.info = {}
    return atoms, {"formula": formula, "phase": phase, "size": list(size), "a": round(float(a), 4), "gap": round(gap, 4)}
