"""Reading structure files, writing them atomically, and saying what an output format loses.

Reading: any format ASE reads (CIF, POSCAR, extxyz, traj, db, ...), every frame of a
multi-frame file. An unreadable file raises :class:`InputFileError` with one line naming it.

Writing: ``write_atomic`` writes into a temporary file in the output's own directory and
renames it over the target (``os.replace``), so an interrupted run (SIGINT, crash) never
leaves a half-written output, and an existing output is replaced only by a complete one; with
``replace=False`` it is never replaced (the file is linked into place, which fails if it exists).

Format losses (measured by round-tripping a Ni slab with FixAtoms, magmoms, charges, tags,
info and pbc [T, T, F] through ASE 3.29; tests/cli/test_cli_relax.py re-checks the table):

| format | drops |
|---|---|
| extxyz | constraints other than FixAtoms/FixCartesian; non-scalar info |
| traj | nothing |
| db, json | info, provenance included |
| vasp (POSCAR) | magmoms, charges, tags, info, constraints other than FixAtoms; sets pbc True (provenance: first line) |
| cif (ASE writer, P1) | constraints, magmoms, charges, tags, info; sets pbc True (provenance: comment block) |
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from e3relax_ase.io.structures import INFO_PREFIX

logger = logging.getLogger(__name__)

# Extensions (lower case) a folder given as input is scanned for; POSCAR*/CONTCAR* too.
STRUCTURE_SUFFIXES = (".cif", ".vasp", ".poscar", ".extxyz", ".xyz", ".traj", ".db", ".json")
EXTENSIONS = {"extxyz": ".extxyz", "traj": ".traj", "db": ".db", "json": ".json", "vasp": ".vasp", "cif": ".cif"}
# An extension decides the format before the name does: ASE's guess reads "POSCAR_x.traj" as vasp.
_BY_EXTENSION = {
    ".cif": "cif",
    ".traj": "traj",
    ".extxyz": "extxyz",
    ".xyz": "extxyz",
    ".db": "db",
    ".json": "json",
    ".vasp": "vasp",
    ".poscar": "vasp",
}

# What each format keeps (see the module docstring): (constraint types kept or "all", other properties kept).
# "provenance": the e3relax_* info keys, in info or in a comment (e3relax_ase.io.provenance).
_KEEPS = {
    "extxyz": (("FixAtoms", "FixCartesian"), {"magmoms", "charges", "tags", "pbc", "info", "provenance"}),
    "traj": ("all", {"magmoms", "charges", "tags", "pbc", "info", "provenance"}),
    "db": ("all", {"magmoms", "charges", "tags", "pbc"}),
    "json": ("all", {"magmoms", "charges", "tags", "pbc"}),
    "vasp": (("FixAtoms",), {"provenance"}),
    "cif": ((), {"provenance"}),
}


# What ASE's readers put in info by themselves (CIF: the file's symmetry, which a relaxed P1
# output no longer has): not worth a warning when an output format drops it.
_READER_INFO = frozenset({"spacegroup", "unit_cell", "occupancy"})


class InputFileError(ValueError):
    """A file that cannot be read as structures; the message names the file and why."""


def expand_inputs(paths) -> list[Path]:
    """Files from the given paths; a directory contributes its structure files (sorted)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            for child in sorted(path.iterdir()):
                name = child.name
                if child.is_file() and (child.suffix.lower() in STRUCTURE_SUFFIXES or name.startswith(("POSCAR", "CONTCAR"))):
                    files.append(child)
        else:
            files.append(path)
    return files


def input_format(path: Path) -> str:
    """The ASE format name of an input file.

    Raises:
        InputFileError: unknown format.
    """
    from ase.io.formats import UnknownFileTypeError, filetype

    if Path(path).suffix.lower() in _BY_EXTENSION:
        return _BY_EXTENSION[Path(path).suffix.lower()]
    try:
        return filetype(str(path), read=True)
    except (UnknownFileTypeError, OSError) as exc:
        raise InputFileError(f"{path}: unknown structure format ({exc})") from None


def read_structures(path: str | os.PathLike, fmt: str | None = None) -> list:
    """Every structure (frame) in a file, as ASE Atoms.

    Raises:
        InputFileError: missing, empty, unknown format, corrupt or truncated file, or no frames.
    """
    import warnings

    import ase.io

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InputFileError(f"{path}: file is empty")
    fmt = fmt or input_format(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ASE's CIF reader warns about harmless tags
            frames = ase.io.read(str(path), index=":", format=fmt)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputFileError(f"{path}: could not be read as {fmt} (corrupt or truncated?): {first}") from None
    if not isinstance(frames, list):
        frames = [frames]
    if not frames:
        raise InputFileError(f"{path}: contains no structures (empty or truncated {fmt} file)")
    return frames


def output_format(path: str | os.PathLike, fmt: str | None = None) -> str:
    """The ASE format to write ``path`` in: ``fmt`` if given, else guessed from the name.

    Raises:
        ValueError: the name says nothing and no format is given.
    """
    if fmt:
        return fmt
    if Path(path).suffix.lower() in _BY_EXTENSION:
        return _BY_EXTENSION[Path(path).suffix.lower()]
    from ase.io.formats import UnknownFileTypeError, filetype

    try:
        return filetype(str(path), read=False)
    except UnknownFileTypeError:
        raise ValueError(f"{path}: cannot tell the output format from the name; pass --format") from None


def holds_many(fmt: str) -> bool:
    """True when the format stores several structures in one file."""
    from ase.io.formats import ioformats

    return fmt in ioformats and not ioformats[fmt].single


def format_losses(atoms, fmt: str) -> list[str]:
    """What writing ``atoms`` as ``fmt`` would lose (empty when nothing of note)."""
    if fmt not in _KEEPS:
        return [f"possibly everything beyond elements, positions and cell (format {fmt!r} not checked)"]
    kept_constraints, keeps = _KEEPS[fmt]
    losses = []
    lost = sorted({type(c).__name__ for c in atoms.constraints if kept_constraints != "all" and type(c).__name__ not in kept_constraints})
    if lost:
        losses.append(f"constraints ({', '.join(lost)})")
    if "magmoms" not in keeps and np.any(atoms.get_initial_magnetic_moments()):
        losses.append("initial magnetic moments")
    if "charges" not in keeps and np.any(atoms.get_initial_charges()):
        losses.append("initial charges")
    if "tags" not in keeps and np.any(atoms.get_tags()):
        losses.append("tags")
    if "pbc" not in keeps and not np.all(atoms.pbc):
        losses.append("non-periodic axes (written as periodic)")
    own = [key for key in atoms.info if not str(key).startswith(INFO_PREFIX) and key not in _READER_INFO]
    if "info" not in keeps and own:
        losses.append(f"info ({', '.join(map(str, own[:3]))}{', ...' if len(own) > 3 else ''})")
    if "provenance" not in keeps and len(own) < len(atoms.info):
        losses.append("provenance (the e3relax_* info keys)")
    return losses


def atomic_write(path: str | os.PathLike, write, binary: bool = False, suffix: str = ".tmp") -> None:
    """Write ``path`` through ``write(fileobj)`` all at once or not at all.

    The data go to a temporary file beside ``path`` (``suffix`` keeps an extension a writer
    may look at), which then replaces ``path`` in one rename. The file gets the mode of the
    file it replaces, else rw-r--r-- (mkstemp's 0600 would hide shared data).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fileobj:
            write(fileobj)
        os.chmod(tmp, (path.stat().st_mode & 0o777) if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class OutputExistsError(FileExistsError):
    """An output file that exists and may not be replaced (no ``--overwrite``)."""


def write_atomic(path: str | os.PathLike, frames: list, fmt: str, *, replace: bool = True, symprec: float | None = None, fsync: bool = False) -> None:
    """Write structures to ``path`` all at once or not at all (temporary file, then one rename).

    Args:
        path: the output file.
        frames: the structures (several only for a format that holds many).
        fmt: the ASE format name. extxyz, cif and vasp carry the provenance keys as
            ``e3relax_ase.io.provenance`` describes.
        replace: False never replaces an existing file: the temporary file is hard-linked to
            ``path``, which fails when ``path`` exists, so no other writer can slip in between
            a check and the write.
        symprec: cif only: write the symmetrized CIF (pymatgen's ``CifWriter`` at this
            tolerance, conventional standard setting) instead of ASE's P1 one.
        fsync: flush the data to the disk before the rename (for files a resumed run relies on).

    Raises:
        OutputExistsError: ``replace`` is False and ``path`` exists.
    """
    import warnings

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not replace and path.exists():
        raise OutputExistsError(f"{path} exists")
    # Keep the real extension: some writers (db) pick their backend from it.
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(handle)
    try:
        if fmt == "db":
            os.unlink(tmp)  # ASE's db writer appends to an existing file
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _write_frames(tmp, frames, fmt, symprec)
        for warning in caught:  # e.g. extxyz skipping non-scalar info: the docs table lists it
            logger.info("%s: %s", path, warning.message)
        if fsync:
            with open(tmp, "rb") as written:
                os.fsync(written.fileno())
        _into_place(tmp, path, replace)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(path: str | os.PathLike, chunks, *, replace: bool = True, fsync: bool = False) -> None:
    """Write the byte strings ``chunks`` to ``path`` at once or not at all (as ``write_atomic``).

    Raises:
        OutputExistsError: ``replace`` is False and ``path`` exists.
    """
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            for chunk in chunks:
                stream.write(chunk)
            if fsync:
                stream.flush()
                os.fsync(stream.fileno())
        _into_place(tmp, path, replace)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _into_place(tmp: str, path: Path, replace: bool) -> None:
    """Give the finished temporary file the name ``path`` (rw-r--r--; mkstemp's 0600 would
    hide shared data): replacing an existing file, or only if there is none."""
    os.chmod(tmp, 0o644)
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError(f"{path} exists") from None
    except OSError:  # a file system without hard links: check, then rename (a short window)
        if path.exists():
            raise OutputExistsError(f"{path} exists") from None
        os.rename(tmp, path)


def _write_frames(target: str, frames: list, fmt: str, symprec: float | None) -> None:
    """Serialise ``frames`` into the file ``target`` (see ``write_atomic``)."""
    import ase.io

    from e3relax_ase.io import provenance

    if fmt == "extxyz":
        ase.io.write(target, [provenance.for_extxyz(atoms) for atoms in frames], format="extxyz")
    elif fmt == "cif":
        with open(target, "w") as stream:
            stream.write("".join(_cif_text(atoms, symprec) for atoms in frames))
    elif fmt == "vasp":
        import io

        buffer = io.StringIO()
        ase.io.write(buffer, frames[0], format="vasp")
        text = buffer.getvalue()
        with open(target, "w") as stream:
            stream.write(provenance.poscar_comment(frames[0]) + "\n" + text.split("\n", 1)[1])
    else:
        ase.io.write(target, frames if len(frames) > 1 or holds_many(fmt) else frames[0], format=fmt)


def _cif_text(atoms, symprec: float | None) -> str:
    """One CIF data block with the provenance comment block inside it (after ``data_``)."""
    import io

    from e3relax_ase.io.provenance import cif_provenance_block

    if symprec is None:
        import ase.io

        buffer = io.BytesIO()
        ase.io.write(buffer, atoms, format="cif")
        text = buffer.getvalue().decode()
    else:
        from pymatgen.io.ase import AseAtomsAdaptor
        from pymatgen.io.cif import CifWriter

        structure = AseAtomsAdaptor.get_structure(_without_calculator(atoms))
        text = str(CifWriter(structure, symprec=symprec))
    lines = text.splitlines(keepends=True)
    at = next((k for k, line in enumerate(lines) if line.startswith("data_")), -1) + 1
    return "".join(lines[:at]) + cif_provenance_block(atoms.info) + "".join(lines[at:])


def _without_calculator(atoms):
    """A copy without calculator (pymatgen's adaptor would carry its results as site properties)."""
    copy = atoms.copy()
    copy.calc = None
    return copy
