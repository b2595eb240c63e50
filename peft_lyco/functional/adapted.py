"""One op per adapted layer: ``op(x, W + Σ ΔW_i)`` for any number of adapters, keeping for backward only what it needs.

Autograd through ``op(x, W + ΔW)`` keeps the weight-sized ``W + ΔW`` alive until backward. The custom function here
keeps the input, a reference to the frozen weight and the small factors, and rebuilds ``W + ΔW`` in backward (the
same ops in the same order, so the input gradient equals autograd's bit for bit). Factor gradients come from the
weight gradient ``G = ∂L/∂W`` through each adapter's own ΔW backward (LoHa's factor-only one included), or, for Linear
LoKr where it is cheaper, straight from the input and the output gradient through the Kronecker structure without
``G`` ever being formed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.autograd.function import once_differentiable

from .base_op import BaseOp, LinearOp
from .delta import add_delta, delta_weight
from .lokr import lokr_linear_apply, lokr_linear_macs

# Factor gradients through the Kronecker structure cost about three passes of the factor chain per token
# (forward again, then both backward products); the dense route costs one weight-sized product per token.
_KRON_GRAD_PASSES = 3


@dataclass(frozen=True)
class DeltaTerm:
    """One active adapter in one call: its tensors by kohya name, its scale, and its rank-dropout row mask."""

    params: Mapping[str, torch.Tensor]
    scale: float
    row_mask: Optional[torch.Tensor] = None


def term_delta(term: DeltaTerm, shape: torch.Size, *, recompute: bool = True) -> torch.Tensor:
    """The term's ΔW in ``shape`` (the base weight's), scaled once, with rank-dropout rows zeroed/rescaled."""
    delta = delta_weight(term.params, term.scale, recompute=recompute).reshape(shape)
    if term.row_mask is not None:
        delta = delta * term.row_mask.view(-1, *[1] * (delta.dim() - 1))
    return delta


def sum_deltas(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ ΔW in the first adapter's dtype, in order (one summation rule for forward and the rebuild in backward)."""
    total = deltas[0]
    for delta in deltas[1:]:
        total = total + delta.to(total.dtype)
    return total


def kron_grads_pay_off(op: BaseOp, term: DeltaTerm, weight_shape: torch.Size) -> bool:
    """Whether the Linear-LoKr factor gradients from (x, ∂L/∂y) are cheaper than going through the dense ``G``."""
    if not isinstance(op, LinearOp):
        return False
    macs = lokr_linear_macs(term.params) if "lokr_w1" in term.params or "lokr_w1_a" in term.params else None
    return macs is not None and _KRON_GRAD_PASSES * macs < weight_shape[0] * weight_shape[1]


@dataclass(frozen=True)
class _TermLayout:
    names: tuple[str, ...]
    scale: float
    masked: bool
    kron_grads: bool


def _terms_from(layouts: Sequence[_TermLayout], tensors: Sequence[torch.Tensor]) -> list[DeltaTerm]:
    """Rebuild the terms from the flat tensor list the autograd function receives (factors first, then masks)."""
    terms, pos = [], 0
    masks = iter(tensors[sum(len(layout.names) for layout in layouts) :])
    for layout in layouts:
        params = dict(zip(layout.names, tensors[pos : pos + len(layout.names)]))
        pos += len(layout.names)
        terms.append(DeltaTerm(params, layout.scale, next(masks) if layout.masked else None))
    return terms


def _merged_weight(weight: Optional[torch.Tensor], total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W + ΣΔW`` summed as ``add_delta`` does; without a base weight (bypass) just ΣΔW in the input's dtype."""
    return add_delta(weight, total) if weight is not None else total.to(dtype)


class _AdaptedOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, weight, bias, op: BaseOp, shape, layouts, *tensors):
        terms = _terms_from(layouts, tensors)
        merged = _merged_weight(weight, sum_deltas([term_delta(t, shape) for t in terms]), x.dtype)
        need = ctx.needs_input_grad
        ctx.op, ctx.shape, ctx.layouts, ctx.x_dtype = op, shape, layouts, x.dtype
        ctx.weight_dtype = None if weight is None else weight.dtype
        needs_x = need[1] or any(need[6:])
        ctx.save_for_backward(x if needs_x else None, weight if need[0] else None, *tensors)
        return op.forward(x, merged, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):
        x, weight, *tensors = ctx.saved_tensors
        op, shape, layouts = ctx.op, ctx.shape, ctx.layouts
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_t = ctx.needs_input_grad[6:]
        with torch.no_grad():
            leaves = [t.detach().requires_grad_(n) for t, n in zip(tensors, need_t)]
        terms = _terms_from(layouts, leaves)
        tracked = [
            not layout.kron_grads and any(p.requires_grad for p in term.params.values())
            for layout, term in zip(layouts, terms)
        ]
        deltas = []
        for term, track in zip(terms, tracked):
            if need_x or track:
                with torch.set_grad_enabled(track):
                    # built for an immediate backward: let autograd keep LoHa's products instead of rebuilding them
                    deltas.append(term_delta(term, shape, recompute=False))
            else:
                deltas.append(None)
        merged = None
        if need_x:
            merged = _merged_weight(weight, sum_deltas([d.detach() for d in deltas]), ctx.x_dtype)
        need_dense = need_w or any(tracked)
        stand_in = merged if merged is not None else _shape_only(shape, grad)
        grad_x, dense = op.backward(grad, x, stand_in, need_x, need_dense)
        del stand_in
        del merged
        factor_grads: dict[int, torch.Tensor] = {}
        if any(tracked):
            dense32 = {}
            outputs, inputs, grad_outputs = [], [], []
            for term, delta, track in zip(terms, deltas, tracked):
                if track:
                    outputs.append(delta)
                    grad_outputs.append(dense32.setdefault(delta.dtype, dense.to(delta.dtype)))
                    inputs.extend(p for p in term.params.values() if p.requires_grad)
            factor_grads.update(zip(map(id, inputs), torch.autograd.grad(outputs, inputs, grad_outputs)))
        for layout, term in zip(layouts, terms):
            wanted = [p for p in term.params.values() if p.requires_grad]
            if layout.kron_grads and wanted:
                factor_grads.update(zip(map(id, wanted), _kron_factor_grads(term, wanted, x, grad)))
        grad_w = dense.to(ctx.weight_dtype) if need_w else None
        grad_b = op.bias_grad(grad) if need_b else None
        grads_t = [factor_grads.get(id(leaf)) for leaf in leaves]
        return (grad_x, grad_w, grad_b, None, None, None, *grads_t)


def _shape_only(shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """A weight-shaped stand-in for ops whose weight-gradient call wants the weight only for its shape."""
    return like.new_empty(()).expand(shape)


def _kron_factor_grads(term: DeltaTerm, wanted: list[torch.Tensor], x: torch.Tensor, grad: torch.Tensor):
    """Gradients of a Linear LoKr's factors from the input and the output gradient, without forming ``G``."""
    dtype = wanted[0].dtype
    grad = grad.to(dtype)
    if term.row_mask is not None:
        grad = grad * term.row_mask.to(dtype)
    with torch.enable_grad():
        out = lokr_linear_apply(x.to(dtype), term.params, term.scale)
    return torch.autograd.grad(out, wanted, grad)


def adapted_op(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    op: BaseOp,
    terms: Sequence[DeltaTerm],
    *,
    weight_shape: Optional[torch.Size] = None,
    kron_grads: bool = True,
) -> torch.Tensor:
    """``op(x, W + Σ ΔW_i, bias)`` as one op whose backward saves only ``x``, ``W`` and the factors.

    ``W + ΣΔW`` is summed like ``add_delta`` (>= fp32, cast once), so the result equals the merged layer's output.
    With ``weight=None`` it is ``op(x, ΣΔW)`` (bypass, for bases that cannot be summed into; give ``weight_shape``).
    ``kron_grads=False`` forces the dense-``G`` route for Linear LoKr (tests compare both routes).
    """
    if not terms:
        raise ValueError("adapted_op needs at least one adapter term")
    shape = weight.shape if weight is not None else torch.Size(weight_shape)
    tensors = [t for term in terms for t in term.params.values()]
    masks = [term.row_mask for term in terms if term.row_mask is not None]
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in [x, weight, bias, *tensors] if t is not None):
        return op.forward(x, _merged_weight(weight, sum_deltas([term_delta(t, shape) for t in terms]), x.dtype), bias)
    layouts = tuple(
        _TermLayout(tuple(term.params), term.scale, term.row_mask is not None, kron_grads and kron_grads_pay_off(op, term, shape))
        for term in terms
    )
    return _AdaptedOp.apply(x, weight, bias, op, shape, layouts, *tensors, *masks)
