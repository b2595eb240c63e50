"""Sizes of the Anima DiT and its LLM adapter; the defaults are the released model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class AnimaConfig:
    """Every size of ``AnimaDiT`` is a field, so tests can build a tiny model with the real parameter names.

    The defaults are the configuration sd-scripts hard-codes for Anima (28 blocks, 2048 wide, 16 heads of 128,
    patch 1x2x2, 3-D RoPE with NTK ratios 4/4/1, AdaLN-LoRA 256) and its 6-block, 1024-wide LLM adapter, whose sizes
    are hard-coded upstream and configurable here. The adapter's output width is ``crossattn_emb_channels``.
    """

    in_channels: int = 16
    out_channels: int = 16
    patch_spatial: int = 2
    patch_temporal: int = 1
    model_channels: int = 2048
    num_blocks: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    crossattn_emb_channels: int = 1024
    adaln_lora_dim: int = 256
    concat_padding_mask: bool = True
    max_img_h: int = 512
    max_img_w: int = 512
    max_frames: int = 128
    rope_h_extrapolation_ratio: float = 4.0
    rope_w_extrapolation_ratio: float = 4.0
    rope_t_extrapolation_ratio: float = 1.0
    use_llm_adapter: bool = True
    adapter_source_dim: int = 1024
    adapter_model_dim: int = 1024
    adapter_num_layers: int = 6
    adapter_num_heads: int = 16
    adapter_mlp_ratio: float = 4.0
    adapter_vocab_size: int = 32128

    def __post_init__(self) -> None:
        positive = [f.name for f in fields(self) if f.type in ("int", "float") and not getattr(self, f.name) > 0]
        if positive:
            raise ValueError(f"AnimaConfig fields must be positive: {', '.join(positive)}")
        if self.model_channels % self.num_heads:
            raise ValueError(
                f"AnimaConfig.model_channels ({self.model_channels}) must be divisible by num_heads ({self.num_heads})"
            )
        head_dim = self.head_dim
        dim_t, dim_h, _ = rope_axis_dims(head_dim)
        if head_dim % 2 or dim_h <= 2 or dim_t <= 2:
            raise ValueError(
                f"AnimaConfig head_dim = model_channels / num_heads = {head_dim} must be even and at least 12 "
                "(3-D RoPE splits it into t/h/w parts whose NTK exponents divide by part - 2)"
            )
        if self.use_llm_adapter and self.adapter_model_dim % self.adapter_num_heads:
            raise ValueError(
                f"AnimaConfig.adapter_model_dim ({self.adapter_model_dim}) must be divisible by adapter_num_heads "
                f"({self.adapter_num_heads})"
            )
        if self.use_llm_adapter and (self.adapter_model_dim // self.adapter_num_heads) % 2:
            raise ValueError(
                "AnimaConfig adapter head dim (adapter_model_dim / adapter_num_heads) must be even for RoPE"
            )

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads

    @property
    def rope_lengths(self) -> tuple[int, int, int]:
        """Largest patch grid (t, h, w) the RoPE table covers."""
        return (
            self.max_frames // self.patch_temporal,
            self.max_img_h // self.patch_spatial,
            self.max_img_w // self.patch_spatial,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AnimaConfig:
        """Build from a dict, naming any key that is not a field."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown AnimaConfig fields: {sorted(unknown)}")
        return cls(**values)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """How 3-D RoPE splits a head: ``(dim_t, dim_h, dim_w)`` with ``dim_h = dim_w = head_dim // 6 * 2``."""
    dim_h = head_dim // 6 * 2
    return head_dim - 2 * dim_h, dim_h, dim_h
