"""The training loop both trainers share: epochs of batches, gradient accumulation, optimizer and lr steps,
progress and tracker logging, periodic saves and samples, exact resume.

The model-specific parts arrive as three callables: the loss of one batch, writing adapter files, rendering samples.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .batches import BatchBuilder, epoch_loader
from .loop import GradientSteps, Training, current_lrs, progress_bar, start_trackers, trainable_parameters
from .state import Position, load_state, run_fingerprint, save_state, state_folder_name
from .validation import Validator


@dataclass
class Hooks:
    """Model-specific callbacks: ``loss(batch, draw=None)`` gives each sample's loss (shape (batch,)), drawing its noise
    from ``batch["noise_seeds"]`` (or from ``draw``, a ``validation.FixedDraw`` with fixed noise generators and noise
    level, during validation); ``save(stem, position)`` writes adapter files named ``stem``; ``sample(step)`` renders
    ``--sample_prompts`` (None when not sampling); both return the paths written."""

    loss: Callable[..., torch.Tensor]
    save: Callable[[str, Position], list[Path]]
    sample: Optional[Callable[[int], list[Path]]] = None


@dataclass
class History:
    """What happened: the loss of every optimizer step, the validation losses as (step, "step" or "epoch", loss),
    the files written, where training stopped."""

    losses: list[float] = field(default_factory=list)
    validation: list[tuple[int, str, float]] = field(default_factory=list)
    saved: list[Path] = field(default_factory=list)
    position: Optional[Position] = None
    final: Optional[Path] = None


def step_loss(per_sample: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
    """This process's part of a global batch's loss: the samples' losses weighted by their shares (which sum to the
    number of processes over the whole global batch, so the process average DDP/FSDP take is the batch mean)."""
    return (per_sample.float() * shares.to(per_sample.device, torch.float32)).sum()


def _save_due(every: Optional[int], count: int) -> bool:
    return bool(every) and count % every == 0


class Trainer:
    """Runs the loop of one ``Training`` (models, optimizer, schedule, data and step plans) on one accelerator."""

    def __init__(
        self,
        args: argparse.Namespace,
        accelerator,
        training: Training,
        build: BatchBuilder,
        hooks: Hooks,
        validator: Optional[Validator] = None,
    ):
        self.args, self.accelerator, self.training, self.validator = args, accelerator, training, validator
        self.models, self.optimizer, self.lr_scheduler = training.models, training.optimizer, training.lr_scheduler
        self.data, self.steps, self.build, self.hooks = training.data, training.steps, build, hooks
        self.fingerprint = run_fingerprint(args, training.data.batches_per_epoch)
        self.gradients = GradientSteps(accelerator, self.models.values(), args.gradient_accumulation_steps)
        self.history = History()
        self.last_validation: Optional[float] = None

    # ------------------------------------------------------------------------------------------------- state
    def resume(self, folder: str) -> Position:
        position = load_state(Path(folder), self.accelerator, self.training, self.fingerprint)
        self.accelerator.print(
            f"resumed from {folder}: step {position.step}, epoch {position.epoch + 1}, "
            f"batch {position.batch} of {self.data.batches_per_epoch}"
        )
        return position

    def _save(self, position: Position, *, stem: str, state_name: str) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.history.saved += self.hooks.save(stem, position)
        if self.args.save_state:
            folder = Path(self.args.output_dir) / state_name
            save_state(folder, self.accelerator, self.training, position, self.fingerprint)
            self.history.saved.append(folder)

    def _sample(self, step: int) -> None:
        if self.hooks.sample is not None and self.args.sample_prompts and self.accelerator.is_main_process:
            for model in self.models.values():
                model.eval()
            self.history.saved += self.hooks.sample(step)
            for model in self.models.values():
                model.train()
        self.accelerator.wait_for_everyone()

    def _validate(self, position: Position, kind: str, bar) -> None:
        """Validation loss of the current adapter, logged as sd-scripts names it and shown on the progress bar."""
        value = self.validator(self.models.values())
        recent = self.history.losses[-self.steps.steps_per_epoch :]
        divergence = value - sum(recent) / len(recent) if recent else 0.0
        self.history.validation.append((position.step, kind, value))
        self.accelerator.log(
            {f"loss/validation/{kind}_average": value, f"loss/validation/{kind}_divergence": divergence},
            step=position.step,
        )
        self.last_validation = value
        self._show(bar)

    def _show(self, bar) -> None:
        """Progress-bar postfix: the last step's loss and learning rate, and the last validation loss."""
        shown = {}
        if self.history.losses:
            shown["loss"] = f"{self.history.losses[-1]:.4f}"
        shown["lr"] = f"{next(iter(current_lrs(self.optimizer).values())):.2e}"
        if self.last_validation is not None:
            shown["val_loss"] = f"{self.last_validation:.4f}"
        bar.set_postfix(shown)

    # -------------------------------------------------------------------------------------------------- loop
    def _optimizer_step(self) -> None:
        if self.args.max_grad_norm:
            self.accelerator.clip_grad_norm_(trainable_parameters(*self.models.values()), self.args.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _after_step(self, position: Position, loss: float, bar) -> None:
        args = self.args
        self.history.losses.append(loss)
        lrs = current_lrs(self.optimizer)
        bar.update(1)
        self._show(bar)
        self.accelerator.log({"loss": loss, **{f"lr/{name}": lr for name, lr in lrs.items()}}, step=position.step)
        if position.step < self.steps.total_steps and _save_due(args.save_every_n_steps, position.step):
            self._save(
                position,
                stem=f"{args.output_name}-step{position.step:08d}",
                state_name=state_folder_name(args.output_name, step=position.step),
            )
        if _save_due(args.sample_every_n_steps, position.step):
            self._sample(position.step)
        if self.validator and _save_due(args.validate_every_n_steps, position.step):
            self._validate(position, "step", bar)

    def _after_epoch(self, position: Position, bar) -> None:
        args, epoch = self.args, position.epoch
        if position.step < self.steps.total_steps and _save_due(args.save_every_n_epochs, epoch):
            self._save(
                position,
                stem=f"{args.output_name}-{epoch:06d}",
                state_name=state_folder_name(args.output_name, epoch=epoch),
            )
        if _save_due(args.sample_every_n_epochs, epoch):
            self._sample(position.step)
        if self.validator and (args.validate_every_n_epochs is None or _save_due(args.validate_every_n_epochs, epoch)):
            self._validate(position, "epoch", bar)

    def run(self, tracker_name: str, summary: str = "") -> History:
        """Open the trackers, resume if ``--resume`` says so, train to the planned number of steps, save the final
        files (and state) and list what was written; the models are left in eval mode."""
        args, accelerator, steps = self.args, self.accelerator, self.steps
        start_trackers(accelerator, args, tracker_name)
        start = self.resume(args.resume) if args.resume else Position(0, 0, 0)
        accelerator.print(
            f"{summary}{', ' if summary else ''}{self.data.batches_per_epoch} batches per epoch, "
            f"{steps.total_steps} steps in {steps.total_epochs} epochs, seed {args.seed}"
        )
        step, per_epoch = start.step, self.data.batches_per_epoch
        for model in self.models.values():
            model.train()
        if args.sample_at_first and start.step == 0:
            self._sample(0)
        bar = progress_bar(accelerator, steps.total_steps, step)
        accumulated = 0.0
        position = start
        for epoch in range(start.epoch, steps.total_epochs):
            skip = start.batch if epoch == start.epoch else 0
            loader = epoch_loader(self.data, self.build, epoch, skip=skip, workers=args.max_data_loader_n_workers)
            for batch_index, batch in enumerate(loader, start=skip):
                sync = self.gradients.is_sync(batch_index, per_epoch)
                group = self.gradients.group_size(batch_index, per_epoch)
                with self.gradients.context(sync):
                    with accelerator.autocast():
                        loss = step_loss(self.hooks.loss(batch), batch["shares"])
                    value = accelerator.reduce(loss.detach().float(), "mean").item()
                    if not math.isfinite(value):
                        raise FloatingPointError(
                            f"loss became {value} at step {step + 1} (epoch {epoch + 1}, batch "
                            f"{batch_index}); lower the learning rate or train in bf16/fp32"
                        )
                    accelerator.backward(loss / group)
                accumulated += value / group
                if not sync:
                    continue
                self._optimizer_step()
                step += 1
                at_epoch_end = batch_index + 1 == per_epoch
                position = Position(step, epoch + 1 if at_epoch_end else epoch, 0 if at_epoch_end else batch_index + 1)
                self._after_step(position, accumulated, bar)
                accumulated = 0.0
                if step >= steps.total_steps:
                    break
            if position.batch == 0 and position.epoch == epoch + 1:
                self._after_epoch(position, bar)
            if step >= steps.total_steps:
                break
        bar.close()
        self.history.position = position
        self._save(position, stem=args.output_name, state_name=state_folder_name(args.output_name))
        self.history.final = Path(args.output_dir) / f"{args.output_name}.safetensors"
        accelerator.end_training()
        for model in self.models.values():
            model.eval()
        losses = self.history.losses
        if len(losses) >= 2:
            span = max(1, min(10, len(losses) // 2))
            accelerator.print(
                f"loss: mean of the first {span} steps {sum(losses[:span]) / span:.4f}, "
                f"of the last {span} steps {sum(losses[-span:]) / span:.4f}"
            )
        accelerator.print("files written:\n" + "\n".join(f"  {path}" for path in self.history.saved))
        return self.history
