"""Reading and writing kohya/LyCORIS files: safetensors only (never unpickled), written atomically."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import safetensors
import torch
from safetensors.torch import save_file

PathLike = str | os.PathLike
# Leading bytes of formats this module refuses: torch zip checkpoints and raw pickles.
PICKLE_MAGICS = {b"PK\x03\x04": "a torch zip checkpoint", b"\x80": "a pickle"}


def load_kohya(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a ``.safetensors`` adapter file into ``(state_dict, metadata)`` on the CPU.

    Pickled checkpoints (``.ckpt``, ``.pt``, ``.bin``) are refused without being opened by pickle; truncated or
    corrupt files raise a ``ValueError`` naming the file.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(9)
    for magic, kind in PICKLE_MAGICS.items():
        # a safetensors file starts with its header size (8 bytes) and then "{"; that size may begin with 0x80
        if head.startswith(magic) and head[8:9] != b"{":
            raise ValueError(
                f"{path} is {kind}, not safetensors; peft_lyco never unpickles files. "
                "Convert it to .safetensors with a tool you trust first."
            )
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    return state_dict, metadata


def save_kohya(
    path: PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``state_dict`` (+ string ``metadata``) to ``path`` as safetensors, atomically (temp file, then rename).

    A crash mid-write never leaves a partial file at ``path``; an existing file is replaced only once the new one is
    complete.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"kohya files are written as .safetensors; got '{path.name}'")
    bad = [key for key, value in state_dict.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    if bad:
        raise TypeError(f"state_dict must map str to torch.Tensor; bad entries: {bad[:5]}")
    metadata = dict(metadata or {})
    bad = [key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; bad entries: {bad[:5]}")
    # contiguous CPU copies: safetensors refuses views that share storage
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temp, metadata=metadata or None)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path
