"""Training speed and validation error per GPU-minute: the trainer before the rewrite (a git
revision, run from a copy of its package) against the current one, in the same call.

    python benchmarks/bench_training.py --old .gpu/old [--device cuda] [--width 128]
        [--train FILES] [--val FILES] [--throughput-seconds 30] [--train-seconds 150]
        [--variants count64,atoms4096,...] [--recipe CONFIG] [--out FILE]

Two measurements:
1. Throughput (pairs/s): optimiser steps on the same training pairs for a fixed time after a
   warm-up, the old trainer at its recipe's batch of 64 crystals, the new one at each
   ``--variants`` setting (``count64``: 64 crystals a batch, as the old; ``atomsN``: batches
   of N atoms; ``+compile``: message passing compiled; ``+amp``: bfloat16 autocast).
2. Validation error per GPU-minute: each trainer's ``train()`` from the same random start for
   ``--train-seconds`` on the same pairs, each with its own recipe (the old one: the shipped
   checkpoint's; the new one: ``--recipe``), then the best EMA weights of both evaluated by
   the current evaluator on the same validation pairs, next to Dummy.

The old package runs in a child process with it first on PYTHONPATH (``--old``: a folder
holding the old ``e3relax_ase``; ``git archive REV e3relax_ase | tar -x -C FOLDER``). Writes
JSON with the command, the machine and the versions (benchmarks/results/training_<device>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRAIN = ["data/nrel_zintl/train.npz", "data/sevennet0_distilled/train.npz"]
DEFAULT_VAL = ["data/nrel_zintl/val.npz"]


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_new(prepared, device, width: int, variant: str, seconds: float, warmup_steps: int = 5) -> dict:
    """Pairs/s of the current trainer's step under ``variant``."""
    import numpy as np
    import torch

    from e3relax_ase.config import ModelConfig
    from e3relax_ase.nn.architectures import build_model
    from e3relax_ase.training.train.batching import Budget, EpochBatches
    from e3relax_ase.training.train.config import TrainConfig
    from e3relax_ase.training.train.trainer import take_step

    parts = variant.split("+")
    size = parts[0]
    budget = Budget(max_graphs=int(size[5:])) if size.startswith("count") else Budget(max_atoms=int(size[5:]), max_graphs=0)
    config = TrainConfig(model={"num_channels": width}, amp="amp" in parts, compile="compile" in parts, batch_size=max(budget.max_graphs, 1))
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_channels=width)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = None
    if config.compile:
        compiled = [torch.compile(layer.message_passing, dynamic=True) for layer in model.layers]

        def forward(graph):
            return model(graph, message_passing=compiled)

    order = np.random.default_rng(0).permutation(len(prepared))
    batches = EpochBatches(prepared, order, budget)
    tick = time.perf_counter()
    for b in range(warmup_steps):
        take_step(model, optimizer, *batches.collate(b % len(batches))[:3], config, device, forward)
    _sync(device)
    warmup_seconds = time.perf_counter() - tick
    pairs = steps = 0
    start = time.perf_counter()
    b = warmup_steps % len(batches)
    while time.perf_counter() - start < seconds:
        if b == len(batches):
            b = 0
        take_step(model, optimizer, *batches.collate(b)[:3], config, device, forward)
        pairs += batches.n_pairs(b)
        steps += 1
        b += 1
        if steps % 20 == 0:
            _sync(device)
    _sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "variant": variant,
        "trainer": "new",
        "pairs_per_s": pairs / elapsed,
        "steps": steps,
        "pairs": pairs,
        "seconds": elapsed,
        "mean_pairs_per_step": pairs / max(steps, 1),
        "warmup_seconds": warmup_seconds,
        "peak_gpu_gib": peak,
    }


def child_old(args) -> None:
    """In a process whose PYTHONPATH starts with the old package: its throughput and its train()."""
    import torch

    import e3relax_ase  # noqa: F401  (first: PYTHONPATH decides which package this is)
    from e3relax_ase.config import ModelConfig
    from e3relax_ase.nn.model import E3RelaxH2
    from e3relax_ase.training.config import TrainConfig
    from e3relax_ase.training.dataset import load_or_prepare
    from e3relax_ase.training.trainer import epoch_order, take_step, train

    device = torch.device(args.device)
    result = {"package": e3relax_ase.__file__}
    tick = time.perf_counter()
    train_set = load_or_prepare(args.train, 6.0, 50, args.cache)
    val_set = load_or_prepare(args.val, 6.0, 50, args.cache)
    result["prepare_seconds"] = time.perf_counter() - tick
    train_set, val_set = train_set.to(device), val_set.to(device)
    if args.throughput_seconds:
        config = TrainConfig(model={"num_channels": args.width}, batch_size=64)
        torch.manual_seed(0)
        model = E3RelaxH2(ModelConfig(num_channels=args.width)).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        order = epoch_order(len(train_set), 0, 0)
        for b in range(5):
            take_step(model, optimizer, *train_set.batch(order[b * 64 : (b + 1) * 64]), config, device)
        _sync(device)
        pairs = steps = 0
        start = time.perf_counter()
        b = 5
        while time.perf_counter() - start < args.throughput_seconds:
            if (b + 1) * 64 > len(order):
                b = 0
            take_step(model, optimizer, *train_set.batch(order[b * 64 : (b + 1) * 64]), config, device)
            pairs, steps, b = pairs + 64, steps + 1, b + 1
        _sync(device)
        elapsed = time.perf_counter() - start
        result["throughput"] = {"variant": "count64", "trainer": "old", "pairs_per_s": pairs / elapsed, "steps": steps, "pairs": pairs, "seconds": elapsed}
    if args.train_seconds:
        recipe = json.loads(args.old_recipe)
        config = TrainConfig(
            train_data=tuple(args.train),
            val_data=tuple(args.val),
            out_dir=args.old_out,
            model={"num_channels": args.width},
            time_budget_minutes=args.train_seconds / 60,
            **recipe,
        )
        summary = train(config, device=str(device), prepared=(train_set, val_set))
        result["train"] = {"summary": summary, "recipe": recipe}
    print("RESULT " + json.dumps(result), flush=True)


def run_old(args) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child-old",
        "--device",
        args.device,
        "--width",
        str(args.width),
        "--throughput-seconds",
        str(args.throughput_seconds),
        "--train-seconds",
        str(args.train_seconds),
        "--cache",
        str(Path(args.work) / "cache_old"),
        "--old-out",
        str(Path(args.work) / "old_run"),
        "--old-recipe",
        args.old_recipe,
        "--train",
        *args.train,
        "--val",
        *args.val,
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(args.old).resolve()), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        return {"error": done.stderr[-3000:]}
    return json.loads(lines[-1][len("RESULT ") :])


def evaluate_weights(weights_path: Path, config_values: dict, val_set, device) -> dict:
    """The current evaluator on ``val_set`` for EMA weights saved by either trainer."""
    import torch

    from e3relax_ase.config import ModelConfig
    from e3relax_ase.nn.architectures import build_model
    from e3relax_ase.training.train.batching import Budget
    from e3relax_ase.training.train.trainer import evaluate

    model = build_model(ModelConfig.from_dict(config_values)).to(device)
    model.load_state_dict(torch.load(weights_path, map_location=device, weights_only=True)["ema"])
    return evaluate(model, val_set, Budget(max_atoms=16384), device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", help="folder holding the old e3relax_ase package")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--train", nargs="+", default=DEFAULT_TRAIN)
    parser.add_argument("--val", nargs="+", default=DEFAULT_VAL)
    parser.add_argument("--throughput-seconds", type=float, default=30.0)
    parser.add_argument("--train-seconds", type=float, default=150.0)
    parser.add_argument("--variants", default="count64,atoms2048,atoms4096,atoms4096+amp,atoms4096+compile")
    parser.add_argument("--recipe", default=str(ROOT / "checkpoints" / "configs" / "zintl_f128.yaml"), help="the new trainer's config for measurement 2")
    parser.add_argument("--old-recipe", default=json.dumps({"batch_size": 64, "lr": 1e-3, "lr_patience": 5, "ema_decay": 0.999, "seed": 0}))
    parser.add_argument("--work", default=str(ROOT / ".gpu" / "bench_training"))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out")
    parser.add_argument("--child-old", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--old-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_old:
        return child_old(args)

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_pipeline import result_header, write_result

    from e3relax_ase.training.train.config import TrainConfig
    from e3relax_ase.training.train.dataset import load_or_prepare
    from e3relax_ase.training.train.trainer import train

    device = torch.device(args.device)
    results = {**result_header(args.device), "train": args.train, "val": args.val, "width": args.width, "throughput": [], "per_gpu_minute": {}}
    out = args.out

    def save():
        write_result(results, out, f"training_{device.type}.json")

    tick = time.perf_counter()
    train_set = load_or_prepare(args.train, 6.0, 50, workers=args.workers).to(device)
    val_set = load_or_prepare(args.val, 6.0, 50, workers=args.workers).to(device)
    results["prepare_seconds_new"] = time.perf_counter() - tick
    results["n_train"], results["n_val"] = len(train_set), len(val_set)
    if args.throughput_seconds:
        for variant in [v for v in args.variants.split(",") if v]:
            try:
                results["throughput"].append(measure_new(train_set, device, args.width, variant, args.throughput_seconds))
            except Exception as exc:  # a variant that fails (compile on this machine) is reported, not fatal
                results["throughput"].append({"variant": variant, "trainer": "new", "error": f"{type(exc).__name__}: {exc}"[:2000]})
            print(json.dumps(results["throughput"][-1]), flush=True)
            save()
    old = run_old(args) if args.old else {"error": "no --old package given"}
    results["old"] = {k: v for k, v in old.items() if k != "throughput"}
    if "throughput" in old:
        results["throughput"].insert(0, old["throughput"])
    save()
    if args.train_seconds:
        recipe = TrainConfig.from_yaml(args.recipe).to_dict()
        recipe.update(
            train_data=args.train, val_data=args.val, out_dir=str(Path(args.work) / "new_run"), time_budget_minutes=args.train_seconds / 60, cache_dir=""
        )
        new_config = TrainConfig.from_dict(recipe)
        summary = train(new_config, device=str(device), prepared=(train_set, val_set))
        results["per_gpu_minute"]["new"] = {
            "summary": summary,
            "recipe": args.recipe,
            "validation": evaluate_weights(Path(summary["out_dir"]) / "best_ema.pt", new_config.model, val_set, device),
        }
        if "train" in old:
            old_config = dict(architecture="axis-lattice", num_channels=args.width)
            results["per_gpu_minute"]["old"] = {
                **old["train"],
                "validation": evaluate_weights(Path(old["train"]["summary"]["out_dir"]) / "best_ema.pt", old_config, val_set, device),
            }
        save()
    print(json.dumps(results["throughput"], indent=1))
    print(json.dumps({k: v.get("validation") for k, v in results["per_gpu_minute"].items()}, indent=1))


if __name__ == "__main__":
    main()
