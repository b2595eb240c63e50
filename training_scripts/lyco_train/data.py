"""Find the training images the way sd-scripts does: captions in same-name files beside the images, subsets of
images (one folder each) with their own repeats, augmentations and caption rules, regularisation subsets, and the
held-out validation share.

Every problem in the folders is collected and reported at once, before any model is loaded.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from .captions import CaptionRules

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")
MAX_LISTED = 10


class DataError(ValueError):
    """The training data cannot be used; the message says which files and what to do."""


@dataclass(frozen=True)
class Subset:
    """One folder of images and the settings they train with (sd-scripts' ``[[datasets.subsets]]``).

    ``dataset`` is the index of the ``[[datasets]]`` entry it belongs to (images of different datasets never share a
    batch) and ``batch_size`` that dataset's batch size. ``class_tokens`` is the caption of images without a caption
    file. ``is_reg`` marks regularisation images, whose loss is weighted by ``--prior_loss_weight``.
    """

    image_dir: Path
    name: str = ""
    num_repeats: int = 1
    caption_extension: str = ".txt"
    captions: CaptionRules = field(default_factory=CaptionRules)
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    is_reg: bool = False
    class_tokens: str | None = None
    dataset: int = 0
    batch_size: int = 1


@dataclass(frozen=True)
class ImageRecord:
    """One training image: where it is, its caption, how often an epoch shows it, its pixel size (width, height),
    and the subset it belongs to."""

    path: Path
    caption: str
    repeats: int
    size: tuple[int, int]
    subset: Subset


def _listing(paths: list[Path]) -> str:
    shown = [f"    {p}" for p in paths[:MAX_LISTED]]
    if len(paths) > MAX_LISTED:
        shown.append(f"    ... and {len(paths) - MAX_LISTED} more")
    return "\n".join(shown)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def folder_subsets(root: str | Path, template: Subset) -> list[Subset]:
    """``--train_data_dir`` layout: the root itself and each visible subfolder, ``N_name`` repeating N times; every
    subset takes the other settings from ``template``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"training data folder '{root}' does not exist or is not a folder")
    subsets = [replace(template, image_dir=root, name=root.name, num_repeats=1)]
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = REPEATS_FOLDER.match(child.name)
        repeats, name = (int(match.group(1)), match.group(2)) if match else (1, child.name)
        if repeats < 1:
            raise DataError(
                f"folder '{child}' asks for {repeats} repeats; use a prefix of at least 1 (e.g. '1_{name}')"
            )
        subsets.append(replace(template, image_dir=child, name=name, num_repeats=repeats))
    return subsets


def _read_size(path: Path) -> tuple[int, int]:
    """Decode the whole image (catches truncated files that a header check misses) and return (width, height)."""
    with Image.open(path) as image:
        image.load()
        return image.size


def _read_caption(path: Path, all_lines: bool) -> str:
    """The first line of a caption file, stripped (sd-scripts reads only the first line), or with ``all_lines`` (for
    wildcards) every non-empty line, stripped, joined by newlines."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if all_lines:
        return "\n".join(line.strip() for line in lines if line.strip())
    return lines[0].strip() if lines else ""


def scan_subsets(subsets: list[Subset], *, where: str) -> list[ImageRecord]:
    """The images of every subset with their captions (or the subset's ``class_tokens``) and sizes.

    Raises ``DataError`` listing every image with neither a caption file nor class tokens, every image that cannot be
    decoded and every missing folder, or saying that no images were found; ``where`` names the data in messages.
    """
    records, missing_caption, unreadable, missing_dirs, bad_text = [], [], [], [], []
    for subset in subsets:
        if not subset.image_dir.is_dir():
            missing_dirs.append(subset.image_dir)
            continue
        for path in _image_files(subset.image_dir):
            caption_path = path.with_suffix(subset.caption_extension)
            if caption_path.is_file():
                try:
                    caption = _read_caption(caption_path, all_lines=subset.captions.wildcard)
                except (UnicodeDecodeError, OSError) as err:
                    bad_text.append((caption_path, err))
                    continue
            elif subset.class_tokens is not None:
                caption = subset.class_tokens
            else:
                missing_caption.append((path, subset.caption_extension))
                continue
            try:
                size = _read_size(path)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                unreadable.append((path, err))
                continue
            records.append(
                ImageRecord(path=path, caption=caption, repeats=subset.num_repeats, size=size, subset=subset)
            )
    problems = []
    if missing_dirs:
        problems.append(f"{len(missing_dirs)} image folder(s) do not exist:\n{_listing(missing_dirs)}")
    if missing_caption:
        extensions = sorted({extension for _, extension in missing_caption})
        problems.append(
            f"{len(missing_caption)} image(s) have no caption file (expected '<image name>{'|'.join(extensions)}' "
            f"beside each image, or class_tokens for the subset):\n{_listing([p for p, _ in missing_caption])}"
        )
    if bad_text:
        lines = [f"    {p}: {type(e).__name__}: {e}" for p, e in bad_text[:MAX_LISTED]]
        if len(bad_text) > MAX_LISTED:
            lines.append(f"    ... and {len(bad_text) - MAX_LISTED} more")
        problems.append(f"{len(bad_text)} caption file(s) cannot be read as UTF-8 text:\n" + "\n".join(lines))
    if unreadable:
        lines = [f"    {p}: {type(e).__name__}: {e}" for p, e in unreadable[:MAX_LISTED]]
        if len(unreadable) > MAX_LISTED:
            lines.append(f"    ... and {len(unreadable) - MAX_LISTED} more")
        problems.append(f"{len(unreadable)} image(s) cannot be read (corrupt or truncated):\n" + "\n".join(lines))
    if problems:
        raise DataError(f"problems in {where}:\n" + "\n".join(problems))
    if not records:
        raise DataError(
            f"no images found in {where} (looked for {', '.join(IMAGE_EXTENSIONS)}); "
            "put images with same-name .txt captions there, optionally in 'N_name' folders to repeat them N times"
        )
    return records


def scan_dataset(
    root: str | Path, caption_extension: str = ".txt", template: Subset | None = None
) -> list[ImageRecord]:
    """All images under ``root`` (directly or one folder down) with their captions and repeats (``scan_subsets``);
    ``template`` gives every subset's other settings."""
    template = template or Subset(Path(root), caption_extension=caption_extension)
    return scan_subsets(folder_subsets(root, template), where=f"training data folder '{root}'")


def balance_regularisation(records: list[ImageRecord]) -> list[ImageRecord]:
    """sd-scripts' regularisation repeats, per dataset: regularisation images are shown (about) as often per epoch as
    training images, whatever their own ``num_repeats``.

    Going through the regularisation images in order, each is first taken with its own repeats until the training
    count is reached (later ones are then left out); if one pass is not enough, further passes add one repeat each.
    """
    balanced = [r for r in records if not r.subset.is_reg]
    for dataset in sorted({r.subset.dataset for r in records}):
        target = sum(r.repeats for r in records if r.subset.dataset == dataset and not r.subset.is_reg)
        regs = [r for r in records if r.subset.dataset == dataset and r.subset.is_reg]
        if not regs or target == 0:
            continue
        repeats: list[int] = []
        shown = 0
        while shown < target:
            for index, record in enumerate(regs):
                if index >= len(repeats):
                    repeats.append(record.repeats)
                    shown += record.repeats
                else:
                    repeats[index] += 1
                    shown += 1
                if shown >= target:
                    break
        balanced += [replace(record, repeats=count) for record, count in zip(regs, repeats)]
    return balanced


def split_validation(
    records: list[ImageRecord], share: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(training, validation) images: of each non-regularisation subset, ``round(n * share)`` images chosen by a
    shuffle seeded with ``seed`` are held out (shown once, without augmentation); regularisation images all train.

    As in sd-scripts, but the two parts never overlap (sd-scripts can put one image in both when n * share ends in .5).
    """
    if share <= 0:
        return records, []
    training, validation = [], []
    by_subset: dict[Subset, list[ImageRecord]] = {}
    for record in records:
        by_subset.setdefault(record.subset, []).append(record)
    for subset, members in by_subset.items():
        if subset.is_reg:
            training += members
            continue
        order = list(members)
        random.Random(seed).shuffle(order)
        held = round(len(order) * share)
        training += order[: len(order) - held]
        validation += [replace(r, repeats=1) for r in order[len(order) - held :]]
    return training, validation


def count_images(records: list[ImageRecord], *, regularisation: bool) -> int:
    """Images per epoch (repeats included) of the training or of the regularisation subsets."""
    return sum(r.repeats for r in records if r.subset.is_reg == regularisation)
