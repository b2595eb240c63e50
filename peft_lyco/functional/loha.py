"""LoHa ΔW (Hadamard product of two low-rank or Tucker factorizations) with a factor-only custom backward.

Autograd through ``(w1_a @ w1_b) * (w2_a @ w2_b)`` would keep both weight-sized products alive for backward; the
functions below save only the factors and rebuild the products in backward (LyCORIS' memory rationale). The Tucker
backward contracts each side with its *own* chain; PEFT and sd-scripts use the other side's chain for ``w?_a``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .algorithm import Algorithm, DenseBackward, Pieces
from .factorization import LoHaLayout, loha_layout
from .pullback import pullback
from .structured import StructuredRoute
from .term import DeltaTerm, mask_rows
from .tucker import rebuild_tucker

LOHA_PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


def loha_products(
    w1_a: torch.Tensor,
    w1_b: torch.Tensor,
    w2_a: torch.Tensor,
    w2_b: torch.Tensor,
    t1: Optional[torch.Tensor] = None,
    t2: Optional[torch.Tensor] = None,
    *,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two weight-sized products whose Hadamard product is ΔW: ``w?_a @ w?_b`` (flat) or the Tucker rebuilds.

    ``scale`` goes into the first product through its smallest factor (``w1_a``, or the core ``t1``), so scaling ΔW
    costs no weight-sized pass.
    """
    if t1 is None:
        return (w1_a * scale if scale != 1 else w1_a) @ w1_b, w2_a @ w2_b
    return rebuild_tucker(t1 * scale if scale != 1 else t1, w1_a, w1_b), rebuild_tucker(t2, w2_a, w2_b)


def loha_as_lowrank(
    w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left, right)`` with ``left @ right == (w1_a @ w1_b) ⊙ (w2_a @ w2_b)`` for flat LoHa factors.

    The Hadamard product of a rank-r1 and a rank-r2 product has rank at most r1·r2:
    ``left[p, (j, k)] = w1_a[p, j]·w2_a[p, k]`` and ``right[(j, k), q] = w1_b[j, q]·w2_b[k, q]``.
    """
    left = (w1_a[:, :, None] * w2_a[:, None, :]).reshape(w1_a.shape[0], -1)
    right = (w1_b[:, None, :] * w2_b[None, :, :]).reshape(-1, w1_b.shape[1])
    return left, right


def loha_conv_macs(params: Mapping[str, torch.Tensor], weight_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates per output pixel of ``loha_conv_apply`` with these flat factors (kohya names)."""
    rank = params["hada_w1_a"].shape[1] * params["hada_w2_a"].shape[1]
    return rank * (math.prod(weight_shape[1:]) + weight_shape[0])


def loha_conv_apply(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    scale: float,
    weight_shape: tuple[int, ...],
    conv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``conv(x, ΔW)`` of a flat Conv2d LoHa without building ΔW: ``ΔW = left @ right`` (``loha_as_lowrank``), so a
    convolution with ``right`` as a rank-r1·r2 kernel (``conv`` applies the layer's stride/padding/dilation) followed
    by a 1x1 convolution with ``scale · left``."""
    left, right = loha_as_lowrank(params["hada_w1_a"], params["hada_w1_b"], params["hada_w2_a"], params["hada_w2_b"])
    inner = conv(x, right.reshape(right.shape[0], *weight_shape[1:]))
    return F.conv2d(inner, (left * scale)[:, :, None, None])


def hadamard(r1: torch.Tensor, r2: torch.Tensor, *, into_first: bool = False) -> torch.Tensor:
    """ΔW from the two products of ``loha_products`` (the one place the LoHa forward formula is written);
    ``into_first`` reuses ``r1``'s buffer when the products are not needed afterwards."""
    return torch.mul(r1, r2, out=r1) if into_first else r1 * r2


def _tucker_side_grads(grad_side, core, w_a, w_b, need):
    """Gradients ``(core, w_a, w_b)`` of one Tucker side given ``grad_side = ∂L/∂rebuild`` of that side (out, in, *k),
    written as matrix products on the weight's own layout (no permuted weight-sized copies)."""
    rank = core.shape[0]
    flat = grad_side.reshape(w_a.shape[1], -1)
    g_core = g_a = g_b = None
    if need[1]:
        inner = torch.einsum("i j ..., j q -> i q ...", core, w_b)
        g_a = inner.reshape(rank, -1) @ flat.T
    if need[0] or need[2]:
        back = (w_a @ flat).reshape(rank, w_b.shape[1], -1)
        if need[0]:
            g_core = torch.einsum("j q, i q k -> i j k", w_b, back).reshape(core.shape)
        if need[2]:
            g_b = torch.einsum("i j k, i q k -> j q", core.reshape(rank, rank, -1), back)
    return g_core, g_a, g_b


def loha_factor_grads(
    grad: torch.Tensor,
    r1: torch.Tensor,
    r2: torch.Tensor,
    w1_a: torch.Tensor,
    w1_b: torch.Tensor,
    w2_a: torch.Tensor,
    w2_b: torch.Tensor,
    t1: Optional[torch.Tensor] = None,
    t2: Optional[torch.Tensor] = None,
    *,
    scale: float,
    need: Sequence[bool] = (True,) * 6,
) -> tuple[Optional[torch.Tensor], ...]:
    """Gradients of ``(w1_a, w1_b, w2_a, w2_b, t1, t2)`` given ``grad = ∂L/∂ΔW`` and the products ``r1, r2``.

    ``r1``/``r2`` are what ``loha_products`` returned for this ``scale`` (``r1`` carries it) and are overwritten: each
    side's ``∂L/∂r = grad ⊙ r_other`` is formed in the other product's buffer, so the backward needs no weight-sized
    buffer of its own. Each Tucker side contracts with its *own* chain.
    """
    grad = grad.reshape(r1.shape)
    grads: list[Optional[torch.Tensor]] = [None] * 6
    # side 1's gradients get the scale its product carries; side 2's ∂L/∂r2 = grad ⊙ r1 has it already
    for a, b, t, other, w_a, w_b, core, side_scale in (
        (0, 1, 4, r2, w1_a, w1_b, t1, scale),
        (2, 3, 5, r1, w2_a, w2_b, t2, 1.0),
    ):
        if not (need[a] or need[b] or (core is not None and need[t])):
            continue
        side = other.mul_(grad)
        if core is None:
            found = (side @ w_b.T if need[a] else None, w_a.T @ side if need[b] else None, None)
        else:
            g_core, g_a, g_b = _tucker_side_grads(side, core, w_a, w_b, (need[t], need[a], need[b]))
            found = (g_a, g_b, g_core)
        for index, value in zip((a, b, t), found):
            grads[index] = value if value is None or side_scale == 1 else value * side_scale
    return tuple(grads)


class _HadaProduct(torch.autograd.Function):
    """``scale · products[0] ⊙ products[1]`` (flat or Tucker) saving only the factors; backward rebuilds the products."""

    @staticmethod
    def forward(ctx: Any, w1_a, w1_b, w2_a, w2_b, t1, t2, scale: float) -> torch.Tensor:
        ctx.save_for_backward(w1_a, w1_b, w2_a, w2_b, t1, t2)
        ctx.scale = scale
        return hadamard(*loha_products(w1_a, w1_b, w2_a, w2_b, t1, t2, scale=scale), into_first=True)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        factors = ctx.saved_tensors
        products = loha_products(*factors, scale=ctx.scale)
        grads = loha_factor_grads(grad, *products, *factors, scale=ctx.scale, need=ctx.needs_input_grad[:6])
        return (*grads, None)


def loha_delta_weight(
    w1_a: torch.Tensor,
    w1_b: torch.Tensor,
    w2_a: torch.Tensor,
    w2_b: torch.Tensor,
    t1: Optional[torch.Tensor] = None,
    t2: Optional[torch.Tensor] = None,
    *,
    scale: float = 1.0,
) -> torch.Tensor:
    """LoHa ΔW, scaled once by ``scale``.

    Flat (Linear, 1x1, kxk folded): returns ``(out, in * prod(kernel))``. Tucker (``t1``/``t2`` given, ``w?_a`` of
    shape ``(r, out)``): returns ``(out, in, *kernel)``.
    """
    if (t1 is None) != (t2 is None):
        raise ValueError("LoHa Tucker needs both hada_t1 and hada_t2 (or neither)")
    return _HadaProduct.apply(w1_a, w1_b, w2_a, w2_b, t1, t2, float(scale))


def _factors(params: Mapping[str, torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """The factors in ``LOHA_PARAMS`` order, ``None`` for the Tucker cores of a flat LoHa."""
    return [params.get(name) for name in LOHA_PARAMS]


class LoHa(Algorithm):
    """LoHa: ``ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``, flat or with Tucker cores ``hada_t1``/``hada_t2``."""

    name = "loha"
    param_names = LOHA_PARAMS

    layout_options = ("use_tucker",)

    def layout(self, out_features, in_features, kernel, rank, options, *, warn=True) -> LoHaLayout:
        return loha_layout(out_features, in_features, kernel, rank, options.get("use_tucker", False))

    def scalar_factor(self, params: Mapping[str, torch.Tensor]) -> str:
        return "hada_w1_a"

    def delta(self, params: Mapping[str, torch.Tensor], scale: float) -> torch.Tensor:
        return loha_delta_weight(*_factors(params), scale=scale)

    def linear_route(self, params: Mapping[str, torch.Tensor], io_elements: int) -> Optional[StructuredRoute]:
        if params.get("hada_t1") is not None:
            return None
        # two passes: its gradients are written out by hand (linear_grads)
        rank = params["hada_w1_a"].shape[1] * params["hada_w2_a"].shape[1]
        return StructuredRoute(rank * io_elements, io_elements, 2)

    def conv_macs(self, params: Mapping[str, torch.Tensor], weight_shape: tuple[int, ...]) -> Optional[int]:
        return None if params.get("hada_t1") is not None else loha_conv_macs(params, weight_shape)

    def conv_apply(self, x, params, scale, weight_shape, conv) -> torch.Tensor:
        return loha_conv_apply(x, params, scale, weight_shape, conv)

    def linear_grads(self, params, want, pieces: Pieces, scale, input_grad):
        """Flat Linear LoHa: ``y = scale · (x @ rightᵀ) @ leftᵀ`` with ``left @ right = ΔW/scale``. The gradients of
        ``left`` and ``right`` (and of x) take two products each per chunk, then the factors' through their small
        products once."""
        dtype = pieces[0][0].dtype

        def lowrank(*wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            factors = {**params, **dict(zip(want, wanted))}
            return loha_as_lowrank(*[factors[name].to(dtype) for name in LOHA_PARAMS[:4]])

        if want:
            (left, right), pull = pullback(lowrank, [params[name] for name in want])
        else:
            left, right = lowrank()
        grad_left = grad_right = None
        grad_x = []
        with torch.no_grad():
            for x, grad in pieces:
                grad_inner = grad @ left
                if input_grad:
                    grad_x.append((grad_inner @ right).mul_(scale))
                if want:
                    part_left, part_right = grad.T @ (x @ right.T), grad_inner.T @ x
                    grad_left = part_left if grad_left is None else grad_left.add_(part_left)
                    grad_right = part_right if grad_right is None else grad_right.add_(part_right)
        grads = pull((grad_left.mul_(scale), grad_right.mul_(scale))) if want else ()
        return grads, grad_x

    def dense_backward(self, term: DeltaTerm, want: Sequence[str], shape: torch.Size) -> DenseBackward:
        return _LoHaDenseBackward(term, want, shape)


class _LoHaDenseBackward:
    """The dense route for LoHa: the two products, built once, give ΔW and then (overwritten) the factor gradients
    through LoHa's factor-only backward."""

    owns_delta = True

    def __init__(self, term: DeltaTerm, want: Sequence[str], shape: torch.Size):
        self.term, self.want, self.shape = term, list(want), shape
        self.products = loha_products(*_factors(term.params), scale=term.scale)

    def delta(self) -> torch.Tensor:
        return mask_rows(hadamard(*self.products).reshape(self.shape), self.term.row_mask)

    def grads(self, grad_weight: torch.Tensor) -> dict[str, torch.Tensor]:
        term = self.term
        if term.row_mask is not None:
            grad_weight = grad_weight * term.row_mask.view(-1, *[1] * (grad_weight.dim() - 1)).to(grad_weight.dtype)
        need = [name in self.want for name in LOHA_PARAMS]
        grads = loha_factor_grads(grad_weight, *self.products, *_factors(term.params), scale=term.scale, need=need)
        return {name: g for name, g in zip(LOHA_PARAMS, grads) if name in self.want}


LOHA = LoHa()
