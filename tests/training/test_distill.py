"""make-pairs end to end with EMT on fcc Cu/Al/Ni seeds: Python API and CLI."""

import importlib.util
import pickle

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import read, write
from click.testing import CliRunner

from e3relax_ase.cli.main import cli
from e3relax_ase.relax.calculators import resolve_calculator
from e3relax_ase.training.data.importers import import_extxyz
from e3relax_ase.training.data.pairs import load_pairs, save_pairs_extxyz
from e3relax_ase.training.distill.distill import make_pairs, min_distance, sanity_problem
from tests.paths import TEST_DATA

FMAX = 0.02
DATA = TEST_DATA


def fcc_seeds():
    seeds = []
    # Lattice constants a few % off EMT's minimum, so the cell has to move too.
    for symbol, a in (("Cu", 3.70), ("Al", 4.00), ("Ni", 3.60)):
        atoms = bulk(symbol, "fcc", a=a, cubic=True)
        atoms.info["seed_id"] = f"fcc:{symbol}"
        seeds.append(atoms)
    return seeds


@pytest.fixture(scope="module")
def emt_pairs():
    return make_pairs(
        fcc_seeds(),
        "emt",
        n_per_seed=1,
        rng=0,
        fmax=FMAX,
        steps=400,
        strain=0.03,
        rattle=0.05,
        volume_range=(0.95, 1.05),
    )


def generalised_forces(atoms):
    """Atomic forces and virial / n_atoms from a fresh EMT calculator (independent of the run)."""
    atoms = atoms.copy()
    atoms.calc = EMT()
    forces = atoms.get_forces()  # [n, 3]
    virial = -atoms.get_volume() * atoms.get_stress(voigt=False) / len(atoms)  # [3, 3]
    return np.linalg.norm(forces, axis=1).max(), np.linalg.norm(virial, axis=1).max()


# --- calculators --------------------------------------------------------------------------
def test_resolve_calculator_names():
    emt = resolve_calculator("emt")
    assert emt.name == "EMT" and isinstance(emt(), EMT)
    assert isinstance(pickle.loads(pickle.dumps(emt))(), EMT)
    custom = resolve_calculator("ase.calculators.emt:EMT")
    assert isinstance(custom(), EMT) and custom.name == "ase.calculators.emt:EMT"
    with pytest.raises(ValueError, match="unknown calculator 'lj2'"):
        resolve_calculator("lj2")
    with pytest.raises(ImportError, match="cannot import module 'no_such_module_xyz'"):
        resolve_calculator("no_such_module_xyz:Calc")
    with pytest.raises(ValueError, match="has no callable 'Nope'"):
        resolve_calculator("ase.calculators.emt:Nope")


@pytest.mark.parametrize("name, module", [("sevennet", "sevenn"), ("chgnet", "chgnet")])
def test_missing_ml_teachers_fail_clearly(name, module):
    if importlib.util.find_spec(module) is not None:
        factory = resolve_calculator(name)
        assert factory.spec == name
    else:
        with pytest.raises(ImportError, match=f"needs the package '{module}'"):
            resolve_calculator(name)


# --- make_pairs ---------------------------------------------------------------------------
def test_make_pairs_converges_honestly(emt_pairs):
    pairs, report = emt_pairs
    assert len(pairs) == 3 and report.n_kept == 3 and report.rejected == {}
    assert list(pairs.ids) == ["fcc:Cu-0", "fcc:Al-0", "fcc:Ni-0"]
    for k, (unrelaxed, relaxed) in enumerate(pairs.to_atoms_pairs()):
        f_atoms, f_cell = generalised_forces(relaxed)
        assert f_atoms <= FMAX and f_cell <= FMAX, (k, f_atoms, f_cell)
        f_atoms_in, f_cell_in = generalised_forces(unrelaxed)
        assert max(f_atoms_in, f_cell_in) > 5 * FMAX  # the inputs really were out of equilibrium
        fresh = relaxed.copy()
        fresh.calc = EMT()
        assert pairs.energy_per_atom_relaxed[k] == pytest.approx(fresh.get_potential_energy() / len(fresh), abs=1e-8)
        info = pairs.info[k]
        assert info["converged"] is True and info["teacher"] == "EMT" and 0 < info["steps"] <= 400
        assert info["fmax_final"] <= FMAX and info["seed_id"] == pairs.ids[k][:-2]
        assert set(info["perturbation"]) == {"substitution", "volume_factor", "strain", "rattle_stdev"}
    assert pairs.metadata["teacher"] == "EMT" and pairs.metadata["relaxation"]["fmax"] == FMAX


def test_make_pairs_unrelaxed_are_the_perturbed_inputs(emt_pairs):
    from e3relax_ase.training.data.perturb import make_user_like_inputs

    pairs, _ = emt_pairs
    inputs = make_user_like_inputs(
        fcc_seeds(),
        1,
        np.random.default_rng(0),
        strain_magnitude=0.03,
        rattle_stdev=0.05,
        volume_range=(0.95, 1.05),
        allowed_elements=resolve_calculator("emt").elements,
    )
    for k, atoms in enumerate(inputs):
        np.testing.assert_array_equal(pairs.pair(k).pos_unrelaxed, atoms.positions)
        np.testing.assert_array_equal(pairs.pair(k).cell_unrelaxed, atoms.cell.array)


def test_workers_give_the_same_pairs_as_inline():
    seeds = fcc_seeds()[:2]
    kwargs = dict(n_per_seed=1, rng=5, fmax=FMAX, steps=400, strain=0.02, rattle=0.03)
    inline, _ = make_pairs(seeds, "emt", n_workers=1, **kwargs)
    parallel, report = make_pairs(seeds, resolve_calculator("emt"), n_workers=2, **kwargs)
    assert report.n_workers == 2 and len(parallel) == 2
    np.testing.assert_allclose(parallel.pos_relaxed, inline.pos_relaxed, atol=1e-10)
    np.testing.assert_allclose(parallel.cell_relaxed, inline.cell_relaxed, atol=1e-10)


def test_unconverged_inputs_are_dropped():
    pairs, report = make_pairs(fcc_seeds(), "emt", rng=0, steps=2, strain=0.05, rattle=0.1)
    assert len(pairs) == 0 and report.rejected == {"not converged": 3}
    assert "0/3 pairs kept" in report.summary()


def test_sanity_rules():
    unrelaxed = bulk("Cu", "fcc", a=3.6, cubic=True)
    assert sanity_problem(unrelaxed, unrelaxed.copy()) is None
    swollen = unrelaxed.copy()
    swollen.set_cell(unrelaxed.cell * 1.5, scale_atoms=True)  # volume x 3.4
    assert sanity_problem(unrelaxed, swollen) == "volume ratio out of range"
    crushed = unrelaxed.copy()
    crushed.positions[1] = crushed.positions[0] + [0.3, 0, 0]
    assert min_distance(crushed) == pytest.approx(0.3)
    assert sanity_problem(unrelaxed, crushed) == "atoms too close"
    flipped = unrelaxed.copy()
    flipped.set_cell(unrelaxed.cell.array[[1, 0, 2]])
    assert sanity_problem(unrelaxed, flipped) == "det(cell) <= 0"


def test_extxyz_output_matches_the_demo_layout(tmp_path, emt_pairs):
    pairs, _ = emt_pairs
    path = save_pairs_extxyz(tmp_path / "emt.extxyz", pairs)
    frames = read(path, index=":")
    demo = read(DATA / "sevennet0_demo_sample.extxyz", index=":")
    assert len(frames) == 6
    for ours, theirs in ((frames[0], demo[0]), (frames[1], demo[1])):
        assert ours.info["role"] == theirs.info["role"]
        assert {"pair_id", "role"} <= set(ours.info)
    assert {"pair_id", "role", "converged", "steps", "teacher"} <= set(frames[1].info)
    assert {"converged", "steps", "teacher"} <= set(demo[1].info)
    back = import_extxyz(path)
    assert list(back.ids) == list(pairs.ids) and back.info == pairs.info
    np.testing.assert_allclose(back.pos_relaxed, pairs.pos_relaxed, atol=1e-7)


# --- CLI ----------------------------------------------------------------------------------
def _run(args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result


def test_cli_make_pairs_extxyz_and_npz(tmp_path):
    seeds_file = tmp_path / "seeds.extxyz"
    write(seeds_file, fcc_seeds())
    out_x = tmp_path / "pairs.extxyz"
    common = [
        "--calculator",
        "emt",
        "--n-per-seed",
        "1",
        "--seed",
        "3",
        "--strain",
        "0.03",
        "--rattle",
        "0.05",
        "--fmax",
        str(FMAX),
        "--steps",
        "400",
    ]
    result = _run(["make-pairs", str(seeds_file), "-o", str(out_x), *common])
    assert result.exit_code == 0, result.output
    assert "3/3 pairs kept" in result.stderr and "wrote 3 pairs" in result.stderr
    from_extxyz = import_extxyz(out_x)
    # The seed file's own seed_id survives; frames without one would be named seeds:0, seeds:1, ...
    assert list(from_extxyz.ids) == ["fcc:Cu-0", "fcc:Al-0", "fcc:Ni-0"]
    for _, relaxed in from_extxyz.to_atoms_pairs():
        f_atoms, f_cell = generalised_forces(relaxed)
        assert f_atoms <= FMAX + 1e-6 and f_cell <= FMAX + 1e-6  # extxyz stores 8 decimals
    out_n = tmp_path / "pairs.npz"
    result = _run(["make-pairs", str(seeds_file), "-o", str(out_n), *common])
    assert result.exit_code == 0, result.output
    from_npz = load_pairs(out_n)
    assert list(from_npz.ids) == list(from_extxyz.ids) and from_npz.metadata["rng_seed"] == 3
    np.testing.assert_allclose(from_npz.pos_relaxed, from_extxyz.pos_relaxed, atol=1e-7)
    assert from_npz.info == from_extxyz.info


def test_cli_make_pairs_errors(tmp_path):
    seeds_file = tmp_path / "seeds.extxyz"
    seeds = fcc_seeds()[:1]
    seeds[0].info = {}
    write(seeds_file, seeds)
    before = seeds_file.read_bytes()
    result = _run(["make-pairs", str(seeds_file), "-o", str(seeds_file)])
    assert result.exit_code != 0 and "refusing to overwrite input" in result.output
    assert seeds_file.read_bytes() == before
    result = _run(["make-pairs", str(seeds_file), "-c", "lj2", "-o", str(tmp_path / "o.extxyz")])
    assert result.exit_code != 0 and "unknown calculator 'lj2'" in result.output
    result = _run(["make-pairs", str(seeds_file), "-o", str(tmp_path / "o.cif")])
    assert result.exit_code != 0 and "must end in" in result.output
    result = _run(["make-pairs", str(tmp_path / "missing.cif"), "-o", str(tmp_path / "o.extxyz")])
    assert result.exit_code != 0 and "cannot read seeds" in result.output
    assert not (tmp_path / "o.extxyz").exists()
