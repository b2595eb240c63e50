"""``--sample_prompts``: sd-scripts' prompt-file format and where the rendered images go."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

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
            raise ValueError(f"unknown sample prompt option --{key} in {line!r}; use --n --w --h --d --s --l")
        field = OPTION_FIELDS[key]
        cast = {"negative": str, "guidance": float}.get(field, int)
        try:
            values[field] = cast(value.strip())
        except ValueError:
            raise ValueError(
                f"sample prompt option --{key} needs a number, got {value.strip()!r} in {line!r}"
            ) from None
    return replace(defaults, **values)


def read_sample_prompts(path: str | Path, defaults: SamplePrompt) -> list[SamplePrompt]:
    """Every non-empty, non-comment line of the file as a ``SamplePrompt``."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [parse_prompt_line(line.strip(), defaults) for line in lines if line.strip() and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"--sample_prompts file '{path}' has no prompts")
    return prompts


def save_sample(image, output_dir: str | Path, output_name: str, step: int, index: int) -> Path:
    """Save a PIL image as ``<output_dir>/sample/<output_name>_<step>_<index>.png``; return the path."""
    path = Path(output_dir) / "sample" / f"{output_name}_{step:06d}_{index:02d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def render_samples(args, accelerator, step: int, render, defaults: SamplePrompt) -> list[Path]:
    """Render every ``--sample_prompts`` line with ``render(prompt) -> PIL image`` and save it; return the paths."""
    written = []
    for index, prompt in enumerate(read_sample_prompts(args.sample_prompts, defaults)):
        with torch.no_grad(), accelerator.autocast():
            image = render(prompt)
        written.append(save_sample(image, args.output_dir, args.output_name, step, index))
    return written
