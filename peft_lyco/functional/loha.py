"""LoHa ΔW (Hadamard product of two low-rank or Tucker factorizations) with a factor-only custom backward.

Autograd through ``(w1_a @ w1_b) * (w2_a @ w2_b)`` would keep both weight-sized products alive for backward; the
functions below save only the factors and rebuild the products in backward (LyCORIS' memory rationale). The Tucker
backward contracts each side with its *own* chain; PEFT and sd-scripts use the other side's chain for ``w?_a``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .tucker import rebuild_tucker


class _HadaProduct(torch.autograd.Function):
    """``scale * (w1_a @ w1_b) * (w2_a @ w2_b)`` saving only the four factors."""

    @staticmethod
    def forward(ctx: Any, w1_a, w1_b, w2_a, w2_b, scale: float) -> torch.Tensor:
        ctx.save_for_backward(w1_a, w1_b, w2_a, w2_b)
        ctx.scale = scale
        return (w1_a @ w1_b) * (w2_a @ w2_b) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        w1_a, w1_b, w2_a, w2_b = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad = grad * ctx.scale
        g_w1_a = g_w1_b = g_w2_a = g_w2_b = None
        if need[0] or need[1]:
            side1 = grad * (w2_a @ w2_b)
            g_w1_a = side1 @ w1_b.T if need[0] else None
            g_w1_b = w1_a.T @ side1 if need[1] else None
        if need[2] or need[3]:
            side2 = grad * (w1_a @ w1_b)
            g_w2_a = side2 @ w2_b.T if need[2] else None
            g_w2_b = w2_a.T @ side2 if need[3] else None
        return g_w1_a, g_w1_b, g_w2_a, g_w2_b, None


def _tucker_side_grads(grad_side, core, w_a, w_b, need):
    """Gradients of one Tucker side given ``grad_side = ∂L/∂rebuild`` of that side, shape ``(out, in, *k)``."""
    g_core = g_a = g_b = None
    if need[1]:
        core_b = torch.einsum("i j ..., j r -> i r ...", core, w_b)
        g_a = torch.einsum("p r ..., i r ... -> i p", grad_side, core_b)
    if need[0] or need[2]:
        back_a = torch.einsum("i p, p r ... -> i r ...", w_a, grad_side)
        g_core = torch.einsum("j r, i r ... -> i j ...", w_b, back_a) if need[0] else None
        g_b = torch.einsum("i j ..., i r ... -> j r", core, back_a) if need[2] else None
    return g_core, g_a, g_b


class _HadaProductTucker(torch.autograd.Function):
    """``scale * rebuild(t1, w1_a, w1_b) * rebuild(t2, w2_a, w2_b)`` saving only the six factors."""

    @staticmethod
    def forward(ctx: Any, t1, w1_a, w1_b, t2, w2_a, w2_b, scale: float) -> torch.Tensor:
        ctx.save_for_backward(t1, w1_a, w1_b, t2, w2_a, w2_b)
        ctx.scale = scale
        return rebuild_tucker(t1, w1_a, w1_b) * rebuild_tucker(t2, w2_a, w2_b) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        t1, w1_a, w1_b, t2, w2_a, w2_b = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad = grad * ctx.scale
        grads1 = grads2 = (None, None, None)
        if any(need[0:3]):
            grads1 = _tucker_side_grads(grad * rebuild_tucker(t2, w2_a, w2_b), t1, w1_a, w1_b, need[0:3])
        if any(need[3:6]):
            grads2 = _tucker_side_grads(grad * rebuild_tucker(t1, w1_a, w1_b), t2, w2_a, w2_b, need[3:6])
        return (*grads1, *grads2, None)


def loha_delta_weight(
    w1_a: torch.Tensor,
    w1_b: torch.Tensor,
    w2_a: torch.Tensor,
    w2_b: torch.Tensor,
    t1: Optional[torch.Tensor] = None,
    t2: Optional[torch.Tensor] = None,
    *,
    scale: float = 1.0,
    recompute: bool = True,
) -> torch.Tensor:
    """LoHa ΔW, scaled once by ``scale``.

    Flat (Linear, 1x1, kxk folded): returns ``(out, in * prod(kernel))``. Tucker (``t1``/``t2`` given, ``w?_a`` of
    shape ``(r, out)``): returns ``(out, in, *kernel)``. With ``recompute`` (default) backward keeps only the factors
    and rebuilds the two products; ``recompute=False`` lets autograd keep them, for callers that build ΔW only for
    an immediate backward (same values, same gradients, no second rebuild).
    """
    if (t1 is None) != (t2 is None):
        raise ValueError("LoHa Tucker needs both hada_t1 and hada_t2 (or neither)")
    if not recompute:
        if t1 is None:
            return (w1_a @ w1_b) * (w2_a @ w2_b) * scale
        return rebuild_tucker(t1, w1_a, w1_b) * rebuild_tucker(t2, w2_a, w2_b) * scale
    if t1 is None:
        return _HadaProduct.apply(w1_a, w1_b, w2_a, w2_b, float(scale))
    return _HadaProductTucker.apply(t1, w1_a, w1_b, t2, w2_a, w2_b, float(scale))
