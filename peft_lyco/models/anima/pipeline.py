"""A small Anima text-to-image helper: encode the prompt, Euler steps on the flow ODE, decode with the VAE."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .dit import AnimaDiT
from .text import PromptEmbeds, encode_prompt
from .vae import decode_latents

VAE_SCALE = 8


def flow_sigmas(steps: int, shift: float = 5.0) -> torch.Tensor:
    """``steps + 1`` noise levels from 1 to 0, shifted: ``σ' = s·σ / (1 + (s − 1)·σ)`` (sd-scripts' sampler)."""
    if steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class AnimaPipeline:
    """Text-to-image with an ``AnimaDiT``, Qwen3 encoder, Qwen and T5 tokenizers and the Qwen-Image VAE.

    Enough to look at what a trained adapter does (``pipe(prompt, ...)``); the DiT may carry PEFT adapters.
    """

    def __init__(
        self,
        dit: AnimaDiT,
        text_encoder,
        tokenizer,
        t5_tokenizer,
        vae,
        *,
        max_length: int = 512,
        t5_max_length: int = 512,
    ):
        self.dit, self.text_encoder, self.vae = dit, text_encoder, vae
        self.tokenizer, self.t5_tokenizer = tokenizer, t5_tokenizer
        self.max_length, self.t5_max_length = max_length, t5_max_length

    def encode_prompt(self, prompts: str | Sequence[str]) -> PromptEmbeds:
        """Qwen3 states, masks and T5 ids for ``prompts`` (see ``text.encode_prompt``)."""
        return encode_prompt(
            prompts,
            self.text_encoder,
            self.tokenizer,
            self.t5_tokenizer,
            max_length=self.max_length,
            t5_max_length=self.t5_max_length,
        )

    @torch.no_grad()
    def context(self, embeds: PromptEmbeds) -> torch.Tensor:
        """The DiT's cross-attention context: the LLM adapter's output with padded T5 rows zeroed."""
        return self.dit.adapt_context(
            embeds.prompt_embeds, embeds.t5_input_ids, embeds.t5_attention_mask, embeds.attention_mask
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        *,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.5,
        flow_shift: float = 5.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
    ):
        """Generate images: ``output_type`` "pt" (B, 3, H, W) in [0, 1], "pil" (list of PIL images) or "latent".

        Velocity guidance ``v = v_uncond + g·(v_cond − v_uncond)`` (skipped when g = 1) and Euler updates
        ``x ← x + (σ_next − σ)·v``, starting from Gaussian noise at σ = 1.
        """
        if output_type not in ("pt", "pil", "latent"):
            raise ValueError(f"output_type must be 'pt', 'pil' or 'latent', got {output_type!r}")
        if height % (2 * VAE_SCALE) or width % (2 * VAE_SCALE):
            raise ValueError(f"height and width must be multiples of {2 * VAE_SCALE}, got {height}x{width}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        # the compute dtype: float8 parameters are storage only (a base stored in fp8 is read in a wider dtype)
        param = next(p for p in self.dit.parameters() if p.element_size() > 1)
        cond = self.context(self.encode_prompt(prompts))
        uncond = self.context(self.encode_prompt(negatives)) if guidance_scale != 1.0 else None
        shape = (len(prompts), self.dit.config.in_channels, height // VAE_SCALE, width // VAE_SCALE)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(param.device)
        x = latents.to(param.device, torch.float32)
        sigmas = flow_sigmas(num_inference_steps, flow_shift)
        for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            timesteps = torch.full((x.shape[0],), sigma, device=param.device, dtype=param.dtype)
            velocity = self.dit(x.to(param.dtype), timesteps, cond).float()
            if uncond is not None:
                velocity_uncond = self.dit(x.to(param.dtype), timesteps, uncond).float()
                velocity = velocity_uncond + guidance_scale * (velocity - velocity_uncond)
            x = x + (sigma_next - sigma) * velocity
        if output_type == "latent":
            return x
        images = (decode_latents(self.vae, x).float() + 1) / 2
        if output_type == "pt":
            return images
        from PIL import Image

        arrays = (images.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return [Image.fromarray(array) for array in arrays]
