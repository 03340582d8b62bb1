import numpy as np
import pytest
import torch

from e3relax_ase.testing import random_crystal, tiny_model

# Test tensors are tiny: one thread avoids OpenMP spin-waiting on a busy 2-core machine, which
# made single forward passes 100x slower here, and keeps CPU results bitwise reproducible.
torch.set_num_threads(1)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def model():
    return tiny_model(seed=0)


@pytest.fixture
def crystal(rng):
    return random_crystal(rng, n_atoms=6)


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_blas_thread():
    """BLAS limited to one thread for a module that runs ASE optimisers itself (the library
    does so around its own loops, e3relax_ase/relax/threads.py); threaded BLAS spin-waits on a busy
    2-core machine."""
    from e3relax_ase.relax.threads import single_threaded_blas

    with single_threaded_blas():
        yield
