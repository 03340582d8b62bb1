"""The network class of each lattice design (``config.ARCHITECTURES``), built from a config."""

from __future__ import annotations

from typing import TypeAlias

from e3relax_ase.config import ModelConfig
from e3relax_ase.nn.model import E3RelaxH2
from e3relax_ase.nn.model_axis_lattice import AxisLatticeE3RelaxH2

# Either network: the two share ``config``, ``layers`` and ``forward(graph, message_passing=None)``.
Network: TypeAlias = E3RelaxH2 | AxisLatticeE3RelaxH2


def build_model(config: ModelConfig) -> Network:
    """A randomly initialised network of ``config.architecture``."""
    if config.architecture == "axis-lattice":
        return AxisLatticeE3RelaxH2(config)
    return E3RelaxH2(config)


def is_basis_free(config: ModelConfig) -> bool:
    """Whether the network's prediction depends on the crystal only, not on how it is written."""
    return config.architecture == "strain"
