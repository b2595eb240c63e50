"""Models for the preset tests, built from configs in code: real-size SDXL on the meta device, tiny ones on CPU."""

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from peft_lyco.models.tiny_sdxl import TINY_CLIP_CONFIG, TINY_UNET_CONFIG

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that shape modules)
SDXL_UNET = dict(
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
CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"
)
CLIP_BIG_G = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
    hidden_act="gelu",
)


def meta_sdxl():
    """Real-size SDXL UNet and both text encoders on the meta device (no memory, no download)."""
    with torch.device("meta"):
        return (
            UNet2DConditionModel(**SDXL_UNET),
            CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIG_G)),
        )


def tiny_sdxl(seed=0):
    torch.manual_seed(seed)
    return (
        UNet2DConditionModel(**TINY_UNET_CONFIG),
        CLIPTextModel(CLIPTextConfig(**TINY_CLIP_CONFIG)),
        CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP_CONFIG)),
    )
