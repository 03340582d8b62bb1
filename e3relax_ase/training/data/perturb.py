"""Perturb relaxed seed crystals into inputs of the kind users submit.

Every function takes an explicit ``numpy.random.Generator``, returns a new ``ase.Atoms`` and
never modifies its input. :func:`make_user_like_inputs` chains them in the order
substitution -> volume rescale -> strain -> rattle and records what was done in
``info["perturbation"]`` (JSON-able), next to ``info["seed_id"]``.

Substitution rule (:func:`substitution_candidates`): element B may replace element A when

1. A and B are in the same periodic-table group (pymatgen ``Element.group``), so they have the
   same valence-electron count and largely the same oxidation states;
2. their pymatgen ``atomic_radius`` differ by at most ``radius_tolerance`` relative to A's
   (so the substituted crystal stays plausible: Ba->Sr, As->P, Cu->Ag, Ni->Pd, but not C->Si);
3. B is stable and not a noble gas (Z <= 83, not Tc or Pm, not group 18), and is in ``allowed``
   when a teacher supports only some elements (e.g. EMT).

One species of the structure is chosen (uniformly among those with a candidate not already present)
and all of its atoms are replaced by one candidate (uniformly), so the composition stays
charge-balanced in the same way as the seed's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from functools import cache

import numpy as np

logger = logging.getLogger(__name__)

_UNSTABLE = {43, 61}  # Tc, Pm
_MAX_Z = 83  # Bi; heavier elements are radioactive


def strain(atoms, magnitude: float, rng: np.random.Generator):
    """Apply a random symmetric strain, atoms following the cell (fractional coordinates kept).

    Args:
        atoms: ``ase.Atoms`` (not modified).
        magnitude: each independent component of the symmetric strain tensor eps is drawn
            uniformly from ``[-magnitude, magnitude]``; the new cell is ``cell @ (I + eps)``.
        rng: random generator.

    Returns:
        ``(new_atoms, eps)`` with ``eps`` the [3, 3] strain tensor.

    Raises:
        ValueError: if ``magnitude`` is negative or >= 0.5.
    """
    if not 0 <= magnitude < 0.5:
        raise ValueError(f"strain magnitude must be in [0, 0.5), got {magnitude}")
    upper = rng.uniform(-magnitude, magnitude, size=(3, 3))
    eps = np.triu(upper) + np.triu(upper, 1).T  # [3, 3] symmetric
    out = atoms.copy()
    out.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    return out, eps


def shear(atoms, magnitude: float, rng: np.random.Generator):
    """Apply a random pure shear, atoms following the cell (fractional coordinates kept).

    Unlike :func:`strain` the diagonal is left alone, so the cell's angles change while its
    edge lengths change only to second order: the inputs whose angles are wrong that a
    volume rescale never makes.

    Args:
        atoms: ``ase.Atoms`` (not modified).
        magnitude: each off-diagonal component of the symmetric tensor eps is drawn uniformly
            from ``[-magnitude, magnitude]``; the new cell is ``cell @ (I + eps)``.
        rng: random generator.

    Returns:
        ``(new_atoms, eps)`` with ``eps`` the [3, 3] shear tensor (zero diagonal).

    Raises:
        ValueError: if ``magnitude`` is negative or >= 0.5.
    """
    if not 0 <= magnitude < 0.5:
        raise ValueError(f"shear magnitude must be in [0, 0.5), got {magnitude}")
    upper = np.triu(rng.uniform(-magnitude, magnitude, size=(3, 3)), 1)
    eps = upper + upper.T  # [3, 3] symmetric, zero diagonal
    out = atoms.copy()
    out.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    return out, eps


def rattle(atoms, stdev: float, rng: np.random.Generator):
    """Displace every atom by an independent Gaussian vector.

    Args:
        atoms: ``ase.Atoms`` (not modified).
        stdev: standard deviation per Cartesian component, Å.
        rng: random generator.

    Returns:
        The rattled copy.

    Raises:
        ValueError: if ``stdev`` is negative.
    """
    if stdev < 0:
        raise ValueError(f"rattle stdev must be >= 0, got {stdev}")
    out = atoms.copy()
    out.positions = atoms.positions + rng.normal(0.0, stdev, size=(len(atoms), 3))  # [n, 3]
    return out


def rescale_volume(atoms, volume_range: Sequence[float], rng: np.random.Generator):
    """Scale the cell isotropically by a volume factor drawn uniformly from ``volume_range``.

    Args:
        atoms: ``ase.Atoms`` (not modified).
        volume_range: ``(low, high)`` bounds of V_new / V_old, both > 0.
        rng: random generator.

    Returns:
        ``(new_atoms, factor)``.

    Raises:
        ValueError: on bad bounds.
    """
    low, high = (float(v) for v in volume_range)
    if not 0 < low <= high:
        raise ValueError(f"volume range must satisfy 0 < low <= high, got {volume_range}")
    factor = float(rng.uniform(low, high))
    return _with_volume_scaled(atoms, factor), factor


def _with_volume_scaled(atoms, factor: float):
    """A copy of ``atoms`` with the cell scaled isotropically to ``factor`` x its volume, the
    atoms moving with it (fractional coordinates kept)."""
    out = atoms.copy()
    out.set_cell(atoms.cell.array * factor ** (1.0 / 3.0), scale_atoms=True)
    return out


@cache
def _candidates_cached(z: int, radius_tolerance: float) -> tuple:
    from pymatgen.core.periodic_table import Element

    a = Element.from_Z(z)
    if a.group == 18 or a.atomic_radius is None:
        return ()
    r_a = float(a.atomic_radius)
    out = []
    for zb in range(1, _MAX_Z + 1):
        if zb == z or zb in _UNSTABLE:
            continue
        b = Element.from_Z(zb)
        if b.group != a.group or b.atomic_radius is None:
            continue
        if abs(float(b.atomic_radius) - r_a) <= radius_tolerance * r_a:
            out.append(zb)
    return tuple(out)


def substitution_candidates(z: int, radius_tolerance: float = 0.25, allowed: Iterable[int] | None = None) -> list:
    """Atomic numbers that may replace element ``z`` (rule in the module docstring).

    Args:
        z: atomic number to replace.
        radius_tolerance: largest relative difference of atomic radii.
        allowed: if given, only these atomic numbers are returned.

    Returns:
        Sorted list of atomic numbers.
    """
    out = _candidates_cached(int(z), float(radius_tolerance))
    if allowed is not None:
        allowed = {int(a) for a in allowed}
        out = tuple(c for c in out if c in allowed)
    return list(out)


def substitute(
    atoms,
    rng: np.random.Generator,
    radius_tolerance: float = 0.25,
    allowed: Iterable[int] | None = None,
):
    """Replace all atoms of one species by a chemically similar element.

    Args:
        atoms: ``ase.Atoms`` (not modified).
        rng: random generator.
        radius_tolerance: see :func:`substitution_candidates`.
        allowed: atomic numbers the result may contain (e.g. those a teacher supports).

    Returns:
        ``(new_atoms, mapping)`` with ``mapping`` = ``{old_symbol: new_symbol}``, empty when no
        species has a candidate (the copy is then unchanged).
    """
    from ase.data import chemical_symbols

    present = sorted(set(int(z) for z in atoms.numbers))
    options = {}
    for z in present:
        cands = [c for c in substitution_candidates(z, radius_tolerance, allowed) if c not in present]
        if cands:
            options[z] = cands
    out = atoms.copy()
    if not options:
        return out, {}
    old = sorted(options)[int(rng.integers(len(options)))]
    new = options[old][int(rng.integers(len(options[old])))]
    numbers = out.numbers.copy()
    numbers[numbers == old] = new
    out.numbers = numbers
    return out, {chemical_symbols[old]: chemical_symbols[new]}


def make_user_like_inputs(
    seeds: Sequence,
    n_per_seed: int,
    rng: np.random.Generator,
    strain_magnitude: float = 0.04,
    rattle_stdev: float = 0.1,
    volume_range: Sequence[float] | None = None,
    substitute_probability: float = 0.0,
    allowed_elements: Iterable[int] | None = None,
    radius_tolerance: float = 0.25,
) -> list:
    """Make ``n_per_seed`` perturbed copies of each seed.

    Args:
        seeds: ``ase.Atoms`` list (not modified); ``info["seed_id"]`` names each seed
            (default ``seed{i}``).
        n_per_seed: copies per seed.
        rng: random generator; the same generator state gives the same inputs.
        strain_magnitude: see :func:`strain` (0 disables).
        rattle_stdev: see :func:`rattle`, Å (0 disables).
        volume_range: ``(low, high)`` volume factor bounds, or None to keep the volume.
        substitute_probability: chance that a copy gets an element substitution.
        allowed_elements: atomic numbers substitutions may introduce.
        radius_tolerance: see :func:`substitution_candidates`.

    Returns:
        list of ``ase.Atoms`` (seed-major order), each with ``info["seed_id"]`` and
        ``info["perturbation"]`` = ``{"substitution", "volume_factor", "strain", "rattle_stdev"}``.

    Raises:
        ValueError: on a negative ``n_per_seed`` or bad perturbation parameters.
    """
    if n_per_seed < 0:
        raise ValueError(f"n_per_seed must be >= 0, got {n_per_seed}")
    if not 0 <= substitute_probability <= 1:
        raise ValueError(f"substitute probability must be in [0, 1], got {substitute_probability}")
    out = []
    for i, seed in enumerate(seeds):
        seed_id = str(seed.info.get("seed_id", f"seed{i}"))
        for _ in range(n_per_seed):
            atoms = seed.copy()
            record = {"substitution": {}, "volume_factor": 1.0, "strain": None, "rattle_stdev": rattle_stdev}
            if substitute_probability > 0 and rng.random() < substitute_probability:
                atoms, record["substitution"] = substitute(atoms, rng, radius_tolerance, allowed_elements)
            if volume_range is not None:
                atoms, record["volume_factor"] = rescale_volume(atoms, volume_range, rng)
            if strain_magnitude > 0:
                atoms, eps = strain(atoms, strain_magnitude, rng)
                record["strain"] = np.round(eps, 6).tolist()
            if rattle_stdev > 0:
                atoms = rattle(atoms, rattle_stdev, rng)
            atoms.calc = None
            atoms.info = {"seed_id": seed_id, "perturbation": record}
            out.append(atoms)
    logger.info("made %d inputs from %d seeds", len(out), len(seeds))
    return out


# --------------------------------------------------------------------------------------------
# Volume guess from per-element volumes
# --------------------------------------------------------------------------------------------


def fit_element_volumes(pairs) -> dict[int, float]:
    """Per-element volumes (Å^3 per atom, >= 0) fitted to the relaxed cells of a pair set.

    Non-negative least squares of V_relaxed ~ sum over atoms of v[Z], with each row divided by
    its V_relaxed so that every crystal's relative error weighs the same (a 30-atom cell must not
    outweigh a 4-atom one).

    Args:
        pairs: a :class:`~e3relax_ase.training.data.pairs.PairSet` (its relaxed cells are used).

    Returns:
        ``{Z: volume}`` for every element that occurs in ``pairs``.
    """
    from scipy.optimize import nnls

    elements = np.unique(pairs.numbers)
    column = {int(z): k for k, z in enumerate(elements)}
    counts = np.zeros((len(pairs.ids), len(elements)))
    structure = np.repeat(np.arange(len(pairs.ids)), pairs.n_atoms)
    # A tuple of index arrays, as numpy documents for ufunc.at; its stubs accept one array only.
    np.add.at(counts, (structure, [column[int(z)] for z in pairs.numbers]), 1.0)  # type: ignore[arg-type]
    v_relaxed = np.abs(np.linalg.det(pairs.cell_relaxed))
    volumes, _ = nnls(counts / v_relaxed[:, None], np.ones(len(v_relaxed)))
    return {int(z): float(v) for z, v in zip(elements, volumes)}


def element_volume_guess(numbers: Sequence[int], element_volumes: dict[int, float]) -> float | None:
    """Sum of per-element volumes over the atoms, or None if an element has no (positive) volume."""
    total = 0.0
    for z in numbers:
        v = element_volumes.get(int(z), 0.0)
        if v <= 0:
            return None
        total += v
    return total


def blend_compound_volume(atoms, element_volumes: dict[int, float]):
    """Rescale a compound's cell to the geometric mean of its volume and its per-element guess.

    Why: for decorated prototypes (scaled to covalent contact) and substituted perovskites, the
    geometric mean of the two guesses is closer to the relaxed volume than either alone, in the
    bulk and in the tail (measured by ``scripts/volume_guess_check.py``); for elemental cells the
    per-element guess makes things worse, so crystals of one element are returned unchanged.

    Args:
        atoms: ``ase.Atoms`` (not modified).
        element_volumes: ``{Z: Å^3 per atom}``, e.g. from :func:`fit_element_volumes`.

    Returns:
        ``(atoms, record)``: a new ``ase.Atoms`` (positions scaled with the cell) and
        ``{"element_volume_sum": Å^3, "volume_scale": V_new / V_old}``, or the input itself and
        None when it is elemental or an element has no fitted volume.
    """
    if len(set(atoms.numbers.tolist())) < 2:
        return atoms, None
    guess = element_volume_guess(atoms.numbers, element_volumes)
    volume = abs(float(np.linalg.det(atoms.cell.array)))
    if guess is None or volume <= 0:
        return atoms, None
    scale = float(np.sqrt(guess / volume))  # V_new = sqrt(V * guess)
    return _with_volume_scaled(atoms, scale), {"element_volume_sum": round(guess, 4), "volume_scale": round(scale, 6)}
