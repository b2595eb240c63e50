"""DoRA (LyCORIS ``weight_decompose``): the adapted weight re-normalised to a trained magnitude along one axis.

LyCORIS (DoHa/DoKr): ``M = s ⊙ V`` with ``V = W + ΔW`` and ``s = mult · (m / (‖V‖ + eps) − 1) + 1``; the norm is taken
per output row (``on_output``, ``m`` of shape ``(out, 1, …)``) or per input column (``m`` of shape ``(1, in, 1, …)``),
``eps`` is the machine epsilon of the dtype the sum is formed in. ``mult`` is the adapter's strength (LyCORIS'
``multiplier``), so at strength 0 the layer is the base layer. The magnitude ``m`` starts as ``‖W‖`` along the axis.

DoRA is not additive: a term's contribution to the layer is ``s ⊙ V − W``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WeightDecompose:
    """DoRA of one adapter in one call: its magnitude (``dora_scale``), its axis, and the adapter's strength."""

    magnitude: torch.Tensor
    on_output: bool
    multiplier: float | torch.Tensor = 1.0  # a 0-d tensor when module dropout is drawn inside a compiled graph


def norm_dims(ndim: int, on_output: bool) -> tuple[int, ...]:
    """The axes the norm runs over: all but the output axis (per row) or all but the input axis (per column)."""
    return tuple(range(1, ndim)) if on_output else (0, *range(2, ndim))


def initial_magnitude(weight: torch.Tensor, on_output: bool) -> torch.Tensor:
    """``‖W‖`` along the axis in float32 (at least), shaped as ``dora_scale`` is stored: ``(out, 1, …)`` or
    ``(1, in, 1, …)``, as LyCORIS initialises it."""
    weight = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    return torch.linalg.vector_norm(weight, dim=norm_dims(weight.dim(), on_output), keepdim=True)


def magnitude_shape(weight_shape: tuple[int, ...], on_output: bool) -> tuple[int, ...]:
    """The shape of ``dora_scale`` for a weight of ``weight_shape`` and this axis."""
    if on_output:
        return (weight_shape[0], *[1] * (len(weight_shape) - 1))
    return (1, weight_shape[1], *[1] * (len(weight_shape) - 2))


def decompose_scale(v: torch.Tensor, decompose: WeightDecompose) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, ‖V‖)`` for the adapted weight ``v``: the per-row or per-column factor ``M = s ⊙ V`` applies."""
    norm = torch.linalg.vector_norm(v, dim=norm_dims(v.dim(), decompose.on_output), keepdim=True)
    scale = decompose.magnitude.to(v.dtype) / (norm + torch.finfo(v.dtype).eps)
    if isinstance(decompose.multiplier, torch.Tensor) or decompose.multiplier != 1:
        scale = decompose.multiplier * (scale - 1) + 1
    return scale, norm


def decompose_backward(
    grad: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, norm: torch.Tensor, decompose: WeightDecompose
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂L/∂V, ∂L/∂m)`` from ``grad = ∂L/∂M`` for ``M = s ⊙ V`` (``scale``/``norm`` from ``decompose_scale``).

    With ``d = ‖V‖ + eps``: ``∂L/∂s = Σ G ⊙ V`` over the norm axes, ``∂L/∂m = mult · ∂L/∂s / d`` and
    ``∂L/∂V = s ⊙ G − mult · m / d² · ∂L/∂s · V / ‖V‖`` (0 where ``‖V‖ = 0``, as autograd of the norm gives).
    """
    dims = norm_dims(v.dim(), decompose.on_output)
    denom = norm + torch.finfo(v.dtype).eps
    grad_scale = (grad * v).sum(dims, keepdim=True)
    magnitude = decompose.magnitude.to(v.dtype)
    grad_magnitude = decompose.multiplier * grad_scale / denom
    coeff = decompose.multiplier * magnitude * grad_scale / (denom * denom)
    coeff = torch.where(norm > 0, coeff / torch.where(norm > 0, norm, 1), torch.zeros_like(coeff))
    return scale * grad - coeff * v, grad_magnitude
