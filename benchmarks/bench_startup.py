"""Start-up of the CLI: wall time of ``e3relax-ase relax one.cif -o out.cif`` run as a process.

    python benchmarks/bench_startup.py [--repeats 10] [--code PATH[::EXTRA OPTIONS] ...] [--out FILE]

What a user waits for when relaxing one structure from the shell: the interpreter, the
imports, the checkpoint load, reading the CIF, one forward pass, writing the CIF. The input is
a 10-atom crystal of the NREL test split written as a CIF (the size in issue 18). Each
``--code`` is a checkout whose ``e3relax_ase`` the command runs (via PYTHONPATH), so two
revisions can be compared in the same session; runs alternate between them, ``--repeats``
each, after one untimed warm-up run each (the file cache); ``PATH::--threads 2`` runs that code
with extra options. The 1-minute load average is recorded before and after: figures taken
while other work loads the machine say so.

A separate process per code also times the stages, three times (imports of torch, ase.io
and the relaxer; OneShotRelaxer(); reading; relax; writing) from inside.

Writes JSON (command, machine, inputs, figures) to benchmarks/results/startup_cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "startup_cpu.json"
N_ATOMS = 10

STAGES = r"""
import sys, time
t = [time.perf_counter()]
import torch; t.append(time.perf_counter())
import ase.io; t.append(time.perf_counter())
from e3relax_ase.relax.relaxer import OneShotRelaxer; t.append(time.perf_counter())
relaxer = OneShotRelaxer("default", device="cpu"); t.append(time.perf_counter())
atoms = ase.io.read(sys.argv[1]); t.append(time.perf_counter())
relaxed = relaxer.relax(atoms); t.append(time.perf_counter())
ase.io.write(sys.argv[2], relaxed); t.append(time.perf_counter())
names = ["import_torch", "import_ase_io", "import_relaxer", "load_checkpoint", "read_cif", "relax", "write_cif"]
print({name: round(b - a, 4) for name, a, b in zip(names, t, t[1:])})
"""


def _input_cif(directory: Path) -> tuple[Path, str]:
    """A 10-atom crystal of the NREL test split, as a CIF; (path, its id)."""
    import ase.io
    from ase import Atoms

    from e3relax_ase.training.data.pairs import load_pairs

    pairs = load_pairs(ROOT / "data" / "nrel_zintl" / "test.npz")
    k = next(k for k in range(len(pairs)) if pairs.n_atoms[k] == N_ATOMS)
    s = slice(pairs.offsets[k], pairs.offsets[k + 1])
    atoms = Atoms(pairs.numbers[s], positions=pairs.pos_unrelaxed[s], cell=pairs.cell_unrelaxed[k], pbc=True)
    path = directory / "one.cif"
    ase.io.write(path, atoms)
    return path, str(pairs.ids[k])


def _command() -> list[str]:
    """The console script beside this Python (what a user types), else ``python -m e3relax_ase``."""
    script = Path(sys.executable).with_name("e3relax-ase")
    return [str(script)] if script.exists() else [sys.executable, "-m", "e3relax_ase"]


def _run(code: Path, cif: Path, out: Path, extra: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(code))
    if out.exists():
        out.unlink()
    start = time.perf_counter()
    argv = [*_command(), "relax", str(cif), "-o", str(out), "-q", *extra]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{code}: the command failed:\n{done.stderr[-3000:]}")
    return elapsed


def _stages(code: Path, cif: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code))
    done = subprocess.run([sys.executable, "-c", STAGES, str(cif), str(out)], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{code}: stage timing failed:\n{done.stderr[-3000:]}")
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision(code: Path) -> str | None:
    done = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    status = ["git", "-C", str(code), "status", "--porcelain", "--untracked-files=no"]
    dirty = subprocess.run(status, capture_output=True, text=True, check=False)
    return (done.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")) if done.returncode == 0 else None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--code", action="append", help="a checkout to time, PATH or PATH::EXTRA OPTIONS (repeatable); default: this one")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    variants = [(Path(c.split("::")[0]).resolve(), c.split("::", 1)[1] if "::" in c else "") for c in (args.code or [str(ROOT)])]
    codes = list(dict.fromkeys(code for code, _ in variants))
    work = Path(tempfile.mkdtemp(prefix="e3relax-startup-"))
    try:
        cif, structure_id = _input_cif(work)
        out = work / "out.cif"
        load_before = os.getloadavg()[0]
        for code, variant in variants:
            _run(code, cif, out, shlex.split(variant))  # warm-up: the file cache, not timed
        times = {(str(code), variant): [] for code, variant in variants}
        stages = {str(code): [] for code in codes}
        for _ in range(args.repeats):
            for code, variant in variants:
                times[(str(code), variant)].append(_run(code, cif, out, shlex.split(variant)))
        for code in codes:
            for _ in range(3):
                stages[str(code)].append(_stages(code, cif, out))
        load_after = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import torch

    results = {
        "benchmark": "startup",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "timed": " ".join([*_command(), "relax", "one.cif", "-o", "out.cif", "-q"]),
        "input": {"structure": structure_id, "n_atoms": N_ATOMS, "source": "data/nrel_zintl/test.npz (unrelaxed), written as CIF by ASE"},
        "machine": {
            "cpu_model": _cpu_model(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "load_1min_before": load_before,
            "load_1min_after": load_after,
        },  # fmt: skip
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "repeats": args.repeats,
        "runs": [
            {
                "code": str(code),
                "revision": _git_revision(code),
                "extra_options": variant,
                "wall_s": times[(str(code), variant)],
                "median_s": statistics.median(times[(str(code), variant)]),
                "min_s": min(times[(str(code), variant)]),
                "max_s": max(times[(str(code), variant)]),
            }
            for code, variant in variants
        ],
        "stages_s": {str(code): {name: statistics.median(s[name] for s in stages[str(code)]) for name in stages[str(code)][0]} for code in codes},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    for run in results["runs"]:
        print(f"{run['code']} ({run['revision']}) {run['extra_options']}: median {run['median_s']:.2f} s, "
              f"min {run['min_s']:.2f}, max {run['max_s']:.2f}")  # fmt: skip
    for code, stages_s in results["stages_s"].items():
        print(f"{code} stages (in one process, torch's default threads):", ", ".join(f"{k} {v:.3f}" for k, v in stages_s.items()))
    print(f"load average {load_before:.2f} before, {load_after:.2f} after; written to {args.out}")
    return results


if __name__ == "__main__":
    main()
