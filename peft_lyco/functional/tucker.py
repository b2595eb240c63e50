"""The Tucker rebuild shared by LoHa (``hada_t*``) and LoKr (``lokr_t2``)."""

from __future__ import annotations

import torch


def rebuild_tucker(core: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """Contract a Tucker core ``(r, r, *k)`` with ``w_a`` ``(r, out)`` and ``w_b`` ``(r, in)`` into ``(out, in, *k)``.

    Same contraction as LyCORIS' ``einsum("i j k l, j r, i p -> p r k l")``, written for any kernel rank.
    """
    return torch.einsum("i j ..., j r, i p -> p r ...", core, w_b, w_a)
