"""param_groups: component lrs, regex lrs, LoRA+ plus groups (sd-scripts' parameter choice), lr-0 groups dropped."""

import copy
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from presets_models import tiny_sdxl

from peft_lyco.presets import NetworkArgsError, build_config, parse_network_args
from peft_lyco.training import param_groups


@pytest.fixture(scope="module")
def sdxl_parts():
    """Tiny UNet with LoHa, CLIP-L and bigG with LoKr (decompose_both so lokr_w1_a/_b exist), via the presets."""
    unet, te1, te2 = tiny_sdxl()
    unet = get_peft_model(unet, build_config("loha", unet, network_dim=2, network_args=["conv_dim=2"]))
    te1 = get_peft_model(te1, build_config("lokr", te1, network_dim=1, factor=4, decompose_both=True))
    te2 = get_peft_model(te2, build_config("lokr", te2, network_dim=2))
    return {"unet": unet, "text_encoder": te1, "text_encoder_2": te2}


def names_of(component):
    return {id(p): n for n, p in component.named_parameters()}


def by_name(groups):
    return {group["name"]: group for group in groups}


def test_component_lrs_and_full_coverage(sdxl_parts):
    groups = param_groups(sdxl_parts, lr=1e-3, unet_lr=2e-3, text_encoder_lr=[3e-4, 4e-4])
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 2e-3), ("text_encoder", 3e-4), ("text_encoder_2", 4e-4)]
    for group, component in zip(groups, sdxl_parts.values()):
        trainable = {id(p) for p in component.parameters() if p.requires_grad}
        assert {id(p) for p in group["params"]} == trainable and len(group["params"]) == len(trainable)
    single = param_groups(sdxl_parts, lr=1e-3, text_encoder_lr=5e-4)
    assert [g["lr"] for g in single] == [1e-3, 5e-4, 5e-4]
    optimizer = torch.optim.AdamW(groups)
    assert [g["name"] for g in optimizer.param_groups] == ["unet", "text_encoder", "text_encoder_2"]


def test_loraplus_plus_parameters_follow_sd_scripts(sdxl_parts):
    groups = by_name(param_groups(sdxl_parts, lr=1e-3, loraplus_unet_lr_ratio=16, loraplus_lr_ratio=4))
    unet_names = names_of(sdxl_parts["unet"])
    plus = {unet_names[id(p)].split(".")[-2] for p in groups["unet plus"]["params"]}
    plain = {unet_names[id(p)].split(".")[-2] for p in groups["unet"]["params"]}
    assert plus == {"hada_w2_a"} and "hada_w2_a" not in plain and "hada_w1_a" in plain
    assert groups["unet plus"]["lr"] == pytest.approx(1e-3 * 16)  # the unet ratio wins over the general one
    te_names = names_of(sdxl_parts["text_encoder"])
    te_plus = {te_names[id(p)].split(".")[-2] for p in groups["text_encoder plus"]["params"]}
    assert te_plus == {"lokr_w1_a", "lokr_w1_b"}  # sd-scripts' rule is the substring "lokr_w1"
    te2_names = names_of(sdxl_parts["text_encoder_2"])
    assert {te2_names[id(p)].split(".")[-2] for p in groups["text_encoder_2 plus"]["params"]} == {"lokr_w1"}
    assert groups["text_encoder_2 plus"]["lr"] == pytest.approx(4e-3)


def test_regex_lrs_first_match_wins_and_zero_lr_groups_are_dropped(sdxl_parts):
    reg = r".*attn1\.to_q=5e-4,.*attn1\..*=0,.*q_proj=7e-4"
    groups = param_groups(sdxl_parts, lr=1e-3, reg_lrs=reg, loraplus_lr_ratio=2)
    named = by_name(groups)
    assert "unet reg_lr_1" not in named and "unet reg_lr_1 plus" not in named  # lr 0: not optimised
    assert named["unet reg_lr_0"]["lr"] == 5e-4 and named["unet reg_lr_0 plus"]["lr"] == pytest.approx(1e-3)
    assert named["text_encoder reg_lr_2"]["lr"] == 7e-4
    unet_names = names_of(sdxl_parts["unet"])
    assert all(re.search(r"attn1\.to_q\.", unet_names[id(p)]) for p in named["unet reg_lr_0"]["params"])
    assert not any(".attn1." in unet_names[id(p)] for p in named["unet"]["params"] + named["unet plus"]["params"])
    order = [g["name"] for g in groups if g["name"].startswith("unet")]
    assert order == ["unet reg_lr_0", "unet reg_lr_0 plus", "unet", "unet plus"]
    dict_form = param_groups(sdxl_parts, lr=1e-3, **parse_network_args([f"network_reg_lrs={reg}"]).training_options())
    assert [g["name"] for g in dict_form] == [g["name"] for g in param_groups(sdxl_parts, lr=1e-3, reg_lrs=reg)]
    no_unet = param_groups(sdxl_parts, lr=1e-3, unet_lr=0)
    assert [g["name"] for g in no_unet] == ["text_encoder", "text_encoder_2"]


def test_single_modules_and_other_adapters():
    unet, te1, _ = tiny_sdxl()
    te = get_peft_model(te1, build_config("loha", te1))
    assert [(g["name"], g["lr"]) for g in param_groups(te, lr=1.0, text_encoder_lr=0.5)] == [("text_encoder", 0.5)]
    lora_unet = inject_adapter_in_model(LoraConfig(target_modules=["to_q"], r=2), copy.deepcopy(unet))
    groups = by_name(param_groups(lora_unet, lr=1.0, loraplus_lr_ratio=3))
    names = {id(p): n for n, p in lora_unet.named_parameters()}
    assert all(".lora_B." in names[id(p)] for p in groups["unet plus"]["params"]) and groups["unet plus"]["lr"] == 3.0


def test_bad_inputs_raise(sdxl_parts):
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(tiny_sdxl()[0].requires_grad_(False), lr=1e-3)
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        param_groups(sdxl_parts, lr=-1)
    with pytest.raises(ValueError, match=r"text_encoder_lr\[1\]"):
        param_groups(sdxl_parts, lr=1e-3, text_encoder_lr=[1e-3, "x"])
    with pytest.raises(NetworkArgsError, match="network_reg_lrs"):
        param_groups(sdxl_parts, lr=1e-3, reg_lrs="(=1")
    with pytest.raises(NetworkArgsError, match="loraplus_lr_ratio"):
        param_groups(sdxl_parts, lr=1e-3, loraplus_lr_ratio=0)
    with pytest.raises(ValueError, match="text_encoder, text_encoder_2"):
        param_groups({"text_encoder_two": sdxl_parts["text_encoder"]}, lr=1e-3)
    with pytest.raises(TypeError, match="mapping of component name"):
        param_groups({"unet": "not a module"}, lr=1e-3)
