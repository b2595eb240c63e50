"""build_config: sd-scripts selection semantics, per-module ranks, and configs that inject exactly as planned."""

import copy
import logging
import re

import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from presets_models import tiny_sdxl
from torch import nn
from transformers import Qwen3Config, Qwen3Model

from peft_lyco import LoHaConfig, LoHaLayer, LoKrConfig, LoKrLayer
from peft_lyco.models.anima import build_tiny_anima
from peft_lyco.presets import NetworkArgsError, build_config, describe, detect_architecture


@pytest.fixture(scope="module")
def models():
    return tiny_sdxl()


def adapted(model, config):
    peft_model = get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    return {name: m for name, m in peft_model.base_model.model.named_modules() if isinstance(m, (LoHaLayer, LoKrLayer))}


def transformer_linears(unet):
    """Independent candidate list: Linears under each Transformer2DModel, by class name as sd-scripts does."""
    found = []
    for name, module in unet.named_modules():
        if type(module).__name__ == "Transformer2DModel":
            found += [f"{name}.{child}" for child, sub in module.named_modules() if type(sub).__name__ == "Linear"]
    return found


def test_default_unet_selection_is_every_linear_of_the_transformers(models):
    unet = models[0]
    config = build_config("loha", unet)
    assert config.target_modules == set(transformer_linears(unet))
    assert (config.r, config.alpha, config.conv_r) == (4, 1.0, None)  # sd-scripts defaults: dim 4, alpha 1


def test_excludes_fullmatch_and_includes_only_rescue(models):
    unet = models[0]
    every = set(transformer_linears(unet))
    assert build_config("loha", unet, exclude_patterns=[".*attn2"]).target_modules == every  # no fullmatch
    attn2 = {p for p in every if ".attn2." in p}
    config = build_config(
        "loha", unet, exclude_patterns=[r".*attn2\..*"], include_patterns=[r".*attn2\.to_q", "conv_in"]
    )
    rescued = {p for p in attn2 if p.endswith("attn2.to_q")}
    assert config.target_modules == (every - attn2) | rescued  # conv_in is no candidate, so it is not added
    assert rescued


def test_reg_dims_first_match_wins_zero_skips_and_alpha_is_network_alpha(models):
    unet = models[0]
    config = build_config(
        "lokr",
        unet,
        network_dim=4,
        network_alpha=2,
        network_args=[
            r"network_reg_dims=.*attn1\.to_q=8,.*attn1\..*=6,.*ff\.net\.2=0,.*resnets\.0\.conv1=5",
            "conv_dim=3",
            "conv_alpha=1.5",
        ],
    )
    targets = config.target_modules
    assert not [p for p in targets if p.endswith("ff.net.2")]
    layers = adapted(unet, config)
    assert set(layers) == targets
    for path, layer in layers.items():
        kxk = isinstance(layer.get_base_layer(), nn.Conv2d) and layer.get_base_layer().kernel_size != (1, 1)
        if path.endswith("attn1.to_q"):
            expected = (8, 2.0)
        elif ".attn1." in path:
            expected = (6, 2.0)
        elif path.endswith("resnets.0.conv1"):
            expected = (5, 2.0)  # a regex match takes network_alpha even on a kxk conv (sd-scripts)
        elif kxk:
            expected = (3, 1.5)
        else:
            expected = (4, 2.0)
        assert (layer.r["default"], layer.alpha["default"]) == expected, path


def test_conv_alpha_defaults_to_one_and_zero_alpha_means_rank(models):
    unet = models[0]
    config = build_config("loha", unet, network_dim=4, network_alpha=0, network_args=["conv_dim=2"])
    assert (config.conv_r, config.conv_alpha) == (2, 1.0)
    for layer in adapted(unet, config).values():
        base = layer.get_base_layer()
        if isinstance(base, nn.Conv2d) and base.kernel_size != (1, 1):
            assert (layer.r["default"], layer.alpha["default"]) == (2, 1.0)
        else:
            assert (layer.r["default"], layer.alpha["default"]) == (4, 4.0)  # alpha 0 -> rank, scale 1


def test_layout_options_and_passthrough_reach_the_config(models):
    unet = models[0]
    config = build_config(
        "lokr",
        unet,
        network_dim=2,
        network_args=[
            "conv_dim=2",
            "use_tucker=True",
            "factor=4",
            "rank_dropout=0.1",
            "module_dropout=0.05",
            "decompose_both=True",
            "rank_dropout_scale=False",
        ],
        init_weights=False,
        modules_to_save=["conv_in"],
    )
    assert isinstance(config, LoKrConfig)
    assert (
        config.factor,
        config.use_tucker,
        config.decompose_both,
        config.rank_dropout,
        config.module_dropout,
        config.rank_dropout_scale,
        config.init_weights,
        config.modules_to_save,
    ) == (4, True, True, 0.1, 0.05, False, False, ["conv_in"])
    modes = {row.mode for row in describe(config, unet)}
    assert "tucker" in modes and "linear" in modes
    with pytest.raises(NetworkArgsError, match=r"\['factor'\] apply only to algo='lokr'"):
        build_config("loha", unet, network_args=["factor=4"])
    with pytest.raises(NetworkArgsError, match="unknown network argument 'lr'"):
        build_config("loha", unet, lr=1e-4)
    with pytest.raises(ValueError, match="algo must be 'loha' or 'lokr'"):
        build_config("lora", unet)
    with pytest.raises(ValueError, match="network_dim must be an integer >= 0"):
        build_config("loha", unet, network_dim=2.5)
    with pytest.raises(ValueError, match="no module of UNet2DConditionModel is selected"):
        build_config("loha", unet, exclude_patterns=[".*"])


def test_verbose_table_matches_the_injected_layers(models, capsys):
    _, te1, _ = models
    config = build_config(
        "lokr", te1, network_dim=4, network_alpha=2, network_args=[r"network_reg_dims=.*fc1=8", "verbose=True"]
    )
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].split() == ["module", "algo", "mode", "rank", "alpha", "scale", "params"]
    layers = adapted(te1, config)
    rows = {line.split()[0]: line.split()[1:] for line in printed[1:-1]}
    assert set(rows) == set(layers) and len(rows) == 5 * 6
    for path, layer in layers.items():
        params = sum(p.numel() for p in layer.adapter_parameters("default").values())
        algo, mode, rank, alpha, scale, count = rows[path]
        assert (algo, mode, int(rank), float(alpha)) == (
            "lokr",
            layer.layouts["default"].mode,
            layer.r["default"],
            layer.alpha["default"],
        )
        assert float(scale) == pytest.approx(layer.scaling["default"]) and int(count.replace(",", "")) == params
    total = sum(sum(p.numel() for p in layer.adapter_parameters("default").values()) for layer in layers.values())
    assert printed[-1] == f"30 modules, {total:,} parameters"


def test_full_matrix_lokr_warns_at_build_time(models, caplog):
    with caplog.at_level(logging.WARNING):
        build_config("lokr", models[1], network_dim=64, network_alpha=1)
    assert re.search(r"LoKr: lora_dim 64 is large for dim=\d+ and factor=-1, using full matrix mode", caplog.text)


def test_unknown_architecture_suggests_target_modules_and_custom_targets_work():
    model = nn.Sequential(nn.Linear(8, 8), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1), nn.ReLU())
    with pytest.raises(
        ValueError, match="cannot detect the architecture of torch.nn.modules.container.Sequential.*Pass target_modules"
    ):
        build_config("loha", model)
    config = build_config("loha", model, network_dim=2, target_modules=["0", "1", "2"])
    assert config.target_modules == {"0", "1", "2"} and config.conv_r is None  # kxk falls back to network_dim
    with_conv = build_config(
        "loha", model, network_dim=2, target_modules=r"\d", network_args=["conv_dim=3"], exclude_patterns=["2"]
    )
    assert with_conv.target_modules == {"0", "1"} and with_conv.conv_r == 3
    layers = adapted(model, with_conv)
    assert (layers["0"].r["default"], layers["1"].r["default"]) == (2, 3)


def test_exact_paths_never_leak_to_nested_modules_with_the_same_suffix():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    config = build_config("loha", model, target_modules=["0", "1"], exclude_patterns=[r"1\.0"])
    assert set(adapted(model, config)) == {"0", "1.1"}  # PEFT's suffix rule alone would also adapt "1.0"
    listed = build_config("loha", model, target_modules=["0", "1"])
    assert isinstance(listed.target_modules, set) and set(adapted(model, listed)) == {"0", "1.0", "1.1"}


def test_peft_wrapped_models_keep_their_paths(models):
    te1 = models[1]
    config = build_config("loha", te1)
    wrapped = get_peft_model(copy.deepcopy(te1), LoKrConfig(target_modules=["q_proj"]))
    again = build_config("loha", wrapped)
    assert again.target_modules == config.target_modules
    assert detect_architecture(wrapped).name == "clip_text"


def test_train_llm_adapter_adds_adapter_blocks_only_on_the_dit():
    tiny = build_tiny_anima()
    without = set(adapted(tiny.dit, build_config("loha", tiny.dit)))
    assert len(without) == tiny.dit.config.num_blocks * 10
    assert not [p for p in without if p.startswith("llm_adapter")]  # DiT paths are suffixes of adapter paths
    with_adapter = set(adapted(tiny.dit, build_config("loha", tiny.dit, train_llm_adapter=True)))
    added = with_adapter - without
    assert added and all(p.startswith("llm_adapter.blocks.") for p in added)
    assert len(added) == tiny.dit.config.adapter_num_layers * 10
    assert (
        build_config("loha", tiny.text_encoder, train_llm_adapter=True).target_modules
        == build_config("loha", tiny.text_encoder).target_modules
    )


def test_config_survives_save_and_reload(models, tmp_path):
    _, _, te2 = models
    config = build_config(
        "loha",
        te2,
        network_dim=2,
        network_alpha=1,
        network_args=[r"network_reg_dims=.*\.0\..*q_proj=6"],
        init_weights=False,
    )
    model = get_peft_model(copy.deepcopy(te2), config)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(te2), tmp_path)
    ids = torch.randint(0, 1000, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).text_embeds, model(input_ids=ids).text_embeds)
    ranks = {n: m.r["default"] for n, m in reloaded.base_model.model.named_modules() if isinstance(m, LoHaLayer)}
    assert ranks.pop("text_model.encoder.layers.0.self_attn.q_proj") == 6 and set(ranks.values()) == {2}
    assert isinstance(reloaded.peft_config["default"], LoHaConfig)


def test_qwen3_text_encoder_preset():
    model = Qwen3Model(
        Qwen3Config(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
        )
    )
    config = build_config("lokr", model, network_dim=2)
    assert config.target_modules == {
        f"layers.{i}.{part}"
        for i in range(3)
        for part in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_options_from_network_args(algo):
    """sd-scripts' dora_wd / wd_on_output / use_scalar / rs_lora / dropout reach the config and the layers."""
    model = nn.Sequential(nn.Linear(16, 16))
    args = ["dora_wd=True", "wd_on_output=False", "use_scalar=True", "rs_lora=True"]
    config = build_config(algo, model, network_dim=4, network_alpha=2, network_args=args, target_modules=["0"])
    assert (config.weight_decompose, config.wd_on_output, config.use_scalar, config.rs_lora) == (
        True,
        False,
        True,
        True,
    )
    layer = inject_adapter_in_model(config, model)[0]
    assert layer.dora_scale["default"].shape == (1, 16) and layer.scalar["default"].item() == 0.0
    assert layer.scaling["default"] == (4 if algo == "lokr" and layer.layouts["default"].both_full else 2) / 2
    dropped = build_config(algo, nn.Sequential(nn.Linear(16, 16)), network_dim=4, network_args=["dropout=0.25"], target_modules=["0"])  # fmt: skip
    assert dropped.dropout == 0.25
