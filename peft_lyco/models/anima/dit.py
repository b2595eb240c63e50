"""The Anima DiT (Cosmos-Predict2 2B + LLM adapter) with parameter names equal to the released checkpoint.

Module paths match the checkpoint keys without ``net.`` (``blocks.N.self_attn.q_proj``, ``x_embedder.proj.1``,
``llm_adapter.blocks.N.mlp.0`` ...), so kohya adapter names are ``lora_unet_`` + path with dots as underscores.
Forward semantics follow the released model (see docs/anima.md).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..block_swap import BlockSwap
from .config import AnimaConfig, rope_axis_dims
from .layers import RMSNorm, init_weights, qk_norm_attention
from .llm_adapter import LLMAdapter
from .loading import LoadReport, check_finite, check_state_dict, list_keys, read_safetensors, strip_prefix
from .rope import at_least_fp32, ntk_theta, rope3d_angles, timestep_features


class Attention(nn.Module):
    """DiT self- or cross-attention: q/k/v/output projections without bias, per-head q/k RMSNorm, optional RoPE."""

    def __init__(self, query_dim: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(query_dim, query_dim, bias=False)
        self.q_norm = RMSNorm(query_dim // num_heads)
        self.k_proj = nn.Linear(context_dim, query_dim, bias=False)
        self.k_norm = RMSNorm(query_dim // num_heads)
        self.v_proj = nn.Linear(context_dim, query_dim, bias=False)
        self.output_proj = nn.Linear(query_dim, query_dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, angles: torch.Tensor | None = None):
        source = x if context is None else context
        out = qk_norm_attention(
            self.q_proj(x),
            self.k_proj(source),
            self.v_proj(source),
            self.q_norm,
            self.k_norm,
            self.num_heads,
            q_angles=angles,
            k_angles=angles,
        )
        return self.output_proj(out)


class FeedForward(nn.Module):
    """``layer2(gelu(layer1(x)))`` with exact GELU and no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden, bias=False)
        self.activation = nn.GELU()
        self.layer2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.activation(self.layer1(x)))


def adaln_lora_modulation(dim: int, lora_dim: int, chunks: int) -> nn.Sequential:
    """``SiLU → Linear(dim, lora_dim) → Linear(lora_dim, chunks·dim)``: the AdaLN-LoRA modulation head."""
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, lora_dim, bias=False), nn.Linear(lora_dim, chunks * dim, bias=False))


def modulate(x: torch.Tensor, norm: nn.Module, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``norm(x)·(1 + scale) + shift`` with per-frame (B, T, D) shift/scale broadcast over the patch grid."""
    return norm(x) * (1 + scale[:, :, None, None, :]) + shift[:, :, None, None, :]


class DiTBlock(nn.Module):
    """Self-attention (3-D RoPE), cross-attention to the text context and MLP, each gated by AdaLN-LoRA."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, mlp_ratio: float, adaln_lora_dim: int):
        super().__init__()
        self.layer_norm_self_attn = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = Attention(dim, dim, num_heads)
        self.layer_norm_cross_attn = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = Attention(dim, context_dim, num_heads)
        self.layer_norm_mlp = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))
        self.adaln_modulation_self_attn = adaln_lora_modulation(dim, adaln_lora_dim, 3)
        self.adaln_modulation_cross_attn = adaln_lora_modulation(dim, adaln_lora_dim, 3)
        self.adaln_modulation_mlp = adaln_lora_modulation(dim, adaln_lora_dim, 3)

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        angles: torch.Tensor,
        adaln_lora: torch.Tensor,
    ) -> torch.Tensor:
        """``x`` (B, T, H, W, D), ``emb`` (B, T, D), ``context`` (B, N, C), ``angles`` (T·H·W, d),
        ``adaln_lora`` (B, T, 3D)."""
        batch, frames, height, width, dim = x.shape
        sublayers = (
            (self.adaln_modulation_self_attn, self.layer_norm_self_attn, lambda h: self.self_attn(h, angles=angles)),
            (self.adaln_modulation_cross_attn, self.layer_norm_cross_attn, lambda h: self.cross_attn(h, context)),
            (self.adaln_modulation_mlp, self.layer_norm_mlp, self.mlp),
        )
        for modulation, norm, sublayer in sublayers:
            shift, scale, gate = (modulation(emb) + adaln_lora).chunk(3, dim=-1)
            tokens = modulate(x, norm, shift, scale).reshape(batch, -1, dim)
            out = sublayer(tokens).reshape(batch, frames, height, width, dim)
            x = x + gate[:, :, None, None, :] * out
        return x


class Patchify(nn.Module):
    """``b c (t r) (h m) (w n) → b t h w (c r m n)``: channel-major patch packing."""

    def __init__(self, temporal: int, spatial: int):
        super().__init__()
        self.temporal, self.spatial = temporal, spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        r, m = self.temporal, self.spatial
        x = x.reshape(b, c, t // r, r, h // m, m, w // m, m)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, t // r, h // m, w // m, c * r * m * m)


class PatchEmbed(nn.Module):
    """Patchify then project each patch to the model width (``proj.1``, no bias)."""

    def __init__(self, in_channels: int, dim: int, temporal: int, spatial: int):
        super().__init__()
        self.proj = nn.Sequential(
            Patchify(temporal, spatial), nn.Linear(in_channels * temporal * spatial**2, dim, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Timesteps(nn.Module):
    """Sinusoidal features of σ, no parameters."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_features(timesteps, self.channels)


class TimestepEmbedding(nn.Module):
    """AdaLN-LoRA variant: returns the raw features and ``linear_2(silu(linear_1(features)))`` (B, T, 3D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.activation = nn.SiLU()
        self.linear_2 = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = features.to(self.linear_1.weight.dtype)
        return features, self.linear_2(self.activation(self.linear_1(features)))


class FinalLayer(nn.Module):
    """AdaLN (shift, scale) from the first 2D of the AdaLN-LoRA vector, then a projection to patch values."""

    def __init__(self, dim: int, out_values: int, adaln_lora_dim: int):
        super().__init__()
        self.dim = dim
        self.layer_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_values, bias=False)
        self.adaln_modulation = adaln_lora_modulation(dim, adaln_lora_dim, 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, adaln_lora: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.adaln_modulation(emb) + adaln_lora[..., : 2 * self.dim]).chunk(2, dim=-1)
        return self.linear(modulate(x, self.layer_norm, shift, scale))


class RoPE3D(nn.Module):
    """The 3-D RoPE table: buffers ``seq``, ``dim_spatial_range``, ``dim_temporal_range`` as in the checkpoint.

    Released checkpoints may lack the buffers; they are deterministic and rebuilt by ``reset_buffers``.
    """

    def __init__(self, config: AnimaConfig):
        super().__init__()
        self.lengths = config.rope_lengths
        dim_t, dim_h, _ = rope_axis_dims(config.head_dim)
        self.dims = (dim_t, dim_h)
        self.thetas = (
            ntk_theta(config.rope_t_extrapolation_ratio, dim_t),
            ntk_theta(config.rope_h_extrapolation_ratio, dim_h),
            ntk_theta(config.rope_w_extrapolation_ratio, dim_h),
        )
        self.register_buffer("seq", torch.empty(max(self.lengths)))
        self.register_buffer("dim_spatial_range", torch.empty(dim_h // 2))
        self.register_buffer("dim_temporal_range", torch.empty(dim_t // 2))
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the position table and the per-pair exponents ``2i/dim`` (on ``device`` if given)."""
        device = self.seq.device if device is None else device
        dim_t, dim_h = self.dims
        self.seq = torch.arange(max(self.lengths), dtype=torch.float32, device=device)
        self.dim_spatial_range = torch.arange(0, dim_h, 2, dtype=torch.float32, device=device) / dim_h
        self.dim_temporal_range = torch.arange(0, dim_t, 2, dtype=torch.float32, device=device) / dim_t

    def _apply(self, fn, recurse: bool = True):
        """``model.to(bfloat16)`` (any cast) casts the tables too: rebuild them in float32 right away, so that the
        first forward does not change a buffer's dtype (under ``torch.compile`` that cost a second compilation)."""
        super()._apply(fn, recurse)
        if self.seq.dtype != at_least_fp32(self.seq.dtype) and not self.seq.is_meta:
            self.reset_buffers()
        return self

    def forward(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """Angles (T·H·W, head_dim) for a patch grid (T, H, W)."""
        if self.seq.dtype != at_least_fp32(self.seq.dtype):  # tables assigned in half precision (state dict)
            self.reset_buffers()
        too_big = [f"{axis}={size} > {limit}" for axis, size, limit in zip("THW", grid, self.lengths) if size > limit]
        if too_big:
            raise ValueError(f"AnimaDiT: patch grid exceeds the RoPE table ({', '.join(too_big)}); raise max_img_h/w")
        return rope3d_angles(self.seq, grid, self.dim_spatial_range, self.dim_temporal_range, self.thetas)


logger = logging.getLogger(__name__)

OPTIONAL_BUFFERS = ("pos_embedder.seq", "pos_embedder.dim_spatial_range", "pos_embedder.dim_temporal_range")


CONFIG_METADATA_KEY = "anima_config"


def config_in_file(path: str | os.PathLike) -> AnimaConfig | None:
    """The ``AnimaConfig`` a checkpoint carries as JSON under the ``anima_config`` metadata key (files of other sizes
    than the released model, e.g. tiny test models, written with ``config_metadata``); None when it carries none."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as handle:
        text = (handle.metadata() or {}).get(CONFIG_METADATA_KEY)
    return AnimaConfig(**json.loads(text)) if text else None


def config_metadata(config: AnimaConfig) -> dict[str, str]:
    """Safetensors metadata that makes ``AnimaDiT.from_single_file`` build this config."""
    return {CONFIG_METADATA_KEY: json.dumps(asdict(config))}


class AnimaDiT(nn.Module):
    """Anima's diffusion transformer; ``forward(x, σ, context, ...)`` predicts the flow velocity ``ε − x0``.

    Build the released size with ``AnimaDiT()`` (best on the meta device) or load it with
    ``AnimaDiT.from_single_file(path)``; pass ``AnimaConfig(...)`` for other sizes.
    """

    def __init__(self, config: AnimaConfig | None = None):
        super().__init__()
        self.config = config = config or AnimaConfig()
        dim = config.model_channels
        in_channels = config.in_channels + (1 if config.concat_padding_mask else 0)
        self.x_embedder = PatchEmbed(in_channels, dim, config.patch_temporal, config.patch_spatial)
        self.pos_embedder = RoPE3D(config)
        self.t_embedder = nn.Sequential(Timesteps(dim), TimestepEmbedding(dim))
        self.t_embedding_norm = RMSNorm(dim)
        if config.use_llm_adapter:
            self.llm_adapter = LLMAdapter(
                source_dim=config.adapter_source_dim,
                target_dim=config.crossattn_emb_channels,
                model_dim=config.adapter_model_dim,
                num_layers=config.adapter_num_layers,
                num_heads=config.adapter_num_heads,
                mlp_ratio=config.adapter_mlp_ratio,
                vocab_size=config.adapter_vocab_size,
            )
        self.blocks = nn.ModuleList(
            [
                DiTBlock(dim, config.crossattn_emb_channels, config.num_heads, config.mlp_ratio, config.adaln_lora_dim)
                for _ in range(config.num_blocks)
            ]
        )
        patch_values = config.patch_spatial**2 * config.patch_temporal * config.out_channels
        self.final_layer = FinalLayer(dim, patch_values, config.adaln_lora_dim)
        self.gradient_checkpointing = False
        self.block_swap: BlockSwap | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference init: Linears truncated-normal, modulation outputs zero, norms one."""
        init_weights(module for name, module in self.named_modules() if not name.startswith("llm_adapter"))
        for block in self.blocks:
            for modulation in (
                block.adaln_modulation_self_attn,
                block.adaln_modulation_cross_attn,
                block.adaln_modulation_mlp,
            ):
                nn.init.zeros_(modulation[2].weight)
        nn.init.zeros_(self.final_layer.adaln_modulation[2].weight)

    # --------------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        config: AnimaConfig | None = None,
        *,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        strict: bool = True,
    ) -> AnimaDiT:
        """Load a released Anima DiT ``.safetensors`` (keys with or without ``net.``), built on the meta device first.

        Every parameter must be in the file (the ``pos_embedder`` buffers may be absent); unexpected keys raise
        when ``strict`` and are logged and skipped otherwise. Shape mismatches and NaN/inf raise, naming the keys.
        """
        what = os.fspath(path)
        state_dict = strip_prefix(read_safetensors(path, device), "net.")
        config = config or config_in_file(path)
        if any(key.startswith(("transformer_blocks.", "patch_embed.")) for key in state_dict):
            raise ValueError(
                f"{what}: diffusers CosmosTransformer3DModel layout; AnimaDiT reads the original single-file layout "
                "(keys blocks.N..., x_embedder..., llm_adapter...)"
            )
        check_finite(state_dict, what)
        with torch.device("meta"):
            model = cls(config)
        report = check_state_dict(model, state_dict, optional=OPTIONAL_BUFFERS, strict=strict, what=what)
        if report.missing_keys:  # parameters cannot stay on the meta device, even when not strict
            raise ValueError(f"{what}: missing keys: {list_keys(report.missing_keys)}")
        if report.unexpected_keys:
            logger.warning(
                "%s: ignoring %d unexpected keys: %s", what, len(report.unexpected_keys), report.unexpected_keys[:8]
            )
            state_dict = {key: value for key, value in state_dict.items() if key not in report.unexpected_keys}
        if torch_dtype is not None:
            state_dict = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        nn.Module.load_state_dict(model, state_dict, strict=False, assign=True)
        if any(buffer.is_meta for buffer in model.pos_embedder.buffers()):
            model.pos_embedder.reset_buffers(device)
        return model.eval()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False) -> LoadReport:
        """``nn.Module.load_state_dict`` that accepts ``net.``-prefixed keys, tolerates missing RoPE buffers and
        checks keys and shapes before copying anything (a failed load leaves the model unchanged)."""
        state_dict = strip_prefix(dict(state_dict), "net.")
        report = check_state_dict(
            self, state_dict, optional=OPTIONAL_BUFFERS, strict=strict, what="AnimaDiT.load_state_dict"
        )
        super().load_state_dict(state_dict, strict=False, assign=assign)
        return report

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in backward (training memory for compute)."""
        self.gradient_checkpointing = enabled

    def enable_block_swap(self, count: int, device: str | torch.device) -> BlockSwap:
        """Keep the frozen weights of the last ``count`` blocks on the CPU, brought to ``device`` only while each runs
        (see ``peft_lyco.models.block_swap``); call ``.offload()`` on the result once the model is placed."""
        self.block_swap = BlockSwap(self.blocks, count, device)
        return self.block_swap

    # --------------------------------------------------------------------------------------------------- forward
    def adapt_context(
        self,
        qwen3_hidden_states: torch.Tensor,
        t5_input_ids: torch.Tensor,
        t5_attention_mask: torch.Tensor | None = None,
        qwen3_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the LLM adapter and zero the rows of padded T5 positions: the (B, L, C) cross-attention context."""
        if not self.config.use_llm_adapter:
            raise ValueError(
                "AnimaDiT: target_input_ids given but this model has no LLM adapter (use_llm_adapter=False)"
            )
        context = self.llm_adapter(qwen3_hidden_states, t5_input_ids, t5_attention_mask, qwen3_attention_mask)
        if t5_attention_mask is not None:
            context = context * t5_attention_mask.to(context.dtype)[..., None]
        return context

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        fps: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        target_input_ids: torch.Tensor | None = None,
        target_attention_mask: torch.Tensor | None = None,
        source_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity for latents ``x`` (B, C, T, H, W) or (B, C, H, W) at σ = ``timesteps`` (B,) or (B, T) in [0, 1].

        ``context`` is the adapted (B, N, C) embedding, or Qwen3 hidden states when ``target_input_ids`` (T5 ids)
        are given, which routes them through the LLM adapter. ``padding_mask`` (B, 1, H, W) defaults to zeros;
        ``fps`` is accepted for signature compatibility and unused (Anima has no fps modulation).
        """
        del fps
        image_input = x.dim() == 4
        if image_input:
            x = x.unsqueeze(2)
        self._check_latents(x)
        if target_input_ids is not None:
            if context is None:
                raise ValueError("AnimaDiT: target_input_ids need the Qwen3 hidden states as context")
            context = self.adapt_context(context, target_input_ids, target_attention_mask, source_attention_mask)
        if context is None:
            raise ValueError("AnimaDiT: context (text embedding) is required")
        dtype = self.x_embedder.proj[1].weight.dtype
        x = self._embed_patches(x.to(dtype), padding_mask)
        batch, frames, height, width, _ = x.shape
        angles = self.pos_embedder((frames, height, width))
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(batch)
        if timesteps.dim() == 1:
            timesteps = timesteps[:, None]
        features, adaln_lora = self.t_embedder(timesteps)
        emb = self.t_embedding_norm(features)
        context = context.to(dtype)
        for index, block in enumerate(self.blocks):
            if self.block_swap is not None and self.block_swap.swaps(index):
                x = self.block_swap.run(index, block, x, emb, context, angles, adaln_lora)
            elif self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, emb, context, angles, adaln_lora, use_reentrant=False)
            else:
                x = block(x, emb, context, angles, adaln_lora)
        out = self._unpatchify(self.final_layer(x, emb, adaln_lora))
        return out.squeeze(2) if image_input else out

    def _check_latents(self, x: torch.Tensor) -> None:
        config = self.config
        if x.dim() != 5 or x.shape[1] != config.in_channels:
            raise ValueError(
                f"AnimaDiT: latents must be (B, {config.in_channels}, T, H, W) or (B, {config.in_channels}, H, W), "
                f"got {tuple(x.shape)}"
            )
        _, _, frames, height, width = x.shape
        if height % config.patch_spatial or width % config.patch_spatial or frames % config.patch_temporal:
            raise ValueError(
                f"AnimaDiT: latent size (T={frames}, H={height}, W={width}) must be divisible by the patch "
                f"({config.patch_temporal}, {config.patch_spatial}, {config.patch_spatial})"
            )

    def _embed_patches(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        if self.config.concat_padding_mask:
            batch, _, frames, height, width = x.shape
            if padding_mask is None:
                padding_mask = x.new_zeros(batch, 1, height, width)
            padding_mask = F.interpolate(padding_mask.to(x.dtype), size=(height, width), mode="nearest")
            x = torch.cat([x, padding_mask[:, :, None].expand(-1, -1, frames, -1, -1)], dim=1)
        return self.x_embedder(x)

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``B T H W (p1 p2 t C) → B C (T t) (H p1) (W p2)``: channel-minor unpacking, as in Cosmos."""
        config = self.config
        b, t, h, w, _ = x.shape
        p, r = config.patch_spatial, config.patch_temporal
        x = x.reshape(b, t, h, w, p, p, r, config.out_channels)
        return x.permute(0, 7, 1, 6, 2, 4, 3, 5).reshape(b, config.out_channels, t * r, h * p, w * p)
