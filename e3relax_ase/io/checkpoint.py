"""Checkpoint files: config + weights + versions + metadata in one safely loadable file.

A checkpoint is a ``torch.save`` of a dict holding only tensors and plain Python values, so it
loads with ``torch.load(weights_only=True)``: a file carrying pickled code is refused, never run.

    {"format": "e3relax-ase-checkpoint", "format_version": 2,
     "config": {...ModelConfig fields...}, "state_dict": {name: tensor},
     "versions": {"e3relax_ase", "torch", "e3nn", "python"},
     "metadata": {free JSON-like: name, training data, metrics, licence, ...}}

Format version 2 added ``config["architecture"]``; a version-1 file holds the paper's
"axis-lattice" network (``model_axis_lattice``), the only one there was.

Shipped checkpoints are listed in ``checkpoints/registry.json`` (name -> file, sha256, ...).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from e3relax_ase import __version__
from e3relax_ase.config import ModelConfig
from e3relax_ase.nn.architectures import Network, build_model, is_basis_free

FORMAT_NAME = "e3relax-ase-checkpoint"
FORMAT_VERSION = 2
CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "checkpoints"  # e3relax_ase/checkpoints
REGISTRY_FILE = "registry.json"
# What a file written by torch.save starts with: a zip archive (torch >= 1.6), or a pickle
# (the legacy format, protocol 2 or later). Anything else is not a checkpoint at all.
_TORCH_FILE_MAGIC = (b"PK\x03\x04", b"\x80")

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which file and why."""


@dataclass
class CheckpointInfo:
    """What a loaded checkpoint says about itself."""

    path: str
    sha256: str
    config: ModelConfig
    versions: dict
    metadata: dict = field(default_factory=dict)
    name: str | None = None

    @property
    def untrained(self) -> bool:
        return bool(self.metadata.get("untrained", False))


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict:
    import e3nn

    return {"e3relax_ase": __version__, "torch": str(torch.__version__), "e3nn": str(e3nn.__version__), "python": platform.python_version()}


def save_checkpoint(path: str | os.PathLike, model: Network, metadata: dict | None = None) -> str:
    """Write a checkpoint atomically (temporary file, then rename); returns its sha256.

    Raises:
        CheckpointError: if ``metadata`` is not JSON-serialisable (it must load safely).
    """
    metadata = dict(metadata or {})
    try:
        json.dumps(metadata)
    except TypeError as exc:
        raise CheckpointError(f"checkpoint metadata must be JSON-serialisable: {exc}") from None
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "versions": _versions(),
        "metadata": metadata,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a checkpoint is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return file_sha256(path)


def read_registry(directory: str | os.PathLike = CHECKPOINT_DIR) -> dict:
    """The registry of shipped checkpoints: {"default": name, "checkpoints": {name: entry}}."""
    registry_path = Path(directory) / REGISTRY_FILE
    if not registry_path.exists():
        return {"default": None, "checkpoints": {}}
    with open(registry_path) as handle:
        return json.load(handle)


def resolve_checkpoint(checkpoint: str | os.PathLike) -> tuple[Path, str | None, str | None]:
    """Turn "default", a registry name or a path into (path, registry name, expected sha256).

    Raises:
        CheckpointError: unknown name or missing file.
    """
    text = str(checkpoint)
    registry = read_registry()
    entries = registry.get("checkpoints", {})
    name = registry.get("default") if text == "default" else text
    if name in entries:
        entry = entries[name]
        path = CHECKPOINT_DIR / entry["file"]
        if not path.exists():
            raise CheckpointError(f"checkpoint {name!r}: file {path} is missing from the installation")
        return path, name, entry.get("sha256")
    path = Path(text).expanduser()
    if path.is_file():
        return path, None, None
    known = ", ".join(sorted(entries)) or "none shipped"
    raise CheckpointError(f"checkpoint {text!r} is neither a registered name ({known}) nor an existing file")


def load_checkpoint(checkpoint: str | os.PathLike = "default", map_location="cpu", expected_sha256: str | None = None) -> tuple[Network, CheckpointInfo]:
    """Rebuild a model from a checkpoint (safe loading, strict weights, verified hash).

    Args:
        checkpoint: "default", a registry name, or a path.
        map_location: passed to ``torch.load``.
        expected_sha256: verify the file against it (registry entries are always verified).

    Returns:
        (model in eval mode, CheckpointInfo)

    Raises:
        CheckpointError: not a checkpoint of ours, corrupt or truncated, a newer format
            version, a hash mismatch, or weights that do not fit the stored config.
    """
    path, name, registry_sha = resolve_checkpoint(checkpoint)
    sha = file_sha256(path)
    expected = expected_sha256 or registry_sha
    if expected and sha != expected:
        raise CheckpointError(f"checkpoint {path}: sha256 mismatch, expected {expected}, found {sha}")
    with open(path, "rb") as handle:
        start = handle.read(16)
    if not start.startswith(_TORCH_FILE_MAGIC):
        what = f"it starts with {start.decode('ascii', 'replace').split()[0]!r}" if start.strip() else "it is empty or blank"
        raise CheckpointError(f"checkpoint {path} is not a checkpoint file (not written by torch.save; {what})")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt, truncated or unsafe files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = "it contains pickled Python objects, which are refused for safety"
        raise CheckpointError(f"checkpoint {path} could not be loaded: {reason}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise CheckpointError(f"checkpoint {path} is not an e3relax-ase checkpoint (no '{FORMAT_NAME}' header)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}, newer than this e3relax-ase reads ({FORMAT_VERSION}); upgrade e3relax-ase")
    try:
        config_values = dict(payload["config"])
        if version == 1:
            config_values.setdefault("architecture", "axis-lattice")
        config = ModelConfig.from_dict(config_values)
        model = build_model(config)
        model.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} does not fit its own config: {first}") from None
    model.eval()
    if not is_basis_free(config):
        logger.warning(
            "checkpoint %s holds the paper's axis-lattice network: its prediction depends on the lattice basis, "
            "supercells and where atoms are wrapped, and symmetric inputs lose their symmetry (kept to reproduce earlier results)",
            path,
        )
    info = CheckpointInfo(
        path=str(path),
        sha256=sha,
        config=config,
        versions=dict(payload.get("versions", {})),
        metadata=dict(payload.get("metadata", {})),
        name=name or _label_of_file(path, sha, payload.get("metadata", {}).get("name")),
    )
    return model, info


def _label_of_file(path: Path, sha: str, claimed_name) -> str:
    """The name results of a checkpoint given by path carry: the registry's name when the file
    is a registered one (same sha256), else the file's own name, with a warning.

    Why not the name stored in the file's metadata: a modified copy of a shipped checkpoint
    still says it is the shipped one, and its results would be mislabelled.
    """
    registered = read_registry().get("checkpoints", {})
    for entry_name, entry in registered.items():
        if entry.get("sha256") == sha:
            return entry_name
    label = path.name
    if claimed_name in registered:
        logger.warning(
            "checkpoint %s calls itself %r but its sha256 %s is not that registered checkpoint's (a modified or damaged copy?); its results are labelled %r",
            path,
            claimed_name,
            sha[:12],
            label,
        )
    else:
        logger.warning("checkpoint %s is not registered (sha256 %s); its results are labelled %r", path, sha[:12], label)
    return label
