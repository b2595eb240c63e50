"""Epochs as deterministic lists of batches, and the loader that turns a batch into tensors.

An epoch's order, flips, crops and caption drops are a pure function of (seed, epoch), so a resumed run sees exactly
the batches the interrupted one would have seen, whatever the number of data-loader workers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from .args import bucket_settings
from .buckets import assign_buckets, fit_geometry, fit_image
from .data import ImageRecord, scan_dataset
from .tiny import prepare_tiny_data


@dataclass(frozen=True)
class Sample:
    """One image occurrence in an epoch: which record, flipped or not, where to crop (None = centre), caption kept;
    the seed of its noise and timestep, and its share of the step's loss (0 for a filler that only keeps a process
    busy)."""

    record: int
    flip: bool
    crop_offset: Optional[float]
    drop_caption: bool
    noise_seed: int = 0
    share: float = 1.0


def noise_seed(seed: int, epoch: int, batch: int, position: int) -> int:
    """The seed of one sample's noise and timestep: a hash of (run seed, epoch, global batch of the epoch, position
    in that batch), so the draw does not depend on how many processes share the batch, nor on a resume."""
    return int(np.random.SeedSequence([seed, epoch, batch, position]).generate_state(1, np.uint64)[0] >> 1)


class EpochPlan:
    """Global batches of same-bucket samples per epoch, each split over the processes of a multi-GPU run.

    A global batch holds ``batch_size × num_processes`` samples (fewer at the end of a bucket); the processes take
    contiguous near-equal slices of it. Everything about a sample (order, flip, crop, caption drop, noise seed) is a
    function of the seed and the global batch, and each real sample's loss share is ``num_processes / n`` for a
    global batch of n samples: after DDP/FSDP average the gradients over processes, a step's gradient is the mean
    over its n samples, the same as one process with the same global batch. A process whose slice would be empty
    (n < num_processes) trains on a copy of the batch's first sample with share 0.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        buckets: list[tuple[int, int]],
        *,
        batch_size: int,
        seed: int,
        flip_aug: bool = False,
        random_crop: bool = False,
        caption_dropout_rate: float = 0.0,
        num_processes: int = 1,
        process_index: int = 0,
    ):
        self.records, self.buckets = records, buckets
        self.batch_size, self.seed = batch_size, seed
        self.flip_aug, self.random_crop, self.caption_dropout_rate = flip_aug, random_crop, caption_dropout_rate
        self.num_processes, self.process_index = num_processes, process_index
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, record in enumerate(records):
            groups[buckets[index]].extend([index] * record.repeats)
        self.groups = dict(sorted(groups.items()))
        self.global_batch_size = batch_size * num_processes
        self.batches_per_epoch = sum(-(-len(members) // self.global_batch_size) for members in self.groups.values())

    def global_batches(self, epoch: int) -> list[list[Sample]]:
        """Every process's samples of ``epoch`` (0-based) as global batches in training order."""
        rng = np.random.default_rng([self.seed, epoch])
        everything = []
        for members in self.groups.values():
            order = [members[i] for i in rng.permutation(len(members))]
            for start in range(0, len(order), self.global_batch_size):
                everything.append([self._sample(index, rng) for index in order[start : start + self.global_batch_size]])
        everything = [everything[i] for i in rng.permutation(len(everything))]
        return [
            [
                replace(s, noise_seed=noise_seed(self.seed, epoch, b, i), share=1.0 / len(batch))
                for i, s in enumerate(batch)
            ]
            for b, batch in enumerate(everything)
        ]

    def batches(self, epoch: int) -> list[list[Sample]]:
        """This process's slice of every global batch of ``epoch``, with loss shares scaled for gradient averaging."""
        return [self._slice(batch) for batch in self.global_batches(epoch)]

    def _slice(self, batch: list[Sample]) -> list[Sample]:
        bounds = np.linspace(0, len(batch), self.num_processes + 1).round().astype(int)
        mine = batch[bounds[self.process_index] : bounds[self.process_index + 1]]
        if not mine:
            return [replace(batch[0], share=0.0)]
        return [replace(s, share=s.share * self.num_processes) for s in mine]

    def _sample(self, index: int, rng: np.random.Generator) -> Sample:
        flip, crop, drop = rng.random(3)
        return Sample(
            record=index,
            flip=self.flip_aug and flip < 0.5,
            crop_offset=float(crop) if self.random_crop else None,
            drop_caption=drop < self.caption_dropout_rate,
        )

    def image_count(self) -> int:
        """Images shown per epoch over all processes, repeats included."""
        return sum(len(members) for members in self.groups.values())


class BatchBuilder:
    """Turns a list of samples into a batch dict: latents (from a cache) or pixels, captions, SDXL size conditioning,
    each sample's noise seed and loss share."""

    def __init__(self, records: list[ImageRecord], buckets: list[tuple[int, int]], latent_cache=None):
        self.records, self.buckets, self.latent_cache = records, buckets, latent_cache

    def __call__(self, samples: list[Sample]) -> dict:
        original, crops, images = [], [], []
        for sample in samples:
            record = self.records[sample.record]
            geometry = fit_geometry(
                record.size, self.buckets[sample.record], crop_offset=sample.crop_offset, flip=sample.flip
            )
            original.append(geometry.original_size)
            crops.append(geometry.crop_top_left)
            if self.latent_cache is not None:
                images.append(self.latent_cache.get(record, self.buckets[sample.record], sample.flip))
            else:
                with Image.open(record.path) as image:
                    images.append(fit_image(image, geometry, flip=sample.flip))
        width, height = self.buckets[samples[0].record]
        return {
            "latents" if self.latent_cache is not None else "pixels": torch.stack(images),
            "captions": ["" if s.drop_caption else self.records[s.record].caption for s in samples],
            "original_sizes": torch.tensor(original),
            "crop_top_lefts": torch.tensor(crops),
            "target_sizes": torch.tensor([(height, width)] * len(samples)),
            "noise_seeds": torch.tensor([s.noise_seed for s in samples], dtype=torch.int64),
            "shares": torch.tensor([s.share for s in samples], dtype=torch.float64),
        }


class _EpochBatches(torch.utils.data.Dataset):
    def __init__(self, batches: list[list[Sample]], build: Callable[[list[Sample]], dict]):
        self.batches, self.build = batches, build

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict:
        return self.build(self.batches[index])


def epoch_loader(plan: EpochPlan, build: BatchBuilder, epoch: int, *, skip: int = 0, workers: int = 0):
    """A DataLoader over this process's batches of ``epoch``, starting after the first ``skip`` of them."""
    batches = plan.batches(epoch)[skip:]
    return torch.utils.data.DataLoader(
        _EpochBatches(batches, build),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


def training_images(args, accelerator, *, tiny_model: Optional[str] = None) -> tuple[list[ImageRecord], list[tuple]]:
    """The run's images and their buckets. With ``tiny_model`` (the embedded default) the coloured-shapes dataset is
    generated first (by the main process) unless ``--train_data_dir`` is given."""
    if tiny_model:
        with accelerator.main_process_first():
            prepare_tiny_data(args)
    records = scan_dataset(args.train_data_dir, args.caption_extension)
    if tiny_model:
        accelerator.print(
            f"no --pretrained_model_name_or_path: training a tiny random {tiny_model} on CPU with the "
            f"dataset in {args.train_data_dir} ({len(records)} images)"
        )
    return records, assign_buckets([r.size for r in records], bucket_settings(args))
