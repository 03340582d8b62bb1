"""The faster relax_many pipeline computes exactly what the straightforward one did.

Each shortcut is checked bit for bit against the code it replaces: ``canonical.reduce_cell``'s
vectorised Niggli reduction against ASE's ``niggli_reduce_cell``, the canonical form built from validation's transform
against ``canonicalize``, the numpy neighbour cap against ``neighbor_edges``, the batched
``build_graph`` against a per-crystal loop over ``neighbor_edges``, the distance bound of the
sanity check against the neighbour search. Then ``relax_many`` with its prepared graph, with
the background thread and with worker processes against ``predict`` from scratch, and (where
git has it) against the relaxer as it was before (benchmarks/bench_pipeline.py's baseline).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111
from ase.constraints import FixAtoms

from e3relax_ase.geometry.canonical import canonicalize, reduce_cell, wrap_into
from e3relax_ase.geometry.graph import CrystalGraph, build_graph, graph_from_edges
from e3relax_ase.geometry.neighbors import capped_edges, capped_edges_many, neighbor_edges, periodic_pairs
from e3relax_ase.geometry.validation import InvalidStructureError, prepare_arrays, validate_atoms
from e3relax_ase.io.structures import apply_prediction, crystal_arrays
from e3relax_ase.relax.predict import CrystalArrays, graph_from_canonical, predict
from e3relax_ase.relax.relaxer import OneShotRelaxer, RelaxFailure
from e3relax_ase.relax.sanity import check_prediction
from e3relax_ase.testing import random_crystal, tiny_model
from tests.paths import ROOT

# The last revision before the pipeline work (benchmarks/bench_pipeline.py DEFAULT_BASELINE).
# Move it forward when the results change on purpose (model, validation or sanity rules).
BASELINE = "f532430"
FIELDS = ("numbers", "positions", "cell", "pbc", "batch", "n_atoms", "edge_src", "edge_dst", "edge_shift")


def dataset_crystals(n=60):
    from e3relax_ase.training.data.pairs import load_pairs

    pairs = load_pairs(ROOT / "data" / "nrel_zintl" / "test.npz")
    chosen = [k for k in range(len(pairs)) if 2 <= pairs.n_atoms[k] <= 40][:n]
    out = []
    for k in chosen:
        atoms = slice(pairs.offsets[k], pairs.offsets[k + 1])
        out.append(CrystalArrays(pairs.numbers[atoms], pairs.pos_unrelaxed[atoms], pairs.cell_unrelaxed[k], np.ones(3, bool)))
    return out


def awkward_crystals():
    """Ties (symmetric cells), skewed reducible cells, atoms outside the cell, slabs, dense cells."""
    rng = np.random.default_rng(7)
    out = []
    nacl = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    cu = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)  # more than 50 neighbours: the cap acts
    skew = bulk("Si", "diamond", a=5.43)
    cell = skew.cell.array
    skew.set_cell(np.array([cell[0], cell[1] + 3 * cell[0], cell[2] - 2 * cell[1]]), scale_atoms=False)
    outside = nacl.copy()
    outside.positions[::2] += 2 * outside.cell.array[0] - 3 * outside.cell.array[2]
    slab = fcc111("Ni", (2, 2, 3), vacuum=6.0)
    slab.rattle(0.02, seed=3)
    for atoms in (nacl, cu, skew, outside, slab, bulk("Mg", "hcp", a=3.2, c=5.2)):
        out.append(CrystalArrays(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc))
    for n in (1, 3, 9):
        out.append(random_crystal(rng, n_atoms=n, skew=0.6))
    return out


CRYSTALS = dataset_crystals() + awkward_crystals()


def ase_transform(cell):
    """The reference: T of ASE's own ``niggli_reduce_cell`` (T @ cell is reduced)."""
    from ase.build.tools import niggli_reduce_cell

    return np.asarray(niggli_reduce_cell(cell)[1]).T.astype(np.int64)


def test_reduce_cell_matches_ases_niggli_reduce_cell():
    rng = np.random.default_rng(0)
    cells = [c.cell for c in CRYSTALS] + [np.eye(3) + rng.uniform(-0.45, 0.45, (3, 3)) for _ in range(200)]
    cells += [np.array([[3.0, 0, 0], [7 * 3.0, 4.0, 0], [2.0, -5 * 4.0, 5.0]])]  # far from reduced
    for cell in cells:
        pbc = np.ones(3, bool)
        assert np.array_equal(reduce_cell(cell, pbc), ase_transform(cell))
    slab_pbc = np.array([True, True, False])
    assert np.array_equal(reduce_cell(cells[0], slab_pbc), np.eye(3, dtype=np.int64))


@pytest.mark.parametrize("reduce", [True, False])
def test_canonical_form_matches_canonicalize(reduce):
    for c in CRYSTALS:
        expected = canonicalize(c.positions, c.cell, c.pbc, reduce=reduce)
        transform = reduce_cell(c.cell, c.pbc) if reduce else np.eye(3, dtype=np.int64)
        forms = [wrap_into(np.asarray(c.positions, float), transform @ np.asarray(c.cell, float), transform, np.asarray(c.pbc, bool))]
        try:
            forms.append(prepare_arrays(c.numbers, c.positions, c.cell, c.pbc, reduce=reduce, min_distance=0.1).form)
        except InvalidStructureError:  # e.g. an isolated atom in a random cell
            pass
        for got in forms:
            for name in ("positions", "cell", "transform", "image_shift"):
                a, b = getattr(got, name), getattr(expected, name)
                assert a.dtype == b.dtype and np.array_equal(a, b), name


@pytest.mark.parametrize("k", [50, 12, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_capped_edges_match_neighbor_edges(k, dtype):
    for c in CRYSTALS:
        form = canonicalize(c.positions, c.cell, c.pbc)
        positions, cell = torch.as_tensor(form.positions, dtype=dtype), torch.as_tensor(form.cell, dtype=dtype)
        src, dst, shift = neighbor_edges(positions, cell, torch.as_tensor(c.pbc), 6.0, k)
        got = capped_edges(*periodic_pairs(positions, cell, c.pbc, 6.0), len(c.numbers), k)
        assert torch.equal(torch.from_numpy(got[0]), src) and torch.equal(torch.from_numpy(got[1]), dst)
        assert torch.equal(torch.from_numpy(got[2]).to(dtype), shift)


@pytest.mark.parametrize("k", [50, 12, 4])
def test_capped_edges_of_many_crystals_are_each_crystals_own(k):
    """The workers cap a whole task's pairs in one pass: per crystal the same edges, same order."""
    forms = [canonicalize(c.positions, c.cell, c.pbc) for c in CRYSTALS]
    pairs = [periodic_pairs(f.positions, f.cell, c.pbc, 6.0) for f, c in zip(forms, CRYSTALS)]
    sizes = [len(c.numbers) for c in CRYSTALS]
    together = capped_edges_many(pairs, sizes, k)
    for pair, size, got in zip(pairs, sizes, together):
        want = capped_edges(*pair, size, k)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert capped_edges_many([], [], k) == []


def _per_crystal_graph(numbers, positions, cells, pbcs, cutoff, k) -> CrystalGraph:
    """build_graph as it was: one neighbor_edges call per crystal, concatenated."""
    srcs, dsts, shifts, batch, offset = [], [], [], [], 0
    for index, (pos, cell, pbc) in enumerate(zip(positions, cells, pbcs)):
        src, dst, shift = neighbor_edges(pos, cell, pbc, cutoff, k)
        srcs.append(src + offset)
        dsts.append(dst + offset)
        shifts.append(shift)
        batch.append(torch.full((pos.shape[0],), index, dtype=torch.long))
        offset += pos.shape[0]
    return CrystalGraph(
        numbers=torch.cat([torch.as_tensor(n).long() for n in numbers]),
        positions=torch.cat(list(positions)),
        cell=torch.stack(list(cells)),
        pbc=torch.stack([torch.as_tensor(p).bool() for p in pbcs]),
        batch=torch.cat(batch),
        n_atoms=torch.tensor([p.shape[0] for p in positions], dtype=torch.long),
        edge_src=torch.cat(srcs),
        edge_dst=torch.cat(dsts),
        edge_shift=torch.cat(shifts),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_build_graph_and_graph_from_edges_match_per_crystal_graph(dtype):
    forms = [canonicalize(c.positions, c.cell, c.pbc) for c in CRYSTALS]
    args = (
        [torch.as_tensor(c.numbers) for c in CRYSTALS],
        [torch.as_tensor(f.positions, dtype=dtype) for f in forms],
        [torch.as_tensor(f.cell, dtype=dtype) for f in forms],
        [torch.as_tensor(c.pbc) for c in CRYSTALS],
    )
    expected = _per_crystal_graph(*args, 6.0, 20)
    edges = [capped_edges(*periodic_pairs(p, cell, pbc, 6.0), len(p), 20) for p, cell, pbc in zip(args[1], args[2], args[3])]
    prebuilt = graph_from_edges([c.numbers for c in CRYSTALS], [f.positions for f in forms], [f.cell for f in forms], [c.pbc for c in CRYSTALS], edges, dtype)
    for graph in (build_graph(*args, 6.0, 20), prebuilt):
        for name in FIELDS:
            a, b = getattr(graph, name), getattr(expected, name)
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name


def test_predict_with_prepared_forms_and_graph_is_predict():
    model = tiny_model()
    crystals = CRYSTALS[:12]
    forms = [canonicalize(c.positions, c.cell, c.pbc) for c in crystals]
    graph = graph_from_canonical(crystals, forms, model.config.cutoff, model.config.max_neighbors, "cpu", torch.float64)
    for a, b in zip(predict(model, crystals, "cpu", torch.float64), predict(model, crystals, "cpu", torch.float64, forms=forms, graph=graph)):
        assert np.array_equal(a.positions, b.positions) and np.array_equal(a.cell, b.cell)


def test_distance_bound_gives_the_searched_report():
    """check_prediction with the bound (no search when it proves no close pair) = without it."""
    from e3relax_ase.relax.sanity_search import no_close_pairs

    rng = np.random.default_rng(3)
    searched = skipped = 0
    for c in CRYSTALS:
        try:
            report = validate_atoms(Atoms(c.numbers, positions=c.positions, cell=c.cell, pbc=c.pbc), min_distance=0.1)
        except InvalidStructureError:
            continue
        closest = min(report.min_distance, 6.0)
        for scale, noise in ((1.0, 0.0), (1.05, 0.05), (0.7, 0.3), (0.5, 1.5), (1.0, 3.0)):
            strain = np.eye(3) * scale + rng.normal(0, 0.02, (3, 3))
            cell = c.cell @ strain
            positions = c.positions @ strain + rng.normal(0, noise, c.positions.shape)
            if len(c.numbers) > 1 and noise > 1:  # a certain close pair
                positions[1] = positions[0] + [0.2, 0.1, 0.0]
            plain = check_prediction(positions, cell, c.pbc, c.cell)
            bounded = check_prediction(positions, cell, c.pbc, c.cell, positions_input=c.positions, closest_input=closest)
            assert plain.ok == bounded.ok and plain.problems == bounded.problems
            assert plain.min_distance == bounded.min_distance and plain.volume_ratio == bounded.volume_ratio
            searched += any("apart" in p for p in plain.problems)
            skipped += no_close_pairs(positions, cell, c.positions, c.cell, closest, 0.5)
    assert searched > 0 and skipped > 0  # both the proof and the fallback search were used


def _structures():
    """Real inputs, a constrained slab, a pymatgen Structure, a refused one, a per-atom array."""
    out = [Atoms(c.numbers, positions=c.positions, cell=c.cell, pbc=True) for c in dataset_crystals(14)]
    slab = fcc111("Ni", (2, 2, 3), vacuum=6.0)
    slab.set_constraint(FixAtoms(indices=[0, 1]))
    slab.set_initial_magnetic_moments(np.linspace(0.1, 1.2, len(slab)))
    slab.rattle(0.03, seed=1)
    out.insert(3, slab)
    broken = out[5].copy()
    broken.positions[1] = broken.positions[0] + [0.2, 0, 0]
    out.insert(6, broken)
    bad_array = out[8].copy()
    bad_array.arrays["initial_charges"] = np.zeros(len(bad_array) + 2)
    out.insert(9, bad_array)
    from pymatgen.io.ase import AseAtomsAdaptor

    out.insert(11, AseAtomsAdaptor.get_structure(bulk("NaCl", "rocksalt", a=5.64, cubic=True)))
    return out


def _same(a, b) -> bool:
    if isinstance(a, RelaxFailure):
        return isinstance(b, RelaxFailure) and a.index == b.index and a.name == b.name and str(a.error) == str(b.error)
    from e3relax_ase.io.structures import as_atoms

    a, _ = as_atoms(a)
    b, _ = as_atoms(b)
    return np.array_equal(a.positions, b.positions) and np.array_equal(a.cell.array, b.cell.array) and repr(a.info) == repr(b.info)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("relax_cell", [True, False])
def test_relax_many_paths_are_identical(dtype, relax_cell):
    relaxer = OneShotRelaxer(tiny_model(), device="cpu", dtype=dtype, batch_size=4)
    structures = _structures()
    try:
        reference = relaxer.relax_many(structures, errors="return", relax_cell=relax_cell)
        for options in ({"prefetch": True}, {"num_workers": 2}):
            results = relaxer.relax_many(structures, errors="return", relax_cell=relax_cell, **options)
            assert all(_same(a, b) for a, b in zip(reference, results)), options
    finally:
        relaxer.close()
    failures = [r for r in reference if isinstance(r, RelaxFailure)]
    assert [f.index for f in failures] == [6, 9]
    assert "atoms 0 and 1 are 0.200" in failures[0].message and "initial_charges" in failures[1].message
    # The ASE results are predict()'s from scratch (canonicalize + graph per chunk of 4), applied.
    from e3relax_ase.io.structures import as_atoms

    valid = [k for k, r in enumerate(reference) if not isinstance(r, RelaxFailure)]
    for start in range(0, len(valid), 4):
        chunk = valid[start : start + 4]
        batch = [crystal_arrays(as_atoms(structures[k])[0]) for k in chunk]
        for k, prediction in zip(chunk, predict(relaxer.model, batch, "cpu", getattr(torch, dtype))):
            if not isinstance(structures[k], Atoms):
                continue  # pymatgen out: compared between the paths above
            expected = structures[k].copy()
            apply_prediction(expected, prediction.positions[-1], prediction.cell[-1], relax_cell)
            assert np.array_equal(reference[k].positions, expected.positions)
            assert np.array_equal(reference[k].cell.array, expected.cell.array)


def test_workers_raise_like_the_sequential_path():
    relaxer = OneShotRelaxer(tiny_model(), device="cpu", batch_size=4)
    structures = _structures()
    try:
        with pytest.raises(InvalidStructureError) as sequential:
            relaxer.relax_many(structures)
        with pytest.raises(InvalidStructureError) as pooled:
            relaxer.relax_many(structures, num_workers=2)
        assert str(sequential.value) == str(pooled.value) and str(pooled.value).startswith("structure 6 (")
        with pytest.raises(TypeError, match="expected an ase.Atoms"):
            relaxer.relax_many(structures[:2] + ["not a structure"], num_workers=2)
    finally:
        relaxer.close()


# info keys whose meaning changed on purpose after BASELINE: the refinement advice is now the
# measured last-layer correction (e3relax_ase/relax/sanity.py), not the relative share; the checkpoint
# both revisions run (the paper-design one BASELINE shipped) is registered under a new name; the
# strain is measured by principal stretches (rotation invariant), not the entries of F - I.
CHANGED_ON_PURPOSE = ("e3relax_refine_advised", "e3relax_last_correction", "e3relax_model", "e3relax_max_strain")
# BASELINE's checkpoint, of the design it knew (format 1): the host pipelines are compared on it.
BASELINE_CHECKPOINT = ROOT / "checkpoints" / "e3relax-h2-zintl-axis-f128.pt"


def test_relax_many_matches_the_baseline_revision(tmp_path):
    """The relaxer as it was (git revision BASELINE, run from a copy of its package) gives the
    same results in float64 for the same batches (the shipped checkpoint, real inputs).

    Bit for bit until the model's geometric einsums became elementwise sums (so that bfloat16
    autocast cannot round coordinates): the same arithmetic summed in another order, hence
    agreement to 1e-12 Å rather than to the bit."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", BASELINE, "e3relax_ase"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"git revision {BASELINE} is not available")
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive, check=True)
    (tmp_path / "checkpoints").symlink_to(ROOT / "checkpoints")
    script = tmp_path / "run.py"
    script.write_text(
        "import json, sys, logging, numpy as np, torch\n"
        "logging.disable(logging.WARNING); torch.set_num_threads(1)\n"
        "import e3relax_ase\n"
        "from ase.io import read\n"
        "from e3relax_ase.relaxer import OneShotRelaxer, RelaxFailure  # the baseline revision's layout\n"
        "atoms = read(sys.argv[1], index=':')\n"
        f"relaxer = OneShotRelaxer({str(BASELINE_CHECKPOINT)!r}, device='cpu', dtype='float64', batch_size=8)\n"
        f"skip = {CHANGED_ON_PURPOSE!r}\n"
        "out = [str(r.error) if isinstance(r, RelaxFailure) else [r.positions.tolist(), r.cell.array.tolist(),\n"
        "       {k: (float(v) if isinstance(v, (float, np.floating)) else repr(v)) for k, v in r.info.items() if k not in skip}]\n"
        "       for r in relaxer.relax_many(atoms, errors='return')]\n"
        "print(json.dumps({'package': e3relax_ase.__file__, 'results': out}))\n"
    )
    structures = [s for s in _structures() if isinstance(s, Atoms) and not s.constraints and "initial_charges" not in s.arrays]
    import ase.io

    ase.io.write(tmp_path / "in.extxyz", structures)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "in.extxyz")], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    old = json.loads(done.stdout.strip().splitlines()[-1])
    assert old["package"].startswith(str(tmp_path))
    relaxer = OneShotRelaxer(str(BASELINE_CHECKPOINT), device="cpu", dtype="float64", batch_size=8)
    for mode in ({}, {"num_workers": 2}):
        new = relaxer.relax_many(ase.io.read(tmp_path / "in.extxyz", index=":"), errors="return", **mode)
        for before, after in zip(old["results"], new):
            if isinstance(before, str):
                assert isinstance(after, RelaxFailure) and str(after.error) == before
            else:
                np.testing.assert_allclose(after.positions, np.array(before[0]), rtol=0, atol=1e-12)
                np.testing.assert_allclose(after.cell.array, np.array(before[1]), rtol=0, atol=1e-12)
                info = {k: v for k, v in after.info.items() if k not in CHANGED_ON_PURPOSE}
                assert info.keys() == before[2].keys()
                for key, value in before[2].items():
                    if isinstance(value, float):
                        assert info[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
                    else:
                        assert repr(info[key]) == value, key
    relaxer.close()
