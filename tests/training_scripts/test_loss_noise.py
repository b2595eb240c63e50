"""Loss types and Huber schedules, input perturbation and multires noise, Anima's timestep sampling and weighting:
each against its formula computed independently (fp64, diffusers' schedulers), and the trainers' wiring of them."""

import math

import numpy as np
import pytest
import torch
import train_anima_lokr as anima_trainer
import train_sdxl_lokr as sdxl_trainer
from diffusers import FlowMatchEulerDiscreteScheduler
from lyco_train import objectives
from lyco_train.long_prompts import chunked_token_ids
from lyco_train.objectives import (
    conditional_loss,
    flow_loss_weights,
    huber_thresholds,
    input_perturbation,
    multires_noise,
    per_sample_loss,
    sample_generators,
    sample_sigmas,
)
from lyco_train.synthetic import make_shapes_dataset
from safetensors import safe_open
from safetensors.torch import load_file

CPU = torch.device("cpu")
SEEDS = torch.tensor([11, 22, 33, 44])


# ------------------------------------------------------------------------------------------------ loss types
def test_huber_and_smooth_l1_differ_from_l2_exactly_as_the_formulas_say():
    g = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(3, 4, 5, 5, generator=g) * 3, torch.randn(3, 4, 5, 5, generator=g)
    delta = torch.tensor([0.05, 0.5, 5.0])
    d = prediction.double() - target.double()
    c = delta.double().view(-1, 1, 1, 1)
    huber = 2 * c * (torch.sqrt(d**2 + c**2) - c)
    torch.testing.assert_close(conditional_loss(prediction, target, "l2").double(), d**2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(conditional_loss(prediction, target, "l1").double(), d.abs(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        conditional_loss(prediction, target, "huber", delta).double(), huber, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        conditional_loss(prediction, target, "smooth_l1", delta).double(), huber / c, rtol=1e-5, atol=1e-6
    )
    # the regimes the formula implies: ≈ d² where |d| << δ, ≈ 2δ|d| − 2δ² where |d| >> δ
    small, large = d.abs() < 0.01 * c, d.abs() > 100 * c
    assert small.any() and large.any()
    assert torch.allclose(huber[small], d[small] ** 2, rtol=1e-3)
    assert torch.allclose(huber[large], (2 * c * d.abs() - 2 * c**2).expand_as(d)[large], rtol=1e-3)
    per_sample = per_sample_loss(prediction, target, torch.tensor([1.0, 2.0, 0.5]), loss_type="huber", huber_c=delta)
    torch.testing.assert_close(per_sample.double(), huber.flatten(1).mean(1) * torch.tensor([1.0, 2.0, 0.5]).double())
    with pytest.raises(ValueError, match="needs per-sample Huber thresholds"):
        conditional_loss(prediction, target, "huber")


def test_huber_schedules_match_sd_scripts_formulas():
    timesteps = torch.tensor([0, 250, 999])
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2  # SDXL's scaled_linear schedule
    alpha_bar = torch.tensor(np.cumprod(1 - betas)[timesteps.numpy()])
    scheduler = sdxl_trainer.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    nts = objectives.ddpm_noise_to_signal(scheduler, timesteps)
    torch.testing.assert_close(nts.double(), ((1 - alpha_bar) / alpha_bar).sqrt(), rtol=1e-4, atol=0)  # float32 ᾱ
    c, scale = 0.1, 2.0
    frac = timesteps / 1000
    assert huber_thresholds("constant", c, scale, frac, nts).tolist() == pytest.approx([0.2] * 3)
    alpha = -math.log(c) / 1000  # sd-scripts: exp(-alpha t) * scale
    expected = [math.exp(-alpha * t) * scale for t in timesteps.tolist()]
    assert huber_thresholds("exponential", c, scale, frac, nts).tolist() == pytest.approx(expected, rel=1e-6)
    expected = ((1 - c) / (1 + ((1 - alpha_bar) / alpha_bar).sqrt()) ** 2 + c).tolist()
    assert huber_thresholds("snr", c, scale, frac, nts).tolist() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------------- noise
def test_input_perturbation_adds_gamma_times_fresh_noise_per_sample():
    noise = torch.randn(4, 3, 6, 6)
    perturbed = input_perturbation(noise, sample_generators(SEEDS), 0.1)
    xi = torch.stack([torch.randn((3, 6, 6), generator=torch.Generator().manual_seed(int(s))) for s in SEEDS])
    torch.testing.assert_close(perturbed, noise + 0.1 * xi)
    random = input_perturbation(noise, sample_generators(SEEDS), 0.1, random_strength=True)
    strengths = []
    for i, seed in enumerate(SEEDS):
        g = torch.Generator().manual_seed(int(seed))
        xi_i = torch.randn((3, 6, 6), generator=g)
        strengths.append(float(torch.rand((), generator=g)) * 0.1)
        torch.testing.assert_close(random[i], noise[i] + strengths[i] * xi_i)
    assert all(0 <= s < 0.1 for s in strengths) and len(set(strengths)) == 4
    # a sample's perturbation does not depend on its batch-mates (DDP splits batches)
    torch.testing.assert_close(input_perturbation(noise[2:], sample_generators(SEEDS[2:]), 0.1), perturbed[2:])


def _pyramid_reference(sample, generator, iterations, discount):
    """sd-scripts' pyramid_noise_like for one sample (random.random() replaced by the sample's generator)."""
    c, h, w = sample.shape
    up = torch.nn.Upsample(size=(h, w), mode="bilinear")
    out = sample.clone().double()
    for i in range(iterations):
        r = float(torch.rand((), generator=generator)) * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        out += up(torch.randn(1, c, hn, wn, generator=generator)).double()[0] * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def test_multires_noise_matches_sd_scripts_pyramid_per_sample():
    noise = torch.randn(4, 4, 32, 24)
    out = multires_noise(noise, sample_generators(SEEDS), 6, 0.3)
    for i, seed in enumerate(SEEDS):
        expected = _pyramid_reference(noise[i], torch.Generator().manual_seed(int(seed)), 6, 0.3)
        torch.testing.assert_close(out[i].double(), expected, rtol=1e-5, atol=1e-5)
        assert float(out[i].std()) == pytest.approx(1.0, rel=1e-5)
    assert (out - noise / noise.std()).abs().max() > 0.1  # low frequencies really were added
    torch.testing.assert_close(multires_noise(noise[1:3], sample_generators(SEEDS[1:3]), 6, 0.3), out[1:3])


# ------------------------------------------------------------------------------------- Anima timestep sampling
def _draws(kind, count=4):
    return [getattr(torch, kind)((), generator=torch.Generator().manual_seed(int(s))) for s in SEEDS[:count]]


def test_sigma_sampling_modes_match_their_formulas():
    gens = lambda: sample_generators(SEEDS)
    normal = torch.stack(_draws("randn"))
    uniform = torch.stack(_draws("rand"))
    torch.testing.assert_close(sample_sigmas("sigmoid", gens(), CPU, sigmoid_scale=1.5), torch.sigmoid(1.5 * normal))
    s = torch.sigmoid(normal)
    torch.testing.assert_close(sample_sigmas("shift", gens(), CPU, shift=3.0), 3 * s / (1 + 2 * s))
    # flux_shift at 64x64 latents: 32*32 image tokens, mu linear in them (0.5 at 256, 1.15 at 4096)
    mu = 0.5 + (1.15 - 0.5) * (1024 - 256) / (4096 - 256)
    expected = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    torch.testing.assert_close(sample_sigmas("flux_shift", gens(), CPU, image_seq_len=1024), expected)
    torch.testing.assert_close(sample_sigmas("uniform", gens(), CPU), uniform)


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_sigma_mode_picks_the_flow_matching_schedule_at_the_density_index(scheme):
    """σ is diffusers' FlowMatchEulerDiscreteScheduler(1000 steps, shift s) sigma at index ⌊u·1000⌋."""
    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).sigmas
    if scheme == "logit_normal":
        u = torch.sigmoid(0.5 + 0.8 * torch.stack(_draws("randn")))
    else:
        u = torch.stack(_draws("rand"))
        if scheme == "mode":
            u = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    index = (u * 1000).long().clamp(0, 999)
    got = sample_sigmas("sigma", sample_generators(SEEDS), CPU, shift=3.0, weighting_scheme=scheme, logit_mean=0.5,
                        logit_std=0.8)  # fmt: skip
    torch.testing.assert_close(got, reference[index].float(), rtol=1e-6, atol=1e-7)


def test_sigma_mode_logit_normal_distribution():
    """Over many samples, logit(1 − σ) (shift 1) follows N(logit_mean, logit_std) up to the 1/1000 grid."""
    sigmas = sample_sigmas("sigma", sample_generators(torch.arange(4000)), CPU, weighting_scheme="logit_normal",
                           logit_mean=-0.5, logit_std=0.7)  # fmt: skip
    logits = torch.logit((1 - sigmas).clamp(1e-3, 1 - 1e-3))
    assert float(logits.mean()) == pytest.approx(-0.5, abs=0.05)
    assert float(logits.std()) == pytest.approx(0.7, abs=0.05)


def test_flow_loss_weights():
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(flow_loss_weights("sigma_sqrt", sigmas), sigmas**-2)
    torch.testing.assert_close(flow_loss_weights("cosmap", sigmas), 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2)))
    for scheme in ("uniform", "none", "logit_normal", "mode"):
        assert flow_loss_weights(scheme, sigmas).tolist() == [1.0, 1.0, 1.0]


# -------------------------------------------------------------------------------------------- trainer wiring
def _capturing(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _run(module, tmp_path, *argv):
    make_shapes_dataset(tmp_path / "data", count=2, size=64, repeats=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "check_reload", lambda *a, **k: None)
        return module.main(["--train_data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out"),
                            "--sample_every_n_steps", "1000", "--max_train_steps", "1", *argv])  # fmt: skip


def test_sdxl_huber_exponential_with_noise_options_uses_each_samples_timestep(tmp_path, monkeypatch):
    losses = _capturing(monkeypatch, sdxl_trainer, "per_sample_loss")
    timesteps = _capturing(monkeypatch, sdxl_trainer, "sample_timesteps")
    multires = _capturing(monkeypatch, sdxl_trainer, "multires_noise")
    perturbed = _capturing(monkeypatch, sdxl_trainer, "input_perturbation")
    text = _capturing(monkeypatch, sdxl_trainer, "encode_captions")
    result = _run(sdxl_trainer, tmp_path, "--loss_type", "huber", "--huber_schedule", "exponential", "--huber_c", "0.2",
                  "--huber_scale", "1.5", "--ip_noise_gamma", "0.1", "--multires_noise_iterations", "3",
                  "--network_train_unet_only", "--clip_skip", "1", "--max_token_length", "150")  # fmt: skip
    (prediction, target, _weights), kwargs, loss = losses[0]
    t = timesteps[0][2]
    torch.testing.assert_close(kwargs["huber_c"].double(), 1.5 * 0.2 ** (t.double() / 1000), rtol=1e-6, atol=0)
    d, c = prediction.double() - target.double(), kwargs["huber_c"].double().view(-1, 1, 1, 1)
    torch.testing.assert_close(loss.double(), (2 * c * (torch.sqrt(d**2 + c**2) - c)).flatten(1).mean(1), rtol=1e-5,
                               atol=1e-7)  # fmt: skip
    assert torch.equal(target, multires[0][2])  # epsilon target: the multires noise, not the perturbed one
    assert perturbed[0][0][0] is multires[0][2] and not torch.equal(perturbed[0][2], target)
    assert text[0][2]["prompt_embeds"].shape[1] == 152  # two 75-token chunks + BOS + EOS
    with safe_open(result.final, "pt") as handle:
        metadata = handle.metadata()
    assert (metadata["ss_loss_type"], metadata["ss_huber_schedule"], metadata["ss_ip_noise_gamma"]) == (
        "huber", "exponential", "0.1")  # fmt: skip
    assert (metadata["ss_clip_skip"], metadata["ss_max_token_length"]) == ("1", "150")


def test_anima_sigma_sampling_weighting_and_smooth_l1_snr(tmp_path, monkeypatch):
    losses = _capturing(monkeypatch, anima_trainer, "per_sample_loss")
    sigmas = _capturing(monkeypatch, anima_trainer, "sample_sigmas")
    result = _run(anima_trainer, tmp_path, "--timestep_sampling", "sigma", "--weighting_scheme", "cosmap",
                  "--discrete_flow_shift", "3", "--loss_type", "smooth_l1", "--ip_noise_gamma", "0.05")  # fmt: skip
    (_, _, weights), kwargs, _ = losses[0]
    s = sigmas[0][2].double()
    assert sigmas[0][1]["weighting_scheme"] == "cosmap" and sigmas[0][1]["shift"] == 3.0
    grid = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).sigmas.double()
    assert all((grid - value).abs().min() < 1e-6 for value in s)  # on the shifted schedule
    torch.testing.assert_close(weights.double(), 2 / (math.pi * (1 - 2 * s + 2 * s**2)), rtol=1e-6, atol=0)
    expected = (1 - 0.1) / (1 + s / (1 - s)) ** 2 + 0.1  # snr schedule with the flow's noise-to-signal σ/(1 − σ)
    torch.testing.assert_close(kwargs["huber_c"].double(), expected, rtol=1e-5, atol=0)
    with safe_open(result.final, "pt") as handle:
        metadata = handle.metadata()
    assert (metadata["ss_timestep_sampling"], metadata["ss_weighting_scheme"]) == ("sigma", "cosmap")


# -------------------------------------------------------------------------------------------------- block swap
def _tiny_dit_with_lokr():
    from peft import inject_adapter_in_model

    from peft_lyco import LoKrConfig
    from peft_lyco.models.anima import build_tiny_anima

    dit = build_tiny_anima(seed=0).dit.requires_grad_(False)
    inject_adapter_in_model(
        LoKrConfig(r=2, alpha=1.0, target_modules=r"blocks\.\d+\..*(q_proj|v_proj|output_proj|layer1)"), dit
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in dit.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    return dit


def _velocity_and_grads(dit):
    g = torch.Generator().manual_seed(3)
    x, context = (
        torch.randn(2, 16, 8, 8, generator=g),
        torch.randn(2, 5, dit.config.crossattn_emb_channels, generator=g),
    )
    dit.train()
    out = dit(x, torch.tensor([0.3, 0.8]), context)
    out.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in dit.named_parameters() if p.requires_grad}
    dit.zero_grad(set_to_none=True)
    return out.detach(), grads


def test_block_swap_gives_the_same_output_and_gradients_and_keeps_blocks_offloaded_between_uses():
    plain = _tiny_dit_with_lokr()
    swapped = _tiny_dit_with_lokr()
    count = len(swapped.blocks)
    swap = swapped.enable_block_swap(count, "cpu")
    swap.offload()
    seen = []  # per use of a swapped block: were its weights the offloaded copies while it ran?
    for index, block in enumerate(swapped.blocks):
        block.register_forward_pre_hook(lambda module, args, index=index: seen.append(swap.on_offload_device(index)))
    want_out, want_grads = _velocity_and_grads(plain)
    got_out, got_grads = _velocity_and_grads(swapped)
    assert torch.equal(got_out, want_out)
    assert got_grads.keys() == want_grads.keys() and all(torch.equal(got_grads[k], want_grads[k]) for k in want_grads)
    assert seen == [False] * (2 * count)  # forward and backward's recompute both ran on fresh device copies
    assert all(swap.on_offload_device(i) for i in range(count))  # and between uses they are the offloaded copies
    trainable = [p for b in swapped.blocks for p in b.parameters() if p.requires_grad]
    assert trainable and all(
        p.data_ptr() not in {h.data_ptr() for hs in swap.homes.values() for _, h in hs} for p in trainable
    )  # fmt: skip  (adapters never move)
    with torch.no_grad():  # inference path: brought in and out around the call
        assert torch.equal(swapped(*_inference_inputs(swapped)), plain(*_inference_inputs(plain)))
    assert all(swap.on_offload_device(i) for i in range(count))


def _inference_inputs(dit):
    g = torch.Generator().manual_seed(4)
    return torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.5]), torch.randn(1, 3, dit.config.crossattn_emb_channels,
                                                                                    generator=g)  # fmt: skip


def test_anima_blocks_to_swap_trains_the_same_adapter(tmp_path):
    argv = ("--max_train_steps", "2", "--learning_rate", "1e-2", "--seed", "3")
    straight = _run(anima_trainer, tmp_path / "a", *argv)
    swapped = _run(anima_trainer, tmp_path / "b", *argv, "--blocks_to_swap", "2")
    a, b = load_file(straight.final), load_file(swapped.final)
    assert swapped.losses == straight.losses  # the forward passes are bit-identical
    # the gradients of tensors every block reads (the trained LLM adapter's context, the time embedding) are summed
    # per block first, then across blocks: the same sum in another order, so the adapters agree to float32 rounding
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert swapped.components.dit.block_swap is not None and all(
        swapped.components.dit.block_swap.on_offload_device(i) for i in (0, 1)
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_block_swap_on_cuda_keeps_offloaded_weights_on_pinned_cpu_and_matches():
    plain, swapped = _tiny_dit_with_lokr().cuda(), _tiny_dit_with_lokr().cuda()
    swap = swapped.enable_block_swap(len(swapped.blocks), "cuda")
    swap.offload()
    frozen = [p for b in swapped.blocks for p in b.parameters() if not p.requires_grad]
    assert all(p.device.type == "cpu" and p.is_pinned() for p in frozen)
    g = torch.Generator().manual_seed(3)
    x, context = (
        torch.randn(2, 16, 8, 8, generator=g),
        torch.randn(2, 5, plain.config.crossattn_emb_channels, generator=g),
    )
    results = []
    for dit in (plain, swapped):
        out = dit(x.cuda(), torch.tensor([0.3, 0.8], device="cuda"), context.cuda())
        out.pow(2).mean().backward()
        results.append((out, {n: p.grad for n, p in dit.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[1][0], results[0][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad)
    assert all(p.device.type == "cpu" for p in frozen)


# ------------------------------------------------------------------------------- SDXL long prompts, clip skip
LONG = " ".join(f"word{i}" for i in range(120))  # more than 75 tokens, fewer than 150


def _tiny_pipe():
    from peft_lyco.models.tiny_sdxl import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(seed=0)


@pytest.mark.parametrize("separate_pad", [False, True])
def test_chunked_token_ids_follow_sd_scripts(separate_pad):
    tokenizer = _tiny_pipe().tokenizer
    if separate_pad:  # SDXL's second tokenizer pads with a token that is not EOS
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(5)
    ids = chunked_token_ids(tokenizer, [LONG, "a red circle"], 225)
    full = tokenizer([LONG, "a red circle"], padding="max_length", max_length=227, truncation=True).input_ids
    assert ids.shape == (2, 3, 77)
    for row, tokens in enumerate(full):
        for chunk in range(3):
            expected = [tokens[0], *tokens[1 + 75 * chunk : 76 + 75 * chunk], tokens[-1]]
            if separate_pad:
                if expected[-2] not in (tokenizer.eos_token_id, tokenizer.pad_token_id):
                    expected[-1] = tokenizer.eos_token_id
                if expected[1] == tokenizer.pad_token_id:
                    expected[1] = tokenizer.eos_token_id
            assert ids[row, chunk].tolist() == expected
    assert chunked_token_ids(tokenizer, ["x"], None).shape == (1, 1, 77)


def test_long_prompt_states_join_chunks_and_clip_skip_picks_the_hidden_state():
    pipe = _tiny_pipe()
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    with torch.no_grad():
        short = sdxl_trainer.encode_captions(pipe, ["a red circle", LONG], encoders)
        long = sdxl_trainer.encode_captions(pipe, ["a red circle", LONG], encoders, max_token_length=150)
        last = sdxl_trainer.encode_captions(pipe, ["a red circle", LONG], encoders, clip_skip=1)
        ids = [t(["a red circle", LONG], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
               .input_ids for t in (pipe.tokenizer, pipe.tokenizer_2)]  # fmt: skip
        direct = [e(i, output_hidden_states=True) for e, i in zip(encoders, ids)]
    assert long["prompt_embeds"].shape == (2, 152, short["prompt_embeds"].shape[-1])
    # the first chunk of a 150-token encoding is the 75-token encoding (BOS + 75 tokens)
    torch.testing.assert_close(long["prompt_embeds"][:, :76], short["prompt_embeds"][:, :76])
    torch.testing.assert_close(long["pooled"], short["pooled"])
    torch.testing.assert_close(short["prompt_embeds"], torch.cat([d.hidden_states[-2] for d in direct], -1))
    torch.testing.assert_close(last["prompt_embeds"], torch.cat([d.hidden_states[-1] for d in direct], -1))
    # the caption's tokens 76..150 reach the UNet only with --max_token_length 150
    chunk2 = [t([LONG], padding="max_length", max_length=152, truncation=True, return_tensors="pt").input_ids
              for t in (pipe.tokenizer, pipe.tokenizer_2)]  # fmt: skip
    with torch.no_grad():
        second = [e(torch.cat([i[:, :1], i[:, 76:151], i[:, -1:]], 1), output_hidden_states=True).hidden_states[-2]
                  for e, i in zip(encoders, chunk2)]  # fmt: skip
    torch.testing.assert_close(long["prompt_embeds"][1:, 76:151], torch.cat(second, -1)[:, 1:76])
