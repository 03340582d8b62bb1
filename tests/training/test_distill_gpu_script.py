"""scripts/distill_gpu.py on CPU: inputs with the per-element volume guess, and finalize over
several raw folders (the GPU step is replaced by its raw files, written by the script's own writer)."""

import gzip
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.paths import ROOT


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("distill_gpu", ROOT / "scripts" / "distill_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, script):
    folder = tmp_path_factory.mktemp("distill")
    volumes = folder / "volumes.json"
    script.main(["fit-volumes", "--pairs", str(ROOT / "data" / "sevennet0_distilled" / "train.npz"), "--out", str(volumes)])
    committed = ROOT / "data" / "sevennet0_distilled" / "element_volumes.json"
    assert json.loads(volumes.read_text()) == json.loads(committed.read_text())  # the committed fit is reproducible
    path = folder / "inputs.npz"
    # Seeds shipped with pymatgen (AFLOW prototypes) and ASE (dcdft): present wherever the package installs.
    script.main(
        ["make-inputs", "--n", "40", "--out", str(path), "--seed", "3", "--element-volumes", str(volumes), "--id-prefix", "t-", "--sources", "aflow,dcdft"]
    )
    return path


def _fake_run(script, inputs_path, out_dir: Path, indices):
    """What `relax` writes for these inputs if each converged where it started."""
    data = script._load_inputs(str(inputs_path))
    writer = script._RawWriter(out_dir, part_mib=13, positions_dtype="float64")
    for k in indices:
        a, b = data["offsets"][k], data["offsets"][k + 1]
        writer.add(
            SimpleNamespace(
                key=k,
                status="converged",
                n_steps=3,
                positions=data["positions"][a:b].astype(float),
                cell=data["cells"][k].astype(float),
                energy=-1.0,
                fmax=0.01,
                fmax_fresh=0.01,
            )
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    writer.flush()
    (out_dir / "relax_log.json").write_text(json.dumps({"device": {"gpu": "none", "sevenn": "test"}}))


def test_inputs_carry_the_volume_guess_for_compounds_only(inputs):
    with gzip.open(str(inputs) + ".info.json.gz", "rt") as f:
        sidecar = json.load(f)
    with np.load(inputs) as d:
        ids, offsets, numbers = d["ids"], d["offsets"], d["numbers"]
    assert all(i.startswith("t-") for i in ids)
    compounds = {str(i): len(set(numbers[offsets[k] : offsets[k + 1]].tolist())) > 1 for k, i in enumerate(ids)}
    guessed = {i for i, info in sidecar.items() if "volume_guess" in info["perturbation"]}
    assert guessed and guessed <= {i for i, c in compounds.items() if c}


def test_finalize_joins_raw_folders_and_refuses_an_input_relaxed_twice(tmp_path, script, inputs):
    _fake_run(script, inputs, tmp_path / "a", [0, 1, 2, 3])
    _fake_run(script, inputs, tmp_path / "b", [10, 11, 12])
    out = tmp_path / "pairs.npz"
    script.main(
        [
            "finalize",
            "--inputs",
            str(inputs),
            "--raw-dir",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--out",
            str(out),
            "--runlog",
            str(tmp_path / "RUNLOG.json"),
        ]
    )
    from e3relax_ase.training.data.pairs import load_pairs

    pairs = load_pairs(out)
    with np.load(inputs) as d:
        assert pairs.ids.tolist() == [str(d["ids"][k]) for k in (0, 1, 2, 3, 10, 11, 12)]
    runlog = json.loads((tmp_path / "RUNLOG.json").read_text())
    assert runlog["kept_pairs"] == 7 and len(runlog["relax_log"]["runs"]) == 2
    _fake_run(script, inputs, tmp_path / "c", [3, 4])  # input 3 again
    with pytest.raises(SystemExit, match="input 3 was already relaxed"):
        script.main(
            [
                "finalize",
                "--inputs",
                str(inputs),
                "--raw-dir",
                str(tmp_path / "a"),
                str(tmp_path / "c"),
                "--out",
                str(tmp_path / "twice.npz"),
                "--runlog",
                str(tmp_path / "R2.json"),
            ]
        )
