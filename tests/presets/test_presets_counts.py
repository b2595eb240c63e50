"""Module counts on real-size models (meta device) equal what sd-scripts creates for the same settings.

sd-scripts' numbers follow from its selection rule (networks/network_base.py: every Linear/Conv2d inside the target
classes) applied to the published architectures; each expected count below is derived from the architecture in the
comment, not copied from a run.
"""

import re
from collections import Counter

import pytest
import torch
from presets_models import meta_sdxl
from transformers import Qwen3Model

from peft_lyco.models.anima import AnimaDiT, qwen3_06b_config
from peft_lyco.presets import build_config, describe

# SDXL: attention levels down 1/2 (2 attentions each, depth 2/10), mid (1, depth 10), up 0/1 (3 each, depth 10/2)
TRANSFORMER_MODELS = 2 + 2 + 1 + 3 + 3
TRANSFORMER_BLOCKS = 2 * 2 + 2 * 10 + 1 * 10 + 3 * 10 + 3 * 2
PER_BLOCK = 4 + 4 + 2  # attn1 q/k/v/out, attn2 q/k/v/out, ff proj + out
SDXL_UNET_LINEAR = TRANSFORMER_BLOCKS * PER_BLOCK + TRANSFORMER_MODELS * 2  # + proj_in/proj_out
RESNETS = 3 * 2 + 2 + 3 * 3  # down levels x layers_per_block, mid, up levels x (layers_per_block + 1)
SHORTCUTS = 2 + 9  # first resnet of down levels 1 and 2, every up resnet (skip concatenation changes channels)
SAMPLERS = 2 + 2  # downsamplers of down levels 0/1, upsamplers of up levels 0/1
SDXL_UNET_CONV = RESNETS * 3 + SHORTCUTS + SAMPLERS  # conv1, conv2, time_emb_proj per resnet


@pytest.fixture(scope="module")
def sdxl():
    return meta_sdxl()


def selected(config, model):
    """The module paths PEFT's own matching hits with this config (what injection would adapt)."""
    return [row.name for row in describe(config, model)]


def kinds(model, config):
    modules = dict(model.named_modules())
    count = {"linear": 0, "1x1": 0, "kxk": 0}
    for path in selected(config, model):
        layer = modules[path]
        if isinstance(layer, torch.nn.Linear):
            count["linear"] += 1
        else:
            count["1x1" if layer.kernel_size == (1, 1) else "kxk"] += 1
    return count


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_sdxl_unet_counts_with_and_without_conv_dim(sdxl, algo):
    unet = sdxl[0]
    plain = build_config(algo, unet, network_dim=16, network_alpha=8)
    assert len(selected(plain, unet)) == SDXL_UNET_LINEAR == 722
    assert kinds(unet, plain) == {"linear": 722, "1x1": 0, "kxk": 0}
    conv = build_config(algo, unet, network_dim=16, network_alpha=8, network_args=["conv_dim=8", "conv_alpha=4"])
    assert len(selected(conv, unet)) == SDXL_UNET_LINEAR + SDXL_UNET_CONV == 788
    assert kinds(unet, conv) == {"linear": 722 + RESNETS, "1x1": SHORTCUTS, "kxk": RESNETS * 2 + SAMPLERS}
    assert (conv.r, conv.alpha, conv.conv_r, conv.conv_alpha) == (16, 8.0, 8, 4.0)
    assert conv.rank_pattern == {} and conv.alpha_pattern == {}


def sgm_path(path, layers_per_block=2):
    """The SGM path (sd-scripts' own UNet) of a diffusers UNet module path."""
    step = layers_per_block + 1
    inner = {
        "conv1": "in_layers.2",
        "conv2": "out_layers.3",
        "time_emb_proj": "emb_layers.1",
        "conv_shortcut": "skip_connection",
    }
    match = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if match:
        side, b, kind, j, rest = match.groups()
        index = 1 + int(b) * step + int(j) if side == "down" else int(b) * step + int(j)
        top = "input_blocks" if side == "down" else "output_blocks"
        rest = inner.get(rest, rest) if kind == "resnets" else rest
        return f"{top}.{index}.{0 if kind == 'resnets' else 1}.{rest}"
    match = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path)
    if match:
        return f"input_blocks.{(int(match.group(1)) + 1) * step}.0.op"
    match = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path)
    if match:
        return f"output_blocks.{int(match.group(1)) * step + layers_per_block}.2.conv"
    match = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
    kind, j, rest = match.groups()
    index = {"resnets": {0: 0, 1: 2}, "attentions": {0: 1}}[kind][int(j)]
    return f"middle_block.{index}.{inner.get(rest, rest) if kind == 'resnets' else rest}"


def test_sdxl_selection_is_the_sgm_selection_of_sd_scripts(sdxl):
    """Every selected module maps to a distinct SGM module inside the container sd-scripts targets."""
    config = build_config("lokr", sdxl[0], network_args=["conv_dim=4"])
    sgm = [sgm_path(path) for path in selected(config, sdxl[0])]
    assert len(set(sgm)) == 788
    transformer = [p for p in sgm if ".transformer_blocks." in p or p.endswith((".proj_in", ".proj_out"))]
    assert len(transformer) == 722
    assert all(re.match(r"(input_blocks\.[4578]\.1|output_blocks\.[0-5]\.1|middle_block\.1)\.", p) for p in transformer)
    resnet = [
        re.sub(r"^(input_blocks\.\d+\.0|output_blocks\.\d+\.0|middle_block\.[02])\.", "", p)
        for p in sorted(set(sgm) - set(transformer))
        if not p.endswith((".op", ".2.conv"))
    ]
    assert Counter(resnet) == {
        "in_layers.2": RESNETS,
        "out_layers.3": RESNETS,
        "emb_layers.1": RESNETS,
        "skip_connection": SHORTCUTS,
    }
    assert sorted(p for p in sgm if p.endswith((".op", ".2.conv"))) == [
        "input_blocks.3.0.op",
        "input_blocks.6.0.op",
        "output_blocks.2.2.conv",
        "output_blocks.5.2.conv",
    ]


def test_sdxl_text_encoder_counts(sdxl):
    _, te1, te2 = sdxl
    layers = {"te1": 12, "te2": 32}  # CLIP-L / CLIP-bigG encoder layers, 4 attention + 2 MLP Linears each
    config1 = build_config("lokr", te1, network_dim=8)
    config2 = build_config("lokr", te2, network_dim=8)
    paths1, paths2 = selected(config1, te1), selected(config2, te2)
    assert len(paths1) == layers["te1"] * 6 == 72
    assert len(paths2) == layers["te2"] * 6 == 192
    assert "text_projection" not in paths2
    assert all(path.startswith("text_model.encoder.layers.") for path in paths2)
    assert all(path.startswith("encoder.layers.") for path in paths1)  # transformers 5: no text_model level


def test_anima_counts_default_adapter_and_text_encoder():
    with torch.device("meta"):
        dit, qwen3 = AnimaDiT(), Qwen3Model(qwen3_06b_config())
    per_block = 4 + 4 + 2  # self_attn q/k/v/output, cross_attn q/k/v/output, mlp.layer1/2
    default = selected(build_config("lokr", dit, network_dim=32, network_alpha=16), dit)
    assert len(default) == 28 * per_block == 280
    assert not [p for p in default if re.search("modulation|embedder|final_layer|llm_adapter", p)]
    adapter = selected(build_config("lokr", dit, network_dim=32, network_alpha=16, train_llm_adapter=True), dit)
    adapter_per_block = 4 + 4 + 2  # self_attn q/k/v/o, cross_attn q/k/v/o, mlp.0, mlp.2
    assert len(adapter) == 280 + 6 * adapter_per_block == 340
    assert not [p for p in adapter if p in ("llm_adapter.out_proj", "llm_adapter.embed")]
    text = selected(build_config("lokr", qwen3, network_dim=32, network_alpha=16), qwen3)
    assert len(text) == 28 * (4 + 3) == 196
    # what the default excludes removed comes back only through include_patterns
    rescued = build_config("lokr", dit, network_args=[r"include_patterns=[r'final_layer\.linear', r'x_embedder\..*']"])
    assert set(selected(rescued, dit)) - set(default) == {"final_layer.linear", "x_embedder.proj.1"}
