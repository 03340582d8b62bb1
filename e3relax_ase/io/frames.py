"""Reading structure files frame by frame: a frame that cannot be read costs only itself.

``read_frames(path)`` yields one :class:`Frame` per structure of a file, in file order: the
Atoms, or the reason it could not be read (with the line where the problem is, for text
formats). A damaged frame in the middle of a multi-frame file no longer loses the frames
around it, as reading the file whole with ``ase.io.read`` did.

How each format is split:

* extxyz / xyz: our own splitter. A frame is a line holding only its atom count N, a comment
  line, and N atom lines; each frame is parsed alone by ASE's extxyz reader. A frame must be
  followed by the end of the file or by the next count line: otherwise its count was damaged
  and it is refused rather than read short. After a damaged stretch, reading resumes at the
  next line where a whole frame parses. The frames inside a damaged stretch are counted by
  their comment lines (ASE writes ``Properties=`` in every one), so the frames after it keep
  their own indices.
* cif: one frame per ``data_`` block, each parsed alone, with its site list checked for
  duplicated sites (``e3relax_ase.io.cif_sites``).
* traj, db, json: read whole; if that fails, frame by frame by index.
* any other format: read whole (a failure is one error for the file).

File-level problems (missing, empty, unknown format) raise ``files.InputFileError``.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e3relax_ase.io.files import InputFileError, input_format

_COUNT_LINE = re.compile(rb"^\s*(\d+)\s*$")
# What marks an extxyz comment line: ASE (and QUIP, OVITO) write Properties= in every one.
_HEADER_MARKS = (b"Properties=", b"Lattice=")
_BY_INDEX = ("traj", "db", "json")  # formats whose frames can be read one index at a time
_TEXT_FORMATS = ("extxyz", "xyz")


@dataclass(init=False)
class Frame:
    """One structure of a file, or why it could not be read.

    Attributes:
        index: its position in the file, from 0.
        atoms: the structure (None when it could not be read).
        error: why it could not be read, one line, naming the line when known.
        last_index: for a damaged stretch that held several frames, the index of its last one
            (frames ``index..last_index`` are lost together); else equal to ``index``. One
            less than ``index`` for damage that held no frame (a stray line): a warning only.
    """

    index: int
    atoms: Any
    error: str | None
    last_index: int

    # Written out rather than generated so that ``last_index`` is an int once built: the
    # constructor takes None for "equal to index".
    def __init__(self, index: int, atoms: Any = None, error: str | None = None, last_index: int | None = None):
        self.index = index
        self.atoms = atoms
        self.error = error
        self.last_index = index if last_index is None else last_index


def read_frames(path: str | os.PathLike, fmt: str | None = None) -> Iterator[Frame]:
    """Every frame of a file, in order, read one at a time.

    Raises:
        InputFileError: missing, empty or unknown-format file (nothing of it can be read).
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InputFileError(f"{path}: file is empty")
    fmt = fmt or input_format(path)
    if fmt in _TEXT_FORMATS:
        yield from _xyz_frames(path.read_bytes())
    elif fmt == "cif":
        yield from _cif_frames(path.read_bytes())
    else:
        yield from _other_frames(path, fmt)


def first_line(exc: BaseException) -> str:
    """An exception's message as one line (its type when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- extxyz / xyz --------------------------------------------------------------------------


def _xyz_frames(data: bytes) -> Iterator[Frame]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline ends the last line; it starts no new one
    mark = next((m for m in _HEADER_MARKS if m in data), None)  # None: plain xyz
    index, start = 0, 0
    while start < len(lines):
        if not lines[start].strip():
            start += 1  # blank lines between or after frames
            continue
        atoms, end, problem = _parse_xyz_frame(lines, start, mark)
        if atoms is not None:
            yield Frame(index, atoms)
            index += 1
            start = end
            continue
        # A damaged stretch: it ends where the next whole frame parses (or at the end).
        resume = _next_frame_start(lines, start + 1, mark)
        stretch = lines[start:resume]
        n_lost = _count_headers(stretch, mark)
        if n_lost == 0 and len(stretch) == 1 and resume < len(lines) and mark is not None:
            # One line without a comment line, between two frames that read: not a frame but
            # the tail of the one before, cut off by a stray newline. It costs no index.
            stray = f"line {start + 1}: a stray line between frames {index - 1} and {index}, skipped"
            yield Frame(index, error=stray, last_index=index - 1)
            start = resume
            continue
        n_lost = max(1, n_lost)
        where = f"line {problem[0] + 1}" if problem[0] is not None else f"lines {start + 1}-{resume}"
        yield Frame(index, error=f"{where}: {problem[1]}", last_index=index + n_lost - 1)
        index += n_lost
        start = resume


def _parse_xyz_frame(lines: list[bytes], start: int, mark: bytes | None):
    """(Atoms, the line after the frame, None) or (None, None, (problem line or None, problem)).

    ``mark``: what every comment line of the file holds (None for plain xyz); a frame whose
    comment line lacks it is damaged, and a count-like line followed by no such comment line
    (a number cut off an atom line) starts no frame.
    """
    match = _COUNT_LINE.match(lines[start])
    if match is None:
        return None, None, (start, "expected a frame's atom count, found " + _shown(lines[start]))
    if mark is not None and (start + 1 >= len(lines) or mark not in lines[start + 1]):
        return None, None, (start + 1, f"a frame's comment line without {mark.decode()} (damaged, or not a frame start)")
    n_atoms = int(match.group(1))
    end = start + 2 + n_atoms
    if end > len(lines):
        return None, None, (start, f"a frame of {n_atoms} atoms runs past the end of the file (truncated, or a damaged count?)")
    if end < len(lines) and lines[end].strip() and _COUNT_LINE.match(lines[end]) is None and _is_atom_line(lines, start, end):
        # One more atom line after the announced atoms: the count was damaged (read short, the
        # frame would be wrong). Anything else after it is damage to what follows.
        return None, None, (end, f"a frame announced {n_atoms} atoms but more atom lines follow (damaged atom count?)")
    try:
        text = b"\n".join(lines[start:end]).decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = start + text_line_of_byte(lines[start:end], exc.start)
        return None, None, (bad, "not UTF-8 text (damaged bytes)")
    try:
        import ase.io

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            atoms = ase.io.read(io.StringIO(text + "\n"), format="extxyz", index=0)
    except Exception as exc:  # ASE raises many types for a damaged frame
        bad, reason = _diagnose(lines, start, n_atoms)
        return None, None, (bad, reason or first_line(exc))
    return atoms, end, None


def text_line_of_byte(lines: list[bytes], offset: int) -> int:
    """Which of ``lines`` (joined by newlines) holds byte ``offset``."""
    seen = 0
    for k, line in enumerate(lines):
        seen += len(line) + 1
        if offset < seen:
            return k
    return len(lines) - 1


def _diagnose(lines: list[bytes], start: int, n_atoms: int) -> tuple[int, str | None]:
    """The first line of a frame that ASE could not read, and why (None: ASE's message says)."""
    converters = _converters(lines[start + 1])
    if converters is None:
        return start + 1, "a damaged comment line"
    for k in range(start + 2, start + 2 + n_atoms):
        values = lines[k].split()
        if len(values) < len(converters):
            return k, f"an atom line with {len(values)} values where the frame's Properties need {len(converters)}"
        for convert, value in zip(converters, values):
            try:
                ok = convert(value.decode("utf-8")) is not None  # ASE's bool parser returns None
            except (ValueError, UnicodeDecodeError):
                ok = False
            if not ok:
                kind = {"float": "number", "int": "integer", "parse_bool": "logical (T or F)"}.get(convert.__name__, convert.__name__)
                return k, f"{_shown(value)} is not a valid {kind}"
    return start, None


def _is_atom_line(lines: list[bytes], start: int, k: int) -> bool:
    """Whether line ``k`` reads as an atom line of the frame starting at line ``start`` (a
    comment line, even one whose count line was glued to it, is not one)."""
    if any(mark in lines[k] for mark in _HEADER_MARKS):
        return False
    converters = _converters(lines[start + 1])
    if converters is None:
        return True  # cannot tell: take the cautious reading
    values = lines[k].split()
    if len(values) < len(converters):
        return False
    try:
        return all(convert(value.decode("utf-8")) is not None for convert, value in zip(converters, values))
    except (ValueError, UnicodeDecodeError):
        return False


def _converters(comment: bytes):
    """The column parsers of a frame's Properties (None if its comment line cannot be read)."""
    try:
        from ase.io.extxyz import key_val_str_to_dict, parse_properties

        header = key_val_str_to_dict(comment.decode("utf-8").strip())
        return parse_properties(header.get("Properties", "species:S:1:pos:R:3"))[3]
    except Exception:  # noqa: BLE001
        return None


def _next_frame_start(lines: list[bytes], first: int, mark: bytes | None) -> int:
    """The first line from ``first`` on where a whole frame parses; ``len(lines)`` if none."""
    for k in range(first, len(lines)):
        if _COUNT_LINE.match(lines[k]) and _parse_xyz_frame(lines, k, mark)[0] is not None:
            return k
    return len(lines)


def _count_headers(stretch: list[bytes], mark: bytes | None) -> int:
    """How many frames a damaged stretch held: its comment lines, a line with Properties= or
    Lattice= after a line with neither (so a comment line cut in two counts once, and one whose
    own mark was damaged still counts by the other); plain xyz: its count lines."""
    if mark is None:
        return sum(1 for line in stretch if _COUNT_LINE.match(line))
    headers = [any(m in line for m in _HEADER_MARKS) for line in stretch]
    return sum(1 for j, header in enumerate(headers) if header and not (j and headers[j - 1]))


def _shown(line: bytes) -> str:
    text = line.decode("utf-8", "replace").strip()
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


# --- cif -----------------------------------------------------------------------------------


def _cif_frames(data: bytes) -> Iterator[Frame]:
    from e3relax_ase.io.cif_sites import DuplicateSitesError, check_sites

    lines = data.split(b"\n")
    starts = [k for k, line in enumerate(lines) if line.lstrip().lower().startswith(b"data_")]
    if not starts:
        yield Frame(0, error="could not be read as cif (corrupt or truncated?): no data_ block")
        return
    if starts[0] != 0:
        starts[0] = 0  # comments before the first block belong to it
    for index, (start, stop) in enumerate(zip(starts, starts[1:] + [len(lines)])):
        block = b"\n".join(lines[start:stop])
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = start + text_line_of_byte(lines[start:stop], exc.start)
            yield Frame(index, error=f"line {bad + 1}: not UTF-8 text (damaged bytes)")
            continue
        where = f"the block at line {start + 1}" if len(starts) > 1 else "it"
        try:
            import ase.io

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ASE's CIF reader warns about harmless tags
                structures = ase.io.read(io.StringIO(text), format="cif", index=":")
            if structures:
                check_sites(text)
        except DuplicateSitesError as exc:
            yield Frame(index, error=f"{where}: {exc}" if len(starts) > 1 else str(exc))
            continue
        except Exception as exc:  # noqa: BLE001
            yield Frame(index, error=f"could not be read as cif (corrupt or truncated?), {where}: {first_line(exc)}")
            continue
        if not structures:
            yield Frame(index, error=f"contains no structures (empty or truncated cif), {where}")
            continue
        yield Frame(index, structures[0])


# --- everything else -----------------------------------------------------------------------


def _other_frames(path: Path, fmt: str) -> Iterator[Frame]:
    import ase.io

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frames = ase.io.read(str(path), index=":", format=fmt)
    except Exception as exc:  # noqa: BLE001
        whole_error = first_line(exc)
    else:
        frames = frames if isinstance(frames, list) else [frames]
        if not frames:
            raise InputFileError(f"{path}: contains no structures (empty or truncated {fmt} file)")
        for index, atoms in enumerate(frames):
            yield Frame(index, atoms)
        return
    count = _count_frames(path, fmt) if fmt in _BY_INDEX else None
    if not count:
        raise InputFileError(f"{path}: could not be read as {fmt} (corrupt or truncated?): {whole_error}")
    for index in range(count):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                one = ase.io.read(str(path), index=index, format=fmt)  # an int index reads one Atoms
        except Exception as exc:  # noqa: BLE001
            yield Frame(index, error=f"frame could not be read as {fmt}: {first_line(exc)}")
            continue
        yield Frame(index, one)


def _count_frames(path: Path, fmt: str) -> int | None:
    """How many frames a traj / db file says it holds (None when it cannot tell)."""
    try:
        if fmt == "traj":
            from ase.io.trajectory import Trajectory

            with Trajectory(str(path)) as trajectory:
                return len(trajectory)
        import ase.db

        with ase.db.connect(str(path), type=fmt) as database:
            return database.count()
    except Exception:  # noqa: BLE001
        return None
