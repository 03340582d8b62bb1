"""The forward pass runs behind the host: it never reads a value back (so the CPU can queue it
whole and work on), ``predict(wait=False)`` gives the numbers of a waiting call, and
``relax_many`` still raises the first failing structure when chunks are in flight."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms

from e3relax_ase.nn.scatter import scatter_mean
from e3relax_ase.nn.solve import solve_unchecked
from e3relax_ase.relax.pipeline import ChunkPipeline
from e3relax_ase.relax.predict import predict
from e3relax_ase.relax.relaxer import OneShotRelaxer
from e3relax_ase.testing import random_crystal, tiny_model


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_scatter_mean_counts_like_bincount(dtype):
    """The sync-free count is bincount's, exactly, also past 256 rows a bucket in bfloat16."""
    generator = torch.Generator().manual_seed(0)
    index = torch.cat([torch.zeros(300, dtype=torch.long), torch.randint(1, 7, (500,), generator=generator)])
    values = torch.randn(800, 4, 3, generator=generator).to(dtype)
    count = torch.bincount(index, minlength=9).clamp(min=1).to(dtype)  # bucket 8 is empty
    total = torch.zeros(9, 4, 3, dtype=torch.promote_types(dtype, torch.float32)).index_add_(0, index, values.float() if dtype == torch.bfloat16 else values)
    expected = total / count.view(9, 1, 1)
    assert torch.equal(scatter_mean(values, index, 9), expected)
    assert torch.equal(scatter_mean(values, index, 9)[8], torch.zeros(4, 3, dtype=expected.dtype))


def test_solve_unchecked_is_solve_without_the_exception():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(5, 3, 3, dtype=torch.float64, generator=generator) + 3 * torch.eye(3, dtype=torch.float64)
    b = torch.randn(5, 3, 3, dtype=torch.float64, generator=generator)
    assert torch.equal(solve_unchecked(a, b), torch.linalg.solve(a, b))
    singular = a.clone()
    singular[2, 1] = singular[2, 0]
    with pytest.raises(RuntimeError):
        torch.linalg.solve(singular, b)
    out = solve_unchecked(singular, b)  # no exception: the singular one is not finite
    assert not torch.isfinite(out[2]).all() and torch.isfinite(out[[0, 1, 3, 4]]).all()


def _crystals(n, seed=3):
    rng = np.random.default_rng(seed)
    return [random_crystal(rng, n_atoms=int(rng.integers(2, 6))) for _ in range(n)]


def test_predict_without_waiting_gives_the_same_numbers():
    model = tiny_model().double()
    crystals = _crystals(5)
    waited = predict(model, crystals, "cpu", torch.float64)
    pending = predict(model, crystals, "cpu", torch.float64, wait=False)
    for a, b in zip(waited, pending.result()):
        assert np.array_equal(a.positions, b.positions) and np.array_equal(a.cell, b.cell)


def _structures(n):
    return [Atoms(c.numbers, positions=c.positions, cell=c.cell, pbc=True) for c in _crystals(n, seed=5)]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_input_failing_later_does_not_hide_an_earlier_failure(monkeypatch, num_workers):
    """Structure 1 fails when finished; structure 4 is refused when read, while the chunk of
    structure 1 is still in flight: structure 1's failure is the one raised."""
    relaxer = OneShotRelaxer(tiny_model(), device="cpu", dtype="float64", batch_size=2)
    structures = _structures(6)
    structures[4].positions[1] = structures[4].positions[0]  # refused: two atoms on one site
    finish = relaxer.finisher.finish

    def failing_finish(item, *args, **kwargs):
        if item.index == 1:
            raise RuntimeError("finishing structure 1 failed")
        return finish(item, *args, **kwargs)

    monkeypatch.setattr(relaxer.finisher, "finish", failing_finish)
    try:
        with pytest.raises(RuntimeError, match="structure 1"):
            relaxer.relax_many(structures, num_workers=num_workers)
        monkeypatch.setattr(relaxer.finisher, "finish", finish)
        with pytest.raises(Exception, match="structure 4|atoms 0 and 1"):  # alone, the refusal is raised
            relaxer.relax_many(structures, num_workers=num_workers)
    finally:
        relaxer.close()


@pytest.mark.gpu
def test_cuda_forward_pass_never_syncs_and_matches_a_waiting_call():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_model().cuda().float()
    crystals = _crystals(16)
    waited = predict(model, crystals, "cuda", torch.float32)
    from e3relax_ase.geometry.canonical import canonicalize
    from e3relax_ase.relax.predict import graph_from_canonical

    forms = [canonicalize(c.positions, c.cell, c.pbc) for c in crystals]
    graph = graph_from_canonical(crystals, forms, model.config.cutoff, model.config.max_neighbors, "cpu", torch.float32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any read-back in the pass raises
    try:
        pending = predict(model, crystals, "cuda", torch.float32, forms=forms, graph=graph, wait=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # Float32 sums over neighbours use atomics on CUDA, whose order varies from run to run.
    for a, b in zip(waited, pending.result()):
        assert np.allclose(a.positions, b.positions, atol=1e-4) and np.allclose(a.cell, b.cell, atol=1e-4)


def test_a_non_finite_predicted_cell_is_flagged_not_raised(monkeypatch):
    """A layer whose strain comes out non-finite (a NaN weight, an overflow) makes the
    prediction non-finite: the structure is flagged and keeps its input geometry; nothing
    raises, the batch is not re-run."""
    from e3relax_ase.nn.strain import StrainHead

    relaxer = OneShotRelaxer(tiny_model(), device="cpu", dtype="float64", batch_size=4)
    monkeypatch.setattr(StrainHead, "forward", lambda self, s, *args: torch.full((s.shape[0], 3, 3), float("nan"), dtype=s.dtype))
    structures = _structures(3)
    results = relaxer.relax_many(structures, errors="return")
    assert all(isinstance(r, Atoms) for r in results)
    for given, relaxed in zip(structures, results):
        assert relaxed.info["e3relax_sane"] is False and "NaN" in relaxed.info["e3relax_problems"]
        assert np.array_equal(relaxed.positions, given.positions) and np.array_equal(relaxed.cell.array, given.cell.array)


def test_torch_threads_are_set_for_the_block_and_restored():
    from e3relax_ase.relax.threads import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("restored on the way out too")
    assert torch.get_num_threads() == before


def test_relax_many_with_workers_on_cuda_uses_one_host_thread_and_restores_it(monkeypatch):
    """Checked without a GPU: the relaxer is told it runs on CUDA and its forward pass is the CPU's."""
    seen = []
    relaxer = OneShotRelaxer(tiny_model(), device="cpu", dtype="float64", batch_size=2)
    forward = relaxer.runner.forward

    def forward_on_cpu(items):
        seen.append(torch.get_num_threads())
        relaxer.device = torch.device("cpu")
        try:
            return forward(items)
        finally:
            relaxer.device = torch.device("cuda")

    monkeypatch.setattr(relaxer.runner, "forward", forward_on_cpu)
    relaxer.device = torch.device("cuda")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        relaxer.relax_many(_structures(4), num_workers=1)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        relaxer.relax_many(_structures(2))  # no workers: left alone
        assert set(seen) == {2}
    finally:
        torch.set_num_threads(before)
        relaxer.close()


def test_each_chunk_is_queued_behind_the_running_one_before_that_one_is_completed(monkeypatch):
    """The order that keeps the GPU busy: chunk k+1 is launched before chunk k is waited for."""
    relaxer = OneShotRelaxer(tiny_model(), device="cpu", dtype="float64", batch_size=2)
    events = []
    launch, complete = ChunkPipeline.launch, ChunkPipeline.complete

    def recording_launch(self, items):
        events.append(("launch", items[0].index // 2))
        return launch(self, items)

    def recording_complete(self, chunk, *args):
        events.append(("complete", chunk.items[0].index // 2))
        return complete(self, chunk, *args)

    monkeypatch.setattr(ChunkPipeline, "launch", recording_launch)
    monkeypatch.setattr(ChunkPipeline, "complete", recording_complete)
    results = relaxer.relax_many(_structures(6))
    assert all(isinstance(r, Atoms) for r in results)
    assert events == [("launch", 0), ("launch", 1), ("complete", 0), ("launch", 2), ("complete", 1), ("complete", 2)]
