"""LoHa/LoKr files in diffusers pipelines: ``enable_lyco(pipe)`` teaches ``pipe.load_lora_weights`` to load them.

Files are converted with ``peft_lyco.convert`` against the pipeline's own modules, checked completely, then injected
as PEFT adapters (LoHa/LoKr layers, PEFT LoRA for the plain LoRA modules of mixed files), so diffusers' adapter API
(``set_adapters``, ``fuse_lora``, ``disable_lora``, ``delete_adapters``, ``unload_lora_weights``...) works on them.
If anything fails the pipeline is left exactly as it was.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import types
import warnings
import weakref
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
from .convert.adapter_metadata import METADATA_KEY, adapter_configs
from .convert.kohya import KohyaConversion, component_models
from .convert.names import model_names, model_type_of
from .functional import check_alpha
from .tuners.model import check_adapter_name

StateDictOrPath = str | os.PathLike | Mapping[str, torch.Tensor]
_ORIGINAL = "_peft_lyco_original_load_lora_weights"
_ORIGINAL_PREFIX = "_peft_lyco_original_"


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
    _install_bookkeeping(pipe)
    return pipe


def _install_bookkeeping(pipe: Any) -> None:
    """Wrap the pipeline's ``delete_adapters``, ``fuse_lora``, ``save_lora_weights`` and the denoiser's
    ``load_lora_adapter`` (these objects only; idempotent).

    PEFT picks a new active adapter per layer after a delete, from the adapters *that layer* holds, so with LoHa, LoKr
    and LoRA adapters on different layer types the layers disagree (diffusers' LoRA-only pipelines never see this);
    the wrapper applies the pipeline-wide choice PEFT makes for LoRA. ``fuse_lora`` is made all-or-nothing.
    """
    wrappers = (
        ("delete_adapters", _delete_adapters),
        ("fuse_lora", _fuse_lora),
        ("save_lora_weights", _save_lora_weights),
    )
    for name, wrapper in wrappers:
        original = _ORIGINAL_PREFIX + name
        if hasattr(pipe, name) and not hasattr(pipe, original):
            setattr(pipe, original, getattr(pipe, name))
            setattr(pipe, name, types.MethodType(wrapper, pipe))
    scheme = model_names(model_type_of(pipe))
    denoiser = component_models(scheme, pipe).get(scheme.components[0].name)
    original = _ORIGINAL_PREFIX + "load_lora_adapter"
    if denoiser is not None and hasattr(denoiser, "load_lora_adapter") and not hasattr(denoiser, original):
        setattr(denoiser, original, denoiser.load_lora_adapter)
        denoiser._peft_lyco_pipeline = weakref.ref(pipe)
        denoiser.load_lora_adapter = types.MethodType(_load_lora_adapter, denoiser)


def _load_lora_adapter(
    self: nn.Module,
    pretrained_model_name_or_path_or_dict: StateDictOrPath,
    prefix: str | None = "transformer",
    **kwargs,
) -> None:
    """The denoiser's ``load_lora_adapter`` (the reader of ``save_lora_adapter`` files): LoHa/LoKr files are loaded
    into this model through ``load_lyco_weights``, everything else goes to diffusers."""
    source = pretrained_model_name_or_path_or_dict
    local = _local_file(source, kwargs)
    state_dict, metadata = load_kohya(local) if local is not None else _fetch(source, kwargs)
    pipe = self._peft_lyco_pipeline()
    if pipe is None or state_dict is None or not is_lycoris_state_dict(state_dict):
        kwargs.setdefault("use_safetensors", True)
        getattr(self, _ORIGINAL_PREFIX + "load_lora_adapter")(source, prefix=prefix, **kwargs)
        return
    if kwargs.get("hotswap"):
        raise ValueError("hotswap is not supported for LoHa/LoKr adapters; load them under a new adapter_name")
    models = component_models(model_names(model_type_of(pipe)), pipe)
    component = next(name for name, model in models.items() if model is self)
    if prefix and any(key.startswith(f"{prefix}.") for key in state_dict):
        state_dict = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
    configs = adapter_configs(metadata)
    if len(configs) == 1 and None not in configs:  # a pipeline-level config: make it this component's
        metadata = {**(metadata or {}), METADATA_KEY: json.dumps(next(iter(configs.values())))}
    load_lyco_weights(
        pipe,
        {f"{component}.{key}": value for key, value in state_dict.items()},
        adapter_name=kwargs.get("adapter_name"),
        metadata=metadata,
        low_cpu_mem_usage=kwargs.get("low_cpu_mem_usage", low_cpu_mem_usage_default()),
    )


def _tuner_layers(pipe: Any) -> list[BaseTunerLayer]:
    models = component_models(model_names(model_type_of(pipe)), pipe)
    return [layer for model in models.values() for layer in model.modules() if isinstance(layer, BaseTunerLayer)]


def _delete_adapters(self: Any, adapter_names: list[str] | str) -> None:
    """diffusers' ``delete_adapters``, then every layer gets the active set a LoRA-only pipeline would have: the
    previously active adapters that remain, or else the first remaining adapter in sorted order (PEFT's choice)."""
    deleted = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
    before = list(self.get_active_adapters())
    getattr(self, _ORIGINAL_PREFIX + "delete_adapters")(adapter_names)
    models = component_models(model_names(model_type_of(self)), self)
    for model in models.values():
        _unwrap_empty_layers(model)
    remaining = _adapter_names(models)
    if not remaining:
        return
    active = [name for name in before if name not in deleted and name in remaining] or sorted(remaining)[:1]
    for model in models.values():
        for layer in model.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.set_adapter(active)


def _save_lora_weights(self: Any, *args: Any, **kwargs: Any) -> None:
    """diffusers' ``save_lora_weights``, made to write LoHa/LoKr layers that reload with their scale.

    PEFT state dicts carry no alpha: each component holding LoHa/LoKr tensors gets its adapter config as
    ``<component>_lora_adapter_metadata`` (found by matching the tensors against the component's adapters) unless
    given; where no single adapter matches, or pickled output is asked for, it refuses and points at ``peft_to_kohya``.
    """
    original = getattr(self, _ORIGINAL_PREFIX + "save_lora_weights")
    bound = inspect.signature(original).bind(*args, **kwargs)
    models = component_models(model_names(model_type_of(self)), self)
    for component, model in models.items():
        layers = bound.arguments.get(f"{component}_lora_layers")
        state_dict = layers.state_dict() if isinstance(layers, nn.Module) else layers
        if not state_dict or not is_lycoris_state_dict(state_dict):
            continue
        if bound.arguments.get("safe_serialization") is False:
            raise ValueError(
                "LoHa/LoKr adapters are saved as safetensors only (safe_serialization=False writes a pickle that "
                "peft_lyco never loads); use peft_lyco.convert.peft_to_kohya + save_kohya for a kohya file"
            )
        key = f"{component}_lora_adapter_metadata"
        if bound.arguments.get(key) is None:
            bound.arguments[key] = _matching_config(model, state_dict, component).to_dict()
    original(*bound.args, **bound.kwargs)


def _matching_config(model: nn.Module, state_dict: Mapping[str, torch.Tensor], component: str) -> Any:
    """The config of the one adapter of ``model`` whose PEFT state dict is ``state_dict``; raise if none or several."""
    from peft.utils import get_peft_model_state_dict

    found = []
    for name, config in getattr(model, "peft_config", {}).items():
        own = get_peft_model_state_dict(model, adapter_name=name)
        if own.keys() == state_dict.keys() and all(torch.equal(own[k], state_dict[k]) for k in own):
            found.append(config)
    if len(found) != 1:
        raise ValueError(
            f"cannot tell which adapter of {component} these LoHa/LoKr tensors belong to, so their alpha would be "
            f"lost; pass {component}_lora_adapter_metadata=pipe.{component}.peft_config[name].to_dict(), or write a "
            "kohya file with peft_lyco.convert.peft_to_kohya(pipe, adapter_name=name) + save_kohya"
        )
    return found[0]


def _unwrap_empty_layers(model: nn.Module) -> None:
    """Put back the base layer of every tuner layer left without adapters by a delete.

    PEFT keeps such layers; with one tuner type they are reused by the next load, but a LoHa load wraps an empty
    LoKr layer (and so on), so load/delete cycles of mixed types would nest wrappers without end.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            while isinstance(child, BaseTunerLayer) and not _held(child) and not child.merged_adapters:
                child = child.base_layer
                parent._modules[name] = child


def _fuse_lora(self: Any, *args: Any, **kwargs: Any) -> None:
    """diffusers' ``fuse_lora``, all or nothing: with ``safe_fusing`` every layer's fused weight is checked before
    any is written; any other failure part-way unmerges what this call merged and restores the scales it changed."""
    original = getattr(self, _ORIGINAL_PREFIX + "fuse_lora")
    bound = inspect.signature(original).bind(*args, **kwargs)
    bound.apply_defaults()
    options = bound.arguments
    if options.get("safe_fusing"):
        _check_fusable(self, options.get("components"), options.get("lora_scale", 1.0), options.get("adapter_names"))
    saved = [(layer, list(layer.merged_adapters), dict(getattr(layer, "scaling", {}))) for layer in _tuner_layers(self)]
    try:
        original(*args, **kwargs)
    except BaseException:
        for layer, merged, scaling in reversed(saved):
            _restore_layer(layer, merged, scaling)
        raise


def _check_fusable(pipe: Any, components: list[str] | None, lora_scale: float, adapter_names: list[str] | None) -> None:
    """Raise naming every module whose fused weight would hold NaN or inf, before anything is fused."""
    models = component_models(model_names(model_type_of(pipe)), pipe)
    broken = []
    for component, model in models.items():
        if components is not None and component not in components:
            continue
        for path, layer in model.named_modules():
            if not isinstance(layer, BaseTunerLayer) or not hasattr(layer, "get_delta_weight"):
                continue
            weight = layer.get_base_layer().weight
            for adapter in adapter_names if adapter_names is not None else layer.active_adapters:
                if adapter in layer.merged_adapters or adapter not in _held(layer):
                    continue
                factor = lora_scale if adapter in layer.active_adapters else 1.0  # fuse_lora scales active ones
                with torch.no_grad():
                    fused = weight.float() + layer.get_delta_weight(adapter).reshape(weight.shape).float() * factor
                if not torch.isfinite(fused.abs().amax()):
                    broken.append(f"{component} '{path}' (adapter '{adapter}')")
    if broken:
        raise ValueError(
            "fuse_lora(safe_fusing=True): nothing was fused; the fused weights would hold NaN or inf in\n  "
            + "\n  ".join(broken)
        )


def _held(layer: BaseTunerLayer) -> set[str]:
    return {name for attr in layer.adapter_layer_names for name in getattr(layer, attr, {})}


def _restore_layer(layer: BaseTunerLayer, merged: list[str], scaling: dict) -> None:
    """Undo a partial fuse on one layer: unmerge everything it merged since, then put back its scales and merges."""
    if list(layer.merged_adapters) != merged:
        if hasattr(layer, "scaling"):  # PEFT LoRA unmerges with the current scaling: the old merges used the old one
            for adapter in merged:
                if adapter in scaling:
                    layer.scaling[adapter] = scaling[adapter]
        layer.unmerge()
        if hasattr(layer, "scaling"):
            layer.scaling.update(scaling)
        if merged:
            layer.merge(adapter_names=merged)
    elif hasattr(layer, "scaling"):
        layer.scaling.update(scaling)


def _load_lora_weights(
    self: Any,
    pretrained_model_name_or_path_or_dict: StateDictOrPath,
    adapter_name: str | None = None,
    hotswap: bool = False,
    **kwargs: Any,
) -> None:
    """``load_lora_weights`` that sends LoHa/LoKr files to ``load_lyco_weights`` and everything else to diffusers.

    Local files are recognised by content (any suffix); pickles are refused unopened, also for files diffusers
    would take, and diffusers is asked for safetensors only.
    """
    ignore_unknown_keys = kwargs.pop("ignore_unknown_keys", False)
    check_adapter_name(adapter_name)
    source = pretrained_model_name_or_path_or_dict
    local = _local_file(source, kwargs)
    if local is not None:
        state_dict, metadata = load_kohya(local)
        if local.suffix != ".safetensors":  # diffusers picks readers by suffix: hand it the tensors instead
            source, kwargs = state_dict, {k: v for k, v in kwargs.items() if k not in _FETCH_ARGS}
    else:
        state_dict, metadata = _fetch(source, kwargs)
    if state_dict is None or not is_lycoris_state_dict(state_dict):
        models = component_models(model_names(model_type_of(self)), self)
        before = _adapter_names(models)
        original = getattr(self, _ORIGINAL)
        kwargs.setdefault("use_safetensors", True)  # diffusers otherwise falls back to unpickling .bin files
        original(source, adapter_name=adapter_name, hotswap=hotswap, **kwargs)
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


_FETCH_ARGS = ("weight_name", "local_files_only", "cache_dir", "force_download", "proxies", "token", "revision",
               "subfolder", "use_safetensors")  # fmt: skip
_WEIGHT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")


def _local_file(source: Any, kwargs: Mapping[str, Any]) -> Path | None:
    """The local file ``load_lora_weights``' arguments name, or ``None`` for a dict, a hub id or a local folder
    without ``weight_name`` (diffusers looks inside those).

    Raises ``FileNotFoundError`` naming the path when it is plainly local (a ``PathLike``, absolute or ``./``-style,
    more than one ``/``, or a weights suffix) but does not exist, instead of letting it reach hub id validation.
    """
    if isinstance(source, Mapping):
        return None
    text = os.fspath(source)
    path = Path(text).expanduser()
    weight_name = kwargs.get("weight_name")
    if path.is_dir():
        if not weight_name:
            return None
        path = path / (kwargs.get("subfolder") or "") / weight_name
        if not path.exists():
            raise FileNotFoundError(f"no file '{weight_name}' in the folder '{path.parent}' ({path})")
        return path
    if path.exists():
        return path
    plainly_local = (
        isinstance(source, os.PathLike)
        or os.path.isabs(text)
        or text.startswith((".", "~"))
        or text.strip("/").count("/") > 1
        or text.lower().endswith(_WEIGHT_SUFFIXES)
    )
    if plainly_local:
        raise FileNotFoundError(f"no such file or folder: '{text}' (resolved to '{path.absolute()}')")
    return None


def _fetch(source: StateDictOrPath, kwargs: Mapping[str, Any]) -> tuple[Mapping | None, dict | None]:
    """The raw state dict and file metadata behind ``load_lora_weights``' arguments (``None`` if not safetensors).

    For hub ids and local folders without ``weight_name``: diffusers' own fetcher, with pickles disallowed.
    """
    if isinstance(source, Mapping):
        return source, None
    fetch_args = {name: kwargs.get(name) for name in _FETCH_ARGS if name != "use_safetensors"}
    try:
        return fetch_lora_state_dict(source, fetch_args)
    except (OSError, ValueError):  # no safetensors file there: diffusers' own loader decides (safetensors only)
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
    check_adapter_name(adapter_name)
    check_alpha(weight, "weight")  # a NaN/inf strength turns every adapted output into NaN
    _install_bookkeeping(pipe)
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
