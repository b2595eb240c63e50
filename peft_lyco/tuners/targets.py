"""Which modules an adapter can target, and PEFT ``target_modules``/pattern keys that select exactly given module
paths and nothing else."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

# The layer types LoHa/LoKr adapt (and that kohya files name).
ADAPTABLE_LAYERS = (nn.Linear, nn.Conv2d)


def unwrap(model: nn.Module) -> nn.Module:
    """The model whose module paths PEFT targets and files name: a ``PeftModel``'s base model, else the model."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def adaptable_layers(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, base layer)`` of every ``nn.Linear``/``nn.Conv2d`` under ``root``, in model order.

    A module already wrapped by a PEFT tuner layer is listed under the wrapper's path as the layer it wraps; the
    tuner's own sub-modules (``base_layer``, ``lora_A``, ...) are not listed.
    """
    inside: list[str] = []
    for path, module in root.named_modules():
        if not path or any(path.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, BaseTunerLayer):
            inside.append(path + ".")
            module = module.get_base_layer()
        if isinstance(module, ADAPTABLE_LAYERS):
            yield path, module


def exact_target_modules(paths: Iterable[str], module_names: Iterable[str] | None = None) -> set[str] | str:
    """The set of ``paths`` (PEFT's own form of a target list) when PEFT's list rule (``name == t`` or ``name.endswith("." + t)``) can hit no
    other module of ``module_names``; otherwise, or when the model's names are unknown, a full-match regex.

    A list is easier to read in ``adapter_config.json``; the regex is needed where one path is a dotted suffix of
    another module's (Anima's ``blocks.0.self_attn.q_proj`` inside ``llm_adapter.blocks.0.self_attn.q_proj``).
    """
    targets = set(paths)
    if module_names is not None and not _suffix_clash(targets, module_names):
        return targets
    return "|".join(re.escape(path) for path in sorted(targets))


def exact_pattern_key(path: str) -> str:
    """A ``rank_pattern``/``alpha_pattern``/``option_pattern`` key matching only ``path`` under PEFT's pattern rule."""
    return "^" + re.escape(path)


def _suffix_clash(targets: set[str], names: Iterable[str]) -> bool:
    for name in names:
        if name in targets:
            continue
        parts = name.split(".")
        if any(".".join(parts[i:]) in targets for i in range(1, len(parts))):
            return True
    return False


def all_linear_targets(model: nn.Module) -> set[str]:
    """The module paths PEFT's ``target_modules="all-linear"`` selects in ``model``, found without touching it.

    As PEFT: every ``nn.Linear`` and transformers ``Conv1D``, and tuner layers named ``*Linear*``, except a
    transformers model's output embedding and the modules inside tuner layers. Checking these before injection is
    what lets an unsupported one (``Conv1D``) be refused while the model is still unchanged.
    """
    found = {
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D))
        or (isinstance(module, BaseTunerLayer) and "Linear" in type(module).__name__)
    }
    if isinstance(model, PreTrainedModel) and model.get_output_embeddings() is not None:
        head = model.get_output_embeddings()
        found -= {name for name, module in model.named_modules() if module is head}
    for prefix, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            found -= {f"{prefix}.{suffix}" for suffix, _ in module.named_modules() if suffix}
    return found


def is_all_linear(target_modules: object) -> bool:
    """Whether ``target_modules`` is PEFT's ``"all-linear"`` shorthand (any letter case, as PEFT reads it)."""
    return isinstance(target_modules, str) and target_modules.lower() == "all-linear"
