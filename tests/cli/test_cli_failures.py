"""CLI failure handling: one test per CLI row of docs/reliability.md, batch safety, atomic writes."""

import json
import os

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from click.testing import CliRunner

import e3relax_ase.relax.runner as runner_module
from e3relax_ase.cli.main import cli, main
from tests.cli_helpers import nacl, save_tiny_checkpoint
from tests.cli_helpers import run_relax as relax

REAL_PREDICT = runner_module.predict


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def cif_text():
    import io

    buffer = io.BytesIO()
    ase.io.write(buffer, nacl(), format="cif")
    return buffer.getvalue().decode()


def poscar_text():
    import io

    buffer = io.StringIO()
    ase.io.write(buffer, nacl(), format="vasp")
    return buffer.getvalue()


def extxyz_text(n_frames=2):
    import io

    buffer = io.StringIO()
    ase.io.write(buffer, [nacl(seed) for seed in range(n_frames)], format="extxyz")
    return buffer.getvalue()


def overlapping():
    atoms = nacl()
    atoms.positions[1] = atoms.positions[0] + [0.2, 0, 0]
    return atoms


# name, file name, content (str, or an Atoms written by ASE), expected message
BAD_INPUTS = [
    ("empty", "empty.cif", "", "file is empty"),
    ("corrupt-cif", "junk.cif", "this is not a CIF\n@@@ 1 2 3\n", "could not be read as cif"),
    ("truncated-cif", "cut.cif", cif_text()[:-40], "could not be read as cif"),
    ("truncated-cif-header", "head.cif", cif_text()[: len(cif_text()) // 3], "contains no structures"),
    ("truncated-poscar", "POSCAR_cut", poscar_text()[:-90], "could not be read as vasp"),
    ("truncated-extxyz", "cut.extxyz", extxyz_text(1)[:-150], "line 1: a frame of 8 atoms runs past the end of the file"),
    ("unknown-format", "notes.xyzq", "hello\n", "could not be read as xyzq"),
    ("no-extension-garbage", "mystery", "\x00\x01binary", "unknown structure format"),
    ("missing", "missing.cif", None, "no such file"),
    ("invalid-structure", "close.extxyz", overlapping(), "atoms 0 and 1 are 0.200 Å apart"),
]


@pytest.mark.parametrize("name, filename, content, expected", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_reported_others_written(tmp_path, checkpoint, name, filename, content, expected):
    good = tmp_path / "good.cif"
    ase.io.write(good, nacl())
    bad = tmp_path / filename
    if isinstance(content, str):
        bad.write_text(content)
    elif content is not None:
        ase.io.write(bad, content)
    before = set(os.listdir(tmp_path))
    result = relax([str(bad), str(good)], checkpoint)
    assert result.exit_code == 1
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(error_lines) == 1, result.stderr
    assert error_lines[0].startswith(f"ERROR: {bad}") and expected in error_lines[0]
    assert f"1 input(s) failed: {bad}" in result.stderr
    created = set(os.listdir(tmp_path)) - before
    assert created == {"good_relaxed.cif"}  # nothing for the bad one, no temporary files
    summary = json.loads(result.stdout)
    assert (summary["n_ok"], summary["n_failed"]) == (1, 1)
    failed = next(r for r in summary["results"] if r["status"] == "failed")
    assert expected in failed["error"] and failed["output"] is None


def test_bad_frame_in_multiframe_file(tmp_path, checkpoint):
    source = tmp_path / "frames.extxyz"
    ase.io.write(source, [nacl(0), overlapping(), nacl(2)])
    result = relax([str(source)], checkpoint)
    assert result.exit_code == 1
    assert f"ERROR: {source}@1: atoms 0 and 1" in result.stderr
    assert len(ase.io.read(tmp_path / "frames_relaxed.extxyz", ":")) == 2
    statuses = [r["status"] for r in json.loads(result.stdout)["results"]]
    assert statuses == ["ok", "failed", "ok"]


def test_exception_mid_batch_keeps_good_results(tmp_path, checkpoint, monkeypatch):
    def fragile(model, crystals, *args, **kwargs):
        if any(14 in c.numbers for c in crystals):
            raise RuntimeError("simulated kernel crash")
        return REAL_PREDICT(model, crystals, *args, **kwargs)

    monkeypatch.setattr(runner_module, "predict", fragile)
    paths = []
    for i, atoms in enumerate([nacl(0), bulk("Si", cubic=True), nacl(1), bulk("Cu", cubic=True)]):
        paths.append(tmp_path / f"s{i}.cif")
        ase.io.write(paths[-1], atoms)
    result = relax([*map(str, paths), "--batch-size", "8"], checkpoint)
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert [r["status"] for r in summary["results"]] == ["ok", "failed", "ok", "ok"]
    assert "simulated kernel crash" in summary["results"][1]["error"]
    assert sorted(p for p in os.listdir(tmp_path) if "relaxed" in p) == ["s0_relaxed.cif", "s2_relaxed.cif", "s3_relaxed.cif"]


def test_never_overwrites_an_input(tmp_path, checkpoint):
    source = tmp_path / "a.cif"
    ase.io.write(source, nacl())
    before = source.read_bytes()
    result = relax([str(source), "-o", str(source)], checkpoint)
    assert result.exit_code == 1 and "refusing to write over an input file" in result.stderr
    result = relax([str(source), "--suffix", ""], checkpoint)
    assert result.exit_code == 1 and "refusing to write over an input file" in result.stderr
    assert source.read_bytes() == before


def test_colliding_outputs(tmp_path, checkpoint):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        ase.io.write(tmp_path / folder / "a.cif", nacl())
    result = relax([str(tmp_path / "x" / "a.cif"), str(tmp_path / "y" / "a.cif"), "-o", str(tmp_path / "out")], checkpoint)
    assert result.exit_code == 1 and "would also be written for" in result.stderr
    assert os.listdir(tmp_path / "out") == ["a.cif"]


def test_write_failure_reported(tmp_path, checkpoint, monkeypatch):
    from e3relax_ase.io import files as fileio

    real_write = ase.io.write

    def flaky(filename, images, format=None, **kwargs):
        if format == "cif":
            raise OSError("disk full")
        return real_write(filename, images, format=format, **kwargs)

    monkeypatch.setattr(ase.io, "write", flaky)
    source = tmp_path / "a.extxyz"
    real_write(source, nacl())
    result = relax([str(source), "--format", "cif"], checkpoint)
    assert result.exit_code == 1 and "could not be written: disk full" in result.stderr
    assert [p for p in os.listdir(tmp_path) if p != "a.extxyz"] == []
    assert fileio  # the module under test writes through ase.io.write


def test_interrupt_while_writing_leaves_no_partial_file(tmp_path, checkpoint, monkeypatch, capsys):
    from e3relax_ase.io import files as fileio

    def interrupted(target, frames, fmt, symprec):
        with open(target, "w") as handle:
            handle.write("data_half_written\n_cell_length_a 5.6")
        raise KeyboardInterrupt

    source = tmp_path / "a.cif"
    ase.io.write(source, nacl())
    (tmp_path / "a_relaxed.cif").write_text("previous complete result")
    monkeypatch.setattr(fileio, "_write_frames", interrupted)
    code = main(["relax", str(source), "--checkpoint", checkpoint, "--overwrite"])
    assert code == 130
    assert sorted(os.listdir(tmp_path)) == ["a.cif", "a_relaxed.cif"]
    assert (tmp_path / "a_relaxed.cif").read_text() == "previous complete result"


def test_main_returns_nonzero_and_names_failures(tmp_path, checkpoint, capsys):
    good = tmp_path / "good.cif"
    ase.io.write(good, nacl())
    code = main(["relax", str(good), str(tmp_path / "nope.cif"), "--checkpoint", checkpoint])
    assert code == 1
    assert f"1 input(s) failed: {tmp_path / 'nope.cif'}" in capsys.readouterr().err
    assert (tmp_path / "good_relaxed.cif").exists()


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--checkpoint", "/no/such/checkpoint.pt"], 1, "neither a registered name"),
        (["--format", "nonsense"], 2, "unknown format 'nonsense'"),
        (["--refine", "nonsense"], 2, "unknown calculator 'nonsense'"),
        (["--device", "cuda:7"], 1, "not available"),
    ],
)
def test_bad_options(tmp_path, args, code, message):
    if "cuda:7" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA present")
    source = tmp_path / "a.cif"
    ase.io.write(source, nacl())
    result = CliRunner().invoke(cli, ["relax", str(source), *args])
    assert result.exit_code == code
    assert message in result.stderr
    assert not (tmp_path / "a_relaxed.cif").exists()


def test_deterministic_output_bits(tmp_path, checkpoint):
    """Identical input, identical output bytes, alone or among other inputs (CPU, float64)."""
    source = tmp_path / "a.extxyz"
    ase.io.write(source, nacl())
    others = []
    for i in range(3):
        others.append(tmp_path / f"o{i}.extxyz")
        ase.io.write(others[-1], nacl(10 + i))
    outputs = []
    for run_index, inputs in enumerate([[source], [source], [others[0], source, *others[1:]]]):
        out = tmp_path / f"run{run_index}"
        assert relax([*map(str, inputs), "-o", str(out) + os.sep, "--dtype", "float64", "--batch-size", "1"], checkpoint).exit_code == 0
        outputs.append(ase.io.read(out / "a.extxyz"))
    for other in outputs[1:]:
        assert np.array_equal(other.positions, outputs[0].positions)
        assert np.array_equal(other.cell.array, outputs[0].cell.array)
