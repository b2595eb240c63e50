"""The Tucker rebuild shared by LoHa (``hada_t*``) and LoKr (``lokr_t2``)."""

from __future__ import annotations

import torch


def rebuild_tucker(core: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """Contract a Tucker core ``(r, r, *k)`` with ``w_a`` ``(r, out)`` and ``w_b`` ``(r, in)`` into ``(out, in, *k)``.

    Same contraction as LyCORIS' ``einsum("i j k l, j r, i p -> p r k l")``, written for any kernel rank: the small
    core-times-``w_b`` first, then one matrix product that lands directly in the weight's layout (no permuted copy of
    a weight-sized tensor, in forward or in autograd's backward).
    """
    inner = torch.einsum("i j ..., j q -> i q ...", core, w_b)
    return (w_a.T @ inner.reshape(core.shape[0], -1)).reshape(w_a.shape[1], *inner.shape[1:])
