"""Where ``relax_many(num_workers=W)`` spends its time on a GPU host: how long the main thread
waits for prepared structures, for the workers' verdicts and for the GPU, how much CPU it
spends per structure, and how busy the workers are. With ``--sample``, which functions hold
the main thread (a stack sample every 0.5 ms).

    python benchmarks/bench_host_waits.py [--device cuda] [--n 16384] [--workers 14,12,8,4] [--sample]
        [--model default|paper] [--precision float32|tf32]

The waits are timed by wrapping the relaxer's own functions (the pipeline's results are
unchanged); worker time is measured inside the workers. Prints a table and writes JSON
(command, device, versions, figures) to benchmarks/results/host_waits_<device>.json.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # a package named on PYTHONPATH first is the one measured

import torch  # noqa: E402

import e3relax_ase.relax.pipeline as pipeline_module  # noqa: E402
import e3relax_ase.relax.pool_judge as judge_module  # noqa: E402
import e3relax_ase.relax.pool_prepare as prepare_module  # noqa: E402
import e3relax_ase.relax.predict as predict_module  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_inference import test_structures  # noqa: E402
from bench_pipeline import result_header, write_result  # noqa: E402

_WAITS: dict[str, float] = {}
_BUSY_DIR = Path(tempfile.mkdtemp(prefix="host_waits_"))  # workers append their task times here


def _add(key: str, seconds: float) -> None:
    _WAITS[key] = _WAITS.get(key, 0.0) + seconds


def _instrument() -> None:
    """Wrap the waits of the main thread and the tasks of the workers (forked: they inherit it)."""
    collect = prepare_module._collect

    def timed_collect(entries, task):
        if task is not None:
            start = time.perf_counter()
            task.result()
            _add("wait_prepared", time.perf_counter() - start)
        return collect(entries, task)

    verdicts = pipeline_module.collect_verdicts

    def timed_verdicts(tasks):
        start = time.perf_counter()
        for task in tasks:
            task.result()
        _add("wait_verdicts", time.perf_counter() - start)
        return verdicts(tasks)

    result = predict_module.PendingPredictions.result

    def timed_result(self):
        start = time.perf_counter()
        if self._done is not None:
            self._done.synchronize()
        _add("wait_gpu", time.perf_counter() - start)
        start = time.perf_counter()
        out = result(self)
        _add("restore", time.perf_counter() - start)
        return out

    prepare_module._collect = timed_collect
    pipeline_module.collect_verdicts = timed_verdicts
    predict_module.PendingPredictions.result = timed_result
    _WORKER_TASKS.update(prepare=prepare_module._prepare_task, judge=judge_module._judge_task)
    prepare_module._prepare_task = _timed_prepare_task
    judge_module._judge_task = _timed_judge_task


# The workers' tasks, timed where they run. Module-level functions: the pool sends a task's
# function by its module and name, and forked workers find these in this module.
_WORKER_TASKS: dict = {}


def _timed_in_worker(label: str, *args):
    start = time.perf_counter()
    out = _WORKER_TASKS[label](*args)
    with open(_BUSY_DIR / f"{label}_{os.getpid()}", "a") as handle:
        handle.write(f"{time.perf_counter() - start}\n")
    return out


def _timed_prepare_task(packed, settings):
    return _timed_in_worker("prepare", packed, settings)


def _timed_judge_task(packed):
    return _timed_in_worker("judge", packed)


def _worker_seconds(label: str) -> float:
    return sum(float(line) for path in _BUSY_DIR.glob(f"{label}_*") for line in path.read_text().split())


def _sampled(function, main_id: int) -> tuple:
    """Run ``function`` while a thread samples the main thread's stack: (result, self, inclusive, samples)."""
    self_counts, inclusive, samples = collections.Counter(), collections.Counter(), [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            frame = sys._current_frames().get(main_id)
            if frame is not None:
                samples[0] += 1
                self_counts[f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"] += 1
                seen = set()
                while frame is not None:
                    key = f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"
                    if key not in seen and ("e3relax_ase" in frame.f_code.co_filename or "/ase/" in frame.f_code.co_filename):
                        inclusive[key] += 1
                        seen.add(key)
                    frame = frame.f_back
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out = function()
    finally:
        stop.set()
        thread.join()
    return out, self_counts, inclusive, samples[0]


def measure(atoms: list, device: torch.device, num_workers: int, sample: bool, model="default", precision="float32") -> dict:
    from e3relax_ase.relax.relaxer import OneShotRelaxer

    if model == "paper":  # untrained, at the paper's size: the work per structure, not the outputs
        from e3relax_ase.config import ModelConfig
        from e3relax_ase.nn.model import E3RelaxH2

        torch.manual_seed(0)
        model = E3RelaxH2(ModelConfig()).eval()
    relaxer = OneShotRelaxer(model, device=device, dtype="float32", precision=precision)
    relaxer.relax_many(atoms[:512], errors="return", num_workers=num_workers)  # workers start, kernels warm
    for path in _BUSY_DIR.glob("*"):
        path.unlink()
    _WAITS.clear()
    start, start_cpu = time.perf_counter(), time.thread_time()
    run = lambda: relaxer.relax_many(atoms, errors="return", num_workers=num_workers)  # noqa: E731
    if sample:
        _, self_counts, inclusive, samples = _sampled(run, threading.get_ident())
    else:
        run()
    seconds, cpu = time.perf_counter() - start, time.thread_time() - start_cpu
    relaxer.close()
    n = len(atoms)
    prepare, judge = _worker_seconds("prepare"), _worker_seconds("judge")
    row = {
        "num_workers": num_workers,
        "structures_per_s": n / seconds,
        "wall_us": seconds / n * 1e6,
        "main_thread_cpu_us": cpu / n * 1e6,
        **{f"{key}_us": value / n * 1e6 for key, value in _WAITS.items()},
        "worker_prepare_us": prepare / n * 1e6,
        "worker_judge_us": judge / n * 1e6,
        "workers_busy": (prepare + judge) / (num_workers * seconds) if num_workers else None,
    }
    if sample:
        row["samples"] = samples
        row["main_thread_self"] = {k: v / samples for k, v in self_counts.most_common(30)}
        row["main_thread_inclusive"] = {k: v / samples for k, v in inclusive.most_common(40)}
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=16384, help="structures (NREL test inputs of 5-30 atoms, repeated)")
    parser.add_argument("--workers", default="14,12,8,4", help="num_workers values, one run each")
    parser.add_argument("--sample", action="store_true", help="also sample the main thread's stack (first worker count only)")
    parser.add_argument("--model", default="default", help="a checkpoint, or 'paper' (untrained F = 512, T = 4)")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # the sanity warnings of uncertain inputs
    device = torch.device(args.device)
    crystals = test_structures(1024)
    from ase import Atoms

    atoms = [Atoms(c.numbers, positions=c.positions, cell=c.cell, pbc=True) for c in (crystals[i % 1024] for i in range(args.n))]
    _instrument()
    rows = [measure(atoms, device, int(w), args.sample and k == 0, args.model, args.precision) for k, w in enumerate(args.workers.split(","))]
    results = {
        **result_header(str(device)),
        "n_structures": args.n,
        "model": args.model,
        "precision": args.precision,
        "runs": rows,
    }
    write_result(results, args.out, f"host_waits_{device.type}.json")
    print(f"{results['device']}, {results['cpu_count']} cores, model {args.model} ({args.precision}), {args.n} structures")
    print(
        f"{'workers':>7} {'struct/s':>9} {'main cpu us':>11} {'wait prep':>9} {'wait judge':>10} {'wait gpu':>8} {'restore':>7} "
        f"{'prepare us':>10} {'judge us':>8} {'busy':>5}"
    )
    for r in rows:
        busy = f"{100 * r['workers_busy']:4.0f}%" if r["workers_busy"] is not None else "    -"
        print(
            f"{r['num_workers']:7d} {r['structures_per_s']:9.0f} {r['main_thread_cpu_us']:11.0f} {r.get('wait_prepared_us', 0):9.0f} "
            f"{r.get('wait_verdicts_us', 0):10.0f} {r.get('wait_gpu_us', 0):8.0f} {r.get('restore_us', 0):7.0f} "
            f"{r['worker_prepare_us']:10.0f} {r['worker_judge_us']:8.0f} {busy}"
        )
        if "main_thread_self" in r:
            print("  main thread, innermost function (% of samples): " + ", ".join(f"{k} {100 * v:.0f}" for k, v in list(r["main_thread_self"].items())[:12]))
            print("  main thread, inclusive (% of samples): " + ", ".join(f"{k} {100 * v:.0f}" for k, v in list(r["main_thread_inclusive"].items())[:20]))


if __name__ == "__main__":
    main()
