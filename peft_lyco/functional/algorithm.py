"""What an adapter algorithm (LoHa, LoKr) provides to layers, the fused op, merging and conversion.

Each algorithm is one object: its parameter names and layout, its ΔW, its structured (ΔW-free) route and products,
and its factor gradients on the dense route. The math never asks which algorithm it holds; it calls the object.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch

from .base_op import BaseOp, LinearOp
from .pullback import pullback
from .structured import StructuredRoute
from .term import DeltaTerm, term_delta

Conv = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Pieces = Sequence[tuple[torch.Tensor, torch.Tensor]]


class DenseBackward(Protocol):
    """One term's share of the dense backward route, prepared before ``W + ΣΔW`` is rebuilt.

    ``delta()`` gives the term's ΔW (shaped, masked, no autograd) reusing what the factor gradients need; ``grads``
    turns ``∂L/∂(W + ΔW)`` (in the factors' dtype) into the wanted factor gradients. ``owns_delta`` says whether the
    tensor ``delta()`` returns may be summed into in place.
    """

    owns_delta: bool

    def delta(self) -> torch.Tensor: ...

    def grads(self, grad_weight: torch.Tensor) -> dict[str, torch.Tensor]: ...


class Algorithm(ABC):
    """One adapter algorithm. Subclasses are stateless singletons (``LOHA``, ``LOKR``)."""

    name: str
    param_names: tuple[str, ...]
    layout_options: tuple[str, ...]  # the options ``layout`` reads; others (DoRA, rs_lora, ...) are not its business

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    @abstractmethod
    def layout(
        self,
        out_features: int,
        in_features: int,
        kernel: tuple[int, ...],
        rank: int,
        options: Mapping[str, Any],
        *,
        warn: bool = True,
    ) -> Any:
        """The parameter layout (shapes and mode) on a weight ``(out, in, *kernel)`` with these layout options."""

    def scale(self, layout: Any, alpha: float, rank: int, rs_lora: bool = False) -> float:
        """The adapter's own scale: ``alpha / rank`` (``alpha / sqrt(rank)`` with ``rs_lora``, as LyCORIS) unless the
        layout dictates otherwise."""
        return alpha / (math.sqrt(rank) if rs_lora else rank)

    @abstractmethod
    def scalar_factor(self, params: Mapping[str, torch.Tensor]) -> str:
        """The factor ΔW is linear in that LyCORIS' ``use_scalar`` multiplier is folded into on export."""

    @abstractmethod
    def delta(self, params: Mapping[str, torch.Tensor], scale: float) -> torch.Tensor:
        """ΔW times ``scale`` (applied once), 2-D ``(out, in·k)`` or ``(out, in, *k)``; callers reshape it."""

    # ------------------------------------------------------------------------------------------- structured route
    def route(
        self, op: BaseOp, params: Mapping[str, torch.Tensor], weight_shape: tuple[int, ...]
    ) -> StructuredRoute | None:
        """The ΔW-free route of these factors on a layer, or ``None`` where there is none (grouped convolutions,
        structures without a cheap product)."""
        io_elements = weight_shape[0] + weight_shape[1]
        if isinstance(op, LinearOp):
            return self.linear_route(params, io_elements)
        if op.groups != 1:
            return None
        macs = self.conv_macs(params, weight_shape)
        if macs is None:
            return None
        # autograd: the product again, then both of its backward products
        return StructuredRoute(macs, io_elements, 3, half_precision=self.conv_apply_half_precision(params))

    @abstractmethod
    def linear_route(self, params: Mapping[str, torch.Tensor], io_elements: int) -> StructuredRoute | None:
        """The route's cost on a Linear, or ``None``."""

    @abstractmethod
    def conv_macs(self, params: Mapping[str, torch.Tensor], weight_shape: tuple[int, ...]) -> int | None:
        """Multiply-adds per output pixel of ``conv_apply``, or ``None`` where it does not apply."""

    def conv_apply_half_precision(self, params: Mapping[str, torch.Tensor]) -> bool:
        """Whether ``conv_apply``'s factor gradients stay about as accurate as the dense route's when its products run
        in bfloat16 or float16 (yes unless an algorithm says otherwise)."""
        return True

    @abstractmethod
    def conv_apply(
        self,
        x: torch.Tensor,
        params: Mapping[str, torch.Tensor],
        scale: float,
        weight_shape: tuple[int, ...],
        conv: Conv,
    ) -> torch.Tensor:
        """``conv(x, ΔW)`` without building ΔW (``conv`` applies the layer's stride/padding/dilation)."""

    @abstractmethod
    def linear_grads(
        self,
        params: Mapping[str, torch.Tensor],
        want: Sequence[str],
        pieces: Pieces,
        scale: float,
        input_grad: bool,
    ) -> tuple[Sequence[torch.Tensor], list[torch.Tensor]]:
        """Gradients of the factors named in ``want`` (summed over the ``(x, ∂L/∂y)`` chunks) and, with
        ``input_grad``, the adapter's share of ∂L/∂x per chunk, on a Linear. Differentiates through ``pullback``
        (never ``torch.autograd.grad``, which breaks ``torch.compile`` graphs)."""

    # ------------------------------------------------------------------------------------------------ dense route
    @abstractmethod
    def dense_backward(self, term: DeltaTerm, want: Sequence[str], shape: torch.Size) -> DenseBackward:
        """Prepare the dense route's factor gradients of ``want`` for this term on a weight of ``shape``."""


def graph_backward(term: DeltaTerm, want: Sequence[str], shape: torch.Size) -> DenseBackward:
    """A dense backward that differentiates the term's own ΔW (``pullback``: for algorithms whose ΔW keeps only small
    tensors for its derivative, as LoKr's Kronecker product)."""
    return _GraphBackward(term, want, shape)


class _GraphBackward:
    owns_delta = False  # the ΔW is the root of its derivative's graph: not ours to add into

    def __init__(self, term: DeltaTerm, want: Sequence[str], shape: torch.Size):
        fixed = {name: p for name, p in term.params.items() if name not in want}
        self.want = list(want)

        def delta(*wanted: torch.Tensor) -> torch.Tensor:  # ΔW carries the row mask itself
            params = {**fixed, **dict(zip(self.want, wanted))}
            return term_delta(DeltaTerm(term.algorithm, params, term.scale, term.row_mask), shape)

        self.value, self.pull = pullback(delta, [term.params[name] for name in self.want])

    def delta(self) -> torch.Tensor:
        return self.value

    def grads(self, grad_weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.want, self.pull(grad_weight)))
