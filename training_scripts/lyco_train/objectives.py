"""Training objectives: SDXL's DDPM noise prediction (epsilon or v) and Anima's rectified flow.

All randomness comes from an explicit ``torch.Generator`` so a resumed run draws exactly the same noise.
"""

from __future__ import annotations

import torch

SIGMA_SAMPLING = ("sigmoid", "uniform", "shift")


def _randn(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(like.device)


def sample_noise(latents: torch.Tensor, generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like ``latents`` (float32), plus ``offset`` times a per-sample, per-channel constant."""
    noise = _randn(tuple(latents.shape), generator, latents)
    if offset:
        noise = noise + offset * _randn(tuple(latents.shape[:2]) + (1,) * (latents.dim() - 2), generator, latents)
    return noise


# ------------------------------------------------------------------------------------------------------------ SDXL
def sdxl_time_ids(
    original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor, target_sizes: torch.Tensor
) -> torch.Tensor:
    """SDXL's micro-conditioning (B, 6): original (h, w), crop (top, left), target (h, w), as the pipeline builds it."""
    return torch.cat([original_sizes, crop_top_lefts, target_sizes], dim=1).float()


def sample_timesteps(
    batch: int, num_train_timesteps: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Uniform integer DDPM timesteps in [0, num_train_timesteps)."""
    steps = torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=generator.device)
    return steps.to(device)


def ddpm_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity (v-prediction), per the scheduler config."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}; use epsilon or v_prediction")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-γ: min(SNR, γ)/SNR for epsilon, min(SNR, γ)/(SNR+1) for v-prediction."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped / snr


# ----------------------------------------------------------------------------------------------- rectified flow
def sample_sigmas(
    batch: int,
    mode: str,
    generator: torch.Generator,
    device: torch.device,
    *,
    sigmoid_scale: float = 1.0,
    shift: float = 1.0,
) -> torch.Tensor:
    """σ in (0, 1) per sample: ``sigmoid`` = sigmoid(scale·N(0,1)), ``uniform`` = U(0,1), ``shift`` = the sigmoid
    draw moved by the discrete flow shift s: σ·s / (1 + (s − 1)·σ)."""
    if mode == "uniform":
        sigmas = torch.rand((batch,), generator=generator, device=generator.device)
    elif mode in ("sigmoid", "shift"):
        sigmas = torch.sigmoid(sigmoid_scale * torch.randn((batch,), generator=generator, device=generator.device))
        if mode == "shift":
            sigmas = sigmas * shift / (1.0 + (shift - 1.0) * sigmas)
    else:
        raise ValueError(f"unknown sigma sampling {mode!r}; choose from {SIGMA_SAMPLING}")
    return sigmas.to(device)


def flow_noisy_input(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε, with σ broadcast over the non-batch dimensions."""
    sigma = sigmas.view(-1, *[1] * (latents.dim() - 1))
    return (1.0 - sigma) * latents + sigma * noise


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow velocity the model predicts: ε − x0."""
    return noise - latents


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in float32, each sample's mean optionally multiplied by its weight, then averaged."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()
