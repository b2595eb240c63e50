"""The PEFT adapter config diffusers stores in a file's ``lora_adapter_metadata`` entry, read back for alphas.

diffusers' ``save_lora_weights``/``save_lora_adapter`` write PEFT state dicts, which hold no ``alpha`` tensors (PEFT
keeps the scale in the config). When the config was stored with the file (``save_lora_adapter`` always does,
``save_lora_weights`` with ``*_lora_adapter_metadata``), each module's alpha is recovered from it exactly as PEFT
resolves it; without it, the scale of such a file is unknown and the file is refused rather than read as alpha = rank.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from peft.utils.other import get_pattern_key

METADATA_KEY = "lora_adapter_metadata"


def adapter_configs(metadata: Mapping[str, str] | None) -> dict[str | None, dict[str, Any]]:
    """Component name -> PEFT config dict from ``lora_adapter_metadata`` (``None``: one config, no component prefix).

    Pipeline-level saves prefix every field with the component (``unet.alpha``); model-level saves do not.
    Unreadable JSON raises a ``ValueError`` naming the entry.
    """
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        fields = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"the file's '{METADATA_KEY}' entry is not valid JSON: {err}") from err
    if not isinstance(fields, dict):
        raise ValueError(f"the file's '{METADATA_KEY}' entry is not a JSON object")  # noqa: TRY004 (a bad file)
    if "r" in fields or "peft_type" in fields:
        return {None: fields}
    configs: dict[str | None, dict[str, Any]] = {}
    for key, value in fields.items():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def config_alpha(config: Mapping[str, Any], path: str, spatial: bool) -> float | None:
    """The alpha PEFT gives module ``path`` under ``config`` (``None``: alpha = rank).

    LoHa/LoKr: ``alpha_pattern``, else ``conv_alpha`` for kxk convs, else ``alpha``; LoRA: ``alpha_pattern``, else
    ``lora_alpha`` (rank-stabilised LoRA folded in as kohya readers divide by r).
    """
    patterns = config.get("alpha_pattern") or {}
    key = get_pattern_key(patterns.keys(), path) if patterns else None
    lora = "lora_alpha" in config
    if key in patterns:
        alpha = patterns[key]
    elif lora:
        alpha = config.get("lora_alpha")
    elif spatial and config.get("conv_alpha") is not None:
        alpha = config.get("conv_alpha")
    else:
        alpha = config.get("alpha")
    if lora and alpha and config.get("use_rslora"):
        rank_patterns = config.get("rank_pattern") or {}
        rank_key = get_pattern_key(rank_patterns.keys(), path) if rank_patterns else None
        alpha = alpha * float(rank_patterns.get(rank_key, config.get("r", 8))) ** 0.5
    return float(alpha) if alpha else None
