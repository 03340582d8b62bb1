"""The training loop: small functions, exact resume, a wall-time budget, DDP-ready, and a
step the host never waits for.

train() -> train_one_epoch() -> take_step(); evaluate() on the EMA weights after each epoch.
Pairs, their graphs and targets are prepared once and live on the training device; an epoch's
batches are packed by an atom/edge budget and indexed on the host (``training.train.batching``),
so within an epoch no value is read back from the device: the host queues steps ahead of
the GPU, and the epoch's loss sums are read once at its end.

The full training state is written atomically at the end of every epoch, and the data order
of epoch e is drawn from a generator seeded with (seed, e), so a run interrupted at any epoch
boundary and resumed gives the same weights as an uninterrupted one (bit for bit on a CPU).
What a finished run hands on (the shippable checkpoint, the portable state) is in :mod:`.export`.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from e3relax_ase.distributed import World
from e3relax_ase.io.checkpoint import load_checkpoint
from e3relax_ase.nn.architectures import build_model
from e3relax_ase.nn.compiled import compile_message_passing
from e3relax_ase.training.train.batching import Budget, EpochBatches, pair_sizes, shard
from e3relax_ase.training.train.config import TrainConfig
from e3relax_ase.training.train.dataset import PreparedPairs, load_or_prepare
from e3relax_ase.training.train.loss import relaxation_loss
from e3relax_ase.training.train.metrics import COORD_MAE, DUMMY_PREFIX, VOLUME_ABS, structure_errors

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
LOG_FILE = "log.csv"
SUMMARY_FILE = "summary.json"


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of an epoch: a function of (seed, epoch) only, so resumes reproduce it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def training_budget(config: TrainConfig) -> Budget:
    return Budget(max_atoms=config.batch_atoms, max_edges=config.batch_edges, max_graphs=config.batch_size)


def ema_update(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    # Warm-up: early on, average over fewer steps so the EMA does not drag the initial weights.
    decay = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(list(ema_model.parameters()), [p.detach() for p in model.parameters()], 1 - decay)


class LearningRate:
    """Linear warm-up to the peak rate, then ReduceLROnPlateau's rule on validation error.

    Kept as plain numbers (saved with the training state): the rate of a step is set on the
    optimiser as a Python float, which costs the device nothing.
    """

    def __init__(self, config: TrainConfig, steps_per_epoch: int):
        self.peak = config.effective_lr
        self.warmup_steps = max(int(config.warmup_epochs * steps_per_epoch), 0)
        self.factor, self.patience, self.min_lr = config.lr_factor, config.lr_patience, config.min_lr
        self.scale, self.best, self.bad_epochs = 1.0, float("inf"), 0
        self.warm_from = 0  # step where the warm-up starts (again, after a resume without moments)

    def at(self, step: int) -> float:
        warm = min(1.0, (step - self.warm_from + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        # min_lr floors the reductions only (as ReduceLROnPlateau), never raises a smaller peak.
        return max(self.peak * self.scale, min(self.min_lr, self.peak)) * warm

    def end_epoch(self, error: float) -> None:
        if error < self.best * (1 - 1e-4):
            self.best, self.bad_epochs = error, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.scale *= self.factor
            self.bad_epochs = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.best, self.bad_epochs = state["scale"], state["best"], state["bad_epochs"]


def take_step(model, optimizer, graph, positions_target, cell_target, config: TrainConfig, device, forward=None) -> dict:
    """One optimiser step on one batch; returns the loss terms as device tensors."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=config.amp and device.type == "cuda")
    with autocast:
        output = model(graph) if forward is None else forward(graph)
    output = type(output)(output.positions.float(), output.cell.float())
    layer_weights = list(config.layer_weights) or None
    loss, parts = relaxation_loss(output, positions_target.float(), cell_target.float(), graph.batch, layer_weights, config.lattice_weight)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip, foreach=True)
    # A non-finite gradient zeroes the step instead of corrupting the weights; done on the
    # device (no `if` on a GPU value) so the host never waits for the GPU inside an epoch.
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    finite = torch.isfinite(grad_norm)
    torch._foreach_mul_(grads, finite.to(grads[0].dtype))
    for g in grads:
        g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    optimizer.step()
    return {"loss": loss.detach(), "skipped": (~finite).float(), **parts}


@torch.no_grad()
def evaluate(model, data: PreparedPairs, budget: Budget, device, source_names=()) -> dict:
    """Mean per-structure errors of the last layer, and of the Dummy (input) baseline.

    Means over all pairs, and per source file as ``<name>_<metric>`` when ``source_names``
    names the files the pairs came from. Read back from the device once, at the end.
    """
    model.eval()
    n_sources = max(len(source_names), 1)
    sums: dict[str, torch.Tensor] = {}
    counts = torch.zeros(n_sources, dtype=torch.float64, device=device)
    batches = EpochBatches(data, np.arange(len(data)), budget)
    for b in range(len(batches)):
        graph, positions_target, cell_target, source = batches.collate(b)
        output = model(graph)
        errors = structure_errors(output.positions[-1], output.cell[-1], positions_target, cell_target, graph.batch)
        dummy = structure_errors(graph.positions, graph.cell, positions_target, cell_target, graph.batch)
        for name, values in list(errors.items()) + [(DUMMY_PREFIX + k, v) for k, v in dummy.items()]:
            by_source = torch.zeros(n_sources, dtype=torch.float64, device=device).index_add_(0, source.clamp(max=n_sources - 1), values.double())
            sums[name] = sums.get(name, 0.0) + by_source
        counts.index_add_(0, source.clamp(max=n_sources - 1), torch.ones_like(source, dtype=torch.float64))
    totals = {name: value.cpu().numpy() for name, value in sums.items()}
    n_pairs = counts.cpu().numpy()
    metrics = {name: float(value.sum() / max(n_pairs.sum(), 1)) for name, value in totals.items()}
    if len(source_names) > 1:
        for k, source_name in enumerate(source_names):
            for name, value in totals.items():
                metrics[f"{source_name}_{name}"] = float(value[k] / max(n_pairs[k], 1))
    return metrics


def source_labels(paths) -> list[str]:
    """Short labels of pair files for per-source metrics: data/nrel_zintl/val.npz -> nrel_zintl."""
    return [Path(path).parent.name or Path(path).stem for path in paths]


def train_one_epoch(model, ddp_model, ema_model, optimizer, rate: LearningRate, data: PreparedPairs, config, epoch, step, device, dist: World, forward=None):
    order = epoch_order(len(data), config.seed, epoch).numpy()
    atoms, edges = pair_sizes(data)
    order, bounds = shard(order, atoms[order], edges[order], training_budget(config), dist.rank, dist.world_size)
    batches = EpochBatches(data, order, pair_bounds=bounds)
    sums: dict[str, torch.Tensor] = {}
    for b in range(len(batches)):
        for group in optimizer.param_groups:
            group["lr"] = rate.at(step)
        graph, positions_target, cell_target, _ = batches.collate(b)
        parts = take_step(ddp_model, optimizer, graph, positions_target, cell_target, config, device, forward)
        step += 1
        ema_update(ema_model, model, config.ema_decay, step)
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + value
    n_batches = len(batches)
    if dist.world_size > 1 and sums:  # the log reports the whole epoch, not rank 0's shard
        names = sorted(sums)
        totals = dist.all_reduce_sum(torch.stack([sums[k].float() for k in names]))
        sums = {k: totals[i] / dist.world_size for i, k in enumerate(names)}
    metrics = {f"train_{k}": float(v) / max(n_batches, 1) for k, v in sums.items()}
    metrics["train_skipped"] = metrics.get("train_skipped", 0.0) * max(n_batches, 1) * dist.world_size  # a count, not a mean
    metrics["train_pairs"] = len(order) * dist.world_size
    if metrics["train_skipped"]:
        logger.warning("epoch %d: %d steps with a non-finite gradient were skipped", epoch, metrics["train_skipped"])
    return metrics, step


def _atomic_save(obj, path: Path) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_log(out_dir: Path, history: list[dict]) -> None:
    names = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
    tmp = out_dir / f".{LOG_FILE}.tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, out_dir / LOG_FILE)


# Operational settings a resumed run may change; everything else must match the saved run.
# train_data may grow while a long run continues (new distilled pairs as they land), a run may
# move to another machine (out_dir, compile, prepare_workers), and its rate and clipping may be
# lowered when it turns out unstable (the log records every epoch's rate).
_RESUMABLE_CHANGES = (
    "time_budget_minutes",
    "max_epochs",
    "early_stop_patience",
    "cache_dir",
    "out_dir",
    "compile",
    "prepare_workers",
    "train_data",
    "lr",
    "grad_clip",
    "warmup_epochs",
    "lr_patience",
)


def _resume_key(values: dict) -> dict:
    return {k: v for k, v in values.items() if k not in _RESUMABLE_CHANGES}


def train(config: TrainConfig, device: str | torch.device = "auto", prepared: tuple | None = None) -> dict:
    """Train (or resume) the run in ``config.out_dir``; returns the summary.

    Args:
        config: the training configuration.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        prepared: optional (train PreparedPairs, val PreparedPairs) to skip data preparation.

    Returns:
        Summary dict: status ("finished", "early_stopped" or "paused" when the time budget
        ran out), epochs, best validation metrics, paths.
    """
    started = time.monotonic()
    dist = World.current()
    if device == "auto":
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_config = config.model_config

    if prepared is None:
        cache = config.cache_dir or None
        workers = config.prepare_workers or os.cpu_count() or 1
        train_set = load_or_prepare(config.train_data, model_config.cutoff, model_config.max_neighbors, cache, workers=workers)
        val_set = load_or_prepare(config.val_data, model_config.cutoff, model_config.max_neighbors, cache, max_pairs=config.val_max_pairs, workers=workers)
    else:
        train_set, val_set = prepared
    train_set, val_set = train_set.to(device), val_set.to(device)

    torch.manual_seed(config.seed)
    model = build_model(model_config)
    if config.init_from:
        initial, info = load_checkpoint(config.init_from)
        if info.config != model_config:
            raise ValueError(f"init_from {config.init_from}: its model config differs from this run's model config")
        model.load_state_dict(initial.state_dict())
    model = model.to(device)
    ema_model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.effective_lr, weight_decay=config.weight_decay, fused=device.type == "cuda")
    atoms, edges = pair_sizes(train_set)
    steps_per_epoch = max(len(shard(np.arange(len(atoms)), atoms, edges, training_budget(config), 0, dist.world_size)[1]) - 1, 1)
    rate = LearningRate(config, steps_per_epoch)
    state_path = out_dir / STATE_FILE
    epoch, step, history, best, stale = 0, 0, [], None, 0
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        if _resume_key(state["train_config"]) != _resume_key(config.to_dict()):
            raise ValueError(f"{state_path} was written by a different training config; use a new out_dir")
        ema_weights = _weights_of_state(state, device)
        model.load_state_dict(state.get("model", ema_weights))
        ema_model.load_state_dict(ema_weights)
        rate.load_state_dict(state["rate"])
        epoch, step, history, best, stale = state["epoch"], state["step"], state["history"], state["best"], state["stale"]
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        else:  # a portable state (``write_portable_state``): Adam's moments rebuild during a new warm-up
            rate.warm_from = step
        logger.info("resumed %s at epoch %d", out_dir, epoch)
    ddp_model: torch.nn.Module = model
    if dist.world_size > 1:
        # static_graph: the set of parameters used is the same every step, so DDP learns it
        # once instead of searching every step.
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True)
    forward = None
    if config.compile:
        compiled = compile_message_passing(model)

        def forward(graph):
            return ddp_model(graph, message_passing=compiled)

    val_sources = source_labels(config.val_data) if prepared is None else ()
    val_budget = Budget(max_atoms=4 * config.batch_atoms, max_edges=4 * config.batch_edges, max_graphs=4 * config.batch_size)

    status = "finished"
    epoch_seconds = 0.0
    epochs_this_call = 0
    while epoch < config.max_epochs:
        if stale >= config.early_stop_patience:
            status = "early_stopped"
            break
        elapsed = (time.monotonic() - started) / 60
        # At least one epoch per call, so a budget shorter than an epoch still makes progress.
        # Clocks differ between ranks: rank 0 decides for all.
        over_budget = bool(config.time_budget_minutes and epochs_this_call and elapsed + 1.2 * epoch_seconds / 60 > config.time_budget_minutes)
        if dist.broadcast(over_budget):
            status = "paused"
            break
        tick = time.monotonic()
        train_metrics, step = train_one_epoch(model, ddp_model, ema_model, optimizer, rate, train_set, config, epoch, step, device, dist, forward)
        # The epoch's metrics were read back from the device, so the training work is done here:
        # train_seconds is the optimisation alone (the samples/s of scaling measurements).
        train_seconds = time.monotonic() - tick
        # The EMA weights are the same on every rank; evaluating once and sharing the result keeps
        # the LR scheduler, the best epoch and early stopping identical on all ranks (GPU
        # scatter-adds are not bitwise reproducible, so per-rank evaluations could disagree).
        val_metrics = dist.broadcast(evaluate(ema_model, val_set, val_budget, device, val_sources) if dist.is_main else None)
        rate.end_epoch(val_metrics[COORD_MAE])
        epoch += 1
        epochs_this_call += 1
        epoch_seconds = time.monotonic() - tick
        row = {
            "epoch": epoch,
            "step": step,
            "lr": rate.at(step),
            "seconds": round(epoch_seconds, 3),
            "train_seconds": round(train_seconds, 3),
            **train_metrics,
            **{f"val_{k}": v for k, v in val_metrics.items()},
        }
        history.append(row)
        if best is None or val_metrics[COORD_MAE] < best[f"val_{COORD_MAE}"]:
            best, stale = dict(row), 0
            if dist.is_main:
                _atomic_save({"ema": {k: v.cpu() for k, v in ema_model.state_dict().items()}, "epoch": epoch}, out_dir / "best_ema.pt")
        else:
            stale += 1
        if dist.is_main:
            logger.info(
                "epoch %d  loss %.4f  val coord %.4f (dummy %.4f)  val volume %.2f (dummy %.2f)  lr %.2e  %.1fs",
                epoch,
                row.get("train_loss", float("nan")),
                val_metrics[COORD_MAE],
                val_metrics[DUMMY_PREFIX + COORD_MAE],
                val_metrics[VOLUME_ABS],
                val_metrics[DUMMY_PREFIX + VOLUME_ABS],
                row["lr"],
                epoch_seconds,
            )
            _atomic_save(
                {
                    "train_config": config.to_dict(),
                    "model": model.state_dict(),
                    "ema": ema_model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rate": rate.state_dict(),
                    "epoch": epoch,
                    "step": step,
                    "history": history,
                    "best": best,
                    "stale": stale,
                },
                state_path,
            )
            _write_log(out_dir, history)
    summary = {
        "status": status,
        "epochs": epoch,
        "steps": step,
        "best": best,
        "out_dir": str(out_dir),
        "wall_seconds_this_call": round(time.monotonic() - started, 1),
        "device": str(device),
        "world_size": dist.world_size,
    }
    if dist.is_main:
        (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def _weights_of_state(state: dict, device) -> dict:
    """The EMA weights a state holds, or loads from the checkpoint it names (sha256 checked)."""
    if "ema" in state:
        return state["ema"]
    reference = state["weights_checkpoint"]
    model, _ = load_checkpoint(reference["path"], map_location=device, expected_sha256=reference["sha256"])
    return model.state_dict()
