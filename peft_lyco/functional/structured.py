"""Factor gradients (and the adapter's share of ∂L/∂x) straight from the layer input and the output gradient, through
a product that never builds ΔW: Linear LoKr's Kronecker chain, flat LoHa as a rank-r1·r2 product (Linear and
ungrouped convs), Conv2d LoKr as grouped convolutions mixed by ``w1``. The fused op takes this route where it costs
less than the dense weight gradient ``G = ∂L/∂W`` (one weight-sized product per token or output pixel).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch

from .base_op import BaseOp, LinearOp
from .loha import loha_as_lowrank, loha_conv_apply, loha_conv_macs
from .lokr import lokr_conv_apply, lokr_conv_macs, lokr_linear_apply, lokr_linear_macs

# Rebuilding W + ΣΔW for ∂L/∂x costs, per weight element, a few memory-bound passes plus the small products: about
# this many multiply-adds' worth on CPUs and GPUs alike (a pass moves bytes, a multiply-add is a fraction of a cycle).
REBUILD_MACS_PER_WEIGHT = 128


@dataclass(frozen=True)
class StructuredRoute:
    """Cost of one adapter's ΔW-free product: multiply-adds per token (Linear) or output pixel (conv) of one pass,
    and how many passes its factor gradients take."""

    apply_macs: int
    grad_passes: int

    def pays_off(self, weight_numel: int) -> bool:
        """Cheaper than the dense weight gradient, which costs ``weight_numel`` multiply-adds per token."""
        return self.grad_passes * self.apply_macs < weight_numel

    def input_grad_pays_off(self, tokens: int, weight_numel: int) -> bool:
        """The adapter's share of ∂L/∂x through the product is cheaper than rebuilding ``W + ΔW`` for it."""
        return tokens * self.apply_macs <= REBUILD_MACS_PER_WEIGHT * weight_numel


def structured_route(op: BaseOp, params: Mapping[str, torch.Tensor], weight_shape: tuple[int, ...]) -> Optional[StructuredRoute]:
    """The ΔW-free route of an adapter (factors by kohya name) on a layer, or ``None`` where there is none (Tucker
    LoHa, grouped convolutions)."""
    is_loha = "hada_w1_a" in params
    if is_loha and "hada_t1" in params:
        return None
    if isinstance(op, LinearOp):
        if is_loha:  # two passes: its gradients are written out by hand (_loha_linear_grads)
            rank = params["hada_w1_a"].shape[1] * params["hada_w2_a"].shape[1]
            return StructuredRoute(rank * sum(weight_shape), 2)
        macs = lokr_linear_macs(params)
        return None if macs is None else StructuredRoute(macs, 3)
    if op.groups != 1:
        return None
    macs = loha_conv_macs(params, weight_shape) if is_loha else lokr_conv_macs(params, weight_shape)
    return StructuredRoute(macs, 3)  # autograd: the product again, then both of its backward products


def structured_grads(
    params: Mapping[str, torch.Tensor],
    scale: float,
    row_mask: Optional[torch.Tensor],
    want: list[str],
    x: torch.Tensor,
    grad: torch.Tensor,
    op: BaseOp,
    weight_shape: tuple[int, ...],
    *,
    input_grad: bool,
) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of the factors named in ``want`` (and, with ``input_grad``, the adapter's share of ∂L/∂x) from the
    layer input ``x`` and the output gradient ``grad``.

    The large products run in the input's dtype, as the dense route's weight gradient would; the factors' own chain
    rule in theirs. ``params`` must be detached tensors (their ``requires_grad`` is set here).
    """
    if row_mask is not None:  # output features: the last axis of a Linear's output, axis 1 of a conv's
        mask = row_mask.to(grad.dtype)
        grad = grad * (mask if isinstance(op, LinearOp) else mask.view(-1, 1, 1))
    with torch.enable_grad():
        leaves = {name: p.requires_grad_(name in want) for name, p in params.items()}
        wanted = [leaves[name] for name in want]
        cast = {name: p.to(x.dtype) for name, p in leaves.items()}
        if isinstance(op, LinearOp) and "hada_w1_a" in cast:
            return _loha_linear_grads(cast, want, wanted, x, grad, scale, input_grad)
        x = x.detach().requires_grad_(input_grad)
        if isinstance(op, LinearOp):
            out = lokr_linear_apply(x, cast, scale)
        else:
            apply = loha_conv_apply if "hada_w1_a" in cast else lokr_conv_apply
            out = apply(x, cast, scale, weight_shape, lambda inp, kernel: op.forward(inp, kernel, None))
        grads = torch.autograd.grad(out, ([x] if input_grad else []) + wanted, grad)
    grad_x, grads = (grads[0], grads[1:]) if input_grad else (None, grads)
    return dict(zip(want, grads)), grad_x


def _loha_linear_grads(params, want, wanted, x, grad, scale, input_grad):
    """Flat Linear LoHa: ``y = scale · (x @ rightᵀ) @ leftᵀ`` with ``left @ right = ΔW/scale``. The gradients of
    ``left`` and ``right`` (and of x) take two products each, then the factors' through their small products."""
    left, right = loha_as_lowrank(params["hada_w1_a"], params["hada_w1_b"], params["hada_w2_a"], params["hada_w2_b"])
    flat_x, flat_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    with torch.no_grad():
        grad_inner = flat_grad @ left.detach()
        grad_x = (grad_inner @ right.detach()).mul_(scale).reshape(x.shape) if input_grad else None
        if wanted:
            grad_left = (flat_grad.T @ (flat_x @ right.detach().T)).mul_(scale)
            grad_right = (grad_inner.T @ flat_x).mul_(scale)
    grads = torch.autograd.grad([left, right], wanted, [grad_left, grad_right]) if wanted else ()
    return dict(zip(want, grads)), grad_x
