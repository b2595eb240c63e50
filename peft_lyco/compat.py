"""Every use of an upstream private API (PEFT, diffusers, torch), in one place so a version bump is one file to check.

Each function says which private name it relies on and why no public one does the job. Versions checked: peft 0.21,
diffusers 0.42, torch 2.13.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from peft.utils import PeftType
from torch import nn

# ----------------------------------------------------------------------------------------------------------- PEFT


def extend_peft_type(name: str) -> PeftType:
    """Return the ``PeftType`` member ``name``, adding it to the enum first if it is missing (re-import safe).

    PEFT's ``PeftType`` is a closed ``str`` enum and ``register_peft_method`` accepts only existing members, so the
    member is added through the enum's private tables (name == value, as PEFT looks members up both ways).
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType.__members__)
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register_method(peft_type: PeftType, config_cls: type, model_cls: type) -> None:
    """Register one method with PEFT; calling it again with the same classes does nothing.

    PEFT's ``register_peft_method`` refuses a second call, so a second call with different classes (e.g. after
    ``importlib.reload`` of the tuner modules) replaces the entries of ``peft.mapping``'s tables directly, and the
    newest definitions win instead of PEFT's ``KeyError``.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    if (
        PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is model_cls
        and PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is config_cls
    ):
        return
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING or peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = model_cls.prefix
        return
    register_peft_method(
        name=peft_type.value.lower(), config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix
    )


# ------------------------------------------------------------------------------------------------------ diffusers

# diffusers marks a model that holds PEFT adapters with this attribute (``ModelMixin`` reads it in its adapter API).
PEFT_LOADED_FLAG = "_hf_peft_config_loaded"


def low_cpu_mem_usage_default() -> bool:
    """diffusers' default for ``load_lora_weights(low_cpu_mem_usage=...)`` (``_LOW_CPU_MEM_USAGE_DEFAULT_LORA``)."""
    from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA

    return _LOW_CPU_MEM_USAGE_DEFAULT_LORA


def fetch_lora_state_dict(
    source: Any, fetch_args: Mapping[str, Any]
) -> tuple[Mapping[str, torch.Tensor], dict[str, str] | None]:
    """State dict and file metadata of a hub id or folder through diffusers' own fetcher (``_fetch_state_dict``),
    safetensors only, pickles disallowed; raises ``OSError``/``ValueError`` where there is no such file.

    diffusers has no public function that returns a LoRA file's tensors *and* its metadata without loading it.
    """
    from diffusers.loaders.lora_base import _fetch_state_dict

    state_dict, _, metadata = _fetch_state_dict(
        source, use_safetensors=True, user_agent=None, allow_pickle=False, return_file_metadata=True, **fetch_args
    )
    return state_dict, metadata


def disable_offloading(pipe: Any) -> tuple | None:
    """Remove a pipeline's CPU/group offloading hooks for the time of a load (diffusers'
    ``_optionally_disable_offloading``, as its own LoRA loader does); returns what ``reapply_offloading`` needs."""
    if not hasattr(pipe, "_optionally_disable_offloading"):
        return None
    return pipe._optionally_disable_offloading(pipe)


def reapply_offloading(pipe: Any, offload: tuple | None) -> None:
    """Put back the hooks ``disable_offloading`` removed (group offloading through diffusers'
    ``_maybe_remove_and_reapply_group_offloading``, which has no public counterpart)."""
    if not offload:
        return
    model_offload, sequential_offload, group_offload = offload
    if model_offload:
        pipe.enable_model_cpu_offload()
    elif sequential_offload:
        pipe.enable_sequential_cpu_offload()
    elif group_offload:
        from diffusers.hooks.group_offloading import _maybe_remove_and_reapply_group_offloading

        for component in pipe.components.values():
            if isinstance(component, nn.Module):
                _maybe_remove_and_reapply_group_offloading(component)


# ---------------------------------------------------------------------------------------------------------- torch


def conv_mode_padding(conv: nn.Conv2d) -> tuple[int, ...]:
    """The ``F.pad`` amounts ``nn.Conv2d`` uses for a ``padding_mode`` other than zeros
    (``_reversed_padding_repeated_twice``; torch computes it privately in ``_ConvNd.__init__``)."""
    return conv._reversed_padding_repeated_twice


def fsdp2_reshard_settings(module: nn.Module) -> tuple[bool, list]:
    """An FSDP2 module's reshard-after-forward setting, to restore after ``set_reshard_after_forward`` changed it for
    a while (``FSDPModule`` has a setter but no getter: the setting lives in the private ``FSDPState
    ._auto_reshard_after_forward`` and each ``FSDPParamGroup.post_forward_mesh_info``)."""
    state = module._get_fsdp_state()
    return state._auto_reshard_after_forward, [(g, g.post_forward_mesh_info) for g in state._fsdp_param_groups]


def restore_fsdp2_reshard_settings(module: nn.Module, settings: tuple[bool, list]) -> None:
    """Put back what ``fsdp2_reshard_settings`` read."""
    automatic, groups = settings
    module._get_fsdp_state()._auto_reshard_after_forward = automatic
    for group, mesh_info in groups:
        group.post_forward_mesh_info = mesh_info


def parameter_dict_entries(owner: nn.Module, names: tuple[str, ...], key: str) -> dict[str, nn.Parameter]:
    """``{name: owner.<name>[key]}`` for each ``nn.ParameterDict`` child ``name`` of ``owner`` that holds ``key``.

    Read straight from ``nn.Module._modules`` and the dicts' ``_parameters`` (where ``ParameterDict`` registers its
    entries): the public route (``getattr`` then ``in`` then ``[]``) goes through ``nn.Module.__getattr__`` three times
    per name, which an adapted layer's every call paid for each of its algorithm's factor names. Same entries, same
    objects, nothing cached."""
    modules = owner._modules
    found = {}
    for name in names:
        entries = modules.get(name)
        if entries is not None:
            entry = entries._parameters.get(key)
            if entry is not None:
                found[name] = entry
    return found
