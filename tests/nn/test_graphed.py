"""Small CUDA batches replay a captured CUDA graph of a padded batch (e3relax_ase.nn.graphed).
The padding must not change a real crystal's prediction: checked here on the eager network
in float64, where a broken padding (an edge or an atom leaking into a real crystal) shows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from e3relax_ase.geometry.canonical import canonicalize
from e3relax_ase.nn.graphed import GraphedForward, bucket, pad_graph, padded_sizes, unpad_output
from e3relax_ase.relax.predict import graph_from_canonical, predict
from e3relax_ase.testing import random_crystal, tiny_model


def _graph(n_crystals, dtype=torch.float64, device="cpu", seed=2):
    rng = np.random.default_rng(seed)
    crystals = [random_crystal(rng, n_atoms=int(rng.integers(2, 7))) for _ in range(n_crystals)]
    forms = [canonicalize(c.positions, c.cell, c.pbc) for c in crystals]
    model = tiny_model()
    return crystals, graph_from_canonical(crystals, forms, model.config.cutoff, model.config.max_neighbors, device, dtype)


def test_buckets_are_powers_of_two_with_room_for_padding():
    assert [bucket(n, 16) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
    _, graph = _graph(3)
    atoms, edges, graphs = padded_sizes(graph)
    assert atoms > graph.positions.shape[0] and edges >= graph.n_edges and graphs > graph.n_graphs
    with pytest.raises(ValueError, match="room"):
        pad_graph(graph, graph.positions.shape[0], edges, graphs)


@pytest.mark.parametrize("n_crystals", [1, 3])
def test_padding_leaves_every_real_prediction_unchanged(n_crystals):
    model = tiny_model().double().eval()
    _, graph = _graph(n_crystals)
    atoms, edges, graphs = padded_sizes(graph)
    padded = pad_graph(graph, atoms, edges + 40, graphs + 2)  # padding edges and empty crystals too
    assert padded.positions.shape[0] == atoms and padded.n_edges == edges + 40 and padded.n_graphs == graphs + 2
    with torch.no_grad():
        plain = model(graph)
        out = unpad_output(model(padded), graph.positions.shape[0], graph.n_graphs)
        whole = model(padded)
    assert torch.allclose(out.positions, plain.positions, atol=1e-10, rtol=0)
    assert torch.allclose(out.cell, plain.cell, atol=1e-10, rtol=0)
    assert torch.isfinite(whole.positions).all() and torch.isfinite(whole.cell).all()  # the padding stays finite too
    # The check can fail: an edge from a padding atom into a real crystal changes its prediction.
    leaking = pad_graph(graph, atoms, edges + 1, graphs)
    leaking.edge_src[-1] = graph.positions.shape[0]
    leaking.edge_dst[-1] = 0
    leaking.edge_shift[-1] = 0.0
    leaking.positions[graph.positions.shape[0]] = graph.positions[0] + 1.0
    with torch.no_grad():
        broken = unpad_output(model(leaking), graph.positions.shape[0], graph.n_graphs)
    assert not torch.allclose(broken.positions, plain.positions, atol=1e-6, rtol=0)


def test_cpu_graphs_are_not_handled():
    _, graph = _graph(1)
    assert not GraphedForward(tiny_model()).handles(graph)


@pytest.mark.gpu
def test_cuda_graph_replay_matches_the_eager_pass():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_model().cuda().float().eval()
    graphed = GraphedForward(model)
    # One bucket: run eagerly the first time, captured the second, replayed after that.
    captured_after = []
    for n_crystals, seed in ((1, 2), (1, 2), (1, 2), (1, 3), (3, 4)):
        crystals, graph = _graph(n_crystals, torch.float32, "cuda", seed)
        assert graphed.handles(graph)
        with torch.inference_mode():
            eager, replayed = model(graph), graphed(graph)
        assert torch.allclose(replayed.positions, eager.positions, atol=1e-4, rtol=0)
        assert torch.allclose(replayed.cell, eager.cell, atol=1e-4, rtol=0)
        captured_after.append(len(graphed._captured))
    assert captured_after[:3] == [0, 1, 1]
    # Through predict, as the relaxer calls it.
    crystals, _ = _graph(1, seed=7)
    plain = predict(model, crystals, "cuda", torch.float32)
    for _ in range(3):  # eager, capture, replay
        replayed = predict(model, crystals, "cuda", torch.float32, forward=graphed)
        assert np.allclose(plain[0].positions, replayed[0].positions, atol=1e-4)
