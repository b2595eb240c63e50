"""sd-scripts' ``ss_*`` training metadata and ModelSpec keys for the saved kohya files (all values strings).

A1111 reads ``ss_base_model_version`` to list the file under the right model family, shows ``ss_output_name``,
``ss_dataset_dirs``, ``ss_tag_frequency`` and ``ss_bucket_info``, and parses ``ss_training_started_at`` as a float.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .data import ImageRecord, count_images
from .state import Position

FAMILIES = {
    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models"),
    "anima": ("anima", "anima-preview/lora", "https://huggingface.co/circlestone-labs/Anima"),
}
NETWORK_MODULES = {"lokr": "networks.lokr", "loha": "networks.loha"}
ESSENTIAL = (
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)


@dataclass(frozen=True)
class RunInfo:
    """What stays fixed for a whole run: session id, start time, the model's name and family."""

    session_id: str
    started_at: float
    model_name: str
    family: str


def _dataset_keys(records: list[ImageRecord], buckets: list[tuple[int, int]]) -> dict[str, Any]:
    dirs: dict[str, dict[str, int]] = {}
    tags: dict[str, Counter] = {}
    for record in records:
        entry = dirs.setdefault(record.path.parent.name, {"n_repeats": record.repeats, "img_count": 0})
        entry["img_count"] += 1
        tags.setdefault(record.path.parent.name, Counter()).update(
            tag.strip() for tag in record.caption.split(",") if tag.strip()
        )
    counts = Counter(buckets)
    bucket_info = {
        "buckets": {str(i): {"resolution": list(b), "count": counts[b]} for i, b in enumerate(sorted(counts))},
        "mean_img_ar_error": sum(abs(r.size[0] / r.size[1] - b[0] / b[1]) for r, b in zip(records, buckets))
        / len(records),
    }
    return {
        "ss_dataset_dirs": dirs,
        "ss_tag_frequency": {name: dict(counter) for name, counter in tags.items()},
        "ss_bucket_info": bucket_info,
        "ss_num_train_images": count_images(records, regularisation=False),
        "ss_num_reg_images": count_images(records, regularisation=True),
    }


def training_metadata(
    args: argparse.Namespace,
    run: RunInfo,
    *,
    network_args: dict[str, str],
    records: list[ImageRecord],
    buckets: list[tuple[int, int]],
    batches_per_epoch: int,
    num_epochs: int,
    total_steps: int,
    position: Position,
    objective: dict[str, Any],
    num_processes: int = 1,
) -> dict[str, str]:
    """The metadata of a file saved at ``position``; ``ss_epoch`` is the epoch in progress (1-based, as sd-scripts)."""
    version, architecture, implementation = FAMILIES[run.family]
    width, height = (int(v) for v in (args.resolution.split(",") * 2)[:2])
    values: dict[str, Any] = {
        "ss_v2": False,
        "ss_base_model_version": version,
        "ss_network_module": NETWORK_MODULES[args.algo],
        "ss_network_dim": args.network_dim,
        "ss_network_alpha": args.network_alpha,
        "ss_network_args": json.dumps(network_args) if network_args else None,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": args.output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(run.started_at)),
    }
    if not args.no_metadata:
        values.update(
            {
                "ss_session_id": run.session_id,
                "ss_training_started_at": run.started_at,
                "ss_training_finished_at": time.time(),
                "ss_output_name": args.output_name,
                "ss_sd_model_name": run.model_name,
                "ss_learning_rate": args.learning_rate,
                "ss_unet_lr": args.unet_lr if args.unet_lr is not None else args.learning_rate,
                "ss_text_encoder_lr": None
                if args.network_train_unet_only
                else (args.text_encoder_lr or args.learning_rate),
                "ss_network_dropout": None,
                "ss_num_batches_per_epoch": batches_per_epoch,
                "ss_num_epochs": num_epochs,
                "ss_max_train_steps": total_steps,
                "ss_steps": position.step,
                "ss_epoch": position.epoch + (1 if position.batch else 0),
                "ss_batch_size_per_device": args.train_batch_size,
                "ss_total_batch_size": args.train_batch_size * args.gradient_accumulation_steps * num_processes,
                "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
                "ss_gradient_checkpointing": args.gradient_checkpointing,
                "ss_lr_warmup_steps": args.lr_warmup_steps,
                "ss_lr_scheduler": args.lr_scheduler,
                "ss_optimizer": args.optimizer_type
                + (f"({','.join(args.optimizer_args)})" if args.optimizer_args else ""),
                "ss_max_grad_norm": args.max_grad_norm,
                "ss_mixed_precision": args.mixed_precision,
                "ss_full_bf16": args.full_bf16,
                "ss_fp8_base": args.fp8_base,
                "ss_seed": args.seed,
                "ss_loss_type": "l2",
                "ss_noise_offset": args.noise_offset or None,
                "ss_resolution": f"({width}, {height})",
                "ss_enable_bucket": args.enable_bucket,
                "ss_min_bucket_reso": args.min_bucket_reso if args.enable_bucket else None,
                "ss_max_bucket_reso": args.max_bucket_reso if args.enable_bucket else None,
                "ss_bucket_no_upscale": args.bucket_no_upscale,
                "ss_cache_latents": args.cache_latents,
                "ss_flip_aug": args.flip_aug,
                "ss_random_crop": args.random_crop,
                "ss_caption_dropout_rate": args.caption_dropout_rate,
                "ss_caption_tag_dropout_rate": args.caption_tag_dropout_rate,
                "ss_shuffle_caption": args.shuffle_caption,
                "ss_keep_tokens": args.keep_tokens,
                "ss_keep_tokens_separator": args.keep_tokens_separator,
                "ss_color_aug": args.color_aug,
                "ss_prior_loss_weight": args.prior_loss_weight,
                "ss_validation_split": args.validation_split,
                "ss_validation_seed": args.validation_seed,
                "ss_training_comment": args.training_comment,
                **_dataset_keys(records, buckets),
                **objective,
            }
        )
    return {
        key: value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        for key, value in values.items()
        if value is not None
    }
