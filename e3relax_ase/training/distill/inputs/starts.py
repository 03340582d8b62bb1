"""Harder starting points: volume off by up to +-35 %, shear strain and rattles up to 0.3 Å.

Users' inputs from substitution, generative models and random search are often far from the
minimum; the v2 inputs were not (volume x0.85-1.2, strain <= 5 %, rattle <= 0.15 Å). Each
input gets, in this order and each drawn independently and uniformly:

1. an isotropic volume factor in ``volume_range`` (default 0.65-1.35);
2. a pure shear (off-diagonal strain components in ``[-s, s]``, s itself uniform in
   ``[0, max_shear]``);
3. a Gaussian rattle with standard deviation uniform in ``rattle_range`` Å.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from e3relax_ase.training.data.perturb import rattle, rescale_volume, shear

DEFAULT_VOLUME_RANGE = (0.65, 1.35)
DEFAULT_MAX_SHEAR = 0.15
DEFAULT_RATTLE_RANGE = (0.02, 0.3)


def hard_start(
    atoms,
    rng: np.random.Generator,
    volume_range: Sequence[float] = DEFAULT_VOLUME_RANGE,
    max_shear: float = DEFAULT_MAX_SHEAR,
    rattle_range: tuple[float, float] = DEFAULT_RATTLE_RANGE,
):
    """Perturb a crystal into a harder start (rule in the module docstring).

    Args:
        atoms: ``ase.Atoms`` (not modified).
        rng: random generator.
        volume_range: ``(low, high)`` bounds of the volume factor.
        max_shear: largest shear magnitude.
        rattle_range: ``(low, high)`` bounds of the rattle standard deviation, Å.

    Returns:
        ``(new_atoms, record)`` with record ``{"volume_factor", "shear", "rattle_stdev"}``
        (``shear`` the [3, 3] tensor as a list, rounded to 1e-6).
    """
    out, factor = rescale_volume(atoms, volume_range, rng)
    out, eps = shear(out, float(rng.uniform(0.0, max_shear)), rng)
    stdev = float(rng.uniform(*rattle_range))
    out = rattle(out, stdev, rng)
    return out, {"volume_factor": round(factor, 6), "shear": np.round(eps, 6).tolist(), "rattle_stdev": round(stdev, 6)}
