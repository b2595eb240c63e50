"""Validation loss (fixed noise and timesteps on the held-out share) and regularisation weights, in both trainers:
the logged values are recomputed independently from the trained models."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import train_anima_lokr as anima_trainer
import train_sdxl_lokr as sdxl_trainer
from accelerate import Accelerator
from lyco_train.batches import Sample
from lyco_train.buckets import fit_geometry, fit_image
from lyco_train.state import state_files
from lyco_train.synthetic import make_shapes_dataset
from lyco_train.validation import VALIDATION_POINTS, FixedDraw, Validator, validation_noise_seed
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file


def test_validator_averages_fixed_draws_and_leaves_training_state_alone():
    model = torch.nn.Linear(3, 1)
    model.train()
    batches = [[Sample(i, False, None, False)] for i in range(3)]
    seen = []

    def loss(batch, draw: FixedDraw):
        (generator,) = draw.generators
        noise = torch.randn(2, generator=generator)
        seen.append((batch["index"], draw.fraction, noise))
        assert not model.training and not torch.is_grad_enabled()
        return ((noise.sum() + batch["index"]) * draw.fraction)[None]  # one sample's loss

    validator = Validator(
        batches, lambda s: {"index": s[0].record}, loss, seed=11, accelerator=Accelerator(cpu=True), max_steps=2
    )
    rng_before = torch.get_rng_state()
    value = validator([model])
    assert torch.equal(torch.get_rng_state(), rng_before) and model.training
    expected = []
    for b in range(2):  # max_steps=2: the third batch is left out
        for k, fraction in enumerate(VALIDATION_POINTS):
            noise = torch.randn(2, generator=torch.Generator().manual_seed(validation_noise_seed(11, b, k, 0)))
            expected.append(float((noise.sum() + b) * fraction))
    assert len(seen) == 8 and math.isclose(value, sum(expected) / 8, rel_tol=1e-6)
    assert validator([model]) == value  # the same noise every time
    pair = FixedDraw([torch.Generator(), torch.Generator()], 0.4)
    assert pair.timesteps(1000, torch.device("cpu")).tolist() == [400, 400]
    assert pair.sigmas(torch.device("cpu")).tolist() == pytest.approx([0.4, 0.4])


def _config(tmp_path: Path, extra: str = "") -> Path:
    """4 captioned shapes (a quarter held out) and 2 regularisation images with class tokens only."""
    make_shapes_dataset(tmp_path / "train", count=4, size=64, repeats=1)
    make_shapes_dataset(tmp_path / "reg", count=2, size=64, repeats=1, seed=5)
    for caption in (tmp_path / "reg").rglob("*.txt"):
        caption.unlink()
    config = tmp_path / "data.toml"
    config.write_text(
        f"""
[general]
resolution = 64
batch_size = 2
enable_bucket = false
caption_extension = ".txt"
validation_split = 0.25

[[datasets]]
  [[datasets.subsets]]
  image_dir = "{tmp_path / "train" / "1_shapes"}"
  {extra}

  [[datasets.subsets]]
  image_dir = "{tmp_path / "reg" / "1_shapes"}"
  is_reg = true
  class_tokens = "a shape"
""",
        encoding="utf-8",
    )
    return config


def _record_losses(monkeypatch, module):
    """Wrap the trainer's per-sample loss: keep (per-sample squared error, weights, result) of every training call."""
    calls = []
    original = module.per_sample_loss

    def recording(prediction, target, weights=None, **kwargs):
        result = original(prediction, target, weights, **kwargs)
        if torch.is_grad_enabled():
            per_sample = (prediction.double() - target.double()).pow(2).flatten(1).mean(dim=1)
            calls.append((per_sample.detach(), weights.detach().double(), result.detach().double()))
        return result

    monkeypatch.setattr(module, "per_sample_loss", recording)
    return calls


def _check_weights(calls, prior_loss_weight: float, reg_per_epoch: int, epochs: int) -> None:
    weights = torch.cat([w for _, w, _ in calls])
    assert set(weights.tolist()) == {1.0, prior_loss_weight}
    assert int((weights == prior_loss_weight).sum()) == reg_per_epoch * epochs
    for per_sample, w, result in calls:  # loss_i = w_i * mse_i (the runner then averages over the batch)
        assert torch.allclose(result, w * per_sample, rtol=1e-6, atol=0)


def _pixels(record, bucket=(64, 64)) -> torch.Tensor:
    geometry = fit_geometry(record.size, bucket, crop_offset=None, flip=False)
    with Image.open(record.path) as image:
        return fit_image(image, geometry, flip=False)[None], geometry


def test_sdxl_validation_loss_and_prior_loss_weight(tmp_path, monkeypatch):
    calls = _record_losses(monkeypatch, sdxl_trainer)
    logged = []
    monkeypatch.setattr(
        Accelerator, "log", lambda self, values, step=None, log_kwargs=None: logged.append((step, values))
    )
    config = _config(tmp_path, extra="shuffle_caption = true\n  keep_tokens = 1")
    result = sdxl_trainer.main(
        ["--dataset_config", str(config), "--output_dir", str(tmp_path / "out"), "--max_train_epochs", "1",
         "--prior_loss_weight", "0.25", "--validate_every_n_steps", "1", "--validation_seed", "9",
         "--network_train_unet_only", "--sample_every_n_steps", "1000", "--save_every_n_steps", "1000"]
    )  # fmt: skip
    data = result.data
    assert len(data.validation_records) == 1 and len(data.records) == 5  # 3 training + 2 regularisation images
    assert [r.repeats for r in data.records if r.subset.is_reg] == [2, 1]  # balanced to the 3 training images
    _check_weights(calls, 0.25, reg_per_epoch=3, epochs=1)
    assert [(step, kind) for step, kind, _ in result.validation] == [
        (1, "step"),
        (2, "step"),
        (3, "step"),
        (3, "epoch"),
    ]
    assert result.validation[2][2] == result.validation[3][2]  # same adapter, same noise: same value
    assert len({value for _, _, value in result.validation[:3]}) == 3  # the adapter changed in between
    with safe_open(result.final, "pt") as handle:
        metadata = handle.metadata()
    assert (metadata["ss_num_train_images"], metadata["ss_num_reg_images"]) == ("3", "3")
    assert (metadata["ss_prior_loss_weight"], metadata["ss_validation_split"]) == ("0.25", "0.25")  # split from TOML
    tracked = [(step, kind, values[f"loss/validation/{kind}_average"]) for step, values in logged
               for kind in ("step", "epoch") if f"loss/validation/{kind}_average" in values]  # fmt: skip
    assert tracked == result.validation  # what the trackers get
    train_losses = [values["loss"] for _, values in logged if "loss" in values]
    divergence = next(
        v["loss/validation/epoch_divergence"]
        for step, v in logged
        if step == 3 and "loss/validation/epoch_divergence" in v
    )
    assert divergence == pytest.approx(result.validation[-1][2] - sum(train_losses[0:3]) / 3)

    # independent recomputation with the trained pipeline: same noise (seed 9), timesteps 200/400/600/800
    pipe = result.pipe
    (record,) = data.validation_records
    pixels, geometry = _pixels(record)
    scheduler = pipe.scheduler
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
        text = sdxl_trainer.encode_captions(pipe, [record.caption], (pipe.text_encoder, pipe.text_encoder_2))
        time_ids = torch.tensor([[*geometry.original_size, *geometry.crop_top_left, 64, 64]], dtype=torch.float32)
        losses = []
        for k, timestep in enumerate((200, 400, 600, 800)):
            generator = torch.Generator().manual_seed(validation_noise_seed(9, 0, k, 0))
            noise = torch.randn(latents.shape[1:], generator=generator)[None]
            alpha = scheduler.alphas_cumprod[timestep].double()
            noisy = (alpha.sqrt() * latents.double() + (1 - alpha).sqrt() * noise.double()).float()
            prediction = pipe.unet(
                noisy, torch.tensor([timestep]), text["prompt_embeds"],
                added_cond_kwargs={"text_embeds": text["pooled"], "time_ids": time_ids},
            ).sample  # fmt: skip
            losses.append(float((prediction.double() - noise.double()).pow(2).mean()))
    assert math.isclose(result.validation[-1][2], float(np.mean(losses)), rel_tol=1e-5)


def test_anima_validation_loss_and_prior_loss_weight(tmp_path, monkeypatch):
    calls = _record_losses(monkeypatch, anima_trainer)
    config = _config(tmp_path)
    result = anima_trainer.main(
        ["--dataset_config", str(config), "--output_dir", str(tmp_path / "out"), "--max_train_epochs", "2",
         "--prior_loss_weight", "3", "--sample_every_n_steps", "1000", "--save_every_n_steps", "1000"]
    )  # fmt: skip
    _check_weights(calls, 3.0, reg_per_epoch=3, epochs=2)
    assert [(step, kind) for step, kind, _ in result.validation] == [(3, "epoch"), (6, "epoch")]

    models = result.components
    (record,) = result.data.validation_records
    pixels, _ = _pixels(record)
    seed = result.args.seed  # no --validation_seed: the noise comes from --seed
    with torch.no_grad():
        latents = anima_trainer.encode_images(models.vae, pixels).float()
        text = anima_trainer.encode_captions(models, [record.caption], models.text_encoder)
        losses = []
        for k, sigma in enumerate((0.2, 0.4, 0.6, 0.8)):
            generator = torch.Generator().manual_seed(validation_noise_seed(seed, 0, k, 0))
            noise = torch.randn(latents.shape[1:], generator=generator)[None]
            prediction = models.dit(
                (1 - sigma) * latents + sigma * noise, torch.tensor([sigma]), text["prompt_embeds"],
                target_input_ids=text["t5_input_ids"], target_attention_mask=text["t5_attention_mask"],
                source_attention_mask=text["attention_mask"],
            )  # fmt: skip
            losses.append(float((prediction.double() - (noise - latents).double()).pow(2).mean()))
    assert math.isclose(result.validation[-1][2], float(np.mean(losses)), rel_tol=1e-5)


@pytest.mark.slow
def test_anima_resume_is_exact_with_shuffled_thinned_captions_colour_changes_and_validation(tmp_path):
    """Captions, colour changes and validation noise all come from the seed: a resumed run repeats the straight one.
    (Fast coverage: the epoch plan's captions and colours are pure in (seed, epoch) in test_captions/test_data, and
    the validator leaves the training random state alone in test_validator_….)"""
    config = _config(tmp_path, extra="shuffle_caption = true\n  caption_tag_dropout_rate = 0.3\n  color_aug = true")
    common = [
        "--dataset_config", str(config), "--max_train_epochs", "2", "--save_every_n_steps", "2", "--save_state",
        "--no-cache_text_encoder_outputs", "--no-cache_latents", "--validate_every_n_steps", "1",
        "--learning_rate", "1e-2", "--seed", "3", "--sample_every_n_steps", "1000",
    ]  # fmt: skip
    straight = anima_trainer.main([*common, "--output_dir", str(tmp_path / "straight")])
    state = tmp_path / "straight" / "tiny_anima_lokr-step00000002-state"
    resumed = anima_trainer.main([*common, "--output_dir", str(tmp_path / "resumed"), "--resume", str(state)])
    assert resumed.losses == straight.losses[2:]
    assert resumed.validation == [entry for entry in straight.validation if entry[0] > 2]
    a, b = (
        load_file(state_files(tmp_path / run / "tiny_anima_lokr-state")["adapter"]) for run in ("straight", "resumed")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
