"""``e3relax-ase evaluate CHECKPOINT DATA``: metrics next to Dummy, per-structure CSV, plots."""

from __future__ import annotations

import json

import click


@click.command("evaluate")
@click.argument("checkpoint")
@click.argument("data", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out-dir", type=click.Path(file_okay=False), default=None, help="Write per_structure.csv, metrics.json and PNG plots here.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--match-sample", default=500, show_default=True, help="Pairs used for the StructureMatcher match rate (0 = all).")
def evaluate(checkpoint, data, out_dir, device, batch_size, match_sample):
    """Evaluate CHECKPOINT (name or path) on the pair file DATA."""
    from e3relax_ase.io.checkpoint import CheckpointError
    from e3relax_ase.training.train.evaluate import evaluate_checkpoint

    try:
        summary = evaluate_checkpoint(checkpoint, data, out_dir, device=device, batch_size=batch_size, match_sample=match_sample)
    except (CheckpointError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(summary, indent=2))
