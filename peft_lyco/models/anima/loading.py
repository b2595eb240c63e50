"""Checked loading of single-file safetensors checkpoints: prefixes stripped, keys and shapes validated up front.

Every check runs before any tensor is copied into the model, so a bad file leaves the model exactly as it was.
Only safetensors content is read, whatever the file is called (pickles are refused unopened).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

MAX_LISTED = 8


class LoadReport(NamedTuple):
    """Keys the model expected but the file lacked, and keys of the file the model does not have."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (any name: ``.sft`` too); pickles and unreadable files raise a
    ``ValueError`` naming it, a missing one ``FileNotFoundError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ...convert.io import check_safetensors

    path = os.fspath(check_safetensors(path))
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from the keys that carry it (``net.`` in Anima files); other keys are kept as they are."""
    return {key.removeprefix(prefix): value for key, value in state_dict.items()}


def list_keys(keys: Iterable[str]) -> str:
    """The first few keys, sorted, and how many there are in all."""
    keys = sorted(keys)
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > MAX_LISTED else "")


def check_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    optional: Iterable[str] = (),
    strict: bool = True,
    what: str = "checkpoint",
) -> LoadReport:
    """Compare ``state_dict`` with the model's keys and shapes; raise ``ValueError`` naming the offending keys.

    Shape mismatches and non-tensors always raise; missing (beyond ``optional``) and unexpected keys raise when
    ``strict``, else they are returned in the report.
    """
    expected = {key: value.shape for key, value in model.state_dict().items()}
    optional = set(optional)
    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{what}: values are not tensors for keys {list_keys(not_tensors)}")
    mismatched = [
        f"{key}: file {tuple(value.shape)} vs model {tuple(expected[key])}"
        for key, value in state_dict.items()
        if key in expected and tuple(value.shape) != tuple(expected[key])
    ]
    if mismatched:
        raise ValueError(
            f"{what}: shape mismatch (a file for another model or config?): " + "; ".join(mismatched[:MAX_LISTED])
        )
    report = LoadReport(
        missing_keys=sorted(set(expected) - set(state_dict) - optional),
        unexpected_keys=sorted(set(state_dict) - set(expected)),
    )
    if strict and (report.missing_keys or report.unexpected_keys):
        parts = []
        if report.missing_keys:
            parts.append(f"missing keys: {list_keys(report.missing_keys)}")
        if report.unexpected_keys:
            parts.append(f"unexpected keys: {list_keys(report.unexpected_keys)}")
        raise ValueError(f"{what}: " + "; ".join(parts))
    return report


def check_finite(state_dict: dict[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Raise naming the first keys whose floating tensors hold NaN or inf."""
    bad = [key for key, value in state_dict.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise ValueError(f"{what}: non-finite values (NaN/inf) in {list_keys(bad)}")
