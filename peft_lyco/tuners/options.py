"""Resolve what one module's adapter looks like: rank, alpha and layout options after all overrides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peft.utils.other import get_pattern_key
from torch import nn

from .config import LycoConfig


@dataclass(frozen=True)
class LayerSpec:
    """Rank, alpha and layout options of one adapter on one module."""

    rank: int
    alpha: float
    options: dict[str, Any]


def layer_geometry(layer: nn.Module, module_name: str = "") -> tuple[int, int, tuple[int, ...]]:
    """``(out, in, kernel)`` of the weight an adapter must match; grouped convs use ``in_channels // groups``.

    Raises a ``TypeError`` naming the module for anything but ``nn.Linear`` and ``nn.Conv2d``.
    """
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features, ()
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels, layer.in_channels // layer.groups, tuple(layer.kernel_size)
    where = f"module '{module_name}'" if module_name else "target module"
    raise TypeError(
        f"{where} is a {type(layer).__module__}.{type(layer).__name__}; peft_lyco LoHa/LoKr adapt only "
        "torch.nn.Linear and torch.nn.Conv2d. Remove it from target_modules."
    )


def _pattern_value(patterns: dict, module_name: str, default: Any) -> Any:
    return patterns.get(get_pattern_key(patterns.keys(), module_name), default)


def resolve_layer_spec(config: LycoConfig, module_name: str, layer: nn.Module) -> LayerSpec:
    """Rank/alpha/options for ``module_name``: patterns first, then conv_r/conv_alpha for kxk convs, then r/alpha."""
    _, _, kernel = layer_geometry(layer, module_name)
    spatial = any(k != 1 for k in kernel)
    default_rank = config.conv_r if spatial and config.conv_r is not None else config.r
    default_alpha = config.conv_alpha if spatial and config.conv_alpha is not None else config.alpha
    rank = _pattern_value(config.rank_pattern, module_name, default_rank)
    alpha = _pattern_value(config.alpha_pattern, module_name, default_alpha)
    if not alpha:
        alpha = rank
    options = {name: getattr(config, name) for name in (*config.layout_options, *config.adapter_options)}
    options.update(_pattern_value(config.option_pattern, module_name, {}))
    return LayerSpec(rank=rank, alpha=float(alpha), options=options)
