"""The command users run, as a process: ``e3relax-ase relax INPUT -o OUTPUT`` from the shell to
its exit, reading and writing included, on generated inputs of NREL-class crystals.

    python benchmarks/bench_cli.py [--n 100000] [--inputs extxyz,db,cifs] [--device auto]
                                   [--old-rev REV | --old-tree DIR] [--work runs/bench_cli]
                                   [-- EXTRA RELAX OPTIONS]

Inputs: the unrelaxed NREL inputs (train, val and test splits in order, repeated to ``--n``)
written once as one extxyz, one ASE db and a folder of CIFs (``--cif-files`` of them: a folder
of 10^5 files is its own benchmark of the file system). Each input is relaxed by this
checkout's code ("new") and, with ``--old-rev`` (a git revision, unpacked with ``git archive``)
or ``--old-tree`` (a folder holding an ``e3relax_ase`` package), by the old code, one after the
other in the same call, with the same checkpoint file. Per run: wall seconds from launch to exit,
structures/s, the process's peak resident memory (``wait4``), its peak GPU memory (polled with
``nvidia-smi`` every 0.2 s; null without one), the exit code, and for the old/new pair whether
both wrote the same frames (count, largest position and cell difference). The NREL inputs hold
one crystal with overlapping atoms, refused by design: its copies count as failed (exit code 1).

Writes JSON (command, machine, versions, inputs, figures) to --out
(default benchmarks/results/cli_<device>.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_multi_gpu import nrel_inputs  # noqa: E402  (the same NREL inputs, repeated to n)

LAUNCH = "import sys; from e3relax_ase.cli.main import main; sys.exit(main(sys.argv[1:]))"


def write_inputs(work: Path, n: int, kinds: list[str], cif_files: int) -> dict:
    """The inputs of each kind, written once (kept between calls: same n, same files): kind ->
    (path, structures in it), the count known from how they were made, not read back."""
    from ase.io import write

    frames = None
    paths = {}
    for kind in kinds:
        path = work / {"extxyz": f"inputs_{n}.extxyz", "db": f"inputs_{n}.db", "cifs": f"cifs_{min(n, cif_files)}"}[kind]
        paths[kind] = path, min(n, cif_files) if kind == "cifs" else n
        if path.exists():
            continue
        frames = frames or nrel_inputs(n)
        partial = path.with_name("partial_" + path.name)  # keeps the extension: ASE picks the db backend by it
        if kind == "extxyz":
            write(partial, frames, format="extxyz")
        elif kind == "db":
            write(partial, frames, format="db")
        else:
            partial.mkdir()
            for i, atoms in enumerate(frames[:cif_files]):
                write(partial / f"s{i:06d}.cif", atoms)
        partial.rename(path)
    return paths


class GpuMemoryPoll:
    """Peak GPU memory of one process, from ``nvidia-smi`` every 0.2 s (None without one)."""

    def __init__(self, pid: int):
        self.pid, self.peak_mib, self.available = pid, None, shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join()

    def _run(self):
        query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            out = subprocess.run(query, capture_output=True, text=True, check=False).stdout
            for line in out.splitlines():
                pid, _, used = line.partition(",")
                if pid.strip() == str(self.pid) and used.strip().isdigit():
                    self.peak_mib = max(self.peak_mib or 0, int(used))
            self._stop.wait(0.2)


def run_cli(tree: Path, argv: list[str], log: Path) -> dict:
    """One relax command as its own process: seconds, exit code, peak host and GPU memory."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH", "")])))
    start = time.perf_counter()
    summary = log.with_suffix(".json")
    with open(log, "w") as errors, open(summary, "w") as out:
        process = subprocess.Popen([sys.executable, "-c", LAUNCH] + argv + ["--json"], env=env, cwd=tree, stdout=out, stderr=errors)
        with GpuMemoryPoll(process.pid) as gpu:
            _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    try:
        report = json.loads(summary.read_text())
        counts = {key: report[key] for key in ("n_ok", "n_failed", "n_skipped")}
    except (ValueError, KeyError):
        counts = {}
    return {"seconds": seconds, "exit_code": process.returncode, **counts, "peak_rss_mib": usage.ru_maxrss / 1024, "peak_gpu_mib": gpu.peak_mib}


def compare_outputs(kind: str, a: Path, b: Path) -> dict:
    from ase.io import read

    if kind == "cifs":
        names = sorted(p.name for p in a.glob("*.cif"))
        if names != sorted(p.name for p in b.glob("*.cif")):
            return {"same_frames": False}
        pairs = [(read(a / name), read(b / name)) for name in names]
    else:
        fmt = "db" if kind == "db" else "extxyz"
        first, second = read(a, index=":", format=fmt), read(b, index=":", format=fmt)
        if len(first) != len(second):
            return {"same_frames": False, "frames": [len(first), len(second)]}
        pairs = list(zip(first, second))
    return {
        "same_frames": all(np.array_equal(x.numbers, y.numbers) for x, y in pairs),
        "frames": len(pairs),
        "max_position_difference_A": float(max(np.abs(x.positions - y.positions).max() for x, y in pairs)),
        "max_cell_difference_A": float(max(np.abs(x.cell.array - y.cell.array).max() for x, y in pairs)),
    }


def old_tree(args, work: Path) -> Path | None:
    if args.old_tree:
        return Path(args.old_tree).resolve()
    if not args.old_rev:
        return None
    target = work / f"old_{args.old_rev}"
    if not target.exists():
        target.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", args.old_rev, "e3relax_ase"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="frames in the extxyz and db inputs")
    parser.add_argument("--inputs", default="extxyz,db,cifs", help="comma-separated: extxyz, db, cifs")
    parser.add_argument("--cif-files", type=int, default=10_000, help="CIF files in the folder input (at most --n)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "e3relax-h2-universal-f128.pt"))
    parser.add_argument("--old-rev", default=None, help="git revision of the old code (unpacked with git archive)")
    parser.add_argument("--old-tree", default=None, help="a folder holding the old e3relax_ase package")
    parser.add_argument("--work", default="runs/bench_cli")
    parser.add_argument("--out", default=None)
    parser.add_argument("extra", nargs="*", help="further relax options (after --), the same for old and new")
    args = parser.parse_args(argv)

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    kinds = [k for k in args.inputs.split(",") if k]
    started = time.time()
    paths = write_inputs(work, args.n, kinds, args.cif_files)
    trees = {"new": ROOT}
    old = old_tree(args, work)
    if old is not None:
        trees["old"] = old
    results = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
        "what": "e3relax-ase relax INPUT -o OUTPUT as a process, launch to exit, reading and writing included",
        "machine": machine(),
        "checkpoint": Path(args.checkpoint).name,
        "device": args.device,
        "extra_options": args.extra,
        "old": str(args.old_rev or args.old_tree) if old is not None else None,
        "runs": {},
    }
    for kind, (path, n) in paths.items():
        results["runs"][kind] = {"structures": n, "input": path.name}
        outputs = {}
        for label, tree in trees.items():
            output = work / f"out_{label}_{kind}"
            if output.exists():
                shutil.rmtree(output) if output.is_dir() else output.unlink()
            target = output if kind == "cifs" else output.with_suffix(".db" if kind == "db" else ".extxyz")
            if target.exists():
                target.unlink()
            argv_relax = [
                "relax",
                str(path),
                "-o",
                str(target) + ("/" if kind == "cifs" else ""),
                "--checkpoint",
                args.checkpoint,
                "--device",
                args.device,
                "-q",
            ] + args.extra
            run = run_cli(tree, argv_relax, work / f"{label}_{kind}.log")
            run["structures_per_s"] = n / run["seconds"]
            results["runs"][kind][label] = run
            outputs[label] = target
            print(
                f"{kind:>7} {label:>4}: {n} structures in {run['seconds']:.1f} s, {run['structures_per_s']:.0f}/s, "
                f"peak RSS {run['peak_rss_mib']:.0f} MiB, peak GPU {run['peak_gpu_mib']} MiB, {run.get('n_failed')} failed, exit {run['exit_code']}",
                flush=True,
            )
        if "old" in outputs:
            results["runs"][kind]["old_vs_new"] = compare_outputs(kind, outputs["old"], outputs["new"])
            results["runs"][kind]["speedup_new_over_old"] = results["runs"][kind]["old"]["seconds"] / results["runs"][kind]["new"]["seconds"]
    results["seconds"] = round(time.time() - started, 1)
    device_label = (results["machine"]["gpu"] or "cpu").split()[-1].lower() if args.device != "cpu" else "cpu"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"cli_{device_label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
