"""The network as the relaxer runs it: one forward pass over prepared items, launched without
waiting for the device, split in two and retried on out of memory (and later passes kept
below the size that failed)."""

from __future__ import annotations

import logging

import torch

from e3relax_ase.geometry.canonical import CanonicalForm
from e3relax_ase.geometry.graph import CrystalGraph, graph_from_edges
from e3relax_ase.geometry.validation import InvalidStructureError
from e3relax_ase.nn.architectures import Network
from e3relax_ase.nn.compiled import CompiledForward
from e3relax_ase.nn.graphed import GraphedForward
from e3relax_ase.relax.device import is_out_of_memory
from e3relax_ase.relax.items import Item
from e3relax_ase.relax.predict import ReadyPredictions, predict

logger = logging.getLogger(__name__)


class NetworkRunner:
    """Forward passes of ``model`` on ``device`` in ``dtype`` (see the module docstring).

    Attributes:
        batch_edges: the most edges a forward pass may hold; starts at the relaxer's
            ``max_edges`` and is lowered after an out-of-memory split, for every later call.
    """

    def __init__(
        self,
        model: Network,
        device: torch.device,
        dtype: torch.dtype,
        reduce_cell: bool,
        precision: str,
        max_edges: int,
        graphed: GraphedForward | None = None,
        compiled: CompiledForward | None = None,
    ):
        self.model, self.device, self.dtype = model, device, dtype
        self.reduce_cell, self.precision = reduce_cell, precision
        self.batch_edges = max_edges
        self.graphed, self.compiled = graphed, compiled

    def predict(self, items: list[Item]):
        """One forward pass, launched: its ``result()`` waits for the predictions. On out of
        memory the batch is split in two and each half retried (waiting for them)."""
        try:
            with torch.inference_mode():  # not even no_grad's bookkeeping, which shows on a small CPU pass
                return self.forward(items)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            edges = sum(i.validated.n_edges for i in items)
            if len(items) == 1:
                raise InvalidStructureError(
                    f"{items[0].name}: out of memory on {self.device} with {items[0].validated.n_atoms} atoms and about {edges} edges"
                ) from None
            # Later batches start below the size that failed (a lone structure always runs).
            self.batch_edges = max(1, min(self.batch_edges, edges // 2))
            half = len(items) // 2
            logger.info("out of memory on %d structures (%d edges); splitting the batch", len(items), edges)
            return ReadyPredictions(self.predict(items[:half]).result() + self.predict(items[half:]).result())

    def forward(self, items: list[Item]):
        """``predict`` on the items, with the canonical forms and edges prepared for them (when
        every item has them), not waiting for the device (``predict.PendingPredictions``)."""
        crystals = [i.arrays for i in items]
        forms: list[CanonicalForm] | None = None  # predict computes them
        graph: CrystalGraph | None = None
        prepared = [(i.form, i.edges) for i in items if i.form is not None and i.edges is not None]
        if len(prepared) == len(items):
            forms = [form for form, _ in prepared]
            graph = graph_from_edges(
                [c.numbers for c in crystals],
                [f.positions for f in forms],
                [f.cell for f in forms],
                [c.pbc for c in crystals],
                [edges for _, edges in prepared],
                self.dtype,
            )
        return predict(
            self.model,
            crystals,
            self.device,
            self.dtype,
            self.reduce_cell,
            forms=forms,
            graph=graph,
            precision=self.precision,
            wait=False,
            forward=[self.graphed, self.compiled],
        )
