"""Property-based fuzzing of OneShotRelaxer with random crystals (tests/strategies.py).

Properties:
1. ``relax_many(errors="return")`` and ``relax`` raise nothing but the documented exceptions:
   ``InvalidStructureError`` for a refused input, ``PredictionError`` only with
   ``on_insane="raise"``; both calls agree (same outcome, same bits);
2. a planted defect, or an overlap / isolated atom that an independent brute-force search
   (``strategies.oracle_problem``) finds, is refused; a distance refusal that the brute-force
   search contradicts is a bug;
3. every returned structure has finite positions and cell, the same atoms in the same order
   and the same pbc; det(cell) keeps the input's sign unless the prediction is flagged
   insane (and never with ``on_insane="input"``); ``relax_cell=False`` keeps the cell bits;
4. outputs are rotation-equivariant and permutation-equivariant (1e-6 Å, float64): the input
   is rotated and permuted at once, and only on a failure separately, to say which broke; and
   invariant to how the crystal is written: a translation across cell faces, another lattice
   basis, a supercell and a reflection give the same relaxed crystal;
5. the input object is never mutated.

Two profiles. The fast one runs in the default suite (derandomized, so CI is deterministic).
The full one (``-m slow``) draws over 10,000 structures; a module fixture prints how many.
Crash properties use the default checkpoint; equivariance uses a float64 random-weight tiny
model, whose corrections are large enough (tenths of Å) to show a broken symmetry.
"""

from __future__ import annotations

import copy
import logging
import re
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
from ase import Atoms
from ase.constraints import FixAtoms
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from e3relax_ase.geometry.vacuum import find_vacuum
from e3relax_ase.geometry.validation import InvalidStructureError
from e3relax_ase.keys import ISOLATION_MARGIN
from e3relax_ase.relax.predict import CrystalArrays
from e3relax_ase.relax.relaxer import OneShotRelaxer, PredictionError, RelaxFailure
from e3relax_ase.testing import arrays_of, random_rotation, random_unimodular, rotated, supercell, tiny_model
from tests.strategies import accepted_numbers, allowed_elements, crystals, oracle_clear, oracle_problem

EQUIVARIANCE_ATOL = 1e-6  # Å
GUARANTEED_DEFECTS = {"close-pair", "image-overlap", "foreign-element", "nan-position", "bad-array", "far-out"}
HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]

FAST = settings(max_examples=50, derandomize=True, deadline=None, database=None, suppress_health_check=HEALTH)
# The full profiles draw afresh each run; print_blob makes a failure replayable
# (@reproduce_failure) without keeping a database around.
FULL_CRASH = settings(max_examples=4000, deadline=None, database=None, suppress_health_check=HEALTH, print_blob=True)
FULL_INVARIANCE = settings(max_examples=1500, deadline=None, database=None, suppress_health_check=HEALTH, print_blob=True)
FULL_EQUIVARIANCE = settings(max_examples=4500, deadline=None, database=None, suppress_health_check=HEALTH, print_blob=True)

COUNTS: Counter = Counter()  # structures drawn, per test


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    """Print how many structures were drawn; the full profile must draw at least 10,000."""
    start = time.perf_counter()
    yield
    if not COUNTS:
        return
    parts = ", ".join(f"{name}: {count}" for name, count in sorted(COUNTS.items()))
    line = f"fuzz: {sum(COUNTS.values())} structures drawn in {time.perf_counter() - start:.1f} s ({parts})"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)
    if {"crash-full", "equivariance-full"} <= COUNTS.keys():
        assert COUNTS["crash-full"] + COUNTS["equivariance-full"] >= 10_000, line


@pytest.fixture(scope="module", autouse=True)
def _quiet_relaxer():
    """Insane random predictions log a warning each; thousands of them only slow the run."""
    logger = logging.getLogger("e3relax_ase")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


# The relaxers are built at import time: the strategies need their element lists, and a
# module fixture cannot feed @given's arguments.
DEFAULT = OneShotRelaxer("default", device="cpu")
TINY = OneShotRelaxer(tiny_model(), device="cpu")
assert DEFAULT.dtype == TINY.dtype and str(TINY.dtype) == "torch.float64"


def crystals_for(relaxer: OneShotRelaxer, **kwargs):
    config = relaxer.model.config
    return crystals(allowed_elements(relaxer.info, config), accepted_numbers(relaxer.info, config), **kwargs)


# --- helpers --------------------------------------------------------------------------------


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind == "f" and b.dtype.kind == "f":
        return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    return a.shape == b.shape and np.array_equal(a, b)


def snapshot(structure):
    """Everything a caller could see change in the structure it passed."""
    if isinstance(structure, Atoms):
        return {
            "arrays": {key: value.copy() for key, value in structure.arrays.items()},
            "cell": structure.cell.array.copy(),
            "pbc": structure.pbc.copy(),
            "info": copy.deepcopy(structure.info),
            "constraints": [c.todict() for c in structure.constraints],
        }
    return {"dict": structure.as_dict(), "coords": structure.cart_coords.copy(), "lattice": structure.lattice.matrix.copy()}


def assert_unchanged(structure, before) -> None:
    after = snapshot(structure)
    if "arrays" in before:
        assert before["arrays"].keys() == after["arrays"].keys(), "per-atom arrays added or removed"
        for key in before["arrays"]:
            assert _same(before["arrays"][key], after["arrays"][key]), f"input array {key!r} mutated"
        assert _same(before["cell"], after["cell"]) and _same(before["pbc"], after["pbc"]), "input cell or pbc mutated"
        assert before["info"] == after["info"], "input info mutated"
        assert before["constraints"] == after["constraints"], "input constraints mutated"
    else:
        assert before["dict"] == after["dict"], "input Structure mutated"
        assert _same(before["coords"], after["coords"]) and _same(before["lattice"], after["lattice"])


def geometry(structure):
    """(numbers, positions, cell, pbc, info) of an Atoms or a pymatgen Structure."""
    if isinstance(structure, Atoms):
        return structure.numbers, structure.positions, structure.cell.array, structure.pbc, structure.info
    return (
        np.array(structure.atomic_numbers),
        structure.cart_coords,
        structure.lattice.matrix,
        np.array(structure.lattice.pbc),
        structure.properties,
    )


def problem_of(error: Exception) -> str:
    """The problem part of "NAME: problem" (names differ between relax and relax_many)."""
    return str(error).split(": ", 1)[-1]


def check_output(given_structure, result, on_insane: str, relax_cell: bool) -> None:
    numbers_in, positions_in, cell_in, pbc_in, _ = geometry(given_structure)
    numbers, positions, cell, pbc, info = geometry(result)
    assert np.isfinite(positions).all() and np.isfinite(cell).all(), "non-finite output"
    assert _same(numbers, numbers_in), "atoms changed or reordered"
    assert positions.shape == positions_in.shape
    assert _same(pbc, pbc_in), "pbc changed"
    det_in, det_out = np.linalg.det(cell_in), np.linalg.det(cell)
    sane = bool(info["e3relax_sane"])
    if sane or on_insane == "input":
        assert det_out != 0 and np.sign(det_out) == np.sign(det_in), f"det(cell) {det_in:.4g} -> {det_out:.4g}"
    elif np.sign(det_out) != np.sign(det_in):
        assert "det(cell)" in info["e3relax_problems"], "det(cell) changed sign without being flagged"
    if not relax_cell and isinstance(result, Atoms):
        assert _same(cell, cell_in), "relax_cell=False changed the cell"
    event("sane" if sane else "flagged insane: " + re.sub(r"\d+(\.\d+)?", "N", info["e3relax_problems"])[:60])


def check_refusal_is_right(fuzzed, error: Exception) -> None:
    """A distance refusal must not be contradicted by the brute-force search."""
    text = problem_of(error)
    cutoff, min_distance = DEFAULT.model.config.cutoff, DEFAULT.min_distance
    distance_refusal = "Å apart" in text or "own periodic image" in text
    facts = oracle_clear(fuzzed.atoms, cutoff) if distance_refusal or "no neighbour" in text else None
    if facts is None:
        return
    if distance_refusal:
        assert facts["closest"] < min_distance + 1e-6, f"refused as overlapping, but the brute-force closest pair is {facts['closest']:.6f} Å: {error}"
    else:
        assert len(facts["lonely"]), f"refused as isolated, but the brute-force search finds a neighbour for every atom: {error}"


# --- 1-3, 5: no crash, no NaN, documented errors only ------------------------------------------------


crash_inputs = {
    "batch": st.lists(crystals_for(DEFAULT), min_size=1, max_size=3),
    "relax_cell": st.booleans(),
    "on_insane": st.sampled_from(["warn", "input", "raise"]),
    "decorate": st.integers(0, 9),  # 0: FixAtoms on the first structure, 1: pymatgen input
}


def check_no_crash(batch, relax_cell, on_insane, decorate, test_name) -> None:
    COUNTS[test_name] += len(batch)
    inputs = []
    for k, fuzzed in enumerate(batch):
        structure = fuzzed.atoms
        if fuzzed.defect is None and decorate == 0 and k == 0:  # through the constraints
            structure.set_constraint(FixAtoms(indices=np.arange(0, len(structure), 3)))
        cell = structure.cell.array
        regular = abs(np.linalg.det(cell)) > 1e-3 * np.prod(np.linalg.norm(cell, axis=1))
        if fuzzed.defect is None and decorate == 1 and structure.pbc.all() and regular:  # pymatgen in, pymatgen out
            from pymatgen.io.ase import AseAtomsAdaptor

            structure = AseAtomsAdaptor.get_structure(structure)
        inputs.append(structure)
        event(f"layout {fuzzed.layout}, defect {fuzzed.defect}")
    before = [snapshot(s) for s in inputs]
    results = DEFAULT.relax_many(inputs, errors="return", relax_cell=relax_cell, on_insane=on_insane)
    assert len(results) == len(inputs)
    documented = (InvalidStructureError, PredictionError) if on_insane == "raise" else (InvalidStructureError,)
    config = DEFAULT.model.config
    for index, (fuzzed, structure, result) in enumerate(zip(batch, inputs, results)):
        assert_unchanged(structure, before[index])
        must_refuse = fuzzed.defect in GUARANTEED_DEFECTS
        verdict = None if must_refuse else oracle_problem(fuzzed.atoms, config.cutoff, DEFAULT.min_distance)
        if isinstance(result, RelaxFailure):
            assert result.index == index
            assert isinstance(result.error, documented), f"undocumented {type(result.error).__name__}: {result.error}"
            if isinstance(result.error, InvalidStructureError):
                check_refusal_is_right(fuzzed, result.error)
                event("refused: " + re.sub(r"\d+(\.\d+)?", "N", problem_of(result.error))[:60])
            else:
                event("PredictionError")
        else:
            assert not must_refuse, f"planted defect {fuzzed.defect!r} was not refused"
            assert verdict not in ("close", "isolated"), f"the brute-force search finds the input {verdict}, but it was accepted"
            assert result is not structure
            check_output(structure, result, on_insane, relax_cell)

    # relax() on the first structure: the same outcome, the same bits (CPU, one per pass).
    # Skipped for large accepted structures: the forward pass is most of the run time.
    first, expected = inputs[0], results[0]
    if len(batch[0].atoms) > 32 and not isinstance(expected, RelaxFailure):
        return
    try:
        single = DEFAULT.relax(first, relax_cell=relax_cell, on_insane=on_insane)
    except documented as exc:
        assert isinstance(expected, RelaxFailure), f"relax raised {exc!r}, relax_many succeeded"
        assert type(exc) is type(expected.error) and problem_of(exc) == problem_of(expected.error)
    else:
        assert not isinstance(expected, RelaxFailure), f"relax succeeded, relax_many failed with {expected.error!r}"
        _, p1, c1, _, _ = geometry(single)
        _, p2, c2, _, _ = geometry(expected)
        assert _same(p1, p2) and _same(c1, c2), "relax and relax_many disagree"
    assert_unchanged(first, before[0])


@FAST
@given(**crash_inputs)
def test_fuzz_documented_errors_only(batch, relax_cell, on_insane, decorate):
    check_no_crash(batch, relax_cell, on_insane, decorate, "crash-fast")


@pytest.mark.slow
@FULL_CRASH
@given(**crash_inputs)
def test_fuzz_documented_errors_only_full(batch, relax_cell, on_insane, decorate):
    check_no_crash(batch, relax_cell, on_insane, decorate, "crash-full")


# --- 4: rotation and permutation equivariance ----------------------------------------------------


equivariance_inputs = {"fuzzed": crystals_for(TINY, defects=False, regular=True), "seed": st.integers(0, 2**32 - 1)}


def _outcome(structure):
    try:
        return TINY.relax(structure)
    except InvalidStructureError as exc:
        return exc


def _transformed(atoms, rotation, permutation):
    out = atoms[permutation] if permutation is not None else atoms.copy()
    if rotation is not None:
        out.set_cell(atoms.cell.array @ rotation.T)
        out.positions = out.positions @ rotation.T
    return out


def _deviation(reference, output, rotation, permutation) -> tuple[float, float]:
    """Largest |output - P R reference| over positions, and over the cell (Å)."""
    positions, cell = reference.positions, reference.cell.array
    if permutation is not None:
        positions = positions[permutation]
    if rotation is not None:
        positions, cell = positions @ rotation.T, cell @ rotation.T
    return float(np.abs(output.positions - positions).max()), float(np.abs(output.cell.array - cell).max())


def check_equivariance(fuzzed, seed, test_name) -> None:
    """Rotate and permute at once (one extra forward pass); on failure, tell which broke."""
    COUNTS[test_name] += 1
    atoms = fuzzed.atoms
    rng = np.random.default_rng(seed)
    rotation = random_rotation(rng)
    permutation = rng.permutation(len(atoms))
    before = snapshot(atoms)
    reference = _outcome(atoms)
    assert_unchanged(atoms, before)
    both = _outcome(_transformed(atoms, rotation, permutation))
    if isinstance(reference, Exception):
        event("refused")
        assert isinstance(both, Exception), f"refused, but accepted once rotated and permuted: {reference}"
        return
    event(f"accepted, {fuzzed.layout}")
    assert not isinstance(both, Exception), f"accepted, but refused once rotated and permuted: {both}"
    if max(_deviation(reference, both, rotation, permutation)) <= EQUIVARIANCE_ATOL:
        return
    moved = np.abs(reference.positions - atoms.positions).max()
    for what, r, p in (("rotation", rotation, None), ("permutation", None, permutation), ("both", rotation, permutation)):
        output = _outcome(_transformed(atoms, r, p))
        if isinstance(output, Exception):
            pytest.fail(f"{what}: refused once transformed: {output}")
        positions, cell = _deviation(reference, output, r, p)
        assert max(positions, cell) <= EQUIVARIANCE_ATOL, (
            f"{what}: positions off by {positions:.3g} Å, cell by {cell:.3g} Å (the prediction moved atoms up to {moved:.3g} Å)"
        )


@FAST
@given(**equivariance_inputs)
def test_fuzz_equivariance(fuzzed, seed):
    check_equivariance(fuzzed, seed, "equivariance-fast")


@pytest.mark.slow
@FULL_EQUIVARIANCE
@given(**equivariance_inputs)
def test_fuzz_equivariance_full(fuzzed, seed):
    check_equivariance(fuzzed, seed, "equivariance-full")


def _as_atoms(arrays, like):
    return Atoms(numbers=arrays.numbers, positions=arrays.positions, cell=arrays.cell, pbc=like.pbc)


def check_invariance(fuzzed, seed, test_name) -> None:
    """One crystal, one answer through the relaxer: a translation that carries atoms across
    cell faces, a random unimodular basis, a 2x1x1 supercell and a reflection must give the
    same relaxed crystal (the checks of e3relax_ase.testing, on what users get)."""
    COUNTS[test_name] += 1
    atoms = fuzzed.atoms
    reference = _outcome(atoms)
    if isinstance(reference, Exception) or not atoms.pbc.all() or reference.info.get("e3relax_vacuum_axes"):
        event("skipped: refused, not 3D-periodic, or vacuum axes")
        return  # refusals are the equivariance property's; vacuum axes depend on the basis by design
    event(f"checked, {fuzzed.layout}")
    rng = np.random.default_rng(seed)
    cell_in, cell_out = atoms.cell.array, reference.cell.array
    crystal = arrays_of(atoms)

    def relaxed(arrays, what):
        out = _outcome(_as_atoms(arrays, atoms))
        assert not isinstance(out, Exception), f"{what}: refused once rewritten: {out}"
        return out.positions, out.cell.array

    def close(what, got, expected):
        error = float(np.abs(got - expected).max())
        assert error <= EQUIVARIANCE_ATOL, f"{what}: off by {error:.3g} Å"

    shift = rng.normal(size=3) * 2.0 + 0.5 * cell_in.sum(0)
    positions, cell = relaxed(CrystalArrays(crystal.numbers, crystal.positions + shift, cell_in, crystal.pbc), "translation")
    close("translation, cell", cell, cell_out)
    close("translation, positions", positions, reference.positions + shift @ np.linalg.solve(cell_in, cell_out))
    basis = random_unimodular(rng)
    # Vacuum is looked for along the lattice vectors as given (e3relax_ase.geometry.vacuum): a gap
    # between lattice planes that only another basis exposes as an axis is the known limit of
    # that rule (docs/reliability.md), not of the network, so such a basis is not compared.
    if find_vacuum(crystal.positions, basis @ cell_in, crystal.pbc, TINY.model.config.cutoff - ISOLATION_MARGIN) is None:
        positions, cell = relaxed(CrystalArrays(crystal.numbers, crystal.positions, basis @ cell_in, crystal.pbc), "basis")
        close("basis, cell", cell, basis @ cell_out)
        close("basis, positions", positions, reference.positions)
    else:
        event("basis skipped: vacuum along an axis of the other basis")
    if len(atoms) <= 16:
        big, copies = supercell(crystal, np.diag([2, 1, 1]))
        positions, cell = relaxed(big, "supercell")
        close("supercell, cell", cell, np.diag([2, 1, 1]) @ cell_out)
        close("supercell, positions", positions, reference.positions[copies[:, 0]] + copies[:, 1:] @ cell_out)
    mirror = random_rotation(rng, proper=False)
    positions, cell = relaxed(rotated(crystal, mirror), "reflection")
    close("reflection, cell", cell, cell_out @ mirror.T)
    close("reflection, positions", positions, reference.positions @ mirror.T)


@FAST
@given(**equivariance_inputs)
def test_fuzz_invariance(fuzzed, seed):
    check_invariance(fuzzed, seed, "invariance-fast")


@pytest.mark.slow
@FULL_INVARIANCE
@given(**equivariance_inputs)
def test_fuzz_invariance_full(fuzzed, seed):
    check_invariance(fuzzed, seed, "invariance-full")


# --- found by fuzzing ---------------------------------------------------------------------------

FAR_OUT = """
import sys
from ase import Atoms
from e3relax_ase.relax.relaxer import OneShotRelaxer
from e3relax_ase.testing import tiny_model
from e3relax_ase.geometry.validation import InvalidStructureError
atoms = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, float(sys.argv[1])]], cell=[3.0, 3.0, 10.0], pbc=[True, True, False])
try:
    OneShotRelaxer(tiny_model(), device="cpu").relax(atoms)
except InvalidStructureError as exc:
    print("refused:", exc)
else:
    print("accepted")
"""


def test_atom_far_out_along_a_vacuum_axis_does_not_kill_the_process():
    """In a subprocess, as the failure killed the interpreter (SIGFPE inside vesin-torch)."""
    result = subprocess.run([sys.executable, "-c", FAR_OUT, "1e6"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"exit code {result.returncode} (-8 is SIGFPE): {result.stderr[-300:]}"
    assert result.stdout.startswith(("refused:", "accepted"))
    assert "along vacuum axis 2" in result.stdout  # refused before the neighbour search
