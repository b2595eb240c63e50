"""What the SDXL trainer tests compare: a tiny pipeline's outputs on fixed inputs, and a trained kohya file loaded by
our converter into a fresh tiny pipeline."""

from __future__ import annotations

import torch
from peft import inject_adapter_in_model, set_peft_model_state_dict

from peft_lyco.convert import kohya_to_peft
from peft_lyco.models.tiny_sdxl import tiny_sdxl_pipeline


def unet_inputs(seed: int = 0) -> dict:
    """Fixed UNet inputs for the tiny pipeline (batch 2, 16² latents)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(2, 4, 16, 16, generator=g),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(2, 77, 64, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, 32, generator=g),
            "time_ids": torch.rand(2, 6, generator=g) * 64,
        },
    }


def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The UNet's prediction and both text encoders' outputs (CLIP-L hidden states, CLIP-bigG projection)."""
    ids = torch.randint(2, 500, (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (
            pipe.unet(**unet_inputs()).sample,
            pipe.text_encoder(ids).last_hidden_state,
            pipe.text_encoder_2(ids).text_embeds,
        )


def base_outputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``outputs`` of the untrained tiny pipeline the trainer starts from."""
    return outputs(tiny_sdxl_pipeline(seed=0))


def fresh_pipeline_with(state_dict: dict, metadata: dict):
    """A fresh tiny pipeline with a kohya file's adapter (``load_kohya``'s result) converted by ``kohya_to_peft`` and
    injected into each component as adapter "loaded". Returns ``(pipeline, conversion)``."""
    fresh = tiny_sdxl_pipeline(seed=0)
    conversion = kohya_to_peft(state_dict, metadata=metadata, model=fresh)
    for component, adapter in conversion.items():
        model = getattr(fresh, component)
        inject_adapter_in_model(adapter.config, model, adapter_name="loaded", state_dict=adapter.state_dict)
        set_peft_model_state_dict(model, adapter.state_dict, adapter_name="loaded")
    return fresh, conversion
