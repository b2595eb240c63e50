"""Module names <-> module paths: SGM and diffusers UNet styles, CLIP with and without ``text_model``, ``lycoris_`` and
dotted names, real-size SDXL on the meta device, and the Anima DiT / LLM adapter / Qwen3 names."""

from pathlib import Path

import pytest
import torch
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.utils import convert_unet_state_dict_to_peft
from torch import nn
from transformers import Qwen3Config, Qwen3Model

from peft_lyco.convert import ANIMA, SDXL, NameResolver, detect_model_type
from peft_lyco.convert.names import split_key
from peft_lyco.tuners.targets import adaptable_layers
from tests.convert.helpers import fresh_pipe, model_from_paths
from tests.presets.presets_models import meta_sdxl


@pytest.fixture(scope="module")
def real_sdxl():
    """SDXL base UNet and both CLIPs at full size, on the meta device (no memory, no download)."""
    unet, text_encoder, text_encoder_2 = meta_sdxl()
    return {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}


def diffusers_path_of_sgm_name(name: str, unet_config) -> str:
    """diffusers' own kohya-LoRA converter applied to one SGM module name (the independent oracle)."""
    state_dict = {f"{name}.lora_down.weight": torch.zeros(1), f"{name}.lora_up.weight": torch.zeros(1)}
    converted = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(state_dict, unet_config))[0]
    (path,) = {key.removeprefix("unet.").rsplit(".lora_", 1)[0] for key in convert_unet_state_dict_to_peft(converted)}
    return path


def test_real_size_sdxl_names_map_to_exactly_one_module(real_sdxl):
    with_model = NameResolver(SDXL, real_sdxl)
    without_model = NameResolver(SDXL)
    counts = {}
    for component, model in real_sdxl.items():
        paths = dict(adaptable_layers(model))
        counts[component] = (len(paths), sum(isinstance(m, nn.Conv2d) for m in paths.values()))
        for naming in ("sgm", "diffusers"):
            names = {with_model.kohya_name(component, path, naming): path for path in paths}
            assert len(names) == len(paths), f"{component} {naming} names collide"
            for name, path in names.items():
                assert with_model.resolve(name) == (component, path), name
                assert without_model.resolve(name) == (component, path), name
    assert counts == {"unet": (794, 51), "text_encoder": (72, 0), "text_encoder_2": (193, 0)}


def test_real_size_sgm_names_agree_with_diffusers_converter(real_sdxl):
    unet = real_sdxl["unet"]
    resolver = NameResolver(SDXL, {"unet": unet})
    for path in dict(adaptable_layers(unet)):
        assert diffusers_path_of_sgm_name(resolver.kohya_name("unet", path, "sgm"), unet.config) == path


@pytest.mark.parametrize(
    "name,expected",
    [  # names as sd-scripts writes them for real SDXL files, SGM and diffusers style
        (
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        ),
        ("lora_unet_input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv"),
        ("lora_unet_input_blocks_7_0_skip_connection", "down_blocks.2.resnets.0.conv_shortcut"),
        ("lora_unet_middle_block_2_emb_layers_1", "mid_block.resnets.1.time_emb_proj"),
        ("lora_unet_output_blocks_2_2_conv", "up_blocks.0.upsamplers.0.conv"),
        (
            "lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_0_proj",
            "up_blocks.1.attentions.2.transformer_blocks.1.ff.net.0.proj",
        ),
        ("lora_unet_output_blocks_8_0_out_layers_3", "up_blocks.2.resnets.2.conv2"),
        ("lora_unet_label_emb_0_0", "add_embedding.linear_1"),
        ("lora_unet_time_embed_2", "time_embedding.linear_2"),
        ("lora_unet_out_2", "conv_out"),
        ("lora_unet_add_embedding_linear_2", "add_embedding.linear_2"),
        (
            "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_out_0",
            "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0",
        ),
        ("lycoris_mid_block_attentions_0_proj_in", "mid_block.attentions.0.proj_in"),
    ],
)
def test_known_unet_names(real_sdxl, name, expected):
    assert NameResolver(SDXL, real_sdxl).resolve(name) == ("unet", expected)
    assert NameResolver(SDXL).resolve(name) == ("unet", expected)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("lora_te1_text_model_encoder_layers_11_mlp_fc2", ("text_encoder", "encoder.layers.11.mlp.fc2")),
        ("lora_te1_encoder_layers_0_self_attn_q_proj", ("text_encoder", "encoder.layers.0.self_attn.q_proj")),
        (
            "lora_te_text_model_encoder_layers_3_self_attn_out_proj",
            ("text_encoder", "encoder.layers.3.self_attn.out_proj"),
        ),
        (
            "lora_te2_text_model_encoder_layers_31_self_attn_v_proj",
            ("text_encoder_2", "text_model.encoder.layers.31.self_attn.v_proj"),
        ),
        ("lora_te2_encoder_layers_5_mlp_fc1", ("text_encoder_2", "text_model.encoder.layers.5.mlp.fc1")),
        ("lora_te2_text_projection", ("text_encoder_2", "text_projection")),
        ("unet.down_blocks.1.attentions.0.proj_in", ("unet", "down_blocks.1.attentions.0.proj_in")),
        ("diffusion_model.input_blocks.4.1.proj_in", ("unet", "down_blocks.1.attentions.0.proj_in")),
        ("text_encoder.text_model.encoder.layers.2.mlp.fc1", ("text_encoder", "encoder.layers.2.mlp.fc1")),
        (
            "text_encoder_2.text_model.encoder.layers.2.mlp.fc1",
            ("text_encoder_2", "text_model.encoder.layers.2.mlp.fc1"),
        ),
    ],
)
def test_text_encoder_and_dotted_names(real_sdxl, name, expected):
    assert NameResolver(SDXL, real_sdxl).resolve(name) == expected
    assert NameResolver(SDXL).resolve(name) == expected


def test_writer_names_follow_sd_scripts_on_the_tiny_pipeline():
    pipe = fresh_pipe()
    resolver = NameResolver(SDXL, {c: getattr(pipe, c) for c in ("unet", "text_encoder", "text_encoder_2")})
    assert (
        resolver.kohya_name("text_encoder", "encoder.layers.0.mlp.fc1")
        == "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    )
    assert resolver.kohya_name("text_encoder_2", "text_model.encoder.layers.4.self_attn.q_proj") == (
        "lora_te2_text_model_encoder_layers_4_self_attn_q_proj"
    )
    assert resolver.kohya_name("unet", "up_blocks.0.upsamplers.0.conv") == "lora_unet_output_blocks_2_2_conv"
    assert (
        resolver.kohya_name("unet", "up_blocks.0.upsamplers.0.conv", "diffusers")
        == "lora_unet_up_blocks_0_upsamplers_0_conv"
    )
    for path in dict(adaptable_layers(pipe.unet)):  # the tiny UNet has two levels; the same rules hold
        assert diffusers_path_of_sgm_name(resolver.kohya_name("unet", path), pipe.unet.config) == path
    assert resolver.kohya_name("unet", "conv_in", "comfy") == resolver.kohya_name("unet", "conv_in")  # ComfyUI: SGM
    with pytest.raises(ValueError, match="naming"):
        resolver.kohya_name("unet", "conv_in", "a1111")


def test_names_of_no_module_resolve_to_nothing(real_sdxl):
    resolver = NameResolver(SDXL, real_sdxl)
    for name in (
        "lora_unet_input_blocks_99_1_proj_in",
        "lora_te3_encoder_layers_0_mlp_fc1",
        "lora_unet_blocks_0_self_attn_q_proj",
    ):
        assert resolver.resolve(name) is None
    assert resolver.resolve("lora_te1_text_model_encoder_layers_12_mlp_fc1") is None  # CLIP-L has 12 layers


def test_split_key():
    params = ("alpha", "hada_w1_a", "lora_down.weight")
    assert split_key("lora_unet_conv_in.hada_w1_a", params) == ("lora_unet_conv_in", "hada_w1_a")
    assert split_key("unet.conv_in.lora_down.weight", params) == ("unet.conv_in", "lora_down.weight")
    assert split_key("lora_unet_conv_in.weight", params) is None


# ---------------------------------------------------------------------------------------------------------- Anima
ANIMA_MODULES = [
    (path, int(out), int(inp))
    for path, out, inp in (
        line.split("\t")
        for line in (Path(__file__).parent / "data/anima_linear_modules.tsv").read_text().splitlines()[1:]
    )
]


def _sd_scripts_anima_targets() -> list[str]:
    """sd-scripts' default Anima DiT targets (280) plus the LLM adapter's (60)."""
    dit = [
        f"blocks.{n}.{part}"
        for n in range(28)
        for part in [
            f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in ("q_proj", "k_proj", "v_proj", "output_proj")
        ]
        + ["mlp.layer1", "mlp.layer2"]
    ]
    adapter = [
        f"llm_adapter.blocks.{n}.{part}"
        for n in range(6)
        for part in [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        + ["mlp.0", "mlp.2"]
    ]
    return dit + adapter


def test_anima_dit_names_map_to_exactly_one_module():
    transformer = model_from_paths(ANIMA_MODULES)
    targets = _sd_scripts_anima_targets()
    assert len(targets) == 340 and set(targets) <= {path for path, _, _ in ANIMA_MODULES}
    with_model, without_model = NameResolver(ANIMA, {"transformer": transformer}), NameResolver(ANIMA)
    for path, _, _ in ANIMA_MODULES:  # every Linear of the real DiT, targeted by default or not
        name = "lora_unet_" + path.replace(".", "_")
        assert with_model.resolve(name) == ("transformer", path)
        assert without_model.resolve(name) == ("transformer", path)
        assert with_model.kohya_name("transformer", path) == name
    assert without_model.resolve("lora_unet_llm_adapter_blocks_5_mlp_2") == (
        "transformer",
        "llm_adapter.blocks.5.mlp.2",
    )
    assert without_model.resolve("diffusion_model.blocks.3.cross_attn.output_proj") == (
        "transformer",
        "blocks.3.cross_attn.output_proj",
    )


def test_qwen3_text_encoder_names():
    config = Qwen3Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    )
    with torch.device("meta"):
        encoder = Qwen3Model(config)
    resolver = NameResolver(ANIMA, {"text_encoder": encoder})
    paths = dict(adaptable_layers(encoder))
    assert len(paths) == 14
    for path in paths:
        name = "lora_te_" + path.replace(".", "_")
        assert resolver.resolve(name) == ("text_encoder", path) == NameResolver(ANIMA).resolve(name)
        assert resolver.kohya_name("text_encoder", path) == name
    assert NameResolver(ANIMA).resolve("lora_te_layers_27_mlp_gate_proj") == ("text_encoder", "layers.27.mlp.gate_proj")


def test_model_type_detection():
    assert (
        detect_model_type(["lora_unet_input_blocks_4_1_proj_in", "lora_te1_text_model_encoder_layers_0_mlp_fc1"])
        == "sdxl"
    )
    assert detect_model_type(["lycoris_down_blocks_1_attentions_0_proj_in"]) == "sdxl"
    assert detect_model_type(["lora_unet_blocks_0_self_attn_q_proj", "lora_te_layers_0_mlp_up_proj"]) == "anima"
    assert detect_model_type(["lora_unet_foo"], {"ss_base_model_version": "anima"}) == "anima"
    assert detect_model_type(["lora_unet_foo"], {"ss_base_model_version": "sdxl_base_v1-0"}) == "sdxl"
    with pytest.raises(ValueError, match="model_type"):
        detect_model_type(["lora_unet_foo"])
    with pytest.raises(ValueError, match="both"):
        detect_model_type(["lora_unet_blocks_0_self_attn_q_proj", "lora_te2_text_projection"])
