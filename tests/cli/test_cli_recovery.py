"""No result lost, none mislabelled (issue 20): frame-level reading of damaged files, outputs
streamed chunk by chunk and resumed frame by frame, provenance that survives the formats we
write, outputs never replaced unless asked, one run per output, CIF sites as listed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
from click.testing import CliRunner

from e3relax_ase.cli.main import cli
from e3relax_ase.io import structures
from e3relax_ase.io.claims import lock_path
from e3relax_ase.io.files import write_atomic
from e3relax_ase.io.streamed import parts_dir
from tests.cli_helpers import nacl, save_tiny_checkpoint
from tests.cli_helpers import run_relax as relax
from tests.paths import ROOT

pytestmark = pytest.mark.usefixtures("one_blas_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def write_frames(path, n_frames):
    ase.io.write(path, [nacl(seed) for seed in range(n_frames)], format="extxyz")


LINES_PER_FRAME = 10  # an 8-atom NaCl frame: count line, comment line, 8 atom lines


def test_damaged_frames_cost_only_themselves(tmp_path, checkpoint):
    """A non-number in frame 10 and a short line in frame 50 of a 60-frame file: the 58 good
    frames are relaxed, each failure names its frame and line, and every output frame says which
    input frame it is (before, the whole file was refused without a frame or line)."""
    source = tmp_path / "many.extxyz"
    write_frames(source, 60)
    lines = source.read_text().split("\n")
    bad_number = 10 * LINES_PER_FRAME + 2 + 3
    lines[bad_number] = lines[bad_number].replace(lines[bad_number].split()[2], "1.2.3", 1)
    short = 50 * LINES_PER_FRAME + 2 + 5
    lines[short] = " ".join(lines[short].split()[:3])
    source.write_text("\n".join(lines))

    result = relax([str(source)], checkpoint)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert errors == [
        f"ERROR: {source}@10: line {bad_number + 1}: '1.2.3' is not a valid number",
        f"ERROR: {source}@50: line {short + 1}: an atom line with 3 values where the frame's Properties need 4",
    ]
    relaxed = ase.io.read(tmp_path / "many_relaxed.extxyz", ":")
    indices = [int(frame.info["e3relax_index"]) for frame in relaxed]
    assert indices == [i for i in range(60) if i not in (10, 50)]
    assert {frame.info["e3relax_source"] for frame in relaxed} == {str(source)}
    summary = json.loads(result.stdout)
    assert [r["index"] for r in summary["results"]] == list(range(60))
    assert [r["index"] for r in summary["results"] if r["status"] == "failed"] == [10, 50]
    # Output frame k is the relaxation of input frame indices[k]: the same as relaxing it alone.
    alone = tmp_path / "alone.extxyz"
    ase.io.write(alone, nacl(11))
    assert relax([str(alone), "-o", str(tmp_path / "alone_out.extxyz")], checkpoint).exit_code == 0
    assert np.array_equal(ase.io.read(tmp_path / "alone_out.extxyz").positions, relaxed[10].positions)


def every_info_key() -> dict:
    """A value of the right type for every provenance key the package declares."""
    values = {}
    for name, key in vars(structures).items():
        if not name.startswith("INFO_") or name == "INFO_PREFIX":
            continue
        values[key] = {
            "e3relax_problems": "",  # what every sane result carries: the key that broke extxyz
            "e3relax_model": "e3relax-h2-f128",
            "e3relax_checkpoint_sha256": "4b3846b5b077f8e3d2e28cd31fda4ac56dd4d3211ba83f6fc6a3556cfa7559bd",
            "e3relax_version": "0.1.0",
            "e3relax_precision": "tf32",
            "e3relax_refine_calculator": "EMT",
            "e3relax_vacuum_axes": "a,c",
            "e3relax_source": "data/in put.extxyz",
        }.get(key)
        if values[key] is None:
            kind = {"bool": True, "int": 7, "float": 0.9612345678901234, "str": "x"}
            comment = Path(structures.__file__).read_text().split(f'"{key}"', 1)[1].split("|", 1)[0]
            values[key] = kind[comment.split("#", 1)[1].strip()]
    return values


@pytest.mark.parametrize("fmt", ["extxyz", "traj"])
def test_every_provenance_key_survives_extxyz_and_traj(tmp_path, fmt):
    atoms = nacl()
    info = every_info_key()
    assert len(info) >= 25 and info["e3relax_problems"] == ""
    atoms.info.update(info)
    path = tmp_path / f"out.{fmt}"
    write_atomic(path, [atoms], fmt)
    back = ase.io.read(path, format=fmt).info
    for key, value in info.items():
        if fmt == "extxyz" and value == "":
            assert key not in back  # omitted: ASE writes an empty string as a bare "key=", which corrupts what follows
        else:
            assert back[key] == value and type(np.asarray(back[key]).item()) is type(value), key  # ASE reads numpy scalars


def test_sane_results_keep_every_key_in_extxyz(tmp_path, checkpoint):
    """Every sane result carries e3relax_problems="": written as extxyz, the key after it was
    lost and the problems key read back holding its text."""
    source = tmp_path / "in.extxyz"
    write_frames(source, 2)
    assert relax([str(source)], checkpoint).exit_code == 0
    for frame in ase.io.read(tmp_path / "in_relaxed.extxyz", ":"):
        assert "e3relax_problems" not in frame.info and frame.info["e3relax_sane"] is True
        assert isinstance(frame.info["e3relax_correction_ratio"], float)
        assert frame.info["e3relax_source"] == str(source)


def test_interrupted_run_keeps_finished_chunks_and_resume_finishes_the_rest(tmp_path, checkpoint, monkeypatch):
    import e3relax_ase.relax.relaxer as relaxer_module

    source = tmp_path / "big.extxyz"
    write_frames(source, 10)
    reference = tmp_path / "reference.extxyz"
    assert relax([str(source), "-o", str(reference), "--chunk-size", "3"], checkpoint).exit_code == 0

    real = relaxer_module.OneShotRelaxer.relax_many
    calls = []

    def stopping(self, structures, **kwargs):
        structures = list(structures)
        calls.append(len(structures))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, structures, **kwargs)

    monkeypatch.setattr(relaxer_module.OneShotRelaxer, "relax_many", stopping)
    output = tmp_path / "out.extxyz"
    result = relax([str(source), "-o", str(output), "--chunk-size", "3"], checkpoint)
    assert result.exit_code == 1 and not output.exists()  # interrupted in its third chunk
    parts = parts_dir(output)
    manifests = sorted(parts.glob("part-*.json"))
    assert [json.loads(m.read_text())["frames"] for m in manifests] == [[0, 1, 2], [3, 4, 5]]
    assert not lock_path(output).exists()

    result = relax([str(source), "-o", str(output), "--chunk-size", "3"], checkpoint)
    assert result.exit_code == 1 and "--resume continues them, --overwrite discards them" in result.stderr
    calls.clear()
    result = relax([str(source), "-o", str(output), "--chunk-size", "3", "--resume"], checkpoint)
    assert result.exit_code == 0, result.stderr
    assert calls == [3, 1]  # frames 6-9 only
    assert output.read_bytes() == reference.read_bytes()
    assert [r["status"] for r in json.loads(result.stdout)["results"]] == ["skipped"] * 6 + ["ok"] * 4
    assert sorted(os.listdir(tmp_path)) == ["big.extxyz", "out.extxyz", "reference.extxyz"]


def test_resume_after_a_stop_between_the_last_chunk_and_the_join(tmp_path, checkpoint, monkeypatch):
    from e3relax_ase.io.streamed import StreamedOutput

    source = tmp_path / "in.extxyz"
    write_frames(source, 5)
    reference = tmp_path / "reference.extxyz"
    assert relax([str(source), "-o", str(reference)], checkpoint).exit_code == 0
    real_finish = StreamedOutput.finish

    def stop(self, replace):
        raise KeyboardInterrupt

    monkeypatch.setattr(StreamedOutput, "finish", stop)
    output = tmp_path / "out.extxyz"
    assert relax([str(source), "-o", str(output), "--chunk-size", "2"], checkpoint).exit_code == 1
    assert not output.exists() and len(list(parts_dir(output).glob("part-*.json"))) == 3  # every frame done, not joined
    monkeypatch.setattr(StreamedOutput, "finish", real_finish)
    result = relax([str(source), "-o", str(output), "--resume"], checkpoint)
    assert result.exit_code == 0 and output.read_bytes() == reference.read_bytes()
    assert not parts_dir(output).exists()


def test_resume_refuses_parts_made_with_other_settings(tmp_path, checkpoint):
    source = tmp_path / "in.extxyz"
    write_frames(source, 4)
    output = tmp_path / "out.extxyz"
    parts = parts_dir(output)
    parts.mkdir()
    (parts / "run.json").write_text(json.dumps({"input": "somewhere else"}))
    result = relax([str(source), "-o", str(output), "--resume"], checkpoint)
    assert result.exit_code == 1 and "made from another version of the input or with other settings" in result.stderr
    assert relax([str(source), "-o", str(output), "--overwrite"], checkpoint).exit_code == 0
    assert not parts.exists() and len(ase.io.read(output, ":")) == 4


def _kill_at_random_points(tmp_path, checkpoint, n_kills, seed):
    """Run the CLI as a process on a 60-frame input, SIGKILL it at random moments, check what
    each kill left, resume, and at the end compare with an uninterrupted run."""
    rng = np.random.default_rng(seed)
    source = tmp_path / "in.extxyz"
    write_frames(source, 60)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "e3relax_ase", "relax", str(source), "--checkpoint", checkpoint, "--chunk-size", "2", "-q"]
    reference = tmp_path / "reference.extxyz"
    subprocess.run([*base, "-o", str(reference)], check=True, env=env, cwd=tmp_path, timeout=300)
    expected = {int(f.info["e3relax_index"]): f.positions.copy() for f in ase.io.read(reference, ":")}
    output = tmp_path / "out.extxyz"
    parts = parts_dir(output)
    kills = 0
    while kills < n_kills:
        committed = len(list(parts.glob("part-*.json"))) if parts.exists() else 0
        process = subprocess.Popen([*base, "-o", str(output), "--resume"], env=env, cwd=tmp_path, stderr=subprocess.DEVNULL)
        if rng.random() < 0.8:  # most kills once this run writes chunks, the others at any moment
            deadline = time.monotonic() + 60
            while process.poll() is None and time.monotonic() < deadline:
                if parts.exists() and len(list(parts.glob("part-*.json"))) > committed:
                    break
                time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait(timeout=60)
        if output.exists():  # a complete output, or nothing: it appears in one rename
            assert output.read_bytes() == reference.read_bytes()
            output.unlink()  # and start again: more kills
            continue
        seen = []
        for manifest in parts.glob("part-*.json") if parts.exists() else []:
            entry = json.loads(manifest.read_text())
            frames = ase.io.read(parts / entry["data"], ":")
            assert [int(f.info["e3relax_index"]) for f in frames] == entry["frames"]
            for frame in frames:
                assert np.array_equal(frame.positions, expected[int(frame.info["e3relax_index"])])
            seen += entry["frames"]
        assert len(seen) == len(set(seen))  # each frame once
    done = subprocess.run([*base, "-o", str(output), "--resume"], env=env, cwd=tmp_path, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert output.read_bytes() == reference.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["in.extxyz", "out.extxyz", "reference.extxyz"]  # no parts, lock or temporary file


def test_sigkill_at_random_points_leaves_complete_frames_each_once(tmp_path, checkpoint):
    _kill_at_random_points(tmp_path, checkpoint, n_kills=3, seed=1)


@pytest.mark.slow
def test_sigkill_twenty_times(tmp_path, checkpoint):
    _kill_at_random_points(tmp_path, checkpoint, n_kills=20, seed=2)


def test_an_existing_file_is_never_replaced_without_overwrite(tmp_path, checkpoint):
    source = tmp_path / "a.cif"
    ase.io.write(source, nacl())
    unrelated = tmp_path / "notes.cif"
    unrelated.write_text("my notes, not a result")
    result = relax([str(source), "-o", str(unrelated)], checkpoint)
    assert result.exit_code == 1
    assert f"{unrelated} exists (this run did not write it); --overwrite replaces it, --resume keeps it" in result.stderr
    assert unrelated.read_text() == "my notes, not a result"
    assert relax([str(source), "-o", str(unrelated), "--overwrite"], checkpoint).exit_code == 0
    assert len(ase.io.read(unrelated)) == 8


def test_a_file_appearing_during_the_run_is_not_replaced(tmp_path, checkpoint, monkeypatch):
    from e3relax_ase.io import files as fileio

    source = tmp_path / "a.cif"
    ase.io.write(source, nacl())
    output = tmp_path / "a_relaxed.cif"
    real = fileio._write_frames

    def meanwhile(target, frames, fmt, symprec):
        output.write_text("written by someone else meanwhile")
        real(target, frames, fmt, symprec)

    monkeypatch.setattr(fileio, "_write_frames", meanwhile)
    result = relax([str(source)], checkpoint)
    assert result.exit_code == 1 and "appeared while this run was working" in result.stderr
    assert output.read_text() == "written by someone else meanwhile"


def test_a_second_run_on_the_same_output_is_refused(tmp_path, checkpoint):
    source = tmp_path / "a.cif"
    ase.io.write(source, nacl())
    output = tmp_path / "out.cif"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stands for the first run
    try:
        import socket

        lock_path(output).write_text(json.dumps({"run": "first", "host": socket.gethostname(), "pid": other.pid}))
        result = relax([str(source), "-o", str(output)], checkpoint)
        assert result.exit_code == 1
        assert f"{output} is being written by another e3relax-ase run (process {other.pid}" in result.stderr
        assert not output.exists()
    finally:
        other.kill()
        other.wait()
    result = relax([str(source), "-o", str(output)], checkpoint)  # its process is gone: a stale lock
    assert result.exit_code == 0 and "taking over the lock" in result.stderr
    assert output.exists() and not lock_path(output).exists()


def test_two_concurrent_runs_on_one_output_are_not_both_written(tmp_path, checkpoint):
    source = tmp_path / "in.extxyz"
    write_frames(source, 30)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "e3relax_ase", "relax", str(source), "--checkpoint", checkpoint, "-o", str(tmp_path / "out.extxyz")]
    runs = [subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    for run in runs:
        run.stderr.close()
    assert sorted(code for code, _ in outcomes) == [0, 1], outcomes
    loser = next(err for code, err in outcomes if code == 1)
    assert "is being written by another e3relax-ase run" in loser or "exists (this run did not write it)" in loser


def test_cif_with_a_duplicated_site_is_reported_not_merged(tmp_path, checkpoint):
    block = """data_{name}
_cell_length_a 5.64
_cell_length_b 5.64
_cell_length_c 5.64
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'F m -3 m'
_symmetry_Int_Tables_number 225
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_occupancy
Na1 Na 0.0 0.0 0.0 1.0
Cl1 Cl 0.5 0.5 0.5 1.0
{extra}"""
    source = tmp_path / "two.cif"
    source.write_text(block.format(name="good", extra="") + block.format(name="dup", extra="Na2 Na 0.5 0.5 0.0 1.0\n"))
    result = relax([str(source), "--format", "extxyz"], checkpoint)
    assert result.exit_code == 1
    assert (
        f"ERROR: {source}@1: the block at line 19: sites Na1 and Na2 (rows 1 and 3 of _atom_site) are the same site "
        "(a duplicated row), which a reader merges into one atom"
    ) in result.stderr
    relaxed = ase.io.read(tmp_path / "two_relaxed.extxyz", ":")
    assert len(relaxed) == 1 and len(relaxed[0]) == 8


def test_an_empty_folder_among_the_inputs_is_reported(tmp_path, checkpoint):
    (tmp_path / "empty").mkdir()
    source = tmp_path / "a.cif"
    ase.io.write(source, nacl())
    result = relax([str(tmp_path / "empty"), str(source)], checkpoint)
    assert result.exit_code == 1
    assert f"ERROR: {tmp_path / 'empty'}: folder holds no structure files" in result.stderr
    assert (tmp_path / "a_relaxed.cif").exists()


# --- fuzz: damaged multi-frame files ---------------------------------------------------------------


def _frame_spans(data: bytes, n_frames: int) -> list[tuple[int, int]]:
    """Byte range of each frame (with the newline before it: a frame is intact only if it is
    still cut off from the one before)."""
    ends = [i for i, byte in enumerate(data) if byte == 10]
    spans = []
    for k in range(n_frames):
        first_line, last_line = k * LINES_PER_FRAME, (k + 1) * LINES_PER_FRAME - 1
        start = ends[first_line - 1] if first_line else 0
        spans.append((start, ends[last_line] + 1))
    return spans


def _damage(data: bytes, rng) -> tuple[bytes, list[int]]:
    """Random byte edits, insertions and deletions, or a truncation; the positions touched (in
    the undamaged file)."""
    if rng.random() < 0.25:
        cut = int(rng.integers(1, len(data)))
        return data[:cut], list(range(cut, len(data)))
    edits = sorted({int(at) for at in rng.integers(0, len(data), size=int(rng.integers(1, 4)))}, reverse=True)
    damaged = bytearray(data)
    for at in edits:  # from the end: each position stays one of the undamaged file
        kind = rng.integers(0, 3)
        if kind == 0:
            damaged[at] = int(rng.choice([ord("x"), ord("\n"), ord(" "), ord("9"), 0xFF, ord("-")]))
        elif kind == 1:
            damaged.insert(at, int(rng.choice([ord("\n"), ord("7"), ord("#")])))
        else:
            del damaged[at]
    return bytes(damaged), edits


def _fuzz_corrupted_files(tmp_path, checkpoint, n_files, seed):
    """Every frame the damage did not touch must come out, labelled with its own index and
    equal to the relaxation of that frame; no traceback; the exit code says whether any failed."""
    rng = np.random.default_rng(seed)
    n_frames = 12
    pristine = tmp_path / "pristine.extxyz"
    write_frames(pristine, n_frames)
    data = pristine.read_bytes()
    spans = _frame_spans(data, n_frames)
    reference = tmp_path / "reference.extxyz"
    assert relax([str(pristine), "-o", str(reference)], checkpoint).exit_code == 0
    expected = {int(f.info["e3relax_index"]): f for f in ase.io.read(reference, ":")}
    n_recovered = 0
    for case in range(n_files):
        damaged, touched = _damage(data, rng)
        source = tmp_path / f"damaged_{case}.extxyz"
        source.write_bytes(damaged)
        result = CliRunner().invoke(cli, ["relax", str(source), "--checkpoint", checkpoint, "--json", "-q"], catch_exceptions=False)
        assert result.exit_code in (0, 1), result.output
        assert "Traceback" not in result.stderr
        output = tmp_path / f"damaged_{case}_relaxed.extxyz"
        relaxed = ase.io.read(output, ":") if output.exists() else []
        labels = [int(f.info["e3relax_index"]) for f in relaxed]
        assert len(labels) == len(set(labels)) and labels == sorted(labels)
        intact = [k for k, (start, end) in enumerate(spans) if not any(start <= at < end for at in touched)]
        for k in intact:  # before and after the damage
            assert k in labels, (case, k, labels, result.stderr)
            assert np.array_equal(relaxed[labels.index(k)].positions, expected[k].positions)
        n_recovered += sum(1 for k in intact if k > min(touched) // (len(data) // n_frames + 1))
        summary = json.loads(result.stdout)
        assert summary["n_ok"] == len(relaxed)
        assert (result.exit_code == 1) == (summary["n_failed"] > 0)
    assert n_recovered > 0  # frames after a damaged one were recovered, not only those before it


def test_fuzz_corrupted_multiframe_files(tmp_path, checkpoint):
    _fuzz_corrupted_files(tmp_path, checkpoint, n_files=12, seed=0)


@pytest.mark.slow
def test_fuzz_corrupted_multiframe_files_long(tmp_path, checkpoint):
    _fuzz_corrupted_files(tmp_path, checkpoint, n_files=300, seed=1)
