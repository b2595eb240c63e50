"""Aspect-ratio bucketing (as sd-scripts): each image trains at about the same area, in its own shape."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class BucketSettings:
    """The target resolution (width, height) and, when bucketing, the bucket side limits and step."""

    resolution: tuple[int, int]
    enable: bool = False
    min_reso: int = 256
    max_reso: int = 1024
    step: int = 64
    no_upscale: bool = False


def parse_resolution(text: str) -> tuple[int, int]:
    """``"1024"`` or ``"832,1216"`` (width,height) -> (width, height)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--resolution must be 'SIZE' or 'WIDTH,HEIGHT' with positive integers, got {text!r}")
    width = int(parts[0])
    return width, int(parts[-1])


def check_divisible(settings: BucketSettings, multiple: int) -> None:
    """Raise a ``ValueError`` if any size the buckets can produce is not a multiple of ``multiple``."""
    named = {"--resolution width": settings.resolution[0], "--resolution height": settings.resolution[1]}
    if settings.enable:
        named.update(
            {
                "--bucket_reso_steps": settings.step,
                "--min_bucket_reso": settings.min_reso,
                "--max_bucket_reso": settings.max_reso,
            }
        )
    bad = [f"{name}={value}" for name, value in named.items() if value % multiple]
    if bad:
        raise ValueError(
            f"{', '.join(bad)} not divisible by {multiple}; this model needs image sides that are multiples "
            f"of {multiple} pixels"
        )
    if settings.enable and settings.min_reso > settings.max_reso:
        raise ValueError(f"--min_bucket_reso {settings.min_reso} is larger than --max_bucket_reso {settings.max_reso}")


def bucket_resolutions(settings: BucketSettings) -> list[tuple[int, int]]:
    """All (width, height) buckets: sides in [min, max] in steps, area at most the target resolution's area."""
    width, height = settings.resolution
    area, step = width * height, settings.step
    square = int(math.sqrt(area)) // step * step
    buckets = {(square, square)}
    for side in range(settings.min_reso, settings.max_reso + 1, step):
        other = min(settings.max_reso, area // side // step * step)
        if other >= settings.min_reso:
            buckets.update({(side, other), (other, side)})
    return sorted(buckets)


def _no_upscale_bucket(size: tuple[int, int], settings: BucketSettings) -> tuple[int, int]:
    """The image's own shape, shrunk to the target area if larger, sides floored to the step (never upscaled)."""
    width, height = size
    area = settings.resolution[0] * settings.resolution[1]
    shrink = min(1.0, math.sqrt(area / (width * height)))
    step = settings.step
    return max(step, int(width * shrink) // step * step), max(step, int(height * shrink) // step * step)


def assign_buckets(sizes: list[tuple[int, int]], settings: BucketSettings) -> list[tuple[int, int]]:
    """The training resolution (width, height) of each image: the bucket with the nearest aspect ratio."""
    if not settings.enable:
        return [settings.resolution] * len(sizes)
    if settings.no_upscale:
        return [_no_upscale_bucket(size, settings) for size in sizes]
    buckets = bucket_resolutions(settings)
    log_ratios = np.log([w / h for w, h in buckets])
    return [buckets[int(np.argmin(np.abs(log_ratios - math.log(w / h))))] for w, h in sizes]


@dataclass(frozen=True)
class Geometry:
    """How an image of some size is fitted to its bucket: the resized size, the crop box and SDXL's size conditioning.

    ``original_size`` is (height, width) of the source; ``crop_top_left`` is (top, left) in resized coordinates,
    mirrored when the image is flipped, as SDXL's crop conditioning expects.
    """

    resized: tuple[int, int]
    box: tuple[int, int, int, int]
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def fit_geometry(size: tuple[int, int], bucket: tuple[int, int], *, crop_offset: float | None, flip: bool) -> Geometry:
    """Resize (width, height) ``size`` to cover ``bucket``; crop at the centre or at ``crop_offset`` of the slack."""
    width, height = size
    bucket_w, bucket_h = bucket
    scale = max(bucket_w / width, bucket_h / height)
    resized_w, resized_h = max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))
    fraction = 0.5 if crop_offset is None else crop_offset
    left = int((resized_w - bucket_w) * fraction)
    top = int((resized_h - bucket_h) * fraction)
    reported_left = resized_w - left - bucket_w if flip else left
    return Geometry(
        resized=(resized_w, resized_h),
        box=(left, top, left + bucket_w, top + bucket_h),
        original_size=(height, width),
        crop_top_left=(top, reported_left),
    )


def fit_image(image: Image.Image, geometry: Geometry, *, flip: bool) -> torch.Tensor:
    """The image resized, cropped and flipped as ``geometry`` says: a (3, H, W) float tensor in [-1, 1]."""
    image = image.convert("RGB")
    if image.size != geometry.resized:
        image = image.resize(geometry.resized, Image.Resampling.LANCZOS)
    image = image.crop(geometry.box)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
