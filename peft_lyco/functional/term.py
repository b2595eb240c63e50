"""One active adapter in one call of an adapted layer: which algorithm, its factors, its scale, its row mask."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .dora import WeightDecompose

if TYPE_CHECKING:
    from .algorithm import Algorithm


@dataclass(frozen=True)
class DeltaTerm:
    """An adapter's contribution ``scale · ΔW`` (rows masked by rank dropout) to one call of a layer.

    ``algorithm`` does all the math (ΔW, the structured route, the factor gradients); ``params`` are its tensors under
    their kohya names, in the order the layer holds them. With ``decompose`` (DoRA) the term's contribution is
    ``s ⊙ (W + ΔW) − W`` instead of ``ΔW`` (see ``dora.py``).
    """

    algorithm: Algorithm
    params: Mapping[str, torch.Tensor]
    scale: float
    row_mask: torch.Tensor | None = None
    decompose: WeightDecompose | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the adapter's factors (its ΔW and factor gradients are formed in it)."""
        return next(iter(self.params.values())).dtype


def mask_rows(delta: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
    """``delta`` with its output rows (axis 0) multiplied by the rank-dropout mask, if any."""
    if row_mask is None:
        return delta
    return delta * row_mask.view(-1, *[1] * (delta.dim() - 1))


def term_delta(term: DeltaTerm, shape: torch.Size) -> torch.Tensor:
    """The term's ΔW in ``shape`` (the base weight's), scaled once, with rank-dropout rows zeroed/rescaled."""
    return mask_rows(term.algorithm.delta(term.params, term.scale).reshape(shape), term.row_mask)


def module_dropout_term(term: DeltaTerm, p: float, out_features: int) -> DeltaTerm:
    """The term with kohya/LyCORIS module dropout drawn as a tensor: with probability ``p`` its contribution (and so
    every gradient it gives) is exactly zero for this call, else it is the term unchanged.

    This is the form ``torch.compile`` traces without a graph break (a Python branch on a random draw breaks the graph);
    the work of a dropped term is still done. The keep factor (0 or 1) multiplies the term's row mask, so ΔW is zero,
    and a DoRA term's strength, so its re-normalisation ``s`` is 1 and ``s ⊙ (W + 0) − W`` is zero too.
    """
    like = next(iter(term.params.values()))
    keep = (torch.rand((), device=like.device) >= p).to(like.dtype)
    row_mask = keep.expand(out_features) if term.row_mask is None else term.row_mask * keep
    decompose = term.decompose
    if decompose is not None:
        decompose = replace(decompose, multiplier=decompose.multiplier * keep)
    return replace(term, row_mask=row_mask, decompose=decompose)
