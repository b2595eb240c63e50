"""The small synthetic dataset the embedded default trains on: coloured shapes with matching captions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: tuple[int, int, int]
) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=colour)


def shapes_folder(root: str | Path, repeats: int = 2) -> Path:
    """Where ``make_shapes_dataset(root, repeats=...)`` puts its images."""
    return Path(root) / f"{repeats}_shapes"


def make_shapes_dataset(root: str | Path, *, count: int = 12, size: int = 64, repeats: int = 2, seed: int = 0) -> Path:
    """Write ``count`` images with ``.txt`` captions into ``root/<repeats>_shapes`` (sd-scripts layout); return it.

    Every third image is landscape (1.5 x wider) so aspect-ratio bucketing has something to do. Existing files with the
    same names are overwritten, so the folder always holds exactly this dataset.
    """
    rng = np.random.default_rng(seed)
    folder = shapes_folder(root, repeats)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        colour = list(COLOURS)[index % len(COLOURS)]
        shape = SHAPES[index % len(SHAPES)]
        background = list(BACKGROUNDS)[(index // len(SHAPES)) % len(BACKGROUNDS)]
        width = size * 3 // 2 if index % 3 == 2 else size
        image = Image.new("RGB", (width, size), BACKGROUNDS[background])
        extent = int(rng.integers(size // 3, size * 2 // 3))
        left = int(rng.integers(0, width - extent))
        top = int(rng.integers(0, size - extent))
        _draw_shape(ImageDraw.Draw(image), shape, (left, top, left + extent, top + extent), COLOURS[colour])
        stem = f"{index:03d}_{colour}_{shape}"
        image.save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(f"a {colour} {shape} on a {background} background\n", encoding="utf-8")
    return folder
