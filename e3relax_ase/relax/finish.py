"""Finishing a structure: its judged prediction applied through its constraints (or refused,
by the call's ``on_insane``), optionally refined with real forces, and its provenance and
sanity keys written to ``atoms.info``; the caller's type returned."""

from __future__ import annotations

import logging
import os

from e3relax_ase import __version__
from e3relax_ase.io.checkpoint import CheckpointInfo
from e3relax_ase.io.structures import (
    INFO_CLUSTER,
    INFO_CORRECTION_RATIO,
    INFO_LAST_CORRECTION,
    INFO_LAYER,
    INFO_MAX_DISPLACEMENT,
    INFO_MAX_STRAIN,
    INFO_MODEL,
    INFO_PRECISION,
    INFO_PROBLEMS,
    INFO_REFINE_ADVISED,
    INFO_RELAX_CELL,
    INFO_SANE,
    INFO_SHA256,
    INFO_SPACEGROUP,
    INFO_SPACEGROUP_INPUT,
    INFO_UNTRAINED,
    INFO_VACUUM_AXES,
    INFO_VERSION,
    apply_prediction,
    clear_provenance,
    copy_atoms,
    from_atoms,
    spacegroup_number,
    vacuum_cell_mask,
)
from e3relax_ase.relax.items import Item, PredictionError, RelaxOptions
from e3relax_ase.relax.predict import Prediction
from e3relax_ase.relax.sanity import judge_prediction

logger = logging.getLogger(__name__)


class Finisher:
    """Finishes the structures of one relaxer (see the module docstring).

    Args:
        info: the checkpoint's ``CheckpointInfo`` (provenance).
        precision: the network's channel-mixing precision (recorded when not float32).
        min_distance: the closest two predicted atoms may be (Å) before a prediction is insane.
        cutoff: the network's cutoff (Å): a lower bound on pair distances validation did not see.
    """

    def __init__(self, info: CheckpointInfo, precision: str, min_distance: float, cutoff: float):
        self.info, self.precision, self.min_distance, self.cutoff = info, precision, min_distance, cutoff

    def closest(self, item: Item) -> float:
        """A lower bound on every input pair distance: validation's closest pair, or the cutoff."""
        return min(item.validated.min_distance, self.cutoff)

    def finish(self, item: Item, prediction: Prediction, options: RelaxOptions, verdict=None):
        """Sanity-check, apply, optionally refine, record provenance; return the caller's type.

        ``verdict``: the item's (SanityReport, Confidence) from ``sanity_batch.judge_batch`` (here or in
        a worker), or its exception; None judges it here alone (``judge_prediction``).
        """
        positions, cell = prediction.positions[-1], prediction.cell[-1]
        relax_cell = options.relax_cell and not item.keeps_cell
        if item.vacuum is not None and not item.vacuum.cluster:
            positions = positions - item.vacuum.translation  # back to the caller's images
        if verdict is None or relax_cell != options.relax_cell:  # an allowed cluster is judged keeping its box
            arrays = item.arrays
            verdict = judge_prediction(
                prediction.positions,
                prediction.cell,
                arrays.positions,
                arrays.cell,
                arrays.pbc,
                self.closest(item),
                relax_cell,
                self.min_distance,
            )
        elif isinstance(verdict, Exception):
            raise verdict
        sanity, signal = verdict
        use_prediction = sanity.ok or (options.on_insane == "warn" and "NaN" not in " ".join(sanity.problems))
        # The message names the structure, which may mean building its formula (not free): only
        # when it is raised or logged.
        if not sanity.ok and (options.on_insane == "raise" or logger.isEnabledFor(logging.WARNING)):
            message = f"{item.name}: prediction failed sanity checks: {'; '.join(sanity.problems)}"
            if options.on_insane == "raise":
                raise PredictionError(message)
            logger.warning("%s%s", message, "" if use_prediction else "; keeping the input geometry")

        atoms = item.atoms
        clear_provenance(atoms)
        symmetry, spacegroup_input = None, None
        if options.fix_symmetry:
            from ase.constraints import FixSymmetry

            spacegroup_input = spacegroup_number(atoms, options.symprec)
            symmetry = FixSymmetry(atoms, symprec=options.symprec)
            atoms.set_constraint(list(atoms.constraints) + [symmetry])
        if item.vacuum is not None:
            self.warn_vacuum(item)
        frames = None
        try:
            if use_prediction:
                apply_prediction(atoms, positions, cell, relax_cell)
            if options.return_trajectory:
                frames = self.frames(item, prediction, options, symmetry)
            if options.refine is not None:
                self.refine(item, atoms, options, relax_cell)
        finally:
            if symmetry is not None:
                atoms.set_constraint([c for c in atoms.constraints if c is not symmetry])

        info = atoms.info
        info.update(options.provenance)
        if relax_cell != options.relax_cell:
            info[INFO_RELAX_CELL] = relax_cell  # an allowed cluster kept its box
        info[INFO_MAX_DISPLACEMENT] = signal.max_displacement
        info[INFO_MAX_STRAIN] = signal.max_strain
        info[INFO_SANE] = bool(sanity.ok)
        info[INFO_PROBLEMS] = "; ".join(sanity.problems)
        info[INFO_CORRECTION_RATIO] = signal.correction_ratio
        info[INFO_LAST_CORRECTION] = signal.last_correction
        info[INFO_REFINE_ADVISED] = bool(signal.refine_advised or not sanity.ok)
        if item.vacuum is not None:
            info[INFO_VACUUM_AXES] = ",".join("abc"[axis] for axis in item.vacuum.axes)
            if item.vacuum.cluster:
                info[INFO_CLUSTER] = True
        if self.precision != "float32":
            info[INFO_PRECISION] = self.precision
        if options.fix_symmetry:
            info[INFO_SPACEGROUP_INPUT] = spacegroup_input
            info[INFO_SPACEGROUP] = spacegroup_number(atoms, options.symprec)
            if info[INFO_SPACEGROUP] != spacegroup_input:
                logger.warning("%s: space group changed from %d to %d despite fix_symmetry", item.name, spacegroup_input, info[INFO_SPACEGROUP])
        result = atoms if item.kind == "ase" else from_atoms(atoms, item.kind)
        return (result, frames) if options.return_trajectory else result

    def warn_vacuum(self, item: Item) -> None:
        if item.vacuum.cluster:
            logger.warning(
                "%s: an isolated cluster in a periodic box (vacuum of %s): relaxed keeping its box (allow_cluster); the network was trained on crystals",
                item.name,
                item.vacuum.describe(),
            )
        else:
            axes = ", ".join(map(str, item.vacuum.axes))
            logger.warning(
                "%s: vacuum of %s: the lattice vector of periodic axis %s is kept as given (relaxed as a non-periodic axis)",
                item.name,
                item.vacuum.describe(),
                axes,
            )

    def refine(self, item: Item, atoms, options: RelaxOptions, relax_cell: bool) -> None:
        """Continue from the prediction with real forces (``e3relax_ase.relax.refine``)."""
        from e3relax_ase.relax.refine import refine as refine_structure  # ase.optimize imports scipy: only when refining

        assert options.refine is not None  # finish calls this only when refining
        kwargs = options.refine.optimizer_kwargs()
        if per_structure(kwargs.get("trajectory")):
            kwargs["trajectory"] = trajectory_path(kwargs["trajectory"], item.index, item.name)
        if item.vacuum is not None and not item.vacuum.cluster and relax_cell and kwargs.get("mask") is None:
            try:  # the vacuum axes found stay frozen under the cell filter too
                kwargs["mask"] = vacuum_cell_mask(atoms.cell.array, item.vacuum.pbc)
            except ValueError as exc:
                logger.warning("%s: %s; refining positions only", item.name, exc)
                relax_cell = False
        refine_structure(atoms, options.refine.calculator, relax_cell=relax_cell, **kwargs)

    def provenance(self, relax_cell: bool) -> dict:
        """The provenance keys that are the same for every structure of a call, in the order
        ``finish`` writes them (built once a call, not once a structure)."""
        return {
            INFO_MODEL: self.info.name or os.path.basename(self.info.path),
            INFO_SHA256: self.info.sha256,
            INFO_VERSION: __version__,
            INFO_UNTRAINED: bool(self.info.untrained),
            INFO_RELAX_CELL: bool(relax_cell),
        }

    def frames(self, item: Item, prediction: Prediction, options: RelaxOptions, symmetry) -> list:
        """The input, then every layer's structure, applied through the same constraints."""
        frames = [copy_atoms(item.pristine)]
        for layer in range(prediction.positions.shape[0]):
            frame = copy_atoms(item.pristine)
            if symmetry is not None:
                frame.set_constraint(list(frame.constraints) + [symmetry])
            positions = prediction.positions[layer]
            if item.vacuum is not None and not item.vacuum.cluster:
                positions = positions - item.vacuum.translation
            apply_prediction(frame, positions, prediction.cell[layer], options.relax_cell and not item.keeps_cell)
            if symmetry is not None:
                frame.set_constraint([c for c in frame.constraints if c is not symmetry])
            frame.info[INFO_LAYER] = layer + 1
            frames.append(frame)
        return [from_atoms(f, item.kind) for f in frames]


def per_structure(trajectory) -> bool:
    """A trajectory path with a placeholder for each structure ("{index}" or "{name}")."""
    return isinstance(trajectory, (str, os.PathLike)) and ("{index}" in str(trajectory) or "{name}" in str(trajectory))


def trajectory_path(pattern, index: int, name: str) -> str:
    """The refinement trajectory file of one structure: ``pattern`` with "{index}" (its index
    in the call) and "{name}" (its name, made safe for a file name) replaced."""
    safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in str(name))
    return str(pattern).format(index=index, name=safe)
