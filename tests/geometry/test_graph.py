import numpy as np
import pytest
import torch
from ase.build import bulk, fcc111

from e3relax_ase.geometry.graph import build_graph, edge_vectors
from e3relax_ase.geometry.neighbors import cap_neighbors, neighbor_edges
from e3relax_ase.relax.predict import CrystalArrays
from e3relax_ase.testing import random_crystal


def _edges(atoms, cutoff=6.0, k=50, dtype=torch.float64):
    return neighbor_edges(torch.tensor(atoms.positions, dtype=dtype), torch.tensor(atoms.cell.array, dtype=dtype), torch.tensor(atoms.pbc), cutoff, k)


def test_edge_vectors_follow_convention_and_lengths_within_cutoff():
    atoms = bulk("NaCl", "rocksalt", a=5.64) * (2, 1, 1)
    atoms.rattle(0.05, seed=0)
    src, dst, shift = _edges(atoms)
    pos = atoms.positions
    vec = pos[src] + shift.numpy() @ atoms.cell.array - pos[dst]
    length = np.linalg.norm(vec, axis=1)
    assert length.max() <= 6.0 and length.min() > 1.0
    # Compare with ASE's independent neighbour list (same cutoff, no cap binding at K = 500).
    from ase.neighborlist import neighbor_list

    i, j, S = neighbor_list("ijS", atoms, 6.0)
    src_all, dst_all, shift_all = _edges(atoms, k=500)
    ours = sorted(zip(dst_all.tolist(), src_all.tolist(), map(tuple, shift_all.long().tolist())))
    theirs = sorted(zip(i.tolist(), j.tolist(), map(tuple, S.tolist())))
    assert ours == theirs


def test_self_images_kept_true_self_pair_dropped():
    atoms = bulk("Cu", "fcc", a=3.6)  # one atom: every neighbour is an image of itself
    src, dst, shift = _edges(atoms, k=500)
    assert len(src) > 0 and bool((src == dst).all())
    assert not bool(((shift == 0).all(dim=1)).any())


def test_neighbor_cap_keeps_whole_shell():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)  # 12 nearest at equal distance
    for k in (1, 5, 12):
        src, dst, _ = _edges(atoms, k=k)
        assert torch.bincount(dst).tolist() == [12] * 4
    src, dst, _ = _edges(atoms, k=13)  # the second shell (6 at a) joins whole
    assert torch.bincount(dst).tolist() == [18] * 4


def test_cap_neighbors_deterministic_rule():
    dst = torch.tensor([0, 0, 0, 0, 1, 1])
    dist = torch.tensor([1.0, 2.0, 2.00005, 3.0, 1.0, 1.5], dtype=torch.float64)
    keep = cap_neighbors(dst, dist, 2, 2)
    assert keep.tolist() == [True, True, True, False, True, True]


def test_symmetric_crystal_gives_symmetric_graph_in_any_atom_order():
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    counts = torch.bincount(_edges(atoms, k=10)[1]).tolist()
    assert len(set(counts)) == 1
    perm = np.random.default_rng(0).permutation(len(atoms))
    counts_perm = torch.bincount(_edges(atoms[perm], k=10)[1]).tolist()
    assert counts_perm == counts


def test_slab_has_no_edges_across_vacuum():
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=2.5)  # vacuum gap 5 Å < cutoff
    slab.pbc = [True, True, False]
    src, dst, shift = _edges(slab)
    assert (shift[:, 2] == 0).all()
    slab.pbc = True
    src, dst, shift = _edges(slab)
    assert (shift[:, 2] != 0).any()


def test_batch_graph_offsets_and_edge_vectors():
    a = bulk("Si", "diamond", a=5.43)
    b = bulk("NaCl", "rocksalt", a=5.64)
    graph = build_graph(
        [torch.tensor(x.numbers) for x in (a, b)],
        [torch.tensor(x.positions) for x in (a, b)],
        [torch.tensor(x.cell.array) for x in (a, b)],
        [torch.tensor(x.pbc) for x in (a, b)],
        6.0,
        50,
    )
    assert graph.n_graphs == 2 and graph.batch.tolist() == [0, 0, 1, 1]
    assert bool((graph.batch[graph.edge_src] == graph.batch[graph.edge_dst]).all())
    vec = edge_vectors(graph, graph.positions, graph.cell)
    assert float(vec.norm(dim=1).max()) <= 6.0
    single = _edges(b)
    n_a = int((graph.batch[graph.edge_dst] == 0).sum())
    assert torch.equal(graph.edge_src[n_a:] - 2, single[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_graph_dtype_preserved(dtype):
    atoms = bulk("Al", "fcc", a=4.05)
    src, dst, shift = _edges(atoms, dtype=dtype)
    assert shift.dtype == dtype


def test_build_graph_device_search_path_gives_the_host_edges(monkeypatch):
    """build_graph's per-crystal search on the device (large cells on CUDA) joins with the host
    searches of the other crystals into the same graph; run here on the CPU by forcing the path."""
    from ase.build import bulk

    import e3relax_ase.geometry.graph as graph_module

    rng = np.random.default_rng(5)
    big = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((2, 2, 2))
    big.rattle(0.05, seed=2)
    crystals = [
        random_crystal(rng, n_atoms=4),
        CrystalArrays(big.numbers, big.positions, big.cell.array, big.pbc),
        random_crystal(rng, n_atoms=6),
        random_crystal(rng, n_atoms=3),
    ]

    def build():
        return build_graph(
            [torch.as_tensor(c.numbers) for c in crystals],
            [torch.as_tensor(c.positions, dtype=torch.float64) for c in crystals],
            [torch.as_tensor(c.cell, dtype=torch.float64) for c in crystals],
            [torch.as_tensor(c.pbc) for c in crystals],
            6.0,
            50,
        )

    host = build()
    monkeypatch.setattr(graph_module, "_search_on_device", lambda device, n_atoms: n_atoms >= 20)
    mixed = build()
    for field in ("edge_src", "edge_dst", "edge_shift", "batch"):
        assert torch.equal(getattr(mixed, field), getattr(host, field)), field


def test_float32_graph_has_the_edges_of_the_float64_crystal():
    """A pair 1e-9 Å inside the graph radius is an edge of the exact crystal; rounding the
    positions to float32 first (the old float32 path) would put it outside and drop it."""
    from e3relax_ase.geometry.canonical import CanonicalForm
    from e3relax_ase.geometry.neighbors import graph_radius
    from e3relax_ase.relax.predict import graph_from_canonical

    cutoff = 6.0
    positions = np.array([[0.1, 0.1, 0.1], [0.1 + graph_radius(cutoff) - 1e-9, 0.1, 0.1]])
    cell = np.eye(3) * 20.0
    rounded = torch.tensor(positions, dtype=torch.float32).double()
    assert float((rounded[1] - rounded[0]).norm()) > graph_radius(cutoff)  # the premise: float32 rounding crosses it
    args = ([torch.tensor([14, 14])], [torch.tensor(positions)], [torch.tensor(cell)], [torch.tensor([True] * 3)], cutoff, 50)
    exact = build_graph(*args)
    single = build_graph(*args, dtype=torch.float32)
    assert exact.n_edges == 2 and single.positions.dtype == torch.float32
    assert torch.equal(single.edge_src, exact.edge_src) and torch.equal(single.edge_dst, exact.edge_dst)
    crystal = CrystalArrays(np.array([14, 14]), positions, cell, np.ones(3, dtype=bool))
    form = CanonicalForm(positions=positions, cell=cell, transform=np.eye(3, dtype=np.int64), image_shift=np.zeros((2, 3), dtype=np.int64))
    graph = graph_from_canonical([crystal], [form], cutoff, 50, "cpu", torch.float32)
    assert graph.n_edges == 2 and graph.positions.dtype == torch.float32 and graph.cell.dtype == torch.float32
