"""The real SDXL base shapes as configs in code, and the real-size models on the meta device (no memory, no download).

Used to check names and module counts against real-size SDXL and to benchmark real-size loading; the values are the
module-shaping fields of stabilityai/stable-diffusion-xl-base-1.0's ``unet``, ``text_encoder`` and ``text_encoder_2``.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
CLIP_L_CONFIG = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"
)
CLIP_BIG_G_CONFIG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    hidden_act="gelu",
)


def sdxl_on_meta() -> tuple[UNet2DConditionModel, CLIPTextModel, CLIPTextModelWithProjection]:
    """Real-size SDXL UNet, CLIP-L and CLIP-bigG on the meta device (module structure and shapes only)."""
    with torch.device("meta"):
        return (
            UNet2DConditionModel(**SDXL_UNET_CONFIG),
            CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG)),
            CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIG_G_CONFIG)),
        )
