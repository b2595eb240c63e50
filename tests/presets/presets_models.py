"""Models for the preset tests, built from configs in code: real-size SDXL on the meta device, tiny ones on CPU."""

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from peft_lyco.models.sdxl import sdxl_on_meta
from peft_lyco.models.tiny_sdxl import TINY_CLIP_CONFIG, TINY_UNET_CONFIG

meta_sdxl = sdxl_on_meta


def tiny_sdxl(seed=0):
    torch.manual_seed(seed)
    return (
        UNet2DConditionModel(**TINY_UNET_CONFIG),
        CLIPTextModel(CLIPTextConfig(**TINY_CLIP_CONFIG)),
        CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP_CONFIG)),
    )
