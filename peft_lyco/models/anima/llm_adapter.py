"""Anima's LLM adapter: T5 token ids attend to Qwen3 hidden states and become the DiT's cross-attention context."""

from __future__ import annotations

import torch
from torch import nn

from .layers import RMSNorm, init_weights, qk_norm_attention
from .rope import rope1d_angles


class LLMAdapterAttention(nn.Module):
    """Attention with per-head q/k RMSNorm and separate RoPE positions for queries and keys (``o_proj`` output)."""

    def __init__(self, query_dim: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(query_dim, query_dim, bias=False)
        self.k_proj = nn.Linear(context_dim, query_dim, bias=False)
        self.v_proj = nn.Linear(context_dim, query_dim, bias=False)
        self.o_proj = nn.Linear(query_dim, query_dim, bias=False)
        head_dim = query_dim // num_heads
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        q_angles: torch.Tensor,
        k_angles: torch.Tensor,
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        out = qk_norm_attention(
            self.q_proj(x),
            self.k_proj(context),
            self.v_proj(context),
            self.q_norm,
            self.k_norm,
            self.num_heads,
            q_angles=q_angles,
            k_angles=k_angles,
            key_mask=key_mask,
        )
        return self.o_proj(out)


class LLMAdapterBlock(nn.Module):
    """Pre-norm block: self-attention over T5 tokens, cross-attention to Qwen3 states, GELU MLP (biases)."""

    def __init__(self, source_dim: int, model_dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(model_dim * mlp_ratio)
        self.norm_self_attn = RMSNorm(model_dim)
        self.self_attn = LLMAdapterAttention(model_dim, model_dim, num_heads)
        self.norm_cross_attn = RMSNorm(model_dim)
        self.cross_attn = LLMAdapterAttention(model_dim, source_dim, num_heads)
        self.norm_mlp = RMSNorm(model_dim)
        self.mlp = nn.Sequential(nn.Linear(model_dim, hidden), nn.GELU(), nn.Linear(hidden, model_dim))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        target_angles: torch.Tensor,
        source_angles: torch.Tensor,
        target_mask: torch.Tensor | None,
        source_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        normed = self.norm_self_attn(x)
        x = x + self.self_attn(normed, normed, target_angles, target_angles, target_mask)
        x = x + self.cross_attn(self.norm_cross_attn(x), context, target_angles, source_angles, source_mask)
        return x + self.mlp(self.norm_mlp(x))


class LLMAdapter(nn.Module):
    """``norm(out_proj(blocks(in_proj(embed(t5_ids)), qwen3_states)))`` → (B, L, target_dim).

    Sizes are arguments (upstream hard-codes 1024/1024/1024, 6 layers, 16 heads, vocab 32128). ``in_proj`` is an
    identity when ``model_dim == target_dim``, as in the released model.
    """

    def __init__(
        self,
        source_dim: int,
        target_dim: int,
        model_dim: int,
        num_layers: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        vocab_size: int = 32128,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.embed = nn.Embedding(vocab_size, target_dim)
        self.in_proj = nn.Identity() if model_dim == target_dim else nn.Linear(target_dim, model_dim)
        self.blocks = nn.ModuleList(
            [LLMAdapterBlock(source_dim, model_dim, num_heads, mlp_ratio) for _ in range(num_layers)]
        )
        self.out_proj = nn.Linear(model_dim, target_dim)
        self.norm = RMSNorm(target_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linears truncated-normal, norms one, each block's last MLP weight zero (the reference's init)."""
        init_weights(self.modules())
        nn.init.normal_(self.embed.weight)
        for block in self.blocks:
            nn.init.zeros_(block.mlp[2].weight)

    def forward(
        self,
        source_hidden_states: torch.Tensor,
        target_input_ids: torch.Tensor,
        target_attention_mask: torch.Tensor | None = None,
        source_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.in_proj(self.embed(target_input_ids))
        head_dim = x.shape[-1] // self.num_heads
        target_angles = rope1d_angles(x.shape[1], head_dim, x.device, x.dtype)
        source_angles = rope1d_angles(source_hidden_states.shape[1], head_dim, x.device, x.dtype)
        context = source_hidden_states.to(x.dtype)
        for block in self.blocks:
            x = block(x, context, target_angles, source_angles, target_attention_mask, source_attention_mask)
        return self.norm(self.out_proj(x))
