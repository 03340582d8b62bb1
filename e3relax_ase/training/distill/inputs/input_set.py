"""A made input set: its summary, its planned splits, and the files it is written as.

What :func:`e3relax_ase.training.distill.inputs.plan.make_input_set` returns becomes the
compact inputs file, its ``.info.json.gz`` sidecar and its ``.manifest.json`` (described in
:mod:`e3relax_ase.training.distill.inputs.plan`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from e3relax_ase.training.distill.inputs.plan import LARGE_ATOMS, InputPlan

logger = logging.getLogger(__name__)


def summarize(results: list) -> dict:
    """Counts per generator, element, size bin and split of made inputs."""
    from ase.data import chemical_symbols

    n_atoms = np.array([len(r[1]) for r in results])
    elements: Counter = Counter()
    for r in results:
        elements.update(chemical_symbols[z] for z in set(r[1].tolist()))
    bins = [1, 8, 16, 24, 32, 48, 64, 10**9]
    hist = np.histogram(n_atoms, bins=bins)[0] if len(n_atoms) else np.zeros(len(bins) - 1, dtype=int)
    return {
        "inputs": len(results),
        "atoms": int(n_atoms.sum()),
        "atoms_per_input_median": float(np.median(n_atoms)) if len(n_atoms) else None,
        "share_more_than_24_atoms": round(float(np.mean(n_atoms > LARGE_ATOMS)), 4) if len(n_atoms) else None,
        "per_generator": dict(Counter(r[4]["generator"]["name"] for r in results)),
        "per_kind": dict(Counter(r[4]["generator"].get("kind") for r in results)),
        "per_size": {f"{bins[i]}-{bins[i + 1] - 1}" if i < len(bins) - 2 else f">={bins[i]}": int(h) for i, h in enumerate(hist)},
        "per_element": dict(sorted(elements.items())),
        "elements_min": min(elements.values()) if elements else 0,
        "per_split": dict(Counter(r[4].get("split") for r in results)),
    }


def assign_splits(results: list, existing_dir, fractions=(0.9, 0.05, 0.05), seed: int = 0) -> None:
    """Write each input's planned split into its info by ``splits.assign_systems_keeping``.

    Systems already in ``existing_dir``'s train/val/test keep that split; new systems are
    shared out by ``fractions``, so a pair made from the input can join the split without
    ever putting a test chemistry into training.
    """
    from e3relax_ase.training.data.pairs import load_pairs
    from e3relax_ase.training.data.splits import DEFAULT_NAMES, assign_systems_keeping, chemical_systems

    existing_dir = Path(existing_dir)
    existing = {name: chemical_systems(load_pairs(existing_dir / f"{name}.npz")) for name in DEFAULT_NAMES if (existing_dir / f"{name}.npz").exists()}
    if not existing:
        raise FileNotFoundError(f"no train/val/test.npz in {existing_dir}")
    index = assign_systems_keeping([r[4]["chemical_system"] for r in results], existing, fractions, seed)
    for r, i in zip(results, index):
        r[4]["split"] = DEFAULT_NAMES[int(i)]


def content_sha256(arrays: dict) -> str:
    """sha256 over the arrays' names, dtypes, shapes and bytes (the npz file itself carries
    zip timestamps, so its own hash changes with the time it was written)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def write_input_set(path, results: list, plan: InputPlan, report: dict, extra: dict | None = None) -> dict:
    """Write the inputs file, its sidecar and its manifest (see module docstring).

    Returns:
        the manifest.
    """
    from e3relax_ase import __version__
    from e3relax_ase.io.files import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = np.array([f"{plan.id_prefix}{r[0]:06d}" for r in results])
    n_atoms = np.array([len(r[1]) for r in results], dtype=np.int64)
    arrays = {
        "ids": ids,
        "n_atoms": n_atoms,
        "offsets": np.concatenate([[0], np.cumsum(n_atoms)]).astype(np.int64),
        "numbers": np.concatenate([r[1] for r in results]).astype(np.uint8),
        "positions": np.concatenate([r[2] for r in results]).astype(np.float32),
        "cells": np.stack([r[3] for r in results]).astype(np.float32),
    }
    # allow_pickle=True is numpy's default, spelled out so that mypy does not match **arrays against it.
    atomic_write(path, lambda f: np.savez_compressed(f, allow_pickle=True, **arrays), binary=True, suffix=".npz")
    sidecar = {str(i): r[4] for i, r in zip(ids, results)}
    atomic_write(Path(f"{path}.info.json.gz"), lambda f: f.write(gzip.compress(json.dumps(sidecar).encode(), mtime=0)), binary=True)
    manifest = {
        "format": "e3relax-inputs (scripts/distill_gpu.py relax reads it)",
        "package_version": __version__,
        "plan": plan.as_dict(),
        "report": report,
        "summary": summarize(results),
        "content_sha256": content_sha256(arrays),
        "bytes": path.stat().st_size,
        **(extra or {}),
    }
    atomic_write(Path(f"{path}.manifest.json"), lambda f: f.write(json.dumps(manifest, indent=1)))
    return manifest
