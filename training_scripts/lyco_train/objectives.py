"""Training objectives: SDXL's DDPM noise prediction (epsilon or v) and Anima's rectified flow.

Every sample draws its noise and timestep/σ from a generator of its own, seeded by the data plan from (run seed,
epoch, global batch, position in the batch): a resumed run draws exactly the same noise, and one process with a global
batch of n draws what n/k samples on each of k processes draw. Each sample's generator is used in a fixed order:
noise, then the noise offset, then the timestep/σ.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SIGMA_SAMPLING = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


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


def multires_noise(
    noise: torch.Tensor, generators: list[torch.Generator], iterations: int, discount: float
) -> torch.Tensor:
    """sd-scripts' ``--multires_noise_iterations`` (pyramid noise): to each sample's noise add, for i = 0, 1, …,
    Gaussian noise drawn at 1/r^i of the size (r uniform in [2, 4) per level) and upsampled bilinearly, times
    discount^i, until a side reaches 1; then rescale to unit standard deviation. Drawn from each sample's generator
    and normalised per sample (sd-scripts normalises over the batch), so a sample's noise never depends on the
    other samples of its batch or on how the batch is split over processes."""
    height, width = noise.shape[-2:]
    out = []
    for sample, generator in zip(noise, generators):
        sample = sample.detach().cpu().float().clone()
        for level in range(iterations):
            r = float(torch.rand((), generator=generator)) * 2 + 2
            h, w = max(1, int(height / r**level)), max(1, int(width / r**level))
            low = torch.randn((sample.shape[0], h, w), generator=generator)
            sample += F.interpolate(low[None], size=(height, width), mode="bilinear")[0] * discount**level
            if h == 1 or w == 1:
                break
        out.append(sample / sample.std())
    return torch.stack(out).to(noise.device)


def input_perturbation(
    noise: torch.Tensor, generators: list[torch.Generator], gamma: float, random_strength: bool = False
) -> torch.Tensor:
    """sd-scripts' ``--ip_noise_gamma`` (input perturbation, arXiv 2301.11706): the noise that builds the noisy input
    is ``noise + γ·ξ`` with fresh ξ ~ N(0, I) per sample, while the target keeps ``noise``. With ``random_strength``
    γ is drawn uniformly from [0, γ) per sample (sd-scripts: per batch)."""
    shape = tuple(noise.shape[1:])
    xi = _per_sample(lambda g: torch.randn(shape, generator=g), generators, noise.device)
    if random_strength:
        strength = _per_sample(lambda g: torch.rand((), generator=g), generators, noise.device) * gamma
    else:
        strength = torch.full((len(generators),), float(gamma), device=noise.device)
    return noise + strength.view(-1, *[1] * (noise.dim() - 1)) * xi


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


def ddpm_noise_to_signal(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """√((1 − ᾱ_t)/ᾱ_t) per sample: the noise-to-signal ratio of a DDPM timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-γ: min(SNR, γ)/SNR for epsilon, min(SNR, γ)/(SNR+1) for v-prediction."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped / snr


# ----------------------------------------------------------------------------------------------- rectified flow
def discrete_flow_shift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """σ moved by the discrete flow shift s: σ·s / (1 + (s − 1)·σ) (s = 1: unchanged)."""
    return sigmas * shift / (1.0 + (shift - 1.0) * sigmas)


def flux_shift_mu(image_seq_len: int) -> float:
    """FLUX's resolution-dependent shift μ: linear from 0.5 at 256 to 1.15 at 4096 image tokens (2×2 patches)."""
    return 0.5 + (1.15 - 0.5) / (4096 - 256) * (image_seq_len - 256)


def sample_sigmas(
    mode: str,
    generators: list[torch.Generator],
    device: torch.device,
    *,
    sigmoid_scale: float = 1.0,
    shift: float = 1.0,
    weighting_scheme: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    image_seq_len: int = 256,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """σ in (0, 1] per sample, as sd-scripts' ``--timestep_sampling`` for Anima/FLUX:

    - ``uniform``: U(0, 1); ``sigmoid``: sigmoid(scale·N(0, 1)) (logit-normal);
    - ``shift``: the sigmoid draw moved by ``--discrete_flow_shift`` s: σ·s / (1 + (s − 1)·σ);
    - ``flux_shift``: the sigmoid draw moved by FLUX's resolution-dependent shift:
      e^μ / (e^μ + 1/σ − 1), μ from ``image_seq_len`` = (latent h // 2)·(latent w // 2);
    - ``sigma``: u from the ``--weighting_scheme`` density (``logit_normal``: sigmoid(N(logit_mean, logit_std));
      ``mode``: 1 − u − mode_scale·(cos²(πu/2) − 1 + u) with u ~ U(0, 1); else U(0, 1)), then the σ of the
      discrete flow-matching schedule (``num_train_timesteps`` steps, shifted by s) at index ⌊u·N⌋:
      σ = shift((N − ⌊u·N⌋) / N).
    """
    if mode == "uniform":
        return _per_sample(lambda g: torch.rand((), generator=g), generators, device)
    if mode in ("sigmoid", "shift", "flux_shift"):
        sigmas = torch.sigmoid(sigmoid_scale * _per_sample(lambda g: torch.randn((), generator=g), generators, device))
        if mode == "shift":
            return discrete_flow_shift(sigmas, shift)
        if mode == "flux_shift":
            mu = math.exp(flux_shift_mu(image_seq_len))
            return mu / (mu + (1.0 / sigmas - 1.0))
        return sigmas
    if mode == "sigma":
        if weighting_scheme == "logit_normal":
            normal = _per_sample(lambda g: torch.randn((), generator=g), generators, device)
            u = torch.sigmoid(logit_mean + logit_std * normal)
        else:
            u = _per_sample(lambda g: torch.rand((), generator=g), generators, device)
            if weighting_scheme == "mode":
                u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        index = (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
        return discrete_flow_shift((num_train_timesteps - index).float() / num_train_timesteps, shift)
    raise ValueError(f"unknown sigma sampling {mode!r}; choose from {SIGMA_SAMPLING}")


def flow_loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights of sd-scripts' ``--weighting_scheme`` for Anima: ``sigma_sqrt`` σ⁻², ``cosmap``
    2 / (π(1 − 2σ + 2σ²)); the others (``uniform``, ``none``, ``logit_normal``, ``mode``: these shape the sampling
    instead) weigh every sample 1."""
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
    return torch.ones_like(sigmas, dtype=torch.float32)


def flow_noisy_input(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε, with σ broadcast over the non-batch dimensions."""
    sigma = sigmas.view(-1, *[1] * (latents.dim() - 1))
    return (1.0 - sigma) * latents + sigma * noise


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow velocity the model predicts: ε − x0."""
    return noise - latents


# ---------------------------------------------------------------------------------------------------------- loss
def huber_thresholds(
    schedule: str, c: float, scale: float, t_fraction: torch.Tensor, noise_to_signal: torch.Tensor
) -> torch.Tensor:
    """sd-scripts' per-sample Huber threshold δ (``--huber_schedule``): ``constant`` c·scale, ``exponential``
    scale·c^(t/T) (δ falls from scale at t = 0 to c·scale at t = T), ``snr`` (1 − c)/(1 + σ_n)² + c where σ_n is the
    noise-to-signal ratio of the timestep (DDPM: √((1 − ᾱ)/ᾱ); rectified flow: σ/(1 − σ)).

    ``t_fraction`` is t/T in [0, 1] (DDPM: timestep / num_train_timesteps; flow: σ)."""
    if schedule == "constant":
        return torch.full_like(t_fraction, c * scale, dtype=torch.float32)
    if schedule == "exponential":
        return scale * torch.exp(math.log(c) * t_fraction.float())
    if schedule == "snr":
        return (1 - c) / (1 + noise_to_signal.float()) ** 2 + c
    raise ValueError(f"unknown Huber schedule {schedule!r}; choose from {HUBER_SCHEDULES}")


def conditional_loss(
    prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: torch.Tensor | None = None
) -> torch.Tensor:
    """Element-wise loss in float32 (sd-scripts' ``conditional_loss`` with reduction "none"): ``l2`` d², ``l1`` |d|,
    ``huber`` 2δ(√(d² + δ²) − δ), ``smooth_l1`` 2(√(d² + δ²) − δ), with d = prediction − target and δ the
    per-sample ``huber_c``."""
    d = prediction.float() - target.float()
    if loss_type == "l2":
        return d.pow(2)
    if loss_type == "l1":
        return d.abs()
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss type {loss_type!r} needs per-sample Huber thresholds")
        delta = huber_c.float().view(-1, *[1] * (d.dim() - 1))
        # √(d² + δ²) − δ written as d² / (√(d² + δ²) + δ): the same value without float32 cancellation when |d| << δ
        root = d.pow(2) / (torch.sqrt(d.pow(2) + delta.pow(2)) + delta)
        return 2 * delta * root if loss_type == "huber" else 2 * root
    raise ValueError(f"unknown loss type {loss_type!r}; choose from {LOSS_TYPES}")


def per_sample_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    loss_type: str = "l2",
    huber_c: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each sample's mean ``loss_type`` loss in float32, optionally multiplied by its weight: shape (batch,). The
    runner combines them with the samples' loss shares into the step's loss."""
    per_sample = conditional_loss(prediction, target, loss_type, huber_c).flatten(1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample
