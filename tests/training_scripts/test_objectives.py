"""Objectives, step planning, sample-prompt parsing and exact state round trips of the shared helpers."""

import random

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from lyco_train.loop import GradientSteps, plan_steps
from lyco_train.objectives import (
    ddpm_target,
    flow_noisy_input,
    flow_target,
    min_snr_weights,
    per_sample_loss,
    sample_generators,
    sample_noise,
    sample_sigmas,
    sample_timesteps,
    sdxl_time_ids,
)
from lyco_train.runner import step_loss
from lyco_train.sampling import SamplePrompt, parse_prompt_line
from lyco_train.state import _optimizer_from_files, _optimizer_to_files, _rng_restore, rng_snapshot


def _scheduler(kind):
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=kind)


def test_v_prediction_target_and_min_snr_weights_match_formulas():
    latents, noise = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    timesteps = torch.tensor([0, 500, 999])
    eps, v = _scheduler("epsilon"), _scheduler("v_prediction")
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    alpha_bar = np.cumprod(1 - betas)[timesteps.numpy()]
    a = torch.tensor(alpha_bar).view(-1, 1, 1, 1)
    assert torch.equal(ddpm_target(eps, latents, noise, timesteps), noise)
    assert torch.allclose(
        ddpm_target(v, latents, noise, timesteps), a.sqrt() * noise - (1 - a).sqrt() * latents, atol=1e-6
    )
    snr = alpha_bar / (1 - alpha_bar)
    gamma = 5.0
    expected_eps = np.minimum(snr, gamma) / snr
    expected_v = np.minimum(snr, gamma) / (snr + 1)
    assert np.allclose(min_snr_weights(eps, timesteps, gamma).numpy(), expected_eps, rtol=1e-4)
    assert np.allclose(min_snr_weights(v, timesteps, gamma).numpy(), expected_v, rtol=1e-4)
    assert expected_eps[0] < 1 and expected_eps[-1] == 1  # low noise is down-weighted, high noise untouched


def test_noise_offset_adds_one_constant_per_channel():
    latents = torch.zeros(2, 3, 4, 4)
    seeds = torch.tensor([11, 12])
    plain = sample_noise(latents, sample_generators(seeds))
    shifted = sample_noise(latents, sample_generators(seeds), offset=0.1)
    difference = shifted - plain
    assert torch.allclose(difference, difference[:, :, :1, :1].expand_as(difference))
    for row, seed in enumerate(seeds.tolist()):  # each sample: its noise, then its offset, from its own generator
        generator = torch.Generator().manual_seed(seed)
        assert torch.equal(plain[row], torch.randn((3, 4, 4), generator=generator))
        assert torch.allclose(difference[row, :, 0, 0], 0.1 * torch.randn((3, 1, 1), generator=generator)[:, 0, 0])


def test_each_sample_draws_from_its_own_seed_whatever_the_batch():
    """The property multi-process equality rests on: a sample's noise and timestep depend on its seed only, not on
    which other samples share its batch."""
    latents, seeds = torch.zeros(4, 2, 3, 3), torch.tensor([5, 6, 7, 8])
    together = sample_generators(seeds)
    noise, steps = sample_noise(latents, together, 0.05), sample_timesteps(1000, together, torch.device("cpu"))
    for halves in (slice(0, 1), slice(1, 3), slice(3, 4)):
        apart = sample_generators(seeds[halves])
        assert torch.equal(sample_noise(latents[halves], apart, 0.05), noise[halves])
        assert torch.equal(sample_timesteps(1000, apart, torch.device("cpu")), steps[halves])
    sigmas = sample_sigmas("sigmoid", sample_generators(seeds), torch.device("cpu"))
    assert torch.equal(sample_sigmas("sigmoid", sample_generators(seeds[2:]), torch.device("cpu")), sigmas[2:])


def test_sdxl_time_ids_order():
    ids = sdxl_time_ids(torch.tensor([[600, 800]]), torch.tensor([[10, 20]]), torch.tensor([[512, 768]]))
    assert ids.tolist() == [[600, 800, 10, 20, 512, 768]]


def test_sigma_sampling_modes():
    n, cpu = 4000, torch.device("cpu")
    seeds = torch.arange(n)
    draws = torch.stack([torch.randn((), generator=torch.Generator().manual_seed(i)) for i in range(n)])
    sigmoid = sample_sigmas("sigmoid", sample_generators(seeds), cpu, sigmoid_scale=1.5)
    assert torch.allclose(sigmoid, torch.sigmoid(1.5 * draws))
    shifted = sample_sigmas("shift", sample_generators(seeds), cpu, shift=3.0)
    base = torch.sigmoid(draws)
    assert torch.allclose(shifted, 3 * base / (1 + 2 * base))
    assert shifted.mean() > base.mean() + 0.1  # shift > 1 moves σ towards noise
    uniform = sample_sigmas("uniform", sample_generators(seeds), cpu)
    assert 0 <= uniform.min() and uniform.max() < 1 and abs(uniform.mean().item() - 0.5) < 0.02
    with pytest.raises(ValueError, match="unknown sigma sampling 'logit'"):
        sample_sigmas("logit", sample_generators(seeds[:2]), cpu)


def test_flow_matching_interpolation_and_target():
    x0, eps = torch.randn(2, 16, 1, 4, 4), torch.randn(2, 16, 1, 4, 4)
    sigma = torch.tensor([0.0, 1.0])
    noisy = flow_noisy_input(x0, eps, sigma)
    assert torch.equal(noisy[0], x0[0]) and torch.equal(noisy[1], eps[1])
    # the velocity is d x_σ / dσ: a finite difference of the interpolation gives the target
    h = 1e-3
    mid = torch.tensor([0.4, 0.4])
    derivative = (flow_noisy_input(x0, eps, mid + h) - flow_noisy_input(x0, eps, mid - h)) / (2 * h)
    assert torch.allclose(derivative, flow_target(x0, eps), atol=1e-3)


def test_per_sample_l2_loss():
    prediction, target = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    assert per_sample_loss(prediction, target).tolist() == [1.0, 4.0]
    assert per_sample_loss(prediction, target, torch.tensor([1.0, 0.5])).tolist() == [1.0, 2.0]
    assert step_loss(per_sample_loss(prediction, target), torch.tensor([0.5, 0.5], dtype=torch.float64)) == 2.5


@pytest.mark.parametrize(
    "batches, accumulation, max_steps, max_epochs, expected",
    [(10, 1, 25, None, (10, 25, 3)), (10, 3, 25, None, (4, 25, 7)), (10, 4, 1600, 2, (3, 6, 2))],
)
def test_plan_steps(batches, accumulation, max_steps, max_epochs, expected):
    plan = plan_steps(batches, accumulation, max_steps, max_epochs)
    assert (plan.steps_per_epoch, plan.total_steps, plan.total_epochs) == expected


def test_gradient_accumulation_groups_end_at_epoch_end():
    steps = GradientSteps(accelerator=None, models=[], accumulation=4)
    syncs = [i for i in range(10) if steps.is_sync(i, 10)]
    assert syncs == [3, 7, 9]
    assert [steps.group_size(i, 10) for i in range(10)] == [4] * 8 + [2, 2]


def test_sample_prompt_options():
    defaults = SamplePrompt(prompt="", width=1024, height=1024)
    parsed = parse_prompt_line("a cat, sitting --n blurry, low quality --w 768 --h 512 --d 5 --s 12 --l 4.5", defaults)
    assert parsed == SamplePrompt("a cat, sitting", "blurry, low quality", 768, 512, 5, 12, 4.5)
    with pytest.raises(ValueError, match="unknown sample prompt option --x"):
        parse_prompt_line("cat --x 1", defaults)
    with pytest.raises(ValueError, match="--w needs a number"):
        parse_prompt_line("cat --w big", defaults)


def test_optimizer_state_round_trips_exactly_through_files():
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    optimizer = torch.optim.AdamW([{"params": params[:1], "name": "a"}, {"params": params[1:], "lr": 0.5, "name": "b"}])
    for _ in range(3):
        sum(p.square().sum() for p in params).backward()
        optimizer.step()
    structure, tensors = _optimizer_to_files(optimizer.state_dict())
    import json

    structure = json.loads(json.dumps(structure))  # what a state folder stores
    twin = torch.optim.AdamW(
        [
            {"params": [torch.nn.Parameter(p.detach().clone()) for p in params[:1]], "name": "a"},
            {"params": [torch.nn.Parameter(p.detach().clone()) for p in params[1:]], "name": "b"},
        ]
    )
    twin.load_state_dict(_optimizer_from_files(structure, tensors))
    original, restored = optimizer.state_dict(), twin.state_dict()
    assert restored["param_groups"][1]["lr"] == 0.5 and restored["param_groups"][1]["name"] == "b"
    for index, state in original["state"].items():
        for key, value in state.items():
            assert torch.equal(restored["state"][index][key], value)


def test_rng_snapshot_restores_every_generator():
    info, tensors = rng_snapshot()
    import json

    info = json.loads(json.dumps(info))
    first = (torch.rand(3), np.random.rand(2), random.random())
    _rng_restore(info, tensors)
    second = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1]) and first[2] == second[2]
