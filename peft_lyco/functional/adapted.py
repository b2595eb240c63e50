"""One op per adapted layer: ``op(x, W + Σ ΔW_i)`` for any number of adapters, keeping for backward only what it needs.

Autograd through ``op(x, W + ΔW)`` keeps the weight-sized ``W + ΔW`` alive until backward. The custom function here
keeps the input, a reference to the weight and the small factors, and rebuilds ``W + ΔW`` in backward (the same ops in
the same order, so the input gradient equals autograd's). Factor gradients then come from the weight gradient
``G = ∂L/∂W``: for LoHa through its factor-only backward fed with the products already rebuilt for ``W + ΔW``; for
LoKr through autograd of its Kronecker product. For Linear LoKr (Kronecker chain) and flat Linear LoHa (a rank-r1·r2
product) they come, where cheaper, straight from the input and the output gradient, without ``G`` ever being formed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.autograd.function import once_differentiable

from .base_op import BaseOp, LinearOp
from .delta import add_delta, delta_weight
from .loha import hadamard, loha_as_lowrank, loha_conv_apply, loha_conv_macs, loha_factor_grads, loha_products
from .lokr import lokr_conv_apply, lokr_conv_macs, lokr_linear_apply, lokr_linear_macs

# The structured routes (gradients through a ΔW-free product, by autograd) cost about three passes of that product
# per token or output pixel (forward again, then both backward products), against one weight-sized product for the
# dense weight gradient. Flat Linear LoHa has its own two-pass route (``_loha_linear_grads``).
_STRUCTURED_PASSES = 3
_LOHA_ORDER = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


@dataclass(frozen=True)
class DeltaTerm:
    """One active adapter in one call: its tensors by kohya name, its scale, and its rank-dropout row mask."""

    params: Mapping[str, torch.Tensor]
    scale: float
    row_mask: Optional[torch.Tensor] = None


def _shaped(delta: torch.Tensor, term: DeltaTerm, shape: torch.Size) -> torch.Tensor:
    delta = delta.reshape(shape)
    if term.row_mask is not None:
        delta = delta * term.row_mask.view(-1, *[1] * (delta.dim() - 1))
    return delta


def term_delta(term: DeltaTerm, shape: torch.Size) -> torch.Tensor:
    """The term's ΔW in ``shape`` (the base weight's), scaled once, with rank-dropout rows zeroed/rescaled."""
    return _shaped(delta_weight(term.params, term.scale), term, shape)


def sum_deltas(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ ΔW in the first adapter's dtype, in order (one summation rule for forward and the rebuild in backward)."""
    total = deltas[0]
    for delta in deltas[1:]:
        total = total + delta.to(total.dtype)
    return total


def structured_grads_pay_off(op: BaseOp, term: DeltaTerm, weight_shape: torch.Size) -> bool:
    """Whether the factor gradients straight from (x, ∂L/∂y) through the adapter's structure are cheaper than going
    through the dense ``G = ∂L/∂W``: Linear LoKr's Kronecker chain, flat LoHa as a rank-r1·r2 product (Linear and
    ungrouped convs), Conv2d LoKr as grouped convolutions."""
    dense = math.prod(weight_shape)
    is_loha = "hada_w1_a" in term.params
    if is_loha and "hada_t1" in term.params:
        return False
    if isinstance(op, LinearOp):
        if is_loha:
            rank = term.params["hada_w1_a"].shape[1] * term.params["hada_w2_a"].shape[1]
            return 2 * rank * sum(weight_shape) < dense
        macs = lokr_linear_macs(term.params)
        return macs is not None and _STRUCTURED_PASSES * macs < dense
    if op.groups != 1:
        return False
    macs = loha_conv_macs(term.params, weight_shape) if is_loha else lokr_conv_macs(term.params, weight_shape)
    return _STRUCTURED_PASSES * macs < dense


@dataclass(frozen=True)
class _TermLayout:
    names: tuple[str, ...]
    scale: float
    masked: bool
    structured: bool


def _split(layouts: Sequence[_TermLayout], flat: Sequence[Any]) -> list[tuple[dict[str, Any], Any]]:
    """Per term, its entries of the flat list the autograd function receives (factors first, then masks)."""
    out, pos = [], 0
    masks = iter(flat[sum(len(layout.names) for layout in layouts) :])
    for layout in layouts:
        out.append((dict(zip(layout.names, flat[pos : pos + len(layout.names)])), next(masks) if layout.masked else None))
        pos += len(layout.names)
    return out


def _merged_weight(
    weight: Optional[torch.Tensor], total: torch.Tensor, dtype: torch.dtype, *, owned: bool = True
) -> torch.Tensor:
    """``W + ΣΔW`` summed as ``add_delta`` does; without a base weight (bypass) just ΣΔW in the input's dtype.

    When ``total`` is the caller's own temporary (``owned``) and already has ``add_delta``'s summation dtype, the
    weight is added into it: the same sum, bit for bit, without a second weight-sized buffer or an upcast copy.
    """
    if weight is None:
        return total.to(dtype)
    if owned and total.dtype == torch.promote_types(torch.promote_types(weight.dtype, total.dtype), torch.float32):
        return total.reshape(weight.shape).add_(weight).to(weight.dtype)
    return add_delta(weight, total)


def _loha_factors(params: Mapping[str, torch.Tensor]) -> list[Optional[torch.Tensor]]:
    return [params.get(name) for name in _LOHA_ORDER]


class _AdaptedOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, weight, bias, op: BaseOp, shape, layouts, *tensors):
        terms = [DeltaTerm(params, layout.scale, mask) for (params, mask), layout in zip(_split(layouts, tensors), layouts)]
        merged = _merged_weight(weight, sum_deltas([term_delta(t, shape) for t in terms]), x.dtype)
        need = ctx.needs_input_grad
        ctx.op, ctx.shape, ctx.layouts, ctx.x_dtype = op, shape, layouts, x.dtype
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.save_for_backward(x if need[1] or any(need[6:]) else None, weight if need[0] else None, *tensors)
        return op.forward(x, merged, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):
        x, weight, *tensors = ctx.saved_tensors
        op, shape, layouts = ctx.op, ctx.shape, ctx.layouts
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        tensors = [t.detach() for t in tensors]
        split = _split(layouts, tensors)
        terms = [DeltaTerm(params, layout.scale, mask) for (params, mask), layout in zip(split, layouts)]
        wanted = [{name: bool(flag) for name, flag in flags.items()} for flags, _ in _split(layouts, ctx.needs_input_grad[6:])]
        # terms whose factor gradients go through the dense G: LoHa by its own backward, LoKr by autograd
        via_dense = [any(w.values()) and not layout.structured for w, layout in zip(wanted, layouts)]
        dense_loha = [d and "hada_w1_a" in t.params for d, t in zip(via_dense, terms)]

        # rebuild W + ΣΔW for ∂L/∂x, keeping what the factor gradients reuse: LoHa's two products, LoKr's ΔW graph
        products: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        graphs: dict[int, torch.Tensor] = {}
        merged = None
        if need_x:
            deltas = []
            for i, term in enumerate(terms):
                if dense_loha[i]:
                    products[i] = loha_products(*_loha_factors(term.params), scale=term.scale)
                    deltas.append(_shaped(hadamard(*products[i]), term, shape))
                elif via_dense[i]:
                    graphs[i] = _delta_graph(term, wanted[i], shape)
                    deltas.append(graphs[i].detach())
                else:
                    deltas.append(term_delta(term, shape))
            # a lone LoKr ΔW is the root of its graph: not ours to add into
            merged = _merged_weight(weight, sum_deltas(deltas), ctx.x_dtype, owned=len(deltas) > 1 or not graphs)
            del deltas
        stand_in = merged if merged is not None else _shape_only(shape, grad)
        grad_x, dense = op.backward(grad, x, stand_in, need_x, need_w or any(via_dense))
        del stand_in, merged

        factor_grads: dict[int, torch.Tensor] = {}
        dense32: dict[torch.dtype, torch.Tensor] = {}
        for i, (term, layout) in enumerate(zip(terms, layouts)):
            want = [name for name, flag in wanted[i].items() if flag]
            if not want:
                continue
            if layout.structured:
                found = _structured_grads(term, want, x, grad, op, shape)
            else:
                dtype = next(iter(term.params.values())).dtype
                grad_delta = dense32.setdefault(dtype, dense.to(dtype))
                if dense_loha[i]:
                    if term.row_mask is not None:
                        grad_delta = grad_delta * term.row_mask.view(-1, *[1] * (grad_delta.dim() - 1)).to(dtype)
                    found = _loha_grads(term, want, grad_delta, products.pop(i, None))
                else:  # the graph's ΔW carries the row mask itself
                    delta = graphs.pop(i) if i in graphs else _delta_graph(term, wanted[i], shape)
                    found = dict(zip(want, torch.autograd.grad(delta, [term.params[name] for name in want], grad_delta)))
            factor_grads.update({id(term.params[name]): g for name, g in found.items()})
        grad_w = dense.to(ctx.weight_dtype) if need_w else None
        grad_b = op.bias_grad(grad) if need_b else None
        return (grad_x, grad_w, grad_b, None, None, None, *[factor_grads.get(id(t)) for t in tensors])


def _shape_only(shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """A weight-shaped stand-in for ops whose weight-gradient call wants the weight only for its shape."""
    return like.new_empty(()).expand(shape)


def _loha_grads(term: DeltaTerm, want: list[str], grad_delta: torch.Tensor, products) -> dict[str, torch.Tensor]:
    """LoHa factor gradients from ``∂L/∂ΔW`` through its factor-only backward (products rebuilt if not given)."""
    factors = _loha_factors(term.params)
    if products is None:
        with torch.no_grad():
            products = loha_products(*factors, scale=term.scale)
    need = [name in want for name in _LOHA_ORDER]
    grads = loha_factor_grads(grad_delta, *products, *factors, scale=term.scale, need=need)
    return {name: g for name, g in zip(_LOHA_ORDER, grads) if name in want}


def _delta_graph(term: DeltaTerm, wanted: Mapping[str, bool], shape: torch.Size) -> torch.Tensor:
    """The term's ΔW with autograd tracking the wanted factors (LoKr: the graph keeps only the two small halves)."""
    with torch.enable_grad():
        params = {name: p.requires_grad_(wanted[name]) for name, p in term.params.items()}
        return term_delta(DeltaTerm(params, term.scale, term.row_mask), shape)


def _structured_grads(
    term: DeltaTerm, want: list[str], x: torch.Tensor, grad: torch.Tensor, op: BaseOp, shape: torch.Size
) -> dict[str, torch.Tensor]:
    """Factor gradients from the input and the output gradient through a ΔW-free product, without forming ``G``.

    The large products run in the input's dtype (as the dense route's weight gradient would); the factors' own
    chain rule in theirs.
    """
    if term.row_mask is not None:  # output features: the last axis of a Linear's output, axis 1 of a conv's
        mask = term.row_mask.to(grad.dtype)
        grad = grad * (mask if isinstance(op, LinearOp) else mask.view(-1, 1, 1))
    with torch.enable_grad():
        params = {name: p.requires_grad_(name in want) for name, p in term.params.items()}
        wanted = [params[name] for name in want]
        cast = {name: p.to(x.dtype) for name, p in params.items()}
        if isinstance(op, LinearOp) and "hada_w1_a" in cast:
            return dict(zip(want, _loha_linear_grads(cast, wanted, x, grad, term.scale)))
        if isinstance(op, LinearOp):
            out = lokr_linear_apply(x, cast, term.scale)
        else:
            apply = loha_conv_apply if "hada_w1_a" in cast else lokr_conv_apply
            out = apply(x, cast, term.scale, tuple(shape), lambda inp, kernel: op.forward(inp, kernel, None))
        return dict(zip(want, torch.autograd.grad(out, wanted, grad)))


def _loha_linear_grads(params, wanted, x, grad, scale) -> tuple[torch.Tensor, ...]:
    """Flat Linear LoHa: ``y = scale · (x @ rightᵀ) @ leftᵀ`` with ``left @ right = ΔW/scale``; the gradients of
    ``left`` and ``right`` by two products each, then of the factors through their small products."""
    left, right = loha_as_lowrank(params["hada_w1_a"], params["hada_w1_b"], params["hada_w2_a"], params["hada_w2_b"])
    x, grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    with torch.no_grad():
        inner = x @ right.T
        grad_left = (grad.T @ inner).mul_(scale)
        grad_right = ((grad @ left).T @ x).mul_(scale)
    return torch.autograd.grad([left, right], wanted, [grad_left, grad_right])


def adapted_op(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    op: BaseOp,
    terms: Sequence[DeltaTerm],
    *,
    weight_shape: Optional[torch.Size] = None,
    structured_grads: bool = True,
) -> torch.Tensor:
    """``op(x, W + Σ ΔW_i, bias)`` as one op whose backward saves only ``x``, ``W`` and the factors.

    ``W + ΣΔW`` is summed like ``add_delta`` (>= fp32, cast once), so the result equals the merged layer's output.
    With ``weight=None`` it is ``op(x, ΣΔW)`` (bypass, for bases that cannot be summed into; give ``weight_shape``).
    ``structured_grads=False`` forces the dense-``G`` route where a structured one would be taken (tests compare both).
    """
    if not terms:
        raise ValueError("adapted_op needs at least one adapter term")
    shape = weight.shape if weight is not None else torch.Size(weight_shape)
    tensors = [t for term in terms for t in term.params.values()]
    masks = [term.row_mask for term in terms if term.row_mask is not None]
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in [x, weight, bias, *tensors] if t is not None):
        return op.forward(x, _merged_weight(weight, sum_deltas([term_delta(t, shape) for t in terms]), x.dtype), bias)
    layouts = tuple(
        _TermLayout(
            tuple(term.params),
            term.scale,
            term.row_mask is not None,
            structured_grads and structured_grads_pay_off(op, term, shape),
        )
        for term in terms
    )
    return _AdaptedOp.apply(x, weight, bias, op, shape, layouts, *tensors, *masks)
