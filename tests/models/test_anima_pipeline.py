"""The tiny Anima setup end to end: prompt encoding, latent normalisation, Euler flow sampling, adapters."""

import pytest
import torch
from peft import get_peft_model

from peft_lyco.models.anima import (
    build_tiny_anima,
    decode_latents,
    encode_images,
    flow_sigmas,
    tiny_t5_tokenizer,
)
from peft_lyco.models.anima.vae import LATENT_MEAN, LATENT_STD
from peft_lyco.presets import build_config


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_anima(seed=0)


def test_flow_sigmas_follow_the_shifted_linear_schedule():
    steps, shift = 4, 3.0
    expected = [shift * (1 - i / steps) / (1 + (shift - 1) * (1 - i / steps)) for i in range(steps + 1)]
    torch.testing.assert_close(flow_sigmas(steps, shift), torch.tensor(expected))
    with pytest.raises(ValueError, match="num_inference_steps"):
        flow_sigmas(0)


def test_encode_prompt_masks_and_zeroes_padding(tiny):
    embeds = tiny.pipeline().encode_prompt(["a red cat", "a much longer prompt about two dogs"])
    assert embeds.prompt_embeds.shape == (2, 32, 32)
    mask = embeds.attention_mask
    assert mask[0].sum() == len("a red cat")  # byte-level tokenizer without merges: one token per byte
    assert embeds.prompt_embeds[0, mask[0] == 0].abs().max() == 0
    assert embeds.prompt_embeds[0, mask[0] == 1].abs().min() > 0
    t5 = tiny_t5_tokenizer()
    expected_ids = t5("a red cat")["input_ids"]
    assert embeds.t5_input_ids[0, : len(expected_ids)].tolist() == expected_ids and expected_ids[-1] == 1  # </s>
    assert embeds.t5_input_ids[0, len(expected_ids) :].eq(0).all()
    assert embeds.t5_attention_mask[0].sum() == len(expected_ids)


def test_vae_latents_are_normalised_per_channel(tiny):
    torch.manual_seed(0)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    mean, std = torch.tensor(LATENT_MEAN).view(1, 16, 1, 1), torch.tensor(LATENT_STD).view(1, 16, 1, 1)
    with torch.no_grad():
        raw = tiny.vae.encode(pixels[:, :, None]).latent_dist.mode()[:, :, 0]
        latents = encode_images(tiny.vae, pixels)
        torch.testing.assert_close(latents, (raw - mean) / std)
        decoded = decode_latents(tiny.vae, latents)
        expected = tiny.vae.decode((latents * std + mean)[:, :, None]).sample[:, :, 0].clamp(-1, 1)
    assert decoded.shape == (1, 3, 32, 32)
    torch.testing.assert_close(decoded, expected)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        encode_images(tiny.vae, pixels[0])


def test_sampling_is_guided_euler_on_the_flow(tiny):
    pipe = tiny.pipeline()
    start = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    got = pipe(
        "a red cat",
        "blurry",
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=2.5,
        flow_shift=3.0,
        latents=start,
        output_type="latent",
    )
    cond = pipe.context(pipe.encode_prompt("a red cat"))
    uncond = pipe.context(pipe.encode_prompt("blurry"))
    x = start.clone()
    with torch.no_grad():
        for sigma, sigma_next in [(1.0, 0.75), (0.75, 0.0)]:  # 3·0.5 / (1 + 2·0.5) = 0.75
            t = torch.tensor([sigma])
            v_cond, v_uncond = tiny.dit(x, t, cond), tiny.dit(x, t, uncond)
            x = x + (sigma_next - sigma) * (v_uncond + 2.5 * (v_cond - v_uncond))
    torch.testing.assert_close(got, x)


def test_pipeline_outputs_and_input_checks(tiny):
    pipe = tiny.pipeline()
    kwargs = dict(height=32, width=48, num_inference_steps=2)
    first = pipe("a red cat", generator=torch.Generator().manual_seed(1), **kwargs)
    second = pipe("a red cat", generator=torch.Generator().manual_seed(1), **kwargs)
    assert first.shape == (1, 3, 32, 48) and torch.equal(first, second)
    assert 0 <= first.min() and first.max() <= 1
    images = pipe(["a", "b"], generator=torch.Generator().manual_seed(1), output_type="pil", **kwargs)
    assert [image.size for image in images] == [(48, 32), (48, 32)]
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe("a", height=40, width=32)
    with pytest.raises(ValueError, match="output_type"):
        pipe("a", height=32, width=32, output_type="np")


def test_lokr_adapter_from_presets_changes_the_tiny_pipeline(tiny):
    pipe = tiny.pipeline()
    kwargs = dict(height=32, width=32, num_inference_steps=2, output_type="latent")
    start = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    plain = pipe("a red cat", latents=start, **kwargs)
    config = build_config("lokr", tiny.dit, network_dim=4, network_alpha=2, train_llm_adapter=True, init_weights=False)
    adapted = build_tiny_anima(seed=0)
    adapted.dit = get_peft_model(adapted.dit, config).base_model.model
    changed = adapted.pipeline()("a red cat", latents=start, **kwargs)
    assert (changed - plain).abs().max() > 1e-3
