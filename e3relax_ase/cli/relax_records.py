"""What one ``e3relax-ase relax`` run records: the output rules every input shares, what became
of each frame (the ``--json`` entries), and which ``atoms.info`` keys those entries report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from e3relax_ase.io.structures import (
    INFO_CLUSTER,
    INFO_CONVERGED,
    INFO_CORRECTION_RATIO,
    INFO_FMAX,
    INFO_FMAX_ATOMS,
    INFO_FMAX_CELL,
    INFO_MAX_DISPLACEMENT,
    INFO_MAX_STRAIN,
    INFO_NSTEPS,
    INFO_PREFIX,
    INFO_PROBLEMS,
    INFO_REFINE_ADVISED,
    INFO_SANE,
    INFO_SPACEGROUP,
    INFO_SPACEGROUP_INPUT,
    INFO_VACUUM_AXES,
)

# --json field <- atoms.info key: the results each summary entry reports, every one under its
# info key less INFO_PREFIX (docs/relaxer.md lists them).
SUMMARY_KEYS = {
    key.removeprefix(INFO_PREFIX): key
    for key in (
        INFO_SANE,
        INFO_PROBLEMS,
        INFO_MAX_DISPLACEMENT,
        INFO_MAX_STRAIN,
        INFO_CORRECTION_RATIO,
        INFO_REFINE_ADVISED,
        INFO_SPACEGROUP_INPUT,
        INFO_SPACEGROUP,
        INFO_VACUUM_AXES,
        INFO_CLUSTER,
        INFO_CONVERGED,
        INFO_NSTEPS,
        INFO_FMAX,
        INFO_FMAX_ATOMS,
        INFO_FMAX_CELL,
    )
}


@dataclass
class OutputRules:
    """What the command line says about outputs, shared by every input of the run."""

    output: str | None  # -o
    suffix: str | None
    fmt: str | None  # --format
    overwrite: bool
    resume: bool
    symprec: float | None  # CIF only: write the symmetrized CIF
    identity: dict  # what results depend on besides the input (checkpoint, options): a resume must match
    run: str  # this run's id (claims)
    writes: bool  # this process writes (rank 0 of a torchrun job, or the only process)
    n_inputs: int
    inputs: set = field(default_factory=set)  # resolved input paths
    claimed: dict = field(default_factory=dict)  # resolved output -> the input writing it


@dataclass
class FrameRecord:
    """What became of one input frame (one entry of the --json summary)."""

    index: int | None  # None: the whole file (it could not be read, or was skipped)
    status: str  # "ok" | "failed" | "skipped"
    output: Path | None = None
    error: str | None = None
    values: dict = field(default_factory=dict)  # SUMMARY_KEYS fields


def json_value(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or inf
    return value


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
