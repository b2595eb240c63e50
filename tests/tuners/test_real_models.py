"""LoHa/LoKr on tiny diffusers and transformers models built from configs (no downloads)."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import PeftModel, get_peft_model
from transformers import CLIPTextConfig, CLIPTextModel

from peft_lyco import LoHaConfig, LoHaLayer, LoKrConfig, LoKrLayer

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj"]


def tiny_unet():
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_clip():
    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000)
    return CLIPTextModel(config)


@pytest.mark.parametrize(
    "config",
    [
        LoHaConfig(r=4, alpha=2, conv_r=2, use_tucker=True, target_modules=UNET_TARGETS, init_weights=False),
        LoKrConfig(r=4, alpha=2, factor=4, decompose_both=True, target_modules=UNET_TARGETS, init_weights=False),
    ],
    ids=["loha", "lokr"],
)
def test_unet_adapter_trains_saves_and_reloads(config, tmp_path):
    torch.manual_seed(0)
    unet = tiny_unet()
    sample, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 7, 32)
    with torch.no_grad():
        plain = unet(sample, t, ctx).sample
    model = get_peft_model(copy.deepcopy(unet), copy.deepcopy(config))
    layers = [m for m in model.modules() if isinstance(m, (LoHaLayer, LoKrLayer))]
    kinds = {type(m.get_base_layer()).__name__ for m in layers}
    assert kinds == {"Linear", "Conv2d"} and len(layers) > 30
    out = model(sample, t, ctx).sample
    assert (out - plain).abs().max() > 1e-4
    out.pow(2).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(unet), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(sample, t, ctx).sample, out.detach())


def test_clip_text_encoder_lokr():
    torch.manual_seed(0)
    clip = tiny_clip()
    ids = torch.randint(0, 1000, (2, 9))
    config = LoKrConfig(r=2, alpha=1, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], init_weights=False)
    model = get_peft_model(copy.deepcopy(clip), config)
    with torch.no_grad():
        adapted = model(input_ids=ids).last_hidden_state
        assert (adapted - clip(input_ids=ids).last_hidden_state).abs().max() > 1e-4
        merged = model.merge_and_unload()
        assert not any(isinstance(m, LoKrLayer) for m in merged.modules())
        assert torch.allclose(merged(input_ids=ids).last_hidden_state, adapted, atol=1e-5)
