"""``OneShotRelaxer(compile=True)``: the message passing compiled by torch.compile
(e3relax_ase.nn.compiled) gives the eager network's predictions to rounding, for batches of any
size after one compilation, without changing the model. On a CPU Inductor needs a C++ compiler
(the test is skipped without one); the CUDA test is gpu-marked."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from ase import Atoms

from e3relax_ase.nn.compiled import CompiledForward
from e3relax_ase.relax.relaxer import OneShotRelaxer
from e3relax_ase.testing import random_crystal, tiny_model


def _structures(n, seed=4):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        c = random_crystal(rng, n_atoms=int(rng.integers(2, 9)), skew=0.4)
        out.append(Atoms(c.numbers, positions=c.positions, cell=c.cell, pbc=True))
    return out


def _compare(device, dtype, tolerance):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model()
    eager = OneShotRelaxer(model, device=device, dtype=dtype, batch_size=5, cuda_graphs=False)
    compiled = OneShotRelaxer(model, device=device, dtype=dtype, batch_size=5, cuda_graphs=False, compile=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    structures = _structures(13)  # batches of 5, 5 and 3: sizes differ after the first compilation
    want = eager.relax_many(structures)
    got = compiled.relax_many(structures)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.positions, b.positions, rtol=0, atol=tolerance)
        np.testing.assert_allclose(a.cell.array, b.cell.array, rtol=0, atol=tolerance)
        assert a.info["e3relax_sane"] == b.info["e3relax_sane"]
    # The model is not changed: same parameters, same modules, its own forward still eager.
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(type(layer.message_passing).__name__ == "H2MessagePassing" for layer in model.layers)
    assert "compile=True" in repr(compiled)
    # One graph served every layer and every batch size: no recompilation per size.
    assert 1 <= counters["stats"]["unique_graphs"] <= 2


def test_compiled_forward_routes_every_batch_and_leaves_the_model_alone():
    model = tiny_model()
    runner = CompiledForward(model)
    assert runner.handles(None) and len(runner.message_passing) == len(model.layers)
    assert dict(model.named_modules()).keys() == dict(tiny_model().named_modules()).keys()


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="Inductor on a CPU needs a C++ compiler")
def test_compiled_relax_matches_eager_on_cpu():
    _compare("cpu", "float64", 1e-10)


@pytest.mark.gpu
def test_compiled_relax_matches_eager_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _compare("cuda", "float32", 1e-4)
