"""Factor gradients (and the adapter's share of ∂L/∂x) straight from the layer input and the output gradient, through
a product that never builds ΔW: Linear LoKr's Kronecker chain, flat LoHa as a rank-r1·r2 product (Linear and
ungrouped convs), Tucker LoHa as a rank-r1·r2 Tucker form (ungrouped convs), Conv2d LoKr as grouped convolutions mixed
by ``w1``. The fused op takes this route where it costs less than the dense weight gradient ``G = ∂L/∂W`` (one
weight-sized product per token or output pixel) and is accurate in the layer's compute dtype.

Each algorithm supplies its products and their cost (``Algorithm.route``, ``conv_apply``, ``linear_grads``); this
module holds the cost model and runs a route.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .base_op import BaseOp, LinearOp
from .pullback import pullback

if TYPE_CHECKING:
    from .term import DeltaTerm

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
    and output elements each pass moves, and how many passes its factor gradients take; and whether its products stay
    about as accurate as the dense route's when they run in bfloat16 or float16 (``half_precision``)."""

    apply_macs: int
    io_elements: int
    grad_passes: int
    half_precision: bool = True

    def accurate_in(self, dtype: torch.dtype, *, tf32: bool = False) -> bool:
        """Whether the route may run its products in ``dtype`` (the layer's compute dtype): any dtype when it is
        accurate in half precision, else float32 and wider only, and float32 only where its products do not round
        their operands to TF32 (``tf32``: 10 mantissa bits, as float16's)."""
        if self.half_precision:
            return True
        return torch.finfo(dtype).bits > 32 or (dtype == torch.float32 and not tf32)

    @property
    def pass_cost(self) -> int:
        return self.apply_macs + ELEMENT_MACS * self.io_elements

    def pays_off(self, weight_numel: int) -> bool:
        """Cheaper than the dense weight gradient (``weight_numel`` multiply-adds per token, same reads)."""
        return self.grad_passes * self.pass_cost < weight_numel + ELEMENT_MACS * self.io_elements

    def input_grad_pays_off(self, tokens: int, weight_numel: int) -> bool:
        """The adapter's share of ∂L/∂x through the product is cheaper than rebuilding ``W + ΔW`` for it."""
        return tokens * self.pass_cost <= REBUILD_MACS_PER_WEIGHT * weight_numel


def structured_grads(
    term: DeltaTerm,
    want: list[str],
    x: torch.Tensor,
    grad: torch.Tensor,
    op: BaseOp,
    weight_shape: tuple[int, ...],
    *,
    input_grad: bool,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Gradients of the term's factors named in ``want`` (and, with ``input_grad``, the adapter's share of ∂L/∂x)
    from the layer input ``x`` and the output gradient ``grad``.

    The large products run in the input's dtype, as the dense route's weight gradient would; the factors' own chain
    rule in theirs. Linear inputs go through in chunks of tokens whose temporaries stay about weight-sized.
    """
    algorithm = term.algorithm
    if term.row_mask is not None:  # output features: the last axis of a Linear's output, axis 1 of a conv's
        mask = term.row_mask.to(grad.dtype)
        grad = grad * (mask if isinstance(op, LinearOp) else mask.view(-1, 1, 1))
    params = dict(term.params)
    if not isinstance(op, LinearOp):

        def product(*primals: torch.Tensor) -> torch.Tensor:
            inp = primals[0] if input_grad else x
            cast = {name: p.to(x.dtype) for name, p in {**params, **dict(zip(want, primals[input_grad:]))}.items()}
            return algorithm.conv_apply(inp, cast, term.scale, weight_shape, lambda a, k: op.forward(a, k, None))

        _, pull = pullback(product, [x] * input_grad + [params[name] for name in want])
        grads = pull(grad)
        return dict(zip(want, grads[input_grad:])), grads[0] if input_grad else None
    flat_x, flat_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    chunk = max(1, max(math.prod(weight_shape), CHUNK_ELEMENTS) // max(weight_shape))
    # split, not a loop over offsets: torch.compile then guards only on the number of chunks, not on the token count
    pieces = list(zip(flat_x.split(chunk), flat_grad.split(chunk)))
    grads, grad_x = algorithm.linear_grads(params, want, pieces, term.scale, input_grad)
    return dict(zip(want, grads)), _joined(grad_x).reshape(x.shape) if input_grad else None


def _joined(pieces: list[torch.Tensor]) -> torch.Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
