"""Training objectives: SDXL's DDPM noise prediction (epsilon or v) and Anima's rectified flow.

Every sample draws its noise and timestep/σ from a generator of its own, seeded by the data plan from (run seed,
epoch, global batch, position in the batch): a resumed run draws exactly the same noise, and one process with a global
batch of n draws what n/k samples on each of k processes draw. Each sample's generator is used in a fixed order:
noise, then the noise offset, then the timestep/σ.
"""

from __future__ import annotations

import torch

SIGMA_SAMPLING = ("sigmoid", "uniform", "shift")


def sample_generators(seeds: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per sample, seeded with the batch's ``noise_seeds`` (CPU draws: the same on every device)."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds.tolist()]


def _per_sample(draw, generators: list[torch.Generator], device: torch.device) -> torch.Tensor:
    return torch.stack([draw(generator) for generator in generators]).to(device)


def sample_noise(latents: torch.Tensor, generators: list[torch.Generator], offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like ``latents`` (float32), plus ``offset`` times a per-sample, per-channel constant."""
    shape = tuple(latents.shape[1:])
    noise = _per_sample(lambda g: torch.randn(shape, generator=g), generators, latents.device)
    if offset:
        channels = (latents.shape[1],) + (1,) * (latents.dim() - 2)
        noise = noise + offset * _per_sample(lambda g: torch.randn(channels, generator=g), generators, latents.device)
    return noise


# ------------------------------------------------------------------------------------------------------------ SDXL
def sdxl_time_ids(
    original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor, target_sizes: torch.Tensor
) -> torch.Tensor:
    """SDXL's micro-conditioning (B, 6): original (h, w), crop (top, left), target (h, w), as the pipeline builds it."""
    return torch.cat([original_sizes, crop_top_lefts, target_sizes], dim=1).float()


def sample_timesteps(num_train_timesteps: int, generators: list[torch.Generator], device: torch.device) -> torch.Tensor:
    """Uniform integer DDPM timesteps in [0, num_train_timesteps), one per sample."""
    return _per_sample(lambda g: torch.randint(0, num_train_timesteps, (), generator=g), generators, device)


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
    mode: str,
    generators: list[torch.Generator],
    device: torch.device,
    *,
    sigmoid_scale: float = 1.0,
    shift: float = 1.0,
) -> torch.Tensor:
    """σ in (0, 1) per sample: ``sigmoid`` = sigmoid(scale·N(0,1)), ``uniform`` = U(0,1), ``shift`` = the sigmoid
    draw moved by the discrete flow shift s: σ·s / (1 + (s − 1)·σ)."""
    if mode == "uniform":
        sigmas = _per_sample(lambda g: torch.rand((), generator=g), generators, device)
    elif mode in ("sigmoid", "shift"):
        sigmas = torch.sigmoid(sigmoid_scale * _per_sample(lambda g: torch.randn((), generator=g), generators, device))
        if mode == "shift":
            sigmas = sigmas * shift / (1.0 + (shift - 1.0) * sigmas)
    else:
        raise ValueError(f"unknown sigma sampling {mode!r}; choose from {SIGMA_SAMPLING}")
    return sigmas


def flow_noisy_input(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε, with σ broadcast over the non-batch dimensions."""
    sigma = sigmas.view(-1, *[1] * (latents.dim() - 1))
    return (1.0 - sigma) * latents + sigma * noise


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow velocity the model predicts: ε − x0."""
    return noise - latents


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's mean squared error in float32, optionally multiplied by its weight: shape (batch,). The runner
    combines them with the samples' loss shares into the step's loss."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample
