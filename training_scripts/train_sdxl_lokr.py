"""Train a LoKr (or LoHa) adapter for Stable Diffusion XL on a folder of captioned images.

    accelerate launch training_scripts/train_sdxl_lokr.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --train_data_dir data/my_style --resolution 1024 --enable_bucket \\
        --network_dim 16 --network_alpha 8 --network_args factor=8 --learning_rate 1e-4 \\
        --mixed_precision bf16 --cache_latents --output_dir outputs --output_name my_style

Options follow kohya sd-scripts' ``sdxl_train_network.py``; the result is a kohya-format ``.safetensors`` that
ComfyUI, A1111, sd-scripts and ``pipe.load_lora_weights`` (after ``peft_lyco.diffusers.enable_lyco(pipe)``) load.
With no ``--pretrained_model_name_or_path`` the script builds a tiny random SDXL, trains it on generated coloured
shapes on CPU, reloads the saved file into a fresh pipeline and checks that the adapter changes the output.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from lyco_train import args as options
from lyco_train.batches import BatchBuilder, TrainingData
from lyco_train.cache import build_latent_cache, build_text_cache
from lyco_train.data import DataError
from lyco_train.export import AdapterWriter
from lyco_train.long_prompts import MAX_TOKEN_LENGTHS, chunked_token_ids, join_chunk_states
from lyco_train.loop import place_frozen, prepare_training
from lyco_train.memory import apply_memory_options, store_weights_in_fp8
from lyco_train.network_weights import NetworkWeightsError, add_network
from lyco_train.objectives import (
    ddpm_noise_to_signal,
    ddpm_target,
    huber_thresholds,
    input_perturbation,
    min_snr_weights,
    multires_noise,
    per_sample_loss,
    sample_generators,
    sample_noise,
    sample_timesteps,
    sdxl_time_ids,
)
from lyco_train.runner import Hooks, Trainer
from lyco_train.sampling import SamplePrompt, render_samples
from lyco_train.sharded import whole_model
from lyco_train.startup import start_run
from lyco_train.state import StateError
from lyco_train.tiny import TINY_SEED, report_reload, tiny_defaults
from lyco_train.validation import FixedDraw, make_validator

import peft_lyco  # noqa: F401  (registers LYCO_LOHA / LYCO_LOKR with PEFT)

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass
class Result:
    """What a run produced (the tests and the embedded default look at it)."""

    args: argparse.Namespace
    pipe: StableDiffusionXLPipeline
    losses: list[float]
    files: list[Path]
    final: Path
    validation: list[tuple[int, str, float]]
    data: TrainingData


# ---------------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        help="hub id, diffusers folder or single .safetensors checkpoint (none: tiny CPU demo)",
    )
    model.add_argument("--vae", help="another VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix")
    model.add_argument("--revision")
    model.add_argument("--variant", help="e.g. fp16")
    model.add_argument("--v_parameterization", action="store_true", help="train v-prediction instead of epsilon")
    model.add_argument("--min_snr_gamma", type=float, help="Min-SNR-γ loss weighting, e.g. 5")
    model.add_argument(
        "--clip_skip", type=int, help="use the text encoders' hidden state -N (default 2: SDXL's penultimate layer)"
    )
    model.add_argument(
        "--max_token_length", type=int, choices=MAX_TOKEN_LENGTHS, help="caption tokens: 75 (default), 150 or 225"
    )
    options.add_data_args(parser)
    options.add_network_args(parser, default_name="sdxl_lokr")
    options.add_optimization_args(parser)
    options.add_output_args(parser)
    options.add_continuation_args(parser)
    options.add_loss_args(parser, ddpm=True)
    return options.parse_training_args(
        parser,
        argv,
        tiny_defaults=tiny_defaults("sdxl"),
        pixel_multiple=8,
        required_with_model=("train_data_dir",),
        files_or_hub_ids=("pretrained_model_name_or_path", "vae"),
    )


# ------------------------------------------------------------------------------------------------------ models
def load_pipeline(args: argparse.Namespace) -> StableDiffusionXLPipeline:
    """The SDXL pipeline to train on: the tiny random one, a single-file checkpoint, or a diffusers folder/hub id."""
    name = args.pretrained_model_name_or_path
    if name is None:
        from peft_lyco.models.tiny_sdxl import tiny_sdxl_pipeline

        return tiny_sdxl_pipeline(seed=TINY_SEED)
    if name.endswith(".safetensors"):
        pipe = StableDiffusionXLPipeline.from_single_file(name, torch_dtype=torch.float32)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(
            name, revision=args.revision, variant=args.variant, torch_dtype=torch.float32
        )
    if args.vae:
        from diffusers import AutoencoderKL

        pipe.vae = AutoencoderKL.from_pretrained(args.vae, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_captions(
    pipe: StableDiffusionXLPipeline,
    captions: list[str],
    encoders: tuple,
    *,
    clip_skip: int = 2,
    max_token_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """SDXL conditioning as sd-scripts builds it: both encoders' hidden states ``-clip_skip`` (2: the penultimate
    layer SDXL uses), over ``max_token_length / 75`` chunks of 75 tokens, and TE2's pooled output of the first chunk.

    ``encoders`` are the two text encoders to call (the accelerate-prepared ones when they are trained).
    """
    states = []
    for tokenizer, encoder in zip((pipe.tokenizer, pipe.tokenizer_2), encoders):
        ids = chunked_token_ids(tokenizer, captions, max_token_length).to(pipe.unet.device)
        batch, chunks, length = ids.shape
        output = encoder(ids.reshape(batch * chunks, length), output_hidden_states=True)
        states.append(join_chunk_states(output.hidden_states[-clip_skip], chunks))
    pooled = output.text_embeds.reshape(batch, chunks, -1)[:, 0]
    return {"prompt_embeds": torch.cat(states, dim=-1), "pooled": pooled}


def encode_images(vae, pixels: torch.Tensor) -> torch.Tensor:
    """VAE latents (distribution mean, times the scaling factor); the VAE always runs in float32."""
    with torch.no_grad():
        latents = vae.encode(pixels.to(vae.device, torch.float32)).latent_dist.mode()
    return latents * vae.config.scaling_factor


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from latents, decoded by the float32 VAE outside any autocast (SDXL's VAE overflows in
    fp16; the pipeline itself would hand fp16 latents to the float32 VAE under fp16 mixed precision)."""
    with torch.autocast(latents.device.type, enabled=False), torch.no_grad():
        return vae.decode(latents.to(vae.device, torch.float32) / vae.config.scaling_factor).sample


def generate(pipe: StableDiffusionXLPipeline, prompt: str, output_type: str = "pil", **kwargs):
    """``pipe(prompt, ...)`` that works in every precision the trainer runs: the denoising loop in the caller's
    autocast, the decode in float32."""
    latents = pipe(prompt, output_type="latent", **kwargs).images
    return pipe.image_processor.postprocess(decode_latents(pipe.vae, latents), output_type=output_type)


def check_reload(
    args: argparse.Namespace, path: Path, trained: StableDiffusionXLPipeline, prompt: str, autocast
) -> None:
    """The embedded default's last step: load the saved file into a fresh tiny pipeline as a user would
    (``enable_lyco`` + ``load_lora_weights``) and compare its images with the base and the in-memory model (rendered
    under the run's ``autocast``: its frozen weights are in the mixed-precision dtype)."""
    from peft_lyco.diffusers import enable_lyco
    from peft_lyco.models.tiny_sdxl import tiny_sdxl_pipeline

    fresh = tiny_sdxl_pipeline(seed=TINY_SEED)
    enable_lyco(fresh)
    fresh.load_lora_weights(str(path), adapter_name="trained")
    if args.fp8_base:  # the same rounded base as the trained model, so the comparison sees the adapter only
        for model in (fresh.unet, fresh.text_encoder, fresh.text_encoder_2):
            store_weights_in_fp8(model.requires_grad_(False), torch.float32)

    def render(pipe: StableDiffusionXLPipeline):
        return generate(
            pipe,
            prompt,
            output_type="np",
            width=64,
            height=64,
            num_inference_steps=4,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(0),
        )

    reloaded = render(fresh)
    fresh.disable_lora()
    base = render(fresh)
    with autocast:
        in_memory = render(trained)
    report_reload(
        path,
        reloaded,
        base,
        in_memory,
        "enable_lyco(pipe) + pipe.load_lora_weights",
        tolerance=1e-4 if args.save_precision == "float" and args.mixed_precision == "no" else 5e-2,
    )


# -------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> Result:
    args = parse_args(argv)
    start = start_run(
        args,
        family="sdxl",
        tiny_model="SDXL",
        denoiser="unet",
        text_encoders=TEXT_ENCODERS,
        unused_parameters=not args.network_train_unet_only,
    )
    accelerator, data, run, tiny = start.accelerator, start.data, start.run, start.tiny
    records, buckets = data.records, data.buckets
    pipe = load_pipeline(args)
    device = accelerator.device
    dtype = place_frozen(accelerator, pipe.vae, (pipe.unet, pipe.text_encoder, pipe.text_encoder_2))
    noise_scheduler = DDPMScheduler.from_config(
        pipe.scheduler.config, prediction_type="v_prediction" if args.v_parameterization else "epsilon"
    )

    # the adapter: the UNet unless --network_train_text_encoder_only, both text encoders unless
    # --network_train_unet_only; --network_weights starts it from a file
    components = {"unet": pipe.unet, **{name: getattr(pipe, name) for name in TEXT_ENCODERS}}
    trained = {
        name: model
        for name, model in components.items()
        if not (args.network_train_unet_only if name in TEXT_ENCODERS else args.network_train_text_encoder_only)
    }
    trained = add_network(args, "sdxl", components, trained, log=accelerator.print)
    if args.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        for name in TEXT_ENCODERS:
            if name in trained:
                trained[name].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    apply_memory_options(args, (pipe.unet, pipe.text_encoder, pipe.text_encoder_2), trained, pipe.unet, dtype)

    text_options = {"clip_skip": args.clip_skip or 2, "max_token_length": args.max_token_length}
    if args.clip_skip is not None:
        layers = min(pipe.text_encoder.config.num_hidden_layers, pipe.text_encoder_2.config.num_hidden_layers)
        if args.clip_skip > layers:
            raise options.UsageError(f"--clip_skip {args.clip_skip}: the text encoders have {layers} layers")

    # caches of frozen outputs, filled once before training
    latent_cache = build_latent_cache(
        args, accelerator, data.all_records, buckets + data.validation_buckets, tag=f"sdxl:{run.model_name}:{args.vae}",
        encode=lambda pixels: encode_images(pipe.vae, pixels),
    )  # fmt: skip
    text_cache = build_text_cache(
        args, accelerator, data.all_records, tag=f"sdxl:{run.model_name}:{args.clip_skip}:{args.max_token_length}",
        encode=lambda captions: encode_captions(pipe, captions, (pipe.text_encoder, pipe.text_encoder_2), **text_options),
    )  # fmt: skip

    training = prepare_training(args, accelerator, records, buckets, trained)
    models = training.models

    def loss(batch: dict, draw: FixedDraw | None = None) -> torch.Tensor:
        if "latents" in batch:
            latents = batch["latents"].to(device, torch.float32)
        else:
            latents = encode_images(pipe.vae, batch["pixels"])
        if text_cache:
            text = text_cache.get(batch["captions"])
        else:
            encoders = tuple(models.get(name, getattr(pipe, name)) for name in TEXT_ENCODERS)
            text = encode_captions(pipe, batch["captions"], encoders, **text_options)
        num_timesteps = noise_scheduler.config.num_train_timesteps
        generators = draw.generators if draw else sample_generators(batch["noise_seeds"])
        noise = sample_noise(latents, generators, args.noise_offset)
        if draw:
            timesteps = draw.timesteps(num_timesteps, device)
        else:
            timesteps = sample_timesteps(num_timesteps, generators, device)
        if args.multires_noise_iterations:
            noise = multires_noise(noise, generators, args.multires_noise_iterations, args.multires_noise_discount)
        if args.ip_noise_gamma:
            noisy = noise_scheduler.add_noise(
                latents, input_perturbation(noise, generators, args.ip_noise_gamma, args.ip_noise_gamma_random_strength),
                timesteps,
            )  # fmt: skip
        else:
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        time_ids = sdxl_time_ids(batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"]).to(device)
        prediction = models.get("unet", pipe.unet)(
            noisy.to(dtype),
            timesteps,
            text["prompt_embeds"].to(device, dtype),
            added_cond_kwargs={"text_embeds": text["pooled"].to(device, dtype), "time_ids": time_ids.to(dtype)},
        ).sample
        target = ddpm_target(noise_scheduler, latents, noise, timesteps)
        weights = batch["loss_weights"].to(device)
        if args.min_snr_gamma:
            weights = weights * min_snr_weights(noise_scheduler, timesteps, args.min_snr_gamma)
        huber_c = None
        if options.huber_losses(args):
            huber_c = huber_thresholds(
                args.huber_schedule, args.huber_c, args.huber_scale, timesteps.float() / num_timesteps,
                ddpm_noise_to_signal(noise_scheduler, timesteps),
            )  # fmt: skip
        return per_sample_loss(prediction, target, weights, loss_type=args.loss_type, huber_c=huber_c)

    def render(prompt: SamplePrompt):
        return generate(
            pipe, prompt.prompt, negative_prompt=prompt.negative, width=prompt.width, height=prompt.height,
            num_inference_steps=prompt.steps, guidance_scale=prompt.guidance,
            clip_skip=text_options["clip_skip"] - 2,  # diffusers' SDXL pipeline counts from the penultimate layer
            generator=torch.Generator(device).manual_seed(prompt.seed),
        )[0]  # fmt: skip

    objective = {
        "ss_v_parameterization": args.v_parameterization,
        "ss_min_snr_gamma": args.min_snr_gamma,
        "ss_clip_skip": args.clip_skip,
        "ss_max_token_length": args.max_token_length,
    }
    hooks = Hooks(
        loss=loss,
        save=AdapterWriter(args, run, accelerator, training, records, buckets, objective),
        sample=lambda step: render_samples(
            args, accelerator, step, render, SamplePrompt(prompt=""), denoiser=pipe.unet
        ),
    )
    trainer = Trainer(
        args, accelerator, training, BatchBuilder(records, buckets, latent_cache, args.prior_loss_weight), hooks,
        validator=make_validator(args, accelerator, data, latent_cache, loss),
    )  # fmt: skip
    history = trainer.run("train_sdxl_lokr", summary=f"{len(records)} images, {training.data.image_count()} per epoch")
    if tiny:  # under FSDP every process gathers the whole model, the main process checks
        with whole_model(accelerator, training.models):
            if accelerator.is_main_process:
                check_reload(args, history.final, pipe, prompt=records[0].caption, autocast=accelerator.autocast())
    return Result(args, pipe, history.losses, history.saved, history.final, history.validation, data)


if __name__ == "__main__":
    try:
        main()
    except (options.UsageError, DataError, NetworkWeightsError, StateError) as err:
        sys.exit(f"error: {err}")
