"""End to end: train_sdxl_lokr.py on the tiny offline SDXL (loss, saved file, reload, resume, bad input)."""

import importlib.util
import json

import pytest
import torch
import train_sdxl_lokr as trainer
from lyco_train.args import UsageError
from lyco_train.data import DataError
from lyco_train.state import state_files
from lyco_train.synthetic import make_shapes_dataset
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file

from peft_lyco.convert import load_kohya, peft_to_kohya
from peft_lyco.models.tiny_sdxl import tiny_sdxl_pipeline
from tests.training_scripts.sdxl_outputs import base_outputs, fresh_pipeline_with, outputs, unet_inputs


def run(tmp_path, *extra, images=4, name="run"):
    data = tmp_path / "data"
    if not data.exists():
        make_shapes_dataset(data, count=images, size=64, repeats=1)
    return trainer.main(
        ["--train_data_dir", str(data), "--output_dir", str(tmp_path / name), "--sample_every_n_steps", "1000", *extra]
    )


def test_loss_finite_and_decreasing_on_a_fixed_batch(tmp_path, monkeypatch):
    """One image, fixed noise and timestep: every step sees the same batch, so the loss must go down."""
    monkeypatch.setattr(
        trainer,
        "sample_noise",
        lambda latents, generators, offset=0.0: torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)),
    )
    monkeypatch.setattr(trainer, "sample_timesteps", lambda n, generators, device: torch.full((len(generators),), 400))
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
    assert losses[-1] < 0.95 * losses[0]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_saved_file_reloads_exactly_via_converter_lycoris_and_peft(tmp_path):
    result = run(
        tmp_path,
        "--max_train_steps",
        "4",
        "--learning_rate",
        "2e-2",
        "--save_peft_adapter",
        "--network_args",
        "conv_dim=2",
        "conv_alpha=1",
    )
    pipe = result.pipe
    trained = outputs(pipe)
    assert all((t - b).abs().max() > 1e-4 for t, b in zip(trained, base_outputs()))  # every component learned something

    # metadata as sd-scripts writes it
    with safe_open(result.final, "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_steps"] == "4"
    assert (
        metadata["ss_network_module"] == "networks.lokr" and json.loads(metadata["ss_network_args"])["conv_dim"] == "2"
    )
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    state_dict, metadata = load_kohya(result.final)
    assert any(k.startswith("lora_unet_input_blocks_") for k in state_dict)  # SGM names, as sd-scripts writes
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in state_dict)

    # 1. our converter: file -> PEFT configs + state dicts -> a fresh pipeline
    fresh, conversion = fresh_pipeline_with(state_dict, metadata)
    for got, want in zip(outputs(fresh), trained):
        assert (got - want).abs().max() <= 1e-5

    # 2. lycoris-lora's own modules on the same tensors (its generic loader names modules "lycoris_" + module path)
    from lycoris.wrapper import create_lycoris_from_weights

    lyco_sd, _ = peft_to_kohya(conversion, model_type="sdxl", naming="diffusers")
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_text_model_", "text_encoder_2": "lora_te2_"}
    other = tiny_sdxl_pipeline(seed=0)
    for component, prefix in prefixes.items():
        part = {"lycoris_" + k.removeprefix(prefix): v for k, v in lyco_sd.items() if k.startswith(prefix)}
        network, _ = create_lycoris_from_weights(1.0, None, getattr(other, component), weights_sd=part)
        assert len(network.loras) == len({k.split(".")[0] for k in part}) > 0
        network.apply_to()
    for got, want in zip(outputs(other), trained):
        assert (got - want).abs().max() <= 1e-5

    # 3. the PEFT adapter folder loads with PeftModel.from_pretrained
    peft_unet = PeftModel.from_pretrained(
        tiny_sdxl_pipeline(seed=0).unet, str(result.final.with_name(result.args.output_name + "_peft") / "unet")
    )
    with torch.no_grad():
        assert (peft_unet(**unet_inputs()).sample - trained[0]).abs().max() <= 1e-6


def test_resume_continues_from_the_exact_step(tmp_path):
    common = [
        "--max_train_steps",
        "4",
        "--save_every_n_steps",
        "2",
        "--save_state",
        "--flip_aug",
        "--caption_dropout_rate",
        "0.4",
        "--learning_rate",
        "1e-2",
        "--lr_scheduler",
        "cosine",
        "--seed",
        "5",
    ]
    straight = run(tmp_path, *common, name="straight")
    state = tmp_path / "straight" / "tiny_sdxl_lokr-step00000002-state"
    resumed = run(tmp_path, *common, "--resume", str(state), name="resumed")
    assert resumed.losses == straight.losses[2:]
    for file in ("adapter", "optimizer"):
        a, b = (
            load_file(state_files(tmp_path / "straight" / "tiny_sdxl_lokr-state")[file]),
            load_file(state_files(tmp_path / "resumed" / "tiny_sdxl_lokr-state")[file]),
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = json.loads((tmp_path / "resumed" / "tiny_sdxl_lokr-state" / "training_state.json").read_text())
    assert saved["position"]["step"] == 4 and saved["scheduler"]["last_epoch"] == 4
    assert any(k.endswith("exp_avg_sq") for k in load_file(state_files(state)["optimizer"]))
    with pytest.raises(ValueError, match="network_dim: saved 2, now 3"):
        run(tmp_path, *common, "--resume", str(state), "--network_dim", "3", name="changed")


def test_options_smoke_uncached_pixels_v_prediction_min_snr_accumulation_text_cache(tmp_path):
    result = run(
        tmp_path,
        "--max_train_steps",
        "2",
        "--random_crop",
        "--flip_aug",
        "--v_parameterization",
        "--min_snr_gamma",
        "5",
        "--noise_offset",
        "0.05",
        "--gradient_accumulation_steps",
        "2",
        "--gradient_checkpointing",
        "--network_train_unet_only",
        "--cache_text_encoder_outputs_to_disk",
        "--cache_dir",
        str(tmp_path / "cache"),
        "--caption_dropout_rate",
        "0.5",
        "--save_precision",
        "fp16",
        "--algo",
        "loha",
        "--lr_scheduler",
        "linear",
        "--lr_warmup_steps",
        "0.5",
    )
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    state_dict, metadata = load_kohya(result.final)
    assert {v.dtype for v in state_dict.values()} == {torch.float16}
    assert all(k.startswith("lora_unet_") for k in state_dict) and any(".hada_w1_a" in k for k in state_dict)
    assert metadata["ss_network_module"] == "networks.loha" and metadata["ss_v_parameterization"] == "True"
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 5  # 4 captions + the empty one


def dataset(folder, *, captions=True, corrupt=False):
    make_shapes_dataset(folder, count=2, size=64, repeats=1)
    if not captions:
        next(folder.rglob("*.txt")).unlink()
    if corrupt:
        (folder / "broken.png").write_bytes(b"\x89PNG garbage")
        (folder / "broken.txt").write_text("broken")


NO_BNB = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
NO_TENSORBOARD = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard installed")
BAD_INPUTS = [
    pytest.param(lambda d: None, [], DataError, "no images found", id="empty-folder"),
    pytest.param(
        lambda d: dataset(d, captions=False), [], DataError, "1 image.s. have no caption file", id="no-caption"
    ),
    pytest.param(lambda d: dataset(d, corrupt=True), [], DataError, "broken.png", id="corrupt-image"),
    pytest.param(dataset, ["--network_args", "conv_dimm=4"], UsageError, "conv_dimm", id="unknown-network-arg"),
    pytest.param(dataset, ["--resolution", "1001"], UsageError, "not divisible by 8", id="resolution"),
    pytest.param(
        dataset, ["--optimizer_type", "AdamW8bit"], UsageError, "pip install bitsandbytes", id="adamw8bit", marks=NO_BNB
    ),
    pytest.param(
        dataset,
        ["--logging_dir", "logs"],
        UsageError,
        "pip install tensorboard",
        id="tensorboard",
        marks=NO_TENSORBOARD,
    ),
    pytest.param(dataset, ["--cache_text_encoder_outputs"], UsageError, "--network_train_unet_only", id="te-cache"),
    pytest.param(dataset, ["--cache_latents", "--random_crop"], UsageError, "--random_crop", id="crop-with-cache"),
]


@pytest.mark.parametrize("setup, argv, error, message", BAD_INPUTS)
def test_bad_input_fails_before_any_model_loads(tmp_path, monkeypatch, setup, argv, error, message):
    data = tmp_path / "data"
    data.mkdir()
    setup(data)
    monkeypatch.setattr(trainer, "load_pipeline", lambda args: pytest.fail("model loaded before the input was checked"))
    with pytest.raises(error, match=message):
        trainer.main(["--train_data_dir", str(data), "--output_dir", str(tmp_path / "out"), *argv])
