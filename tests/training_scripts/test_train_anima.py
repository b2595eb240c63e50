"""End to end: train_anima_lokr.py on the tiny Anima (loss, saved file, reload, resume, bad input)."""

import json

import pytest
import torch
import train_anima_lokr as trainer
from lyco_train.args import UsageError
from lyco_train.data import DataError
from lyco_train.state import state_files
from lyco_train.synthetic import make_shapes_dataset
from peft import inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file

from peft_lyco.convert import kohya_to_peft, load_kohya
from peft_lyco.models.anima import build_tiny_anima, encode_prompt


def run(tmp_path, *extra, images=4, name="run"):
    data = tmp_path / "data"
    if not data.exists():
        make_shapes_dataset(data, count=images, size=64, repeats=1)
    return trainer.main(
        ["--train_data_dir", str(data), "--output_dir", str(tmp_path / name), "--sample_every_n_steps", "1000", *extra]
    )


def outputs(components):
    """DiT velocity on fixed latents with the text path run end to end (Qwen3 -> LLM adapter -> DiT)."""
    g = torch.Generator().manual_seed(0)
    embeds = encode_prompt(
        ["a red circle", "a blue square on black"],
        components.text_encoder,
        components.tokenizer,
        components.t5_tokenizer,
        max_length=components.max_length,
        t5_max_length=components.t5_max_length,
    )
    with torch.no_grad():
        return components.dit(
            torch.randn(2, 16, 8, 6, generator=g),
            torch.tensor([0.2, 0.9]),
            embeds.prompt_embeds,
            target_input_ids=embeds.t5_input_ids,
            target_attention_mask=embeds.t5_attention_mask,
            source_attention_mask=embeds.attention_mask,
        )


def test_loss_finite_and_decreasing_on_a_fixed_batch(tmp_path, monkeypatch):
    """One image, fixed noise and σ: every step sees the same batch, so the loss must go down."""
    monkeypatch.setattr(
        trainer,
        "sample_noise",
        lambda latents, generators, offset=0.0: torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)),
    )
    monkeypatch.setattr(
        trainer, "sample_sigmas", lambda mode, generators, device, **kw: torch.full((len(generators),), 0.5)
    )
    result = run(
        tmp_path,
        "--max_train_steps",
        "30",
        "--train_batch_size",
        "1",
        "--save_every_n_steps",
        "1000",
        "--learning_rate",
        "1e-2",
        images=1,
    )
    losses = result.losses
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_saved_file_reloads_exactly_via_converter_and_lycoris(tmp_path):
    result = run(
        tmp_path,
        "--max_train_steps",
        "4",
        "--learning_rate",
        "2e-2",
        "--no-network_train_unet_only",
        "--no-cache_text_encoder_outputs",
    )
    trained, base = outputs(result.components), outputs(build_tiny_anima(seed=0))
    assert (trained - base).abs().max() > 1e-4
    state_dict, metadata = load_kohya(result.final)
    names = {key.split(".")[0] for key in state_dict}
    assert {
        "lora_unet_blocks_0_self_attn_q_proj",
        "lora_unet_blocks_1_mlp_layer2",
        "lora_unet_llm_adapter_blocks_0_cross_attn_o_proj",
        "lora_te_layers_1_mlp_down_proj",
    } <= names
    assert not any("modulation" in n or "embedder" in n or "final_layer" in n for n in names)
    assert metadata["ss_base_model_version"] == "anima" and metadata["ss_timestep_sampling"] == "sigmoid"
    assert metadata["modelspec.architecture"] == "anima-preview/lora"

    # 1. our converter -> a fresh tiny Anima
    fresh = build_tiny_anima(seed=0)
    conversion = kohya_to_peft(state_dict, metadata=metadata, model_type="anima")
    assert set(conversion) == {"transformer", "text_encoder"}
    for component, model in (("transformer", fresh.dit), ("text_encoder", fresh.text_encoder)):
        adapter = conversion[component]
        inject_adapter_in_model(adapter.config, model, adapter_name="loaded", state_dict=adapter.state_dict)
        set_peft_model_state_dict(model, adapter.state_dict, adapter_name="loaded")
    assert (outputs(fresh) - trained).abs().max() <= 1e-5

    # 2. lycoris-lora's kohya loader reads the file as it is (sd-scripts' Anima names are module paths)
    from lycoris.kohya import create_network_from_weights

    other = build_tiny_anima(seed=0)
    network, _ = create_network_from_weights(1.0, str(result.final), None, other.text_encoder, other.dit)
    assert len(network.unet_loras) + len(network.text_encoder_loras) == len(names)
    network.apply_to(other.text_encoder, other.dit, True, True)
    assert (outputs(other) - trained).abs().max() <= 1e-5


def test_resume_continues_from_the_exact_step(tmp_path):
    common = [
        "--max_train_steps",
        "6",
        "--save_every_n_steps",
        "3",
        "--save_state",
        "--flip_aug",
        "--caption_dropout_rate",
        "0.4",
        "--learning_rate",
        "1e-2",
        "--gradient_accumulation_steps",
        "2",
        "--timestep_sampling",
        "shift",
        "--discrete_flow_shift",
        "3",
        "--seed",
        "7",
    ]
    straight = run(tmp_path, *common, name="straight")
    state = tmp_path / "straight" / "tiny_anima_lokr-step00000003-state"
    resumed = run(tmp_path, *common, "--resume", str(state), name="resumed")
    assert resumed.losses == straight.losses[3:]
    for file in ("adapter", "optimizer"):
        a = load_file(state_files(tmp_path / "straight" / "tiny_anima_lokr-state")[file])
        b = load_file(state_files(tmp_path / "resumed" / "tiny_anima_lokr-state")[file])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    position = json.loads((state / "training_state.json").read_text())["position"]
    # 3 batches per epoch (two 64x64 batches, one landscape), accumulation 2: steps end at batches 2, 3 (epoch end), 5
    assert position == {"step": 3, "epoch": 1, "batch": 2}


def test_options_smoke_disk_caches_uniform_sigmas_loha(tmp_path):
    result = run(
        tmp_path,
        "--max_train_steps",
        "2",
        "--flip_aug",
        "--cache_latents_to_disk",
        "--cache_text_encoder_outputs_to_disk",
        "--cache_dir",
        str(tmp_path / "cache"),
        "--timestep_sampling",
        "uniform",
        "--algo",
        "loha",
        "--gradient_checkpointing",
        "--network_args",
        "train_llm_adapter=False",
        "--save_precision",
        "bf16",
        "--mixed_precision",
        "bf16",
    )
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    state_dict, _ = load_kohya(result.final)
    assert {v.dtype for v in state_dict.values()} == {torch.bfloat16}
    assert not any("llm_adapter" in k for k in state_dict) and any(".hada_w1_a" in k for k in state_dict)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4 * 2 + 5  # latents x flips + captions + ""


def dataset(folder):
    make_shapes_dataset(folder, count=2, size=64, repeats=1)


@pytest.mark.parametrize(
    "setup, argv, error, message",
    [
        pytest.param(lambda d: None, [], DataError, "no images found", id="empty-folder"),
        pytest.param(dataset, ["--resolution", "1000"], UsageError, "not divisible by 16", id="resolution"),
        pytest.param(
            dataset,
            ["--network_args", "train_llm_adaptor=True"],
            UsageError,
            "train_llm_adaptor",
            id="unknown-network-arg",
        ),
        pytest.param(
            dataset,
            ["--pretrained_model_name_or_path", "dit.safetensors"],
            UsageError,
            "--qwen3, --vae required",
            id="missing-model-files",
        ),
    ],
)
def test_bad_input_fails_before_any_model_loads(tmp_path, monkeypatch, setup, argv, error, message):
    data = tmp_path / "data"
    data.mkdir()
    setup(data)
    monkeypatch.setattr(trainer, "load_models", lambda *a: pytest.fail("model loaded before the input was checked"))
    with pytest.raises(error, match=message):
        trainer.main(["--train_data_dir", str(data), "--output_dir", str(tmp_path / "out"), *argv])
