"""``e3relax-ase train CONFIG.yaml``: train or resume a run; optionally export a checkpoint."""

from __future__ import annotations

import json
import sys

import click


@click.command("train")
@click.argument("config_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N")
@click.option("--export", "export_path", type=click.Path(dir_okay=False), help="Write the best EMA weights as a checkpoint here.")
@click.option("--name", default=None, help="Checkpoint name stored in its metadata (with --export).")
@click.option("--time-budget", type=float, default=None, help="Minutes; stop cleanly at an epoch boundary (resume later).")
def train(config_path, device, export_path, name, time_budget):
    """Train E3Relax-H2 from a YAML config; re-running the same command resumes.

    Under torchrun, each process trains on its shard with DistributedDataParallel and rank 0
    writes the log and the checkpoints.
    """
    import dataclasses
    import os

    from e3relax_ase import distributed
    from e3relax_ase.cli.main import configure_logging
    from e3relax_ase.training.train.config import TrainConfig
    from e3relax_ase.training.train.export import export_checkpoint
    from e3relax_ase.training.train.trainer import train as run_training

    configure_logging(1)
    try:
        config = TrainConfig.from_yaml(config_path)
    except (ValueError, TypeError) as exc:
        raise click.ClickException(f"{config_path}: {exc}") from None
    if time_budget is not None:
        config = dataclasses.replace(config, time_budget_minutes=time_budget)
    with distributed.process_group() as world:
        summary = run_training(config, device=world.device(device))
        if export_path and world.is_main:
            sha = export_checkpoint(config.out_dir, export_path, {"name": name or os.path.splitext(os.path.basename(export_path))[0]})
            summary["exported"] = {"path": export_path, "sha256": sha}
    if not world.is_main:
        return
    click.echo(json.dumps(summary, indent=2, default=str), file=sys.stdout)
