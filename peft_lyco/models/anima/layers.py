"""Building blocks shared by the Anima DiT and its LLM adapter: RMSNorm, QK-normalised attention, init helper."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope, at_least_fp32


class RMSNorm(nn.Module):
    """``x · rsqrt(mean(x²) + eps) · weight``, computed in at least fp32 and cast back to ``x``'s dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(at_least_fp32(x.dtype))
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def init_linear(layer: nn.Linear) -> None:
    """Truncated normal with std ``1/√fan_in`` (cut at ±3 std), bias zero, as the reference initialises."""
    std = 1.0 / math.sqrt(layer.in_features)
    nn.init.trunc_normal_(layer.weight, std=std, a=-3 * std, b=3 * std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def init_weights(modules: Iterable[nn.Module]) -> None:
    """The reference init for every ``nn.Linear`` (``init_linear``) and ``RMSNorm`` (ones) among ``modules``."""
    for module in modules:
        if isinstance(module, nn.Linear):
            init_linear(module)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


def qk_norm_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm: nn.Module,
    k_norm: nn.Module,
    num_heads: int,
    *,
    q_angles: torch.Tensor | None = None,
    k_angles: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head attention on projected ``q`` (B, L, H·d), ``k``/``v`` (B, S, H·d): per-head RMSNorm on q and k,
    then RoPE (when angles are given), then SDPA with the default scale. Returns (B, L, H·d).

    ``key_mask`` (B, S) marks keys that may be attended (True/1).
    """
    q = q_norm(q.unflatten(-1, (num_heads, -1)))
    k = k_norm(k.unflatten(-1, (num_heads, -1)))
    v = v.unflatten(-1, (num_heads, -1))
    if q_angles is not None:
        q = apply_rope(q, q_angles)
    if k_angles is not None:
        k = apply_rope(k, k_angles)
    mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)
