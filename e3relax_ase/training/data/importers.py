"""Importers: read (unrelaxed, relaxed) pairs from common layouts into a :class:`PairSet`.

Every importer refuses a pair whose two structures differ in atom count, species or atom order,
with a one-line ``ValueError`` naming the structure id. Supported inputs:

* extended XYZ: frames carrying ``role`` ("unrelaxed"/"relaxed") and ``pair_id`` in ``info``,
  or, without ``role``, frames alternating unrelaxed / relaxed;
* the E3Relax authors' layout: a directory with ``CIF/{id}_U.cif`` + ``CIF/{id}_R.cif`` (or
  ``{id}_unrelaxed.cif`` + ``{id}_relaxed.cif``) and ``train.csv``/``val.csv``/``test.csv``;
* VASP relaxation directories: first and last frame of ``vasprun.xml``, else of ``XDATCAR``, else
  ``POSCAR`` + ``CONTCAR``; a directory of such directories gives one pair per subdirectory;
* ASE trajectories (``.traj``: first and last frame) and ASE databases (rows with ``pair_id``
  and ``role`` key-value pairs, or alternating rows);
* this package's own ``.npz`` pair files.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path

from e3relax_ase.training.data.pair_frames import PAIR_ID_KEY, ROLE_KEY, ROLE_RELAXED, ROLE_UNRELAXED
from e3relax_ase.training.data.pairs import PairSet, load_pairs

logger = logging.getLogger(__name__)

FORMATS = ("auto", "npz", "extxyz", "authors", "vasp", "traj", "db")
SPLIT_NAMES = ("train", "val", "test")
_CIF_PATTERNS = (
    re.compile(r"^(?P<id>.+)_(?P<role>U|R)\.cif$"),
    re.compile(r"^(?P<id>.+)_(?P<role>unrelaxed|relaxed)\.cif$"),
)
_VASP_FILES = ("vasprun.xml", "XDATCAR", "POSCAR", "CONTCAR")


# --- extxyz -------------------------------------------------------------------------------
def group_frames(frames: list, source: str = "input") -> list:
    """Group ASE frames into ``(unrelaxed, relaxed)`` tuples.

    Args:
        frames: ``ase.Atoms`` list. If any frame has ``info["role"]``, every frame must carry
            ``role`` and ``pair_id`` and each pair id exactly one frame of each role (pairs are
            ordered by first appearance); otherwise frames alternate unrelaxed / relaxed.
        source: file name used in error messages.

    Returns:
        list of ``(unrelaxed, relaxed)`` tuples.

    Raises:
        ValueError: on a missing/unknown role, a duplicate or missing partner, or an odd count.
    """
    if any(ROLE_KEY in atoms.info for atoms in frames):
        groups: dict = {}
        for i, atoms in enumerate(frames):
            role = atoms.info.get(ROLE_KEY)
            if PAIR_ID_KEY not in atoms.info or role not in (ROLE_UNRELAXED, ROLE_RELAXED):
                raise ValueError(f"{source}: frame {i} lacks pair_id or has role {role!r} (expected 'unrelaxed' or 'relaxed')")
            pair_id = str(atoms.info[PAIR_ID_KEY])
            slot = groups.setdefault(pair_id, {})
            if role in slot:
                raise ValueError(f"{source}: pair {pair_id!r} has two {role} frames")
            slot[role] = atoms
        out = []
        for pair_id, slot in groups.items():
            for role in (ROLE_UNRELAXED, ROLE_RELAXED):
                if role not in slot:
                    raise ValueError(f"{source}: pair {pair_id!r} has no {role} frame")
            out.append((slot[ROLE_UNRELAXED], slot[ROLE_RELAXED]))
        return out
    if len(frames) % 2:
        raise ValueError(f"{source}: {len(frames)} frames cannot alternate unrelaxed / relaxed")
    return [(frames[i], frames[i + 1]) for i in range(0, len(frames), 2)]


def _default_ids(pairs: list, stem: str) -> list:
    ids = []
    for k, (unrelaxed, relaxed) in enumerate(pairs):
        pair_id = relaxed.info.get(PAIR_ID_KEY, unrelaxed.info.get(PAIR_ID_KEY))
        ids.append(str(pair_id) if pair_id is not None else f"{stem}_{k}")
    return ids


def import_extxyz(path: str | os.PathLike) -> PairSet:
    """Read pairs from an extended XYZ file (see :func:`group_frames` for the frame rules).

    Raises:
        ValueError: on bad grouping or a species/count/order mismatch (naming the pair id).
    """
    from ase.io import read

    path = Path(path)
    frames = read(path, index=":", format="extxyz")
    assert isinstance(frames, list)  # index=":": every frame of the file
    pairs = group_frames(frames, source=path.name)
    return PairSet.from_atoms_pairs(pairs, ids=_default_ids(pairs, path.stem))


# --- the authors' CIF layout --------------------------------------------------------------
def _read_split_ids(csv_path: Path, known: set) -> list:
    """Ids of a split CSV: column ``id`` or ``material_id`` if a header names one, else column 0."""
    with open(csv_path, newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    if not rows:
        return []
    header = [cell.strip().lower() for cell in rows[0]]
    for name in ("id", "material_id"):
        if name in header:
            col = header.index(name)
            return [row[col].strip() for row in rows[1:]]
    body = rows if rows[0][0].strip() in known else rows[1:]
    return [row[0].strip() for row in body]


def _find_cif_pairs(cif_dir: Path) -> dict:
    found: dict = {}
    for cif in sorted(cif_dir.glob("*.cif")):
        for pattern in _CIF_PATTERNS:
            m = pattern.match(cif.name)
            if m:
                role = ROLE_UNRELAXED if m["role"] in ("U", "unrelaxed") else ROLE_RELAXED
                found.setdefault(m["id"], {})[role] = cif
                break
    return found


def _read_cif_pair(pair_id: str, files: dict):
    from ase.io import read

    for role in (ROLE_UNRELAXED, ROLE_RELAXED):
        if role not in files:
            raise ValueError(f"pair {pair_id!r}: no {role} CIF file")
    return read(files[ROLE_UNRELAXED], format="cif"), read(files[ROLE_RELAXED], format="cif")


def import_authors_layout(path: str | os.PathLike) -> dict:
    """Read the E3Relax authors' layout: ``CIF/{id}_U.cif`` + ``CIF/{id}_R.cif`` and split CSVs.

    The CIFs may also sit directly in ``path``, and may be named ``{id}_unrelaxed.cif`` /
    ``{id}_relaxed.cif``. Split files ``train.csv``, ``val.csv``, ``test.csv`` list ids in a
    column named ``id`` or ``material_id`` or else in the first column (header optional).

    Args:
        path: the dataset directory.

    Returns:
        dict split name -> PairSet, in CSV order; ``{"all": PairSet}`` when there are no CSVs.
        Each pair's ``info["split"]`` records its split.

    Raises:
        FileNotFoundError: if no CIF pairs are found.
        ValueError: if a listed id has no CIFs or a pair's structures disagree (naming the id).
    """
    path = Path(path)
    cif_dir = path / "CIF" if (path / "CIF").is_dir() else path
    found = _find_cif_pairs(cif_dir)
    if not found:
        raise FileNotFoundError(f"{cif_dir}: no '{{id}}_U.cif'/'{{id}}_R.cif' files")
    split_files = {name: path / f"{name}.csv" for name in SPLIT_NAMES if (path / f"{name}.csv").is_file()}
    if split_files:
        split_ids = {name: _read_split_ids(f, set(found)) for name, f in split_files.items()}
    else:
        split_ids = {"all": sorted(found)}
    listed = {i for ids in split_ids.values() for i in ids}
    unlisted = set(found) - listed
    if unlisted:
        logger.warning("%d CIF pairs are in no split file and were skipped", len(unlisted))
    out = {}
    for name, ids in split_ids.items():
        pairs, info = [], []
        for pair_id in ids:
            if pair_id not in found:
                raise ValueError(f"pair {pair_id!r}: listed in {name}.csv but has no CIF files")
            pairs.append(_read_cif_pair(pair_id, found[pair_id]))
            info.append({"split": name})
        if pairs:
            out[name] = PairSet.from_atoms_pairs(pairs, ids=ids, info=info, metadata={"source": str(path)})
    return out


# --- VASP ---------------------------------------------------------------------------------
def _is_vasp_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in ("vasprun.xml", "XDATCAR")) or ((path / "POSCAR").is_file() and (path / "CONTCAR").is_file())


def read_vasp_relaxation(path: str | os.PathLike) -> tuple:
    """First and last structure of one VASP relaxation.

    Args:
        path: a directory (``vasprun.xml`` preferred, then ``XDATCAR``, then ``POSCAR`` +
            ``CONTCAR``) or a ``vasprun.xml``/``XDATCAR`` file itself.

    Returns:
        ``(unrelaxed, relaxed)`` ``ase.Atoms``; the relaxed one keeps vasprun's energy.

    Raises:
        FileNotFoundError: if no usable VASP output is present.
    """
    from ase.io import read

    path = Path(path)
    if path.is_file():
        fmt = "vasp-xdatcar" if "XDATCAR" in path.name else "vasp-xml"
        return read(path, index=0, format=fmt), read(path, index=-1, format=fmt)
    if (path / "vasprun.xml").is_file():
        f = path / "vasprun.xml"
        return read(f, index=0, format="vasp-xml"), read(f, index=-1, format="vasp-xml")
    if (path / "XDATCAR").is_file():
        f = path / "XDATCAR"
        return read(f, index=0, format="vasp-xdatcar"), read(f, index=-1, format="vasp-xdatcar")
    if (path / "POSCAR").is_file() and (path / "CONTCAR").is_file():
        return read(path / "POSCAR", format="vasp"), read(path / "CONTCAR", format="vasp")
    raise FileNotFoundError(f"{path}: no vasprun.xml, XDATCAR or POSCAR + CONTCAR")


def import_vasp(path: str | os.PathLike) -> PairSet:
    """Read VASP relaxations: one directory (or file), or a directory of relaxation directories.

    The pair id is the relaxation directory's name.

    Raises:
        FileNotFoundError: if no relaxation is found.
        ValueError: on a species/count/order mismatch (naming the directory).
    """
    path = Path(path)
    if path.is_file() or _is_vasp_dir(path):
        runs = [path]
    else:
        runs = sorted(d for d in path.iterdir() if d.is_dir() and _is_vasp_dir(d))
        if not runs:
            raise FileNotFoundError(f"{path}: no VASP relaxation directories")
    pairs, ids = [], []
    for run in runs:
        pairs.append(read_vasp_relaxation(run))
        ids.append(run.parent.name if run.is_file() else run.name)
    return PairSet.from_atoms_pairs(pairs, ids=ids, info=[{"source": str(r)} for r in runs])


# --- ASE trajectories and databases -------------------------------------------------------
def import_traj(path: str | os.PathLike) -> PairSet:
    """Read ASE trajectories (first frame = unrelaxed, last = relaxed); one pair per file.

    Args:
        path: a ``.traj`` file or a directory of them (pair id = file stem).

    Raises:
        FileNotFoundError: if a directory holds no ``.traj`` files.
        ValueError: if a trajectory has fewer than two frames or its ends disagree.
    """
    from ase.io import read

    path = Path(path)
    files = sorted(path.glob("*.traj")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: no .traj files")
    pairs = []
    for f in files:
        frames = read(f, index=":", format="traj")
        if len(frames) < 2:
            raise ValueError(f"pair {f.stem!r}: trajectory has {len(frames)} frame(s), need 2+")
        pairs.append((frames[0], frames[-1]))
    return PairSet.from_atoms_pairs(pairs, ids=[f.stem for f in files])


def import_ase_db(path: str | os.PathLike) -> PairSet:
    """Read an ASE database: rows with key-value pairs ``pair_id`` and ``role``, or alternating rows.

    Other key-value pairs of both rows become the pair's ``info``; the relaxed row's energy is kept.

    Raises:
        ValueError: on bad grouping or a species/count/order mismatch (naming the pair id).
    """
    from ase.db import connect

    path = Path(path)
    frames = []
    with connect(path) as db:
        for row in db.select(sort="id"):
            atoms = row.toatoms(add_additional_information=False)
            atoms.info = dict(row.key_value_pairs)
            frames.append(atoms)
    pairs = group_frames(frames, source=path.name)
    return PairSet.from_atoms_pairs(pairs, ids=_default_ids(pairs, path.stem))


# --- dispatcher ---------------------------------------------------------------------------
def detect_format(path: str | os.PathLike) -> str:
    """Guess the importer for ``path`` from its suffix or directory contents.

    Raises:
        ValueError: if nothing matches.
    """
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        cif_dir = path / "CIF" if (path / "CIF").is_dir() else path
        if _find_cif_pairs(cif_dir):
            return "authors"
        if _is_vasp_dir(path) or any(d.is_dir() and _is_vasp_dir(d) for d in path.iterdir()):
            return "vasp"
        if any(path.glob("*.traj")):
            return "traj"
        raise ValueError(f"{path}: directory holds no CIF pairs, VASP runs or .traj files")
    if name.endswith(".npz"):
        return "npz"
    if name.endswith((".extxyz", ".xyz")):
        return "extxyz"
    if name.endswith(".traj"):
        return "traj"
    if name.endswith(".db"):
        return "db"
    if "vasprun" in name or "xdatcar" in name:
        return "vasp"
    raise ValueError(f"{path}: cannot tell the pair format from the name; pass format=")


def import_pairs(path: str | os.PathLike, format: str = "auto") -> PairSet:
    """Import pairs from any supported layout (see module docstring) into one PairSet.

    Args:
        path: file or directory.
        format: one of ``FORMATS``; ``"auto"`` guesses with :func:`detect_format`.

    Returns:
        The PairSet; for the authors' layout all splits are joined, each pair's
        ``info["split"]`` naming its split.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: on an unknown format or bad data (one line, naming the structure id).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if format not in FORMATS:
        raise ValueError(f"unknown pair format {format!r}; choose from {', '.join(FORMATS)}")
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "npz":
        return load_pairs(path)
    if fmt == "extxyz":
        return import_extxyz(path)
    if fmt == "authors":
        return PairSet.concatenate(list(import_authors_layout(path).values()))
    if fmt == "vasp":
        return import_vasp(path)
    if fmt == "traj":
        return import_traj(path)
    return import_ase_db(path)
