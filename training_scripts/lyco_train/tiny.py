"""The embedded default: option values for the tiny CPU run, its sample prompts, and the reload check it ends with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .synthetic import make_shapes_dataset, shapes_folder

TINY_SEED = 0

TINY_DEFAULTS = {
    "common": dict(
        output_dir="outputs/tiny",
        resolution="64",
        enable_bucket=True,
        min_bucket_reso=32,
        max_bucket_reso=128,
        bucket_reso_steps=16,
        train_batch_size=2,
        max_train_steps=40,
        learning_rate=3e-3,
        network_dim=2,
        network_alpha=1.0,
        seed=TINY_SEED,
        save_every_n_steps=20,
        sample_every_n_steps=20,
    ),
    "sdxl": dict(output_dir="outputs/tiny_sdxl", output_name="tiny_sdxl_lokr"),
    "anima": dict(
        output_dir="outputs/tiny_anima",
        output_name="tiny_anima_lokr",
        max_train_steps=80,
        save_every_n_steps=40,
        sample_every_n_steps=40,
        network_args=["train_llm_adapter=True"],
        network_train_unet_only=True,
        cache_text_encoder_outputs=True,
        cache_latents=True,
    ),
}


def tiny_defaults(model: str) -> dict:
    """Defaults for the tiny run of ``model`` ("sdxl" or "anima"); options given on the command line still win."""
    return {**TINY_DEFAULTS["common"], **TINY_DEFAULTS[model]}


def use_one_cpu_thread() -> None:
    """The tiny model's ops are too small to split: on CPU one thread is as fast when the machine is idle and many
    times faster when other processes compete for the cores (OpenMP workers then wait for each other)."""
    if not torch.cuda.is_available():
        torch.set_num_threads(1)


def prepare_tiny_data(args, *, write: bool = True) -> None:
    """Without ``--train_data_dir``: generate the coloured-shapes dataset (and sample prompts) in the output folder.

    ``write=False`` (every process but the main one of a multi-process run) only points ``args`` at what the main
    process wrote: writing again would replace files while the main process reads them."""
    data = Path(args.output_dir) / "data"
    if args.train_data_dir is None and not getattr(args, "dataset_config", None):
        folder = make_shapes_dataset(data, size=64) if write else shapes_folder(data)
        args.train_data_dir = str(folder.parent)
    if args.sample_prompts is None:
        prompts = data / "prompts.txt"
        args.sample_prompts = str(write_tiny_prompts(prompts, 64) if write else prompts)


def write_tiny_prompts(path: Path, size: int) -> Path:
    """Two ``--sample_prompts`` lines rendered small and fast (sd-scripts prompt syntax)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"a red circle on a white background --w {size} --h {size} --s 4 --d 1 --l 3\n"
        f"a blue square on a black background --w {size} --h {size} --s 4 --d 2 --l 3\n",
        encoding="utf-8",
    )
    return path


def report_reload(
    path: Path, reloaded: np.ndarray, base: np.ndarray, in_memory: np.ndarray, how: str, tolerance: float = 1e-4
) -> None:
    """Print and check the reload: the reloaded adapter must change the output and match the in-memory model
    (within ``tolerance``: loose when the file was saved in fp16/bf16)."""
    change = float(np.abs(reloaded - base).max())
    mismatch = float(np.abs(reloaded - in_memory).max())
    print(f"reloaded {path} through {how}:")
    print(f"  max |output with adapter - base output|     = {change:.4g} (the adapter changes the output)")
    print(f"  max |reloaded output - in-memory output|    = {mismatch:.3g} (the file holds what was trained)")
    if change < 1e-3 or mismatch > tolerance:
        raise RuntimeError(f"reload check failed for {path}: change {change:.3g}, mismatch {mismatch:.3g}")
