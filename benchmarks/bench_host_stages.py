"""CPU cost per structure of the host stages of ``relax_many(num_workers=N)``, on one core.

What each stage costs a structure where it runs, measured on one core with the network out
of the way:
  - ``niggli_ase`` / ``niggli_batched``: the Niggli reduction of one cell by ASE's
    ``niggli_reduce_cell``, and by ``canonical.reduce_cells`` over tasks of 32 cells (when the
    measured package has it);
  - ``worker_prepare``: a worker's task (validation, canonical form, neighbour search, graph
    edges), ``pool_prepare._prepare_task`` on tasks of 32 structures;
  - ``worker_judge``: a worker's judging task (sanity checks and confidence of 4-layer
    predictions), ``pool_judge._judge_task`` on tasks of 32;
  - ``main_thread``: the relaxing process's main thread in ``relax_many`` with 2 workers and the
    network replaced by an identity (inputs in, Atoms out: everything but the forward pass).

    python benchmarks/bench_host_stages.py [--n 4096] [--out FILE]
    PYTHONPATH=OLD_PACKAGE_DIR python benchmarks/bench_host_stages.py ...   (an older package)

Compare two packages with ``compare_results.py``. Prints a table and writes JSON (command,
device, versions, package, figures) to benchmarks/results/host_stages_cpu.json by default.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # a package named on PYTHONPATH first is the one measured
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_inference import test_structures  # noqa: E402
from bench_pipeline import result_header, write_result  # noqa: E402

TASK = 32  # structures per worker task (pool.TASK_STRUCTURES)


def _per_structure(function, items, n_structures: int, repeats: int = 3) -> float:
    """Best of ``repeats`` passes of ``function`` over ``items``, in µs per structure."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            function(item)
        best = min(best, time.perf_counter() - start)
    return best / n_structures * 1e6


def _prepare_tasks(crystals) -> list:
    tasks = []
    for start in range(0, len(crystals), TASK):
        group = crystals[start : start + TASK]
        tasks.append(
            (
                np.concatenate([c.numbers for c in group]),
                np.concatenate([c.positions for c in group]),
                np.stack([c.cell for c in group]),
                np.stack([c.pbc for c in group]),
                np.array([len(c.numbers) for c in group], dtype=np.int64),
                [f"s{start + k}" for k in range(len(group))],
                [{} for _ in group],
            )
        )
    return tasks


def _judge_tasks(crystals, rng) -> list:
    """Judging tasks of plausible predictions: 4 layers moving each atom by ~0.05 Å and the cell by ~1 %."""
    tasks = []
    for start in range(0, len(crystals), TASK):
        group = crystals[start : start + TASK]
        layers = [np.linspace(0.25, 1.0, 4)[:, None, None] * rng.normal(0, 0.03, c.positions.shape) + c.positions for c in group]
        cells = [np.stack([c.cell * (1 + 0.01 * s) for s in np.linspace(0.25, 1.0, 4)]) for c in group]
        tasks.append(
            (
                np.concatenate(layers, axis=1),
                np.stack(cells, axis=1),
                np.concatenate([c.positions for c in group]),
                np.stack([c.cell for c in group]),
                np.stack([c.pbc for c in group]),
                np.full(len(group), 1.8),
                np.array([len(c.numbers) for c in group], dtype=np.int64),
                True,
                0.5,
            )
        )
    return tasks


def _main_thread_us(crystals) -> float:
    """Main-thread CPU per structure of relax_many(num_workers=2) with an identity network."""
    from ase import Atoms

    from e3relax_ase.nn.model import ModelOutput
    from e3relax_ase.relax.relaxer import OneShotRelaxer
    from e3relax_ase.testing import tiny_model

    class Identity(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config

        def forward(self, graph):
            return ModelOutput(torch.stack([graph.positions] * 4), torch.stack([graph.cell] * 4))

    atoms = [Atoms(c.numbers, positions=c.positions, cell=c.cell, pbc=True) for c in crystals]
    relaxer = OneShotRelaxer(tiny_model(), device="cpu", dtype="float32", batch_size=2048)
    relaxer.model = Identity(relaxer.model.config)
    try:
        relaxer.relax_many(atoms[:1024], num_workers=2, errors="return")  # workers started
        best = float("inf")
        for _ in range(2):
            start = time.thread_time()
            relaxer.relax_many(atoms, num_workers=2, errors="return")
            best = min(best, time.thread_time() - start)
    finally:
        relaxer.close()
    return best / len(atoms) * 1e6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="structures (NREL test inputs of 5-30 atoms, repeated)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    import e3relax_ase
    from e3relax_ase.geometry import canonical
    from e3relax_ase.relax import pool_judge, pool_prepare, preparation

    crystals = test_structures(args.n)
    settings = preparation.PreparationSettings(
        {"cutoff": 6.0, "max_neighbors": 50, "elements": None, "max_atomic_number": 118, "min_distance": 0.5, "max_edges": None, "reduce": True}
    )
    from ase.build.tools import niggli_reduce_cell

    cells = [c.cell for c in crystals]
    stages = {"niggli_ase": _per_structure(niggli_reduce_cell, cells[:1024], 1024)}
    if hasattr(canonical, "reduce_cells"):
        groups = [np.stack(cells[k : k + TASK]) for k in range(0, len(cells), TASK)]
        stages["niggli_batched"] = _per_structure(canonical.reduce_cells, groups, len(cells))
    stages["worker_prepare"] = _per_structure(lambda task: pool_prepare._prepare_task(task, settings), _prepare_tasks(crystals), len(crystals))
    stages["worker_judge"] = _per_structure(pool_judge._judge_task, _judge_tasks(crystals, np.random.default_rng(0)), len(crystals))
    stages["main_thread"] = _main_thread_us(crystals)

    results = {
        **result_header("cpu"),
        "package": str(Path(e3relax_ase.__file__).parent),
        "n_structures": len(crystals),
        "mean_atoms": float(np.mean([len(c.numbers) for c in crystals])),
        "us_per_structure": stages,  # compare_results.py lines these up between two packages
    }
    write_result(results, args.out, "host_stages_cpu.json")
    print(f"{results['device']}; package {results['package']}; {len(crystals)} structures, mean {results['mean_atoms']:.1f} atoms")
    for name, value in stages.items():
        print(f"  {name:16s} {value:8.1f} µs per structure")


if __name__ == "__main__":
    main()
