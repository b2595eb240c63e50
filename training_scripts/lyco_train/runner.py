"""The training loop both trainers share: epochs of batches, gradient accumulation, optimizer and lr steps,
progress and tracker logging, periodic saves and samples, exact resume.

The model-specific parts arrive as three callables: the loss of one batch, writing adapter files, rendering samples.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .args import UsageError
from .batches import BatchBuilder, epoch_loader
from .files import remove_leftovers
from .interrupt import StopRequest
from .loop import (
    GradientSteps,
    Training,
    current_lrs,
    epoch_plan,
    progress_bar,
    start_trackers,
    trainable_parameters,
)
from .max_norm import MaxNormReport, apply_max_norm
from .pruning import Retention, prune
from .sharded import clip_gradients, whole_adapter, whole_model
from .state import (
    Position,
    StateError,
    any_process,
    check_same_run,
    load_state,
    read_state,
    remove_stale_state_files,
    rng_snapshot,
    run_fingerprint,
    save_state,
    state_folder_name,
)
from .validation import Validator


@dataclass
class Hooks:
    """Model-specific callbacks: ``loss(batch, draw=None)`` gives each sample's loss (shape (batch,)), drawing its noise
    from ``batch["noise_seeds"]`` (or from ``draw``, a ``validation.FixedDraw`` with fixed noise generators and noise
    level, during validation); ``save(stem, position)`` writes adapter files named ``stem``; ``sample(step)`` renders
    ``--sample_prompts`` (None when not sampling); both return the paths written.

    Samples are optional: they run only after the files of their step are saved, and one that raises is reported
    while training goes on."""

    loss: Callable[..., torch.Tensor]
    save: Callable[[str, Position], list[Path]]
    sample: Callable[[int], list[Path]] | None = None


@dataclass
class History:
    """What happened: the loss of every optimizer step, the validation losses as (step, "step" or "epoch", loss),
    the files written, where training stopped."""

    losses: list[float] = field(default_factory=list)
    validation: list[tuple[int, str, float]] = field(default_factory=list)
    saved: list[Path] = field(default_factory=list)
    position: Position | None = None
    final: Path | None = None


def check_resume_fits(args, accelerator, records: list, buckets: list, components: tuple[str, ...]) -> None:
    """With ``--resume``: once the images are known, and still before any model loads, refuse a state saved by
    another run (network, seed, data layout, processes, trained ``components``) with ``UsageError`` naming the
    differences."""
    if not args.resume:
        return
    plan = epoch_plan(args, accelerator, records, buckets)
    try:
        state = read_state(args.resume)
        check_same_run(
            args.resume, state, run_fingerprint(args, plan.batches_per_epoch), accelerator.num_processes, components
        )
    except StateError as err:
        raise UsageError(f"cannot start training:\n  --resume: {err}") from None


def step_loss(per_sample: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
    """This process's part of a global batch's loss: the samples' losses weighted by their shares (which sum to the
    number of processes over the whole global batch, so the process average DDP/FSDP take is the batch mean)."""
    return (per_sample.float() * shares.to(per_sample.device, torch.float32)).sum()


def _save_due(every: int | None, count: int) -> bool:
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
        validator: Validator | None = None,
    ):
        self.args, self.accelerator, self.training, self.validator = args, accelerator, training, validator
        self.models, self.optimizer, self.lr_scheduler = training.models, training.optimizer, training.lr_scheduler
        self.data, self.steps, self.build, self.hooks = training.data, training.steps, build, hooks
        self.fingerprint = run_fingerprint(args, training.data.batches_per_epoch)
        self.gradients = GradientSteps(accelerator, self.models.values(), args.gradient_accumulation_steps)
        self.history = History()
        self.last_step: tuple[Position, tuple] | None = None
        self.retention = Retention.from_args(args)
        self.max_norm: MaxNormReport | None = None
        self.last_validation: float | None = None

    # ------------------------------------------------------------------------------------------------- state
    def resume(self, folder: str) -> Position:
        position = load_state(Path(folder), self.accelerator, self.training, self.fingerprint)
        self.accelerator.print(
            f"resumed from {folder}: step {position.step}, epoch {position.epoch + 1}, "
            f"batch {position.batch} of {self.data.batches_per_epoch}"
        )
        return position

    def _save(
        self,
        position: Position,
        *,
        stem: str,
        state_name: str,
        periodic: tuple | None = None,
        final: bool = False,
        rng=None,
    ) -> None:
        """Write the adapter files (main process) and the state (every process; ``rng``: see ``save_state``);
        ``periodic`` = (kind, number, every) of a periodic save, after which ``--save_last_n_*`` removes the saves that
        fall out of the kept window. A periodic save that fails with ``OSError`` (a full disk) is reported, prunes
        nothing, and training goes on, so the next save can succeed; a failing final save raises."""
        self.accelerator.wait_for_everyone()
        error = None
        with whole_adapter(self.accelerator, self.models):  # under FSDP: gathered by every process
            if self.accelerator.is_main_process:
                try:
                    self.history.saved += self.hooks.save(stem, position)
                except OSError as err:
                    error = err
        if self.args.save_state:
            folder = Path(self.args.output_dir) / state_name
            try:
                save_state(folder, self.accelerator, self.training, position, self.fingerprint, rng=rng)
                self.history.saved.append(folder)
            except OSError as err:
                error = error or err
        if periodic is not None and error is None and self.accelerator.is_main_process:
            kind, number, every = periodic
            removed = prune(
                Path(self.args.output_dir), self.args.output_name, self.retention, kind=kind, number=number, every=every
            )
            self.history.saved = [path for path in self.history.saved if path not in removed]
        self.accelerator.wait_for_everyone()
        if error is not None:
            if final:
                raise error
            self.accelerator.print(
                f"warning: saving at step {position.step} failed ({type(error).__name__}: {error}); "
                "training goes on and the next save tries again"
            )

    def _save_final(self, position: Position) -> None:
        self.history.position = position
        args = self.args
        self._save(position, stem=args.output_name, state_name=state_folder_name(args.output_name), final=True)
        self.history.final = Path(args.output_dir) / f"{args.output_name}.safetensors"

    def _sample(self, step: int) -> None:
        """Render the samples of ``step``; any exception is reported (the files of the step are already saved).
        Under FSDP every process first gathers the whole model, so the main process can render alone."""
        if self.hooks.sample is not None and self.args.sample_prompts:
            with whole_model(self.accelerator, self.models):
                self._render(step)
        self.accelerator.wait_for_everyone()

    def _render(self, step: int) -> None:
        """The main process's part of ``_sample``."""
        if self.accelerator.is_main_process:
            for model in self.models.values():
                model.eval()
            try:
                self.history.saved += self.hooks.sample(step)
            except Exception as err:  # noqa: BLE001 (a sample is optional: whatever went wrong, training goes on)
                traceback.print_exc(file=sys.stderr)
                self.accelerator.print(
                    f"warning: sampling at step {step} failed ({type(err).__name__}: {err}); "
                    "the adapter files are saved and training goes on"
                )
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            finally:
                for model in self.models.values():
                    model.train()

    def _stop(self, position: Position, signum: int | None) -> None:
        """After Ctrl+C or SIGTERM: save the step just done (unless a periodic save just did), say how to go on, and
        exit with the signal's conventional status."""
        args = self.args
        state_name = state_folder_name(args.output_name, step=position.step)
        if not _save_due(args.save_every_n_steps, position.step):
            self._save(position, stem=f"{args.output_name}-step{position.step:08d}", state_name=state_name)
        how = (
            f"continue with --resume {Path(args.output_dir) / state_name}"
            if args.save_state
            else "add --save_state to be able to resume a stopped run"
        )
        self.accelerator.print(f"stopped at step {position.step} of {self.steps.total_steps}, with it saved; {how}")
        self.accelerator.end_training()
        raise SystemExit(128 + (signum or signal.SIGTERM))

    def _save_after_failure(self, position: Position, rng, error: Exception) -> None:
        """Training raised while computing the step after ``position`` (out of memory, a NaN loss, a broken image):
        save the last completed step with the RNG states it ended with, so the work since the last save is kept and
        a resume from it is exact. Single process only: other processes may be stuck in a collective."""
        args = self.args
        if self.accelerator.num_processes > 1 or _save_due(args.save_every_n_steps, position.step):
            return
        state_name = state_folder_name(args.output_name, step=position.step)
        try:
            self._save(position, stem=f"{args.output_name}-step{position.step:08d}", state_name=state_name, rng=rng)
        except Exception as failure:  # noqa: BLE001 (the original error is what the user must see)
            self.accelerator.print(f"warning: could not save step {position.step} after the failure: {failure}")
            return
        how = f"; continue with --resume {Path(args.output_dir) / state_name}" if args.save_state else ""
        self.accelerator.print(
            f"training failed in step {position.step + 1} ({type(error).__name__}); step {position.step} is saved{how}"
        )

    def _remove_leftovers(self) -> None:
        """Remove what killed saves of this ``--output_name`` left behind (temporary files, uncommitted state files)."""
        if not self.accelerator.is_main_process:
            return
        removed = remove_leftovers(self.args.output_dir, self.args.output_name)
        removed += remove_stale_state_files(self.args.output_dir, self.args.output_name)
        if removed:
            self.accelerator.print(
                f"removed {len(removed)} leftover(s) of an interrupted save: " + ", ".join(str(p) for p in removed[:5])
            )

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
        if self.max_norm is not None:  # sd-scripts' names
            shown["Keys Scaled"] = self.max_norm.keys_scaled
            shown["Average key norm"] = f"{self.max_norm.mean_norm:.4g}"
        bar.set_postfix(shown)

    # -------------------------------------------------------------------------------------------------- loop
    def _optimizer_step(self) -> None:
        if self.args.max_grad_norm:
            clip_gradients(self.accelerator, trainable_parameters(*self.models.values()), self.args.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.args.scale_weight_norms:
            models = [self.accelerator.unwrap_model(model) for model in self.models.values()]
            self.max_norm = apply_max_norm(models, self.args.scale_weight_norms)

    def _after_step(self, position: Position, loss: float, bar) -> None:
        args = self.args
        self.history.losses.append(loss)
        lrs = current_lrs(self.optimizer)
        bar.update(1)
        self._show(bar)
        logs = {"loss": loss, **{f"lr/{name}": lr for name, lr in lrs.items()}}
        if self.max_norm is not None:
            logs.update(self.max_norm.logs())
        self.accelerator.log(logs, step=position.step)
        if position.step >= self.steps.total_steps:
            self._save_final(position)
        elif _save_due(args.save_every_n_steps, position.step):
            self._save(
                position,
                stem=f"{args.output_name}-step{position.step:08d}",
                state_name=state_folder_name(args.output_name, step=position.step),
                periodic=("step", position.step, args.save_every_n_steps),
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
                periodic=("epoch", epoch, args.save_every_n_epochs),
            )
        if _save_due(args.sample_every_n_epochs, epoch):
            self._sample(position.step)
        if self.validator and (args.validate_every_n_epochs is None or _save_due(args.validate_every_n_epochs, epoch)):
            self._validate(position, "epoch", bar)

    def _train(self, start: Position, stop: StopRequest) -> Position:
        """The epochs from ``start`` to the planned number of steps; returns where training stopped. After each
        completed step ``self.last_step`` holds its position and RNG states (None while an optimizer step is under
        way), which ``_save_after_failure`` saves if what follows fails."""
        args, accelerator, steps = self.args, self.accelerator, self.steps
        step, per_epoch = start.step, self.data.batches_per_epoch
        bar = progress_bar(accelerator, steps.total_steps, step)
        accumulated = 0.0
        position = start
        self.last_step = (start, rng_snapshot())
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
                self.last_step = None  # until the step is recorded, a failure leaves no exact state
                self._optimizer_step()
                step += 1
                at_epoch_end = batch_index + 1 == per_epoch
                position = Position(step, epoch + 1 if at_epoch_end else epoch, 0 if at_epoch_end else batch_index + 1)
                self.last_step = (position, rng_snapshot())  # the step is complete: saves, samples may follow
                self._after_step(position, accumulated, bar)
                accumulated = 0.0
                if step < steps.total_steps and any_process(accelerator, stop.signum is not None):
                    self._stop(position, stop.signum)
                if step >= steps.total_steps:
                    break
            if position.batch == 0 and position.epoch == epoch + 1:
                self._after_epoch(position, bar)
            if step >= steps.total_steps:
                break
        bar.close()
        return position

    def run(self, tracker_name: str, summary: str = "") -> History:
        """Resume if ``--resume`` says so, remove leftovers of killed saves, open the trackers, train to the planned
        number of steps, save the final files (and state) before the last samples and list what was written; the
        models are left in eval mode. Ctrl+C or SIGTERM stops after the current step, with it saved
        (``SystemExit`` with status 128 + the signal number); an exception in a step saves the step before it."""
        args, accelerator, steps = self.args, self.accelerator, self.steps
        start = self.resume(args.resume) if args.resume else Position(0, 0, 0)
        self._remove_leftovers()
        start_trackers(accelerator, args, tracker_name)
        accelerator.print(
            f"{summary}{', ' if summary else ''}{self.data.batches_per_epoch} batches per epoch, "
            f"{steps.total_steps} steps in {steps.total_epochs} epochs, seed {args.seed}"
        )
        for model in self.models.values():
            model.train()
        if args.sample_at_first and start.step == 0:
            self._sample(0)
        with StopRequest() as stop:
            try:
                position = self._train(start, stop)
            except Exception as error:
                if self.last_step is not None and self.last_step[0].step > start.step:
                    self._save_after_failure(*self.last_step, error)
                raise
        if self.history.final is None:  # nothing left to train after a resume: save what was resumed
            self._save_final(position)
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
