"""LoHa/LoKr files in diffusers pipelines: ``enable_lyco(pipe)`` teaches ``pipe.load_lora_weights`` to load them.

Files are converted with ``peft_lyco.convert`` against the pipeline's own modules, checked completely, then injected
as PEFT adapters (LoHa/LoKr layers, PEFT LoRA for the plain LoRA modules of mixed files), so diffusers' adapter API
(``set_adapters``, ``fuse_lora``, ``disable_lora``, ``delete_adapters``, ``unload_lora_weights``...) works on them.
If anything fails the pipeline is left exactly as it was.
"""

from __future__ import annotations

import itertools
import os
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .compat import (
    PEFT_LOADED_FLAG,
    disable_offloading,
    fetch_lora_state_dict,
    low_cpu_mem_usage_default,
    reapply_offloading,
)
from .convert import is_lycoris_state_dict, kohya_to_peft, load_kohya
from .convert.kohya import KohyaConversion, component_models
from .convert.names import model_names, model_type_of

StateDictOrPath = str | os.PathLike | Mapping[str, torch.Tensor]
_ORIGINAL = "_peft_lyco_original_load_lora_weights"


def enable_lyco(pipe: Any) -> Any:
    """Make ``pipe.load_lora_weights`` accept LoHa/LoKr (and mixed) kohya/LyCORIS files; LoRA files go to diffusers.

    Only this pipeline object changes (its bound method is replaced); calling it twice is harmless. Returns ``pipe``.
    Raises ``ValueError`` for pipelines of other model families (SDXL and Anima are supported).
    """
    model_type_of(pipe)
    if not hasattr(pipe, "load_lora_weights"):
        raise ValueError(
            f"{type(pipe).__name__} has no load_lora_weights to extend; call peft_lyco.diffusers.load_lyco_weights(pipe, "
            "path_or_dict, adapter_name=...) directly"
        )
    if not hasattr(pipe, _ORIGINAL):
        setattr(pipe, _ORIGINAL, pipe.load_lora_weights)
        pipe.load_lora_weights = types.MethodType(_load_lora_weights, pipe)
    return pipe


def _load_lora_weights(
    self: Any,
    pretrained_model_name_or_path_or_dict: StateDictOrPath,
    adapter_name: str | None = None,
    hotswap: bool = False,
    **kwargs: Any,
) -> None:
    """``load_lora_weights`` that sends LoHa/LoKr files to ``load_lyco_weights`` and everything else to diffusers."""
    ignore_unknown_keys = kwargs.pop("ignore_unknown_keys", False)
    state_dict, metadata = _fetch(pretrained_model_name_or_path_or_dict, kwargs)
    if state_dict is None or not is_lycoris_state_dict(state_dict):
        models = component_models(model_names(model_type_of(self)), self)
        before = _adapter_names(models)
        original = getattr(self, _ORIGINAL)
        original(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, hotswap=hotswap, **kwargs)
        new = _adapter_names(models) - before
        if len(new) == 1:  # diffusers activates a new LoRA only on LoRA layers; make it the only active adapter
            _activate_only(models, new.pop())
        return
    if hotswap:
        raise ValueError("hotswap is not supported for LoHa/LoKr adapters; load them under a new adapter_name")
    load_lyco_weights(
        self,
        state_dict,
        adapter_name=adapter_name,
        metadata=metadata,
        low_cpu_mem_usage=kwargs.get("low_cpu_mem_usage", low_cpu_mem_usage_default()),
        ignore_unknown_keys=ignore_unknown_keys,
    )


def _fetch(source: StateDictOrPath, kwargs: Mapping[str, Any]) -> tuple[Mapping | None, dict | None]:
    """The raw state dict and file metadata behind ``load_lora_weights``' arguments (``None`` if not safetensors).

    Local files and folders (with ``weight_name``) are read here; hub ids go through diffusers' own fetcher with
    pickles disallowed.
    """
    if isinstance(source, Mapping):
        return source, None
    path = Path(source)
    if path.is_dir() and kwargs.get("weight_name"):
        path = path / kwargs.get("subfolder", "") / kwargs["weight_name"]
    if path.is_file():
        if path.suffix != ".safetensors":
            return None, None
        return load_kohya(path)
    fetch_args = {
        name: kwargs.get(name)
        for name in (
            "weight_name",
            "local_files_only",
            "cache_dir",
            "force_download",
            "proxies",
            "token",
            "revision",
            "subfolder",
        )
    }
    try:
        return fetch_lora_state_dict(source, fetch_args)
    except (OSError, ValueError):  # no safetensors file there: diffusers' own loader decides
        return None, None


def load_lyco_weights(
    pipe: Any,
    path_or_dict: StateDictOrPath,
    adapter_name: str | None = None,
    weight: float = 1.0,
    *,
    metadata: Mapping[str, str] | None = None,
    low_cpu_mem_usage: bool = True,
    ignore_unknown_keys: bool = False,
) -> str:
    """Load a kohya/LyCORIS LoHa/LoKr (or mixed) file into ``pipe`` as adapter ``adapter_name``; returns the name.

    The file is converted and validated against every component before anything is injected; on any error the
    pipeline is restored exactly (modules, weights, adapter configs, trainability). ``weight`` is the adapter's
    strength (as ``set_adapters`` weights). ``low_cpu_mem_usage`` (default, as in diffusers) creates the adapter tensors
    empty and assigns the file's tensors (PEFT's meta-device path); either way the adapters end up identical.
    """
    if isinstance(path_or_dict, Mapping):
        state_dict, file_metadata = dict(path_or_dict), {}
    else:
        state_dict, file_metadata = load_kohya(path_or_dict)
    metadata = {**file_metadata, **(metadata or {})}
    scheme = model_names(model_type_of(pipe))
    models = component_models(scheme, pipe)
    used = _adapter_names(models)
    adapter_name = adapter_name or next(
        f"default_{i}" for i in itertools.count(len(used)) if f"default_{i}" not in used
    )
    taken = sorted(name for name, model in models.items() if adapter_name in getattr(model, "peft_config", {}))
    if taken:
        raise ValueError(f"adapter name '{adapter_name}' is already used in {taken}; pick another adapter_name")
    conversion = kohya_to_peft(
        state_dict,
        metadata=metadata,
        model_type=scheme.model_type,
        model=models,
        ignore_unknown_keys=ignore_unknown_keys,
    )
    offload = disable_offloading(pipe)
    snapshot = _Snapshot(models, conversion)
    try:
        for name, component in conversion.items():
            _inject(models[name], component, adapter_name, low_cpu_mem_usage)
        _activate_only(models, adapter_name)
        if weight != 1.0:
            for model in models.values():
                for layer in model.modules():
                    if isinstance(layer, BaseTunerLayer):
                        layer.set_scale(adapter_name, weight)
    except BaseException:
        snapshot.restore(adapter_name)
        raise
    finally:
        reapply_offloading(pipe, offload)
    return adapter_name


def _adapter_names(models: Mapping[str, nn.Module]) -> set[str]:
    return {name for model in models.values() for name in getattr(model, "peft_config", {})}


def _activate_only(models: Mapping[str, nn.Module], adapter_name: str) -> None:
    """Make the newly loaded adapter the only active one on every tuner layer, as diffusers does for LoRA files.

    PEFT switches only the layers of the tuner type it just injected, so without this an adapter of another type
    (LoRA under LoKr, or the reverse) would silently stay active.
    """
    for model in models.values():
        for layer in model.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.set_adapter([adapter_name])


def _inject(model: nn.Module, component, adapter_name: str, low_cpu_mem_usage: bool) -> None:
    """Inject every method part of one component and load its tensors; raise if a tensor did not land."""
    for algo, part in component.parts.items():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(
                part.config, model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=part.state_dict
            )
        state_dict = _match_dtypes(model, part.state_dict, adapter_name) if low_cpu_mem_usage else part.state_dict
        result = set_peft_model_state_dict(model, state_dict, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        loaded = set(state_dict) - set(result.unexpected_keys)
        if len(loaded) != len(state_dict):
            raise RuntimeError(
                f"{algo} tensors not loaded into {type(model).__name__}: {sorted(result.unexpected_keys)[:5]}"
            )
    setattr(model, PEFT_LOADED_FLAG, True)


def _match_dtypes(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], adapter_name: str
) -> dict[str, torch.Tensor]:
    """Cast file tensors to the dtype of the (empty) adapter parameters they replace; assignment would keep fp16."""
    params = dict(model.named_parameters())
    cast = {}
    for key, tensor in state_dict.items():
        module, _, param = key.rpartition(".")
        if param == "weight":  # LoRA: <path>.lora_A.weight -> <path>.lora_A.<adapter>.weight
            target = params.get(f"{module}.{adapter_name}.weight")
        else:
            target = params.get(f"{key}.{adapter_name}")
        cast[key] = tensor.to(target.dtype) if target is not None else tensor
    return cast


class _Snapshot:
    """What injection can change, recorded so a failed load can be undone exactly."""

    def __init__(self, models: Mapping[str, nn.Module], conversion: KohyaConversion):
        self.models = models
        self.modules = {}
        for name, component in conversion.items():
            model = models[name]
            for module in component.modules:
                parent_path, _, child = module.path.rpartition(".")
                parent = model.get_submodule(parent_path)
                self.modules[name, module.path] = (parent, child, getattr(parent, child))
        self.configs = {
            name: dict(model.peft_config) if hasattr(model, "peft_config") else None for name, model in models.items()
        }
        self.flags = {name: model.__dict__.get(PEFT_LOADED_FLAG, _MISSING) for name, model in models.items()}
        self.trainable = [(p, p.requires_grad) for model in models.values() for p in model.parameters()]
        self.active = {
            id(layer): (layer, list(layer.active_adapters))
            for model in models.values()
            for layer in model.modules()
            if isinstance(layer, BaseTunerLayer)
        }

    def restore(self, adapter_name: str) -> None:
        for parent, child, original in self.modules.values():
            setattr(parent, child, original)
        for layer, active in self.active.values():
            if any(
                adapter_name in getattr(layer, n, {}) for n in (*layer.adapter_layer_names, *layer.other_param_names)
            ):
                layer.delete_adapter(adapter_name)
            layer.set_adapter(active)
        for name, model in self.models.items():
            if self.configs[name] is None:
                model.__dict__.pop("peft_config", None)
            else:
                model.peft_config = self.configs[name]
            if self.flags[name] is _MISSING:
                model.__dict__.pop(PEFT_LOADED_FLAG, None)
            else:
                setattr(model, PEFT_LOADED_FLAG, self.flags[name])
        for param, flag in self.trainable:
            param.requires_grad_(flag)


_MISSING = object()
