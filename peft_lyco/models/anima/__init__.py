"""Our own Anima: the DiT with the released parameter names, its LLM adapter, text/VAE helpers and a pipeline."""

from .config import AnimaConfig
from .dit import AnimaDiT, DiTBlock, FinalLayer, PatchEmbed, TimestepEmbedding
from .llm_adapter import LLMAdapter, LLMAdapterBlock
from .loading import LoadReport
from .pipeline import AnimaPipeline, flow_sigmas
from .text import PromptEmbeds, encode_prompt, qwen3_06b_config, qwen3_text_encoder_from_single_file
from .tiny import AnimaComponents, build_tiny_anima, tiny_anima_config, tiny_qwen_tokenizer, tiny_t5_tokenizer
from .vae import decode_latents, encode_images

__all__ = [
    "AnimaComponents",
    "AnimaConfig",
    "AnimaDiT",
    "AnimaPipeline",
    "DiTBlock",
    "FinalLayer",
    "LLMAdapter",
    "LLMAdapterBlock",
    "LoadReport",
    "PatchEmbed",
    "PromptEmbeds",
    "TimestepEmbedding",
    "build_tiny_anima",
    "decode_latents",
    "encode_images",
    "encode_prompt",
    "flow_sigmas",
    "qwen3_06b_config",
    "qwen3_text_encoder_from_single_file",
    "tiny_anima_config",
    "tiny_qwen_tokenizer",
    "tiny_t5_tokenizer",
]
