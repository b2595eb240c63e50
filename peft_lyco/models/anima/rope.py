"""Rotary position embeddings (3-D for the DiT, 1-D for the LLM adapter) and the sinusoidal timestep features."""

from __future__ import annotations

import math

import torch


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, the dtype itself for fp32/fp64: position maths never runs in 16 bits."""
    return torch.promote_types(dtype, torch.float32)


def ntk_theta(ratio: float, dim: int, base: float = 10000.0) -> float:
    """NTK-scaled RoPE base of one axis: ``base · ratio^(dim / (dim − 2))``."""
    return base * ratio ** (dim / (dim - 2))


def axis_frequencies(theta: float, fractions: torch.Tensor) -> torch.Tensor:
    """Per-pair inverse wavelengths ``1 / theta^(2i / dim)``; ``fractions`` holds ``2i / dim``."""
    return 1.0 / theta**fractions


def rope3d_angles(
    positions: torch.Tensor,
    grid: tuple[int, int, int],
    spatial_fractions: torch.Tensor,
    temporal_fractions: torch.Tensor,
    thetas: tuple[float, float, float],
) -> torch.Tensor:
    """Angles (T·H·W, head_dim) of every patch in ``(t h w)`` order: ``cat([t, h, w])`` repeated twice.

    ``positions`` is the integer position table (``arange``); ``thetas`` are the (t, h, w) bases. Computed in at
    least fp32 (fp64 tables give fp64 angles).
    """
    t_len, h_len, w_len = grid
    theta_t, theta_h, theta_w = thetas
    dtype = at_least_fp32(positions.dtype)
    positions = positions.to(dtype)
    spatial_fractions, temporal_fractions = spatial_fractions.to(dtype), temporal_fractions.to(dtype)
    ang_t = torch.outer(positions[:t_len], axis_frequencies(theta_t, temporal_fractions))
    ang_h = torch.outer(positions[:h_len], axis_frequencies(theta_h, spatial_fractions))
    ang_w = torch.outer(positions[:w_len], axis_frequencies(theta_w, spatial_fractions))
    half = torch.cat(
        [
            ang_t[:, None, None, :].expand(t_len, h_len, w_len, -1),
            ang_h[None, :, None, :].expand(t_len, h_len, w_len, -1),
            ang_w[None, None, :, :].expand(t_len, h_len, w_len, -1),
        ],
        dim=-1,
    ).reshape(t_len * h_len * w_len, -1)
    return torch.cat([half, half], dim=-1)


def rope1d_angles(
    length: int,
    head_dim: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    theta: float = 10000.0,
) -> torch.Tensor:
    """Angles (length, head_dim) of positions ``0..length−1``: ``cat([p·f, p·f])`` with ``f = 1/θ^(2i/head_dim)``,
    in at least fp32."""
    dtype = at_least_fp32(dtype)
    fractions = torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim
    half = torch.outer(torch.arange(length, device=device, dtype=dtype), axis_frequencies(theta, fractions))
    return torch.cat([half, half], dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] → [−x2, x1]`` on the last dim (non-interleaved RoPE)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, L, heads, head_dim) by ``angles`` (L, head_dim): ``x·cos + rotate_half(x)·sin``."""
    cos = angles.cos().to(x.dtype)[:, None, :]
    sin = angles.sin().to(x.dtype)[:, None, :]
    return x * cos + rotate_half(x) * sin


def timestep_features(timesteps: torch.Tensor, channels: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``cat([cos(t·f), sin(t·f)])``, ``f_i = exp(−ln(max_period)·i/half)``, in at least fp32.

    ``timesteps`` has any shape; the result appends a ``channels`` dim. Anima feeds σ ∈ [0, 1] here.
    """
    half = channels // 2
    dtype = at_least_fp32(timesteps.dtype)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device, dtype=dtype) / half)
    args = timesteps.to(dtype)[..., None] * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)
