"""Several GPUs of one host: training samples/s and relax throughput on 1 vs N GPUs (torchrun),
and bfloat16 autocast training against float32.

    python benchmarks/bench_multi_gpu.py train --gpus 2 [--epochs 8]
    python benchmarks/bench_multi_gpu.py relax --gpus 2 [--n 40000] [--workers 6]
    python benchmarks/bench_multi_gpu.py relax-api --gpus 2 [--n 40000] [--workers 12]

``train`` runs benchmarks/configs/train_nrel_f128.yaml (or --config) on GPU 0 and the same
config with ``amp: true`` on GPU 1 at the same time (one process each), then the float32 config under
``torchrun --nproc-per-node N`` with the same per-GPU batch. Throughput is training structures
per second from log.csv's ``train_seconds`` (the optimisation alone) and ``seconds`` (with the
validation pass, which rank 0 runs alone), median over epochs >= 2.
``relax`` writes N structures (the NREL inputs, repeated) to one extxyz and times
``e3relax-ase relax`` on one GPU and under torchrun on N GPUs, from the shell command to the
last file written, then checks that both wrote the same structures. ``relax-api`` times OneShotRelaxer in memory
(no file IO): one GPU, N GPUs under torchrun (``relax.sharded.relax_sharded``), and N independent
processes on 1/N of the inputs each.
Each prints a table and writes JSON (command, device, versions, figures) to --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "benchmarks" / "configs"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def environment() -> dict:
    import torch

    return {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.machine(),
        "gpus_visible": torch.cuda.device_count(),
        "cpu_count": os.cpu_count(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }


def child_env(gpus: str | None = None) -> dict:
    # NVLink multicast off (the device notes); one OpenMP thread per process in every run, as
    # torchrun sets for its processes, so the 1-GPU baseline is not slowed by thread contention.
    env = dict(os.environ, PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    return env


# --- training --------------------------------------------------------------------------------
def config_copy(source: Path, out_dir: str, directory: Path, epochs: int, amp: bool) -> Path:
    values = yaml.safe_load(source.read_text())
    values.update(out_dir=out_dir, max_epochs=epochs, amp=amp)
    path = directory / f"{Path(out_dir).name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def prepare_cache(config: Path) -> None:
    """Fill the preparation cache from one process before several read it."""
    code = (
        "import sys; from e3relax_ase.training.train.config import TrainConfig; from e3relax_ase.training.train.dataset import load_or_prepare\n"
        "c = TrainConfig.from_yaml(sys.argv[1]); m = c.model_config\n"
        "load_or_prepare(c.train_data, m.cutoff, m.max_neighbors, c.cache_dir)\n"
        "load_or_prepare(c.val_data, m.cutoff, m.max_neighbors, c.cache_dir, max_pairs=c.val_max_pairs)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(config)], check=True, env=child_env(), cwd=ROOT)


def read_log(out_dir: Path) -> list[dict]:
    with open(out_dir / "log.csv") as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


def throughput(rows: list[dict], n_train: int) -> dict:
    steady = [r for r in rows if r["epoch"] >= 2] or rows
    return {
        "epochs": len(rows),
        "train_structures_per_s": n_train / statistics.median(r["train_seconds"] for r in steady),
        "epoch_structures_per_s": n_train / statistics.median(r["seconds"] for r in steady),
        "val_coord_mae_by_epoch": [round(r["val_coord_mae"], 5) for r in rows],
        "val_volume_abs_by_epoch": [round(r["val_volume_abs"], 3) for r in rows],
        "train_loss_by_epoch": [round(r["train_loss"], 5) for r in rows],
    }


def run_train(args) -> dict:
    from e3relax_ase.training.data.pairs import load_pairs

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = Path(args.config)
    fp32 = config_copy(base, str(work / "one_gpu_fp32"), work, args.epochs, amp=False)
    bf16 = config_copy(base, str(work / "one_gpu_bf16"), work, args.epochs, amp=True)
    multi = config_copy(base, str(work / f"gpus{args.gpus}_fp32"), work, args.epochs, amp=False)
    n_train = sum(len(load_pairs(ROOT / path)) for path in yaml.safe_load(base.read_text())["train_data"])
    prepare_cache(fp32)
    results = {**environment(), "config": str(base), "n_train": n_train, "runs": {}}
    logs = {}
    start = time.perf_counter()
    # float32 on GPU 0 and bfloat16 on GPU 1 at once (each has a GPU to itself), or float32 alone.
    procs = {}
    single = (("one_gpu_fp32", fp32, "0"), ("one_gpu_bf16", bf16, "1")) if args.amp == "concurrent" else (("one_gpu_fp32", fp32, "0"),)
    results["amp_run"] = args.amp
    for name, config, gpu in single:
        logs[name] = open(work / f"{name}.log", "w")
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "e3relax_ase", "train", str(config)], env=child_env(gpu), cwd=ROOT, stdout=logs[name], stderr=subprocess.STDOUT
        )
    for name, proc in procs.items():
        proc.wait()
        results["runs"][name] = {"returncode": proc.returncode, **throughput(read_log(work / name), n_train)}
    results["single_gpu_wall_s"] = time.perf_counter() - start
    name = f"gpus{args.gpus}_fp32"
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.run(
            TORCHRUN + ["--nproc-per-node", str(args.gpus), "-m", "e3relax_ase", "train", str(multi)],
            env=child_env(),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    results["runs"][name] = {"returncode": proc.returncode, **throughput(read_log(work / name), n_train)}
    one, many = results["runs"]["one_gpu_fp32"], results["runs"][name]
    for key in ("train_structures_per_s", "epoch_structures_per_s"):
        results[f"scaling_efficiency_{key.replace('_structures_per_s', '')}"] = many[key] / (args.gpus * one[key])
    if "one_gpu_bf16" in results["runs"]:
        results["amp_speedup_train"] = results["runs"]["one_gpu_bf16"]["train_structures_per_s"] / one["train_structures_per_s"]
    return results


def print_train(r: dict) -> None:
    print(f"\n{r['device']} x {r['gpus_visible']}, {r['n_train']} training pairs, config {r['config']} (its batch_size per GPU)")
    for name, run in r["runs"].items():
        print(
            f"  {name:14s} train {run['train_structures_per_s']:7.0f} structures/s, with validation {run['epoch_structures_per_s']:7.0f}/s; "
            f"val coord MAE by epoch {run['val_coord_mae_by_epoch']}"
        )
    print(f"  scaling efficiency: training {r['scaling_efficiency_train'] * 100:.1f}%, with validation {r['scaling_efficiency_epoch'] * 100:.1f}%")
    if "amp_speedup_train" in r:
        print(f"  bf16 autocast / float32 training speed: {r['amp_speedup_train']:.2f}x")


# --- relaxing --------------------------------------------------------------------------------
def nrel_inputs(n: int) -> list:
    """n unrelaxed NREL inputs (train, val and test splits in order, repeated to n)."""
    from ase import Atoms

    from e3relax_ase.training.data.pairs import load_pairs

    frames = []
    for split in ("train", "val", "test"):
        pairs = load_pairs(ROOT / "data" / "nrel_zintl" / f"{split}.npz")
        for k in range(len(pairs)):
            atoms = slice(pairs.offsets[k], pairs.offsets[k + 1])
            frames.append(Atoms(pairs.numbers[atoms], positions=pairs.pos_unrelaxed[atoms], cell=pairs.cell_unrelaxed[k], pbc=True))
    return [frames[i % len(frames)] for i in range(n)]


def write_inputs(path: Path, n: int) -> None:
    from ase.io import write

    write(path, nrel_inputs(n), format="extxyz")


def timed_relax(command: list[str], env: dict, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.run(command, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 1):  # 1: some inputs refused (overlapping atoms), the rest written
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}; see {log}")
    return seconds


def run_relax(args) -> dict:
    from ase.io import read

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    inputs = work / "inputs.extxyz"
    write_inputs(inputs, args.n)
    start = time.perf_counter()
    read(inputs, index=":")
    read_seconds = time.perf_counter() - start  # the file-reading floor every process pays
    common = ["relax", str(inputs), "--workers", str(args.workers), "--precision", args.precision, "-q"]
    results = {**environment(), "n_structures": args.n, "workers_per_process": args.workers, "precision": args.precision, "read_extxyz_seconds": read_seconds}
    one = timed_relax([sys.executable, "-m", "e3relax_ase"] + common + ["-o", str(work / "one.extxyz")], child_env("0"), work / "one.log")
    many = timed_relax(
        TORCHRUN + ["--nproc-per-node", str(args.gpus), "-m", "e3relax_ase"] + common + ["-o", str(work / "many.extxyz")], child_env(), work / "many.log"
    )
    results["one_gpu"] = {"seconds": one, "structures_per_s": args.n / one}
    results[f"gpus{args.gpus}"] = {"seconds": many, "structures_per_s": args.n / many}
    results["speedup"] = one / many
    results["scaling_efficiency"] = one / many / args.gpus
    a = read(work / "one.extxyz", index=":")
    b = read(work / "many.extxyz", index=":")
    results["same_count"] = len(a) == len(b)
    results["max_position_difference_A"] = float(max(np.abs(x.positions - y.positions).max() for x, y in zip(a, b)))
    results["max_cell_difference_A"] = float(max(np.abs(x.cell.array - y.cell.array).max() for x, y in zip(a, b)))
    results["written"] = len(a)
    return results


def api_child(args) -> None:
    """One process of ``relax-api``: relax_sharded over the in-memory inputs, timed on rank 0."""
    import torch

    from e3relax_ase import distributed
    from e3relax_ase.relax import sharded
    from e3relax_ase.relax.relaxer import OneShotRelaxer

    with distributed.process_group() as world:
        relaxer = OneShotRelaxer("default", device=world.device("cuda" if torch.cuda.is_available() else "cpu"), dtype="float32")
        structures = nrel_inputs(args.n)
        names = [str(i) for i in range(args.n)]
        options = {"num_workers": args.workers, "errors": "return"}
        sharded.relax_sharded(relaxer, structures[:512], world, names=names[:512], **options)  # warm-up: workers, CUDA
        if world.active:
            torch.distributed.barrier()
        start = time.perf_counter()
        results = sharded.relax_sharded(relaxer, structures, world, names=names, **options)
        seconds = time.perf_counter() - start
        if world.is_main:
            ok = sum(not hasattr(r, "error") for r in results)
            Path(args.out).write_text(json.dumps({"seconds": seconds, "n": args.n, "relaxed": ok, "world_size": world.world_size}))
        relaxer.close()


def run_relax_api(args) -> dict:
    """OneShotRelaxer in memory (no file IO): 1 GPU, N GPUs under torchrun (relax_sharded, results
    gathered in input order on rank 0), and N independent processes on 1/N of the inputs each."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    # "--structures", not "--n": torchrun would take "--n" for an abbreviation of its own options.
    child = [str(Path(__file__).resolve()), "relax-api-child", "--workers", str(args.workers)]
    results = {**environment(), "n_structures": args.n, "workers_per_process": args.workers}

    def run(command, env, out):
        subprocess.run(command + ["--out", str(out)], env=env, cwd=ROOT, check=True)
        return json.loads(out.read_text())

    one = run([sys.executable] + child + ["--structures", str(args.n)], child_env("0"), work / "api_one.json")
    many = run(TORCHRUN + ["--nproc-per-node", str(args.gpus)] + child + ["--structures", str(args.n)], child_env(), work / "api_many.json")
    share = args.n // args.gpus
    procs = [
        subprocess.Popen([sys.executable] + child + ["--structures", str(share), "--out", str(work / f"api_alone{g}.json")], env=child_env(str(g)), cwd=ROOT)
        for g in range(args.gpus)
    ]
    for proc in procs:
        proc.wait()
    alone = [json.loads((work / f"api_alone{g}.json").read_text()) for g in range(args.gpus)]
    results["one_gpu"] = {**one, "structures_per_s": args.n / one["seconds"]}
    results[f"torchrun_gpus{args.gpus}"] = {**many, "structures_per_s": args.n / many["seconds"]}
    slowest = max(a["seconds"] for a in alone)
    results[f"independent_gpus{args.gpus}"] = {"seconds_each": [a["seconds"] for a in alone], "structures_per_s": share * args.gpus / slowest}
    for key in (f"torchrun_gpus{args.gpus}", f"independent_gpus{args.gpus}"):
        results[key]["scaling_efficiency"] = results[key]["structures_per_s"] / (args.gpus * results["one_gpu"]["structures_per_s"])
    return results


def print_relax_api(r: dict, gpus: int) -> None:
    print(
        f"\n{r['device']}: OneShotRelaxer.relax_many in memory (no file IO), {r['n_structures']} NREL inputs, num_workers {r['workers_per_process']} per process"  # noqa: E501
    )
    print(f"  1 GPU                    : {r['one_gpu']['structures_per_s']:7.0f} structures/s")
    for key, label in ((f"torchrun_gpus{gpus}", f"{gpus} GPUs, torchrun (gathered)"), (f"independent_gpus{gpus}", f"{gpus} independent processes")):
        print(f"  {label:25s}: {r[key]['structures_per_s']:7.0f} structures/s (efficiency {r[key]['scaling_efficiency'] * 100:.0f}%)")


def print_relax(r: dict, gpus: int) -> None:
    print(
        f"\n{r['device']}: e3relax-ase relax of {r['n_structures']} structures (one extxyz), --workers {r['workers_per_process']} per process, "
        f"precision {r['precision']}, wall time of the whole command"
    )
    print(f"  1 GPU : {r['one_gpu']['seconds']:.1f} s, {r['one_gpu']['structures_per_s']:.0f} structures/s")
    print(
        f"  {gpus} GPUs: {r[f'gpus{gpus}']['seconds']:.1f} s, {r[f'gpus{gpus}']['structures_per_s']:.0f} structures/s  "
        f"(speed-up {r['speedup']:.2f}x, efficiency {r['scaling_efficiency'] * 100:.0f}%)"
    )
    print(f"  reading the input file alone: {r['read_extxyz_seconds']:.1f} s")
    print(
        f"  outputs: {r['written']} structures each, largest difference {r['max_position_difference_A']:.1e} Å (positions), {r['max_cell_difference_A']:.1e} Å (cell)"  # noqa: E501
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["train", "relax", "relax-api", "relax-api-child"])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8, help="train: epochs of each run")
    parser.add_argument(
        "--amp",
        choices=["concurrent", "skip"],
        default="concurrent",
        help="train: also run amp: true on GPU 1 while the float32 baseline runs on GPU 0, or skip it (a clean baseline)",
    )
    parser.add_argument("--config", default=str(CONFIGS / "train_nrel_f128.yaml"), help="train: the training config")
    parser.add_argument("--n", "--structures", dest="n", type=int, default=40000, help="relax: structures")
    parser.add_argument("--workers", type=int, default=6, help="relax: --workers of each process")
    parser.add_argument("--precision", default="float32", help="relax: --precision")
    parser.add_argument("--work", default="runs/bench_multi_gpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.what == "relax-api-child":
        return api_child(args)
    run, show = {
        "train": (run_train, lambda r: print_train(r)),
        "relax": (run_relax, lambda r: print_relax(r, args.gpus)),
        "relax-api": (run_relax_api, lambda r: print_relax_api(r, args.gpus)),
    }[args.what]
    results = run(args)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"multi_gpu_{args.what}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    show(results)


if __name__ == "__main__":
    main()
