"""Qwen-Image VAE (diffusers ``AutoencoderKLQwenImage``) with Anima's per-channel latent normalisation."""

from __future__ import annotations

import torch

# Anima's latent statistics; also the defaults of AutoencoderKLQwenImage's config
LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


def latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) shaped (1, C, 1, 1, 1) from the VAE config, on ``like``'s device and dtype."""
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype)
    return mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [−1, 1] → normalised latents ``(mode − mean) / std`` of shape (B, 16, H/8, W/8)."""
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"encode_images expects pixels (B, 3, H, W) in [-1, 1], got {tuple(pixels.shape)}")
    param = next(vae.parameters())
    latents = vae.encode(pixels.to(param.device, param.dtype)[:, :, None]).latent_dist.mode()
    mean, std = latent_stats(vae, latents)
    return ((latents - mean) / std)[:, :, 0]


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B, 16, h, w) → pixels (B, 3, 8h, 8w) clamped to [−1, 1]."""
    if latents.dim() != 4:
        raise ValueError(f"decode_latents expects latents (B, C, h, w), got {tuple(latents.shape)}")
    param = next(vae.parameters())
    latents = latents.to(param.device, param.dtype)[:, :, None]
    mean, std = latent_stats(vae, latents)
    return vae.decode(latents * std + mean).sample[:, :, 0].clamp(-1, 1)
