"""The Tucker rebuild shared by LoHa (``hada_t*``) and LoKr (``lokr_t2``)."""

from __future__ import annotations

import torch


def tucker_pair(core: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left, right)`` with ``left @ right`` the Tucker rebuild flattened to ``(out, in · prod(k))``.

    ``left`` is ``w_a.T`` (a view), ``right`` the small core-times-``w_b`` contraction ``(r, in · prod(k))``.
    """
    inner = torch.einsum("i j ..., j q -> i q ...", core, w_b)
    return w_a.T, inner.reshape(core.shape[0], -1)


def tucker_pair_grads(
    grad_left: torch.Tensor | None,
    grad_right: torch.Tensor | None,
    core: torch.Tensor,
    w_a: torch.Tensor,
    w_b: torch.Tensor,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(core, w_a, w_b)`` given those of ``tucker_pair``'s ``left`` and ``right`` (``None``: not wanted)."""
    g_core = g_b = None
    g_a = None if grad_left is None else grad_left.T.contiguous()
    if grad_right is not None:
        inner = grad_right.reshape(core.shape[0], w_b.shape[1], *core.shape[2:])
        g_core = torch.einsum("i q ..., j q -> i j ...", inner, w_b)
        g_b = torch.einsum("i j ..., i q ... -> j q", core, inner)
    return g_core, g_a, g_b


def rebuild_tucker(core: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """Contract a Tucker core ``(r, r, *k)`` with ``w_a`` ``(r, out)`` and ``w_b`` ``(r, in)`` into ``(out, in, *k)``.

    Same contraction as LyCORIS' ``einsum("i j k l, j r, i p -> p r k l")``, written for any kernel rank: the small
    core-times-``w_b`` first, then one matrix product that lands directly in the weight's layout (no permuted copy of
    a weight-sized tensor, in forward or in autograd's backward).
    """
    left, right = tucker_pair(core, w_a, w_b)
    return (left @ right).reshape(w_a.shape[1], w_b.shape[1], *core.shape[2:])
