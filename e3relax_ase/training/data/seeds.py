"""Seed crystals (relaxed structures without pairs) for making teacher-relaxed training pairs.

Sources understood by :func:`load_seed_structures`:

* ``"perov_5"``, ``"carbon_24"``: the csv.gz files (one CIF string per row in column ``cif``) in
  ``data_dir/<name>/``; ``data_dir`` defaults to ``$E3RELAX_SEEDS_DIR``, else to
  ``<repo>/../shared/data/seeds`` of a development checkout;
* ``"aflow"``: the 288 AFLOW prototypes shipped inside pymatgen
  (``pymatgen/analysis/prototypes/aflow_prototypes.json.gz``);
* ``"dcdft"``: the 71 elemental crystals of ``ase.collections.dcdft``;
* ``"pyxtal"``: random symmetric crystals from pyxtal, only if pyxtal is installed;
* a path: a ``.csv``/``.csv.gz`` with a ``cif`` column, a directory of such files or of CIFs, or
  any file ASE reads (all frames).

Every returned ``Atoms`` has ``info["seed_id"]`` = ``"<source>:<id>"``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ase import Atoms

logger = logging.getLogger(__name__)

CSV_SOURCES = ("perov_5", "carbon_24")
NAMED_SOURCES = CSV_SOURCES + ("aflow", "dcdft", "pyxtal")
# Elements pyxtal draws compositions from: common, non-radioactive, DFT- and MLIP-friendly.
PYXTAL_ELEMENTS = (
    "Li",
    "Na",
    "Mg",
    "Al",
    "Si",
    "P",
    "S",
    "K",
    "Ca",
    "Ti",
    "Fe",
    "Cu",
    "Zn",
    "Ga",
    "Sr",
    "Sn",
    "Ba",
    "O",
    "N",
)


def default_seeds_dir() -> Path:
    """``$E3RELAX_SEEDS_DIR`` if set, else ``<repo>/../shared/data/seeds``."""
    env = os.environ.get("E3RELAX_SEEDS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "data" / "seeds"


def aflow_prototypes_path() -> Path:
    """Path of pymatgen's AFLOW prototype file.

    Raises:
        FileNotFoundError: if the installed pymatgen does not ship it.
    """
    import pymatgen.analysis.prototypes as prototypes

    path = Path(prototypes.__file__).parent / "aflow_prototypes.json.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pymatgen's AFLOW prototypes not found in this install")
    return path


def _choose(n_total: int, limit: int | None, rng: np.random.Generator | None) -> np.ndarray:
    """Indices to keep: all, the first ``limit``, or ``limit`` drawn without replacement by ``rng``."""
    if limit is None or limit >= n_total:
        return np.arange(n_total)
    if rng is None:
        return np.arange(limit)
    return np.sort(rng.choice(n_total, size=limit, replace=False))


def _atoms_from_cif_string(text: str):
    from ase.io import read

    return read(io.StringIO(text), format="cif")


def _read_csv_rows(files: Sequence[Path]) -> list:
    rows: list[tuple[str, str]] = []  # (material id, CIF text)
    for f in files:
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt", newline="") as handle:
            for row in csv.DictReader(handle):
                if "cif" not in row:
                    raise ValueError(f"{f}: no 'cif' column")
                rows.append((row.get("material_id") or f"{f.name.split('.')[0]}{len(rows)}", row["cif"]))
    return rows


def _load_csv(files: Sequence[Path], label: str, limit, rng) -> list:
    rows = _read_csv_rows(files)
    out = []
    for i in _choose(len(rows), limit, rng):
        material_id, cif = rows[i]
        atoms = _atoms_from_cif_string(cif)
        atoms.info = {"seed_id": f"{label}:{material_id}"}
        out.append(atoms)
    return out


def _load_aflow(limit, rng) -> list:
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    with gzip.open(aflow_prototypes_path(), "rt") as f:
        entries = json.load(f)
    out = []
    for i in _choose(len(entries), limit, rng):
        structure = Structure.from_dict(entries[i]["snl"])
        atoms = AseAtomsAdaptor.get_atoms(structure)
        atoms.info = {"seed_id": f"aflow:{entries[i]['tags'].get('aflow', i)}"}
        out.append(atoms)
    return out


def _load_dcdft(limit, rng) -> list:
    from ase.collections import dcdft

    names = list(dcdft.names)
    out = []
    for i in _choose(len(names), limit, rng):
        atoms = dcdft[names[i]].copy()
        atoms.info = {"seed_id": f"dcdft:{names[i]}"}
        out.append(atoms)
    return out


def _load_pyxtal(limit, rng) -> list:
    try:
        from pyxtal import pyxtal
    except ImportError as exc:
        raise ImportError("seed source 'pyxtal' needs the optional package pyxtal (pip install pyxtal)") from exc
    rng = rng if rng is not None else np.random.default_rng(0)
    out: list[Atoms] = []
    attempts = 0
    target = 10 if limit is None else limit
    while len(out) < target and attempts < 20 * target:
        attempts += 1
        species = list(rng.choice(PYXTAL_ELEMENTS, size=int(rng.integers(1, 4)), replace=False))
        counts = [int(c) for c in rng.integers(1, 5, size=len(species))]
        group = int(rng.integers(2, 231))
        crystal = pyxtal()
        try:
            crystal.from_random(3, group, species, counts, random_state=int(rng.integers(2**31)))
        except Exception as exc:  # incompatible group/composition: pyxtal raises many types
            logger.debug("pyxtal failed for %s %s in group %d: %s", species, counts, group, exc)
            continue
        if not crystal.valid:
            continue
        atoms = crystal.to_ase()
        atoms.info = {"seed_id": f"pyxtal:{len(out)}-{atoms.get_chemical_formula()}-sg{group}"}
        out.append(atoms)
    return out


def _load_path(path: Path, limit, rng) -> list:
    from ase import Atoms
    from ase.io import read

    if path.is_dir():
        csvs = sorted(path.glob("*.csv.gz")) + sorted(path.glob("*.csv"))
        if csvs:
            return _load_csv(csvs, path.name, limit, rng)
        cifs = sorted(path.glob("*.cif"))
        if not cifs:
            raise FileNotFoundError(f"{path}: no csv or CIF files")
        frames: list[Atoms] = []
        for f in cifs:
            atoms = read(f, format="cif")
            assert isinstance(atoms, Atoms)  # no index: the file's last structure
            atoms.info = {"seed_id": f"{path.name}:{f.stem}"}
            frames.append(atoms)
    elif path.name.endswith((".csv", ".csv.gz")):
        return _load_csv([path], f"{path.parent.name}/{path.name.split('.')[0]}", limit, rng)
    else:
        every = read(path, index=":")
        assert isinstance(every, list)  # index=":": every structure of the file
        frames = every
        for i, atoms in enumerate(frames):
            atoms.info = {"seed_id": str(atoms.info.get("seed_id", f"{path.stem}:{i}"))}
    return [frames[i] for i in _choose(len(frames), limit, rng)]


def load_seed_structures(
    source: str | os.PathLike,
    limit: int | None = None,
    rng: np.random.Generator | None = None,
    data_dir: str | os.PathLike | None = None,
) -> list:
    """Load seed crystals from a named source or a path (see module docstring).

    Args:
        source: ``perov_5``, ``carbon_24``, ``aflow``, ``dcdft``, ``pyxtal`` or a path.
        limit: keep at most this many (for ``pyxtal``: how many to generate, default 10).
        rng: with ``limit``, draw a random subset; without, keep the first ``limit``.
        data_dir: directory holding ``perov_5/`` and ``carbon_24/``.

    Returns:
        list of ``ase.Atoms`` with ``info["seed_id"]``.

    Raises:
        FileNotFoundError: if the source's files are absent.
        ImportError: for ``pyxtal`` when it is not installed.
        ValueError: for an unknown source name.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    name = str(source)
    if name in CSV_SOURCES:
        folder = Path(data_dir) if data_dir is not None else default_seeds_dir()
        files = sorted((folder / name).glob("*.csv.gz"))
        if not files:
            raise FileNotFoundError(f"{folder / name}: no csv.gz seed files (set data_dir or $E3RELAX_SEEDS_DIR)")
        seeds = _load_csv(files, name, limit, rng)
    elif name == "aflow":
        seeds = _load_aflow(limit, rng)
    elif name == "dcdft":
        seeds = _load_dcdft(limit, rng)
    elif name == "pyxtal":
        seeds = _load_pyxtal(limit, rng)
    elif Path(name).exists():
        seeds = _load_path(Path(name), limit, rng)
    else:
        raise ValueError(f"unknown seed source {name!r}: not one of {', '.join(NAMED_SOURCES)} nor an existing path")
    logger.info("loaded %d seeds from %s", len(seeds), name)
    return seeds
