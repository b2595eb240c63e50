"""LoKr ΔW: ``scale * kron(w1, w2)`` with either half full, low-rank, or (w2 only) Tucker."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from itertools import combinations

import torch
import torch.nn.functional as F

from .algorithm import Algorithm, DenseBackward, Pieces, graph_backward
from .autocast import as_autocast_product
from .factorization import LoKrLayout, lokr_layout
from .structured import StructuredRoute
from .term import DeltaTerm
from .tucker import rebuild_tucker

LOKR_PARAMS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def lokr_delta_weight(
    *,
    w1: torch.Tensor | None = None,
    w1_a: torch.Tensor | None = None,
    w1_b: torch.Tensor | None = None,
    w2: torch.Tensor | None = None,
    w2_a: torch.Tensor | None = None,
    w2_b: torch.Tensor | None = None,
    t2: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """LoKr ΔW = ``scale * kron(w1, w2)``, scaled once.

    ``w1`` is ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``; ``w2`` is ``lokr_w2``, ``lokr_w2_a @ lokr_w2_b`` (flat convs give
    ``(out_k, in_n * prod(kernel))``) or the Tucker rebuild of ``lokr_t2`` (``lokr_w2_a`` then is ``(r, out_k)``).
    Under autocast the Kronecker product runs in autocast's dtype, as its ``mm`` products do.
    The result has ``w2``'s rank: 2-D for Linear and flat convs, ``(out, in, *kernel)`` for full or Tucker convs.
    """
    if w1 is None:
        if w1_a is None or w1_b is None:
            raise ValueError("LoKr needs lokr_w1 or both lokr_w1_a and lokr_w1_b")
        w1 = w1_a @ w1_b
    if w2 is None:
        if w2_a is None or w2_b is None:
            raise ValueError("LoKr needs lokr_w2 or both lokr_w2_a and lokr_w2_b")
        w2 = w2_a @ w2_b if t2 is None else rebuild_tucker(t2, w2_a, w2_b)
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    w1, w2 = as_autocast_product(w1, w2)
    delta = torch.kron(w1, w2.contiguous())
    return delta.mul_(scale) if scale != 1 else delta  # in place: kron's backward does not need its output


def _kron_halves(params: Mapping[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """The matrices a Linear LoKr applies to the ``in_m`` axis (left) and the ``in_n`` axis (right) of a token, in
    order; ``None`` for conv or Tucker factors, which have no such form."""
    left = [params["lokr_w1"]] if "lokr_w1" in params else [params["lokr_w1_b"], params["lokr_w1_a"]]
    right = [params["lokr_w2"]] if "lokr_w2" in params else [params["lokr_w2_b"], params["lokr_w2_a"]]
    if "lokr_t2" in params or any(t.dim() != 2 for t in left + right):
        return None
    return left, right


def _cheapest_order(left: list[torch.Tensor], right: list[torch.Tensor]) -> tuple[tuple[str, ...], int]:
    """Order of applying the left/right matrices (each chain keeps its own order) with the fewest MACs per token.

    A pure function of the shapes, asked for on every call of a layer: eager code looks it up in ``_ORDERS`` (the
    search costs more than the small products themselves); traced code computes it, once per compilation."""
    shapes = (tuple(tuple(m.shape) for m in left), tuple(tuple(m.shape) for m in right))
    if torch.compiler.is_compiling():
        return _search_order(*shapes)
    found = _ORDERS.get(shapes)
    if found is None:
        found = _ORDERS[shapes] = _search_order(*shapes)
    return found


# (left shapes, right shapes) -> (order, MACs per token); bounded by the distinct factor shapes of a process's layers
_ORDERS: dict[tuple[tuple[tuple[int, ...], ...], ...], tuple[tuple[str, ...], int]] = {}


def _search_order(left: tuple[tuple[int, ...], ...], right: tuple[tuple[int, ...], ...]) -> tuple[tuple[str, ...], int]:
    best: tuple[tuple[str, ...], int] = ((), -1)
    count = len(left) + len(right)
    for left_slots in combinations(range(count), len(left)):
        order = tuple("left" if i in left_slots else "right" for i in range(count))
        rows, cols = left[0][1], right[0][1]
        chains = {"left": iter(left), "right": iter(right)}
        macs = 0
        for side in order:
            out_dim = next(chains[side])[0]
            macs += out_dim * rows * cols
            rows, cols = (out_dim, cols) if side == "left" else (rows, out_dim)
        if best[1] < 0 or macs < best[1]:
            best = (order, macs)
    return best


def lokr_linear_macs(params: Mapping[str, torch.Tensor]) -> int | None:
    """Multiply-accumulates per token of ``lokr_linear_apply`` with these factors (kohya names), or ``None`` where
    it does not apply (conv, Tucker)."""
    halves = _kron_halves(params)
    return None if halves is None else _cheapest_order(*halves)[1]


def lokr_linear_apply(x: torch.Tensor, params: Mapping[str, torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """``x @ ΔWᵀ`` of a Linear LoKr without building ΔW: each token viewed as ``X`` (in_m, in_n) maps to
    ``scale · w1 · X · w2ᵀ`` (flattened ``out_l · out_k``), low-rank factors applied in the cheapest order."""
    halves = _kron_halves(params)
    if halves is None:
        raise ValueError("the Kronecker product without ΔW needs a Linear LoKr (2-D w1 and w2 factors, no Tucker)")
    left, right = halves
    in_m, in_n = left[0].shape[1], right[0].shape[1]
    if x.shape[-1] != in_m * in_n:
        raise ValueError(f"LoKr factors expect {in_m * in_n} input features ({in_m} x {in_n}), got {x.shape[-1]}")
    order, _ = _cheapest_order(left, right)
    chains = {"left": iter(left), "right": iter(right)}
    tokens = x.contiguous().reshape(-1, in_m, in_n)  # see _kron_chain_grads: strided tokens make matmul loop
    for i, side in enumerate(order):
        matrix = next(chains[side])
        if i == 0 and scale != 1:
            matrix = matrix * scale
        tokens = torch.matmul(matrix, tokens) if side == "left" else torch.matmul(tokens, matrix.T)
    return tokens.reshape(*x.shape[:-1], -1)


def _chain_names(params: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """The factor names of ``_kron_halves``' left and right chains, in the same order."""
    left = ["lokr_w1"] if "lokr_w1" in params else ["lokr_w1_b", "lokr_w1_a"]
    right = ["lokr_w2"] if "lokr_w2" in params else ["lokr_w2_b", "lokr_w2_a"]
    return left, right


def _kron_chain_grads(
    x: torch.Tensor,
    grad: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    names: tuple[list[str], list[str]],
    want: set[str],
    scale: float,
    input_grad: bool,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Gradients (in ``x``'s dtype) of the wanted factors of ``lokr_linear_apply(x, params, scale)`` against the
    output gradient ``grad``, and with ``input_grad`` the gradient of ``x``: the chain's steps run forward keeping
    each intermediate, then back, each step's two products by hand (no autograd graph, no nested engine run).

    A left step ``T' = M·T`` (per token) gives ``∂M = Σ_tokens ∂T'·Tᵀ`` and ``∂T = Mᵀ·∂T'``; a right step
    ``T' = T·Mᵀ`` gives ``∂M = ∂T'ᵀ·T`` over all rows at once and ``∂T = ∂T'·M``. The scale rides on the first step.
    """
    left_names, right_names = names
    dtype = x.dtype
    left = [params[name].to(dtype) for name in left_names]
    right = [params[name].to(dtype) for name in right_names]
    order, _ = _cheapest_order(left, right)
    chains = {"left": iter(zip(left_names, left)), "right": iter(zip(right_names, right))}
    steps = []  # (side, name, matrix as applied, its input)
    # contiguous tokens (a chunk-sized copy where the layer's input or output gradient is a permuted view, as around
    # SDXL's proj_in/proj_out): matmul folds contiguous 3-D tokens into one mm per step, but runs strided ones as a
    # batched product with one small copy per token
    tokens = x.contiguous().reshape(-1, left[0].shape[1], right[0].shape[1])
    for i, side in enumerate(order):
        name, matrix = next(chains[side])
        if i == 0 and scale != 1:
            matrix = matrix * scale
        steps.append((side, name, matrix, tokens))
        tokens = torch.matmul(matrix, tokens) if side == "left" else torch.matmul(tokens, matrix.T)
    # the earliest step whose input gradient is still needed
    first = 0 if input_grad else next((i for i, step in enumerate(steps) if step[1] in want), len(steps))
    found: dict[str, torch.Tensor] = {}
    back = grad.contiguous().reshape(tokens.shape)
    for i in range(len(steps) - 1, first - 1, -1):
        side, name, matrix, inp = steps[i]
        if name in want:
            if side == "left":
                g = torch.matmul(back, inp.transpose(-2, -1)).sum(0)
            else:
                g = back.reshape(-1, back.shape[-1]).T @ inp.reshape(-1, inp.shape[-1])
            found[name] = g.mul_(scale) if i == 0 and scale != 1 else g
        if i > first or input_grad:
            back = torch.matmul(matrix.T, back) if side == "left" else torch.matmul(back, matrix)
    return found, back.reshape(x.shape) if input_grad else None


def _pointwise(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution with ``matrix`` (out, in)."""
    return F.conv2d(x, matrix[:, :, None, None])


def _w2_stages(
    params: Mapping[str, torch.Tensor], in_n: int, kernel: tuple[int, int]
) -> list[tuple[bool, torch.Tensor]]:
    """``w2`` of a Conv2d LoKr as a chain of convolutions ``(spatial, weight)``: spatial stages take the layer's
    stride/padding/dilation, the others are 1x1 (``weight`` then a matrix); ``w2`` itself is never built."""
    if "lokr_w2" in params:
        return [(True, params["lokr_w2"])]
    w2_a, w2_b = params["lokr_w2_a"], params["lokr_w2_b"]
    if "lokr_t2" in params:  # w2_b (r, in_n), t2 (r, r, kh, kw), w2_a (r, out_k)
        return [(False, w2_b), (True, params["lokr_t2"]), (False, w2_a.T)]
    return [(True, w2_b.reshape(w2_b.shape[0], in_n, *kernel)), (False, w2_a)]


def lokr_conv_macs(params: Mapping[str, torch.Tensor], weight_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates per output pixel of ``lokr_conv_apply`` with these factors (kohya names)."""
    out_l, in_m = _w1_shape(params)
    in_n = weight_shape[1] // in_m
    stages = _w2_stages(params, in_n, tuple(weight_shape[2:]))
    out_k = stages[-1][1].shape[0]
    mixed = in_n if out_l < in_m else out_k
    return min(out_l, in_m) * sum(weight.numel() for _, weight in stages) + out_l * in_m * mixed


def lokr_w1(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The left Kronecker half: ``lokr_w1``, or ``lokr_w1_a @ lokr_w1_b`` when it is low-rank."""
    return params["lokr_w1"] if "lokr_w1" in params else params["lokr_w1_a"] @ params["lokr_w1_b"]


def lokr_w2(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The right Kronecker half: ``lokr_w2``, the Tucker rebuild of ``lokr_t2``, or ``lokr_w2_a @ lokr_w2_b``."""
    if "lokr_w2" in params:
        return params["lokr_w2"]
    if "lokr_t2" in params:
        return rebuild_tucker(params["lokr_t2"], params["lokr_w2_a"], params["lokr_w2_b"])
    return params["lokr_w2_a"] @ params["lokr_w2_b"]


def _w1_shape(params: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    if "lokr_w1" in params:
        return tuple(params["lokr_w1"].shape)
    return params["lokr_w1_a"].shape[0], params["lokr_w1_b"].shape[1]


def lokr_conv_apply(
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    scale: float,
    weight_shape: tuple[int, ...],
    conv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``conv(x, ΔW)`` of a Conv2d LoKr without building ΔW: the input channels form ``in_m`` groups of ``in_n``, each
    group goes through ``w2``'s convolutions (``conv`` applies the layer's stride/padding/dilation) and ``scale · w1``
    mixes the groups (before the convolutions when that leaves fewer groups to convolve)."""
    w1 = lokr_w1(params)
    w1 = w1 * scale if scale != 1 else w1
    out_l, in_m = w1.shape
    in_n, batch = weight_shape[1] // in_m, x.shape[0]
    groups = x.reshape(batch, in_m, in_n, *x.shape[2:])
    mix_first = out_l < in_m
    if mix_first:
        groups = torch.einsum("ab,nb...->na...", w1, groups)
    y = groups.reshape(-1, in_n, *x.shape[2:])
    for spatial, weight in _w2_stages(params, in_n, tuple(weight_shape[2:])):
        y = conv(y, weight) if spatial else _pointwise(y, weight)
    y = y.reshape(batch, -1, *y.shape[1:])
    if not mix_first:
        y = torch.einsum("ab,nb...->na...", w1, y)
    return y.reshape(batch, -1, *y.shape[3:])


class LoKr(Algorithm):
    """LoKr: ``ΔW = scale · kron(w1, w2)``, either half full or low-rank, ``w2`` also Tucker."""

    name = "lokr"
    param_names = LOKR_PARAMS

    layout_options = ("use_tucker", "factor", "decompose_both", "full_matrix", "unbalanced_factorization")

    def layout(self, out_features, in_features, kernel, rank, options, *, warn=True) -> LoKrLayout:
        mine = {name: value for name, value in options.items() if name in self.layout_options}
        return lokr_layout(out_features, in_features, kernel, rank, **mine, warn=warn)

    def scale(self, layout: LoKrLayout, alpha: float, rank: int, rs_lora: bool = False) -> float:
        """Both halves full: alpha is taken as the rank (scale 1 whatever alpha says, as LyCORIS/kohya; with
        ``rs_lora`` LyCORIS then trains at ``rank / sqrt(rank)``); otherwise ``alpha / rank``."""
        if rs_lora:
            return (rank if layout.both_full else alpha) / math.sqrt(rank)
        return 1.0 if layout.both_full else alpha / rank

    def scalar_factor(self, params: Mapping[str, torch.Tensor]) -> str:
        return "lokr_w1" if "lokr_w1" in params else "lokr_w1_a"

    def delta(self, params: Mapping[str, torch.Tensor], scale: float) -> torch.Tensor:
        return lokr_delta_weight(**{name[len("lokr_") :]: params.get(name) for name in LOKR_PARAMS}, scale=scale)

    def linear_route(self, params: Mapping[str, torch.Tensor], io_elements: int) -> StructuredRoute | None:
        macs = lokr_linear_macs(params)
        return None if macs is None else StructuredRoute(macs, io_elements, 3)

    def conv_macs(self, params: Mapping[str, torch.Tensor], weight_shape: tuple[int, ...]) -> int | None:
        return lokr_conv_macs(params, weight_shape)

    def conv_apply(self, x, params, scale, weight_shape, conv) -> torch.Tensor:
        return lokr_conv_apply(x, params, scale, weight_shape, conv)

    def linear_grads(self, params, want, pieces: Pieces, scale, input_grad):
        """The derivative of the Kronecker chain, written out step by step (``_kron_chain_grads``), chunk by chunk,
        each factor's gradient summed in its own dtype."""
        names = _chain_names(params)
        grads: dict[str, torch.Tensor] = {}
        grad_x = []
        for x, grad in pieces:
            found, share = _kron_chain_grads(x, grad, params, names, set(want), scale, input_grad)
            if input_grad:
                grad_x.append(share)
            for name, value in found.items():
                value = value.to(params[name].dtype)
                grads[name] = grads[name].add_(value) if name in grads else value
        return [grads[name] for name in want], grad_x

    def dense_backward(self, term: DeltaTerm, want: Sequence[str], shape: torch.Size) -> DenseBackward:
        """Autograd of the Kronecker product: its graph keeps only the two small halves."""
        return graph_backward(term, want, shape)


LOKR = LoKr()
