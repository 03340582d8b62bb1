"""``e3relax-ase info``: what a checkpoint is (config, size, training data, metrics, hashes, versions)."""

from __future__ import annotations

import json
import platform

import click


def describe_checkpoint(checkpoint: str = "default") -> dict:
    """Everything ``info`` reports about a checkpoint, as JSON-ready values.

    Raises:
        CheckpointError: the checkpoint cannot be loaded.
    """
    import e3nn
    import torch

    from e3relax_ase import __version__
    from e3relax_ase.io.checkpoint import load_checkpoint, read_registry

    model, info = load_checkpoint(checkpoint)
    registry = read_registry()
    entry = registry.get("checkpoints", {}).get(info.name, {})
    metadata = info.metadata
    return {
        "name": info.name,
        "path": info.path,
        "sha256": info.sha256,
        "default": registry.get("default") == info.name,
        "untrained": info.untrained,
        "parameters": model.count_parameters(),
        "training_data": metadata.get("training_data", entry.get("training_data")),
        "licence": metadata.get("licence", entry.get("licence")),
        "metrics": metadata.get("metrics", entry.get("metrics", {})),
        "elements": metadata.get("elements"),
        "config": info.config.to_dict(),
        "versions": {
            "checkpoint": info.versions,
            "running": {
                "e3relax_ase": __version__,
                "torch": str(torch.__version__),
                "e3nn": str(e3nn.__version__),
                "python": platform.python_version(),
            },
        },
        "metadata": metadata,
        "registered": sorted(registry.get("checkpoints", {})),
    }


def _text(data: dict) -> str:
    lines = [
        f"name           {data['name']}{'  (default)' if data['default'] else ''}",
        f"path           {data['path']}",
        f"sha256         {data['sha256']}",
        f"parameters     {data['parameters']:,}",
        f"training data  {_describe_data(data['training_data'])}",
        f"licence        {data['licence'] or 'not recorded'}",
        f"elements       {data['elements'] if data['elements'] else 'not recorded (1..max_atomic_number accepted)'}",
    ]
    if data["untrained"]:
        lines.insert(1, "WARNING        UNTRAINED placeholder (random weights): predictions are meaningless")
    lines.append("metrics        " + (", ".join(f"{k}={v}" for k, v in data["metrics"].items()) if data["metrics"] else "none recorded"))
    lines.append("config")
    lines += [f"  {key:<22} {value}" for key, value in data["config"].items()]
    lines.append("versions       saved with / running")
    saved, running = data["versions"]["checkpoint"], data["versions"]["running"]
    lines += [f"  {key:<22} {saved.get(key, '?')} / {running.get(key, '?')}" for key in sorted(set(saved) | set(running))]
    lines.append(f"registered     {', '.join(data['registered']) or 'none'}")
    return "\n".join(lines)


@click.command("info")
@click.argument("checkpoint", default="default")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def info(checkpoint, as_json):
    """Show CHECKPOINT's config, parameter count, training data, metrics, sha256 and versions.

    CHECKPOINT is "default", a registry name or a path.
    """
    from e3relax_ase.io.checkpoint import CheckpointError

    try:
        data = describe_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(data, indent=2, default=str) if as_json else _text(data))


def _describe_data(training_data) -> str:
    """One line for the training data: each file and its pair count (the full record, with the
    data's own provenance, is in --json)."""
    if not training_data:
        return "not recorded"
    if isinstance(training_data, list) and all(isinstance(d, dict) and "file" in d for d in training_data):
        return ", ".join(f"{d['file']} ({d.get('pairs', '?')} pairs)" for d in training_data)
    return str(training_data)
