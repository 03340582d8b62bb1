"""e3relax-ase: one-shot crystal relaxation with the E3Relax-H2 equivariant graph network.

Heavy submodules (torch, ase) are imported lazily so that ``import e3relax_ase`` and the
CLI's ``--help`` stay fast.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "OneShotRelaxer", "OneShotThenOptimize", "RefineOptions", "BatchBudget", "E3RelaxH2", "ModelConfig", "load_checkpoint"]

_LAZY = {
    "OneShotRelaxer": "e3relax_ase.relax.relaxer",
    "OneShotThenOptimize": "e3relax_ase.relax.optimizer",
    "RefineOptions": "e3relax_ase.relax.items",
    "BatchBudget": "e3relax_ase.relax.items",
    "E3RelaxH2": "e3relax_ase.nn.model",
    "ModelConfig": "e3relax_ase.config",
    "load_checkpoint": "e3relax_ase.io.checkpoint",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'e3relax_ase' has no attribute {name!r}")
