"""``e3relax-ase relax``: relax structure files in one shot (optionally refine with real forces).

Heavy imports (torch, ase) happen inside the command so that ``e3relax-ase --help`` stays fast.
The files themselves (reading frame by frame, claiming and writing outputs) are handled by
``relax_files``; what the user sees (progress, the closing line, the --json summary) by
``relax_report``; the options' checks by ``relax_options`` and ``--trajectory``/``--logfile``
by ``relax_extras``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click

from e3relax_ase.cli.relax_extras import _Extras
from e3relax_ase.cli.relax_options import _cpu_threads, _make_relaxer, _refine_factory, _refine_options, _workers

logger = logging.getLogger("e3relax_ase.cli.relax")

CHUNK_SIZE = 64  # structures relaxed, then written, together (per process)
DEFAULT_SYMPREC = 0.01  # Å | --fix-symmetry's tolerance when --symprec is not given


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
    from e3relax_ase.cli.relax_files import FileJob
    from e3relax_ase.cli.relax_records import OutputRules
    from e3relax_ase.cli.relax_report import Progress, _summary, closing_line
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
