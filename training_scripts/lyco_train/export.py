"""Writing a trained adapter: the kohya ``.safetensors`` every tool loads, and optionally PEFT adapter folders."""

from __future__ import annotations

from pathlib import Path

import torch

from peft_lyco.convert import peft_to_kohya, save_kohya

from .network import ADAPTER_NAME, save_peft_folder

PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_adapter(
    output_dir: Path,
    stem: str,
    components: dict[str, torch.nn.Module],
    *,
    model_type: str,
    metadata: dict[str, str],
    precision: str = "float",
    peft_folders: bool = False,
) -> list[Path]:
    """``<output_dir>/<stem>.safetensors`` in kohya format with ``metadata`` (training keys win over the
    converter's), plus ``<output_dir>/<stem>_peft/<component>/`` folders when asked; returns the paths written."""
    state_dict, file_metadata = peft_to_kohya(components, adapter_name=ADAPTER_NAME, model_type=model_type)
    dtype = PRECISIONS[precision]
    state_dict = {key: value.detach().to("cpu", dtype) for key, value in state_dict.items()}
    path = Path(output_dir) / f"{stem}.safetensors"
    save_kohya(path, state_dict, metadata={**(file_metadata or {}), **metadata})
    written = [path]
    if peft_folders:
        for name, module in components.items():
            folder = Path(output_dir) / f"{stem}_peft" / name
            save_peft_folder(folder, module)
            written.append(folder)
    return written
