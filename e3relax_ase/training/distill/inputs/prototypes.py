"""Known prototypes re-decorated with 3-4 chemically similar elements.

What decoration screens do: take a known crystal and put on its sites elements that are
likely to substitute for the original ones. Here likelihood is closeness on Pettifor's
Mendeleev scale (``chemistry.similar_elements``): each species of the prototype is replaced
by an element within a window of its Mendeleev number (window drawn per input, so near and
far substitutions both occur), or kept with probability ``keep_probability``.

Prototypes: pymatgen's 288 AFLOW prototypes and, when present, the perov_5 seeds, both with
their real elements. A prototype with 3-4 species is decorated as it is. One with 1-2 species
first gets more: the atoms of one symmetry-distinct site (spglib's equivalent atoms) of a
species, or, when the species has one site only, a random half of its atoms, become a new
element similar to that species (the orderings of alloy and solid-solution screens), until
the crystal has 3 (sometimes 4) species.

The volume is scaled by the ratio of the per-element volume guesses of the new and the old
elements, so the prototype's packing is kept.
"""

from __future__ import annotations

import logging

import numpy as np

from e3relax_ase.training.distill.inputs.chemistry import COVERED_NUMBERS, atomic_volume, similar_elements

logger = logging.getLogger(__name__)

MAX_PROTOTYPE_ATOMS = 32


def load_prototypes(seeds_dir=None, max_atoms: int = MAX_PROTOTYPE_ATOMS) -> list:
    """AFLOW prototypes (pymatgen) and perov_5 seeds (if found) with <= 4 species and ``max_atoms`` atoms.

    Returns:
        list of ``ase.Atoms`` with ``info["seed_id"]``, in a fixed order.
    """
    from e3relax_ase.training.data.seeds import load_seed_structures

    out = load_seed_structures("aflow")
    try:
        out += load_seed_structures("perov_5", data_dir=seeds_dir)
    except FileNotFoundError as exc:
        logger.warning("perov_5 seeds not found, AFLOW prototypes only: %s", exc)
    return [a for a in out if len(a) <= max_atoms and len(set(a.numbers.tolist())) <= 4]


def _split_species(atoms, z: int, new_z: int, rng: np.random.Generator):
    """Give the atoms of one symmetry-distinct site of species ``z`` (or a random half) element ``new_z``.

    Returns:
        ``(atoms, how)`` with how ``"site"`` or ``"half"``, or ``(None, None)`` when ``z`` has one atom.
    """
    import spglib

    members = np.flatnonzero(atoms.numbers == z)
    if len(members) < 2:
        return None, None
    dataset = spglib.get_symmetry_dataset((atoms.cell.array, atoms.get_scaled_positions(), atoms.numbers), symprec=1e-3)
    sites = np.unique(dataset.equivalent_atoms[members]) if dataset is not None else np.array([0])
    out = atoms.copy()
    numbers = out.numbers.copy()
    if len(sites) >= 2:
        assert dataset is not None  # without one, sites is [0]
        site = sites[int(rng.integers(len(sites)))]
        chosen = members[dataset.equivalent_atoms[members] == site]
        how = "site"
    else:
        chosen = rng.choice(members, size=len(members) // 2, replace=False)
        how = "half"
    numbers[chosen] = new_z
    out.numbers = numbers
    return out, how


def substituted_prototype(
    prototypes: list,
    rng: np.random.Generator,
    max_window: int = 8,
    keep_probability: float = 0.25,
    volume_per_atom: dict[int, float] | None = None,
):
    """One prototype decorated with 3-4 similar elements (rule in the module docstring).

    Args:
        prototypes: from :func:`load_prototypes`.
        rng: random generator.
        max_window: the Mendeleev window is drawn uniformly from 1..max_window.
        keep_probability: chance that a species keeps its own element.
        volume_per_atom: ``{Z: Å^3}`` for the volume scaling.

    Returns:
        ``(atoms, record)`` with record ``{"prototype", "prototype_index", "window", "splits",
        "mapping", "volume_scale"}``, or ``(None, None)`` when the draw has no valid decoration.
    """
    from ase.data import chemical_symbols

    index = int(rng.integers(len(prototypes)))
    atoms = prototypes[index].copy()
    window = int(rng.integers(1, max_window + 1))
    splits = []
    n_target = 3 if rng.random() < 0.7 else 4
    while len(set(atoms.numbers.tolist())) < n_target:
        present = sorted(set(atoms.numbers.tolist()))
        z = int(rng.choice(present))
        candidates = similar_elements(z, window, exclude=present)
        if not candidates:
            return None, None
        new_z = int(rng.choice(candidates))
        atoms, how = _split_species(atoms, z, new_z, rng)
        if atoms is None:
            return None, None
        splits.append([chemical_symbols[z], chemical_symbols[new_z], how])
    species = sorted(set(atoms.numbers.tolist()))
    if len(species) > 4:
        return None, None
    mapping: dict[int, int] = {}
    for z in [int(s) for s in rng.permutation(species)]:
        taken = set(mapping.values())
        if z in COVERED_NUMBERS and z not in taken and rng.random() < keep_probability:
            mapping[z] = z
            continue
        candidates = [c for c in similar_elements(z, window, exclude=taken | set(species) - {z}) if c not in taken]
        if not candidates:
            return None, None
        mapping[z] = int(rng.choice(candidates))
    old_volume = sum(atomic_volume(z, volume_per_atom) for z in atoms.numbers)
    atoms.numbers = np.array([mapping[int(z)] for z in atoms.numbers])
    new_volume = sum(atomic_volume(z, volume_per_atom) for z in atoms.numbers)
    scale = new_volume / old_volume
    atoms.set_cell(atoms.cell.array * scale ** (1.0 / 3.0), scale_atoms=True)
    record = {
        "prototype": str(prototypes[index].info.get("seed_id", index)),
        "prototype_index": index,  # in the list given (seed ids of AFLOW prototypes repeat)
        "window": window,
        "splits": splits,
        "mapping": {chemical_symbols[a]: chemical_symbols[b] for a, b in sorted(mapping.items())},
        "volume_scale": round(float(scale), 6),
    }
    atoms.info = {}
    return atoms, record
