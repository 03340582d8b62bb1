"""Structures in and out: ASE/pymatgen conversion and ``atoms.info`` keys (``structures``),
reading and writing files (``files``, ``frames``, ``cif_sites``, ``streamed``, ``claims``,
``provenance``) and checkpoints (``checkpoint``). Imports ``geometry`` and ``nn`` below it."""
