"""Which modules sd-scripts adapts on each architecture, expressed for the models peft_lyco works with.

sd-scripts picks *container* modules by class (e.g. ``Transformer2DModel``) and adapts every ``Linear``/``Conv2d``
inside them; ``conv_dim`` adds the conv containers, ``train_llm_adapter`` the Anima adapter blocks. The same rule is
applied here to diffusers/transformers classes and our ``AnimaDiT``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from torch import nn

from ..tuners.targets import adaptable_layers, unwrap

ANIMA_DEFAULT_EXCLUDES = (r".*(_modulation|_norm|_embedder|final_layer).*",)


@dataclass(frozen=True)
class Architecture:
    """One preset: how to recognise the model and which containers hold the modules to adapt."""

    name: str
    component: str  # "unet" (UNet/DiT: unet_lr) or "text_encoder" (text_encoder_lr)
    model_types: tuple[type, ...]
    containers: tuple[type, ...]
    conv_containers: tuple[type, ...] = ()
    adapter_containers: tuple[type, ...] = ()
    default_excludes: tuple[str, ...] = ()
    description: str = ""

    def candidates(self, model: nn.Module, *, conv: bool, adapter: bool) -> list[tuple[str, nn.Module]]:
        """``(path, layer)`` of every Linear/Conv2d inside the selected containers, in model order, no repeats."""
        containers = (
            self.containers + (self.conv_containers if conv else ()) + (self.adapter_containers if adapter else ())
        )
        found: dict[str, nn.Module] = {}
        for path, module in model.named_modules():
            if isinstance(module, containers):
                for child_path, layer in adaptable_layers(module):
                    found.setdefault(f"{path}.{child_path}" if path else child_path, layer)
        return list(found.items())


@cache
def architectures() -> tuple[Architecture, ...]:
    """The known presets (imports diffusers/transformers lazily, once)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.upsampling import Upsample2D
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, Qwen3Model
    from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3MLP

    from ..models.anima import AnimaDiT, DiTBlock, FinalLayer, LLMAdapterBlock, PatchEmbed, TimestepEmbedding

    return (
        Architecture(
            name="unet",
            component="unet",
            model_types=(UNet2DConditionModel,),
            containers=(Transformer2DModel,),
            conv_containers=(ResnetBlock2D, Downsample2D, Upsample2D),
            description="diffusers UNet2DConditionModel (SDXL; SD1/2 follow the same rules)",
        ),
        Architecture(
            name="clip_text",
            component="text_encoder",
            model_types=(CLIPTextModel, CLIPTextModelWithProjection),
            containers=(CLIPAttention, CLIPMLP),
            description="transformers CLIPTextModel / CLIPTextModelWithProjection",
        ),
        Architecture(
            name="anima_dit",
            component="unet",
            model_types=(AnimaDiT,),
            containers=(DiTBlock, PatchEmbed, TimestepEmbedding, FinalLayer),
            adapter_containers=(LLMAdapterBlock,),
            default_excludes=ANIMA_DEFAULT_EXCLUDES,
            description="peft_lyco AnimaDiT",
        ),
        Architecture(
            name="qwen3_text",
            component="text_encoder",
            model_types=(Qwen3Model,),
            containers=(Qwen3Attention, Qwen3MLP),
            default_excludes=ANIMA_DEFAULT_EXCLUDES,
            description="transformers Qwen3Model (Anima's text encoder)",
        ),
    )


def detect_architecture(model: nn.Module) -> Architecture:
    """The preset for ``model``; an unknown class raises a ``ValueError`` that suggests ``target_modules``."""
    model = unwrap(model)
    for arch in architectures():
        if isinstance(model, arch.model_types):
            return arch
    known = "; ".join(arch.description for arch in architectures())
    raise ValueError(
        f"cannot detect the architecture of {type(model).__module__}.{type(model).__name__} (known: {known}). "
        "Pass target_modules=[...] (PEFT module names, suffixes or a regex) to choose the modules yourself."
    )
