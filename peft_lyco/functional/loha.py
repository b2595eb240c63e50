"""LoHa ΔW (Hadamard product of two low-rank or Tucker factorizations) with a factor-only custom backward.

Autograd through ``(w1_a @ w1_b) * (w2_a @ w2_b)`` would keep both weight-sized products alive for backward; the
functions below save only the factors and rebuild the products in backward (LyCORIS' memory rationale). Both products
are written as ``left @ right`` pairs (flat factors, or a Tucker side's ``tucker_pair``), so one blocked loop forms ΔW
and one turns ``∂L/∂ΔW`` into the pairs' gradients. The Tucker backward contracts each side with its *own* chain;
PEFT and sd-scripts use the other side's chain for ``w?_a``.

On CPU the loops run over blocks of rows whose two products stay in cache while they are multiplied: ΔW is written
once and ``∂L/∂ΔW`` read once, where whole products would each be written, read back and multiplied in main memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .algorithm import Algorithm, DenseBackward, Pieces
from .autocast import autocast_dtype
from .factorization import LoHaLayout, loha_layout
from .pullback import pullback
from .structured import StructuredRoute
from .term import DeltaTerm, mask_rows
from .tucker import tucker_pair, tucker_pair_grads

LOHA_PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

# On CPU, weight-sized products are formed this many elements (a block of rows) at a time: a block's two products and
# its rows of ΔW or ∂L/∂ΔW (4 MiB each in float32) stay in the last-level cache while they are combined. Smaller blocks
# measured no faster and cost more operator calls.
BLOCK_ELEMENTS = 1 << 20

Pair = tuple[torch.Tensor, torch.Tensor]


def loha_pairs(
    w1_a: torch.Tensor,
    w1_b: torch.Tensor,
    w2_a: torch.Tensor,
    w2_b: torch.Tensor,
    t1: torch.Tensor | None = None,
    t2: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
) -> tuple[Pair, Pair]:
    """The two weight-sized products whose Hadamard product is ΔW, each as ``(left, right)`` with the product
    ``left @ right`` of shape ``(out, in · prod(kernel))``: ``(w?_a, w?_b)`` flat, ``tucker_pair`` with Tucker cores.

    ``scale`` goes into the first pair through its smallest factor (``w1_a``, or the core ``t1``), so scaling ΔW
    costs no weight-sized pass.
    """
    if t1 is None:
        return (w1_a * scale if scale != 1 else w1_a, w1_b), (w2_a, w2_b)
    return tucker_pair(t1 * scale if scale != 1 else t1, w1_a, w1_b), tucker_pair(t2, w2_a, w2_b)


def _row_blocks(rows: int, cols: int, device: torch.device) -> list[slice]:
    """The blocks of rows the weight-sized loops take: cache-sized on CPU; one block on accelerators (whose memory
    bandwidth makes blocking a loss of kernel launches) and under ``torch.compile`` (which fuses the loop itself)."""
    if device.type != "cpu" or torch.compiler.is_compiling():
        return [slice(0, rows)]
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def hadamard_of_pairs(first: Pair, second: Pair) -> torch.Tensor:
    """ΔW ``= (first[0] @ first[1]) ⊙ (second[0] @ second[1])``, flat ``(out, in · prod(kernel))`` (the one place the
    LoHa forward formula is written), formed block of rows by block of rows (``_row_blocks``).

    Each block's first product is written straight into ΔW; under autocast (whose casts ``out=`` products skip) the
    blocks are plain products copied in, so the dtypes and bits are those of the unblocked formula either way.
    """
    (a1, b1), (a2, b2) = first, second
    blocks = _row_blocks(a1.shape[0], b1.shape[1], a1.device)
    if len(blocks) == 1:
        return (a1 @ b1).mul_(a2 @ b2)
    autocast = autocast_dtype(a1.device.type) is not None
    delta = None if autocast else a1.new_empty(a1.shape[0], b1.shape[1])
    for rows in blocks:
        if autocast:
            block = (a1[rows] @ b1).mul_(a2[rows] @ b2)
            if delta is None:
                delta = block.new_empty(a1.shape[0], b1.shape[1])
            delta[rows] = block
        else:
            torch.mm(a1[rows], b1, out=delta[rows]).mul_(a2[rows] @ b2)
    return delta


def hadamard_pair_grads(
    grad: torch.Tensor, first: Pair, second: Pair, need: Sequence[bool]
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``(first[0], first[1], second[0], second[1])`` (``None`` where ``need`` is false) given
    ``grad = ∂L/∂ΔW`` flat ``(out, in · prod(kernel))``: each side's ``∂L/∂product = grad ⊙ other product``, formed
    block of rows by block of rows with the products rebuilt inside the block (``_row_blocks``)."""
    (a1, b1), (a2, b2) = first, second
    need_first, need_second = need[0] or need[1], need[2] or need[3]
    g_a1 = a1.new_empty(a1.shape) if need[0] else None
    g_a2 = a2.new_empty(a2.shape) if need[2] else None
    g_b1 = g_b2 = None
    for rows in _row_blocks(grad.shape[0], grad.shape[1], grad.device):
        part = grad[rows]
        # side 1's ∂L/∂r1 = grad ⊙ r2 is formed in r2's block buffer, side 2's in r1's
        side1 = (a2[rows] @ b2).mul_(part) if need_first else None
        side2 = (a1[rows] @ b1).mul_(part) if need_second else None
        for side, a, b, g_a, index in ((side1, a1, b1, g_a1, 0), (side2, a2, b2, g_a2, 2)):
            if side is None:
                continue
            if g_a is not None:
                g_a[rows] = side @ b.T
            if need[index + 1]:
                found = a[rows].T @ side
                if index == 0:
                    g_b1 = found if g_b1 is None else g_b1.add_(found)
                else:
                    g_b2 = found if g_b2 is None else g_b2.add_(found)
    return g_a1, g_b1, g_a2, g_b2


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


def loha_tucker_as_lowrank(
    params: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(left, core, right)`` of a Tucker LoHa (kohya names) with ΔW ``= left ×₀ core ×₁ rightᵀ``: the Hadamard
    product of two Tucker rebuilds is one Tucker form of rank r1·r2, ``left[p, (i, k)] = w1_a[i, p]·w2_a[k, p]``,
    ``right[(j, l), q] = w1_b[j, q]·w2_b[l, q]`` and ``core[(i, k), (j, l), …] = t1[i, j, …]·t2[k, l, …]``."""
    w1_a, w1_b, w2_a, w2_b = (params[name] for name in LOHA_PARAMS[:4])
    t1, t2 = params["hada_t1"], params["hada_t2"]
    left = (w1_a.T[:, :, None] * w2_a.T[:, None, :]).reshape(w1_a.shape[1], -1)
    right = (w1_b[:, None, :] * w2_b[None, :, :]).reshape(-1, w1_b.shape[1])
    core = (t1[:, None, :, None] * t2[None, :, None, :]).reshape(left.shape[1], right.shape[0], *t1.shape[2:])
    return left, core, right


def loha_conv_macs(params: Mapping[str, torch.Tensor], weight_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates per output pixel of ``loha_conv_apply`` with these factors (kohya names): flat, the
    rank-r1·r2 kernel and the 1x1 back to ``out``; Tucker, two 1x1 convolutions around the r1·r2-channel core
    (the first counted once per output pixel, as with stride 1)."""
    if params.get("hada_t1") is not None:
        t1, t2 = params["hada_t1"], params["hada_t2"]
        rank_out, rank_in = t1.shape[0] * t2.shape[0], t1.shape[1] * t2.shape[1]
        kernel = math.prod(weight_shape[2:])
        return rank_in * weight_shape[1] + rank_out * rank_in * kernel + rank_out * weight_shape[0]
    rank = params["hada_w1_a"].shape[1] * params["hada_w2_a"].shape[1]
    return rank * (math.prod(weight_shape[1:]) + weight_shape[0])


def loha_conv_apply(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    scale: float,
    weight_shape: tuple[int, ...],
    conv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``conv(x, ΔW)`` of a Conv2d LoHa without building ΔW (``conv`` applies the layer's stride/padding/dilation).

    Flat: ``ΔW = left @ right`` (``loha_as_lowrank``), so a convolution with ``right`` as a rank-r1·r2 kernel, then a
    1x1 convolution with ``scale · left``. Tucker (``loha_tucker_as_lowrank``): a 1x1 convolution with ``right``, the
    r1·r2-channel core convolution, a 1x1 convolution with ``scale · left``.
    """
    if params.get("hada_t1") is not None:
        left, core, right = loha_tucker_as_lowrank(params)
        inner = conv(F.conv2d(x, right[:, :, None, None]), core)
        return F.conv2d(inner, (left * scale)[:, :, None, None])
    left, right = loha_as_lowrank(params["hada_w1_a"], params["hada_w1_b"], params["hada_w2_a"], params["hada_w2_b"])
    inner = conv(x, right.reshape(right.shape[0], *weight_shape[1:]))
    return F.conv2d(inner, (left * scale)[:, :, None, None])


def _delta_shape(w1_a: torch.Tensor, w1_b: torch.Tensor, t1: torch.Tensor | None) -> tuple[int, ...]:
    """ΔW's shape: ``(out, in · prod(kernel))`` flat, ``(out, in, *kernel)`` Tucker."""
    return (w1_a.shape[0], w1_b.shape[1]) if t1 is None else (w1_a.shape[1], w1_b.shape[1], *t1.shape[2:])


def loha_factor_grads(
    grad: torch.Tensor,
    w1_a: torch.Tensor,
    w1_b: torch.Tensor,
    w2_a: torch.Tensor,
    w2_b: torch.Tensor,
    t1: torch.Tensor | None = None,
    t2: torch.Tensor | None = None,
    *,
    scale: float,
    need: Sequence[bool] = (True,) * 6,
    pairs: tuple[Pair, Pair] | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``(w1_a, w1_b, w2_a, w2_b, t1, t2)`` given ``grad = ∂L/∂ΔW`` (``None`` where ``need`` is false).

    The products are rebuilt block by block (``hadamard_pair_grads``) from ``pairs`` (``loha_pairs`` of these
    factors and ``scale``, built here if not given); each Tucker side contracts with its *own* chain.
    """
    first, second = pairs if pairs is not None else loha_pairs(w1_a, w1_b, w2_a, w2_b, t1, t2, scale=scale)
    tucker = t1 is not None
    need_pair = (need[0], need[1] or (tucker and need[4]), need[2], need[3] or (tucker and need[5]))
    g_a1, g_b1, g_a2, g_b2 = hadamard_pair_grads(grad.reshape(grad.shape[0], -1), first, second, need_pair)
    if not tucker:  # the scale sits in the first pair's left factor w1_a · scale
        return (None if g_a1 is None else g_a1.mul_(scale) if scale != 1 else g_a1, g_b1, g_a2, g_b2, None, None)
    g_t1, g_w1_a, g_w1_b = tucker_pair_grads(g_a1, g_b1, t1 * scale if scale != 1 else t1, w1_a, w1_b)
    g_t2, g_w2_a, g_w2_b = tucker_pair_grads(g_a2, g_b2, t2, w2_a, w2_b)
    if g_t1 is not None and scale != 1:  # the first core carries the scale
        g_t1 = g_t1.mul_(scale)
    found = (g_w1_a, g_w1_b, g_w2_a, g_w2_b, g_t1, g_t2)
    return tuple(value if wanted else None for value, wanted in zip(found, need))


class _HadaProduct(torch.autograd.Function):
    """``scale · products[0] ⊙ products[1]`` (flat or Tucker) saving only the factors; backward rebuilds the products."""

    @staticmethod
    def forward(ctx: Any, w1_a, w1_b, w2_a, w2_b, t1, t2, scale: float) -> torch.Tensor:
        ctx.save_for_backward(w1_a, w1_b, w2_a, w2_b, t1, t2)
        ctx.scale = scale
        pairs = loha_pairs(w1_a, w1_b, w2_a, w2_b, t1, t2, scale=scale)
        return hadamard_of_pairs(*pairs).reshape(_delta_shape(w1_a, w1_b, t1))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        grads = loha_factor_grads(grad, *ctx.saved_tensors, scale=ctx.scale, need=ctx.needs_input_grad[:6])
        return (*grads, None)


def loha_delta_weight(
    w1_a: torch.Tensor,
    w1_b: torch.Tensor,
    w2_a: torch.Tensor,
    w2_b: torch.Tensor,
    t1: torch.Tensor | None = None,
    t2: torch.Tensor | None = None,
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


def _factors(params: Mapping[str, torch.Tensor]) -> list[torch.Tensor | None]:
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

    def linear_route(self, params: Mapping[str, torch.Tensor], io_elements: int) -> StructuredRoute | None:
        if params.get("hada_t1") is not None:
            return None
        # two passes: its gradients are written out by hand (linear_grads)
        rank = params["hada_w1_a"].shape[1] * params["hada_w2_a"].shape[1]
        return StructuredRoute(rank * io_elements, io_elements, 2)

    def conv_macs(self, params: Mapping[str, torch.Tensor], weight_shape: tuple[int, ...]) -> int | None:
        return loha_conv_macs(params, weight_shape)

    def conv_apply_half_precision(self, params: Mapping[str, torch.Tensor]) -> bool:
        """Flat yes; Tucker no: its three chained convolutions each round to the half dtype, and the factor gradients
        end several percent off float64 where the dense route's stay within half a percent."""
        return params.get("hada_t1") is None

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
    """The dense route for LoHa: ΔW and then the factor gradients, each formed block by block from the two products'
    small ``(left, right)`` pairs (``loha_pairs``, built once), so no weight-sized product is kept in between."""

    owns_delta = True

    def __init__(self, term: DeltaTerm, want: Sequence[str], shape: torch.Size):
        self.term, self.want, self.shape = term, list(want), shape
        self.pairs = loha_pairs(*_factors(term.params), scale=term.scale)

    def delta(self) -> torch.Tensor:
        return mask_rows(hadamard_of_pairs(*self.pairs).reshape(self.shape), self.term.row_mask)

    def grads(self, grad_weight: torch.Tensor) -> dict[str, torch.Tensor]:
        term = self.term
        if term.row_mask is not None:
            grad_weight = grad_weight * term.row_mask.view(-1, *[1] * (grad_weight.dim() - 1)).to(grad_weight.dtype)
        need = [name in self.want for name in LOHA_PARAMS]
        factors = _factors(term.params)
        grads = loha_factor_grads(grad_weight, *factors, scale=term.scale, need=need, pairs=self.pairs)
        return {name: g for name, g in zip(LOHA_PARAMS, grads) if name in self.want}


LOHA = LoHa()
