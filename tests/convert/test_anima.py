"""Anima files: LyCORIS modules on a scaled-down model with the real DiT / LLM-adapter names and on a tiny
``transformers.Qwen3Model`` convert into PEFT adapters that reproduce lycoris-lora's forward; real-size shapes convert
without a model."""

import copy
import re
from pathlib import Path

import pytest
import torch
from peft import inject_adapter_in_model, set_peft_model_state_dict
from transformers import Qwen3Config, Qwen3Model

from peft_lyco.convert import ANIMA, NameResolver, kohya_to_peft, peft_to_kohya
from peft_lyco.diffusers import load_lyco_weights
from tests.convert.helpers import generic_lycoris, model_from_paths

TOL = 1e-5
REAL = [
    line.split("\t") for line in (Path(__file__).parent / "data/anima_linear_modules.tsv").read_text().splitlines()[1:]
]
SCALE = {2048: 32, 1024: 16, 8192: 64, 6144: 48, 4096: 32, 256: 8, 68: 8, 64: 8}


def tiny_dit() -> torch.nn.Module:
    """Two DiT blocks, one LLM-adapter block and the embedders/final layer, real names, dimensions scaled down."""
    keep = re.compile(r"^(blocks\.[01]\.|llm_adapter\.blocks\.0\.|x_embedder|t_embedder|final_layer)")
    torch.manual_seed(0)
    return model_from_paths([(p, SCALE[int(o)], SCALE[int(i)]) for p, o, i in REAL if keep.match(p)], device="cpu")


def tiny_qwen3() -> Qwen3Model:
    torch.manual_seed(0)
    config = Qwen3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, vocab_size=100)  # fmt: skip
    return Qwen3Model(config).eval()


def inject(model, conversion, component):
    for part in conversion[component].parts.values():
        inject_adapter_in_model(part.config, model, "anima", state_dict=part.state_dict)
        assert not set_peft_model_state_dict(model, part.state_dict, "anima").unexpected_keys
    return model


@pytest.mark.parametrize(
    "kwargs",
    [dict(algo="lokr", linear_dim=2, linear_alpha=1, factor=4), dict(algo="loha", linear_dim=4, linear_alpha=2)],
    ids=["lokr", "loha"],
)
def test_anima_dit_file_matches_lycoris(kwargs):
    model = tiny_dit()
    ours = copy.deepcopy(model)
    network, state = generic_lycoris(model, "lora_unet_", **kwargs)
    assert len(network.loras) == 2 * 16 + 10 + 6  # per block: 8 attention, 2 MLP, 6 AdaLN Linears
    conversion = kohya_to_peft(state, model={"transformer": ours})
    assert conversion.model_type == "anima" and set(conversion) == {"transformer"}
    inject(ours, conversion, "transformer")
    torch.manual_seed(2)
    for path, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear):
            x = torch.randn(3, layer.in_features)
            with torch.no_grad():
                assert (ours.get_submodule(path)(x) - layer(x)).abs().max() <= TOL, path
    network.restore()
    written, metadata = peft_to_kohya(conversion)
    assert metadata["ss_base_model_version"] == "anima"
    assert written.keys() == state.keys() and all(torch.equal(written[k], v) for k, v in state.items())


def test_qwen3_text_encoder_file_matches_lycoris():
    encoder = tiny_qwen3()
    ours = copy.deepcopy(encoder)
    ids = torch.randint(0, 100, (2, 7))
    _, state = generic_lycoris(encoder, "lora_te_", algo="lokr", linear_dim=2, linear_alpha=1, factor=-1)
    with torch.no_grad():
        expected = encoder(ids).last_hidden_state
    conversion = kohya_to_peft(state, model_type="anima", model={"text_encoder": ours})
    inject(ours, conversion, "text_encoder")
    with torch.no_grad():
        assert (ours(ids).last_hidden_state - expected).abs().max() <= TOL
        assert (expected - tiny_qwen3()(ids).last_hidden_state).abs().max() > 1e-3


def test_real_size_anima_file_converts_without_a_model():
    """sd-scripts' Anima example (dim 32, alpha 16): 2048x2048 projections are full-full (scale 1, alpha 32 in the
    file), mlp.layer1 stays low-rank with scale 0.5."""
    state = {
        "lora_unet_blocks_0_self_attn_q_proj.lokr_w1": torch.randn(32, 32),
        "lora_unet_blocks_0_self_attn_q_proj.lokr_w2": torch.randn(64, 64),
        "lora_unet_blocks_0_self_attn_q_proj.alpha": torch.tensor(32.0),
        "lora_unet_blocks_0_mlp_layer1.lokr_w1": torch.randn(64, 32),
        "lora_unet_blocks_0_mlp_layer1.lokr_w2_a": torch.randn(128, 32),
        "lora_unet_blocks_0_mlp_layer1.lokr_w2_b": torch.randn(32, 64),
        "lora_unet_blocks_0_mlp_layer1.alpha": torch.tensor(16.0),
        "lora_te_layers_0_self_attn_q_proj.lokr_w1": torch.randn(32, 32),
        "lora_te_layers_0_self_attn_q_proj.lokr_w2": torch.randn(64, 32),
        "lora_te_layers_0_self_attn_q_proj.alpha": torch.tensor(32.0),
    }
    conversion = kohya_to_peft(state)
    transformer = conversion["transformer"]
    assert {m.path: (m.geometry.out_features, m.geometry.in_features) for m in transformer.modules} == {
        "blocks.0.self_attn.q_proj": (2048, 2048),
        "blocks.0.mlp.layer1": (8192, 2048),
    }
    layouts = {m.path: m.layout for m in transformer.modules}
    assert layouts["blocks.0.self_attn.q_proj"].both_full and not layouts["blocks.0.mlp.layer1"].both_full
    assert transformer.config.r == 32 and transformer.config.factor == -1
    assert conversion["text_encoder"].modules[0].path == "layers.0.self_attn.q_proj"


def test_real_size_anima_dit_resolves_every_sd_scripts_name():
    """Our ``AnimaDiT`` (released config, meta device) has exactly the fixture's Linear modules under their names."""
    from peft_lyco.models.anima import AnimaConfig, AnimaDiT

    with torch.device("meta"):
        dit = AnimaDiT(AnimaConfig())
    resolver = NameResolver(ANIMA, {"transformer": dit})
    assert set(resolver.layers("transformer")) == {path for path, _, _ in REAL}
    for path, out, inp in REAL:
        assert resolver.resolve("lora_unet_" + path.replace(".", "_")) == ("transformer", path)
        layer = resolver.layers("transformer")[path]
        assert (layer.out_features, layer.in_features) == (int(out), int(inp))


def test_anima_pipeline_loads_a_lycoris_file():
    """A DiT + Qwen3 file written by lycoris-lora loads into our tiny ``AnimaPipeline`` (DiT kept as ``.dit``)."""
    from peft_lyco.models.anima import build_tiny_anima

    theirs, ours = build_tiny_anima(), build_tiny_anima()
    g = torch.Generator().manual_seed(3)
    x, sigma = torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.4])
    qwen_states, t5_ids = torch.randn(1, 6, 32, generator=g), torch.randint(0, 40, (1, 5), generator=g)
    ids = torch.randint(0, 100, (1, 6), generator=g)

    @torch.no_grad()
    def run(parts):
        velocity = parts.dit(x, sigma, context=qwen_states, target_input_ids=t5_ids)
        return velocity, parts.text_encoder(ids).last_hidden_state

    base = run(theirs)
    _, dit_state = generic_lycoris(theirs.dit, "lora_unet_", algo="lokr", linear_dim=2, linear_alpha=1, factor=4)
    _, te_state = generic_lycoris(theirs.text_encoder, "lora_te_", algo="loha", linear_dim=2, linear_alpha=1)
    expected = run(theirs)
    load_lyco_weights(ours.pipeline(), {**dit_state, **te_state}, adapter_name="anima")
    got = run(ours)
    for b, e, o in zip(base, expected, got):
        assert (e - b).abs().max() > 1e-3 and (o - e).abs().max() <= TOL


@pytest.mark.parametrize("with_model", [False, True], ids=["names-only", "with-model"])
def test_dit_only_file_config_never_reaches_the_llm_adapter(with_model):
    # `blocks.0.self_attn.q_proj` is a dotted suffix of `llm_adapter.blocks.0.self_attn.q_proj`: a plain target list
    # would make get_peft_model adapt the LLM adapter too
    from peft import get_peft_model

    model = tiny_dit()
    network, state = generic_lycoris(copy.deepcopy(model), "lora_unet_", algo="lokr", linear_dim=2, linear_alpha=1)
    dit_only = {k: v for k, v in state.items() if "llm_adapter" not in k}
    conversion = kohya_to_peft(dit_only, model={"transformer": model} if with_model else None, model_type="anima")
    config = conversion["transformer"].config
    adapted = get_peft_model(copy.deepcopy(model), config)
    wrapped = {n.removeprefix("base_model.model.") for n, m in adapted.named_modules() if hasattr(m, "layouts")}
    assert wrapped == {m.path for m in conversion["transformer"].modules}
    assert not any(name.startswith("llm_adapter") for name in wrapped)
    assert isinstance(config.target_modules, str)  # a regex: the list would leak here, with or without the model
