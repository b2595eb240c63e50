"""The accelerate side of training: accelerator, optimizer, lr schedule, step plan, gradient sync and progress."""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from .args import UsageError, parse_key_values
from .batches import EpochPlan
from .network import optimizer_groups
from .sharded import same_adapter_everywhere


def make_accelerator(args: argparse.Namespace, *, unused_parameters: bool = False) -> Accelerator:
    """One accelerator for the run: mixed precision and trackers. ``accelerate launch`` supplies the processes.

    ``unused_parameters``: some trained parameters get no gradient (SDXL's TE1 last layer, whose output SDXL does not
    use), so multi-GPU DDP must look for them. Gradient accumulation is handled by ``GradientSteps`` (exact to resume,
    syncs at epoch ends), not by accelerate.
    """
    log_with = None if not args.log_with else (["tensorboard", "wandb"] if args.log_with == "all" else [args.log_with])
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=args.logging_dir),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused_parameters)],
    )
    check_distributed_setup(accelerator, args)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        _cpu_fp16_autocast_and_scaler(accelerator)
    return accelerator


def check_distributed_setup(accelerator: Accelerator, args: argparse.Namespace) -> None:
    """Refuse, before any model loads, the ``accelerate launch`` setups whose result the trainers could not save.

    FSDP runs as accelerate's ``fsdp_version: 2`` (``fully_shard``: modules keep their names and classes, parameters
    become ``DTensor`` shards, which ``sharded`` gathers for every save). accelerate's FSDP2 shards one model per
    ``prepare``, so only the denoiser trains; FSDP1 wraps modules (their names change) and accelerate's
    activation checkpointing wraps them too, so both are refused. DeepSpeed (ZeRO-1/2 keep parameters whole, so the
    adapter saves) wraps exactly one model, steps its own gradient accumulation, and partitions the optimizer state
    per process.
    """
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        problems = []
        if plugin.fsdp_version != 2:
            problems.append("fsdp_version: 2 (FSDP1 renames the wrapped modules)")
        if plugin.activation_checkpointing:
            problems.append("fsdp_activation_checkpointing: false and --gradient_checkpointing instead")
        if not args.network_train_unet_only:
            problems.append("--network_train_unet_only (accelerate's FSDP2 shards one trained model)")
        if getattr(args, "scale_weight_norms", None):
            problems.append("no --scale_weight_norms (it reads whole ΔW between steps)")
        if getattr(args, "fp8_base", False):
            problems.append("no --fp8_base (not verified with FSDP, which all-gathers the base cast to bf16/fp16)")
        if getattr(args, "optimizer_type", "AdamW") == "AdamW8bit":
            problems.append("--optimizer_type AdamW (bitsandbytes' 8-bit step has no sharded-tensor support)")
        if problems:
            raise UsageError("with FSDP, use " + "; ".join(problems))
    if kind == DistributedType.DEEPSPEED:
        problems = []
        if not args.network_train_unet_only:
            problems.append("--network_train_unet_only (DeepSpeed trains one model; the text encoders stay frozen)")
        if args.gradient_accumulation_steps != 1:
            problems.append(
                "--gradient_accumulation_steps 1 and gradient_accumulation_steps: 1 in the DeepSpeed config "
                "(raise --train_batch_size instead)"
            )
        if args.save_state or args.resume:
            problems.append("no --save_state/--resume (ZeRO partitions the optimizer state per process)")
        if problems:
            raise UsageError("with DeepSpeed, use " + "; ".join(problems))


def fill_deepspeed_batch_size(accelerator: Accelerator, args: argparse.Namespace) -> None:
    """Under DeepSpeed: tell it the per-process micro-batch (``--train_batch_size``) when its config leaves it "auto".

    accelerate fills "auto" from the batch size of a DataLoader passed to ``prepare``, and the trainers build their
    batches themselves, so ``prepare`` would stop with "requires you to pass at least one of training or evaluation
    dataloaders". Must run before ``accelerator.prepare``."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    plugin = accelerator.state.deepspeed_plugin
    if plugin.is_auto("train_micro_batch_size_per_gpu"):
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.train_batch_size


def _cpu_fp16_autocast_and_scaler(accelerator: Accelerator) -> None:
    """accelerate turns fp16 mixed precision into nothing on CPU (no autocast, no loss scaling), so an fp16 run there
    used to compute in a mix of fp16 weights and fp32 adapters without either. torch has both on CPU: switch on
    accelerate's own native-AMP path with a CPU ``GradScaler``, so ``accelerator.autocast``, ``backward``,
    ``clip_grad_norm_`` and the prepared optimizer scale, unscale and skip steps exactly as on a GPU. Must run before
    ``accelerator.prepare``."""
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu")


def start_trackers(accelerator: Accelerator, args: argparse.Namespace, default_name: str) -> None:
    """Open the ``--log_with`` trackers (TensorBoard/wandb) with every option as the run's config."""
    if args.log_with:
        accelerator.init_trackers(
            args.log_tracker_name or default_name, config={k: str(v) for k, v in vars(args).items()}
        )


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype frozen weights are kept in: fp16/bf16 under mixed precision, else float32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def place_frozen(accelerator: Accelerator, vae: torch.nn.Module, models: Iterable[torch.nn.Module]) -> torch.dtype:
    """Freeze everything and move it to the device: the VAE in float32 (SDXL's VAE overflows in fp16), the other
    models in the mixed-precision dtype (adapters added later stay float32). Returns that dtype."""
    dtype = weight_dtype(accelerator)
    vae.to(accelerator.device).float().requires_grad_(False)
    for model in models:
        model.to(accelerator.device).requires_grad_(False)
        if dtype != torch.float32:
            model.to(dtype)
    return dtype


def make_optimizer(args: argparse.Namespace, param_groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW from torch, or bitsandbytes' AdamW8bit; ``--optimizer_args`` become keyword arguments."""
    kwargs = parse_key_values(args.optimizer_args, "--optimizer_args")
    if args.optimizer_type == "AdamW8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(param_groups, lr=args.learning_rate, **kwargs)
    return torch.optim.AdamW(param_groups, lr=args.learning_rate, **kwargs)


@dataclass(frozen=True)
class StepPlan:
    """How long training runs: optimizer steps per epoch, total steps and total epochs."""

    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    total_epochs: int


def plan_steps(
    batches_per_epoch: int, accumulation: int, max_train_steps: int, max_train_epochs: int | None
) -> StepPlan:
    """``--max_train_epochs`` wins over ``--max_train_steps`` (sd-scripts); an epoch ends with an optimizer step."""
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    total_steps = max_train_epochs * steps_per_epoch if max_train_epochs else max_train_steps
    return StepPlan(batches_per_epoch, steps_per_epoch, total_steps, math.ceil(total_steps / steps_per_epoch))


def make_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, total_steps: int):
    """A diffusers lr schedule stepped once per optimizer step; warmup may be a fraction (< 1) of all steps."""
    warmup = args.lr_warmup_steps
    warmup_steps = int(warmup * total_steps) if 0 < warmup < 1 else int(warmup)
    return get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=total_steps,
        num_cycles=args.lr_scheduler_num_cycles,
        power=args.lr_scheduler_power,
    )


class GradientSteps:
    """Which micro-batches end an optimizer step: every ``accumulation`` batches and at the end of each epoch.

    Between sync points DDP's gradient all-reduce is skipped (``no_sync``); the loss is divided by the size of the
    current accumulation group so every optimizer step averages over the batches it saw.
    """

    def __init__(self, accelerator: Accelerator, models: Iterable[torch.nn.Module], accumulation: int):
        self.accelerator, self.models, self.accumulation = accelerator, list(models), accumulation

    def group_size(self, batch_index: int, batches_per_epoch: int) -> int:
        start = batch_index - batch_index % self.accumulation
        return min(self.accumulation, batches_per_epoch - start)

    def is_sync(self, batch_index: int, batches_per_epoch: int) -> bool:
        return (batch_index + 1) % self.accumulation == 0 or batch_index + 1 == batches_per_epoch

    def context(self, sync: bool):
        """``no_sync`` on every trained model for a non-final micro-batch, nothing otherwise."""
        stack = contextlib.ExitStack()
        if not sync:
            for model in self.models:
                stack.enter_context(self.accelerator.no_sync(model))
        return stack


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Learning rate per parameter group, by the group's name when it has one."""
    return {group.get("name", f"group{i}"): group["lr"] for i, group in enumerate(optimizer.param_groups)}


def progress_bar(accelerator: Accelerator, total: int, initial: int) -> tqdm:
    return tqdm(total=total, initial=initial, desc="steps", disable=not accelerator.is_local_main_process)


def trainable_parameters(*models: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for model in models for p in model.parameters() if p.requires_grad]


def epoch_plan(args: argparse.Namespace, accelerator: Accelerator, records: list, buckets: list) -> EpochPlan:
    """The run's epoch plan: its images and buckets, split over this run's processes, drawn from ``--seed``."""
    return EpochPlan(
        records,
        buckets,
        seed=args.seed,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
    )


@dataclass
class Training:
    """Everything the loop steps: the data plan, the step plan, the (accelerate-prepared) trained models by
    component, optimizer and lr schedule."""

    data: EpochPlan
    steps: StepPlan
    models: dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any


def prepare_training(
    args: argparse.Namespace,
    accelerator: Accelerator,
    records: list,
    buckets: list[tuple[int, int]],
    trained: dict[str, torch.nn.Module],
) -> Training:
    """Plan epochs and steps, build optimizer (sd-scripts lr groups) and lr schedule, let accelerate wrap the models
    (DDP or FSDP under ``accelerate launch``)."""
    data = epoch_plan(args, accelerator, records, buckets)
    steps = plan_steps(
        data.batches_per_epoch, args.gradient_accumulation_steps, args.max_train_steps, args.max_train_epochs
    )
    optimizer = make_optimizer(args, optimizer_groups(args, trained))
    lr_scheduler = make_scheduler(args, optimizer, steps.total_steps)
    same_adapter_everywhere(accelerator, trained)
    fill_deepspeed_batch_size(accelerator, args)
    prepared = accelerator.prepare(*trained.values(), optimizer)
    return Training(data, steps, dict(zip(trained, prepared[:-1])), prepared[-1], lr_scheduler)
