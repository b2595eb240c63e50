"""Caches for frozen-model outputs: VAE latents per (image, bucket, flip) and text-encoder outputs per caption.

Entries live in memory, or as safetensors files in a cache folder when asked (reused by later runs). A file's name
is a hash of everything its content depends on (source file identity, bucket, flip, model tag), so a changed image,
bucket or model never reads a stale entry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .buckets import fit_geometry, fit_image
from .captions import process_caption
from .data import ImageRecord
from .files import save_tensors


class _Store:
    """Tensor dicts by key, in memory or as one safetensors file per key in ``folder``."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.memory: dict[str, dict[str, torch.Tensor]] = {}

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        """Whether ``key`` has a usable entry; a damaged file (say, from a crash of the disk) counts as missing, so
        filling the cache writes it again."""
        if self.folder is None:
            return key in self.memory
        try:
            with safe_open(str(self._path(key)), framework="pt"):
                return True
        except Exception:  # a missing file or safetensors' own error for a damaged one
            return False

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {name: t.detach().to("cpu") for name, t in tensors.items()}
        if self.folder is None:
            self.memory[key] = tensors
        else:
            save_tensors(self._path(key), tensors)

    def get(self, key: str) -> dict[str, torch.Tensor]:
        if self.folder is None:
            return self.memory[key]
        try:
            return load_file(self._path(key))
        except Exception as err:  # safetensors raises its own error type for every kind of damage
            raise OSError(
                f"cache file '{self._path(key)}' cannot be read ({err}); delete it and start again to re-encode it"
            ) from err


def _digest(*parts: object) -> str:
    return hashlib.sha1("\x1f".join(map(str, parts)).encode("utf-8")).hexdigest()


def latent_jobs(records: list[ImageRecord], buckets: list[tuple[int, int]]) -> list[tuple]:
    """Every (record, bucket, flip) a run can ask for: both orientations of images whose subset flips."""
    return [
        (record, bucket, flip)
        for record, bucket in zip(records, buckets)
        for flip in ((False, True) if record.subset.flip_aug else (False,))
    ]


class LatentCache:
    """VAE latents of centre-cropped images, keyed by file identity, bucket, flip and ``tag`` (model and settings)."""

    def __init__(self, tag: str, folder: Path | None = None):
        self.tag, self.store = tag, _Store(folder)

    def key(self, record: ImageRecord, bucket: tuple[int, int], flip: bool) -> str:
        stat = record.path.stat()
        return _digest("latent", self.tag, record.path.resolve(), stat.st_size, stat.st_mtime_ns, bucket, flip)

    def fill(
        self,
        jobs: Iterable[tuple[ImageRecord, tuple[int, int], bool]],
        encode: Callable[[torch.Tensor], torch.Tensor],
        batch_size: int,
        show_progress: bool = True,
    ) -> int:
        """Encode every (record, bucket, flip) not cached yet, batching same-bucket images; return how many."""
        todo: dict[tuple[int, int], list] = {}
        for record, bucket, flip in dict.fromkeys(jobs):
            if self.key(record, bucket, flip) not in self.store:
                todo.setdefault(bucket, []).append((record, flip))
        count = sum(len(items) for items in todo.values())
        with tqdm(total=count, desc="caching latents", disable=not show_progress or count == 0) as bar:
            for bucket, items in todo.items():
                for start in range(0, len(items), batch_size):
                    chunk = items[start : start + batch_size]
                    pixels = torch.stack([self._pixels(record, bucket, flip) for record, flip in chunk])
                    latents = encode(pixels)
                    for (record, flip), latent in zip(chunk, latents):
                        self.store.put(self.key(record, bucket, flip), {"latents": latent})
                    bar.update(len(chunk))
        return count

    @staticmethod
    def _pixels(record: ImageRecord, bucket: tuple[int, int], flip: bool) -> torch.Tensor:
        from PIL import Image

        geometry = fit_geometry(record.size, bucket, crop_offset=None, flip=flip)
        with Image.open(record.path) as image:
            return fit_image(image, geometry, flip=flip)

    def get(self, record: ImageRecord, bucket: tuple[int, int], flip: bool) -> torch.Tensor:
        return self.store.get(self.key(record, bucket, flip))["latents"]


class TextCache:
    """Frozen text-encoder outputs per caption (the empty caption included, for caption dropout)."""

    def __init__(self, tag: str, encode: Callable[[list[str]], dict[str, torch.Tensor]], folder: Path | None = None):
        self.tag, self.encode, self.store = tag, encode, _Store(folder)

    def key(self, caption: str) -> str:
        return _digest("text", self.tag, caption)

    def fill(self, captions: Iterable[str], batch_size: int, show_progress: bool = True) -> int:
        """Encode every caption not cached yet; return how many were encoded."""
        todo = [c for c in dict.fromkeys(captions) if self.key(c) not in self.store]
        with tqdm(total=len(todo), desc="caching text encoder outputs", disable=not show_progress or not todo) as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                outputs = self.encode(chunk)
                for row, caption in enumerate(chunk):
                    self.store.put(self.key(caption), {name: value[row] for name, value in outputs.items()})
                bar.update(len(chunk))
        return len(todo)

    def get(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The cached outputs of ``captions`` stacked into a batch."""
        entries = [self.store.get(self.key(c)) for c in captions]
        return {name: torch.stack([entry[name] for entry in entries]) for name in entries[0]}


def _cache_dir(args) -> Path:
    """``--cache_dir``, else ``.lyco_cache`` beside the images (or beside the ``--dataset_config`` file)."""
    if args.cache_dir:
        return Path(args.cache_dir)
    base = Path(args.train_data_dir) if args.train_data_dir else Path(args.dataset_config).parent
    return base / ".lyco_cache"


def build_latent_cache(args, accelerator, records, buckets, *, tag: str, encode) -> LatentCache | None:
    """With ``--cache_latents``: every latent a run can use, encoded once (the main process first, so other
    processes reuse its disk files); None otherwise."""
    if not args.cache_latents:
        return None
    cache = LatentCache(tag, _cache_dir(args) if args.cache_latents_to_disk else None)
    with accelerator.main_process_first():
        cache.fill(latent_jobs(records, buckets), encode, args.vae_batch_size, accelerator.is_local_main_process)
    return cache


def build_text_cache(args, accelerator, records, *, tag: str, encode) -> TextCache | None:
    """With ``--cache_text_encoder_outputs``: every caption (as its subset's fixed rules write it) and the empty one
    (caption dropout) encoded once under the run's autocast; None otherwise. Shuffling and tag dropout are refused
    with this option before the run starts."""
    if not args.cache_text_encoder_outputs:
        return None

    def frozen(captions: list[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad(), accelerator.autocast():
            return encode(captions)

    cache = TextCache(tag, frozen, _cache_dir(args) if args.cache_text_encoder_outputs_to_disk else None)
    with accelerator.main_process_first():
        captions = [process_caption(r.caption, r.subset.captions.fixed()) for r in records]
        cache.fill(captions + [""], args.train_batch_size, accelerator.is_local_main_process)
    return cache
