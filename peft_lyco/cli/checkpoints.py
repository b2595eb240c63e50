"""Model weights on disk for merge and extract: an SDXL diffusers folder, a single-file SDXL checkpoint (SGM keys,
OpenCLIP text encoder 2) or an Anima DiT checkpoint, seen as slots ``(component, module path) -> weight`` in the
canonical module paths the converter uses. Only safetensors are read (never pickle); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
from safetensors.torch import save_file

from ..convert.io import save_kohya
from ..convert.names import BlockStyle, sdxl_unet_block_rules

SDXL_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
SGM_UNET = "model.diffusion_model."
SGM_TE1 = "conditioner.embedders.0.transformer."
SGM_TE2 = "conditioner.embedders.1.model."
# OpenCLIP (single-file text encoder 2) -> transformers CLIP module paths within a layer
OPENCLIP_LEAVES = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
QKV = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class Slot:
    """Where one adaptable weight lives: file, key, and (fused q/k/v) the row range inside that tensor."""

    file: Path
    key: str
    rows: tuple[int, int] | None = None


class Checkpoint:
    """Weights of one model on disk, by ``(component, canonical module path)``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such model file or folder")
        if self.path.is_dir():
            self.kind, self.model_type = "diffusers", "sdxl"
            self.files = self._diffusers_files()
        else:
            if self.path.suffix != ".safetensors":
                raise ValueError(f"{self.path}: only .safetensors checkpoints are read (pickled files are refused)")
            self.files = {None: [self.path]}
            keys = _keys(self.path)
            if any(k.startswith((SGM_UNET, "conditioner.")) for k in keys):
                self.kind, self.model_type = "single-file", "sdxl"
            elif any(re.match(r"^(net\.)?blocks\.\d+\.(self_attn|cross_attn|mlp)\.", k) for k in keys):
                self.kind, self.model_type = "anima", "anima"
            else:
                raise ValueError(
                    f"{self.path}: neither a single-file SDXL checkpoint (model.diffusion_model.* keys) nor an Anima "
                    f"DiT checkpoint (blocks.N.* keys); first keys: {sorted(keys)[:3]}"
                )
        self.slots = self._slots()

    # ------------------------------------------------------------------------------------------- discovery
    def _diffusers_files(self) -> dict[str | None, list[Path]]:
        if (self.path / "model_index.json").is_file():
            components = [c for c in SDXL_COMPONENTS if (self.path / c).is_dir()]
        elif (self.path / "config.json").is_file():
            components = ["unet"]
        else:
            raise ValueError(f"{self.path}: not a diffusers folder (no model_index.json or config.json)")
        files = {}
        for component in components:
            folder = self.path / component if (self.path / "model_index.json").is_file() else self.path
            found = sorted(folder.glob("*.safetensors"))
            if not found:
                raise ValueError(f"{folder}: no .safetensors weights (pickled .bin files are refused)")
            variants = [f for f in found if not re.search(r"\.(fp16|bf16)\.safetensors$", f.name)]
            files[component] = variants or found
        return files

    def _slots(self) -> dict[tuple[str, str], Slot]:
        slots: dict[tuple[str, str], Slot] = {}
        for component, files in self.files.items():
            for file in files:
                for key, shape in _shapes(file).items():
                    for target, slot in self._locate(component, file, key, shape):
                        slots[target] = slot
        return slots

    def _locate(self, component, file, key, shape):
        """``((component, path), Slot)`` pairs for one key of the checkpoint (none for non-adaptable tensors)."""
        if len(shape) not in (2, 4):
            return []
        if self.kind == "diffusers":
            if not key.endswith(".weight"):
                return []
            return [((component, canonical_clip(key[: -len(".weight")]) if component != "unet" else key[:-7]),
                     Slot(file, key))]  # fmt: skip
        if self.kind == "anima":
            if not key.endswith(".weight"):
                return []
            return [(("transformer", key.removeprefix("net.")[: -len(".weight")]), Slot(file, key))]
        return self._locate_sgm(file, key, shape)

    def _locate_sgm(self, file, key, shape):
        if key.startswith(SGM_UNET) and key.endswith(".weight"):
            path = UNET_STYLE.from_style(key[len(SGM_UNET) : -len(".weight")])
            return [(("unet", path), Slot(file, key))] if path else []
        if key.startswith(SGM_TE1) and key.endswith(".weight"):
            return [(("text_encoder", canonical_clip(key[len(SGM_TE1) : -len(".weight")])), Slot(file, key))]
        match = re.match(rf"^{re.escape(SGM_TE2)}transformer\.resblocks\.(\d+)\.(.+)$", key)
        if not match:
            return []
        layer, leaf = f"encoder.layers.{match.group(1)}", match.group(2)
        if leaf == "attn.in_proj_weight":
            width = shape[0] // 3
            return [
                (("text_encoder_2", f"{layer}.self_attn.{name}"), Slot(file, key, (i * width, (i + 1) * width)))
                for i, name in enumerate(QKV)
            ]
        if leaf.endswith(".weight") and leaf[: -len(".weight")] in OPENCLIP_LEAVES:
            return [(("text_encoder_2", f"{layer}.{OPENCLIP_LEAVES[leaf[:-7]]}"), Slot(file, key))]
        return []

    # ------------------------------------------------------------------------------------------- access
    def slot(self, component: str, path: str) -> Slot:
        """The slot of a module, or a ``KeyError`` naming it and the checkpoint."""
        found = self.slots.get((component, canonical_clip(path) if component != "unet" else path))
        if found is None and self.model_type == "anima":
            found = self.slots.get((component, path))
        if found is None:
            raise KeyError(f"{self.path}: no weight for {component} module '{path}' (another model's adapter?)")
        return found

    def read(self, slot: Slot, tensors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The weight at ``slot`` (from the ``tensors`` of its file when given, else read from disk)."""
        if tensors is None:
            with safetensors.safe_open(str(slot.file), framework="pt", device="cpu") as handle:
                tensor = handle.get_tensor(slot.key)
        else:
            tensor = tensors[slot.key]
        return tensor if slot.rows is None else tensor[slot.rows[0] : slot.rows[1]]


UNET_STYLE = BlockStyle("sgm", sdxl_unet_block_rules(2), 2)


def canonical_clip(path: str) -> str:
    """CLIP module paths without the ``text_model.`` level (both transformers layouts are found in files)."""
    return path.removeprefix("text_model.")


def _keys(path: Path) -> list[str]:
    return list(_shapes(path))


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118 (not iterable)
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from err


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of one checkpoint file."""
    with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118


def write_checkpoint(checkpoint: Checkpoint, out: Path, changed: dict[Path, tuple[dict, dict]]) -> Path:
    """Write the checkpoint to ``out`` with ``changed`` files (path -> (tensors, metadata)) replaced, atomically: a
    single file through a temporary file, a folder through a temporary copy renamed into place."""
    if checkpoint.kind != "diffusers":
        (tensors, metadata) = changed.get(checkpoint.path) or read_file(checkpoint.path)
        if out.suffix != ".safetensors":
            raise ValueError(f"{out}: a single-file checkpoint is written as .safetensors")
        return save_kohya(out, tensors, metadata)
    if out.exists():
        raise FileExistsError(f"{out}: exists; choose a new folder for the merged model")
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copytree(checkpoint.path, temp, dirs_exist_ok=True)
        for file, (tensors, metadata) in changed.items():
            target = temp / file.relative_to(checkpoint.path)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(target), metadata=metadata or None)
        umask = os.umask(0)
        os.umask(umask)
        temp.chmod(0o777 & ~umask)
        os.replace(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return out


def model_index(path: Path) -> dict:
    """The pipeline's model_index.json (empty for a UNet-only folder)."""
    index = path / "model_index.json"
    return json.loads(index.read_text()) if index.is_file() else {}
