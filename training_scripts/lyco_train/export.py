"""Writing a trained adapter: the kohya ``.safetensors`` every tool loads, and optionally PEFT adapter folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from peft_lyco.convert import peft_to_kohya, save_kohya

from .metadata import RunInfo, training_metadata
from .network import ADAPTER_NAME, network_args_metadata, save_peft_folder
from .state import Position

CONVERTER_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")
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
    naming: str = "sgm",
) -> list[Path]:
    """``<output_dir>/<stem>.safetensors`` in kohya format, plus ``<output_dir>/<stem>_peft/<component>/`` folders
    when asked; returns the paths written.

    The converter's network keys (``ss_network_module/dim/alpha``, and the layout options in ``ss_network_args``,
    which loaders read back) take precedence; the user's raw ``--network_args`` are merged into ``ss_network_args``.
    Values beyond the range of ``precision`` (float16 ends at 65504) make the file float32, with a warning, rather
    than inf.
    """
    converted = {k: v for k, v in metadata.items() if k not in CONVERTER_KEYS}
    state_dict, file_metadata = peft_to_kohya(
        components,
        adapter_name=ADAPTER_NAME,
        model_type=model_type,
        dtype=torch.float32,
        metadata=converted,
        naming=naming,
    )
    dtype = PRECISIONS[precision]
    too_large = [key for key, value in state_dict.items() if value.abs().max() > torch.finfo(dtype).max]
    if too_large:
        # a save must never be lost to the file dtype: inf in the file would make it useless
        print(
            f"warning: {len(too_large)} tensor(s) exceed the range of --save_precision {precision} (e.g. "
            f"{too_large[0]}); '{stem}.safetensors' is saved in float32 instead"
        )
    elif dtype != torch.float32:
        state_dict, file_metadata = peft_to_kohya(
            components,
            adapter_name=ADAPTER_NAME,
            model_type=model_type,
            dtype=dtype,
            metadata=converted,
            naming=naming,
        )
    if "ss_network_args" in metadata:
        merged = {**json.loads(metadata["ss_network_args"]), **json.loads(file_metadata.get("ss_network_args", "{}"))}
        file_metadata["ss_network_args"] = json.dumps(merged)
    path = Path(output_dir) / f"{stem}.safetensors"
    save_kohya(path, state_dict, metadata=file_metadata)
    written = [path]
    if peft_folders:
        for name, module in components.items():
            folder = Path(output_dir) / f"{stem}_peft" / name
            save_peft_folder(folder, module)
            written.append(folder)
    return written


class AdapterWriter:
    """``save(stem, position)`` for the loop: the run's adapter with sd-scripts metadata for that position."""

    def __init__(self, args, run: RunInfo, accelerator, training, records, buckets, objective: dict[str, Any]):
        self.args, self.run, self.accelerator, self.training = args, run, accelerator, training
        self.records, self.buckets, self.objective = records, buckets, objective

    def __call__(self, stem: str, position: Position) -> list[Path]:
        args, training = self.args, self.training
        metadata = training_metadata(
            args,
            self.run,
            network_args=network_args_metadata(args),
            records=self.records,
            buckets=self.buckets,
            batches_per_epoch=training.data.batches_per_epoch,
            num_epochs=training.steps.total_epochs,
            total_steps=training.steps.total_steps,
            position=position,
            num_processes=self.accelerator.num_processes,
            objective=self.objective,
        )
        models = {name: self.accelerator.unwrap_model(model) for name, model in training.models.items()}
        return save_adapter(
            Path(args.output_dir),
            stem,
            models,
            model_type=self.run.family,
            metadata=metadata,
            precision=args.save_precision,
            peft_folders=args.save_peft_adapter,
            naming=getattr(args, "save_naming", "sgm"),
        )
