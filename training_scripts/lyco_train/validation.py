"""Validation loss on the held-out images, measured the same way every time so that runs and steps compare.

As in sd-scripts, every validation batch is evaluated at four fixed points of the noise schedule: timesteps 200, 400,
600 and 800 of 1000 (SDXL), σ = 0.2, 0.4, 0.6, 0.8 (Anima's rectified flow), and the validation loss is the mean over
batches and points. The noise of sample ``i`` of batch ``b`` at point ``k`` comes from a CPU generator seeded by
``validation_noise_seed(seed, b, k, i)`` (``seed`` = ``--validation_seed``, else ``--seed``), so it is the same noise
at every validation of a run, and in a resumed run. Validation never touches the training random state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from .batches import BatchBuilder, Sample, TrainingData, validation_batches

VALIDATION_POINTS = (0.2, 0.4, 0.6, 0.8)  # sd-scripts: linspace(0, 1000, 6)[1:-1] of the training timesteps


def validation_noise_seed(seed: int, batch_index: int, point_index: int, position: int) -> int:
    """The seed of the noise generator of sample ``position`` of validation batch ``batch_index`` at point
    ``point_index``."""
    state = np.random.SeedSequence([seed, batch_index, point_index, position]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


@dataclass(frozen=True)
class FixedDraw:
    """What a loss function uses instead of random draws during validation: one freshly seeded noise generator per
    sample and the point of the noise schedule (a fraction of the way from clean to pure noise)."""

    generators: list[torch.Generator]
    fraction: float

    def timesteps(self, num_train_timesteps: int, device: torch.device) -> torch.Tensor:
        """DDPM timesteps: ``fraction`` of ``num_train_timesteps`` for every sample."""
        batch = len(self.generators)
        return torch.full((batch,), round(self.fraction * num_train_timesteps), dtype=torch.long, device=device)

    def sigmas(self, device: torch.device) -> torch.Tensor:
        """Rectified-flow σ: ``fraction`` for every sample."""
        return torch.full((len(self.generators),), self.fraction, dtype=torch.float32, device=device)


class Validator:
    """Computes the validation loss of the current adapter: the mean of ``loss(batch, draw)`` (per-sample losses) over
    every held-out batch (at most ``max_steps`` of them) at every point of ``VALIDATION_POINTS``, each batch's value the
    mean over its samples, in eval mode and without gradients.

    Every process evaluates every batch (the held-out share is small), so all processes get the same value.
    """

    def __init__(
        self,
        batches: list[list[Sample]],
        build: Callable[[list[Sample]], dict],
        loss: Callable[[dict, FixedDraw], torch.Tensor],
        *,
        seed: int,
        accelerator,
        max_steps: int | None = None,
    ):
        self.batches = batches[:max_steps] if max_steps else batches
        self.build, self.loss, self.seed, self.accelerator = build, loss, seed, accelerator

    def __len__(self) -> int:
        return len(self.batches)

    def __call__(self, models: Iterable[torch.nn.Module]) -> float:
        models = list(models)
        modes = [model.training for model in models]
        for model in models:
            model.eval()
        losses = []
        try:
            with torch.no_grad():
                for b, samples in enumerate(self.batches):
                    batch = self.build(samples)
                    for k, fraction in enumerate(VALIDATION_POINTS):
                        generators = [
                            torch.Generator().manual_seed(validation_noise_seed(self.seed, b, k, i))
                            for i in range(len(samples))
                        ]
                        with self.accelerator.autocast():
                            per_sample = self.loss(batch, FixedDraw(generators, fraction))
                        losses.append(float(per_sample.detach().float().mean()))
        finally:
            for model, mode in zip(models, modes):
                model.train(mode)
        return sum(losses) / len(losses)


def make_validator(args, accelerator, data: TrainingData, latent_cache, loss) -> Validator | None:
    """The run's validator over ``data``'s held-out images (None when nothing is held out); the noise seed is
    ``--validation_seed``, else ``--seed``."""
    if not data.validation_records:
        asked = args.validate_every_n_steps or args.validate_every_n_epochs or args.max_validation_steps
        if asked or args.validation_split > 0:
            accelerator.print(
                "no validation: no images are held out (--validation_split / validation_split too small for the "
                "subsets, or not set)"
            )
        return None
    build = BatchBuilder(data.validation_records, data.validation_buckets, latent_cache)
    return Validator(
        validation_batches(data.validation_records, data.validation_buckets),
        build,
        loss,
        seed=args.validation_seed if args.validation_seed is not None else args.seed,
        accelerator=accelerator,
        max_steps=args.max_validation_steps,
    )
