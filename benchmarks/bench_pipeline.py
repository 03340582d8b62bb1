"""End-to-end throughput of ``OneShotRelaxer.relax_many`` (ase.Atoms in, relaxed Atoms out):
the path before the host-side work was cut down (a git revision, run from a copy of its
package) against the current one, in the same run, with per-structure stage times.

    python benchmarks/bench_pipeline.py [--device cpu] [--n 1000] [--batch-size 256]
        [--dtype float32] [--workers 2] [--repeats 3] [--models default,tiny]
        [--baseline-ref f532430] [--quick]

``--models``: checkpoints to run; "tiny" is e3relax_ase.testing.tiny_model, whose forward pass
costs little, so on a CPU the run is bound by the host side the way a GPU run is.

Every variant runs in its own process (the old one with the old package first on
PYTHONPATH), ``--repeats`` rounds in rotating order (the medians are reported; other load on
the machine shows up in the spread). Stage times come from timers wrapped around the
relaxer's methods and the model's forward; "host" is everything but the forward pass. The
results of the first round are compared bit for bit with the old path's.

Prints a table and writes JSON (command, device, versions, figures) to
benchmarks/results/pipeline_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASELINE = "f532430"  # the last revision before the pipeline work (validation + graph per structure)
# Stage label -> (module or object attribute path, name): where relax_many looks each step up.
STAGES = {
    "_prepare": ("prepare", "prepare_item"),
    "_shell": ("prepare", "shell"),
    "_finish": ("finisher", "finish"),
    "_submit_judging": ("pipeline", "submit_judging"),
}


# --- child: one measured run -----------------------------------------------------------------


def child(args) -> None:
    import logging

    import numpy as np
    import torch

    import e3relax_ase  # first: PYTHONPATH decides which package (old or current) this is

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ase import Atoms
    from bench_inference import test_structures

    import e3relax_ase.relax.pipeline as pipeline_module
    import e3relax_ase.relax.prepare as prepare_module
    import e3relax_ase.relax.runner as runner_module
    from e3relax_ase.relax.relaxer import OneShotRelaxer, RelaxFailure

    logging.disable(logging.WARNING)  # the sanity warnings of the untuned checkpoint
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kwargs = json.loads(args.kwargs)
    crystals = test_structures(args.n)
    atoms = [Atoms(c.numbers, positions=c.positions, cell=c.cell, pbc=True) for c in crystals]
    if args.checkpoint == "tiny":
        from e3relax_ase.testing import tiny_model

        checkpoint = tiny_model()
    else:
        checkpoint = args.checkpoint
    relaxer = OneShotRelaxer(checkpoint, device=device, dtype=args.dtype, batch_size=args.batch_size)
    relaxer.relax_many(atoms[: min(32, len(atoms))], errors="return", **kwargs)  # warm-up (and worker start-up)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    totals: dict[str, float] = {}

    def timed(owner, name, label=None, synchronize=False, cpu_label=None):
        inner = getattr(owner, name)
        label = label or name

        def wrapper(*a, **k):
            if synchronize:
                sync()
            start, start_cpu = time.perf_counter(), time.thread_time()
            try:
                return inner(*a, **k)
            finally:
                if synchronize:
                    sync()
                totals[label] = totals.get(label, 0.0) + time.perf_counter() - start
                if cpu_label:
                    totals[cpu_label] = totals.get(cpu_label, 0.0) + time.thread_time() - start_cpu

        setattr(owner, name, wrapper)

    owners = {"prepare": prepare_module, "finisher": relaxer.finisher, "pipeline": pipeline_module.ChunkPipeline}
    for label, (owner, name) in STAGES.items():
        timed(owners[owner], name, label)
    timed(runner_module, "predict")
    timed(pipeline_module, "collect_verdicts")  # waiting for the workers' judging
    timed(relaxer.model, "forward", "forward", synchronize=True, cpu_label="forward_cpu")
    load_before = os.getloadavg()[0]
    sync()
    start, start_cpu, start_thread = time.perf_counter(), time.process_time(), time.thread_time()
    results = relaxer.relax_many(atoms, errors="return", **kwargs)
    sync()
    seconds = time.perf_counter() - start
    # CPU of this process only (every thread: the pool's feeder and result threads pickle and
    # unpickle here), less the forward pass: what the main process spends per structure.
    totals["main_cpu"] = time.process_time() - start_cpu - totals.get("forward_cpu", 0.0)
    totals["main_thread_cpu"] = time.thread_time() - start_thread - totals.get("forward_cpu", 0.0)
    if args.dump:
        arrays = {}
        for k, r in enumerate(results):
            if isinstance(r, RelaxFailure):
                arrays[f"fail_{k}"] = np.array(str(r.error))
            else:
                arrays[f"positions_{k}"] = r.positions
                arrays[f"cell_{k}"] = r.cell.array
                arrays[f"info_{k}"] = np.array(json.dumps({key: r.info[key] for key in sorted(r.info)}, default=str))
        np.savez(args.dump, **arrays)
    print(
        json.dumps(
            {
                "package": str(Path(e3relax_ase.__file__).parent),
                "seconds": seconds,
                "relaxed": sum(not isinstance(r, RelaxFailure) for r in results),
                "stages": totals,
                "load_before": load_before,
                "load_after": os.getloadavg()[0],
            }
        )
    )


# --- parent -----------------------------------------------------------------------------------


def old_package(ref: str, into: Path) -> Path | None:
    """The package as of git revision ``ref``, unpacked under ``into`` (None: no git or no such ref)."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "e3relax_ase"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    if not (into / "checkpoints").exists():  # e3relax_ase/checkpoints links to ../checkpoints
        (into / "checkpoints").symlink_to(ROOT / "checkpoints")
    return into


def run_variant(args, variant: dict, dump: Path | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if variant["pythonpath"]:
        env["PYTHONPATH"] = os.pathsep.join([variant["pythonpath"], env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [
        sys.executable, __file__, "--child",
        "--device", args.device, "--checkpoint", args.checkpoint, "--n", str(args.n),
        "--batch-size", str(args.batch_size), "--dtype", args.dtype, "--threads", str(args.threads),
        "--kwargs", json.dumps(variant["kwargs"]),
    ]  # fmt: skip
    if dump is not None:
        command += ["--dump", str(dump)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{variant['name']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(a: Path, b: Path) -> dict:
    """Whether two runs' dumps are bit for bit the same, and if not, by how much they differ."""
    import numpy as np

    with np.load(a) as x, np.load(b) as y:
        if sorted(x.files) != sorted(y.files):  # a structure failed in one run only
            return {"bitwise_identical_to_old": False, "same_failures_as_old": False}
        differing = {k.split("_")[-1] for k in x.files if not np.array_equal(x[k], y[k])}
        deviation = {"positions": 0.0, "cell": 0.0}
        for key in x.files:
            kind = key.split("_")[0]
            if kind in deviation:
                deviation[kind] = max(deviation[kind], float(np.abs(x[key] - y[key]).max(initial=0.0)))
    return {
        "bitwise_identical_to_old": not differing,
        "same_failures_as_old": True,
        "structures_differing_from_old": len(differing),
        "max_position_deviation_from_old_A": deviation["positions"],
        "max_cell_deviation_from_old_A": deviation["cell"],
    }


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in ("torch", "numpy", "ase", "vesin-torch"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def result_header(device: str) -> dict:
    """The fields a benchmark's JSON starts with: its command, the machine and the versions."""
    return {"command": " ".join(["python"] + sys.argv), "device": device_name(device), "cpu_count": os.cpu_count(), "versions": versions()}


def write_result(results: dict, out: str | None, default_name: str) -> Path:
    """Write ``results`` as JSON to ``out``, or to benchmarks/results/``default_name``."""
    path = Path(out) if out else ROOT / "benchmarks" / "results" / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    return path


def git_state() -> dict:
    def git(*cmd):
        try:
            return subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    return {"head": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "e3relax_ase"))}


def summarise(name: str, runs: list[dict], n: int, overlapped: bool = False) -> dict:
    import numpy as np

    seconds = float(np.median([r["seconds"] for r in runs]))
    per = lambda key: float(np.median([r["stages"].get(key, 0.0) for r in runs])) / n * 1e3  # noqa: E731
    forward = per("forward")
    stages = {
        "prepare_ms": per("_prepare") + per("_shell"),  # validation, canonical form, neighbour search (old: validation only)
        "graph_and_canonical_in_predict_ms": per("predict") - forward,  # old: canonicalise + graph; new: graph transfer only
        # sanity, confidence, apply, provenance (judging in workers: sending, then waiting for it)
        "finish_ms": per("_finish") + per("_judge_in_pool") + per("_submit_judging") + per("collect_verdicts"),
    }
    total = seconds / n * 1e3
    # chunking, copies, waiting for workers; meaningless where preparation runs beside the forward
    stages["other_ms"] = None if overlapped else total - forward - sum(stages.values())
    # Main-process CPU besides the forward pass (all its threads; the main thread alone), µs:
    # the figure that bounds end-to-end throughput once workers prepare and the GPU forwards.
    stages["main_process_cpu_us"] = per("main_cpu") * 1e3
    stages["main_thread_cpu_us"] = per("main_thread_cpu") * 1e3
    return {
        "name": name,
        "preparation_beside_forward": overlapped,
        "structures_per_s": n / seconds,
        "ms_per_structure": total,
        "forward_ms_per_structure": forward,
        "host_ms_per_structure": total - forward,
        "stages_ms_per_structure": stages,
        "relaxed": runs[0]["relaxed"],
        "repeats_seconds": [r["seconds"] for r in runs],
        "load_average": [(r["load_before"], r["load_after"]) for r in runs],
        "package": runs[0]["package"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--models", default="default,tiny", help="comma-separated checkpoints; 'tiny': the test model")
    parser.add_argument("--checkpoint", default="default", help=argparse.SUPPRESS)  # the child's
    parser.add_argument("--n", type=int, default=1000, help="structures (NREL test inputs with 5-30 atoms, repeated)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of the relaxing process")
    parser.add_argument("--workers", type=int, default=2, help="num_workers of the worker-process variant (0: skip it)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-ref", default=DEFAULT_BASELINE, help="git revision of the old path")
    parser.add_argument("--quick", action="store_true", help="100 structures, one round (smoke run)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--dump", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        return child(args)
    if args.quick:
        args.n, args.repeats = 100, 1
    from e3relax_ase.io.checkpoint import resolve_checkpoint

    experiments = []
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        tmp = Path(tmp)
        (tmp / "old").mkdir()
        old = old_package(args.baseline_ref, tmp / "old")
        if old is None:
            print(f"(git revision {args.baseline_ref} not available: the old path is not measured)")
        for model in args.models.split(","):
            # The same checkpoint file for both packages.
            args.checkpoint = model if model == "tiny" else str(resolve_checkpoint(model)[0].resolve())
            experiments.append({"model": args.checkpoint, "variants": measure(args, old, tmp)})
            table(args, experiments[-1])

    device = args.device.split(":")[0]
    results = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "device": device_name(args.device),
        "versions": versions(),
        "git": git_state(),
        "baseline_ref": args.baseline_ref,
        "settings": {"n_structures": args.n, "batch_size": args.batch_size, "dtype": args.dtype, "threads": args.threads, "repeats": args.repeats},
        "experiments": experiments,
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"pipeline_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwritten to {out}")


def measure(args, old: Path | None, tmp: Path) -> list[dict]:
    """Every variant, ``args.repeats`` rounds in rotating order; summaries with the bitwise check."""
    variants = []
    if old is not None:
        variants.append({"name": "old", "pythonpath": str(old), "kwargs": {}})
    variants.append({"name": "new", "pythonpath": None, "kwargs": {}})
    variants.append({"name": "new, prefetch thread", "pythonpath": None, "kwargs": {"prefetch": True}})
    if args.workers > 0:
        if old is not None and "num_workers" in (old / "e3relax_ase" / "relaxer.py").read_text():
            # A baseline that has worker processes too: its main process against the new one's.
            variants.append({"name": f"old, {args.workers} workers", "pythonpath": str(old), "kwargs": {"num_workers": args.workers}})
        variants.append({"name": f"new, {args.workers} workers", "pythonpath": None, "kwargs": {"num_workers": args.workers}})
    runs = {v["name"]: [] for v in variants}
    dumps = {v["name"]: tmp / f"dump_{k}.npz" for k, v in enumerate(variants)}
    for round_ in range(args.repeats):
        order = variants[round_ % len(variants) :] + variants[: round_ % len(variants)]
        for variant in order:
            result = run_variant(args, variant, dumps[variant["name"]] if round_ == 0 else None)
            runs[variant["name"]].append(result)
            print(f"{Path(args.checkpoint).name}: round {round_ + 1}/{args.repeats} {variant['name']:24s} {args.n / result['seconds']:8.1f} structures/s")
    summaries = [summarise(v["name"], runs[v["name"]], args.n, overlapped=bool(v["kwargs"].get("prefetch"))) for v in variants]
    for summary in summaries:
        if old is not None and not summary["name"].startswith("old"):
            summary.update(compare(dumps["old"], dumps[summary["name"]]))
    return summaries


def table(args, experiment: dict) -> None:
    print(
        f"\n{device_name(args.device)}: relax_many on {args.n} structures, model {Path(experiment['model']).name}, {args.dtype}, "
        f"batch_size {args.batch_size}, {args.threads} thread(s), median of {args.repeats}"
    )
    header = (
        f"{'path':24s} {'struct/s':>9s} {'total':>7s} {'forward':>8s} {'host':>7s} | {'prepare':>8s} {'canon+graph':>11s} {'finish':>7s} "
        f"{'other':>7s} | {'main us':>7s} {'thread':>7s}  bitwise"
    )
    print(header + "  (ms per structure; main: main-process CPU besides the forward, µs, all threads / main thread)\n" + "-" * len(header))
    for v in experiment["variants"]:
        st = v["stages_ms_per_structure"]
        same = {True: "same", False: "DIFFERENT", None: "-"}[v.get("bitwise_identical_to_old")]
        if v.get("structures_differing_from_old"):
            same += f" ({v['structures_differing_from_old']} structures, up to {v['max_position_deviation_from_old_A']:.1e} Å)"
        other = "   (a)" if st["other_ms"] is None else f"{st['other_ms']:7.3f}"
        print(
            f"{v['name']:24s} {v['structures_per_s']:9.1f} {v['ms_per_structure']:7.3f} {v['forward_ms_per_structure']:8.3f} {v['host_ms_per_structure']:7.3f} | "  # noqa: E501
            f"{st['prepare_ms']:8.3f} {st['graph_and_canonical_in_predict_ms']:11.3f} {st['finish_ms']:7.3f} {other} | "
            f"{st['main_process_cpu_us']:7.1f} {st['main_thread_cpu_us']:7.1f}  {same}"
        )
    print("(a) preparation runs in a thread beside the forward pass: its time overlaps the others")


if __name__ == "__main__":
    main()
