"""``e3relax-ase relax``: relax structure files in one shot (optionally refine with real forces).

Heavy imports (torch, ase) happen inside the command so that ``e3relax-ase --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

logger = logging.getLogger("e3relax_ase.cli.relax")

FLUSH_SIZE = 64  # structures gathered across files before they go to the relaxer together
SUMMARY_KEYS = {  # --json field <- atoms.info key
    "sane": "e3relax_sane",
    "problems": "e3relax_problems",
    "max_displacement": "e3relax_max_displacement",
    "max_strain": "e3relax_max_strain",
    "correction_ratio": "e3relax_correction_ratio",
    "refine_advised": "e3relax_refine_advised",
    "spacegroup_input": "e3relax_spacegroup_input",
    "spacegroup": "e3relax_spacegroup",
    "converged": "e3relax_converged",
    "nsteps": "e3relax_nsteps",
    "fmax": "e3relax_fmax",
}


@dataclass
class _FileJob:
    """One input file: its frames, where they go, and what became of each."""

    path: Path
    output: Path | None = None
    fmt: str | None = None
    frames: list = field(default_factory=list)
    results: dict = field(default_factory=dict)  # frame -> Atoms or error message
    error: str | None = None
    skipped: bool = False
    written: list = field(default_factory=list)
    dropped: list = field(default_factory=list)

    def label(self, frame: int) -> str:
        return f"{self.path}@{frame}" if len(self.frames) > 1 else str(self.path)

    @property
    def done(self) -> bool:
        return len(self.results) == len(self.frames)


def _json_value(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or inf
    return value


class _DropUntrainedWarning(logging.Filter):
    """The command prints its own, louder warning about untrained checkpoints."""

    def filter(self, record):
        return "UNTRAINED" not in record.getMessage()


def _plan(job: _FileJob, n_files: int, output: str | None, suffix: str | None, fmt: str | None) -> None:
    """Decide ``job.output`` and ``job.fmt`` (per-frame names are derived at writing)."""
    from e3relax_ase.fileio import EXTENSIONS, output_format

    path = job.path
    if output is not None and n_files == 1 and not Path(output).is_dir() and not output.endswith(("/", os.sep)):
        job.output = Path(output)
    else:
        output = Path(output) if output is not None else None
        directory = output if output is not None else path.parent
        stem, extension = (path.stem, path.suffix) if path.suffix else (path.name, "")
        if fmt:
            extension = EXTENSIONS.get(fmt, f".{fmt}")
        default_suffix = "" if output is not None else "_relaxed"
        job.output = directory / f"{stem}{default_suffix if suffix is None else suffix}{extension}"
    try:
        job.fmt = output_format(job.output, fmt)
    except ValueError:
        from e3relax_ase.fileio import input_format

        job.fmt = input_format(path)


def _outputs(job: _FileJob) -> list[Path]:
    """The files a job writes: one, or one per frame when the format holds a single structure."""
    from e3relax_ase.fileio import holds_many

    if len(job.frames) <= 1 or holds_many(job.fmt):
        return [job.output]
    out = job.output
    return [
        out.with_name(f"{out.stem}_{i}{out.suffix}") if out.suffix else out.with_name(f"{out.name}_{i}") for i in range(len(job.frames))
    ]


def _write(job: _FileJob) -> None:
    """Write the good frames of a finished job; record failures of the write itself."""
    from e3relax_ase.fileio import format_losses, holds_many, write_atomic

    good = [(i, r) for i, r in sorted(job.results.items()) if not isinstance(r, str)]
    if not good:
        return
    losses = sorted({loss for _, atoms in good for loss in format_losses(atoms, job.fmt)})
    if losses:
        job.dropped = losses
        logger.warning("%s: the %s format drops %s; write .extxyz or .traj to keep them", job.output, job.fmt, ", ".join(losses))
    try:
        if len(job.frames) <= 1 or holds_many(job.fmt):
            write_atomic(job.output, [atoms for _, atoms in good], job.fmt)
            job.written = [job.output] * len(good)
        else:
            targets = _outputs(job)
            for i, atoms in good:
                write_atomic(targets[i], [atoms], job.fmt)
            job.written = [targets[i] for i, _ in good]
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        job.error = f"{job.output}: could not be written: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        job.written = []


@click.command("relax")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(), help="Output file (one input) or directory (ends in '/', exists, or several inputs).")
@click.option(
    "--suffix", default=None, help="Appended to each input's name [default: '_relaxed' next to the input, '' in an -o directory]."
)
@click.option("--format", "fmt", default=None, help="Output format (an ASE format name); default: from the output's extension.")
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
    help="Compile the network's message passing (torch.compile): the first batch waits ~10 s, later ones run "
    "faster (1.9x at the paper's size on a GPU). For long runs; see docs/relaxer.md.",
)
@click.option("--no-relax-cell", is_flag=True, help="Keep every input cell (positions only).")
@click.option("--fix-symmetry", is_flag=True, help="Keep each input's space group (spglib at --symprec).")
@click.option("--symprec", default=0.01, show_default=True, help="Symmetry tolerance, Å.")
@click.option("--refine", "refine_spec", default=None, help="Refine with real forces: emt, sevennet, chgnet or module:Class.")
@click.option("--fmax", default=0.05, show_default=True, help="Refinement force target, eV/Å.")
@click.option("--steps", default=500, show_default=True, help="Refinement step limit.")
@click.option("--pressure", default=0.0, show_default=True, help="Refinement external pressure, GPa.")
@click.option("--batch-size", type=int, default=None, help="Structures per forward pass [default: 1 on CPU, 2048 on GPU, within its memory].")
@click.option(
    "--workers",
    default="auto",
    show_default=True,
    help="Processes that prepare structures (validation, neighbour search) while the network runs, or 'auto': "
    "on a GPU up to 14 from the free cores once 256 or more structures are queued, on a CPU none.",
)
@click.option("--resume", is_flag=True, help="Skip inputs whose outputs already exist.")
@click.option(
    "--distributed/--no-distributed",
    default=None,
    help="Share the structures between the processes of a torchrun job (rank 0 writes) [default: when started by torchrun].",
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", count=True, help="Errors only.")
def relax(
    inputs,
    output,
    suffix,
    fmt,
    checkpoint,
    device,
    dtype,
    precision,
    compile_network,
    no_relax_cell,
    fix_symmetry,
    symprec,
    refine_spec,
    fmax,
    steps,
    pressure,
    batch_size,
    workers,
    resume,
    distributed,
    as_json,
    verbose,
    quiet,
):
    """Relax the structures in INPUTS (files or folders; CIF, POSCAR, extxyz, traj, db, ...).

    Each result goes next to its input as NAME_relaxed.EXT unless -o says otherwise; an input is
    never overwritten. Exits non-zero when any input failed; every good result is still written.
    """
    from e3relax_ase.cli.main import configure_logging

    configure_logging(verbose - quiet)
    from ase.io.formats import ioformats
    from ase.units import GPa

    from e3relax_ase import distributed as torchrun_job
    from e3relax_ase.checkpoint import CheckpointError
    from e3relax_ase.fileio import InputFileError, expand_inputs, read_structures
    from e3relax_ase.relaxer import OneShotRelaxer, RelaxFailure

    if pressure and not refine_spec:
        logger.warning("--pressure applies to --refine only; the one-shot prediction ignores it")
    if fmt and fmt not in ioformats:
        raise click.BadParameter(f"unknown format {fmt!r}", param_hint="--format")
    factory = None
    if refine_spec:
        from e3relax_ase.training.calculators import resolve_calculator

        try:
            factory = resolve_calculator(refine_spec)
        except (ImportError, ValueError) as exc:
            raise click.BadParameter(str(exc), param_hint="--refine") from None
    if distributed and not torchrun_job.launched_by_torchrun():
        raise click.BadParameter("needs a launch by torchrun with more than one process", param_hint="--distributed")
    world = torchrun_job.World()
    if distributed is not False and torchrun_job.launched_by_torchrun():
        world = torchrun_job.join()
        click.get_current_context().call_on_close(torchrun_job.leave)
        device = world.device(device)
        logger.disabled = not world.is_main  # rank 0 reports inputs, outputs and failures for all
    relaxer_logger = logging.getLogger("e3relax_ase.relaxer")
    quiet_filter = _DropUntrainedWarning()
    relaxer_logger.addFilter(quiet_filter)
    try:
        relaxer = OneShotRelaxer(
            checkpoint, device=device, dtype=dtype, batch_size=batch_size, precision=precision, compile=compile_network
        )
    except (CheckpointError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        relaxer_logger.removeFilter(quiet_filter)
    if relaxer.info.untrained and world.is_main:
        click.echo(f"WARNING: checkpoint {relaxer.info.name!r} is UNTRAINED (random weights): its predictions are meaningless.", err=True)

    files = expand_inputs(inputs)
    if not files:
        raise click.ClickException("no input structure files found")
    inputs_resolved = {p.resolve() for p in files if p.exists()}
    jobs = [_FileJob(path) for path in files]
    claimed: dict[Path, Path] = {}
    options = {
        "relax_cell": not no_relax_cell,
        "fix_symmetry": fix_symmetry,
        "symprec": symprec,
        "errors": "return",
        "refine": factory,
        "fmax": fmax,
        "steps": steps,
        "scalar_pressure": pressure * GPa,
    }
    if workers == "auto":
        from e3relax_ase.workers import AUTO_MIN_STRUCTURES, auto_num_workers

        per_host = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if world.active else 1
        num_workers, min_structures = auto_num_workers(relaxer.device, per_host), AUTO_MIN_STRUCTURES
    else:
        try:
            num_workers, min_structures = int(workers), 0
        except ValueError:
            raise click.BadParameter(f"{workers!r} is neither 'auto' nor a number", param_hint="--workers") from None
        if num_workers < 0:
            raise click.BadParameter("must be 0 or more", param_hint="--workers")
    queue: list[tuple[_FileJob, int]] = []
    n_flushed = 0  # structures sent to the relaxer so far: their index decides their rank

    def flush():
        nonlocal n_flushed
        if not queue:
            return
        atoms = [job.frames[i] for job, i in queue]
        names = [job.label(i) for job, i in queue]
        # Workers once there are enough structures to pay for starting them (then kept).
        workers_now = num_workers if len(atoms) >= min_structures or relaxer.has_worker_pool else 0
        results = torchrun_job.relax_sharded(relaxer, atoms, world, names=names, start=n_flushed, num_workers=workers_now, **options) or []
        n_flushed += len(atoms)
        for (job, i), result in zip(queue, results):
            job.results[i] = result
            if isinstance(result, RelaxFailure):
                message = result.message if result.message.startswith(job.label(i)) else f"{job.label(i)}: {result.message}"
                job.results[i] = message
                logger.error("%s", message)
        for job in {id(j): j for j, _ in queue}.values():
            if job.done and not job.written and not job.error:
                _write(job)
                if job.error:
                    logger.error("%s", job.error)
        queue.clear()

    show_progress = len(jobs) > 1 and quiet == 0 and world.is_main
    with click.progressbar(jobs, label="relaxing", file=sys.stderr, show_pos=True) if show_progress else _nullbar(jobs) as bar:
        for job in bar:
            try:
                job.frames = read_structures(job.path)
                _plan(job, len(files), output, suffix, fmt)
            except (InputFileError, ValueError) as exc:
                job.error = str(exc) if str(exc).startswith(str(job.path)) else f"{job.path}: {exc}"
                logger.error("%s", job.error)
                continue
            targets = _outputs(job)
            if any(t.resolve() in inputs_resolved for t in targets):
                job.error = f"{job.path}: refusing to write over an input file ({targets[0]}); use -o or --suffix"
            elif any(t.resolve() in claimed for t in targets):
                other = claimed[next(t.resolve() for t in targets if t.resolve() in claimed)]
                job.error = f"{job.path}: output {targets[0]} would also be written for {other}; use distinct names"
            if job.error:
                logger.error("%s", job.error)
                continue
            claimed.update({t.resolve(): job.path for t in targets})
            if resume and all(t.exists() for t in targets):
                job.skipped = True
                logger.info("%s: output exists, skipped (--resume)", job.path)
                continue
            queue.extend((job, i) for i in range(len(job.frames)))
            if len(queue) >= max(FLUSH_SIZE, batch_size or 0) * world.world_size:
                flush()
        flush()
    if not world.is_main:
        return  # its results went to rank 0, which writes them and reports

    summary = _summary(jobs, relaxer)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    failed = [r["input"] for r in summary["results"] if r["status"] == "failed"]
    logger.info("%d relaxed, %d failed, %d skipped", summary["n_ok"], summary["n_failed"], summary["n_skipped"])
    if failed:
        # A ClickException (not Exit): cli.main's callers get its exit code in every mode.
        raise click.ClickException(f"{len(failed)} input(s) failed: {', '.join(failed)}")


class _nullbar:
    """Stands in for a progress bar when none is shown."""

    def __init__(self, items):
        self.items = items

    def __enter__(self):
        return self.items

    def __exit__(self, *exc):
        return False


def _summary(jobs: list[_FileJob], relaxer) -> dict:
    """The --json summary: one entry per structure (or per unreadable file)."""
    results = []
    for job in jobs:
        if job.error and not job.frames:
            results.append({"input": str(job.path), "frame": None, "output": None, "status": "failed", "error": job.error})
            continue
        if job.skipped:
            results.append({"input": str(job.path), "frame": None, "output": str(job.output), "status": "skipped", "error": None})
            continue
        written = iter(job.written)
        for i in range(len(job.frames)):
            result = job.results.get(i)
            entry = {"input": job.label(i), "frame": i if len(job.frames) > 1 else None}
            if result is None or isinstance(result, str) or job.error:
                entry.update(output=None, status="failed", error=result if isinstance(result, str) else job.error)
            else:
                entry.update(output=str(next(written)), status="ok", error=None, dropped=job.dropped)
                entry.update({key: _json_value(result.info[src]) for key, src in SUMMARY_KEYS.items() if src in result.info})
            results.append(entry)
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
