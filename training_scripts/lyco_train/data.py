"""Find the training images the way sd-scripts does: same-name ``.txt`` captions, ``N_name`` folders repeat N times.

Every problem in the folder is collected and reported at once, before any model is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REPEATS_FOLDER = re.compile(r"^(\d+)_(.+)$")
MAX_LISTED = 10


class DataError(ValueError):
    """The training data cannot be used; the message says which files and what to do."""


@dataclass(frozen=True)
class ImageRecord:
    """One training image: where it is, its caption, how often an epoch shows it, its pixel size (width, height)."""

    path: Path
    caption: str
    repeats: int
    size: tuple[int, int]
    subset: str


def _listing(paths: list[Path], root: Path) -> str:
    shown = [f"    {p.relative_to(root)}" for p in paths[:MAX_LISTED]]
    if len(paths) > MAX_LISTED:
        shown.append(f"    ... and {len(paths) - MAX_LISTED} more")
    return "\n".join(shown)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _subsets(root: Path) -> list[tuple[Path, int, str]]:
    """(folder, repeats, name) for the root itself and each visible subfolder; ``N_name`` gives N repeats."""
    subsets = [(root, 1, root.name)]
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = REPEATS_FOLDER.match(child.name)
        repeats, name = (int(match.group(1)), match.group(2)) if match else (1, child.name)
        if repeats < 1:
            raise DataError(
                f"folder '{child}' asks for {repeats} repeats; use a prefix of at least 1 (e.g. '1_{name}')"
            )
        subsets.append((child, repeats, name))
    return subsets


def _read_size(path: Path) -> tuple[int, int]:
    """Decode the whole image (catches truncated files that a header check misses) and return (width, height)."""
    with Image.open(path) as image:
        image.load()
        return image.size


def scan_dataset(root: str | Path, caption_extension: str = ".txt") -> list[ImageRecord]:
    """All images under ``root`` (directly or one folder down) with their captions and repeats.

    Raises ``DataError`` listing every image without a caption and every image that cannot be decoded, or saying the
    folder is missing or holds no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"training data folder '{root}' does not exist or is not a folder")
    records, missing_caption, unreadable = [], [], []
    for folder, repeats, name in _subsets(root):
        for path in _image_files(folder):
            caption_path = path.with_suffix(caption_extension)
            if not caption_path.is_file():
                missing_caption.append(path)
                continue
            try:
                size = _read_size(path)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                unreadable.append((path, err))
                continue
            caption = caption_path.read_text(encoding="utf-8").strip()
            records.append(ImageRecord(path=path, caption=caption, repeats=repeats, size=size, subset=name))
    problems = []
    if missing_caption:
        problems.append(
            f"{len(missing_caption)} image(s) have no caption file (expected '<image name>{caption_extension}' "
            f"beside each image):\n{_listing(missing_caption, root)}"
        )
    if unreadable:
        lines = [f"    {p.relative_to(root)}: {type(e).__name__}: {e}" for p, e in unreadable[:MAX_LISTED]]
        if len(unreadable) > MAX_LISTED:
            lines.append(f"    ... and {len(unreadable) - MAX_LISTED} more")
        problems.append(f"{len(unreadable)} image(s) cannot be read (corrupt or truncated):\n" + "\n".join(lines))
    if problems:
        raise DataError(f"problems in training data folder '{root}':\n" + "\n".join(problems))
    if not records:
        raise DataError(
            f"no images found in '{root}' or its subfolders (looked for {', '.join(IMAGE_EXTENSIONS)}); "
            "put images with same-name .txt captions there, optionally in 'N_name' folders to repeat them N times"
        )
    return records
