"""Preparing the structures of a ``relax_many`` call: each input converted to Atoms, checked,
canonicalised and its neighbours searched, here (``prepared``) or in the worker processes
(``pooled``, which sends the arrays ``shell`` reads); the copies that receive the predictions."""

from __future__ import annotations

from collections.abc import Generator

import numpy as np

from e3relax_ase.geometry.crystal import CrystalArrays
from e3relax_ase.geometry.validation import InvalidStructureError
from e3relax_ase.io.structures import as_atoms, copy_atoms, crystal_arrays
from e3relax_ase.relax import items as naming  # name_of looked up at call time: items.name_of is its one home
from e3relax_ase.relax.items import Item, RaiseLater, RelaxFailure, RelaxOptions, given_name
from e3relax_ase.relax.pool_prepare import StructureSpec, prepared_in_pool
from e3relax_ase.relax.preparation import UNNAMED, PreparationSettings, graph_edges, named, prepare_structure


def prepare_atoms(atoms, name: str, settings: PreparationSettings):
    """``preparation.prepare_structure`` on an Atoms: (PreparedCrystal, VacuumLayout or None)."""
    arrays = atoms.arrays
    others = {key: value for key, value in arrays.items() if key not in ("numbers", "positions")}
    return prepare_structure(arrays["numbers"], arrays["positions"], atoms.cell.array, atoms.pbc, name=name, per_atom_arrays=others, settings=settings)


def prepare_item(index: int, name: str | None, structure, inplace: bool, keep_pristine: bool, settings: PreparationSettings) -> Item:
    """Validate, canonicalise and search one structure here. ``name`` None: named only if
    a message needs it (building a formula is not free)."""
    atoms, kind = input_atoms(structure, inplace)
    try:
        prepared, layout = prepare_atoms(atoms, name if name is not None else UNNAMED, settings)
    except InvalidStructureError as exc:
        renamed = named(exc, lambda: naming.name_of(structure, index))
        if renamed is exc:
            raise
        raise renamed from None
    arrays = crystal_arrays(atoms)
    edges = graph_edges(prepared, settings)
    work, pristine = work_copies(atoms, kind, inplace, keep_pristine)
    item = Item(index, name, kind, work, pristine, arrays, prepared.report, prepared.form, edges, source=structure)
    item.seen_by_network(layout)
    return item


def prepared(structures, names, inplace: bool, keep_pristine: bool, errors: str, settings: PreparationSettings) -> Generator:
    """(index, Item or RelaxFailure) for each input, in order, prepared here."""
    for index, structure in enumerate(structures):
        try:
            item: Item | RelaxFailure = prepare_item(index, names[index] if names is not None else None, structure, inplace, keep_pristine, settings)
        except Exception as exc:
            if errors == "raise":
                raise
            item = RelaxFailure(index, given_name(names, structure, index), exc)
        yield index, item


def pooled(structures, names, inplace: bool, keep_pristine: bool, errors: str, options: RelaxOptions, num_workers: int) -> Generator:
    """``prepared``, with validation, canonical form and neighbour search in worker processes.

    This process converts and copies each structure (``shell``) and sends its arrays; the
    workers run the same functions on the same numbers, so the items are the same
    (e3relax_ase.relax.pool_prepare).
    """

    def shell_of(index: int, structure):
        return shell(index, structure, names, inplace, keep_pristine, errors, options.settings)

    entries = prepared_in_pool(structures, shell_of, options.pool, num_workers, options.settings)
    try:
        for index, entry, outcome in entries:
            if isinstance(entry, RaiseLater):
                raise entry.error
            if isinstance(outcome, Exception):
                if errors == "raise":
                    raise outcome
                entry = RelaxFailure(index, entry.name, outcome)
            elif outcome is not None:
                entry.report, entry.form, entry.edges, layout = outcome
                entry.seen_by_network(layout)
            yield index, entry
    finally:
        entries.close()  # cancels the tasks still in flight


def shell(index: int, structure, names, inplace: bool, keep_pristine: bool, errors: str, settings: PreparationSettings):
    """Everything of ``prepare_item`` that needs the Atoms object, and the arrays a worker checks.

    Returns (shell Item, StructureSpec) for a worker, or a finished Item / RelaxFailure
    (a RaiseLater for ``errors="raise"``) when the structure fails here or its arrays are not
    regular (prepared here, as ``prepared``).
    """
    try:
        name = names[index] if names is not None else None  # named on demand
        atoms, kind = input_atoms(structure, inplace)
        numbers = np.asarray(atoms.arrays["numbers"])
        positions = np.asarray(atoms.arrays["positions"], dtype=np.float64)
        cell = np.asarray(atoms.cell.array, dtype=np.float64)
        pbc = np.asarray(atoms.pbc, dtype=bool).reshape(-1)
        lengths = {key: len(value) for key, value in atoms.arrays.items() if key not in ("numbers", "positions")}
        regular = (
            len(numbers) > 0
            and positions.shape == (len(numbers), 3)
            and cell.shape == (3, 3)
            and pbc.shape == (3,)
            and numbers.dtype.kind in "iu"
            and all(n == len(numbers) for n in lengths.values())
        )
        if not regular:  # refused by the first checks: no need for a worker
            return prepare_item(index, given_name(names, structure, index), structure, inplace, keep_pristine, settings)
        # crystal_arrays(atoms), from the arrays read above (the same copies, read once)
        arrays = CrystalArrays(np.array(numbers, dtype=np.int64), np.array(positions), np.array(cell), np.array(pbc))
        work, pristine = work_copies(atoms, kind, inplace, keep_pristine)
        shell = Item(index, name, kind, work, pristine, arrays, None, source=structure)
        return shell, StructureSpec(arrays.numbers, arrays.positions, arrays.cell, arrays.pbc, name, lengths)
    except Exception as exc:
        if errors == "raise":
            return RaiseLater(exc)
        return RelaxFailure(index, given_name(names, structure, index), exc)


def input_atoms(structure, inplace: bool) -> tuple:
    """(ASE Atoms, "ase" | "pymatgen") of an input; ``inplace`` is for ASE input only."""
    atoms, kind = as_atoms(structure)
    if inplace and kind != "ase":
        raise ValueError("inplace=True works on ASE Atoms only; pymatgen input always returns a new Structure")
    return atoms, kind


def work_copies(atoms, kind: str, inplace: bool, keep_pristine: bool) -> tuple:
    """(the Atoms that receives the prediction, an untouched copy for trajectories or None).

    The caller's ASE Atoms is written only with ``inplace``; a pymatgen input was converted,
    so its Atoms is already ours.
    """
    pristine = copy_atoms(atoms) if keep_pristine else None
    work = atoms if (inplace or kind != "ase") else copy_atoms(atoms)
    return work, pristine
