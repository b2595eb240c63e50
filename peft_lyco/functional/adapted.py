"""One op per adapted layer: ``op(x, W + Σ ΔW_i)`` for any number of adapters, keeping for backward only what it needs.

Autograd through ``op(x, W + ΔW)`` keeps the weight-sized ``W + ΔW`` alive until backward. The custom function here
keeps the input, a reference to the weight and the small factors. Its forward is bit for bit the merged layer's.
Its backward first plans, per adapter, the cheaper of two routes, then executes the plan:

* dense: rebuild ``W + ΣΔW`` for ∂L/∂x and form ``G = ∂L/∂W`` once; each algorithm turns ``G`` into its factor
  gradients reusing what it built for the rebuild (LoHa: its products' small factor pairs; LoKr: its Kronecker
  product's graph);
* structured (``structured.py``): the factor gradients, and where cheaper the adapter's share of ∂L/∂x, straight from
  the input and the output gradient through a product that never builds ΔW; a route that is not accurate in half
  precision (Tucker LoHa's convolutions) only where the products run in float32 or wider.

Precision: the products run in one compute dtype (``compute_dtype``): autocast's where it is on, as ``F.linear`` and
``F.conv2d`` would under it, else the weight's. ``W + ΣΔW`` is summed in at least float32 and cast once to it; the
input is kept in it (as autocast keeps its cast copy); gradients come back in each input's own dtype. A weight stored
in float8 is upcast inside the op for each call and never kept upcast. Backward runs outside forward's autocast, so
where autocast cast the factors (float32 factors, bf16 autocast) the ΔW for the rebuilt weight is formed again under
forward's autocast, bit for bit forward's, while the dense factor gradients keep products in the factors' own dtype
(as accurate as plain autograd's) and are prepared after the base backward. Nothing in forward or backward breaks a
``torch.compile`` graph (the factor derivatives go through ``pullback``; an autocast context traces).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from .algorithm import Algorithm, DenseBackward
from .autocast import AUTOCAST_ELIGIBLE, autocast_dtype
from .base_op import BaseOp, LinearOp
from .delta import FLOAT8_DTYPES, add_delta, add_delta_into, summation_dtype
from .dora import WeightDecompose, decompose_backward, decompose_scale
from .structured import StructuredRoute, structured_grads
from .term import DeltaTerm, term_delta

__all__ = [
    "DeltaTerm",
    "adapted_op",
    "compute_dtype",
    "inference_forward",
    "inference_weight",
    "merged_weight",
    "structured_grads_pay_off",
    "sum_deltas",
    "term_delta",
]


def compute_dtype(x: torch.Tensor, weight: torch.Tensor | None) -> torch.dtype:
    """The dtype a layer's products run in: autocast's where it is on for the input's device (what ``F.linear`` and
    ``F.conv2d`` would run in), else the weight's (the input's for a float8 weight, which is storage only, or for no
    weight)."""
    autocast = autocast_dtype(x.device.type)
    if x.dtype in AUTOCAST_ELIGIBLE and autocast is not None:
        return autocast
    if weight is None or weight.dtype in FLOAT8_DTYPES:
        return x.dtype
    return weight.dtype


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return None if tensor is None or dtype is None else tensor.to(dtype)


def sum_deltas(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ ΔW in the first adapter's dtype, in order (one summation rule for forward and the rebuild in backward)."""
    total = deltas[0]
    for delta in deltas[1:]:
        total = total + delta.to(total.dtype)
    return total


def _route(
    op: BaseOp,
    term: DeltaTerm,
    weight_shape: torch.Size,
    compute: torch.dtype,
    structured_grads: bool | None,
    device_type: str,
) -> StructuredRoute | None:
    """The structured route the term's factor gradients take when the layer's products run in ``compute`` on
    ``device_type``, or ``None`` for the dense route. ``structured_grads`` as ``adapted_op``'s; a route is only taken
    where it is accurate in ``compute`` (on CUDA with cuDNN's TF32 on, float32 convolutions round their operands to
    TF32), and never for DoRA, whose factor gradients come from ∂L/∂V."""
    if structured_grads is False or term.decompose is not None:
        return None
    route = term.algorithm.route(op, term.params, tuple(weight_shape))
    tf32 = device_type == "cuda" and torch.backends.cudnn.allow_tf32
    if route is None or not route.accurate_in(compute, tf32=tf32):
        return None
    if structured_grads is None and not route.pays_off(math.prod(weight_shape)):
        return None
    return route


def structured_grads_pay_off(
    op: BaseOp, term: DeltaTerm, weight_shape: torch.Size, compute: torch.dtype, *, device_type: str = "cpu"
) -> bool:
    """Whether the term's factor gradients take the structured route when the layer's products run in ``compute``
    (``compute_dtype`` of the call) on ``device_type``: one exists, is accurate there and is cheaper than the dense
    weight gradient."""
    return _route(op, term, weight_shape, compute, None, device_type) is not None


def _merged_weight(
    weight: torch.Tensor | None, total: torch.Tensor, dtype: torch.dtype, *, owned: bool = True
) -> torch.Tensor:
    """``W + ΣΔW`` summed as ``add_delta`` does (inside ``total`` when it is the caller's own temporary) and cast once
    to ``dtype``; without a base weight (bypass) just ΣΔW in ``dtype``."""
    if weight is None:
        return total.to(dtype)
    return add_delta_into(weight, total, dtype=dtype) if owned else add_delta(weight, total, dtype=dtype)


def merged_weight(
    weight: torch.Tensor | None, terms: Sequence[DeltaTerm], deltas: Sequence[torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """The layer's weight for these terms and their ΔW: ``W + Σ ΔW`` (``_merged_weight``) when no term is DoRA, else
    ``W + Σ additive ΔW + Σ_DoRA (s ⊙ (W + ΔW) − W)`` formed in at least float32 and cast once, to ``dtype``."""
    if not any(term.decompose is not None for term in terms):
        return _merged_weight(weight, sum_deltas(list(deltas)), dtype)
    return _decomposed_merge(weight, terms, deltas, dtype)[0]


def _decomposed_merge(
    weight: torch.Tensor | None,
    terms: Sequence[DeltaTerm],
    deltas: Sequence[torch.Tensor | None],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]]:
    """``(M, parts)`` for terms with DoRA: ``parts[i]`` is ``(V, s, ‖V‖)`` of DoRA term i (``None`` for additive ones),
    ``M`` the merged weight in ``dtype``. ``deltas[i]`` may be ``None`` for an additive term whose ΔW does not take
    part (its input gradient goes through its structured route)."""
    if weight is None:
        raise ValueError(
            "DoRA (weight_decompose) needs the base weight: it cannot be applied on top of another tuner layer"
        )
    compute = summation_dtype(weight.dtype)
    for term, delta in zip(terms, deltas):
        if delta is not None:
            compute = torch.promote_types(compute, delta.dtype)
        if term.decompose is not None:
            compute = torch.promote_types(compute, term.decompose.magnitude.dtype)
    w = weight.to(compute)
    additive = [d for t, d in zip(terms, deltas) if t.decompose is None and d is not None]
    total = w + sum_deltas(additive).reshape(w.shape).to(compute) if additive else w
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = []
    lone = not additive and sum(t.decompose is not None for t in terms) == 1
    for term, delta in zip(terms, deltas):
        if term.decompose is None:
            parts.append(None)
            continue
        v = w + delta.reshape(w.shape).to(compute)
        scale, norm = decompose_scale(v, term.decompose)
        parts.append((v, scale, norm))
        total = scale * v if lone else total + (scale * v - w)
    return total.to(dtype), parts


@dataclass(frozen=True)
class _TermLayout:
    """What the autograd function needs to rebuild a term from its flat tensors, and the route its factors take."""

    algorithm: Algorithm
    names: tuple[str, ...]
    scale: float
    masked: bool
    route: StructuredRoute | None  # set when the factor gradients take the structured route
    decompose: tuple[bool, float] | None = None  # DoRA: (on_output, multiplier); its magnitude is a flat tensor


def _terms(layouts: Sequence[_TermLayout], flat: Sequence[Any]) -> list[DeltaTerm]:
    """The terms behind the flat list the autograd function receives (factors, then masks, then magnitudes)."""
    return [
        DeltaTerm(
            layout.algorithm,
            params,
            layout.scale,
            mask,
            None if layout.decompose is None else WeightDecompose(magnitude, *layout.decompose),
        )
        for layout, (params, mask, magnitude) in _split(layouts, flat)
    ]


def _split(layouts: Sequence[_TermLayout], flat: Sequence[Any]) -> list[tuple[_TermLayout, tuple[dict, Any, Any]]]:
    """Per term, its entries of the flat list: a dict by factor name, its mask and its DoRA magnitude (or ``None``)."""
    out, pos = [], 0
    factors = sum(len(layout.names) for layout in layouts)
    masks = iter(flat[factors:])
    magnitudes = iter(flat[factors + sum(layout.masked for layout in layouts) :])
    for layout in layouts:
        params = dict(zip(layout.names, flat[pos : pos + len(layout.names)]))
        mask = next(masks) if layout.masked else None
        magnitude = next(magnitudes) if layout.decompose is not None else None
        out.append((layout, (params, mask, magnitude)))
        pos += len(layout.names)
    return out


@dataclass(frozen=True)
class _TermPlan:
    """How one term takes part in the backward: which factor gradients, by which route, and its share of ∂L/∂x."""

    want: list[str]  # factors whose gradient is wanted
    want_magnitude: bool  # DoRA: the magnitude's gradient is wanted
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
        return self.need_w or any(t.dense or t.want_magnitude for t in self.terms)


def _plan_backward(ctx: Any, x: torch.Tensor | None, grad: torch.Tensor) -> _BackwardPlan:
    """Decide each term's route from what is wanted and the cost model; nothing is computed here."""
    op, layouts = ctx.op, ctx.layouts
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    weight_numel = math.prod(ctx.shape)
    tokens = grad.numel() // grad.shape[-1 if isinstance(op, LinearOp) else 1]
    plans = []
    decomposed = any(layout.decompose is not None for layout in layouts)
    for layout, (flags, _, magnitude_flag) in _split(layouts, ctx.needs_input_grad[6:]):
        want = [name for name, flag in flags.items() if flag]
        dense = bool(want) and layout.route is None
        routed_x = (
            not decomposed  # with DoRA every ΔW goes into the rebuilt weight
            and need_x
            and x is not None  # not kept when only ∂L/∂x is wanted: the route needs the input
            and not dense
            and layout.route is not None
            and layout.route.input_grad_pays_off(tokens, weight_numel)
        )
        rebuilt = need_x and not routed_x
        if layout.decompose is not None:  # DoRA's gradients need V = W + ΔW whatever is wanted
            rebuilt = need_x or bool(want) or bool(magnitude_flag)
        plans.append(_TermPlan(want, bool(magnitude_flag), dense, routed_x, rebuilt))
    return _BackwardPlan(plans, need_x, need_w, need_b)


def _autocast_state(x: torch.Tensor) -> tuple[str, torch.dtype] | None:
    """``(device type, dtype)`` of the autocast that is on for the input's device, or ``None``: forward builds ΔW's
    products under it, and the backward's rebuild of ``W + ΣΔW`` repeats that (``_rebuilds_under_autocast``)."""
    dtype = autocast_dtype(x.device.type)
    return None if dtype is None else (x.device.type, dtype)


def _rebuilds_under_autocast(ctx: Any, term: DeltaTerm) -> bool:
    """Whether the term's ΔW for the rebuilt weight is formed again under forward's autocast, apart from the products
    its dense factor gradients use: autocast cast its factors to another dtype in forward, so products formed in the
    factors' own dtype (which keep the factor gradients as accurate as plain autograd's) round differently."""
    return ctx.autocast is not None and term.dtype in AUTOCAST_ELIGIBLE and term.dtype != ctx.autocast[1]


def _prepare_dense(ctx: Any, plan: _BackwardPlan, terms: list[DeltaTerm]) -> dict[int, DenseBackward]:
    """The dense factor gradients prepared before the rebuild, whose ΔW the rebuild reuses; those of terms rebuilt
    under autocast are prepared after the base backward (``_dense``), so their products never coexist with it."""
    return {
        i: term.algorithm.dense_backward(term, p.want, ctx.shape)
        for i, (term, p) in enumerate(zip(terms, plan.terms))
        if p.dense and not (p.rebuilt and _rebuilds_under_autocast(ctx, term))
    }


def _dense(ctx: Any, dense: dict[int, DenseBackward], i: int, term: DeltaTerm, p: _TermPlan) -> DenseBackward:
    """Term ``i``'s dense factor gradients: the prepared ones, or prepared now."""
    return dense.pop(i) if i in dense else term.algorithm.dense_backward(term, p.want, ctx.shape)


def _rebuilt_delta(ctx: Any, dense: dict[int, DenseBackward], i: int, term: DeltaTerm) -> tuple[torch.Tensor, bool]:
    """Term ``i``'s ΔW for the rebuilt weight, bit for bit the one forward built, and whether it may be summed into."""
    if _rebuilds_under_autocast(ctx, term):
        device, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype):
            return term_delta(term, ctx.shape), True
    if i in dense:
        return dense[i].delta(), dense[i].owns_delta
    return term_delta(term, ctx.shape), True


def _execute_backward(ctx: Any, plan: _BackwardPlan, x, weight, terms: list[DeltaTerm], grad: torch.Tensor):
    """Run the plan: rebuild ``W + Σ ΔW`` where needed, one base backward, then each term's factor gradients."""
    op, shape = ctx.op, ctx.shape
    if any(term.decompose is not None for term in terms):
        return _execute_decomposed(ctx, plan, x, weight, terms, grad)
    # W + Σ rebuilt ΔW, keeping what the dense factor gradients reuse
    dense = _prepare_dense(ctx, plan, terms)
    deltas, owned = [], True
    for i, (term, p) in enumerate(zip(terms, plan.terms)):
        if not p.rebuilt:
            continue
        delta, delta_owned = _rebuilt_delta(ctx, dense, i, term)
        deltas.append(delta)
        owned = owned and delta_owned
    merged = _cast(weight, ctx.compute) if plan.need_x else None
    if deltas:
        merged = _merged_weight(weight, sum_deltas(deltas), ctx.compute, owned=len(deltas) > 1 or owned)
    del deltas
    stand_in = merged if merged is not None else (weight if weight is not None else grad.new_empty(()).expand(shape))
    grad_x, grad_weight = op.backward(grad, x, stand_in, merged is not None, plan.need_dense)
    del stand_in, merged

    factor_grads: dict[int, torch.Tensor] = {}
    by_dtype: dict[torch.dtype, torch.Tensor] = {}
    for i, (term, p) in enumerate(zip(terms, plan.terms)):
        if p.dense:
            found = _dense(ctx, dense, i, term, p).grads(by_dtype.setdefault(term.dtype, grad_weight.to(term.dtype)))
        elif p.want or p.routed_x:
            found, share = structured_grads(term, p.want, x, grad, op, tuple(shape), input_grad=p.routed_x)
            if share is not None:
                grad_x = share if grad_x is None else grad_x.add_(share)
        else:
            continue
        factor_grads.update({id(term.params[name]): g for name, g in found.items()})
    grad_w = grad_weight.to(ctx.weight_dtype) if plan.need_w else None
    return grad_x, grad_w, factor_grads


def _execute_decomposed(ctx: Any, plan: _BackwardPlan, x, weight, terms: list[DeltaTerm], grad: torch.Tensor):
    """The plan's execution when a term is DoRA: every wanted ΔW goes into ``M`` (``_decomposed_merge``), ``G = ∂L/∂M``
    is formed once, and each DoRA term's ``∂L/∂V`` (``decompose_backward``) feeds its factor gradients."""
    op, shape = ctx.op, ctx.shape
    dense = _prepare_dense(ctx, plan, terms)
    deltas = [
        _rebuilt_delta(ctx, dense, i, term)[0] if p.rebuilt else None
        for i, (term, p) in enumerate(zip(terms, plan.terms))
    ]
    merged, parts = _decomposed_merge(weight, terms, deltas, ctx.compute)
    del deltas
    grad_x, grad_merged = op.backward(grad, x, merged, plan.need_x, plan.need_dense)
    del merged
    found_grads: dict[int, torch.Tensor] = {}
    grad_w = grad_merged.clone() if plan.need_w else None
    for i, (term, p, part) in enumerate(zip(terms, plan.terms, parts)):
        found: dict[str, torch.Tensor] = {}
        if part is not None and (p.want or p.want_magnitude or plan.need_w):
            v, scale, norm = part
            grad_v, grad_magnitude = decompose_backward(grad_merged.to(v.dtype), v, scale, norm, term.decompose)
            if grad_w is not None:
                grad_w += (grad_v - grad_merged.to(v.dtype)).to(grad_w.dtype)
            if p.want_magnitude:
                magnitude = term.decompose.magnitude
                found_grads[id(magnitude)] = grad_magnitude.to(magnitude.dtype)
            if p.dense:
                found = _dense(ctx, dense, i, term, p).grads(grad_v.to(term.dtype))
        elif p.dense:
            found = _dense(ctx, dense, i, term, p).grads(grad_merged.to(term.dtype))
        elif p.want:
            found, _ = structured_grads(term, p.want, x, grad, op, tuple(shape), input_grad=False)
        found_grads.update({id(term.params[name]): g for name, g in found.items()})
    grad_w = grad_w.to(ctx.weight_dtype) if plan.need_w else None
    return grad_x, grad_w, found_grads


def inference_weight(
    x: torch.Tensor, weight: torch.Tensor | None, terms: Sequence[DeltaTerm], shape: torch.Size
) -> torch.Tensor:
    """The weight a call runs its op on: ``W + ΣΔW`` (``merged_weight``), or ΣΔW without a base weight, in the call's
    compute dtype; the fused op's forward builds it here too. ``inference_forward`` of it is ``adapted_op``'s no-grad
    result, bit for bit, so a caller may keep it and reuse it while nothing it was built from changed."""
    compute = compute_dtype(x, weight)
    return merged_weight(weight, terms, [term_delta(t, shape) for t in terms], compute)


def inference_forward(x: torch.Tensor, merged: torch.Tensor, bias: torch.Tensor | None, op: BaseOp) -> torch.Tensor:
    """``op(x, merged, bias)`` in ``merged``'s dtype (the compute dtype ``inference_weight`` formed it in)."""
    return op.forward(x.to(merged.dtype), merged, _cast(bias, merged.dtype))


class _AdaptedOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, weight, bias, op: BaseOp, shape, layouts, *tensors):
        terms = _terms(layouts, tensors)
        compute = compute_dtype(x, weight)
        need = ctx.needs_input_grad
        ctx.op, ctx.shape, ctx.layouts, ctx.compute = op, shape, layouts, compute
        ctx.autocast = _autocast_state(x)
        ctx.x_dtype, ctx.bias_dtype = x.dtype, None if bias is None else bias.dtype
        ctx.weight_dtype = None if weight is None else weight.dtype
        merged = inference_weight(x, weight, terms, shape)  # the same weight a call without gradients runs on
        x = x.to(compute)  # kept in the compute dtype, as autocast keeps its cast copy
        # the input is needed for any weight-side gradient, and by a convolution's input gradient (as the base keeps it)
        keep_x = need[1] or any(need[6:]) or (need[0] and not isinstance(op, LinearOp))
        keep_weight = need[0] or any(layout.decompose is not None for layout in layouts)  # DoRA's V = W + ΔW
        ctx.save_for_backward(x if keep_x else None, weight if keep_weight else None, *tensors)
        return op.forward(x, merged, _cast(bias, compute))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):
        x, weight, *tensors = ctx.saved_tensors
        tensors = [t.detach() for t in tensors]
        grad = grad.to(ctx.compute)
        plan = _plan_backward(ctx, x, grad)
        grad_x, grad_w, factor_grads = _execute_backward(ctx, plan, x, weight, _terms(ctx.layouts, tensors), grad)
        grad_b = ctx.op.bias_grad(grad).to(ctx.bias_dtype) if plan.need_b else None
        return (
            _cast(grad_x, ctx.x_dtype),
            grad_w,
            grad_b,
            None,
            None,
            None,
            *[factor_grads.get(id(t)) for t in tensors],
        )


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
    wherever one exists, ``False`` never (tests compare the routes). Either way a route is only taken where it is
    accurate in the call's compute dtype (``compute_dtype``): Tucker LoHa's convolution route needs float32 or wider.
    """
    if not terms:
        raise ValueError("adapted_op needs at least one adapter term")
    shape = weight.shape if weight is not None else torch.Size(weight_shape)
    tensors = [t for term in terms for t in term.params.values()]
    masks = [term.row_mask for term in terms if term.row_mask is not None]
    magnitudes = [term.decompose.magnitude for term in terms if term.decompose is not None]
    if weight is not None and weight.requires_grad and weight.dtype in FLOAT8_DTYPES:
        raise ValueError(
            f"a base weight stored in {weight.dtype} cannot be trained: freeze it, or keep it in bf16/fp32"
        )
    trainable = [x, weight, bias, *tensors, *magnitudes]
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in trainable if t is not None):
        return inference_forward(x, inference_weight(x, weight, terms, shape), bias, op)
    layouts = []
    compute = compute_dtype(x, weight)
    for term in terms:
        decompose = None if term.decompose is None else (term.decompose.on_output, term.decompose.multiplier)
        route = _route(op, term, shape, compute, structured_grads, x.device.type)
        masked = term.row_mask is not None
        layouts.append(_TermLayout(term.algorithm, tuple(term.params), term.scale, masked, route, decompose))
    return _AdaptedOp.apply(x, weight, bias, op, shape, tuple(layouts), *tensors, *masks, *magnitudes)
