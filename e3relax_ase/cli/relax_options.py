"""``e3relax-ase relax``'s options turned into what the run needs: the refinement calculator and
its optimizer and cell filter (``--refine``, ``--optimizer``, ``--cell-filter``), the relaxer
(``--checkpoint``, ``--device``, ...), torch's threads (``--threads``) and the worker processes
(``--workers``). Heavy imports happen inside the functions, so that ``--help`` stays fast.
"""

from __future__ import annotations

import logging
import os

import click

logger = logging.getLogger("e3relax_ase.cli.relax")


class _DropUntrainedWarning(logging.Filter):
    """The command prints its own, louder warning about untrained checkpoints."""

    def filter(self, record):
        return "UNTRAINED" not in record.getMessage()


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
