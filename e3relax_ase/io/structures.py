"""The ASE / pymatgen side of the relaxer: conversions, applying a prediction, provenance keys.

A prediction is applied the way ASE applies any geometry change, so constraints act on it:
``atoms.set_cell(cell, scale_atoms=True)`` then ``atoms.set_positions(positions)``. Writing into
``atoms.positions[:]`` would bypass FixAtoms / FixCartesian / FixSymmetry.

Consequences worth knowing (docs/relaxer.md):
* with the cell relaxed, a FixAtoms atom keeps its fractional coordinates (it moves with the
  cell, as under ASE's cell filters); with ``relax_cell=False`` it does not move at all;
* with ``relax_cell=False`` the predicted fractional coordinates are placed in the input cell;
* FixSymmetry can only symmetrise small cell steps (ASE refuses deformation steps over 0.25),
  so a large predicted cell change is applied in steps of at most ``MAX_SYMMETRY_STEP``.
"""

from __future__ import annotations

import copy
import functools

import numpy as np

from e3relax_ase.geometry.crystal import CrystalArrays

# Keys written into ``atoms.info`` (and pymatgen ``Structure.properties``); every key the
# relaxer writes starts with INFO_PREFIX, and old ones are removed before new ones are written.
INFO_PREFIX = "e3relax_"
INFO_MODEL = "e3relax_model"  # str | checkpoint name
INFO_SHA256 = "e3relax_checkpoint_sha256"  # str | sha256 of the checkpoint file
INFO_VERSION = "e3relax_version"  # str | e3relax-ase version
INFO_UNTRAINED = "e3relax_untrained"  # bool | the checkpoint is an untrained placeholder
INFO_RELAX_CELL = "e3relax_relax_cell"  # bool | the predicted cell was applied
INFO_MAX_DISPLACEMENT = "e3relax_max_displacement"  # float | Å, largest non-affine atom move
INFO_MAX_STRAIN = "e3relax_max_strain"  # float | largest principal stretch change max |s_i - 1| of the deformation F
INFO_SANE = "e3relax_sane"  # bool | the prediction passed every sanity check
INFO_PROBLEMS = "e3relax_problems"  # str | "; "-joined sanity problems ("" when sane)
INFO_CORRECTION_RATIO = "e3relax_correction_ratio"  # float | last layer's share of the correction
INFO_LAST_CORRECTION = "e3relax_last_correction"  # float | Å, largest atom move of the last layer
INFO_REFINE_ADVISED = "e3relax_refine_advised"  # bool | last correction above the threshold, or not sane
INFO_PRECISION = "e3relax_precision"  # str | "tf32" or "bf16", only when not float32
INFO_SPACEGROUP_INPUT = "e3relax_spacegroup_input"  # int | with fix_symmetry only
INFO_SPACEGROUP = "e3relax_spacegroup"  # int | with fix_symmetry only, after relaxation
INFO_CALCULATOR = "e3relax_refine_calculator"  # str | refinement only
INFO_CONVERGED = "e3relax_converged"  # bool | refinement only: fmax < target at the end
INFO_NSTEPS = "e3relax_nsteps"  # int | refinement only: optimizer steps taken
INFO_FMAX = "e3relax_fmax"  # float | refinement only: max(fmax_atoms, fmax_cell), eV/Å
INFO_FMAX_ATOMS = "e3relax_fmax_atoms"  # float | refinement only: largest atomic force at the end, evaluated afresh, eV/Å
INFO_FMAX_CELL = "e3relax_fmax_cell"  # float | refinement with a cell filter only: its cell rows, filter built afresh, eV/Å
INFO_VACUUM_AXES = "e3relax_vacuum_axes"  # str | lattice vectors holding vacuum, kept as given: "c", "a,b" (extxyz reads "0,2" as numbers)
INFO_CLUSTER = "e3relax_cluster"  # bool | an isolated cluster relaxed in its box (allow_cluster)
INFO_LAYER = "e3relax_layer"  # int | return_trajectory only: the network layer a frame shows, from 1
# Where the CLI read a structure (set on the input, kept through relaxation: they describe the
# input, not the result, so clear_provenance leaves them).
INFO_SOURCE = "e3relax_source"  # str | the file, as given on the command line
INFO_INDEX = "e3relax_index"  # int | the frame index in that file (0 for a single structure)
INPUT_KEYS = (INFO_SOURCE, INFO_INDEX)

MAX_SYMMETRY_STEP = 0.1  # largest deformation-gradient entry per step under FixSymmetry
MAX_SYMMETRY_STEPS = 1000  # a bound on the steps (each shrinks the remaining change by a fixed share)


def as_atoms(structure):
    """Return (Atoms, kind) for an ASE ``Atoms`` or a pymatgen ``Structure`` (kind "ase"/"pymatgen").

    Raises:
        TypeError: for anything else.
    """
    from ase import Atoms

    if isinstance(structure, Atoms):
        return structure, "ase"
    try:
        from pymatgen.core import Structure
    except ImportError:  # pymatgen is optional for ASE users
        Structure = None
    if Structure is not None and isinstance(structure, Structure):
        from pymatgen.io.ase import AseAtomsAdaptor

        return AseAtomsAdaptor.get_atoms(structure), "pymatgen"
    raise TypeError(f"expected an ase.Atoms or a pymatgen Structure, got {type(structure).__name__}")


def from_atoms(atoms, kind: str):
    """Back to the caller's type: the Atoms itself, or a pymatgen Structure (magmoms, selective
    dynamics and ``info`` become site properties and ``Structure.properties``)."""
    if kind == "ase":
        return atoms
    from pymatgen.io.ase import AseAtomsAdaptor

    return AseAtomsAdaptor.get_structure(atoms)


def copy_atoms(atoms):
    """``atoms.copy()``, the same object built directly: much faster for a plain ``ase.Atoms``.

    ``Atoms.copy`` runs ``Atoms.__init__`` (a dozen setters, each validating and allocating
    arrays it then throws away) before replacing every array; that was the largest single cost
    of ``relax_many``'s main process. Here the attributes ``copy`` leaves behind are set
    directly: the cell, pbc, celldisp and arrays copied, ``info`` a shallow copy, constraints
    deep-copied, no calculator. Subclasses of Atoms, and any ASE whose ``copy`` leaves other
    attributes (checked once, ``_light_copy_matches``), get ``atoms.copy()`` itself.
    """
    if type(atoms) is not _atoms_class() or not _light_copy_matches():
        return atoms.copy()
    return _light_copy(atoms)


def _light_copy(atoms):
    atoms_class = _atoms_class()
    new = atoms_class.__new__(atoms_class)
    old = atoms.__dict__
    # In the order Atoms.__init__ creates them, so vars() (and a pickle) match copy()'s.
    state = new.__dict__
    state["_cellobj"] = type(old["_cellobj"])(old["_cellobj"].array.astype(float))
    state["_pbc"] = old["_pbc"].astype(bool)
    state["arrays"] = {name: array.copy() for name, array in old["arrays"].items()}
    state["_celldisp"] = old["_celldisp"].astype(float)
    state["_constraints"] = copy.deepcopy(old["_constraints"]) if old["_constraints"] else []
    state["info"] = dict(old["info"])
    state["_calc"] = None
    return new


@functools.cache
def _atoms_class():
    """ase.Atoms, imported on first use."""
    from ase import Atoms

    return Atoms


@functools.cache
def _light_copy_matches() -> bool:
    """Whether ``_light_copy`` leaves the attributes ``Atoms.copy`` leaves, in the same order and
    of the same types, in this ASE (its private attribute names are what the shortcut relies on).
    Checked once per process."""
    from ase import Atoms
    from ase.constraints import FixAtoms

    if list(vars(Atoms("H"))) != ["_cellobj", "_pbc", "arrays", "_celldisp", "_constraints", "info", "_calc"]:
        return False  # attributes _light_copy does not know of
    probe = Atoms("H2O", positions=[[0, 0, 0], [0.9, 0, 0], [0, 0.9, 0.1]], cell=[3, 4, 5], pbc=[True, False, True], info={"k": 1})
    probe.set_initial_magnetic_moments([0.1, 0.2, 0.3])
    probe.set_constraint(FixAtoms([0]))
    reference, light = probe.copy(), _light_copy(probe)
    ok = list(vars(reference)) == list(vars(light)) and all(type(vars(reference)[k]) is type(vars(light)[k]) for k in vars(reference))
    ok = ok and list(reference.arrays) == list(light.arrays) and reference == light and reference.info == light.info
    ok = ok and np.array_equal(reference.get_celldisp(), light.get_celldisp()) and repr(reference.constraints) == repr(light.constraints)
    return bool(ok)


def crystal_arrays(atoms) -> CrystalArrays:
    """The plain arrays of an Atoms (copies, float64)."""
    return CrystalArrays(
        numbers=np.array(atoms.numbers, dtype=np.int64),
        positions=np.array(atoms.positions, dtype=np.float64),
        cell=np.array(atoms.cell.array, dtype=np.float64),
        pbc=np.array(atoms.pbc, dtype=bool),
    )


def clear_provenance(atoms) -> None:
    """Remove every key an earlier run wrote, so no stale flag (e.g. converged) survives (the
    input's origin, ``INPUT_KEYS``, stays)."""
    for key in [k for k in atoms.info if str(k).startswith(INFO_PREFIX) and k not in INPUT_KEYS]:
        del atoms.info[key]


def _set_cell_in_steps(atoms, cell: np.ndarray) -> None:
    """``set_cell(scale_atoms=True)``, split into small steps when a constraint adjusts cells.

    FixSymmetry measures each step against the cell it starts from (ASE warns above 0.15 and
    refuses above 0.25), so every step is sized against the cell as it is now: equal steps of
    the total change grow relative to a shrinking cell, and FixSymmetry's symmetrisation moves
    the cell off the straight path, so the last step used to reach 0.15 (MgO: 0.1535).
    """
    adjusts_cell = any(type(c).__name__ == "FixSymmetry" for c in atoms.constraints)
    if adjusts_cell:
        for _ in range(MAX_SYMMETRY_STEPS):
            current = atoms.cell.array.copy()
            # FixSymmetry's measure of a step to `cell`: the deformation gradient minus I.
            largest = float(np.abs(np.linalg.solve(current, cell).T - np.eye(3)).max())
            if largest <= MAX_SYMMETRY_STEP:
                break
            atoms.set_cell(current + (cell - current) * (MAX_SYMMETRY_STEP / largest), scale_atoms=True)
    atoms.set_cell(cell, scale_atoms=True)  # the last step exactly


def apply_prediction(atoms, positions: np.ndarray, cell: np.ndarray, relax_cell: bool = True) -> None:
    """Move ``atoms`` (in place) to a predicted structure through its constraints.

    Args:
        atoms: the structure to change.
        positions: [n_atoms, 3] predicted positions, Å (the caller's images).
        cell: [3, 3] predicted cell (rows), Å.
        relax_cell: apply the predicted cell; if False the cell is kept and the predicted
            fractional coordinates are placed in it.
    """
    cell = np.asarray(cell, dtype=np.float64)
    positions = np.asarray(positions, dtype=np.float64)
    # Without constraints, set_cell(scale_atoms=True) then set_positions leave exactly the given
    # cell and positions behind (the scaled positions are overwritten): write them directly.
    plain = _plain(atoms)
    if relax_cell:
        if plain:
            atoms.cell[:] = cell
        else:
            _set_cell_in_steps(atoms, cell)
    applied = atoms.cell.array
    # A plain Atoms given the predicted cell holds exactly it: nothing to compare.
    if not (plain and relax_cell) and not np.array_equal(applied, cell):
        # Constraints (FixSymmetry) or relax_cell=False changed the cell: keep the predicted
        # fractional coordinates in the cell actually applied.
        positions = positions @ np.linalg.solve(cell, applied)
    if plain and positions.shape == atoms.arrays["positions"].shape:
        atoms.arrays["positions"][:] = positions
    else:
        atoms.set_positions(positions)


def _plain(atoms) -> bool:
    """An ase.Atoms without constraints, whose set_cell / set_positions are ASE's own."""
    Atoms = _atoms_class()
    cls = type(atoms)
    return not atoms.constraints and cls.set_cell is Atoms.set_cell and cls.set_positions is Atoms.set_positions


def spacegroup_number(atoms, symprec: float) -> int:
    """spglib's space-group number of ``atoms`` (1 when spglib finds no symmetry)."""
    import warnings

    import spglib

    cell = (atoms.cell.array, atoms.get_scaled_positions(wrap=True), atoms.numbers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # spglib's notice about its error API
        try:
            dataset = spglib.get_symmetry_dataset(cell, symprec=symprec)
        except Exception:  # spglib >= 2.5 may raise where it used to return None
            dataset = None
    return int(dataset.number) if dataset is not None else 1


def vacuum_cell_mask(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray | None:
    """A 3x3 cell-filter mask that freezes the vacuum axes of a slab or 2D cell.

    ASE's cell filters mask Cartesian components of the deformation gradient, so a vacuum axis
    can be frozen exactly only when its lattice vector lies along a Cartesian axis k and the
    periodic vectors are perpendicular to k (the layout of ``ase.build`` slabs).

    Returns:
        The mask (1 = free), None when every axis is periodic.

    Raises:
        ValueError: if a vacuum vector is not along a Cartesian axis (pass a mask yourself).
    """
    pbc = np.asarray(pbc, dtype=bool)
    if pbc.all():
        return None
    mask = np.ones((3, 3))
    for axis in np.flatnonzero(~pbc):
        direction = cell[axis] / np.linalg.norm(cell[axis])
        k = int(np.argmax(np.abs(direction)))
        others = [cell[c] for c in range(3) if c != axis]
        if abs(direction[k]) < 1 - 1e-6 or any(abs(v[k]) > 1e-6 * max(1.0, float(np.linalg.norm(v))) for v in others):
            raise ValueError(f"vacuum axis {axis} is not along a Cartesian axis; pass a cell-filter mask explicitly")
        mask[k, :] = 0.0
        mask[:, k] = 0.0
    return mask
