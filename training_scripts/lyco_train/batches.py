"""Epochs as deterministic lists of batches, and the loader that turns a batch into tensors.

An epoch's order, flips, crops, colour changes, caption drops, tag shuffles and tag drops are a pure function of
(seed, epoch), so a resumed run sees exactly the batches the interrupted one would have seen, whatever the number of
data-loader workers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from .augment import apply_color_change, draw_color_change
from .buckets import assign_buckets, fit_geometry, fit_image
from .captions import process_caption
from .data import DataError, ImageRecord, balance_regularisation, scan_subsets, split_validation
from .dataset_config import DatasetSpec, resolve_datasets
from .tiny import prepare_tiny_data


@dataclass(frozen=True)
class Sample:
    """One image occurrence in an epoch: which record, flipped or not, where to crop (None = centre), caption dropped,
    the seed of its caption shuffle/tag dropout (None: the caption's fixed form), its colour change (or None), the
    seed of its noise and timestep, and its share of the step's loss (0 for a filler that only keeps a process busy)."""

    record: int
    flip: bool
    crop_offset: float | None
    drop_caption: bool
    caption_seed: int | None = None
    color: tuple[str, float] | None = None
    noise_seed: int = 0
    share: float = 1.0


def noise_seed(seed: int, epoch: int, batch: int, position: int) -> int:
    """The seed of one sample's noise and timestep: a hash of (run seed, epoch, global batch of the epoch, position
    in that batch), so the draw does not depend on how many processes share the batch, nor on a resume."""
    return int(np.random.SeedSequence([seed, epoch, batch, position]).generate_state(1, np.uint64)[0] >> 1)


def _groups(records: list[ImageRecord], buckets: list[tuple[int, int]], repeats: bool) -> dict[tuple, list[int]]:
    """Record indices per (dataset, bucket), each record ``repeats`` times when asked; datasets never share a batch."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        groups[(record.subset.dataset, buckets[index])].extend([index] * (record.repeats if repeats else 1))
    return dict(sorted(groups.items()))


class EpochPlan:
    """Global batches of same-dataset, same-bucket samples per epoch, each split over the processes of a multi-GPU run.

    A global batch holds ``batch_size × num_processes`` samples (the dataset's batch size; fewer at the end of a
    bucket); the processes take contiguous near-equal slices of it. Everything about a sample (order, flip, crop,
    colour change, caption drop and shuffle, noise seed) is a function of the seed and the global batch, and each real
    sample's loss share is ``num_processes / n`` for a global batch of n samples: after DDP/FSDP average the gradients
    over processes, a step's gradient is the mean over its n samples, the same as one process with the same global
    batch. A process whose slice would be empty (n < num_processes) trains on a copy of the batch's first sample with
    share 0.

    Each record's subset says its batch size, augmentations and caption rules. Draws that a subset does not use are
    not made, so enabling an option for one subset leaves the other choices of a run unchanged.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        buckets: list[tuple[int, int]],
        *,
        seed: int,
        num_processes: int = 1,
        process_index: int = 0,
    ):
        self.records, self.buckets, self.seed = records, buckets, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.groups = _groups(records, buckets, repeats=True)
        self.batches_per_epoch = sum(-(-len(members) // self._global_size(members)) for members in self.groups.values())

    def _global_size(self, members: list[int]) -> int:
        return self.records[members[0]].subset.batch_size * self.num_processes

    def global_batches(self, epoch: int) -> list[list[Sample]]:
        """Every process's samples of ``epoch`` (0-based) as global batches in training order."""
        rng = np.random.default_rng([self.seed, epoch])
        everything = []
        for members in self.groups.values():
            size = self._global_size(members)
            order = [members[i] for i in rng.permutation(len(members))]
            for start in range(0, len(order), size):
                everything.append([self._sample(index, epoch, rng) for index in order[start : start + size]])
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

    def _sample(self, index: int, epoch: int, rng: np.random.Generator) -> Sample:
        subset = self.records[index].subset
        flip, crop, drop = rng.random(3)
        every = subset.captions.dropout_every_n_epochs
        dropped = drop < subset.captions.dropout_rate or bool(every and (epoch + 1) % every == 0)
        caption_seed = int(rng.integers(2**63)) if subset.captions.is_random else None
        color = draw_color_change(rng) if subset.color_aug else None
        return Sample(
            record=index,
            flip=subset.flip_aug and flip < 0.5,
            crop_offset=float(crop) if subset.random_crop else None,
            drop_caption=dropped,
            caption_seed=None if dropped else caption_seed,
            color=color,
        )

    def image_count(self) -> int:
        """Images shown per epoch over all processes, repeats included."""
        return sum(len(members) for members in self.groups.values())


def validation_batches(records: list[ImageRecord], buckets: list[tuple[int, int]]) -> list[list[Sample]]:
    """The held-out images in fixed batches (per dataset and bucket, each dataset's batch size): each image once, centre
    crop, no flip, no colour change, the caption's fixed form."""
    batches = []
    for members in _groups(records, buckets, repeats=False).values():
        size = records[members[0]].subset.batch_size
        for start in range(0, len(members), size):
            batches.append([Sample(index, False, None, False) for index in members[start : start + size]])
    return batches


def caption_text(record: ImageRecord, sample: Sample) -> str:
    """The text a sample trains on: ``""`` when dropped, else the caption under its subset's rules."""
    if sample.drop_caption:
        return ""
    rules = record.subset.captions
    if sample.caption_seed is None:
        return process_caption(record.caption, rules.fixed())
    return process_caption(record.caption, rules, np.random.default_rng(sample.caption_seed))


class BatchBuilder:
    """Turns a list of samples into a batch dict: latents (from a cache) or pixels, captions, SDXL size conditioning,
    each sample's loss weight (``prior_loss_weight`` for regularisation images, else 1), noise seed and loss share."""

    def __init__(
        self,
        records: list[ImageRecord],
        buckets: list[tuple[int, int]],
        latent_cache=None,
        prior_loss_weight: float = 1.0,
    ):
        self.records, self.buckets, self.latent_cache = records, buckets, latent_cache
        self.prior_loss_weight = prior_loss_weight

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
                    image = apply_color_change(image.convert("RGB"), sample.color)
                    images.append(fit_image(image, geometry, flip=sample.flip))
        width, height = self.buckets[samples[0].record]
        return {
            "latents" if self.latent_cache is not None else "pixels": torch.stack(images),
            "captions": [caption_text(self.records[s.record], s) for s in samples],
            "original_sizes": torch.tensor(original),
            "crop_top_lefts": torch.tensor(crops),
            "target_sizes": torch.tensor([(height, width)] * len(samples)),
            "loss_weights": torch.tensor(
                [self.prior_loss_weight if self.records[s.record].subset.is_reg else 1.0 for s in samples]
            ),
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


@dataclass(frozen=True)
class TrainingData:
    """The run's training images and their buckets, and the held-out validation images and theirs."""

    records: list[ImageRecord]
    buckets: list[tuple[int, int]]
    validation_records: list[ImageRecord]
    validation_buckets: list[tuple[int, int]]

    @property
    def all_records(self) -> list[ImageRecord]:
        return self.records + self.validation_records


def load_training_data(datasets: list[DatasetSpec], *, seed: int, where: str) -> TrainingData:
    """Scan every dataset's subsets, hold out the validation share (shuffled with each dataset's ``validation_seed``,
    else ``seed``), balance the regularisation repeats to the remaining training images (as sd-scripts) and assign
    buckets with each dataset's settings."""
    records, buckets, held, held_buckets = [], [], [], []
    for dataset in datasets:
        found = scan_subsets(list(dataset.subsets), where=where)
        seed_of_split = dataset.validation_seed if dataset.validation_seed is not None else seed
        training, validation = split_validation(found, dataset.validation_split, seed_of_split)
        training = balance_regularisation(training)
        records += training
        buckets += assign_buckets([r.size for r in training], dataset.buckets)
        held += validation
        held_buckets += assign_buckets([r.size for r in validation], dataset.buckets)
    if not any(not r.subset.is_reg for r in records):
        raise DataError(f"no training images left in {where} (only regularisation or held-out validation images)")
    return TrainingData(records, buckets, held, held_buckets)


def training_images(args, accelerator, *, tiny_model: str | None = None) -> TrainingData:
    """The run's images (from ``--dataset_config`` or ``--train_data_dir``) and their buckets. With ``tiny_model``
    (the embedded default) the coloured-shapes dataset is generated first (by the main process) unless data is given."""
    if tiny_model:
        with accelerator.main_process_first():
            prepare_tiny_data(args, write=accelerator.is_main_process)
    if args.dataset_config:
        where = f"the image folders of --dataset_config '{args.dataset_config}'"
    else:
        where = f"training data folder '{args.train_data_dir}'"
    datasets = getattr(args, "dataset_specs", None) or resolve_datasets(args)
    data = load_training_data(datasets, seed=args.seed, where=where)
    if tiny_model:
        accelerator.print(
            f"no --pretrained_model_name_or_path: training a tiny random {tiny_model} on CPU with the "
            f"dataset in {args.dataset_config or args.train_data_dir} ({len(data.records)} images)"
        )
    if data.validation_records:
        accelerator.print(f"{len(data.validation_records)} image(s) held out for validation")
    return data
