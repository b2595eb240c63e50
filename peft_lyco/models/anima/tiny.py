"""A tiny, randomly initialised Anima setup built from configs only (no files, no downloads).

Same architecture and parameter names as the released model at toy sizes: the Anima trainer's embedded default and
what the tests use. ``build_tiny_anima()`` returns every component; ``.pipeline()`` wraps them for sampling.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

import torch

from .config import AnimaConfig
from .dit import AnimaDiT
from .pipeline import AnimaPipeline
from .vae import LATENT_MEAN, LATENT_STD

# weights the reference initialises to zero (AdaLN-LoRA outputs, adapter MLP outputs)
ZERO_INIT_WEIGHTS = re.compile(r".*(adaln_modulation\w*\.2|llm_adapter\.blocks\.\d+\.mlp\.2)\.weight")
TINY_MAX_LENGTH = 32
TINY_QWEN3 = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    max_position_embeddings=128,
)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])


def tiny_qwen_tokenizer():
    """Byte-level BPE tokenizer with the 256 byte symbols and ``<|endoftext|>`` (also pad), no merges."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=TINY_MAX_LENGTH)


def tiny_t5_tokenizer():
    """Unigram T5 tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) over lowercase letters, digits and punctuation."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(char, -2.0) for char in string.ascii_lowercase + string.digits + string.punctuation]
    pieces += [("\u2581" + char, -1.5) for char in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=TINY_MAX_LENGTH)


def tiny_anima_config(adapter_vocab_size: int, text_hidden_size: int = TINY_QWEN3["hidden_size"]) -> AnimaConfig:
    """2 blocks, width 32, 2 heads of 16 (RoPE t/h/w = 8/4/4), AdaLN-LoRA 8, a 2-block 32-wide adapter."""
    return AnimaConfig(
        model_channels=32,
        num_blocks=2,
        num_heads=2,
        crossattn_emb_channels=32,
        adaln_lora_dim=8,
        max_img_h=64,
        max_img_w=64,
        max_frames=4,
        adapter_source_dim=text_hidden_size,
        adapter_model_dim=32,
        adapter_num_layers=2,
        adapter_num_heads=4,
        adapter_vocab_size=adapter_vocab_size,
    )


@dataclass
class AnimaComponents:
    """Everything an Anima run needs; ``max_length``/``t5_max_length`` are the token lengths to pad to."""

    dit: AnimaDiT
    text_encoder: torch.nn.Module
    tokenizer: object
    t5_tokenizer: object
    vae: torch.nn.Module
    max_length: int = 512
    t5_max_length: int = 512

    def pipeline(self) -> AnimaPipeline:
        return AnimaPipeline(
            self.dit,
            self.text_encoder,
            self.tokenizer,
            self.t5_tokenizer,
            self.vae,
            max_length=self.max_length,
            t5_max_length=self.t5_max_length,
        )


def build_tiny_anima(seed: int = 0) -> AnimaComponents:
    """Tiny DiT + Qwen3Model + in-memory tokenizers + Qwen-Image VAE, deterministic for a given ``seed``.

    The DiT's zero-initialised modulation outputs and adapter MLP outputs are randomised too, so every block
    influences the output (a freshly initialised released-size model would have them at zero).
    """
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen3Config, Qwen3Model

    tokenizer, t5_tokenizer = tiny_qwen_tokenizer(), tiny_t5_tokenizer()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        text_encoder = Qwen3Model(
            Qwen3Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY_QWEN3)
        )
        dit = AnimaDiT(tiny_anima_config(len(t5_tokenizer)))
        with torch.no_grad():
            for name, param in dit.named_parameters():
                if ZERO_INIT_WEIGHTS.fullmatch(name):
                    param.normal_(std=0.02)
        vae = AutoencoderKLQwenImage(latents_mean=list(LATENT_MEAN), latents_std=list(LATENT_STD), **TINY_VAE)
    finally:
        torch.random.set_rng_state(generator_state)
    return AnimaComponents(
        dit=dit.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        t5_tokenizer=t5_tokenizer,
        vae=vae.eval(),
        max_length=TINY_MAX_LENGTH,
        t5_max_length=TINY_MAX_LENGTH,
    )
