"""The files of one ``e3relax-ase relax`` run: each input read frame by frame, its outputs
decided, claimed and checked, and its results written as the chunks that hold them finish.

One :class:`FileJob` per input file. Its output takes one of three shapes:

* ``single``: one structure, one output file, written when its result comes;
* ``per_frame``: a multi-frame input into a format that holds one structure (POSCAR): one
  file per frame, each written when its result comes;
* ``stream``: a multi-frame input into a multi-frame format: written through
  ``e3relax_ase.io.streamed`` (parts committed chunk by chunk, joined at the end), so a killed run
  keeps its finished frames and ``--resume`` continues from them.

Safety rules (docs/reliability.md): an output never replaces an input, a file this run did
not write (unless ``--overwrite``), or the output of another input of the run; each output is
claimed with a lock file (``e3relax_ase.io.claims``) before anything is relaxed for it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from e3relax_ase.cli.relax_records import SUMMARY_KEYS, FrameRecord, OutputRules, first_line, json_value
from e3relax_ase.io.structures import INFO_INDEX, INFO_SOURCE

if TYPE_CHECKING:
    from e3relax_ase.io.claims import OutputClaim
    from e3relax_ase.io.streamed import StreamedOutput

logger = logging.getLogger("e3relax_ase.cli.relax")


class FileJob:
    """One input file on its way through the run (see the module docstring)."""

    def __init__(self, path: Path, rules: OutputRules):
        self.path = Path(path)
        self.rules = rules
        self.multi = False
        self.n_frames = 0
        self.output: Path | None = None
        self.fmt: str | None = None
        self.mode = "single"
        self.records: dict = {}  # index (None for the file) -> FrameRecord
        self.pending: set = set()  # frames sent to the relaxer, result not yet in
        self.waiting: list = []  # (index, Atoms) relaxed, not yet written
        self.written: list = []  # outputs written
        self.dropped: list = []  # what the output format loses
        self.stream: StreamedOutput | None = None  # mode "stream", once rank 0 checked the outputs
        self.claim: OutputClaim | None = None
        self.accepted = False  # opened, and its outputs may be written

    # --- opening ---------------------------------------------------------------------------
    def open(self) -> list:
        """Read the input, decide and claim its outputs; the (index, Atoms) frames to relax.

        Problems are recorded and logged here (one ``ERROR:`` line each), never raised.
        """
        from e3relax_ase.io.files import InputFileError
        from e3relax_ase.io.frames import read_frames

        try:
            frames = list(read_frames(self.path))
        except InputFileError as exc:
            return self._fail_file(str(exc) if str(exc).startswith(str(self.path)) else f"{self.path}: {exc}")
        if not frames:
            return self._fail_file(f"{self.path}: contains no structures")
        self.n_frames = frames[-1].last_index + 1
        self.multi = self.n_frames > 1
        try:
            self._plan()
        except ValueError as exc:
            return self._fail_file(f"{self.path}: {exc}")
        if self.rules.writes:
            problem = self._check_outputs()
            if problem:
                return self._fail_file(problem)
            done = self._earlier_results()
            if done is None:
                return []  # failed or skipped whole
        else:
            # Another rank of a torchrun job: rank 0 alone claims, checks existing outputs and
            # resumes, and ``follow`` applies its choice. Judging here too would race rank 0's
            # own writes (a lock read while it is being written looks foreign) and a rank that
            # saw a different answer would share a different list, hanging the job.
            done = {}
        work = []
        for frame in frames:
            if frame.error is not None and frame.last_index < frame.index:  # damage that held no frame
                logger.warning("%s: %s", self.path, frame.error)
            elif frame.error is not None:
                span = f"{frame.index}" if frame.last_index == frame.index else f"{frame.index}-{frame.last_index}"
                message = f"{self.path}@{span}: {frame.error}" if self.multi else f"{self.path}: {frame.error}"
                logger.error("%s", message)
                for index in range(frame.index, frame.last_index + 1):
                    self.records[index] = FrameRecord(index, "failed", error=message)
            elif frame.index in done:
                self.records[frame.index] = FrameRecord(frame.index, "skipped", output=done[frame.index])
            else:
                frame.atoms.info[INFO_SOURCE] = str(self.path)
                frame.atoms.info[INFO_INDEX] = frame.index
                work.append((frame.index, frame.atoms))
        self.pending = {index for index, _ in work}
        self.accepted = True
        return work

    def follow(self, chosen: list[int], work: list) -> list:
        """The frames of ``work`` that rank 0 chose to relax (``chosen``, its frame indices), so
        that every rank shares the same list."""
        keep = set(chosen)
        work = [(index, atoms) for index, atoms in work if index in keep]
        if len(work) != len(keep):
            raise RuntimeError(f"{self.path}: this rank read {len(work)} of the {len(keep)} frames rank 0 relaxes; the ranks read different inputs")
        self.pending = {index for index, _ in work}
        return work

    def label(self, index: int) -> str:
        return f"{self.path}@{index}" if self.multi else str(self.path)

    def _fail_file(self, message: str) -> list:
        self.records = {None: FrameRecord(None, "failed", error=message)}
        logger.error("%s", message)
        return []

    def _plan(self) -> None:
        """Decide ``output``, ``fmt`` and ``mode`` (raises ValueError for an unknown format)."""
        from e3relax_ase.io.files import EXTENSIONS, holds_many, input_format, output_format

        rules, path = self.rules, self.path
        given = rules.output
        if given is not None and rules.n_inputs == 1 and not Path(given).is_dir() and not given.endswith(("/", os.sep)):
            self.output = Path(given)
        else:
            directory = Path(given) if given is not None else path.parent
            stem, extension = (path.stem, path.suffix) if path.suffix else (path.name, "")
            if rules.fmt:
                extension = EXTENSIONS.get(rules.fmt, f".{rules.fmt}")
            default_suffix = "" if given is not None else "_relaxed"
            self.output = directory / f"{stem}{default_suffix if rules.suffix is None else rules.suffix}{extension}"
        try:
            self.fmt = output_format(self.output, rules.fmt)
        except ValueError:
            self.fmt = input_format(path)
        self.mode = "single" if not self.multi else ("stream" if holds_many(self.fmt) else "per_frame")

    def _planned(self) -> tuple[Path, str]:
        """``output`` and ``fmt``, which ``_plan`` decided before anything asks for them."""
        assert self.output is not None and self.fmt is not None, "FileJob._plan has not run"
        return self.output, self.fmt

    def targets(self) -> list[Path]:
        """Every file this job may write."""
        out, _ = self._planned()
        if self.mode != "per_frame":
            return [out]
        return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(self.n_frames)]

    def _check_outputs(self) -> str | None:
        """The reason this job may not write its outputs, or None (the outputs are then claimed)."""
        from e3relax_ase.io.claims import OutputClaimedError, claim

        targets = self.targets()
        resolved = [t.resolve() for t in targets]
        if any(r in self.rules.inputs for r in resolved):
            return f"{self.path}: refusing to write over an input file ({targets[0]}); use -o or --suffix"
        other = next((self.rules.claimed[r] for r in resolved if r in self.rules.claimed), None)
        if other is not None:
            return f"{self.path}: output {targets[0]} would also be written for {other}; use distinct names"
        try:
            self.claim = claim(self._planned()[0], self.rules.run, create=self.rules.writes)
        except OutputClaimedError as exc:
            return str(exc)
        self.rules.claimed.update({r: self.path for r in resolved})
        return None

    def _earlier_results(self) -> dict | None:
        """What earlier runs left: {frame index: its output} to skip, or None when the whole
        input is skipped (``--resume``) or refused (an existing output without ``--overwrite``)."""
        from e3relax_ase.io.streamed import ResumeMismatchError, StreamedOutput

        rules = self.rules
        output, fmt = self._planned()
        if self.mode == "per_frame":
            existing = {i: t for i, t in enumerate(self.targets()) if t.exists()}
            if existing and not (rules.resume or rules.overwrite):
                self._fail_file(self._exists_message(next(iter(existing.values()))))
                return None
            return existing if rules.resume else {}
        if self.mode == "stream":
            self.stream = StreamedOutput(output, fmt, self._identity())
        if output.exists():
            if rules.resume:
                self.records = {None: FrameRecord(None, "skipped", output=output)}
                logger.info("%s: output exists, skipped (--resume)", self.path)
                if self.stream is not None and rules.writes:
                    self.stream.discard()  # left by a run killed just after writing the output
                self.release()
                return None
            if not rules.overwrite:
                self._fail_file(self._exists_message(output))
                return None
        if self.stream is None or not self.stream.started:
            return {}
        if rules.overwrite and not rules.resume:
            if rules.writes:
                self.stream.discard()
            return {}
        if not rules.resume:
            self._fail_file(
                f"{self.path}: unfinished results of an earlier run are in {self.stream.folder}: --resume continues them, --overwrite discards them"
            )
            return None
        try:
            done = self.stream.finished_frames(clean=rules.writes)
        except ResumeMismatchError as exc:
            self._fail_file(f"{self.path}: {exc}")
            return None
        if done:
            logger.info("%s: %d frames done by an earlier run (--resume)", self.path, len(done))
        return {index: output for index in done}

    def _exists_message(self, target: Path) -> str:
        return f"{self.path}: {target} exists (this run did not write it); --overwrite replaces it, --resume keeps it"

    def _identity(self) -> dict:
        stat = self.path.stat()
        return {"input": str(self.path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **self.rules.identity}

    # --- results ---------------------------------------------------------------------------
    def take(self, index: int, result) -> None:
        """A frame's result: relaxed Atoms, or its failure message."""
        self.pending.discard(index)
        if isinstance(result, str):
            self.records[index] = FrameRecord(index, "failed", error=result)
            logger.error("%s", result)
        else:
            self.waiting.append((index, result))

    @property
    def finished(self) -> bool:
        return not self.pending

    def commit(self) -> None:
        """Write the results that came in since the last commit (see the module docstring)."""
        waiting, self.waiting = sorted(self.waiting, key=lambda pair: pair[0]), []
        if not self.rules.writes or not self.accepted:
            return  # another rank writes, or the input was refused or skipped whole
        output, _ = self._planned()
        if waiting:
            self._warn_losses([atoms for _, atoms in waiting])
        try:
            if self.mode == "single":
                for index, atoms in waiting:
                    self._write(output, [atoms])
                    self._ok(index, atoms, output)
            elif self.mode == "per_frame":
                targets = self.targets()
                for index, atoms in waiting:
                    self._write(targets[index], [atoms])
                    self._ok(index, atoms, targets[index])
            else:
                stream = self.stream
                assert stream is not None  # mode "stream", and this process writes: _earlier_results made it
                if self.finished and not stream.started:
                    if waiting:  # done within one chunk: straight to the output, no parts
                        self._write(output, [atoms for _, atoms in waiting])
                    for index, atoms in waiting:
                        self._ok(index, atoms, output)
                else:
                    if waiting:
                        stream.commit(waiting)
                    for index, atoms in waiting:
                        self._ok(index, atoms, output)
                    if self.finished:
                        if stream.finish(replace=self.rules.overwrite):
                            self.written.append(output)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 (disk full, permissions, a file that appeared meanwhile: reported, never raised)
            self._write_failed(exc, waiting)

    def _write(self, target: Path, frames: list) -> None:
        from e3relax_ase.io.files import write_atomic

        _, fmt = self._planned()
        write_atomic(target, frames, fmt, replace=self.rules.overwrite, symprec=self.rules.symprec if fmt == "cif" else None)
        self.written.append(target)

    def _ok(self, index: int, atoms, target: Path) -> None:
        values = {key: json_value(atoms.info[src]) for key, src in SUMMARY_KEYS.items() if src in atoms.info}
        self.records[index] = FrameRecord(index, "ok", output=target, values=values)

    def _write_failed(self, exc: Exception, waiting: list) -> None:
        from e3relax_ase.io.files import OutputExistsError

        target = self.output
        if isinstance(exc, OutputExistsError):
            reason = "it appeared while this run was working (another program?); not replaced"
        else:
            reason = first_line(exc)
        message = f"{target}: could not be written: {reason}"
        if self.stream is not None and self.stream.started:
            message += f"; the finished frames stay in {self.stream.folder} for --resume"
            indices = [i for i, r in self.records.items() if r is not None and r.status == "ok"] + [i for i, _ in waiting]
        else:
            indices = [i for i, _ in waiting]
        logger.error("%s", message)
        for index in indices:
            self.records[index] = FrameRecord(index, "failed", error=message)

    def _warn_losses(self, frames: list) -> None:
        from e3relax_ase.io.files import format_losses

        _, fmt = self._planned()
        losses = sorted({loss for atoms in frames for loss in format_losses(atoms, fmt)})
        new = [loss for loss in losses if loss not in self.dropped]
        if new:
            self.dropped += new
            logger.warning("%s: the %s format drops %s; write .extxyz or .traj to keep them", self.output, self.fmt, ", ".join(new))

    def release(self) -> None:
        """Give up the output's lock (the job is done, or the run stops)."""
        if self.claim is not None:
            self.claim.release()

    # --- summary ---------------------------------------------------------------------------
    def summary_entries(self) -> list[dict]:
        """The --json entries of this input, in frame order."""
        entries = []
        for index in sorted(self.records, key=lambda i: -1 if i is None else i):
            record = self.records[index]
            entry = {
                "input": str(self.path) if index is None else self.label(index),
                "source": str(self.path),
                "index": index,
                "frame": index if self.multi else None,
                "output": str(record.output) if record.output is not None else None,
                "status": record.status,
                "error": record.error,
            }
            if record.status == "ok":
                entry["dropped"] = self.dropped
                entry.update(record.values)
            entries.append(entry)
        return entries
