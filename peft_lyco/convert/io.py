"""Reading and writing kohya/LyCORIS files: safetensors only (never unpickled), written atomically.

A file's format is decided by its content, never by its name: a safetensors file is recognised by parsing its header
(an 8-byte little-endian length, then that many bytes of JSON starting with ``{``); only when that fails are the
leading bytes compared with the signatures of torch zip checkpoints and pickles, which are refused unopened.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import safetensors
import torch
from safetensors.torch import save_file

PathLike = str | os.PathLike
# safetensors refuses headers over 100 MB; a length beyond that (or beyond the file) means "not safetensors"
MAX_HEADER_BYTES = 100_000_000
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL_OPCODE = 0x80  # PROTO opcode, followed by the protocol number 2..5
REFUSED_FORMATS = {"torch-zip": "a torch zip checkpoint", "pickle": "a pickle"}


def sniff_format(path: PathLike) -> str:
    """``"safetensors"``, ``"torch-zip"``, ``"pickle"`` or ``"unknown"``, from the first bytes of the file at ``path``.

    The safetensors header is parsed first: its length's low byte can be ``0x80``, the pickle PROTO opcode, so a
    leading-byte test alone would call one valid file in 32 a pickle. Raises ``FileNotFoundError`` naming the path.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: '{path}'")
    if path.is_dir():
        raise IsADirectoryError(f"'{path}' is a folder, not an adapter file")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(10)
    if len(head) >= 9:
        (length,) = struct.unpack("<Q", head[:8])
        if 2 <= length <= min(size - 8, MAX_HEADER_BYTES) and head[8:9] == b"{":
            return "safetensors"
    if head.startswith(ZIP_MAGIC):
        return "torch-zip"
    if len(head) >= 2 and head[0] == PICKLE_PROTOCOL_OPCODE and 2 <= head[1] <= 5:
        return "pickle"
    return "unknown"


def check_safetensors(path: PathLike) -> Path:
    """``path`` as a ``Path`` if it holds a safetensors file; otherwise raise a ``ValueError`` that names it.

    Pickles and torch zip checkpoints get a message saying they are refused unopened; ``FileNotFoundError`` for a
    missing path.
    """
    path = Path(path)
    kind = sniff_format(path)
    if kind in REFUSED_FORMATS:
        raise ValueError(
            f"{path} is {REFUSED_FORMATS[kind]}, not safetensors; peft_lyco never unpickles files. "
            "Convert it to .safetensors with a tool you trust first."
        )
    if kind != "safetensors":
        raise ValueError(f"{path} is not a safetensors file (no valid safetensors header; truncated or corrupt?)")
    return path


def load_kohya(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors adapter file into ``(state_dict, metadata)`` on the CPU, whatever its file name.

    Pickled checkpoints (``.ckpt``, ``.pt``, ``.bin``) are refused without being opened by pickle; a missing file
    raises ``FileNotFoundError``; truncated or corrupt files raise a ``ValueError`` naming the file.
    """
    path = check_safetensors(path)
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open)
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    return state_dict, metadata


def save_kohya(
    path: PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``state_dict`` (+ string ``metadata``) to ``path`` as safetensors, atomically (temp file, then rename).

    A crash mid-write never leaves a partial file at ``path``; an existing file is replaced only once the new one is
    complete. The file gets the permissions of a newly created file under the process umask (as ``open`` gives), so
    a UI running under another account reads it where it would read any other file of the user.
    """
    path = Path(path)
    if path.suffix.lower() not in (".safetensors", ".sft"):
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
    return write_atomically(path, lambda temp: save_file(tensors, temp, metadata=metadata or None))


def write_atomically(path: PathLike, write: Callable[[str], None]) -> Path:
    """Run ``write(temp_path)`` on a temporary file next to ``path``, then rename it onto ``path``.

    The temporary file (``.<name>.<random>.tmp``) is removed if ``write`` fails; the result is flushed to disk before
    the rename and has the mode a plain ``open`` would give under the current umask (``mkstemp``'s 0600 would hide it
    from other accounts). Raises ``PermissionError``/``OSError`` naming the folder when it cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write '{path}': it is a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise type(err)(err.errno, f"cannot write into '{path.parent}': {err.strerror}") from err
    os.close(handle)
    try:
        write(temp)
        os.chmod(temp, 0o666 & ~current_umask())
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def current_umask() -> int:
    """The process umask (read by setting and restoring it: Python has no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable; some file systems cannot open folders, which only weakens durability."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
