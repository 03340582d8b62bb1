"""A multi-frame output written chunk by chunk, so that a killed run keeps what it finished.

The results of one big input (a 100,000-frame extxyz) used to be written only when its last
frame was done: a run killed after an hour left nothing. Now each chunk of finished frames is
committed to a folder beside the output, ``.NAME.e3relax-parts/``:

* ``part-000001.EXT``: the chunk's relaxed frames, in input order, written to a temporary file,
  flushed to the disk and renamed into place;
* ``part-000001.json``: its manifest, written the same way after it: which input frames the
  data file holds. A part counts only once its manifest exists, so a run killed at any moment
  leaves complete parts and, at most, a data file without manifest, which the next run deletes.

When every frame of the input is done, the parts are joined into the output in input order
(extxyz and cif byte for byte, other formats through ASE) by one rename, and the folder is
removed. An input that finishes within its first chunk is written directly, without parts.

``--resume`` reads the manifests and relaxes only the frames no part holds (frames that failed
are tried again, and reported again if they fail again). The folder also records what its results depend on (the input file's size and
modification time, the checkpoint's sha256, the relaxation options); a resume with anything
different is refused, so one output never mixes two runs' results.
"""

from __future__ import annotations

import heapq
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from e3relax_ase.io.files import write_atomic, write_bytes_atomic

if TYPE_CHECKING:
    from ase import Atoms

PARTS_SUFFIX = ".e3relax-parts"
DISCARDED = ".discarded-"  # a parts folder being deleted: PARTS_SUFFIX + DISCARDED + pid (and ".new-" + pid: being made)
IDENTITY_FILE = "run.json"
_MANIFEST = re.compile(r"^part-(\d{6})\.json$")
_BYTE_JOINED = ("extxyz", "cif")  # formats whose frames can be cut out of a file and concatenated


class ResumeMismatchError(ValueError):
    """Unfinished parts made from another input or with other settings."""


def parts_dir(output: Path) -> Path:
    return output.parent / f".{output.name}{PARTS_SUFFIX}"


class StreamedOutput:
    """The parts of one multi-frame output (see the module docstring).

    Args:
        output: the final output file.
        fmt: its ASE format.
        identity: what the results depend on (JSON-serialisable); a resume must match it.
    """

    def __init__(self, output: Path, fmt: str, identity: dict):
        self.output = Path(output)
        self.fmt = fmt
        self.identity = identity
        self.folder = parts_dir(self.output)
        self._next_part = 1

    @property
    def started(self) -> bool:
        return self.folder.is_dir()

    def finished_frames(self, clean: bool = True) -> set[int]:
        """The input frames earlier parts hold. ``clean`` deletes what a killed run left half
        done (a data file without manifest, temporary files).

        Raises:
            ResumeMismatchError: the parts were made from another input or with other settings.
        """
        if not self.started:
            return set()
        try:
            recorded = json.loads((self.folder / IDENTITY_FILE).read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded != json.loads(json.dumps(self.identity, sort_keys=True)):
            raise ResumeMismatchError(
                f"the unfinished results in {self.folder} were made from another version of the input or with other "
                "settings (checkpoint, options); --overwrite discards them"
            )
        manifests = self._manifests()
        done = {int(i) for manifest in manifests.values() for i in manifest["frames"]}
        if clean:
            self._clean(manifests)
        self._next_part = max(manifests, default=0) + 1
        return done

    def _clean(self, manifests: dict) -> None:
        """Delete what a killed run left half done: a data file without manifest, temporary files."""
        kept = {manifest["data"] for manifest in manifests.values()} | {IDENTITY_FILE}
        kept |= {f"part-{number:06d}.json" for number in manifests}
        for leftover in self.folder.iterdir():
            if leftover.name not in kept:
                leftover.unlink()

    def discard(self) -> None:
        """Remove the parts. The folder is first renamed out of the way in one step, so a run
        killed while deleting leaves no half-deleted parts for a resume to trust (what is left
        under the other name goes with the next claim of the output, ``claims``)."""
        if not self.folder.exists():
            return
        doomed = self.folder.with_name(f"{self.folder.name}{DISCARDED}{os.getpid()}")
        os.replace(self.folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def commit(self, relaxed: list) -> None:
        """Add one part: ``relaxed``, (index, Atoms) pairs in input order."""
        if not self.started:  # the folder appears with its identity, in one rename
            fresh = self.folder.with_name(f"{self.folder.name}.new-{os.getpid()}")
            fresh.mkdir(parents=True)
            _write_text(fresh / IDENTITY_FILE, json.dumps(self.identity, sort_keys=True))
            os.replace(fresh, self.folder)
        number = self._next_part
        self._next_part += 1
        data = f"part-{number:06d}{self.output.suffix or '.' + self.fmt}"
        write_atomic(self.folder / data, [atoms for _, atoms in relaxed], self.fmt, replace=False, fsync=True)
        _write_text(self.folder / f"part-{number:06d}.json", json.dumps({"frames": [index for index, _ in relaxed], "data": data}))

    def finish(self, replace: bool) -> int:
        """Join every part into the output (in input order) and remove the parts; returns the
        number of frames written (0: nothing written, as no frame was relaxed).

        Raises:
            OutputExistsError: ``replace`` is False and the output exists.
        """
        parts = [m for _, m in sorted(self._manifests().items())]
        n_frames = sum(len(m["frames"]) for m in parts)
        if n_frames:
            if self.fmt in _BYTE_JOINED:
                write_bytes_atomic(self.output, self._frames_in_order(parts), replace=replace)
            else:
                import ase.io

                frames: list[tuple[int, Atoms]] = []
                for manifest in parts:
                    frames += zip(manifest["frames"], ase.io.read(self.folder / manifest["data"], ":", format=self.fmt))
                write_atomic(self.output, [atoms for _, atoms in sorted(frames, key=lambda pair: pair[0])], self.fmt, replace=replace)
        self.discard()
        return n_frames

    def _manifests(self) -> dict[int, dict]:
        """The complete parts: {number: manifest} (a manifest whose data file is gone, which no
        run of ours leaves, does not count)."""
        manifests = {}
        for path in self.folder.iterdir():
            match = _MANIFEST.match(path.name)
            if match:
                try:
                    manifest = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue  # cannot happen for a renamed-into-place file; be safe anyway
                if (self.folder / manifest["data"]).is_file():
                    manifests[int(match.group(1))] = manifest
        return manifests

    def _frames_in_order(self, parts: list[dict]):
        """Each frame's bytes, in input order: part after part when their frames do not
        interleave (the usual case, read one part at a time), else merged."""
        ranges = [(m["frames"][0], m["frames"][-1]) for m in parts]
        ordered = sorted(range(len(parts)), key=lambda k: ranges[k][0])
        interleaved = any(ranges[a][1] > ranges[b][0] for a, b in zip(ordered, ordered[1:]))
        if not interleaved:
            for k in ordered:
                yield from self._cut(parts[k])
            return
        merged = heapq.merge(*(zip(m["frames"], self._cut(m)) for m in parts), key=lambda pair: pair[0])
        for _, chunk in merged:
            yield chunk

    def _cut(self, manifest: dict) -> list[bytes]:
        data = (self.folder / manifest["data"]).read_bytes()
        chunks = _cut_extxyz(data) if self.fmt == "extxyz" else _cut_cif(data)
        if len(chunks) != len(manifest["frames"]):
            raise ValueError(f"{self.folder / manifest['data']} holds {len(chunks)} frames, its manifest {len(manifest['frames'])}")
        return chunks


def _cut_extxyz(data: bytes) -> list[bytes]:
    """The frames of an extxyz file we wrote (count line, comment, N atom lines each)."""
    lines = data.split(b"\n")
    chunks, start = [], 0
    while start < len(lines) and lines[start].strip():
        end = start + 2 + int(lines[start])
        chunks.append(b"\n".join(lines[start:end]) + b"\n")
        start = end
    return chunks


def _cut_cif(data: bytes) -> list[bytes]:
    """The data blocks of a CIF we wrote (each starts at its ``data_`` line)."""
    lines = data.splitlines(keepends=True)
    starts = [k for k, line in enumerate(lines) if line.startswith(b"data_")]
    starts[0] = 0  # a header before the first block (pymatgen's comment) stays with it
    return [b"".join(lines[a:b]) for a, b in zip(starts, starts[1:] + [len(lines)])]


def _write_text(path: Path, text: str) -> None:
    write_bytes_atomic(path, [text.encode()], replace=True, fsync=True)
