"""One op per adapted layer: ``op(x, W + Σ ΔW_i)`` for any number of adapters, keeping for backward only what it needs.

Autograd through ``op(x, W + ΔW)`` keeps the weight-sized ``W + ΔW`` alive until backward. The custom function here
keeps the input, a reference to the weight and the small factors. Its forward is bit for bit the merged layer's.
Its backward first plans, per adapter, the cheaper of two routes, then executes the plan:

* dense: rebuild ``W + ΣΔW`` for ∂L/∂x and form ``G = ∂L/∂W`` once; each algorithm turns ``G`` into its factor
  gradients reusing what it built for the rebuild (LoHa: its two products; LoKr: its Kronecker product's graph);
* structured (``structured.py``): the factor gradients, and where cheaper the adapter's share of ∂L/∂x, straight from
  the input and the output gradient through a product that never builds ΔW.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .algorithm import Algorithm
from .base_op import BaseOp, LinearOp
from .delta import add_delta, add_delta_into
from .structured import StructuredRoute, structured_grads
from .term import DeltaTerm, term_delta

__all__ = ["DeltaTerm", "adapted_op", "structured_grads_pay_off", "sum_deltas", "term_delta"]


def sum_deltas(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ ΔW in the first adapter's dtype, in order (one summation rule for forward and the rebuild in backward)."""
    total = deltas[0]
    for delta in deltas[1:]:
        total = total + delta.to(total.dtype)
    return total


def structured_grads_pay_off(op: BaseOp, term: DeltaTerm, weight_shape: torch.Size) -> bool:
    """Whether the term's factor gradients take the structured route (cheaper than the dense weight gradient)."""
    route = term.algorithm.route(op, term.params, tuple(weight_shape))
    return route is not None and route.pays_off(math.prod(weight_shape))


def _merged_weight(
    weight: torch.Tensor | None, total: torch.Tensor, dtype: torch.dtype, *, owned: bool = True
) -> torch.Tensor:
    """``W + ΣΔW`` summed as ``add_delta`` does (inside ``total`` when it is the caller's own temporary); without a base
    weight (bypass) just ΣΔW in the input's dtype."""
    if weight is None:
        return total.to(dtype)
    return add_delta_into(weight, total).to(weight.dtype) if owned else add_delta(weight, total)


@dataclass(frozen=True)
class _TermLayout:
    """What the autograd function needs to rebuild a term from its flat tensors, and the route its factors take."""

    algorithm: Algorithm
    names: tuple[str, ...]
    scale: float
    masked: bool
    route: StructuredRoute | None  # set when the factor gradients take the structured route


def _terms(layouts: Sequence[_TermLayout], flat: Sequence[Any]) -> list[DeltaTerm]:
    """The terms behind the flat list the autograd function receives (factors first, then masks)."""
    return [DeltaTerm(layout.algorithm, params, layout.scale, mask) for layout, (params, mask) in _split(layouts, flat)]


def _split(layouts: Sequence[_TermLayout], flat: Sequence[Any]) -> list[tuple[_TermLayout, tuple[dict, Any]]]:
    """Per term, its entries of the flat list (a dict by factor name, and its mask or ``None``)."""
    out, pos = [], 0
    masks = iter(flat[sum(len(layout.names) for layout in layouts) :])
    for layout in layouts:
        params = dict(zip(layout.names, flat[pos : pos + len(layout.names)]))
        out.append((layout, (params, next(masks) if layout.masked else None)))
        pos += len(layout.names)
    return out


@dataclass(frozen=True)
class _TermPlan:
    """How one term takes part in the backward: which factor gradients, by which route, and its share of ∂L/∂x."""

    want: list[str]  # factors whose gradient is wanted
    dense: bool  # factor gradients from G = ∂L/∂W
    routed_x: bool  # its share of ∂L/∂x through its structured product instead of the rebuilt weight
    rebuilt: bool  # its ΔW goes into the rebuilt W + ΣΔW for ∂L/∂x


@dataclass(frozen=True)
class _BackwardPlan:
    terms: list[_TermPlan]
    need_x: bool
    need_w: bool
    need_b: bool

    @property
    def need_dense(self) -> bool:
        """``G = ∂L/∂W`` is formed: for the base weight's gradient or for a dense term."""
        return self.need_w or any(t.dense for t in self.terms)


def _plan_backward(ctx: Any, x: torch.Tensor | None, grad: torch.Tensor) -> _BackwardPlan:
    """Decide each term's route from what is wanted and the cost model; nothing is computed here."""
    op, layouts = ctx.op, ctx.layouts
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    weight_numel = math.prod(ctx.shape)
    tokens = grad.numel() // grad.shape[-1 if isinstance(op, LinearOp) else 1]
    plans = []
    for layout, (flags, _) in _split(layouts, ctx.needs_input_grad[6:]):
        want = [name for name, flag in flags.items() if flag]
        dense = bool(want) and layout.route is None
        routed_x = (
            need_x
            and x is not None  # not kept when only ∂L/∂x is wanted: the route needs the input
            and not dense
            and layout.route is not None
            and layout.route.input_grad_pays_off(tokens, weight_numel)
        )
        plans.append(_TermPlan(want, dense, routed_x, need_x and not routed_x))
    return _BackwardPlan(plans, need_x, need_w, need_b)


def _execute_backward(ctx: Any, plan: _BackwardPlan, x, weight, terms: list[DeltaTerm], grad: torch.Tensor):
    """Run the plan: rebuild ``W + Σ ΔW`` where needed, one base backward, then each term's factor gradients."""
    op, shape = ctx.op, ctx.shape
    # W + Σ rebuilt ΔW, keeping what the dense factor gradients reuse
    dense = {
        i: term.algorithm.dense_backward(term, p.want, shape)
        for i, (term, p) in enumerate(zip(terms, plan.terms))
        if p.dense
    }
    deltas, owned = [], True
    for i, (term, p) in enumerate(zip(terms, plan.terms)):
        if not p.rebuilt:
            continue
        deltas.append(dense[i].delta() if i in dense else term_delta(term, shape))
        owned = owned and (i not in dense or dense[i].owns_delta)
    merged = weight if plan.need_x else None
    if deltas:
        merged = _merged_weight(weight, sum_deltas(deltas), ctx.x_dtype, owned=len(deltas) > 1 or owned)
    del deltas
    stand_in = merged if merged is not None else (weight if weight is not None else grad.new_empty(()).expand(shape))
    grad_x, grad_weight = op.backward(grad, x, stand_in, merged is not None, plan.need_dense)
    del stand_in, merged

    factor_grads: dict[int, torch.Tensor] = {}
    by_dtype: dict[torch.dtype, torch.Tensor] = {}
    for i, (term, p) in enumerate(zip(terms, plan.terms)):
        if p.dense:
            found = dense.pop(i).grads(by_dtype.setdefault(term.dtype, grad_weight.to(term.dtype)))
        elif p.want or p.routed_x:
            found, share = structured_grads(term, p.want, x, grad, op, tuple(shape), input_grad=p.routed_x)
            if share is not None:
                grad_x = share if grad_x is None else grad_x.add_(share)
        else:
            continue
        factor_grads.update({id(term.params[name]): g for name, g in found.items()})
    grad_w = grad_weight.to(ctx.weight_dtype) if plan.need_w else None
    grad_b = op.bias_grad(grad) if plan.need_b else None
    return grad_x, grad_w, grad_b, factor_grads


class _AdaptedOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, weight, bias, op: BaseOp, shape, layouts, *tensors):
        terms = _terms(layouts, tensors)
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
        tensors = [t.detach() for t in tensors]
        plan = _plan_backward(ctx, x, grad)
        grad_x, grad_w, grad_b, factor_grads = _execute_backward(
            ctx, plan, x, weight, _terms(ctx.layouts, tensors), grad
        )
        return (grad_x, grad_w, grad_b, None, None, None, *[factor_grads.get(id(t)) for t in tensors])


def adapted_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    op: BaseOp,
    terms: Sequence[DeltaTerm],
    *,
    weight_shape: torch.Size | None = None,
    structured_grads: bool | None = None,
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
        route = None if structured_grads is False else term.algorithm.route(op, term.params, tuple(shape))
        if route is not None and structured_grads is None and not route.pays_off(math.prod(shape)):
            route = None
        layouts.append(_TermLayout(term.algorithm, tuple(term.params), term.scale, term.row_mask is not None, route))
    return _AdaptedOp.apply(x, weight, bias, op, shape, tuple(layouts), *tensors, *masks)
