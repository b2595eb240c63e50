"""Optimizer parameter groups as sd-scripts builds them: per-component lrs, regex lrs and LoRA+ "plus" groups.

Each group is ``{"name": ..., "params": [...], "lr": ...}`` (torch optimizers keep the extra ``name``), so logs can
show which lr belongs to what. Groups whose lr is 0 are dropped, as in sd-scripts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Union

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .presets.architectures import detect_architecture
from .presets.network_args import parse_network_args
from .tuners.targets import unwrap

# sd-scripts' LoRA+ rule: "lora_up", "hada_w2_a" or "lokr_w1" in the name (so lokr_w1_a/_b too); PEFT LoRA: lora_B
PLUS_PARAMS = frozenset({"hada_w2_a", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lora_up", "lora_B"})

Lr = Union[float, int]


def param_groups(
    model: nn.Module | Mapping[str, nn.Module],
    *,
    lr: Lr,
    unet_lr: Lr | None = None,
    text_encoder_lr: Lr | Sequence[Lr] | None = None,
    reg_lrs: str | Mapping[str, Lr] | Sequence[tuple[str, Lr]] | None = None,
    loraplus_lr_ratio: float | None = None,
    loraplus_unet_lr_ratio: float | None = None,
    loraplus_text_encoder_lr_ratio: float | None = None,
) -> list[dict[str, Any]]:
    """Named parameter groups for the trainable parameters of ``model``.

    ``model`` is one module (a PEFT model or a model with injected adapters) or a mapping of components such as
    ``{"unet": ..., "text_encoder": ..., "text_encoder_2": ...}``: keys starting with ``text_encoder`` take
    ``text_encoder_lr`` (a number, or one per encoder in key order ``text_encoder``, ``text_encoder_2``, ...; a list
    shorter than the encoders repeats its first value), the others ``unet_lr``; both default to ``lr``. A single module
    counts as a text encoder when its architecture is one. ``reg_lrs`` (``network_reg_lrs``: ``"regex=lr,..."`` or
    ``{regex: lr}``) gives modules whose path fullmatches a regex their own group (first match wins). With a LoRA+
    ratio, "plus" parameters (LoHa ``hada_w2_a``, LoKr ``lokr_w1``, LoRA ``lora_B``) get ``lr × ratio``.
    """
    options = _training_options(reg_lrs, loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio)
    lr = _check_lr(lr, "lr")
    unet_lr = lr if unet_lr is None else _check_lr(unet_lr, "unet_lr")
    te_lrs = _text_encoder_lrs(text_encoder_lr, lr)
    groups: list[dict[str, Any]] = []
    for name, is_text_encoder, te_index, module in _components(model):
        if is_text_encoder:
            component_lr = te_lrs[te_index] if te_index < len(te_lrs) else te_lrs[0]
            ratio = options.loraplus_text_encoder_lr_ratio or options.loraplus_lr_ratio
        else:
            component_lr = unet_lr
            ratio = options.loraplus_unet_lr_ratio or options.loraplus_lr_ratio
        groups += _component_groups(name, module, component_lr, ratio, options.network_reg_lrs)
    if not any(group["params"] for group in groups):
        raise ValueError("param_groups: the model has no trainable parameters (inject an adapter first)")
    return [group for group in groups if group["params"] and group["lr"] != 0]


def _training_options(reg_lrs, loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio):
    """Validate the sd-scripts-style options with the network-args parser (same errors, same formats)."""
    given = {
        "network_reg_lrs": reg_lrs,
        "loraplus_lr_ratio": loraplus_lr_ratio,
        "loraplus_unet_lr_ratio": loraplus_unet_lr_ratio,
        "loraplus_text_encoder_lr_ratio": loraplus_text_encoder_lr_ratio,
    }
    return parse_network_args(**{name: value for name, value in given.items() if value is not None})


def _check_lr(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _text_encoder_lrs(text_encoder_lr: Any, lr: float) -> list[float]:
    if text_encoder_lr is None:
        return [lr]
    if isinstance(text_encoder_lr, (list, tuple)):
        if not text_encoder_lr:
            return [lr]
        return [_check_lr(value, f"text_encoder_lr[{i}]") for i, value in enumerate(text_encoder_lr)]
    return [_check_lr(text_encoder_lr, "text_encoder_lr")]


def _components(model: nn.Module | Mapping[str, nn.Module]) -> list[tuple[str, bool, int, nn.Module]]:
    """``(name, is_text_encoder, text-encoder index, module)`` per component."""
    if isinstance(model, nn.Module):
        try:
            is_text_encoder = detect_architecture(model).component == "text_encoder"
        except ValueError:
            is_text_encoder = False
        return [("text_encoder" if is_text_encoder else "unet", is_text_encoder, 0, model)]
    if not isinstance(model, Mapping) or not all(isinstance(m, nn.Module) for m in model.values()):
        raise TypeError("param_groups: model must be an nn.Module or a mapping of component name -> nn.Module")
    components = []
    for name, module in model.items():
        match = re.fullmatch(r"text_encoder(?:_(\d+))?", name)
        if name.startswith("text_encoder") and not match:
            raise ValueError(
                f"param_groups: text encoder components are named text_encoder, text_encoder_2, ...; got {name!r}"
            )
        index = (int(match.group(1)) - 1 if match.group(1) else 0) if match else 0
        components.append((name, match is not None, index, module))
    return components


def _trainable(module: nn.Module) -> list[tuple[str, str, nn.Parameter]]:
    """``(module path, parameter kind, parameter)`` of every trainable parameter; inside a tuner layer the path is
    the adapted module's and the kind its ParameterDict/ModuleDict name (``hada_w1_a``, ``lora_B``, ...)."""
    root = unwrap(module)
    seen: set[int] = set()
    found = []
    for path, layer in root.named_modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        for name, param in layer.named_parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                kind = next(part for part in name.split(".") if part != "base_layer")
                found.append((path, kind, param))
    for name, param in root.named_parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            path, _, leaf = name.rpartition(".")
            found.append((path, leaf, param))
    return found


def _component_groups(
    name: str, module: nn.Module, lr: float, ratio: float | None, reg_lrs: Sequence[tuple[str, float]]
) -> list[dict[str, Any]]:
    """Groups of one component: one per matched regex (in ``reg_lrs`` order), then the component's own; each
    split into a plain and a "plus" part when a LoRA+ ratio is set."""
    buckets: dict[int | None, dict[str, list]] = {}
    for path, kind, param in _trainable(module):
        index = next((i for i, (pattern, _) in enumerate(reg_lrs) if re.fullmatch(pattern, path)), None)
        part = "plus" if ratio is not None and kind in PLUS_PARAMS else "plain"
        buckets.setdefault(index, {"plain": [], "plus": []})[part].append(param)
    groups = []
    for index in sorted(buckets, key=lambda i: (i is None, i or 0)):
        label = name if index is None else f"{name} reg_lr_{index}"
        base_lr = lr if index is None else reg_lrs[index][1]
        groups.append({"name": label, "params": buckets[index]["plain"], "lr": base_lr})
        if buckets[index]["plus"]:
            groups.append({"name": f"{label} plus", "params": buckets[index]["plus"], "lr": base_lr * ratio})
    return groups
