"""An independent fp64 re-statement of Anima's formulas, written for the tests (einops strings from the spec,
explicit softmax attention, Python loops for RoPE angles). It reads our modules' weights but none of their code."""

from __future__ import annotations

import math

import torch
from einops import rearrange


def layer_norm(x):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6)


def rms_norm(x, weight):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * weight


def linear(x, layer):
    out = x @ layer.weight.T
    return out if layer.bias is None else out + layer.bias


def silu(x):
    return x * torch.sigmoid(x)


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope(x, angles):
    """x (B, L, heads, d), angles (L, d)."""
    return x * torch.cos(angles)[:, None, :] + rotate_half(x) * torch.sin(angles)[:, None, :]


def rope3d_angles(grid, head_dim, ratios=(1.0, 4.0, 4.0)):
    """3-D RoPE, token by token: angles cat([t·f_t, h·f_h, w·f_w]) twice, tokens in (t h w) order."""
    dim_h = head_dim // 6 * 2
    dim_t = head_dim - 2 * dim_h
    theta_t = 10000.0 * ratios[0] ** (dim_t / (dim_t - 2))
    theta_h = 10000.0 * ratios[1] ** (dim_h / (dim_h - 2))
    theta_w = 10000.0 * ratios[2] ** (dim_h / (dim_h - 2))
    f_t = [theta_t ** (-(2 * i) / dim_t) for i in range(dim_t // 2)]
    f_h = [theta_h ** (-(2 * i) / dim_h) for i in range(dim_h // 2)]
    f_w = [theta_w ** (-(2 * i) / dim_h) for i in range(dim_h // 2)]
    rows = []
    for t in range(grid[0]):
        for h in range(grid[1]):
            for w in range(grid[2]):
                half = [t * f for f in f_t] + [h * f for f in f_h] + [w * f for f in f_w]
                rows.append(half + half)
    return torch.tensor(rows, dtype=torch.float64)


def rope1d_angles(length, head_dim):
    freqs = [10000.0 ** (-(2 * i) / head_dim) for i in range(head_dim // 2)]
    return torch.tensor([[p * f for f in freqs] * 2 for p in range(length)], dtype=torch.float64)


def timestep_features(sigma, channels):
    """Timestep sinusoid: cat([cos(σ·f), sin(σ·f)]), f_i = exp(−ln(10000)·i/half)."""
    half = channels // 2
    freqs = torch.tensor([math.exp(-math.log(10000.0) * i / half) for i in range(half)], dtype=torch.float64)
    args = sigma.double()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def attention(x, context, attn, num_heads, angles=None, key_mask=None, out_name="output_proj"):
    """QK-RMSNorm attention with an explicit softmax; x (B, L, D), context (B, S, C)."""
    q = rearrange(linear(x, attn.q_proj), "b l (h d) -> b l h d", h=num_heads)
    k = rearrange(linear(context, attn.k_proj), "b s (h d) -> b s h d", h=num_heads)
    v = rearrange(linear(context, attn.v_proj), "b s (h d) -> b s h d", h=num_heads)
    q, k = rms_norm(q, attn.q_norm.weight), rms_norm(k, attn.k_norm.weight)
    if angles is not None:
        q_angles, k_angles = angles
        q, k = rope(q, q_angles), rope(k, k_angles)
    scores = torch.einsum("blhd,bshd->bhls", q, k) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    out = torch.einsum("bhls,bshd->blhd", torch.softmax(scores, dim=-1), v)
    return linear(rearrange(out, "b l h d -> b l (h d)"), getattr(attn, out_name))


def modulation(emb, head, adaln_lora, chunks):
    values = linear(linear(silu(emb), head[1]), head[2]) + adaln_lora[..., : chunks * emb.shape[-1]]
    return values.chunk(chunks, dim=-1)


def block(blk, x, emb, context, angles, adaln_lora, num_heads):
    """Patch embedding for x (B, T, H, W, D)."""
    _, t, h, w, _ = x.shape

    def sub(x, head, fn):
        shift, scale, gate = modulation(emb, head, adaln_lora, 3)
        y = layer_norm(x) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        out = fn(rearrange(y, "b t h w d -> b (t h w) d"))
        return x + gate[:, :, None, None] * rearrange(out, "b (t h w) d -> b t h w d", t=t, h=h, w=w)

    x = sub(x, blk.adaln_modulation_self_attn, lambda y: attention(y, y, blk.self_attn, num_heads, (angles, angles)))
    x = sub(x, blk.adaln_modulation_cross_attn, lambda y: attention(y, context, blk.cross_attn, num_heads))
    return sub(x, blk.adaln_modulation_mlp, lambda y: linear(gelu(linear(y, blk.mlp.layer1)), blk.mlp.layer2))


def llm_adapter(adapter, source, ids, target_mask, source_mask, num_heads):
    """The LLM adapter."""
    x = adapter.embed.weight[ids]
    head_dim = x.shape[-1] // num_heads
    ta, sa = rope1d_angles(x.shape[1], head_dim), rope1d_angles(source.shape[1], head_dim)
    for blk in adapter.blocks:
        y = rms_norm(x, blk.norm_self_attn.weight)
        x = x + attention(y, y, blk.self_attn, num_heads, (ta, ta), target_mask, "o_proj")
        y = rms_norm(x, blk.norm_cross_attn.weight)
        x = x + attention(y, source, blk.cross_attn, num_heads, (ta, sa), source_mask, "o_proj")
        y = rms_norm(x, blk.norm_mlp.weight)
        x = x + linear(gelu(linear(y, blk.mlp[0])), blk.mlp[2])
    return rms_norm(linear(x, adapter.out_proj), adapter.norm.weight)


def dit(model, x, sigma, context, padding_mask, t5_ids=None, t5_mask=None, source_mask=None):
    """The whole DiT forward on latents x (B, C, T, H, W)."""
    cfg = model.config
    if t5_ids is not None:
        context = llm_adapter(model.llm_adapter, context, t5_ids, t5_mask, source_mask, cfg.adapter_num_heads)
        context = context * t5_mask[..., None]
    frames = x.shape[2]
    x = torch.cat([x, padding_mask[:, :, None].expand(-1, -1, frames, -1, -1)], dim=1)
    p, r = cfg.patch_spatial, cfg.patch_temporal
    x = rearrange(x, "b c (t r) (h m) (w n) -> b t h w (c r m n)", r=r, m=p, n=p)
    x = linear(x, model.x_embedder.proj[1])
    grid = x.shape[1:4]
    angles = rope3d_angles(
        grid,
        cfg.head_dim,
        (cfg.rope_t_extrapolation_ratio, cfg.rope_h_extrapolation_ratio, cfg.rope_w_extrapolation_ratio),
    )
    raw = timestep_features(sigma[:, None], cfg.model_channels)
    adaln_lora = linear(silu(linear(raw, model.t_embedder[1].linear_1)), model.t_embedder[1].linear_2)
    emb = rms_norm(raw, model.t_embedding_norm.weight)
    for blk in model.blocks:
        x = block(blk, x, emb, context, angles, adaln_lora, cfg.num_heads)
    shift, scale = modulation(emb, model.final_layer.adaln_modulation, adaln_lora, 2)
    x = linear(layer_norm(x) * (1 + scale[:, :, None, None]) + shift[:, :, None, None], model.final_layer.linear)
    return rearrange(x, "B T H W (p1 p2 t C) -> B C (T t) (H p1) (W p2)", p1=p, p2=p, t=r)
