"""Command-line options both trainers share, named as in kohya sd-scripts, and the checks run before any model loads."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import random
import warnings
from pathlib import Path
from typing import Any

import torch

from peft_lyco.convert import load_kohya
from peft_lyco.presets import NetworkArgsError, parse_network_args

from .dataset_config import DatasetConfigError, dataset_problems, resolve_datasets
from .objectives import HUBER_SCHEDULES, LOSS_TYPES
from .preflight import path_problems
from .state import saved_seed

NETWORK_MODULES = {"networks.lokr": "lokr", "networks.loha": "loha"}
OPTIMIZERS = ("AdamW", "AdamW8bit")
BNB_OPTIMIZERS = ("AdamW8bit",)
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


# switches the embedded default turns on also get a --no-<name> form
SWITCH = argparse.BooleanOptionalAction


class UsageError(ValueError):
    """An option (or combination of options) that cannot work; raised before any heavy work starts."""


def optimizer_name(value: str) -> str:
    """``--optimizer_type`` in any letter case, as sd-scripts accepts it (``adamw8bit`` -> ``AdamW8bit``)."""
    by_lower = {name.lower(): name for name in OPTIMIZERS}
    if value.lower() not in by_lower:
        raise argparse.ArgumentTypeError(f"unknown optimizer {value!r}; choose from {', '.join(OPTIMIZERS)}")
    return by_lower[value.lower()]


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--train_data_dir", help="images with same-name .txt captions; 'N_name' subfolders repeat N times"
    )
    group.add_argument("--caption_extension", default=".txt")
    group.add_argument("--resolution", help="training resolution 'SIZE' or 'WIDTH,HEIGHT'")
    group.add_argument("--enable_bucket", action=SWITCH, default=False, help="aspect-ratio bucketing")
    group.add_argument("--min_bucket_reso", type=int, default=256)
    group.add_argument("--max_bucket_reso", type=int, default=1024)
    group.add_argument("--bucket_reso_steps", type=int, default=64)
    group.add_argument("--bucket_no_upscale", action="store_true", help="buckets never larger than the image")
    group.add_argument("--flip_aug", action="store_true", help="random horizontal flips")
    group.add_argument("--random_crop", action="store_true", help="random instead of centre crops")
    group.add_argument("--caption_dropout_rate", type=float, default=0.0, help="probability of training on ''")
    group.add_argument("--train_batch_size", type=int, default=1)
    group.add_argument("--max_data_loader_n_workers", type=int, default=0)
    group.add_argument("--cache_latents", action=SWITCH, default=False, help="encode every image once with the VAE")
    group.add_argument(
        "--cache_latents_to_disk", action="store_true", help="keep latent caches as files (implies --cache_latents)"
    )
    group.add_argument("--cache_text_encoder_outputs", action=SWITCH, default=False, help="needs frozen text encoders")
    group.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true")
    group.add_argument(
        "--cache_dir", help="where disk caches go (default: .lyco_cache in --train_data_dir or beside --dataset_config)"
    )
    group.add_argument("--vae_batch_size", type=int, default=1)
    add_dataset_args(parser)


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """sd-scripts' dataset TOML, regularisation images, tag-caption rules, colour augmentation, validation loss."""
    group = parser.add_argument_group("dataset config, regularisation, tag captions")
    group.add_argument(
        "--dataset_config",
        help="sd-scripts dataset .toml ([general], [[datasets]], [[datasets.subsets]]); replaces --train_data_dir",
    )
    group.add_argument("--reg_data_dir", help="regularisation images, laid out like --train_data_dir")
    group.add_argument("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularisation images")
    group.add_argument("--shuffle_caption", action="store_true", help="shuffle the caption's tags at every showing")
    group.add_argument("--caption_separator", default=",", help="what separates tags in a caption")
    group.add_argument("--keep_tokens", type=int, default=0, help="the first N tags stay first (not shuffled/dropped)")
    group.add_argument(
        "--keep_tokens_separator",
        default="",
        help="tags before this marker stay fixed (a second marker starts fixed trailing tags); overrides --keep_tokens",
    )
    group.add_argument(
        "--caption_tag_dropout_rate", type=float, default=0.0, help="probability of dropping each non-kept tag"
    )
    group.add_argument(
        "--secondary_separator", help="joins tags that move and drop together; becomes --caption_separator afterwards"
    )
    group.add_argument(
        "--enable_wildcard", action="store_true", help="a random line of multi-line captions, {a|b} picks one option"
    )
    group.add_argument(
        "--caption_dropout_every_n_epochs", type=int, default=0, help="train every N-th epoch on empty captions"
    )
    group.add_argument("--caption_prefix", help="text put before every caption")
    group.add_argument("--caption_suffix", help="text put after every caption")
    group.add_argument("--color_aug", action="store_true", help="weak colour augmentation (hue or gamma)")
    validation = parser.add_argument_group("validation loss")
    validation.add_argument(
        "--validation_split", type=float, default=0.0, help="share of each subset's images held out for validation"
    )
    validation.add_argument(
        "--validation_seed", type=int, help="seed of the held-out choice and of the validation noise (default --seed)"
    )
    validation.add_argument("--validate_every_n_steps", type=int, help="also validate every N steps")
    validation.add_argument(
        "--validate_every_n_epochs", type=int, help="validate every N epochs (default: every epoch with a split)"
    )
    validation.add_argument("--max_validation_steps", type=int, help="at most N validation batches each time")


def add_network_args(parser: argparse.ArgumentParser, *, default_name: str) -> None:
    group = parser.add_argument_group("network")
    group.add_argument("--algo", choices=("lokr", "loha"), default="lokr")
    group.add_argument("--network_module", choices=tuple(NETWORK_MODULES), help="sd-scripts spelling of --algo")
    group.add_argument("--network_dim", type=int, default=4)
    group.add_argument("--network_alpha", type=float, default=1.0)
    group.add_argument("--network_args", nargs="*", default=[], help="sd-scripts style 'key=value' strings")
    group.add_argument(
        "--network_train_unet_only", action=SWITCH, default=False, help="train the UNet/DiT adapter only"
    )
    group.add_argument("--learning_rate", type=float, default=1e-4)
    group.add_argument("--unet_lr", type=float, help="learning rate of the UNet/DiT adapter")
    group.add_argument("--text_encoder_lr", type=float, nargs="+", help="one value, or one per text encoder")
    group.add_argument("--output_dir", default="outputs")
    group.add_argument("--output_name", default=default_name)


def add_optimization_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimization")
    group.add_argument(
        "--optimizer_type", type=optimizer_name, default="AdamW", help=f"{', '.join(OPTIMIZERS)} (any letter case)"
    )
    group.add_argument("--optimizer_args", nargs="*", default=[], help="'key=value' optimizer keyword arguments")
    group.add_argument("--lr_scheduler", choices=SCHEDULERS, default="constant")
    group.add_argument("--lr_warmup_steps", type=float, default=0, help="steps, or a fraction (< 1) of all steps")
    group.add_argument("--lr_scheduler_num_cycles", type=int, default=1)
    group.add_argument("--lr_scheduler_power", type=float, default=1.0)
    group.add_argument("--max_train_steps", type=int, default=1600)
    group.add_argument("--max_train_epochs", type=int, help="overrides --max_train_steps")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--gradient_checkpointing", action="store_true")
    group.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    add_memory_args(group)
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    group.add_argument("--seed", type=int, help="default: a random seed, printed and saved in the metadata")
    group.add_argument("--noise_offset", type=float, default=0.0)


def add_memory_args(group: argparse._ArgumentGroup) -> None:
    """Precision, storage and compiler options for large models on small GPUs (sd-scripts names)."""
    group.add_argument(
        "--full_bf16",
        action="store_true",
        help="adapter weights, gradients and optimizer states in bf16 (saves memory)",
    )
    group.add_argument(
        "--fp8_base",
        action="store_true",
        help="store the frozen UNet/DiT and text encoders' Linear/Conv weights in float8_e4m3fn; compute in the "
        "mixed-precision dtype (each weight is upcast per call)",
    )
    group.add_argument("--torch_compile", action="store_true", help="torch.compile the UNet/DiT")
    group.add_argument("--dynamo_backend", default="inductor", help="torch.compile backend for --torch_compile")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("saving, resuming, logging, samples")
    group.add_argument("--save_every_n_steps", type=int)
    group.add_argument("--save_every_n_epochs", type=int)
    group.add_argument("--save_precision", choices=("float", "fp16", "bf16"), default="float")
    group.add_argument(
        "--save_naming",
        choices=("sgm", "diffusers", "comfy"),
        default="sgm",
        help="module names of the saved file: sgm (sd-scripts, default), diffusers, or comfy (what ComfyUI reads: SGM "
        "names for SDXL; diffusion_model./text_encoders.qwen3_06b.transformer.model. names for Anima)",
    )
    group.add_argument("--save_peft_adapter", action="store_true", help="also write PEFT adapter folders")
    group.add_argument("--no_metadata", action="store_true", help="only the essential ss_* metadata")
    group.add_argument("--training_comment", help="stored as ss_training_comment")
    group.add_argument("--save_state", action="store_true", help="write a resumable state folder with every save")
    group.add_argument("--resume", help="a state folder written by --save_state")
    group.add_argument("--logging_dir", help="tracker logs (TensorBoard by default when installed)")
    group.add_argument("--log_with", choices=("tensorboard", "wandb", "all"))
    group.add_argument("--log_tracker_name")
    group.add_argument("--sample_prompts", help="text file, one prompt per line (--n --w --h --d --s --l options)")
    group.add_argument("--sample_every_n_steps", type=int)
    group.add_argument("--sample_every_n_epochs", type=int)
    group.add_argument("--sample_at_first", action="store_true")
    group.add_argument(
        "--sample_cache_mb",
        type=float,
        help="MiB the samples may hold in cached W + ΣΔW of the denoiser's adapted layers, so its steps do not rebuild "
        "them (default: a quarter of the device's free memory; 0: off); freed when sampling ends",
    )


def add_continuation_args(parser: argparse.ArgumentParser) -> None:
    """Continuing from a file, keeping only recent saves, which parts train, max-norm (sd-scripts names)."""
    group = parser.add_argument_group("continuing and keeping runs")
    group.add_argument("--network_weights", help="start from this kohya/LyCORIS LoHa/LoKr .safetensors (bit-exact)")
    group.add_argument(
        "--dim_from_weights",
        action="store_true",
        help="build the network from --network_weights (modules, ranks, alphas)",
    )
    group.add_argument("--save_last_n_epochs", type=int, help="keep only the last N epoch saves")
    group.add_argument("--save_last_n_epochs_state", type=int, help="the same for state folders (default: the above)")
    group.add_argument("--save_last_n_steps", type=int, help="keep only the step saves of the last N steps")
    group.add_argument("--save_last_n_steps_state", type=int, help="the same for state folders (default: the above)")
    group.add_argument(
        "--network_train_text_encoder_only", action="store_true", help="train the text encoder adapter(s) only"
    )
    group.add_argument(
        "--scale_weight_norms", type=float, help="max-norm: after each step scale every module's ΔW to norm <= this"
    )


def add_loss_args(parser: argparse.ArgumentParser, *, ddpm: bool) -> None:
    """Loss type (Huber schedules) and noise options (sd-scripts names); multires noise only for DDPM (SDXL)."""
    group = parser.add_argument_group("loss and noise")
    group.add_argument("--loss_type", choices=LOSS_TYPES, default="l2")
    group.add_argument("--huber_schedule", choices=HUBER_SCHEDULES, default="snr", help="huber/smooth_l1 threshold")
    group.add_argument("--huber_c", type=float, default=0.1, help="Huber threshold c (decay of the schedules)")
    group.add_argument("--huber_scale", type=float, default=1.0, help="Huber threshold scale (constant, exponential)")
    group.add_argument("--ip_noise_gamma", type=float, help="input perturbation noise strength, e.g. 0.1")
    group.add_argument(
        "--ip_noise_gamma_random_strength", action="store_true", help="strength uniform in [0, --ip_noise_gamma)"
    )
    if ddpm:
        group.add_argument("--multires_noise_iterations", type=int, help="pyramid noise levels, e.g. 6-10")
        group.add_argument("--multires_noise_discount", type=float, default=0.3, help="weight decay per level")


def huber_losses(args: argparse.Namespace) -> bool:
    """Whether the loss needs per-sample Huber thresholds."""
    return args.loss_type in ("huber", "smooth_l1")


def _dynamo_backends() -> list[str]:
    import torch._dynamo

    return sorted(torch._dynamo.list_backends(exclude_tags=()))


def parse_key_values(items: list[str], option: str) -> dict[str, Any]:
    """``["a=1", "b=[1,2]", "c=text"]`` -> {"a": 1, "b": [1, 2], "c": "text"} (Python literals, else strings)."""
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{option} entries must look like key=value, got {item!r}")
        try:
            parsed[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            parsed[key.strip()] = value.strip()
    return parsed


def normalise(args: argparse.Namespace) -> argparse.Namespace:
    """Resolve aliases and implications (sd-scripts semantics) in place."""
    if args.network_module:
        args.algo = NETWORK_MODULES[args.network_module]
    args.cache_latents = args.cache_latents or args.cache_latents_to_disk
    args.cache_text_encoder_outputs = args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk
    if args.logging_dir and not args.log_with:
        args.log_with = "tensorboard"
    return args


def check_args(
    args: argparse.Namespace,
    *,
    pixel_multiple: int,
    required_with_model: tuple[str, ...] = (),
    input_files: tuple[str, ...] = (),
    files_or_hub_ids: tuple[str, ...] = (),
) -> None:
    """Every check that needs no model, paths and files included (``preflight.path_problems``): raise
    ``UsageError`` naming every problem, its option and the fix."""
    problems = []
    if args.pretrained_model_name_or_path is not None:
        missing = [
            f"--{name}"
            for name in required_with_model
            if getattr(args, name) is None and not (name == "train_data_dir" and args.dataset_config)
        ]
        if missing:
            problems.append(f"{', '.join(missing)} required with a real model")
    problems += path_problems(
        args, pixel_multiple=pixel_multiple, input_files=input_files, files_or_hub_ids=files_or_hub_ids
    )

    def need(condition: bool, message: str) -> None:
        if not condition:
            problems.append(message)

    try:
        datasets = resolve_datasets(args, list_folders=False)
        problems += dataset_problems(datasets, args, pixel_multiple=pixel_multiple)
    except (DatasetConfigError, ValueError) as err:
        problems.append(str(err))
    for option in (
        "train_batch_size",
        "gradient_accumulation_steps",
        "max_train_steps",
        "network_dim",
        "vae_batch_size",
    ):
        need(getattr(args, option) >= 1, f"--{option} must be at least 1, got {getattr(args, option)}")
    for option in (
        "save_last_n_epochs",
        "save_last_n_epochs_state",
        "save_last_n_steps",
        "save_last_n_steps_state",
        "max_train_epochs",
        "save_every_n_steps",
        "save_every_n_epochs",
        "sample_every_n_steps",
        "sample_every_n_epochs",
        "validate_every_n_steps",
        "validate_every_n_epochs",
        "max_validation_steps",
    ):
        value = getattr(args, option)
        need(value is None or value >= 1, f"--{option} must be at least 1, got {value}")
    need(args.max_data_loader_n_workers >= 0, "--max_data_loader_n_workers must be >= 0")
    cache = getattr(args, "sample_cache_mb", None)
    need(cache is None or cache >= 0, f"--sample_cache_mb must be >= 0, got {cache}")
    check_continuation(args, need)
    need(args.huber_c > 0, f"--huber_c must be > 0, got {args.huber_c}")
    need(args.ip_noise_gamma is None or args.ip_noise_gamma >= 0, "--ip_noise_gamma must be >= 0")
    skip = getattr(args, "clip_skip", None)
    need(skip is None or skip >= 1, f"--clip_skip must be at least 1, got {skip}")
    swap = getattr(args, "blocks_to_swap", None)
    need(swap is None or swap >= 0, f"--blocks_to_swap must be >= 0, got {swap}")
    iterations = getattr(args, "multires_noise_iterations", None)
    need(iterations is None or iterations >= 0, f"--multires_noise_iterations must be >= 0, got {iterations}")
    need(
        not args.cache_text_encoder_outputs or args.network_train_unet_only,
        "--cache_text_encoder_outputs needs frozen text encoders: add --network_train_unet_only",
    )
    need(
        not args.full_bf16 or args.mixed_precision == "bf16",
        "--full_bf16 needs --mixed_precision bf16 (the adapter is trained in bf16 under bf16 autocast)",
    )
    need(
        not args.fp8_base or hasattr(torch, "float8_e4m3fn"),
        f"--fp8_base needs torch with float8 dtypes (>= 2.1), found {torch.__version__}",
    )
    need(
        not args.torch_compile or args.dynamo_backend in _dynamo_backends(),
        f"--dynamo_backend {args.dynamo_backend!r} is not a torch.compile backend here; "
        f"choose from {', '.join(_dynamo_backends())}",
    )
    if args.optimizer_type in BNB_OPTIMIZERS:
        need(
            importlib.util.find_spec("bitsandbytes") is not None,
            f"--optimizer_type {args.optimizer_type} needs bitsandbytes: pip install 'peft_lyco[bnb]' "
            "(or pip install bitsandbytes), or use --optimizer_type AdamW",
        )
    if args.log_with in ("tensorboard", "all"):
        need(
            importlib.util.find_spec("tensorboard") is not None,
            f"--log_with {args.log_with} needs TensorBoard: pip install tensorboard",
        )
    if args.log_with in ("wandb", "all"):
        need(
            importlib.util.find_spec("wandb") is not None, f"--log_with {args.log_with} needs wandb: pip install wandb"
        )
    need(not args.log_with or bool(args.logging_dir), "--log_with needs --logging_dir")
    try:
        parse_key_values(args.optimizer_args, "--optimizer_args")
    except UsageError as err:
        problems.append(str(err))
    try:
        parse_network_args(args.network_args)
    except NetworkArgsError as err:
        problems.append(f"--network_args: {err}")
    if problems:
        raise UsageError("cannot start training:\n  " + "\n  ".join(problems))


def check_continuation(args: argparse.Namespace, need) -> None:
    """The ``add_continuation_args`` options: combinations that cannot work and a --network_weights file that is
    missing or not a safetensors file, found before any model loads."""
    for option, every in (
        ("save_last_n_epochs", "save_every_n_epochs"),
        ("save_last_n_epochs_state", "save_every_n_epochs"),
        ("save_last_n_steps", "save_every_n_steps"),
        ("save_last_n_steps_state", "save_every_n_steps"),
    ):
        need(getattr(args, option) is None or getattr(args, every), f"--{option} needs --{every}")
    for option in ("save_last_n_epochs_state", "save_last_n_steps_state"):
        need(getattr(args, option) is None or args.save_state, f"--{option} needs --save_state")
    need(
        not (args.network_train_unet_only and args.network_train_text_encoder_only),
        "--network_train_unet_only and --network_train_text_encoder_only exclude each other; choose one",
    )
    need(
        not (args.network_train_text_encoder_only and args.cache_text_encoder_outputs),
        "--network_train_text_encoder_only trains the text encoders: drop --cache_text_encoder_outputs",
    )
    need(
        args.scale_weight_norms is None or args.scale_weight_norms > 0,
        f"--scale_weight_norms must be > 0, got {args.scale_weight_norms}",
    )
    dora = any(
        key.strip() == "dora_wd" and value.strip().lower() in ("true", "1")
        for key, _, value in (item.partition("=") for item in args.network_args)
    )
    need(
        not (args.scale_weight_norms and dora),
        "--scale_weight_norms scales ΔW, which DoRA (dora_wd=True) renormalises: use one of them",
    )
    need(not args.dim_from_weights or bool(args.network_weights), "--dim_from_weights needs --network_weights")
    if args.network_weights:
        path = Path(args.network_weights)
        if not path.is_file():
            need(False, f"--network_weights file '{path}' does not exist")
        elif path.suffix != ".safetensors":
            need(
                False,
                f"--network_weights '{path}' is not a .safetensors file (pickled .ckpt/.pt files are never loaded)",
            )
        else:
            try:
                load_kohya(path)  # a truncated or corrupt file is reported before any model loads
            except ValueError as err:
                need(False, f"--network_weights: {err}")


def use_dataset_config(args: argparse.Namespace) -> None:
    """Keep the resolved ``--dataset_config`` datasets on ``args`` (``args.dataset_specs``) and mirror the first
    dataset's values into the matching options, which the saved metadata reports. As in sd-scripts,
    ``--train_data_dir`` and ``--reg_data_dir`` are ignored, with a warning."""
    ignored = [f"--{name}" for name in ("train_data_dir", "reg_data_dir") if getattr(args, name)]
    if ignored:
        warnings.warn(
            f"{', '.join(ignored)} ignored: --dataset_config '{args.dataset_config}' lists the images", stacklevel=2
        )
        args.train_data_dir = args.reg_data_dir = None
    args.dataset_specs = resolve_datasets(args)
    first = args.dataset_specs[0]
    width, height = first.buckets.resolution
    args.resolution = f"{width},{height}"
    args.enable_bucket, args.bucket_no_upscale = first.buckets.enable, first.buckets.no_upscale
    args.min_bucket_reso, args.max_bucket_reso = first.buckets.min_reso, first.buckets.max_reso
    args.bucket_reso_steps, args.train_batch_size = first.buckets.step, first.batch_size
    args.validation_split = first.validation_split


def parse_training_args(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    *,
    tiny_defaults: dict[str, Any],
    pixel_multiple: int,
    required_with_model: tuple[str, ...],
    input_files: tuple[str, ...] = (),
    files_or_hub_ids: tuple[str, ...] = (),
) -> argparse.Namespace:
    """Parse, apply the embedded default's values when no model is given, and run every check that needs no model
    (``--network_args``, writable folders, prompt file, state folder, ``input_files`` and local ``files_or_hub_ids``
    included), so bad input fails before anything heavy starts."""
    args = parser.parse_args(argv)
    if args.pretrained_model_name_or_path is None:
        parser.set_defaults(**tiny_defaults)
        args = parser.parse_args(argv)
    normalise(args)
    args.pixel_multiple = pixel_multiple  # sample sizes are checked against it whenever the prompt file is read
    check_args(
        args,
        pixel_multiple=pixel_multiple,
        required_with_model=required_with_model,
        input_files=input_files,
        files_or_hub_ids=files_or_hub_ids,
    )
    if args.dataset_config:
        use_dataset_config(args)
    args.resolution = args.resolution or "1024"
    if args.seed is None:
        args.seed = saved_seed(args.resume) if args.resume else random.SystemRandom().randrange(2**31)
    return args
