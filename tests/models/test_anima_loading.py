"""Single-file loading of the Anima DiT and the Qwen3 text encoder: prefixes, tolerated buffers, clear errors."""

import copy
import logging

import pytest
import torch
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3Model

from peft_lyco.models.anima import AnimaConfig, AnimaDiT, qwen3_text_encoder_from_single_file
from peft_lyco.presets import build_config

CONFIG = AnimaConfig(
    model_channels=32,
    num_blocks=2,
    num_heads=2,
    crossattn_emb_channels=16,
    adaln_lora_dim=8,
    max_img_h=32,
    max_img_w=32,
    max_frames=4,
    adapter_source_dim=16,
    adapter_model_dim=16,
    adapter_num_layers=1,
    adapter_num_heads=2,
    adapter_vocab_size=40,
)
BUFFERS = ("pos_embedder.seq", "pos_embedder.dim_spatial_range", "pos_embedder.dim_temporal_range")


@pytest.fixture
def source():
    torch.manual_seed(0)
    model = AnimaDiT(CONFIG).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(std=0.1)
    return model


def saved(tmp_path, state_dict, name="dit.safetensors"):
    path = tmp_path / name
    save_file({key: value.contiguous() for key, value in state_dict.items()}, str(path))
    return path


def output(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(1, 16, 4, 4, generator=gen), torch.randn(1, 3, 16, generator=gen)
    with torch.no_grad():
        return model(x, torch.tensor([0.5]), ctx)


@pytest.mark.parametrize("prefix", ["net.", ""])
@pytest.mark.parametrize("with_buffers", [True, False])
def test_from_single_file_round_trip(source, tmp_path, prefix, with_buffers):
    state = {prefix + key: value for key, value in source.state_dict().items() if with_buffers or key not in BUFFERS}
    model = AnimaDiT.from_single_file(saved(tmp_path, state), CONFIG)
    assert not model.training
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    torch.testing.assert_close(
        output(model), output(source), rtol=1e-6, atol=1e-6
    )  # same weights; file tensors may differ in alignment


def test_from_single_file_dtype_and_unexpected_keys(source, tmp_path, caplog):
    state = {**source.state_dict(), "extra.weight": torch.zeros(2)}
    path = saved(tmp_path, state)
    with pytest.raises(ValueError, match="unexpected keys: extra.weight"):
        AnimaDiT.from_single_file(path, CONFIG)
    with caplog.at_level(logging.WARNING):
        model = AnimaDiT.from_single_file(path, CONFIG, strict=False, torch_dtype=torch.bfloat16)
    assert "unexpected keys" in caplog.text
    assert model.blocks[0].mlp.layer1.weight.dtype == torch.bfloat16
    out = output(model)  # RoPE tables stay >= fp32 after the cast
    assert model.pos_embedder.seq.dtype == torch.float32
    torch.testing.assert_close(out.float(), output(source), atol=0.1, rtol=0.1)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sd: sd.pop("blocks.1.mlp.layer2.weight"), "missing keys: blocks.1.mlp.layer2.weight"),
        (
            lambda sd: sd.__setitem__("blocks.0.mlp.layer1.weight", torch.zeros(3, 3)),
            "shape mismatch.*blocks.0.mlp.layer1",
        ),
        (
            lambda sd: sd["final_layer.linear.weight"].__setitem__((0, 0), float("nan")),
            "non-finite.*final_layer.linear",
        ),
        (lambda sd: sd.__setitem__("transformer_blocks.0.attn1.to_q.weight", torch.zeros(1)), "diffusers"),
    ],
    ids=["missing", "shape", "nan", "diffusers-layout"],
)
def test_from_single_file_bad_files(source, tmp_path, change, message):
    state = {key: value.clone() for key, value in source.state_dict().items()}
    change(state)
    with pytest.raises(ValueError, match=message):
        AnimaDiT.from_single_file(saved(tmp_path, state), CONFIG)


def test_from_single_file_refuses_pickles_and_truncated_files(source, tmp_path):
    for name in ("dit.ckpt", "dit.safetensors.pt", "disguised.safetensors"):
        pickled = tmp_path / name
        torch.save(source.state_dict(), pickled)
        with pytest.raises(ValueError, match=f"{name} is a torch zip checkpoint.*never unpickles"):
            AnimaDiT.from_single_file(pickled, CONFIG)
    path = saved(tmp_path, source.state_dict())
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.safetensors: not a readable safetensors file"):
        AnimaDiT.from_single_file(truncated, CONFIG)
    with pytest.raises(FileNotFoundError):
        AnimaDiT.from_single_file(tmp_path / "absent.safetensors", CONFIG)


@pytest.mark.parametrize("name", ["dit.sft", "dit.SAFETENSORS", "dit"])
def test_from_single_file_reads_safetensors_content_whatever_its_name(source, tmp_path, name):
    """Checkpoints were routed by suffix: a .sft download was refused as a pickle."""
    path = saved(tmp_path, source.state_dict(), name)
    model = AnimaDiT.from_single_file(path, CONFIG)
    assert model.state_dict().keys() == source.state_dict().keys()
    assert all(torch.equal(value, source.state_dict()[key]) for key, value in model.state_dict().items())


def test_load_state_dict_accepts_prefix_reports_and_leaves_model_untouched_on_error(source):
    target = AnimaDiT(CONFIG)
    before = {key: value.clone() for key, value in target.state_dict().items()}
    bad = {"net." + key: value for key, value in source.state_dict().items()}
    bad["net.blocks.0.self_attn.q_proj.weight"] = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="blocks.0.self_attn.q_proj.weight"):
        target.load_state_dict(bad)
    assert all(torch.equal(value, before[key]) for key, value in target.state_dict().items())
    partial = {"net." + key: value for key, value in source.state_dict().items() if key not in BUFFERS}
    partial.pop("net.t_embedding_norm.weight")
    with pytest.raises(ValueError, match="missing keys: t_embedding_norm.weight"):
        target.load_state_dict(partial)
    report = target.load_state_dict({**partial, "net.bogus": torch.zeros(1)}, strict=False)
    assert report.missing_keys == ["t_embedding_norm.weight"] and report.unexpected_keys == ["bogus"]
    assert torch.equal(target.blocks[1].mlp.layer1.weight, source.blocks[1].mlp.layer1.weight)


def test_qwen3_text_encoder_from_single_file(tmp_path):
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        tie_word_embeddings=True,
    )
    source = Qwen3Model(config).eval()
    state = {"model." + key: value for key, value in source.state_dict().items()}
    state["lm_head.weight"] = source.embed_tokens.weight  # tied head as causal-LM files carry it
    path = saved(tmp_path, {k: v.clone() for k, v in state.items()}, "qwen3.safetensors")
    loaded = qwen3_text_encoder_from_single_file(path, config)
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, source(input_ids=ids).last_hidden_state)
    del state["model.norm.weight"]
    with pytest.raises(ValueError, match="missing keys: norm.weight"):
        qwen3_text_encoder_from_single_file(
            saved(tmp_path, {k: v.clone() for k, v in state.items()}, "bad.safetensors"), config
        )


def test_peft_adapter_round_trips_through_both_peft_loading_paths(source, tmp_path):
    config = build_config("lokr", source, network_dim=2, network_alpha=1, init_weights=False)
    model = get_peft_model(copy.deepcopy(source), config)
    expected = output(model)
    assert (expected - output(source)).abs().max() > 1e-4
    model.save_pretrained(tmp_path)
    assert torch.equal(output(PeftModel.from_pretrained(copy.deepcopy(source), tmp_path)), expected)
    injected = inject_adapter_in_model(copy.deepcopy(config), copy.deepcopy(source))
    result = set_peft_model_state_dict(injected, get_peft_model_state_dict(model))  # goes through our load_state_dict
    assert result.unexpected_keys == []
    assert torch.equal(output(injected), expected)
