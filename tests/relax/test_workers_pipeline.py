"""How relax_many(num_workers=N) keeps the workers and the network busy: read-ahead bounds,
chunks judged in the workers while the next one runs, and the garbage collector left as found."""

from __future__ import annotations

import gc
from concurrent.futures import Future

import numpy as np
import pytest
from ase import Atoms

from e3relax_ase.relax import pool_prepare
from e3relax_ase.relax.relaxer import OneShotRelaxer
from e3relax_ase.testing import random_crystal, tiny_model


class _CountingPool:
    """A pool that runs nothing until asked for a result, and records how many tasks waited."""

    def __init__(self):
        self.pending = 0
        self.most_pending = 0

    def submit(self, function, *args):
        pool = self
        pool.pending += 1
        pool.most_pending = max(pool.most_pending, pool.pending)

        class _Lazy(Future):
            def result(self, timeout=None):
                if not self.done():
                    pool.pending -= 1
                    self.set_result(function(*args))
                return super().result(timeout)

        return _Lazy()


def _specs(n_structures, n_atoms):
    rng = np.random.default_rng(0)
    specs = []
    for _ in range(n_structures):
        crystal = random_crystal(rng, n_atoms=n_atoms)
        specs.append(pool_prepare.StructureSpec(np.asarray(crystal.numbers, dtype=np.int64), crystal.positions, crystal.cell, np.ones(3, dtype=bool), None, {}))
    return specs


def _run(specs, num_workers):
    settings = OneShotRelaxer(tiny_model(), device="cpu").preparation_settings()
    pool = _CountingPool()
    shell = lambda index, spec: (f"item{index}", spec)  # noqa: E731
    out = list(pool_prepare.prepared_in_pool(specs, shell, pool, num_workers, settings))
    return out, pool.most_pending


def test_read_ahead_is_bounded_by_tasks_and_by_atoms(monkeypatch):
    specs = _specs(40 * pool_prepare.TASK_STRUCTURES, 2)
    out, most = _run(specs, num_workers=2)
    assert [index for index, _, _ in out] == list(range(len(specs)))
    assert all(not isinstance(outcome, Exception) for _, _, outcome in out)
    assert most == pool_prepare.TASKS_IN_FLIGHT_PER_WORKER * 2 + 1  # the cap, then one collected per new task
    # Large crystals: the atom bound takes over, down to one task per worker (plus the new one).
    monkeypatch.setattr(pool_prepare, "READ_AHEAD_ATOMS", 3 * pool_prepare.TASK_STRUCTURES * 2)
    _, most = _run(specs, num_workers=2)
    assert most == 3 + 1
    monkeypatch.setattr(pool_prepare, "READ_AHEAD_ATOMS", 0)
    _, most = _run(specs, num_workers=2)
    assert most == 2 + 1


def _structures(n):
    rng = np.random.default_rng(5)
    out = []
    for k in range(n):
        crystal = random_crystal(rng, n_atoms=int(rng.integers(1, 5)))
        out.append(Atoms(crystal.numbers, positions=crystal.positions, cell=crystal.cell, pbc=True, info={"name": f"s{k}"}))
    return out


def test_errors_raise_still_raises_the_first_failing_structure(monkeypatch):
    """With workers, chunk k is finished after chunk k+1's forward pass: if both fail, the
    structure of chunk k is the one reported."""
    relaxer = OneShotRelaxer(tiny_model(), device="cpu", dtype="float64", batch_size=3)
    structures = _structures(9)
    finish, predict = relaxer.finisher.finish, relaxer.runner.predict

    def failing_finish(item, *args, **kwargs):
        if item.index == 1:
            raise RuntimeError("finishing structure 1 failed")
        return finish(item, *args, **kwargs)

    def failing_predict(items):
        if any(item.index == 4 for item in items):
            raise RuntimeError("the chunk of structure 4 failed")
        return predict(items)

    monkeypatch.setattr(relaxer.finisher, "finish", failing_finish)
    monkeypatch.setattr(relaxer.runner, "predict", failing_predict)
    try:
        with pytest.raises(RuntimeError, match="structure 1"):
            relaxer.relax_many(structures, num_workers=1)
        results = relaxer.relax_many(structures, num_workers=1, errors="return")
    finally:
        relaxer.close()
    failed = [k for k, r in enumerate(results) if not isinstance(r, Atoms)]
    assert failed == [1, 4]  # the chunk is retried one by one: only structure 4 itself fails


def test_relax_many_leaves_the_garbage_collector_as_it_found_it():
    relaxer = OneShotRelaxer(tiny_model(), device="cpu", batch_size=2)
    structures = _structures(5)
    try:
        assert gc.get_freeze_count() == 0 and gc.isenabled()
        relaxer.relax_many(structures, num_workers=1)
        assert gc.get_freeze_count() == 0 and gc.isenabled()
        # A program that froze objects itself keeps them frozen.
        gc.freeze()
        frozen = gc.get_freeze_count()
        relaxer.relax_many(structures)
        assert gc.get_freeze_count() > frozen // 2  # not unfrozen (a few frozen objects were freed)
    finally:
        gc.unfreeze()
        relaxer.close()
    gc.disable()
    try:
        relaxer.relax_many(structures)
        assert not gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.enable()
