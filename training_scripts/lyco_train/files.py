"""How the trainers write files: atomically, durably, with the user's umask, and how they clean what a killed run left.

Every file goes to a hidden temporary ``.<name>.<random>.tmp`` beside its final path, is flushed to disk, and is then
renamed onto the final path, so a run killed at any moment leaves either the old complete file or the new complete
one there, never a partial one. The temporaries a kill leaves behind are ignored by every reader (no reader looks for
hidden ``.tmp`` names) and removed by the next run with the same ``--output_dir`` and ``--output_name``. The writing
itself is ``peft_lyco.convert.io.write_atomically`` (also behind ``save_kohya``): flushed to disk, with the mode a plain
``open`` gives under the user's umask.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from peft_lyco.convert.io import write_atomically

TEMP_SUFFIX = ".tmp"
# folders the state writer of earlier versions left when killed (a copy being assembled)
PARTIAL_SUFFIX = ".partial"


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """A safetensors file written atomically (contiguous CPU copies: safetensors refuses shared views)."""
    tensors = {name: value.detach().to("cpu").contiguous() for name, value in tensors.items()}
    return write_atomically(path, lambda temporary: save_file(tensors, temporary, metadata=metadata))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """A UTF-8 text file written atomically."""
    return write_atomically(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def save_image(image, path: str | os.PathLike) -> Path:
    """A PIL image written atomically, in the format its suffix names."""
    image_format = Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG")
    return write_atomically(path, lambda temporary: image.save(temporary, format=image_format))


def remove_folder(folder: str | os.PathLike) -> None:
    """Delete a folder so that it disappears at once: renamed to a hidden temporary name beside it first (a run
    killed while deleting leaves that name, which ``remove_leftovers`` removes, never a half-deleted folder)."""
    folder = Path(folder)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=TEMP_SUFFIX, dir=folder.parent))
    os.replace(folder, temporary)
    shutil.rmtree(temporary)


def run_output_names(output_name: str) -> re.Pattern:
    """The names a run of ``output_name`` gives its files and folders in ``--output_dir``: ``NAME``, ``NAME-step<8
    digits>`` or ``NAME-<6 digits>``, then ``.safetensors``, ``-state`` or ``_peft``. Matching them exactly keeps the
    files of a run named, say, ``NAME_v2`` out of reach."""
    stem = re.escape(output_name) + r"(?:-step\d{8}|-\d{6})?"
    return re.compile(stem + r"(?:\.safetensors|-state|_peft)")


def _final_name(temporary: str) -> str | None:
    """``.<name>.<random>.tmp`` -> ``<name>`` (None for other names)."""
    if not (temporary.startswith(".") and temporary.endswith(TEMP_SUFFIX)):
        return None
    return temporary[1 : -len(TEMP_SUFFIX)].rpartition(".")[0] or None


def remove_leftovers(output_dir: str | os.PathLike, output_name: str) -> list[Path]:
    """Remove the temporary files and partial folders killed saves of ``output_name`` left in ``output_dir`` (beside
    its files, inside its state and PEFT folders, among its samples; other runs' files are left alone); return them."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    ours = run_output_names(output_name)
    found = []
    for path in root.iterdir():
        final = _final_name(path.name)
        if (
            final is not None
            and ours.fullmatch(final)
            or path.name.endswith(PARTIAL_SUFFIX)
            and ours.fullmatch(path.name[: -len(PARTIAL_SUFFIX)])
        ):
            found.append(path)
        elif path.is_dir() and ours.fullmatch(path.name):
            found += [p for p in path.rglob(f".*{TEMP_SUFFIX}") if _final_name(p.name)]
    samples = re.compile(re.escape(output_name) + r"_\d{6}_\d{2}\.\w+")
    if (root / "sample").is_dir():
        found += [p for p in (root / "sample").iterdir() if samples.fullmatch(_final_name(p.name) or "")]
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found
