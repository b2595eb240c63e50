"""The op a base layer applies to its weight (linear or conv2d), with its forward and its two backward products.

The fused adapted op calls these instead of autograd so that it can decide what to keep for backward: only the input,
never the weight-sized ``W + ΔW``, which backward rebuilds from the factors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LinearOp:
    """``F.linear`` on inputs of shape ``(..., in)``."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def backward(
        self, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, need_input: bool, need_weight: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(∂L/∂x, ∂L/∂weight)`` for the wanted ones; ``weight`` may be ``None`` when ∂L/∂x is not wanted."""
        grad_input = grad @ weight if need_input else None
        grad_weight = None
        if need_weight:
            grad_weight = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        return grad_input, grad_weight

    def bias_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.reshape(-1, grad.shape[-1]).sum(0)


@dataclass(frozen=True)
class Conv2dOp:
    """``F.conv2d`` with explicit integer padding on batched ``(N, C, H, W)`` inputs."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def backward(
        self, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, need_input: bool, need_weight: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(∂L/∂x, ∂L/∂weight)`` from one ``convolution_backward`` call (``weight`` only supplies the shape when
        ∂L/∂x is not wanted)."""
        if not (need_input or need_weight):
            return None, None
        grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad,
            x,
            weight,
            None,
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            False,
            [0, 0],
            self.groups,
            [need_input, need_weight, False],
        )
        return grad_input, grad_weight

    def bias_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.sum((0, 2, 3))


BaseOp = Union[LinearOp, Conv2dOp]
