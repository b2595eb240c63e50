"""sd-scripts' ``--save_last_n_epochs`` / ``--save_last_n_steps`` (and their ``_state`` forms): after a periodic save,
older periodic files of the run are removed so that only the most recent ones stay.

``--save_last_n_epochs N`` keeps the last N epoch saves. ``--save_last_n_steps N`` keeps the step saves of the last N
steps (a number of steps, as in sd-scripts: with ``--save_every_n_steps 10 --save_last_n_steps 30`` the saves of
steps 20 to 50 are kept at step 50, step 10's is removed). Only files this run names (``<output_name>-000002.safetensors``,
``<output_name>-step00000100.safetensors``, their ``_peft`` folders and ``-state`` folders) are removed, and only
after the newer save was written completely. The final ``<output_name>.safetensors`` is never removed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .files import remove_folder


@dataclass(frozen=True)
class Retention:
    """How many periodic saves stay: ``last_n_epochs`` epoch saves, the step saves of the last ``last_n_steps``
    steps; ``*_state`` override them for state folders (None: the value for adapter files)."""

    last_n_epochs: int | None = None
    last_n_steps: int | None = None
    last_n_epochs_state: int | None = None
    last_n_steps_state: int | None = None

    @classmethod
    def from_args(cls, args) -> Retention:
        return cls(
            args.save_last_n_epochs, args.save_last_n_steps, args.save_last_n_epochs_state, args.save_last_n_steps_state
        )


def oldest_kept_epoch(epoch: int, every: int, keep: int) -> int:
    """After saving epoch ``epoch`` (saves every ``every`` epochs), the oldest epoch save that stays."""
    return epoch - every * (keep - 1)


def oldest_kept_step(step: int, every: int, keep_steps: int) -> int:
    """After saving step ``step`` (saves every ``every`` steps), the oldest step save that stays: sd-scripts removes
    the save at ``s = step - keep_steps - 1`` rounded down to a multiple of ``every``, and everything older."""
    removed = step - keep_steps - 1
    removed -= removed % every
    return removed + every


_PATTERNS = {
    "epoch": (r"-(\d{6})", r"-(\d{6})-state"),
    "step": (r"-step(\d{8})", r"-step(\d{8})-state"),
}


def _numbered(output_dir: Path, output_name: str, kind: str, state: bool) -> dict[Path, int]:
    """This run's periodic saves of ``kind`` (adapter files and ``_peft`` folders, or state folders) by number."""
    file_part, state_part = _PATTERNS[kind]
    name = re.escape(output_name)
    pattern = re.compile(f"{name}{state_part}" if state else f"{name}{file_part}(?:\\.safetensors|_peft)")
    found = {}
    for path in output_dir.iterdir() if output_dir.is_dir() else ():
        match = pattern.fullmatch(path.name)
        if match:
            found[path] = int(match.group(1))
    return found


def _remove(path: Path) -> None:
    if path.is_dir():
        remove_folder(path)  # a state folder must never be left half deleted
    else:
        path.unlink()


def prune(
    output_dir: Path, output_name: str, retention: Retention, *, kind: str, number: int, every: int
) -> list[Path]:
    """Remove the periodic saves of ``kind`` ("epoch" or "step") that fall out of ``retention`` now that save
    ``number`` exists (saves every ``every`` epochs/steps); return what was removed."""
    removed = []
    for state in (False, True):
        if kind == "epoch":
            keep = retention.last_n_epochs_state if state and retention.last_n_epochs_state else retention.last_n_epochs
            if keep is None:
                continue
            oldest = oldest_kept_epoch(number, every, keep)
        else:
            keep = retention.last_n_steps_state if state and retention.last_n_steps_state else retention.last_n_steps
            if keep is None:
                continue
            oldest = oldest_kept_step(number, every, keep)
        for path, saved in sorted(_numbered(Path(output_dir), output_name, kind, state).items()):
            if saved < oldest:
                _remove(path)
                removed.append(path)
    return removed
