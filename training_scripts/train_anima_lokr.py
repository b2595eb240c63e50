"""Train a LoKr (or LoHa) adapter for Anima (Cosmos-Predict2 DiT + LLM adapter, Qwen3 text encoder, Qwen-Image VAE).

    accelerate launch training_scripts/train_anima_lokr.py \\
        --pretrained_model_name_or_path models/anima-preview.safetensors \\
        --qwen3 models/qwen_3_06b_base.safetensors --vae models/qwen_image_vae.safetensors \\
        --train_data_dir data/my_style --resolution 1024 --enable_bucket \\
        --network_dim 32 --network_alpha 16 --network_args factor=8 train_llm_adapter=True \\
        --network_train_unet_only --cache_text_encoder_outputs --cache_latents \\
        --mixed_precision bf16 --timestep_sampling sigmoid --output_name my_style

Options follow kohya sd-scripts' ``anima_train_network.py``: rectified flow (the DiT predicts noise − latents),
σ sampled ``sigmoid`` (default), ``uniform`` or ``shift`` (with ``--discrete_flow_shift``). The saved kohya file
is keyed like sd-scripts' Anima LoKr (``lora_unet_blocks_…``, ``lora_unet_llm_adapter_…``, ``lora_te_layers_…``).
With no ``--pretrained_model_name_or_path`` the script builds a tiny random Anima, trains it on generated coloured
shapes on CPU, reloads the saved file through the converter and checks that the adapter changes the output.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from lyco_train import args as options
from lyco_train.batches import BatchBuilder, TrainingData
from lyco_train.cache import build_latent_cache, build_text_cache
from lyco_train.data import DataError
from lyco_train.export import AdapterWriter
from lyco_train.loop import place_frozen, prepare_training, weight_dtype
from lyco_train.memory import apply_memory_options, store_weights_in_fp8
from lyco_train.network_weights import NetworkWeightsError, add_network
from lyco_train.objectives import (
    SIGMA_SAMPLING,
    WEIGHTING_SCHEMES,
    flow_loss_weights,
    flow_noisy_input,
    flow_target,
    huber_thresholds,
    input_perturbation,
    per_sample_loss,
    sample_generators,
    sample_noise,
    sample_sigmas,
)
from lyco_train.runner import Hooks, Trainer
from lyco_train.sampling import SamplePrompt, render_samples
from lyco_train.sharded import whole_model
from lyco_train.startup import start_run
from lyco_train.state import StateError
from lyco_train.tiny import TINY_SEED, report_reload, tiny_defaults
from lyco_train.validation import FixedDraw, make_validator

import peft_lyco  # noqa: F401  (registers LYCO_LOHA / LYCO_LOKR with PEFT)
from peft_lyco.models.anima import AnimaComponents, encode_images


@dataclass
class Result:
    """What a run produced (the tests and the embedded default look at it)."""

    args: argparse.Namespace
    components: AnimaComponents
    losses: list[float]
    files: list[Path]
    final: Path
    validation: list[tuple[int, str, float]]
    data: TrainingData


# ---------------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", help="Anima DiT .safetensors (none: tiny CPU demo)")
    model.add_argument("--qwen3", help="Qwen3-0.6B: a transformers folder / hub id, or a single .safetensors")
    model.add_argument("--qwen3_tokenizer", default="Qwen/Qwen3-0.6B", help="used when --qwen3 is a single file")
    model.add_argument("--vae", help="Qwen-Image VAE: a single .safetensors, or a diffusers folder / hub id")
    model.add_argument("--vae_subfolder", help="e.g. 'vae' with --vae Qwen/Qwen-Image")
    model.add_argument("--llm_adapter_path", help="LLM adapter weights, if not inside the DiT file")
    model.add_argument("--t5_tokenizer_path", default="google/t5-v1_1-xxl")
    model.add_argument("--qwen3_max_token_length", type=int, default=512)
    model.add_argument("--t5_max_token_length", type=int, default=512)
    flow = parser.add_argument_group("rectified flow")
    flow.add_argument("--timestep_sampling", choices=SIGMA_SAMPLING, default="sigmoid")
    flow.add_argument("--sigmoid_scale", type=float, default=1.0, help="sigmoid, shift, flux_shift")
    flow.add_argument(
        "--discrete_flow_shift", type=float, default=1.0, help="the shift of --timestep_sampling shift and sigma"
    )
    flow.add_argument(
        "--weighting_scheme", choices=WEIGHTING_SCHEMES, default="uniform",
        help="loss weights (sigma_sqrt, cosmap) or the density of --timestep_sampling sigma (logit_normal, mode)",
    )  # fmt: skip
    flow.add_argument("--logit_mean", type=float, default=0.0, help="--weighting_scheme logit_normal")
    flow.add_argument("--logit_std", type=float, default=1.0, help="--weighting_scheme logit_normal")
    flow.add_argument("--mode_scale", type=float, default=1.29, help="--weighting_scheme mode")
    model.add_argument(
        "--blocks_to_swap", type=int, help="keep N DiT blocks' frozen weights on the CPU, moved in for each use"
    )
    options.add_data_args(parser)
    options.add_network_args(parser, default_name="anima_lokr")
    options.add_optimization_args(parser)
    options.add_output_args(parser)
    options.add_continuation_args(parser)
    options.add_loss_args(parser, ddpm=False)
    return options.parse_training_args(
        parser,
        argv,
        tiny_defaults=tiny_defaults("anima"),
        pixel_multiple=16,
        required_with_model=("train_data_dir", "qwen3", "vae"),
        input_files=("pretrained_model_name_or_path", "llm_adapter_path"),
        files_or_hub_ids=("qwen3", "vae"),
    )


# ------------------------------------------------------------------------------------------------------ models
def load_vae(path: str, subfolder: str | None, dtype: torch.dtype):
    """The Qwen-Image VAE from a single file (original Wan layout, as Anima ships it) or a diffusers folder/hub id."""
    from diffusers import AutoencoderKLQwenImage

    if not path.endswith(".safetensors"):
        return AutoencoderKLQwenImage.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype)
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    from safetensors.torch import load_file

    state_dict = convert_wan_vae_to_diffusers(load_file(path))
    with torch.device("meta"):
        vae = AutoencoderKLQwenImage()
    vae.load_state_dict(state_dict, strict=True, assign=True)
    return vae.to(dtype)


def load_models(args: argparse.Namespace, dtype: torch.dtype) -> AnimaComponents:
    """The tiny random Anima, or the released files: DiT, Qwen3 encoder + tokenizer, T5 tokenizer, VAE."""
    if args.pretrained_model_name_or_path is None:
        from peft_lyco.models.anima import build_tiny_anima

        return build_tiny_anima(seed=TINY_SEED)
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen3Model

    from peft_lyco.models.anima import AnimaDiT, qwen3_text_encoder_from_single_file

    dit = AnimaDiT.from_single_file(args.pretrained_model_name_or_path, torch_dtype=dtype)
    if args.llm_adapter_path:
        weights = load_file(args.llm_adapter_path)
        dit.llm_adapter.load_state_dict({k.removeprefix("llm_adapter."): v.to(dtype) for k, v in weights.items()})
    if args.qwen3.endswith(".safetensors"):
        text_encoder = qwen3_text_encoder_from_single_file(args.qwen3, torch_dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(args.qwen3_tokenizer)
    else:
        text_encoder = Qwen3Model.from_pretrained(args.qwen3, torch_dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(args.qwen3)
    return AnimaComponents(
        dit=dit,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        t5_tokenizer=AutoTokenizer.from_pretrained(args.t5_tokenizer_path),
        vae=load_vae(args.vae, args.vae_subfolder, torch.float32),
        max_length=args.qwen3_max_token_length,
        t5_max_length=args.t5_max_token_length,
    )


def encode_captions(models: AnimaComponents, captions: list[str], text_encoder) -> dict[str, torch.Tensor]:
    """Qwen3 states (padded positions zeroed) and mask, T5 ids and mask: what the DiT's LLM adapter reads.

    ``text_encoder`` is the encoder to call (the accelerate-prepared one when it is trained, with gradients).
    The empty caption gives zero states, mask 0 and T5 ids ``[</s>, pad, …]``: sd-scripts' caption dropout.
    """
    tokenizer = models.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(models.dit.parameters()).device
    qwen = tokenizer(captions, padding="max_length", max_length=models.max_length, truncation=True, return_tensors="pt")
    t5 = models.t5_tokenizer(
        captions, padding="max_length", max_length=models.t5_max_length, truncation=True, return_tensors="pt"
    )
    mask = qwen["attention_mask"].to(device)
    states = text_encoder(input_ids=qwen["input_ids"].to(device), attention_mask=mask).last_hidden_state
    states = torch.where(mask[..., None].bool(), states, torch.zeros_like(states))
    return {
        "prompt_embeds": states,
        "attention_mask": mask,
        "t5_input_ids": t5["input_ids"].to(device),
        "t5_attention_mask": t5["attention_mask"].to(device),
    }


def check_reload(args: argparse.Namespace, path: Path, trained: AnimaComponents, prompt: str) -> None:
    """The embedded default's last step: read the saved kohya file with the converter, put the adapter into a fresh
    tiny Anima, and compare its images with the base model and the in-memory trained model."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    from peft_lyco.convert import kohya_to_peft, load_kohya
    from peft_lyco.models.anima import build_tiny_anima

    state_dict, metadata = load_kohya(path)
    fresh, base = build_tiny_anima(seed=TINY_SEED), build_tiny_anima(seed=TINY_SEED)
    targets = {"transformer": fresh.dit, "text_encoder": fresh.text_encoder}
    converted = kohya_to_peft(state_dict, metadata=metadata, model_type="anima", model=targets)
    for component, adapter in converted.items():
        inject_adapter_in_model(
            adapter.config, targets[component], adapter_name="trained", state_dict=adapter.state_dict
        )
        set_peft_model_state_dict(targets[component], adapter.state_dict, adapter_name="trained")
    if args.fp8_base:  # the same rounded base as the trained model, so the comparison sees the adapter only
        for model in (fresh.dit, fresh.text_encoder, base.dit, base.text_encoder):
            store_weights_in_fp8(model.requires_grad_(False), torch.float32)

    def render(models: AnimaComponents):
        return (
            models.pipeline()(
                prompt,
                height=64,
                width=64,
                num_inference_steps=4,
                guidance_scale=3.0,
                generator=torch.Generator().manual_seed(0),
            )
            .permute(0, 2, 3, 1)
            .numpy()
        )

    report_reload(
        path,
        render(fresh),
        render(base),
        render(trained),
        "peft_lyco.convert.kohya_to_peft",
        tolerance=1e-4 if args.save_precision == "float" and args.mixed_precision == "no" else 5e-2,
    )


# -------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> Result:
    args = parse_args(argv)
    start = start_run(args, family="anima", tiny_model="Anima", denoiser="transformer", text_encoders=("text_encoder",))
    accelerator, data, run, tiny = start.accelerator, start.data, start.run, start.tiny
    records, buckets = data.records, data.buckets
    dtype, device = weight_dtype(accelerator), accelerator.device
    models = load_models(args, dtype)
    place_frozen(accelerator, models.vae, (models.dit, models.text_encoder))

    # the adapter: the DiT (and its LLM adapter with train_llm_adapter=True) unless --network_train_text_encoder_only,
    # Qwen3 unless --network_train_unet_only; --network_weights starts it from a file
    components = {"transformer": models.dit, "text_encoder": models.text_encoder}
    trained = {
        name: model
        for name, model in components.items()
        if not (args.network_train_unet_only if name == "text_encoder" else args.network_train_text_encoder_only)
    }
    trained = add_network(args, "anima", components, trained, log=accelerator.print)
    if args.blocks_to_swap:
        if args.blocks_to_swap > len(models.dit.blocks):
            raise options.UsageError(
                f"--blocks_to_swap {args.blocks_to_swap}: the DiT has {len(models.dit.blocks)} blocks"
            )
        models.dit.enable_block_swap(args.blocks_to_swap, device)
    if args.gradient_checkpointing:
        models.dit.enable_gradient_checkpointing()
        if "text_encoder" in trained:
            models.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    apply_memory_options(args, (models.dit, models.text_encoder), trained, models.dit, dtype)

    # caches of frozen outputs, filled once before training
    latent_cache = build_latent_cache(
        args, accelerator, data.all_records, buckets + data.validation_buckets, tag=f"anima:{args.vae}",
        encode=lambda pixels: encode_images(models.vae, pixels),
    )  # fmt: skip
    text_cache = build_text_cache(
        args, accelerator, data.all_records, tag=f"anima:{args.qwen3}:{models.max_length}:{models.t5_max_length}",
        encode=lambda captions: encode_captions(models, captions, models.text_encoder),
    )  # fmt: skip

    training = prepare_training(args, accelerator, records, buckets, trained)
    if args.blocks_to_swap:
        models.dit.block_swap.offload()  # after every placement: the swapped blocks' frozen weights go to the CPU
    modules = training.models

    def loss(batch: dict, draw: FixedDraw | None = None) -> torch.Tensor:
        if "latents" in batch:
            latents = batch["latents"].to(device, torch.float32)
        else:
            latents = encode_images(models.vae, batch["pixels"]).float()
        if text_cache:
            text = {k: v.to(device) for k, v in text_cache.get(batch["captions"]).items()}
        else:
            text = encode_captions(models, batch["captions"], modules.get("text_encoder", models.text_encoder))
        generators = draw.generators if draw else sample_generators(batch["noise_seeds"])
        noise = sample_noise(latents, generators)
        if draw:
            sigmas = draw.sigmas(device)
        else:
            sigmas = sample_sigmas(
                args.timestep_sampling, generators, device,
                sigmoid_scale=args.sigmoid_scale, shift=args.discrete_flow_shift,
                weighting_scheme=args.weighting_scheme, logit_mean=args.logit_mean, logit_std=args.logit_std,
                mode_scale=args.mode_scale, image_seq_len=(latents.shape[-2] // 2) * (latents.shape[-1] // 2),
            )  # fmt: skip
        input_noise = noise
        if args.ip_noise_gamma:
            input_noise = input_perturbation(
                noise, generators, args.ip_noise_gamma, args.ip_noise_gamma_random_strength
            )
        prediction = modules.get("transformer", models.dit)(
            flow_noisy_input(latents, input_noise, sigmas).to(dtype),
            sigmas.to(dtype),
            text["prompt_embeds"].to(dtype),
            target_input_ids=text["t5_input_ids"],
            target_attention_mask=text["t5_attention_mask"],
            source_attention_mask=text["attention_mask"],
        )
        huber_c = None
        if options.huber_losses(args):
            noise_to_signal = sigmas / (1.0 - sigmas).clamp_min(torch.finfo(torch.float32).tiny)
            huber_c = huber_thresholds(args.huber_schedule, args.huber_c, args.huber_scale, sigmas, noise_to_signal)
        weights = batch["loss_weights"].to(device) * flow_loss_weights(args.weighting_scheme, sigmas)
        return per_sample_loss(
            prediction, flow_target(latents, noise), weights, loss_type=args.loss_type, huber_c=huber_c
        )

    def render(prompt: SamplePrompt):
        return models.pipeline()(
            prompt.prompt, prompt.negative, height=prompt.height, width=prompt.width,
            num_inference_steps=prompt.steps, guidance_scale=prompt.guidance, output_type="pil",
            generator=torch.Generator().manual_seed(prompt.seed),
        )[0]  # fmt: skip

    objective = {
        "ss_timestep_sampling": args.timestep_sampling,
        "ss_sigmoid_scale": args.sigmoid_scale,
        "ss_discrete_flow_shift": args.discrete_flow_shift,
        "ss_weighting_scheme": args.weighting_scheme,
        "ss_logit_mean": args.logit_mean,
        "ss_logit_std": args.logit_std,
        "ss_mode_scale": args.mode_scale,
    }
    hooks = Hooks(
        loss=loss,
        save=AdapterWriter(args, run, accelerator, training, records, buckets, objective),
        sample=lambda step: render_samples(
            args, accelerator, step, render, SamplePrompt(prompt="", guidance=3.5), denoiser=models.dit
        ),
    )
    trainer = Trainer(
        args, accelerator, training, BatchBuilder(records, buckets, latent_cache, args.prior_loss_weight), hooks,
        validator=make_validator(args, accelerator, data, latent_cache, loss),
    )  # fmt: skip
    history = trainer.run("train_anima_lokr", summary=f"{len(records)} images, {training.data.image_count()} per epoch")
    if tiny:  # under FSDP every process gathers the whole model, the main process checks
        with whole_model(accelerator, training.models):
            if accelerator.is_main_process:
                check_reload(args, history.final, models, prompt=records[0].caption)
    return Result(args, models, history.losses, history.saved, history.final, history.validation, data)


if __name__ == "__main__":
    try:
        main()
    except (options.UsageError, DataError, NetworkWeightsError, StateError) as err:
        sys.exit(f"error: {err}")
