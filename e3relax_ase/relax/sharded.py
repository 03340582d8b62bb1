"""``OneShotRelaxer.relax_many`` shared over the ranks of a torchrun job, results merged in
input order on rank 0 (``distributed.map_sharded``; docs/scaling.md)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from e3relax_ase.distributed import World, map_sharded
from e3relax_ase.relax.pool import picklable_error
from e3relax_ase.relax.relaxer import RelaxFailure

logger = logging.getLogger(__name__)


def relax_sharded(relaxer, structures: Sequence, world: World, *, names: Sequence[str], start: int = 0, **options) -> list | None:
    """``relaxer.relax_many`` over this rank's share of ``structures``; merged on rank 0.

    Results travel pickled, so each is made portable first: a refinement calculator becomes a
    ``SinglePointCalculator`` with its results (what a writer stores), and a failure's error
    its message when the exception cannot be pickled. ``RelaxFailure.index`` is the index in
    ``structures``.

    Returns:
        One result per structure, in input order, on rank 0; None on the other ranks.
    """
    if not world.active:
        return relaxer.relax_many(structures, names=list(names), **options)

    def relax_share(share: list) -> list:  # share: (index, structure, name) triples
        results = relaxer.relax_many([s for _, s, _ in share], names=[name for _, _, name in share], **options)
        logger.debug("rank %d of %d relaxed %d of %d structures", world.rank, world.world_size, len(share), len(structures))
        return [_portable(result, index) for (index, _, _), result in zip(share, results)]

    return map_sharded(relax_share, list(zip(range(len(structures)), structures, names)), world, start)


def _portable(result, index: int):
    """``result`` in a form that pickles (see ``relax_sharded``)."""
    if isinstance(result, RelaxFailure):
        return dataclasses.replace(result, index=index, error=picklable_error(result.error, result.message))
    calc = getattr(result, "calc", None)
    if calc is not None:
        from ase.calculators.calculator import all_properties
        from ase.calculators.singlepoint import SinglePointCalculator

        if not isinstance(calc, SinglePointCalculator):
            kept = {key: value for key, value in calc.results.items() if key in all_properties}
            result.calc = SinglePointCalculator(result, **kept)
    return result
