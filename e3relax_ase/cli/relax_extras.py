"""``e3relax-ase relax``'s refinement extras, ``--trajectory`` and ``--logfile``: where they go,
opened once for the run, and the structures whose own trajectory file exists."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click


class _Extras:
    """The refinement's --trajectory and --logfile: where they go, opened once for the run."""

    def __init__(self, trajectory, logfile, overwrite: bool, world):
        self.trajectory = None
        self.logfile = None
        self.overwrite = overwrite
        self.written: set[Path] = set()  # per-structure trajectory files this run writes
        self._opened: list[Any] = []  # file objects and Trajectories, closed at the end
        if trajectory:
            self.trajectory = self._trajectory(trajectory, overwrite, world)
        if logfile == "-":
            self.logfile = sys.stderr  # stdout is for --json
        elif logfile:
            self.logfile = self._open(Path(logfile), overwrite, "--logfile", lambda p: open(p, "w"))

    def _trajectory(self, given: str, overwrite: bool, world):
        if "{index}" in given:
            raise click.BadParameter("use {name} (the structure's input file and frame), not {index}", param_hint="--trajectory")
        if "{" in given:
            return given  # one file per structure, named by relax_many
        if given.endswith(("/", os.sep)) or Path(given).is_dir():
            Path(given).mkdir(parents=True, exist_ok=True)
            return str(Path(given) / "{name}.traj")
        if world.active:
            raise click.BadParameter("one file for several processes: use a DIR/ or a pattern with {name}", param_hint="--trajectory")
        from ase.io.trajectory import Trajectory

        return self._open(Path(given), overwrite, "--trajectory", lambda p: Trajectory(str(p), "w"))

    def _open(self, path: Path, overwrite: bool, option: str, opener):
        if path.exists() and not overwrite:
            raise click.BadParameter(f"{path} exists (this run did not write it); --overwrite replaces it", param_hint=option)
        handle = opener(path)
        self._opened.append(handle)
        return handle

    def drop_existing_trajectories(self, queue: list) -> int:
        """Fail (and take out of ``queue``) the structures whose own trajectory file exists
        and was not written by this run, unless --overwrite; how many."""
        if self.overwrite or not isinstance(self.trajectory, str):
            return 0
        from e3relax_ase.relax.finish import trajectory_path

        kept = []
        for entry in queue:
            job, index, _ = entry
            path = Path(trajectory_path(self.trajectory, index, job.label(index)))
            if path.exists() and path not in self.written:
                job.take(index, f"{job.label(index)}: trajectory {path} exists (this run did not write it); --overwrite replaces it")
            else:
                self.written.add(path)
                kept.append(entry)
        dropped = len(queue) - len(kept)
        queue[:] = kept
        return dropped

    def options(self) -> dict:
        extra = {}
        if self.trajectory is not None:
            extra["trajectory"] = self.trajectory
        if self.logfile is not None:
            extra["logfile"] = self.logfile
        return extra

    def close(self) -> None:
        for handle in self._opened:
            handle.close()
