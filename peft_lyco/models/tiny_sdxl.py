"""A tiny, randomly initialised SDXL pipeline built fully offline from configs (no files, no downloads).

Same component types and module names as real SDXL (diffusers ``UNet2DConditionModel`` with linear projections,
``CLIPTextModel`` + ``CLIPTextModelWithProjection``), so adapters, file names and pipeline calls behave as on the real
model. Tests and the trainers' smoke runs use it; the configs follow diffusers' own SDXL fast tests.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TINY_UNET_CONFIG = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + TE2 projection dim 32
    cross_attention_dim=64,  # TE1 hidden 32 + TE2 hidden 32
    norm_num_groups=1,
)

TINY_CLIP_CONFIG = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=5,
    num_attention_heads=4,
    projection_dim=32,
    vocab_size=1000,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
)

TINY_VAE_CONFIG = dict(
    block_out_channels=[32, 64],
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    latent_channels=4,
    sample_size=128,
)

SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
)


def byte_level_vocab() -> dict[str, int]:
    """A 514-entry CLIP vocabulary that tokenises any text byte by byte (no merges needed).

    Ids 0 and 1 are ``<|startoftext|>`` / ``<|endoftext|>``; then, for each of the 256 symbols of the GPT-2/CLIP
    byte-to-unicode table, the symbol itself and the symbol + ``</w>`` (end of word).
    """
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in _byte_symbols():
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    return vocab


def _byte_symbols() -> list[str]:
    """The byte-to-unicode table of byte-level BPE: printable bytes map to themselves, the rest to code points 256+."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = 0
    symbols = {}
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + shifted)
            shifted += 1
    return [symbols[byte] for byte in range(256)]


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """An in-memory CLIP tokenizer over ``byte_level_vocab()`` with CLIP's 77-token window."""
    return CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=77)


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """Build the tiny SDXL pipeline with weights drawn from ``torch.manual_seed(seed)`` (fp32, CPU, ~4 s).

    Structure: UNet with two levels (32/64 channels, 2 resnets per level, transformer depth 1/2, linear projections,
    ``text_time`` added conditioning), two 5-layer CLIP text encoders (hidden 32; the second with a projection),
    a two-level VAE and an Euler scheduler. ``text_encoder`` has no ``text_model`` level under transformers 5,
    ``text_encoder_2`` has one, as in real SDXL.
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
        clip_config = CLIPTextConfig(**TINY_CLIP_CONFIG)
        text_encoder = CLIPTextModel(clip_config)
        text_encoder_2 = CLIPTextModelWithProjection(clip_config)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
    finally:
        torch.random.set_rng_state(generator_state)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
    )
    pipe.set_progress_bar_config(disable=True)
    for model in (unet, text_encoder, text_encoder_2, vae):
        model.eval()
    return pipe
