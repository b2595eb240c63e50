"""Factor gradients (and the adapter's share of ∂L/∂x) straight from the layer input and the output gradient, through
a product that never builds ΔW: Linear LoKr's Kronecker chain, flat LoHa as a rank-r1·r2 product (Linear and
ungrouped convs), Conv2d LoKr as grouped convolutions mixed by ``w1``. The fused op takes this route where it costs
less than the dense weight gradient ``G = ∂L/∂W`` (one weight-sized product per token or output pixel).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch

from .base_op import BaseOp, LinearOp
from .loha import loha_as_lowrank, loha_conv_apply, loha_conv_macs
from .lokr import lokr_conv_apply, lokr_conv_macs, lokr_linear_apply, lokr_linear_macs

# Cost model, in multiply-add equivalents. Moving one element through memory costs about as much as this many
# multiply-adds (memory bandwidth against arithmetic throughput, CPUs and GPUs alike); the ΔW-free products have small
# inner dimensions, so the input- and output-sized tensors they read and write weigh as much as their arithmetic.
ELEMENT_MACS = 32
# Rebuilding W + ΣΔW for ∂L/∂x: a few weight-sized memory passes plus the small products, per weight element.
REBUILD_MACS_PER_WEIGHT = 128
# Linear inputs go through the route in chunks of tokens of about this many elements of the wider of input and output
# (or of the weight's size if larger), so the route's temporaries stay about weight-sized.
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class StructuredRoute:
    """Cost of one adapter's ΔW-free product per token (Linear) or output pixel (conv): its multiply-adds, the input
    and output elements each pass moves, and how many passes its factor gradients take."""

    apply_macs: int
    io_elements: int
    grad_passes: int

    @property
    def pass_cost(self) -> int:
        return self.apply_macs + ELEMENT_MACS * self.io_elements

    def pays_off(self, weight_numel: int) -> bool:
        """Cheaper than the dense weight gradient (``weight_numel`` multiply-adds per token, same reads)."""
        return self.grad_passes * self.pass_cost < weight_numel + ELEMENT_MACS * self.io_elements

    def input_grad_pays_off(self, tokens: int, weight_numel: int) -> bool:
        """The adapter's share of ∂L/∂x through the product is cheaper than rebuilding ``W + ΔW`` for it."""
        return tokens * self.pass_cost <= REBUILD_MACS_PER_WEIGHT * weight_numel


def structured_route(
    op: BaseOp, params: Mapping[str, torch.Tensor], weight_shape: tuple[int, ...]
) -> Optional[StructuredRoute]:
    """The ΔW-free route of an adapter (factors by kohya name) on a layer, or ``None`` where there is none (Tucker
    LoHa, grouped convolutions)."""
    is_loha = "hada_w1_a" in params
    if is_loha and "hada_t1" in params:
        return None
    io_elements = weight_shape[0] + weight_shape[1]
    if isinstance(op, LinearOp):
        if is_loha:  # two passes: its gradients are written out by hand (_loha_linear_grads)
            rank = params["hada_w1_a"].shape[1] * params["hada_w2_a"].shape[1]
            return StructuredRoute(rank * io_elements, io_elements, 2)
        macs = lokr_linear_macs(params)
        return None if macs is None else StructuredRoute(macs, io_elements, 3)
    if op.groups != 1:
        return None
    macs = loha_conv_macs(params, weight_shape) if is_loha else lokr_conv_macs(params, weight_shape)
    return StructuredRoute(macs, io_elements, 3)  # autograd: the product again, then both of its backward products


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
    rule in theirs. Linear inputs go through in chunks of tokens whose temporaries stay about weight-sized.
    ``params`` must be detached tensors (their ``requires_grad`` is set here).
    """
    if row_mask is not None:  # output features: the last axis of a Linear's output, axis 1 of a conv's
        mask = row_mask.to(grad.dtype)
        grad = grad * (mask if isinstance(op, LinearOp) else mask.view(-1, 1, 1))
    leaves = {name: p.requires_grad_(name in want) for name, p in params.items()}
    wanted = [leaves[name] for name in want]
    if not isinstance(op, LinearOp):
        with torch.enable_grad():
            cast = {name: p.to(x.dtype) for name, p in leaves.items()}
            inp = x.detach().requires_grad_(input_grad)
            apply = loha_conv_apply if "hada_w1_a" in cast else lokr_conv_apply
            out = apply(inp, cast, scale, weight_shape, lambda a, kernel: op.forward(a, kernel, None))
            grads = torch.autograd.grad(out, ([inp] if input_grad else []) + wanted, grad)
        return dict(zip(want, grads[input_grad:])), grads[0] if input_grad else None
    flat_x, flat_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    chunk = max(1, max(math.prod(weight_shape), CHUNK_ELEMENTS) // max(weight_shape))
    pieces = [(flat_x[i : i + chunk], flat_grad[i : i + chunk]) for i in range(0, flat_x.shape[0], chunk)]
    linear = _loha_linear_grads if "hada_w1_a" in leaves else _lokr_linear_grads
    grads, grad_x = linear(leaves, wanted, pieces, scale, input_grad)
    return dict(zip(want, grads)), None if grad_x is None else grad_x.reshape(x.shape)


def _lokr_linear_grads(params, wanted, pieces, scale, input_grad):
    """Linear LoKr: autograd through its Kronecker chain, chunk by chunk, the factor gradients summed."""
    grads, grad_x = None, []
    for x, grad in pieces:
        with torch.enable_grad():
            inp = x.detach().requires_grad_(input_grad)
            out = lokr_linear_apply(inp, {name: p.to(x.dtype) for name, p in params.items()}, scale)
            found = torch.autograd.grad(out, ([inp] if input_grad else []) + wanted, grad)
        if input_grad:
            grad_x.append(found[0])
        grads = found[input_grad:] if grads is None else [a.add_(b) for a, b in zip(grads, found[input_grad:])]
    return grads, _joined(grad_x) if input_grad else None


def _loha_linear_grads(params, wanted, pieces, scale, input_grad):
    """Flat Linear LoHa: ``y = scale · (x @ rightᵀ) @ leftᵀ`` with ``left @ right = ΔW/scale``. The gradients of
    ``left`` and ``right`` (and of x) take two products each per chunk, then the factors' through their small
    products once."""
    with torch.enable_grad():
        cast = [params[name].to(pieces[0][0].dtype) for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")]
        left, right = loha_as_lowrank(*cast)
    grad_left = grad_right = None
    grad_x = []
    with torch.no_grad():
        for x, grad in pieces:
            grad_inner = grad @ left
            if input_grad:
                grad_x.append((grad_inner @ right).mul_(scale))
            if wanted:
                part_left, part_right = grad.T @ (x @ right.T), grad_inner.T @ x
                grad_left = part_left if grad_left is None else grad_left.add_(part_left)
                grad_right = part_right if grad_right is None else grad_right.add_(part_right)
    grads = torch.autograd.grad([left, right], wanted, [grad_left.mul_(scale), grad_right.mul_(scale)]) if wanted else ()
    return grads, _joined(grad_x) if input_grad else None


def _joined(pieces: list[torch.Tensor]) -> torch.Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
