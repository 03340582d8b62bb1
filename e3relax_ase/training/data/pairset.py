"""The in-memory set of (unrelaxed, relaxed) crystal pairs: :class:`PairSet`, and one :class:`Pair`.

The arrays, their names and shapes are those of the pair file, described in
:mod:`e3relax_ase.training.data.pairs`; the conversion to and from ASE frames follows
:mod:`e3relax_ase.training.data.pair_frames`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from e3relax_ase.keys import (
    PAIR_CELL_RELAXED,
    PAIR_CELL_UNRELAXED,
    PAIR_ENERGY_PER_ATOM_RELAXED,
    PAIR_N_ATOMS,
    PAIR_NUMBERS,
    PAIR_OFFSETS,
    PAIR_PBC,
    PAIR_POS_RELAXED,
    PAIR_POS_UNRELAXED,
)
from e3relax_ase.training.data.pair_frames import (
    PAIR_ID_KEY,
    ROLE_KEY,
    ROLE_RELAXED,
    ROLE_UNRELAXED,
    _energy_per_atom,
    check_same_atoms,
    merge_frame_info,
    to_jsonable,
)


class Pair(NamedTuple):
    """The arrays of one pair (copies, safe to modify)."""

    id: str
    numbers: np.ndarray  # [n_atoms] int64
    pos_unrelaxed: np.ndarray  # [n_atoms, 3] Å
    pos_relaxed: np.ndarray  # [n_atoms, 3] Å
    cell_unrelaxed: np.ndarray  # [3, 3] rows are lattice vectors, Å
    cell_relaxed: np.ndarray  # [3, 3] Å
    pbc: np.ndarray  # [3] bool
    energy_per_atom_relaxed: float  # eV/atom, NaN = unknown
    info: dict


@dataclass(init=False)
class PairSet:
    """A set of (unrelaxed, relaxed) crystal pairs held as flat arrays (see module docstring).

    The fields are named as the arrays of the file (``keys.PAIR_*``). ``positions_unrelaxed`` and
    ``positions_relaxed`` are read-only aliases of ``pos_unrelaxed`` / ``pos_relaxed``.
    """

    ids: np.ndarray  # [n] str
    n_atoms: np.ndarray  # [n] int64
    offsets: np.ndarray  # [n + 1] int64
    numbers: np.ndarray  # [N] int64
    pos_unrelaxed: np.ndarray  # [N, 3] Å
    pos_relaxed: np.ndarray  # [N, 3] Å
    cell_unrelaxed: np.ndarray  # [n, 3, 3] Å, rows are lattice vectors
    cell_relaxed: np.ndarray  # [n, 3, 3] Å
    pbc: np.ndarray  # [n, 3] bool
    energy_per_atom_relaxed: np.ndarray  # [n] eV/atom, NaN = unknown
    metadata: dict
    info: list[dict]  # n dicts

    # Written out rather than generated so that the optional fields have their types once
    # built: None (the default) means every axis periodic, unknown energies, no metadata, and
    # an empty dict per pair.
    def __init__(
        self,
        ids: ArrayLike,
        n_atoms: ArrayLike,
        offsets: ArrayLike,
        numbers: ArrayLike,
        pos_unrelaxed: ArrayLike,
        pos_relaxed: ArrayLike,
        cell_unrelaxed: ArrayLike,
        cell_relaxed: ArrayLike,
        pbc: ArrayLike | None = None,
        energy_per_atom_relaxed: ArrayLike | None = None,
        metadata: dict | None = None,
        info: Iterable[dict] | None = None,
    ):
        self.ids = np.asarray(ids, dtype=str).reshape(-1)
        self.n_atoms = np.asarray(n_atoms, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.numbers = np.asarray(numbers, dtype=np.int64)
        self.pos_unrelaxed = np.asarray(pos_unrelaxed, dtype=np.float64)
        self.pos_relaxed = np.asarray(pos_relaxed, dtype=np.float64)
        self.cell_unrelaxed = np.asarray(cell_unrelaxed, dtype=np.float64)
        self.cell_relaxed = np.asarray(cell_relaxed, dtype=np.float64)
        n = len(self.ids)
        self.pbc = np.asarray(np.ones((n, 3), dtype=bool) if pbc is None else pbc, dtype=bool)
        self.energy_per_atom_relaxed = np.asarray(np.full(n, np.nan) if energy_per_atom_relaxed is None else energy_per_atom_relaxed, dtype=np.float64)
        self.metadata = dict(metadata or {})
        self.info = [{} for _ in range(n)] if info is None else [dict(d) for d in info]

    # --- sizes and aliases ------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def positions_unrelaxed(self) -> np.ndarray:
        """[N, 3] Å, alias of ``pos_unrelaxed``."""
        return self.pos_unrelaxed

    @property
    def positions_relaxed(self) -> np.ndarray:
        """[N, 3] Å, alias of ``pos_relaxed``."""
        return self.pos_relaxed

    def atom_slice(self, k: int) -> slice:
        """The slice of the per-atom arrays belonging to pair ``k``."""
        return slice(int(self.offsets[k]), int(self.offsets[k + 1]))

    def pair_index(self) -> np.ndarray:
        """Index of the pair each atom belongs to.

        Returns:
            [N] int64.
        """
        return np.repeat(np.arange(len(self), dtype=np.int64), self.n_atoms)

    def pair(self, k: int) -> Pair:
        """Return the arrays of pair ``k`` (copies).

        Raises:
            IndexError: if ``k`` is out of range.
        """
        n = len(self)
        if not -n <= k < n:
            raise IndexError(f"pair index {k} out of range for {n} pairs")
        k = k % n
        s = self.atom_slice(k)
        return Pair(
            id=str(self.ids[k]),
            numbers=self.numbers[s].copy(),
            pos_unrelaxed=self.pos_unrelaxed[s].copy(),
            pos_relaxed=self.pos_relaxed[s].copy(),
            cell_unrelaxed=self.cell_unrelaxed[k].copy(),
            cell_relaxed=self.cell_relaxed[k].copy(),
            pbc=self.pbc[k].copy(),
            energy_per_atom_relaxed=float(self.energy_per_atom_relaxed[k]),
            info=dict(self.info[k]),
        )

    # --- selection and joining --------------------------------------------------------
    def subset(self, indices: Sequence[int] | np.ndarray) -> PairSet:
        """Return a new PairSet with the pairs at ``indices`` (ints, in that order, or a bool mask).

        Raises:
            IndexError: if an index is out of range.
        """
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise IndexError(f"boolean mask of shape {idx.shape} for {len(self)} pairs")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"subset index out of range for {len(self)} pairs")
        idx = idx % max(len(self), 1)
        counts = self.n_atoms[idx]  # [m]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [m + 1]
        # Atom j of the new set comes from old atom start[pair] + (j - new_offset[pair]).
        atom_idx = np.repeat(self.offsets[idx] - offsets[:-1], counts) + np.arange(offsets[-1])
        return PairSet(
            ids=self.ids[idx],
            n_atoms=counts,
            offsets=offsets,
            numbers=self.numbers[atom_idx],
            pos_unrelaxed=self.pos_unrelaxed[atom_idx],
            pos_relaxed=self.pos_relaxed[atom_idx],
            cell_unrelaxed=self.cell_unrelaxed[idx],
            cell_relaxed=self.cell_relaxed[idx],
            pbc=self.pbc[idx],
            energy_per_atom_relaxed=self.energy_per_atom_relaxed[idx],
            metadata=dict(self.metadata),
            info=[dict(self.info[i]) for i in idx],
        )

    @staticmethod
    def concatenate(pairsets: Sequence[PairSet]) -> PairSet:
        """Join pair sets in order.

        Metadata is kept if all sets share it; otherwise the keys whose values all sets share
        (the teacher, the licence) stay at the top level, next to
        ``"concatenated_from": [each set's metadata]``, so a data card still finds them.

        Raises:
            ValueError: if ``pairsets`` is empty.
        """
        pairsets = list(pairsets)
        if not pairsets:
            raise ValueError("cannot concatenate an empty list of pair sets")
        counts = np.concatenate([p.n_atoms for p in pairsets]).astype(np.int64)
        metadatas = [p.metadata for p in pairsets]
        if all(m == metadatas[0] for m in metadatas):
            metadata = dict(metadatas[0])
        else:
            shared = {k: v for k, v in metadatas[0].items() if all(k in m and m[k] == v for m in metadatas[1:])}
            metadata = {**shared, "concatenated_from": metadatas}
        return PairSet(
            ids=np.concatenate([p.ids for p in pairsets]),
            n_atoms=counts,
            offsets=np.concatenate([[0], np.cumsum(counts)]),
            numbers=np.concatenate([p.numbers for p in pairsets]),
            pos_unrelaxed=np.concatenate([p.pos_unrelaxed.reshape(-1, 3) for p in pairsets]),
            pos_relaxed=np.concatenate([p.pos_relaxed.reshape(-1, 3) for p in pairsets]),
            cell_unrelaxed=np.concatenate([p.cell_unrelaxed.reshape(-1, 3, 3) for p in pairsets]),
            cell_relaxed=np.concatenate([p.cell_relaxed.reshape(-1, 3, 3) for p in pairsets]),
            pbc=np.concatenate([p.pbc.reshape(-1, 3) for p in pairsets]),
            energy_per_atom_relaxed=np.concatenate([p.energy_per_atom_relaxed for p in pairsets]),
            metadata=metadata,
            info=[d for p in pairsets for d in p.info],
        )

    # --- checks -----------------------------------------------------------------------
    def validate(self) -> PairSet:
        """Check shapes, offsets, finiteness, cell orientation and unique ids.

        Atom count and order agree between the two structures by construction (one ``numbers``
        array); importers check that before building a PairSet.

        Returns:
            self, so that ``PairSet(...).validate()`` chains.

        Raises:
            ValueError: with a one-line message naming the first problem found.
        """
        n = len(self.ids)
        n_total = len(self.numbers)
        expect = {
            PAIR_N_ATOMS: (n,),
            PAIR_OFFSETS: (n + 1,),
            PAIR_NUMBERS: (n_total,),
            PAIR_POS_UNRELAXED: (n_total, 3),
            PAIR_POS_RELAXED: (n_total, 3),
            PAIR_CELL_UNRELAXED: (n, 3, 3),
            PAIR_CELL_RELAXED: (n, 3, 3),
            PAIR_PBC: (n, 3),
            PAIR_ENERGY_PER_ATOM_RELAXED: (n,),
        }
        for name, shape in expect.items():
            got = getattr(self, name).shape
            if got != shape:
                raise ValueError(f"pair set: {name} has shape {got}, expected {shape}")
        if len(self.info) != n:
            raise ValueError(f"pair set: info has {len(self.info)} entries for {n} pairs")
        if self.offsets[0] != 0 or self.offsets[-1] != n_total:
            raise ValueError(f"pair set: offsets must run from 0 to {n_total}, got {self.offsets[0]}..{self.offsets[-1]}")
        if np.any(self.n_atoms < 1):
            k = int(np.flatnonzero(self.n_atoms < 1)[0])
            raise ValueError(f"pair {self.ids[k]!r} (index {k}): has no atoms")
        bad = np.flatnonzero(np.diff(self.offsets) != self.n_atoms)
        if bad.size:
            k = int(bad[0])
            raise ValueError(f"pair {self.ids[k]!r} (index {k}): offsets not monotone or disagree with n_atoms")
        bad_z = np.flatnonzero((self.numbers < 1) | (self.numbers > 118))
        if bad_z.size:
            k = int(np.searchsorted(self.offsets, bad_z[0], side="right") - 1)
            raise ValueError(f"pair {self.ids[k]!r} (index {k}): atomic number out of 1..118")
        owner = self.pair_index()
        for name in (PAIR_POS_UNRELAXED, PAIR_POS_RELAXED):
            bad_atom = np.flatnonzero(~np.isfinite(getattr(self, name)).all(axis=1))
            if bad_atom.size:
                k = int(owner[bad_atom[0]])
                raise ValueError(f"pair {self.ids[k]!r} (index {k}): {name} is not finite")
        for name in (PAIR_CELL_UNRELAXED, PAIR_CELL_RELAXED):
            cells = getattr(self, name)
            bad = np.flatnonzero(~np.isfinite(cells).reshape(n, 9).all(axis=1))
            if bad.size:
                k = int(bad[0])
                raise ValueError(f"pair {self.ids[k]!r} (index {k}): {name} is not finite")
            det = np.linalg.det(cells) if n else np.zeros(0)
            bad = np.flatnonzero(det <= 0)
            if bad.size:
                k = int(bad[0])
                raise ValueError(f"pair {self.ids[k]!r} (index {k}): det({name}) = {det[k]:.4g} <= 0 (cells must be right-handed, rows = lattice vectors)")
        unique, counts = np.unique(self.ids, return_counts=True)
        if np.any(counts > 1):
            raise ValueError(f"pair set: id {unique[counts > 1][0]!r} occurs {counts.max()} times")
        return self

    # --- ASE conversion ---------------------------------------------------------------
    def to_atoms_pairs(self) -> list:
        """Convert to a list of ``(unrelaxed, relaxed)`` ``ase.Atoms`` tuples.

        The unrelaxed frame carries ``pair_id`` and ``role``; the relaxed frame carries those and
        the pair's free ``info`` and, when known, its energy as a single-point calculator.

        Returns:
            list of ``(ase.Atoms, ase.Atoms)``.
        """
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator

        out = []
        for k in range(len(self)):
            p = self.pair(k)
            unrelaxed = Atoms(numbers=p.numbers, positions=p.pos_unrelaxed, cell=p.cell_unrelaxed, pbc=p.pbc)
            relaxed = Atoms(numbers=p.numbers, positions=p.pos_relaxed, cell=p.cell_relaxed, pbc=p.pbc)
            unrelaxed.info = {PAIR_ID_KEY: p.id, ROLE_KEY: ROLE_UNRELAXED}
            relaxed.info = {PAIR_ID_KEY: p.id, ROLE_KEY: ROLE_RELAXED, **p.info}
            if np.isfinite(p.energy_per_atom_relaxed):
                relaxed.calc = SinglePointCalculator(relaxed, energy=p.energy_per_atom_relaxed * len(relaxed))
            out.append((unrelaxed, relaxed))
        return out

    @classmethod
    def from_atoms_pairs(
        cls,
        pairs: Iterable,
        ids: Sequence[str] | None = None,
        info: Sequence[dict] | None = None,
        metadata: dict | None = None,
    ) -> PairSet:
        """Build a PairSet from ``(unrelaxed, relaxed)`` ``ase.Atoms`` tuples.

        Args:
            pairs: iterable of ``(ase.Atoms, ase.Atoms)``.
            ids: one id per pair; default: the frames' ``info["pair_id"]``, else ``pair_{k}``.
            info: one dict per pair; default: the union of both frames' ``info`` without
                ``pair_id``/``role`` (where the two disagree the relaxed value is kept and the
                unrelaxed one stored as ``unrelaxed_<key>``).
            metadata: dataset-level metadata.

        Returns:
            A validated PairSet; the relaxed energy comes from the relaxed frame's calculator.

        Raises:
            ValueError: if a pair's atom counts, species or order differ (naming the pair id).
        """
        pairs = list(pairs)
        if ids is not None and len(ids) != len(pairs):
            raise ValueError(f"got {len(ids)} ids for {len(pairs)} pairs")
        if info is not None and len(info) != len(pairs):
            raise ValueError(f"got {len(info)} info dicts for {len(pairs)} pairs")
        id_list, info_list, energies = [], [], []
        numbers, pos_u, pos_r, cell_u, cell_r, pbc = [], [], [], [], [], []
        for k, (unrelaxed, relaxed) in enumerate(pairs):
            if ids is not None:
                pair_id = str(ids[k])
            else:
                pair_id = str(relaxed.info.get(PAIR_ID_KEY, unrelaxed.info.get(PAIR_ID_KEY, f"pair_{k}")))
            check_same_atoms(pair_id, unrelaxed, relaxed)
            id_list.append(pair_id)
            info_list.append(dict(info[k]) if info is not None else merge_frame_info(unrelaxed.info, relaxed.info))
            energies.append(_energy_per_atom(relaxed))
            numbers.append(relaxed.numbers)
            pos_u.append(unrelaxed.positions)
            pos_r.append(relaxed.positions)
            cell_u.append(unrelaxed.cell.array)
            cell_r.append(relaxed.cell.array)
            pbc.append(relaxed.pbc)
        counts = np.array([len(z) for z in numbers], dtype=np.int64)
        return cls(
            ids=np.array(id_list, dtype=str),
            n_atoms=counts,
            offsets=np.concatenate([[0], np.cumsum(counts)]),
            numbers=np.concatenate(numbers) if numbers else np.zeros(0, np.int64),
            pos_unrelaxed=np.concatenate(pos_u) if pos_u else np.zeros((0, 3)),
            pos_relaxed=np.concatenate(pos_r) if pos_r else np.zeros((0, 3)),
            cell_unrelaxed=np.array(cell_u).reshape(-1, 3, 3),
            cell_relaxed=np.array(cell_r).reshape(-1, 3, 3),
            pbc=np.array(pbc, dtype=bool).reshape(-1, 3),
            energy_per_atom_relaxed=np.array(energies, dtype=np.float64),
            metadata=to_jsonable(metadata or {}),
            info=[to_jsonable(d) for d in info_list],
        ).validate()
