"""``--sample_prompts``: sd-scripts' prompt-file format and where the rendered images go."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from peft_lyco import inference_cache

from .files import save_image

OPTION_FIELDS = {"n": "negative", "w": "width", "h": "height", "d": "seed", "s": "steps", "l": "guidance"}


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image to render: prompt, negative prompt, size, seed, steps and guidance scale."""

    prompt: str
    negative: str = ""
    width: int = 1024
    height: int = 1024
    seed: int = 0
    steps: int = 30
    guidance: float = 7.0


def parse_prompt_line(line: str, defaults: SamplePrompt) -> SamplePrompt:
    """``a cat --n blurry --w 768 --h 1024 --d 1 --s 20 --l 5`` -> a ``SamplePrompt`` (missing options: defaults)."""
    head, *options = line.split(" --")
    values: dict = {"prompt": head.strip()}
    for option in options:
        key, _, value = option.strip().partition(" ")
        if key not in OPTION_FIELDS:
            raise ValueError(f"unknown sample prompt option --{key}; use --n --w --h --d --s --l")
        field = OPTION_FIELDS[key]
        cast = {"negative": str, "guidance": float}.get(field, int)
        try:
            values[field] = cast(value.strip())
        except ValueError:
            raise ValueError(f"option --{key} needs a number, got {value.strip()!r}") from None
    return replace(defaults, **values)


def check_prompt(prompt: SamplePrompt, pixel_multiple: int) -> None:
    """Raise ``ValueError`` for what the pipeline would refuse only when it renders: sizes, steps, guidance."""
    for key, side in (("w", prompt.width), ("h", prompt.height)):
        if side < pixel_multiple or side % pixel_multiple:
            raise ValueError(f"--{key} {side}: image sides must be a positive multiple of {pixel_multiple}")
    if prompt.steps < 1:
        raise ValueError(f"--s {prompt.steps}: at least 1 sampling step")
    if not math.isfinite(prompt.guidance):
        raise ValueError(f"--l {prompt.guidance}: the guidance scale must be a finite number")


def read_sample_prompts(path: str | Path, defaults: SamplePrompt, pixel_multiple: int = 8) -> list[SamplePrompt]:
    """Every non-empty, non-comment line of the file as a checked ``SamplePrompt``; ``ValueError`` naming the file
    and line of the first bad one."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"--sample_prompts file '{path}' is not UTF-8 text: {err}") from err
    except OSError as err:
        raise ValueError(f"cannot read --sample_prompts file '{path}': {err.strerror or err}") from err
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            prompt = parse_prompt_line(line.strip(), defaults)
            check_prompt(prompt, pixel_multiple)
        except ValueError as err:
            raise ValueError(f"--sample_prompts file '{path}', line {number} ({line.strip()!r}): {err}") from None
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"--sample_prompts file '{path}' has no prompts")
    return prompts


def save_sample(image, output_dir: str | Path, output_name: str, step: int, index: int) -> Path:
    """Save a PIL image as ``<output_dir>/sample/<output_name>_<step>_<index>.png`` (atomically); return the path."""
    return save_image(image, Path(output_dir) / "sample" / f"{output_name}_{step:06d}_{index:02d}.png")


def free_memory_bytes(device: torch.device) -> int:
    """Bytes a new tensor could take on ``device`` now: free device memory plus the CUDA allocator's unused reserve,
    or the system's available memory on CPU; 0 where neither can be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            meminfo = Path("/proc/meminfo").read_text()
        except OSError:
            return 0
        for line in meminfo.splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def sample_cache_budget(cache_mb: float | None, device: torch.device) -> int:
    """``--sample_cache_mb`` in bytes; by default a quarter of the free memory, leaving the rest to the sampler's
    activations (a 1024² VAE decode needs several GB) and to what training holds."""
    if cache_mb is not None:
        return int(cache_mb * 2**20)
    return free_memory_bytes(device) // 4


def render_samples(
    args, accelerator, step: int, render, defaults: SamplePrompt, denoiser: torch.nn.Module | None = None
) -> list[Path]:
    """Render every ``--sample_prompts`` line with ``render(prompt) -> PIL image`` and save it; return the paths.

    With ``denoiser``, its unmerged adapted layers keep their ``W + ΣΔW`` across the sampling steps within
    ``--sample_cache_mb`` (outputs bit-identical to rebuilding it each call); everything is freed on return."""
    written = []
    prompts = read_sample_prompts(args.sample_prompts, defaults, args.pixel_multiple)
    budget = sample_cache_budget(getattr(args, "sample_cache_mb", None), accelerator.device) if denoiser else 0
    with inference_cache(budget, *([denoiser] if denoiser is not None else [])):
        for index, prompt in enumerate(prompts):
            with torch.no_grad(), accelerator.autocast():
                image = render(prompt)
            written.append(save_sample(image, args.output_dir, args.output_name, step, index))
    return written
