"""One op per adapted layer: ``op(x, W + Σ ΔW_i)`` for any number of adapters, keeping for backward only what it needs.

Autograd through ``op(x, W + ΔW)`` keeps the weight-sized ``W + ΔW`` alive until backward. The custom function here
keeps the input, a reference to the weight and the small factors. Its forward is bit for bit the merged layer's.
Its backward takes, per adapter, the cheaper of two routes:

* dense: rebuild ``W + ΣΔW`` for ∂L/∂x and form ``G = ∂L/∂W`` once; LoHa's factor gradients come through its
  factor-only backward, fed with the two products already rebuilt, LoKr's through autograd of its Kronecker product;
* structured (``structured.py``): the factor gradients, and where cheaper the adapter's share of ∂L/∂x, straight from
  the input and the output gradient through a product that never builds ΔW.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.autograd.function import once_differentiable

from .base_op import BaseOp, LinearOp
from .delta import add_delta, add_delta_into, delta_weight
from .loha import hadamard, loha_factor_grads, loha_products
from .structured import StructuredRoute, structured_grads, structured_route

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
    """Whether the term's factor gradients take the structured route (cheaper than the dense weight gradient)."""
    route = structured_route(op, term.params, tuple(weight_shape))
    return route is not None and route.pays_off(math.prod(weight_shape))


def _merged_weight(
    weight: Optional[torch.Tensor], total: torch.Tensor, dtype: torch.dtype, *, owned: bool = True
) -> torch.Tensor:
    """``W + ΣΔW`` summed as ``add_delta`` does (inside ``total`` when it is the caller's own temporary); without a base
    weight (bypass) just ΣΔW in the input's dtype."""
    if weight is None:
        return total.to(dtype)
    return add_delta_into(weight, total).to(weight.dtype) if owned else add_delta(weight, total)


@dataclass(frozen=True)
class _TermLayout:
    names: tuple[str, ...]
    scale: float
    masked: bool
    route: Optional[StructuredRoute]  # set when the factor gradients take the structured route


def _split(layouts: Sequence[_TermLayout], flat: Sequence[Any]) -> list[tuple[dict[str, Any], Any]]:
    """Per term, its entries of the flat list the autograd function receives (factors first, then masks)."""
    out, pos = [], 0
    masks = iter(flat[sum(len(layout.names) for layout in layouts) :])
    for layout in layouts:
        out.append(
            (dict(zip(layout.names, flat[pos : pos + len(layout.names)])), next(masks) if layout.masked else None)
        )
        pos += len(layout.names)
    return out


def _loha_factors(params: Mapping[str, torch.Tensor]) -> list[Optional[torch.Tensor]]:
    return [params.get(name) for name in _LOHA_ORDER]


class _AdaptedOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, weight, bias, op: BaseOp, shape, layouts, *tensors):
        terms = [
            DeltaTerm(params, layout.scale, mask) for (params, mask), layout in zip(_split(layouts, tensors), layouts)
        ]
        merged = _merged_weight(weight, sum_deltas([term_delta(t, shape) for t in terms]), x.dtype)
        need = ctx.needs_input_grad
        ctx.op, ctx.shape, ctx.layouts, ctx.x_dtype = op, shape, layouts, x.dtype
        ctx.weight_dtype = None if weight is None else weight.dtype
        # the input is needed for any weight-side gradient, and by a convolution's input gradient (as the base keeps it)
        keep_x = need[1] or any(need[6:]) or (need[0] and not isinstance(op, LinearOp))
        ctx.save_for_backward(x if keep_x else None, weight if need[0] else None, *tensors)
        return op.forward(x, merged, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):
        x, weight, *tensors = ctx.saved_tensors
        op, shape, layouts = ctx.op, ctx.shape, ctx.layouts
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        tensors = [t.detach() for t in tensors]
        terms = [
            DeltaTerm(params, layout.scale, mask) for (params, mask), layout in zip(_split(layouts, tensors), layouts)
        ]
        wanted = [[n for n, flag in flags.items() if flag] for flags, _ in _split(layouts, ctx.needs_input_grad[6:])]
        weight_numel = math.prod(shape)
        tokens = grad.numel() // grad.shape[-1 if isinstance(op, LinearOp) else 1]
        # per term: factor gradients through G (dense) or not; its share of ∂L/∂x from the rebuilt W + ΔW or its route
        dense = [bool(w) and layout.route is None for w, layout in zip(wanted, layouts)]
        routed_x = [
            need_x
            and x is not None  # not kept when only ∂L/∂x is wanted: the route needs the input
            and not d
            and layout.route is not None
            and layout.route.input_grad_pays_off(tokens, weight_numel)
            for d, layout in zip(dense, layouts)
        ]
        rebuilt = [need_x and not r for r in routed_x]

        # W + Σ rebuilt ΔW, keeping what the dense factor gradients reuse: LoHa's two products, LoKr's ΔW graph
        products: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        graphs: dict[int, torch.Tensor] = {}
        deltas = []
        for i, term in enumerate(terms):
            if dense[i] and "hada_w1_a" in term.params:
                products[i] = loha_products(*_loha_factors(term.params), scale=term.scale)
                delta = _shaped(hadamard(*products[i]), term, shape) if rebuilt[i] else None
            elif dense[i]:
                graphs[i] = _delta_graph(term, wanted[i], shape)
                delta = graphs[i].detach() if rebuilt[i] else None
            else:
                delta = term_delta(term, shape) if rebuilt[i] else None
            if delta is not None:
                deltas.append(delta)
        merged = weight if need_x else None
        if deltas:  # a lone LoKr ΔW is the root of its graph: not ours to add into
            merged = _merged_weight(weight, sum_deltas(deltas), ctx.x_dtype, owned=len(deltas) > 1 or not graphs)
        del deltas
        need_dense = need_w or any(dense)
        stand_in = (
            merged if merged is not None else (weight if weight is not None else grad.new_empty(()).expand(shape))
        )
        grad_x, grad_weight = op.backward(grad, x, stand_in, merged is not None, need_dense)
        del stand_in, merged

        factor_grads: dict[int, torch.Tensor] = {}
        by_dtype: dict[torch.dtype, torch.Tensor] = {}
        for i, (term, layout) in enumerate(zip(terms, layouts)):
            if dense[i]:
                dtype = next(iter(term.params.values())).dtype
                grad_delta = by_dtype.setdefault(dtype, grad_weight.to(dtype))
                if i in products:
                    found = _loha_grads(term, wanted[i], grad_delta, products.pop(i))
                else:  # the graph's ΔW carries the row mask itself
                    found = dict(
                        zip(
                            wanted[i],
                            torch.autograd.grad(graphs.pop(i), [term.params[n] for n in wanted[i]], grad_delta),
                        )
                    )
            elif wanted[i] or routed_x[i]:
                found, share = structured_grads(
                    term.params, term.scale, term.row_mask, wanted[i], x, grad, op, tuple(shape), input_grad=routed_x[i]
                )
                if share is not None:
                    grad_x = share if grad_x is None else grad_x.add_(share)
            else:
                continue
            factor_grads.update({id(term.params[name]): g for name, g in found.items()})
        grad_w = grad_weight.to(ctx.weight_dtype) if need_w else None
        grad_b = op.bias_grad(grad) if need_b else None
        return (grad_x, grad_w, grad_b, None, None, None, *[factor_grads.get(id(t)) for t in tensors])


def _loha_grads(term: DeltaTerm, want: list[str], grad_delta: torch.Tensor, products) -> dict[str, torch.Tensor]:
    """LoHa factor gradients from ``∂L/∂ΔW`` through its factor-only backward, given the two products."""
    if term.row_mask is not None:
        grad_delta = grad_delta * term.row_mask.view(-1, *[1] * (grad_delta.dim() - 1)).to(grad_delta.dtype)
    need = [name in want for name in _LOHA_ORDER]
    grads = loha_factor_grads(grad_delta, *products, *_loha_factors(term.params), scale=term.scale, need=need)
    return {name: g for name, g in zip(_LOHA_ORDER, grads) if name in want}


def _delta_graph(term: DeltaTerm, want: list[str], shape: torch.Size) -> torch.Tensor:
    """The term's ΔW with autograd tracking the wanted factors (LoKr: the graph keeps only the two small halves)."""
    with torch.enable_grad():
        params = {name: p.requires_grad_(name in want) for name, p in term.params.items()}
        return term_delta(DeltaTerm(params, term.scale, term.row_mask), shape)


def adapted_op(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    op: BaseOp,
    terms: Sequence[DeltaTerm],
    *,
    weight_shape: Optional[torch.Size] = None,
    structured_grads: Optional[bool] = None,
) -> torch.Tensor:
    """``op(x, W + Σ ΔW_i, bias)`` as one op whose backward saves only ``x``, ``W`` and the factors.

    ``W + ΣΔW`` is summed like ``add_delta`` (>= fp32, cast once), so the result equals the merged layer's output.
    With ``weight=None`` it is ``op(x, ΣΔW)`` (bypass, for bases that cannot be summed into; give ``weight_shape``).
    ``structured_grads``: ``None`` lets the cost model pick each adapter's route, ``True`` takes the structured route
    wherever one exists, ``False`` never (tests compare the routes).
    """
    if not terms:
        raise ValueError("adapted_op needs at least one adapter term")
    shape = weight.shape if weight is not None else torch.Size(weight_shape)
    tensors = [t for term in terms for t in term.params.values()]
    masks = [term.row_mask for term in terms if term.row_mask is not None]
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in [x, weight, bias, *tensors] if t is not None):
        return op.forward(x, _merged_weight(weight, sum_deltas([term_delta(t, shape) for t in terms]), x.dtype), bias)
    layouts = []
    for term in terms:
        route = None if structured_grads is False else structured_route(op, term.params, tuple(shape))
        if route is not None and structured_grads is None and not route.pays_off(math.prod(shape)):
            route = None
        layouts.append(_TermLayout(tuple(term.params), term.scale, term.row_mask is not None, route))
    return _AdaptedOp.apply(x, weight, bias, op, shape, tuple(layouts), *tensors, *masks)
