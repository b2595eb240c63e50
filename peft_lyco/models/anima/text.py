"""Anima's text side: the Qwen3-0.6B encoder (``transformers.Qwen3Model``) and T5 token ids for the LLM adapter."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .loading import check_finite, check_state_dict, read_safetensors, strip_prefix

# Qwen3-0.6B as sd-scripts configures it (configs/qwen3_06b/config.json)
QWEN3_06B = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    tie_word_embeddings=True,
    max_position_embeddings=40960,
)


def qwen3_06b_config():
    """``Qwen3Config`` of the Qwen3-0.6B text encoder Anima uses."""
    from transformers import Qwen3Config

    return Qwen3Config(**QWEN3_06B)


def qwen3_text_encoder_from_single_file(
    path: str | os.PathLike, config=None, *, torch_dtype: torch.dtype | None = None
):
    """A ``Qwen3Model`` from a single ``.safetensors`` file (keys ``model.layers.N...``; a tied ``lm_head`` is ignored).

    Built on the meta device and filled with ``assign``; missing, unexpected or misshaped keys raise, naming them.
    """
    from transformers import Qwen3Model
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    what = os.fspath(path)
    state_dict = strip_prefix(read_safetensors(path), "model.")
    state_dict.pop("lm_head.weight", None)
    check_finite(state_dict, what)
    with torch.device("meta"):
        model = Qwen3Model(config or qwen3_06b_config())
    check_state_dict(model, state_dict, strict=True, what=what)
    if torch_dtype is not None:
        state_dict = {key: value.to(torch_dtype) for key, value in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.rotary_emb = Qwen3RotaryEmbedding(config=model.config)  # its non-persistent buffers are still on meta
    return model.eval()


@dataclass
class PromptEmbeds:
    """What the DiT needs for a batch of prompts: Qwen3 states and mask (adapter source), T5 ids and mask (target)."""

    prompt_embeds: torch.Tensor
    attention_mask: torch.Tensor
    t5_input_ids: torch.Tensor
    t5_attention_mask: torch.Tensor


@torch.no_grad()
def encode_prompt(
    prompts: str | Sequence[str],
    text_encoder,
    tokenizer,
    t5_tokenizer,
    *,
    max_length: int = 512,
    t5_max_length: int = 512,
) -> PromptEmbeds:
    """Tokenise to ``max_length`` (padding and truncation), run Qwen3 and zero the states of padded positions.

    The T5 tokenizer only supplies the adapter's target ids and mask. The tokenizer's pad token defaults to eos.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(text_encoder.parameters()).device
    qwen = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    t5 = t5_tokenizer(prompts, padding="max_length", max_length=t5_max_length, truncation=True, return_tensors="pt")
    mask = qwen["attention_mask"].to(device)
    states = text_encoder(input_ids=qwen["input_ids"].to(device), attention_mask=mask).last_hidden_state
    states = states * mask[..., None].to(states.dtype)
    return PromptEmbeds(states, mask, t5["input_ids"].to(device), t5["attention_mask"].to(device))
