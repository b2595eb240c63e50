"""The adapter side of a run: sd-scripts ``--network_args`` checked early, LoHa/LoKr injected per component, the
optimizer's parameter groups, and the files an adapter is saved as (kohya ``.safetensors`` and PEFT folders)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import inject_adapter_in_model
from peft.utils import CONFIG_NAME, get_peft_model_state_dict

from peft_lyco.presets import build_config, parse_network_args
from peft_lyco.training import param_groups

from .files import save_tensors, write_text

ADAPTER_NAME = "default"


def network_args_metadata(args: argparse.Namespace) -> dict[str, str]:
    """``ss_network_args``: the raw ``key=value`` strings as sd-scripts stores them."""
    return {key: value for key, _, value in (item.partition("=") for item in args.network_args)}


def inject(args: argparse.Namespace, components: dict[str, torch.nn.Module]) -> dict[str, Any]:
    """Freeze each component and add the adapter sd-scripts would build for it; return the configs by component."""
    configs = {}
    for name, module in components.items():
        module.requires_grad_(False)
        config = build_config(
            args.algo,
            module,
            network_dim=args.network_dim,
            network_alpha=args.network_alpha,
            network_args=args.network_args,
        )
        inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)
        configs[name] = config
    return configs


def optimizer_groups(args: argparse.Namespace, components: dict[str, torch.nn.Module]) -> list[dict]:
    """Per-component, regex and LoRA+ learning-rate groups (``peft_lyco.training.param_groups``)."""
    options = parse_network_args(args.network_args).training_options()
    return param_groups(
        components, lr=args.learning_rate, unet_lr=args.unet_lr, text_encoder_lr=args.text_encoder_lr, **options
    )


def save_peft_folder(folder: Path, module: torch.nn.Module) -> None:
    """A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) that
    ``PeftModel.from_pretrained(<base component>, folder)`` loads after ``import peft_lyco``."""
    state = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
    save_tensors(
        folder / "adapter_model.safetensors",
        {f"base_model.model.{key}": value for key, value in state.items()},
        metadata={"format": "pt"},
    )
    # the config as PeftConfig.save_pretrained writes it, but atomically (a kill never leaves half a JSON file)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.config.", suffix=".tmp") as scratch:
        module.peft_config[ADAPTER_NAME].save_pretrained(scratch)
        write_text(folder / CONFIG_NAME, (Path(scratch) / CONFIG_NAME).read_text(encoding="utf-8"))
