"""What a finished training run hands on: the shippable checkpoint of its EMA weights and
the portable state that lets another machine continue the run (:mod:`.trainer`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from e3relax_ase.io.checkpoint import save_checkpoint
from e3relax_ase.nn.architectures import build_model
from e3relax_ase.training.train.config import TrainConfig
from e3relax_ase.training.train.trainer import STATE_FILE, _atomic_save


def export_checkpoint(out_dir: str | os.PathLike, path: str | os.PathLike, metadata: dict | None = None, which: str = "best") -> str:
    """Write the EMA weights of a training run as a shippable checkpoint; returns its sha256.

    Args:
        out_dir: the training run.
        path: the checkpoint file to write.
        metadata: merged into the checkpoint metadata (name, data, metrics, licence, ...).
        which: "best" (the EMA weights at the best validation epoch) or "last".
    """
    out_dir = Path(out_dir)
    state = torch.load(out_dir / STATE_FILE, map_location="cpu", weights_only=True)
    config = TrainConfig.from_dict(state["train_config"])
    model = build_model(config.model_config)
    weights = torch.load(out_dir / "best_ema.pt", map_location="cpu", weights_only=True)["ema"] if which == "best" else state["ema"]
    model.load_state_dict(weights)
    meta = {"train_config": config.to_dict(), "epochs": state["epoch"], "best_validation": state["best"]}
    meta.update(metadata or {})
    return save_checkpoint(path, model, meta)


def write_portable_state(out_dir: str | os.PathLike, path: str | os.PathLike, weights_checkpoint: str | None = None) -> Path:
    """The part of a run's state worth carrying between machines, in one file.

    The EMA weights (the model that ships), the schedule, the log and the counters; the raw
    weights and Adam's moments are left out (three times the size, and rebuilt: a resume
    from this file starts the raw weights at the EMA and warms the rate up again). With
    ``weights_checkpoint`` (a checkpoint file, such as the one a run shipped) the weights are
    not copied either: the state names that file and its sha256, and a resume loads them from
    it, so a repository that ships the checkpoint carries the run for a few kilobytes more.
    Copy the file to ``<out_dir>/training_state.pt`` of a new machine to continue the run.
    """
    state = torch.load(Path(out_dir) / STATE_FILE, map_location="cpu", weights_only=True)
    portable = {k: state[k] for k in ("train_config", "ema", "rate", "epoch", "step", "history", "best", "stale")}
    if weights_checkpoint is not None:
        from e3relax_ase.io.checkpoint import file_sha256

        del portable["ema"]
        portable["weights_checkpoint"] = {"path": str(weights_checkpoint), "sha256": file_sha256(weights_checkpoint)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(portable, path)
    return path
