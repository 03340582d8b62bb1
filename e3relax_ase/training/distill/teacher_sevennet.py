"""SevenNet-0 as a batched teacher: one model call for many crystals (energies, forces, stress).

sevenn is imported lazily (only when a ``SevenNetTeacher`` is made), so this module imports on
machines without it. The 7net-0 weights ship inside the sevenn wheel: nothing is downloaded.

How sevenn's batched model is fed (read from sevenn 0.13: ``torchsim.py``, ``nn/sequential.py``,
``nn/force_output.py``): the model is an ``AtomGraphSequential`` put in batch mode
(``set_is_batch_data(True)``); its input is a mapping with atomic numbers, ``edge_index``
[2, n_edges] (row 0 = source i, row 1 = destination j), ``edge_vec`` = r_j - r_i + shift,
``batch``, ``num_atoms`` and ``cell_volume`` per crystal. It differentiates the energy with
respect to ``edge_vec`` to get forces and the per-crystal virial; its ``inferred_stress`` is
Voigt [xx, yy, zz, xy, yz, zx] with the sign opposite to ASE's.

The neighbour list is our own batched dense search (``periodic_edges``): for cells of a few
dozen atoms it enumerates every (i, j, lattice shift) candidate within the needed shift
range on the device, which beats one neighbour-list call per crystal on a GPU.
"""

from __future__ import annotations

import logging

import torch

from e3relax_ase.training.distill.batched_results import TeacherOutput

logger = logging.getLogger(__name__)

__all__ = ["SevenNetTeacher", "periodic_edges"]


def periodic_edges(
    positions: torch.Tensor,
    cell: torch.Tensor,
    batch: torch.Tensor,
    n_atoms: torch.Tensor,
    cutoff: float,
    *,
    max_candidates: int = 1 << 24,
    max_candidates_per_graph: int = 1 << 22,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All periodic neighbour pairs closer than ``cutoff``, for a batch of 3D-periodic crystals.

    Positions are wrapped into their cell first; the returned vectors use the wrapped
    positions, which leaves every edge vector (and so energies, forces, stress) unchanged.
    Along lattice axis k, pairs need lattice shifts |s_k| <= ceil(cutoff / d_k), with d_k the
    spacing of the lattice planes normal to the reciprocal vector b_k.

    Args:
        positions: [n_atoms, 3] Å.
        cell: [n_graphs, 3, 3] rows = lattice vectors.
        batch: [n_atoms] crystal index, sorted.
        n_atoms: [n_graphs] atoms per crystal.
        cutoff: Å.
        max_candidates: candidates enumerated at once (memory bound); crystals are chunked.
        max_candidates_per_graph: a crystal needing more candidates (a collapsed or needle
            cell) gets no edges and is reported in the returned mask.

    Returns:
        edge_src [n_edges] (i), edge_dst [n_edges] (j), edge_vec [n_edges, 3] = r_j + s @ cell - r_i,
        and too_large [n_graphs] bool (crystals skipped by ``max_candidates_per_graph``).
    """
    device = positions.device
    n_graphs = cell.shape[0]
    inv = torch.linalg.inv(cell)  # columns are reciprocal vectors b_k (a_i . b_k = delta_ik)
    frac = torch.einsum("ni,nij->nj", positions, inv[batch])
    wrapped = torch.einsum("ni,nij->nj", frac - torch.floor(frac), cell[batch])  # [n_atoms, 3]

    n_rep = torch.ceil(cutoff * torch.linalg.norm(inv, dim=1)).to(torch.int64)  # [n_graphs, 3]
    width = 2 * n_rep + 1
    n_pairs = n_atoms * n_atoms
    n_cand = width.prod(dim=1) * n_pairs  # [n_graphs]
    too_large = n_cand > max_candidates_per_graph
    n_cand = torch.where(too_large, torch.zeros_like(n_cand), n_cand)
    atom_offset = torch.cumsum(n_atoms, 0) - n_atoms

    n_cand_list = n_cand.tolist()
    chunks: list[tuple[int, int]] = []
    start, acc = 0, 0
    for g, c in enumerate(n_cand_list):
        if acc + c > max_candidates and g > start:
            chunks.append((start, g))
            start, acc = g, 0
        acc += c
    if n_graphs:
        chunks.append((start, n_graphs))

    src_all, dst_all, vec_all = [], [], []
    cutoff2 = cutoff * cutoff
    for g0, g1 in chunks:
        counts = n_cand[g0:g1]
        total = int(sum(n_cand_list[g0:g1]))
        if total == 0:
            continue
        graph = torch.repeat_interleave(torch.arange(g0, g1, device=device), counts, output_size=total)
        first = torch.cumsum(counts, 0) - counts
        local = torch.arange(total, device=device) - first[graph - g0]
        na = n_atoms[graph]
        pair = local % n_pairs[graph]
        shift_index = local // n_pairs[graph]
        i = pair // na + atom_offset[graph]
        j = pair % na + atom_offset[graph]
        w = width[graph]
        r = n_rep[graph]
        s0 = shift_index % w[:, 0] - r[:, 0]
        rest = shift_index // w[:, 0]
        s1 = rest % w[:, 1] - r[:, 1]
        s2 = rest // w[:, 1] - r[:, 2]
        shift = torch.stack([s0, s1, s2], dim=1).to(positions.dtype)  # [total, 3]
        vec = wrapped[j] - wrapped[i] + torch.einsum("ni,nij->nj", shift, cell[graph])
        d2 = (vec * vec).sum(dim=1)
        is_self = (i == j) & (s0 == 0) & (s1 == 0) & (s2 == 0)
        keep = (d2 < cutoff2) & ~is_self
        src_all.append(i[keep])
        dst_all.append(j[keep])
        vec_all.append(vec[keep])

    if not src_all:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty, torch.zeros(0, 3, dtype=positions.dtype, device=device), too_large
    return torch.cat(src_all), torch.cat(dst_all), torch.cat(vec_all), too_large


class SevenNetTeacher:
    """Batched SevenNet teacher (default: SevenNet-0 from the sevenn wheel).

    Args:
        model: a sevenn pretrained name or checkpoint path.
        device: torch device for the model.
        modal: the fidelity of a multi-fidelity model (``7net-mf-0``: ``"PBE"`` or ``"R2SCAN"``);
            must be None for single-fidelity models.

    Attributes:
        name: teacher name for provenance ("SevenNet-0", or the model name and ``:modal``).
        version: sevenn version string.
        cutoff: model cutoff, Å.

    Raises:
        ValueError: a multi-fidelity model without a modal it knows, or a modal for a model
            that has none.
    """

    def __init__(self, model: str = "7net-0", device: str | torch.device = "cpu", modal: str | None = None) -> None:
        import sevenn
        from sevenn import _keys
        from sevenn.util import load_checkpoint

        self._keys = _keys
        self.device = torch.device(device)
        checkpoint = load_checkpoint(model)
        net = checkpoint.build_model()
        modal_map = getattr(net, "modal_map", None) or {}
        if modal_map and modal not in modal_map:
            raise ValueError(f"{model} is multi-fidelity: give modal, one of {sorted(modal_map)}")
        if not modal_map and modal is not None:
            raise ValueError(f"{model} has no modal (fidelity) to choose, got {modal!r}")
        self.modal = modal
        # sevenn's own modal lookup reads ``data.x`` (an AtomGraphData attribute) and fails on the
        # plain dict fed here: the modal index per crystal is set in __call__ instead.
        self._modal_index = None if modal is None else int(modal_map[modal])
        if modal_map:
            net.eval_modal_map = False
        net.set_is_batch_data(True)
        net.eval_type_map = torch.tensor(True)
        self.model = net.to(self.device).eval()
        self.cutoff = float(net.cutoff)
        known = torch.zeros(128, dtype=torch.bool)
        known[list(net.type_map)] = True
        self._known = known.to(self.device)
        self.name = "SevenNet-0" if model.lower() in ("7net-0", "sevennet-0") else model
        if modal is not None:
            self.name += f":{modal}"
        self.version = sevenn.__version__
        self.model_dtype = next(net.parameters()).dtype

    def known_numbers(self) -> list[int]:
        """Atomic numbers the model was trained on."""
        return torch.nonzero(self._known).flatten().tolist()

    def __call__(
        self,
        positions: torch.Tensor,
        cell: torch.Tensor,
        numbers: torch.Tensor,
        batch: torch.Tensor,
        n_atoms: torch.Tensor,
    ) -> TeacherOutput:
        """Energies [n_graphs], forces [n_atoms, 3], ASE-sign stress [n_graphs, 3, 3].

        Crystals with unknown elements or no neighbour list (collapsed cells) get NaN.
        """
        key = self._keys
        out_dtype = positions.dtype
        src, dst, vec, too_large = periodic_edges(positions, cell, batch, n_atoms, self.cutoff)
        volume = torch.linalg.det(cell).abs()
        data = {
            key.NODE_FEATURE: numbers,
            key.ATOMIC_NUMBERS: numbers,
            key.POS: positions.to(self.model_dtype),
            key.EDGE_IDX: torch.stack([src, dst]),
            key.EDGE_VEC: vec.to(self.model_dtype),
            key.BATCH: batch,
            key.NUM_ATOMS: n_atoms,
            key.CELL_VOLUME: volume.to(self.model_dtype),
        }
        if self._modal_index is not None:
            data[key.MODAL_TYPE] = torch.full((int(n_atoms.shape[0]),), self._modal_index, dtype=torch.int64, device=numbers.device)
        unknown = ~self._known[numbers]
        if bool(unknown.any()):
            # Map unknown species to hydrogen so the call runs; those crystals become NaN below.
            data[key.NODE_FEATURE] = data[key.ATOMIC_NUMBERS] = torch.where(unknown, 1, numbers)
        out = self.model(data)
        energy = out[key.PRED_TOTAL_ENERGY].detach().to(out_dtype)
        forces = out[key.PRED_FORCE].detach().to(out_dtype)
        voigt = out[key.PRED_STRESS].detach().to(out_dtype)  # [n_graphs, 6] xx yy zz xy yz zx
        xx, yy, zz, xy, yz, zx = voigt.unbind(dim=1)
        stress = -torch.stack([torch.stack([xx, xy, zx], 1), torch.stack([xy, yy, yz], 1), torch.stack([zx, yz, zz], 1)], dim=1)
        bad = too_large.clone()
        if bool(unknown.any()):
            bad |= torch.zeros_like(bad).index_put_((batch[unknown],), torch.tensor(True, device=bad.device))
        if bool(bad.any()):
            energy = torch.where(bad, torch.nan, energy)
        return TeacherOutput(energy=energy, forces=forces, stress=stress)
