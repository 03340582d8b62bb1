"""``e3relax-ase relax``: relax structure files in one shot (optionally refine with real forces).

Heavy imports (torch, ase) happen inside the command so that ``e3relax-ase --help`` stays fast.
The files themselves (reading frame by frame, claiming and writing outputs) are handled by
``relax_files``; what the user sees (progress, the closing line) by ``relax_report``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

logger = logging.getLogger("e3relax_ase.cli.relax")

CHUNK_SIZE = 64  # structures relaxed, then written, together (per process)
DEFAULT_SYMPREC = 0.01  # Å | --fix-symmetry's tolerance when --symprec is not given


class _DropUntrainedWarning(logging.Filter):
    """The command prints its own, louder warning about untrained checkpoints."""

    def filter(self, record):
        return "UNTRAINED" not in record.getMessage()


@click.command("relax")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(), help="Output file (one input) or directory (ends in '/', exists, or several inputs).")
@click.option("--suffix", default=None, help="Appended to each input's name [default: '_relaxed' next to the input, '' in an -o directory].")
@click.option("--format", "fmt", default=None, help="Output format (an ASE format name); default: from the output's extension.")
@click.option("--overwrite", is_flag=True, help="Replace output files that exist (by default an existing file is never replaced).")
@click.option(
    "--resume",
    is_flag=True,
    help="Keep what an earlier run wrote: skip inputs whose outputs exist, and continue a multi-frame input from its last finished chunk.",
)
@click.option("--checkpoint", default="default", show_default=True, help="Registry name or checkpoint path.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float64"]), default="auto", show_default=True)
@click.option(
    "--precision",
    type=click.Choice(["float32", "tf32", "bf16"]),
    default="float32",
    show_default=True,
    help="Channel-mixing arithmetic on the GPU (tf32/bf16 need --dtype float32 or auto on CUDA; see docs/relaxer.md).",
)
@click.option(
    "--compile",
    "compile_network",
    is_flag=True,
    help="Compile the network's message passing (torch.compile): the first batch waits for the compilation, "
    "later ones run faster. For long runs; see docs/relaxer.md.",
)
@click.option("--no-relax-cell", is_flag=True, help="Keep every input cell (positions only).")
@click.option("--fix-symmetry", is_flag=True, help="Keep each input's space group (spglib at --symprec, default 0.01 Å).")
@click.option(
    "--symprec",
    type=float,
    default=None,
    help="Symmetry tolerance, Å: for --fix-symmetry, and a CIF output is then written symmetrized (pymatgen's CifWriter).",
)
@click.option("--allow-cluster", is_flag=True, help="Relax an isolated cluster or molecule in a periodic box, keeping its box (refused by default).")
@click.option("--refine", "refine_spec", default=None, help="Refine with real forces: emt, sevennet, chgnet or module:Class.")
@click.option("--optimizer", default="FIRE", show_default=True, help="Refinement optimizer: FIRE, BFGS, LBFGS, BFGSLineSearch, ...")
@click.option(
    "--cell-filter",
    default="FrechetCellFilter",
    show_default=True,
    help="Refinement cell filter: FrechetCellFilter, UnitCellFilter, ExpCellFilter, StrainFilter, or none (positions only).",
)
@click.option("--fmax", default=0.05, show_default=True, help="Refinement force target, eV/Å (atoms and cell rows).")
@click.option("--steps", default=500, show_default=True, help="Refinement step limit.")
@click.option("--pressure", default=0.0, show_default=True, help="Refinement external pressure, GPa.")
@click.option(
    "--trajectory",
    default=None,
    help="Refinement steps as ASE .traj: one multi-frame FILE for every structure, a DIR/ for one file per structure, or a pattern with {name}.",
)
@click.option("--logfile", default=None, help="The refinement optimizer's log: a file, or - for stderr.")
@click.option("--batch-size", type=int, default=None, help="Structures per forward pass [default: 1 on CPU, 2048 on GPU, within its memory].")
@click.option(
    "--threads",
    default="auto",
    show_default=True,
    help="torch threads for a network on the CPU, or 'auto': one when other work keeps a core busy (load average), else torch's default.",
)
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=CHUNK_SIZE,
    show_default=True,
    help="Structures relaxed, then written, together: a killed run loses at most the chunk in progress.",
)
@click.option(
    "--workers",
    default="auto",
    show_default=True,
    help="Processes that prepare structures (validation, neighbour search) while the network runs, or 'auto': "
    "on a GPU up to 14 from the free cores once 256 or more structures are queued, on a CPU none.",
)
@click.option(
    "--distributed/--no-distributed",
    default=None,
    help="Share the structures between the processes of a torchrun job (rank 0 writes) [default: when started by torchrun].",
)
@click.option("--progress/--no-progress", default=None, help="A progress bar on stderr, in structures [default: when stderr is a terminal].")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", count=True, help="Errors only (no closing line).")
def relax(inputs, output, suffix, fmt, overwrite, resume, checkpoint, device, dtype, precision, compile_network, no_relax_cell,
          fix_symmetry, symprec, allow_cluster, refine_spec, optimizer, cell_filter, fmax, steps, pressure, trajectory, logfile,
          batch_size, threads, chunk_size, workers, distributed, progress, as_json, verbose, quiet) -> None:  # fmt: skip
    """Relax the structures in INPUTS (files or folders; CIF, POSCAR, extxyz, traj, db, ...).

    Each result goes next to its input as NAME_relaxed.EXT unless -o says otherwise. No input, and
    no file this run did not write, is ever replaced (--overwrite allows the latter). Exits
    non-zero when any structure failed; every good result is still written.
    """
    started = time.perf_counter()
    from e3relax_ase.cli.main import configure_logging

    configure_logging(verbose - quiet)
    from ase.io.formats import ioformats
    from ase.units import GPa

    from e3relax_ase import distributed as torchrun_job
    from e3relax_ase.cli.relax_files import FileJob, OutputRules
    from e3relax_ase.cli.relax_report import Progress, closing_line
    from e3relax_ase.io.checkpoint import CheckpointError
    from e3relax_ase.io.claims import new_run_id
    from e3relax_ase.io.files import expand_inputs
    from e3relax_ase.relax.relaxer import OneShotRelaxer, RelaxFailure
    from e3relax_ase.relax.sharded import relax_sharded

    if pressure and not refine_spec:
        logger.warning("--pressure applies to --refine only; the one-shot prediction ignores it")
    if fmt and fmt not in ioformats:
        raise click.BadParameter(f"unknown format {fmt!r}", param_hint="--format")
    factory = _refine_factory(refine_spec)
    refine_options = _refine_options(refine_spec, optimizer, cell_filter)
    if distributed and not torchrun_job.launched_by_torchrun():
        raise click.BadParameter("needs a launch by torchrun with more than one process", param_hint="--distributed")
    world = torchrun_job.World()
    if distributed is not False and torchrun_job.launched_by_torchrun():
        world = torchrun_job.join()
        click.get_current_context().call_on_close(torchrun_job.leave)
        device = world.device(device)
        logger.disabled = not world.is_main  # rank 0 reports inputs, outputs and failures for all
    relaxer = _make_relaxer(OneShotRelaxer, CheckpointError, checkpoint, device, dtype, batch_size, precision, compile_network)
    if relaxer.info.untrained and world.is_main:
        click.echo(f"WARNING: checkpoint {relaxer.info.name!r} is UNTRAINED (random weights): its predictions are meaningless.", err=True)

    files, empty_folders = [], []
    for given in inputs:
        found = expand_inputs([given])
        files += found
        if given.is_dir() and not found:
            empty_folders.append(f"{given}: folder holds no structure files (.cif, .vasp, .extxyz, .traj, POSCAR*, ...)")
            logger.error("%s", empty_folders[-1])
    if not files and not empty_folders:
        raise click.ClickException("no input structure files found")
    options = {
        "relax_cell": not no_relax_cell,
        "fix_symmetry": fix_symmetry,
        "symprec": symprec if symprec is not None else DEFAULT_SYMPREC,
        "allow_cluster": allow_cluster,
        "errors": "return",
        "refine": factory,
        "fmax": fmax,
        "steps": steps,
        "scalar_pressure": pressure * GPa,
        **refine_options,
    }
    identity = {  # what a result depends on besides its input: a resumed output must not mix two of them
        "checkpoint_sha256": relaxer.info.sha256,
        "dtype": str(relaxer.dtype),
        "precision": precision,
        "options": {k: (v if isinstance(v, (bool, int, float, str, type(None))) else refine_spec) for k, v in options.items()},
    }
    rules = OutputRules(
        output=output,
        suffix=suffix,
        fmt=fmt,
        overwrite=overwrite,
        resume=resume,
        symprec=symprec,
        identity=identity,
        run=world.broadcast(new_run_id()),  # every rank recognises rank 0's locks
        writes=world.is_main,
        n_inputs=len(files),
        inputs={p.resolve() for p in files if p.exists()},
    )
    if symprec is not None and not fix_symmetry and fmt != "cif" and not (output or "").lower().endswith(".cif"):
        logger.info("--symprec: used by --fix-symmetry and for CIF outputs")
    num_workers, min_structures = _workers(workers, relaxer, world)
    cpu_threads = _cpu_threads(threads, relaxer)
    ready = time.perf_counter()  # the model is loaded: relaxing starts
    show_progress = world.is_main and quiet == 0 and (progress if progress is not None else sys.stderr.isatty())
    bar = Progress(len(files), show_progress)
    jobs: list[FileJob] = []
    queue: list = []  # (job, frame index, Atoms)
    n_flushed = 0  # structures sent to the relaxer so far: their index decides their rank
    extras = _Extras(trajectory, logfile, overwrite, world)

    def flush():
        nonlocal n_flushed
        touched = {id(j): j for j, _, _ in queue}
        dropped = extras.drop_existing_trajectories(queue)  # a structure whose trajectory file exists fails, unrelaxed
        bar.update(dropped)
        if not queue:
            for job in touched.values():
                job.commit()
            return
        atoms = [a for _, _, a in queue]
        names = [job.label(i) for job, i, _ in queue]
        # Workers once there are enough structures to pay for starting them (then kept).
        workers_now = num_workers if len(atoms) >= min_structures or relaxer.has_worker_pool else 0
        tracked = {"progress": bar.bar} if bar.bar is not None and not world.active else {}
        results = relax_sharded(relaxer, atoms, world, names=names, start=n_flushed, num_workers=workers_now, **options, **extras.options(), **tracked) or []
        if not tracked:
            bar.update(len(queue))
        n_flushed += len(atoms)
        for (job, index, _), result in zip(queue, results):
            if isinstance(result, RelaxFailure):
                label = job.label(index)
                result = result.message if result.message.startswith(label) else f"{label}: {result.message}"
            job.take(index, result)
        for job in touched.values():
            job.commit()
            if job.finished:
                job.release()
        queue.clear()

    try:
        with bar.logging_through_the_bar(), cpu_threads:
            for path in files:
                job = FileJob(path, rules)
                jobs.append(job)
                work = job.open()
                if world.active:  # rank 0's decision for this input (claims, --resume), shared
                    work = job.follow(world.broadcast([index for index, _ in work] if world.is_main else None), work)
                bar.opened(max(job.n_frames, 1))
                bar.update(max(job.n_frames, 1) - len(work))  # unreadable, failed or skipped frames
                for index, atoms in work:
                    queue.append((job, index, atoms))
                    if len(queue) >= max(chunk_size, batch_size or 0) * world.world_size:
                        flush()
                if not work:
                    job.commit()  # a resumed input whose frames were all done: join its parts
                    job.release()
            flush()
    finally:
        bar.close()
        extras.close()
        for job in jobs:
            job.release()
    if not world.is_main:
        return  # its results went to rank 0, which writes them and reports

    summary = _summary(jobs, empty_folders, relaxer)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    if quiet == 0:
        now = time.perf_counter()
        click.echo(closing_line(summary, now - started, now - ready), err=True)
    failed = list(dict.fromkeys(r["source"] for r in summary["results"] if r["status"] == "failed"))
    if failed:
        # A ClickException (not Exit): cli.main's callers get its exit code in every mode.
        raise click.ClickException(f"{len(failed)} input(s) failed: {', '.join(failed)}")


def _refine_factory(refine_spec):
    if not refine_spec:
        return None
    from e3relax_ase.relax.calculators import resolve_calculator

    try:
        return resolve_calculator(refine_spec)
    except (ImportError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--refine") from None


def _refine_options(refine_spec, optimizer: str, cell_filter: str) -> dict:
    """--optimizer and --cell-filter, checked (names only: the classes load when refining)."""
    if not refine_spec:
        if optimizer != "FIRE" or cell_filter != "FrechetCellFilter":
            logger.warning("--optimizer and --cell-filter apply to --refine only")
        return {}
    from e3relax_ase.relax.refine import CELL_FILTERS, OPTIMIZERS

    if optimizer not in OPTIMIZERS:
        raise click.BadParameter(f"{optimizer!r}: use one of {', '.join(OPTIMIZERS)}", param_hint="--optimizer")
    chosen: str | None = cell_filter
    if cell_filter.lower() == "none":
        chosen = None
    elif cell_filter not in CELL_FILTERS:
        raise click.BadParameter(f"{cell_filter!r}: use one of {', '.join(CELL_FILTERS)} or none", param_hint="--cell-filter")
    return {"optimizer": optimizer, "cell_filter": chosen}


def _make_relaxer(OneShotRelaxer, CheckpointError, checkpoint, device, dtype, batch_size, precision, compile_network):
    relaxer_logger = logging.getLogger("e3relax_ase.relax.relaxer")
    quiet_filter = _DropUntrainedWarning()
    relaxer_logger.addFilter(quiet_filter)
    try:
        return OneShotRelaxer(checkpoint, device=device, dtype=dtype, batch_size=batch_size, precision=precision, compile=compile_network)
    except (CheckpointError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        relaxer_logger.removeFilter(quiet_filter)


def _cpu_threads(threads: str, relaxer):
    """A context setting torch's threads for the run from --threads (the network on a CPU only)."""
    import contextlib

    import torch

    from e3relax_ase.relax.threads import threads_for_a_busy_cpu, torch_threads

    if threads == "auto":
        if relaxer.device.type != "cpu":
            return contextlib.nullcontext()
        count = threads_for_a_busy_cpu(torch.get_num_threads())
        if count < torch.get_num_threads():
            logger.info("other work keeps the CPU busy (load average %.1f): the network runs on one thread", os.getloadavg()[0])
        return torch_threads(count)
    try:
        count = int(threads)
    except ValueError:
        raise click.BadParameter(f"{threads!r} is neither 'auto' nor a number", param_hint="--threads") from None
    if count < 1:
        raise click.BadParameter("must be 1 or more", param_hint="--threads")
    return torch_threads(count)


def _workers(workers: str, relaxer, world) -> tuple[int, int]:
    """(worker processes, structures a flush needs before they start) from --workers."""
    if workers == "auto":
        from e3relax_ase.relax.pool import AUTO_MIN_STRUCTURES, auto_num_workers

        per_host = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if world.active else 1
        return auto_num_workers(relaxer.device, per_host), AUTO_MIN_STRUCTURES
    try:
        num_workers = int(workers)
    except ValueError:
        raise click.BadParameter(f"{workers!r} is neither 'auto' nor a number", param_hint="--workers") from None
    if num_workers < 0:
        raise click.BadParameter("must be 0 or more", param_hint="--workers")
    return num_workers, 0


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


def _summary(jobs: list, empty_folders: list, relaxer) -> dict:
    """The --json summary: one entry per structure (or per input that could not be opened)."""
    results = []
    for message in empty_folders:
        folder = message.split(": folder holds", 1)[0]
        results.append({"input": folder, "source": folder, "index": None, "frame": None, "output": None,
                        "status": "failed", "error": message})  # fmt: skip
    for job in jobs:
        results += job.summary_entries()
    count = {status: sum(r["status"] == status for r in results) for status in ("ok", "failed", "skipped")}
    info = relaxer.info
    return {
        "checkpoint": {"name": info.name, "sha256": info.sha256, "untrained": info.untrained},
        "device": str(relaxer.device),
        "n_ok": count["ok"],
        "n_failed": count["failed"],
        "n_skipped": count["skipped"],
        "results": results,
    }
