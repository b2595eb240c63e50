"""The PEFT tuner that injects LoHa/LoKr layers, checking every target before the model is touched."""

from __future__ import annotations

import copy

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from torch import nn

from .config import LycoConfig
from .layer import LycoLayer
from .options import layer_geometry, resolve_layer_spec
from .targets import all_linear_targets, is_all_linear


def check_adapter_name(adapter_name: object) -> None:
    """Refuse adapter names torch cannot hold as ``ParameterDict`` keys (non-strings, empty, containing a dot),
    with a message naming the value, instead of a ``KeyError``/``TypeError`` from deep inside the injection.
    ``None`` is accepted: callers replace it with a generated name."""
    if adapter_name is None:
        return
    if not isinstance(adapter_name, str):
        raise TypeError(f"adapter_name must be a string, got {adapter_name!r} ({type(adapter_name).__name__})")
    if not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name {adapter_name!r} must be a non-empty string without '.' (torch module key)")


class LycoTuner(BaseTuner):
    """Shared tuner logic; ``LoHaModel``/``LoKrModel`` only name their layer class and prefix."""

    prefix: str
    tuner_layer_cls: type[LycoLayer]
    target_module_mapping: dict[str, list[str]] = {}

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Check the name and every target first, then inject; if injection still fails, put the model back."""
        check_adapter_name(adapter_name)
        self._check_targets(model, self.peft_config[adapter_name], state_dict)
        undo = _InjectionUndo(model)
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        except BaseException:
            undo.restore(adapter_name)
            raise

    def _check_targets(self, model: nn.Module, config: LycoConfig, state_dict: dict | None) -> None:
        """Raise before any replacement if a targeted module cannot take this adapter, naming every bad module."""
        if state_dict is not None:
            wanted = {key.rsplit("." + self.prefix, 1)[0].removeprefix("_orig_mod.") for key in state_dict}
            targeted = [(name, module) for name, module in model.named_modules() if name in wanted]
        elif config.target_modules is None:
            return  # PEFT refuses a missing target_modules before touching anything
        else:
            if is_all_linear(config.target_modules):  # check what PEFT will expand it to
                config = copy.copy(config)
                config.target_modules = all_linear_targets(model)
            # an excluded module's marker is falsy, so truthiness is exactly "targeted"
            targeted = [
                (name, module)
                for name, module in model.named_modules()
                if name and check_target_module_exists(config, name)
            ]
        problems = []
        for name, module in targeted:
            if self._inside_tuner_layer(model, name):
                continue
            layer = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            try:
                spec = resolve_layer_spec(config, name, layer)
                self.tuner_layer_cls.algorithm.layout(*layer_geometry(layer, name), spec.rank, spec.options)
            except (TypeError, ValueError) as err:
                problems.append(str(err))
        if problems:
            raise ValueError("cannot add adapter:\n  " + "\n  ".join(problems))

    @staticmethod
    def _inside_tuner_layer(model: nn.Module, name: str) -> bool:
        parts = name.split(".")
        for cut in range(1, len(parts)):
            if isinstance(model.get_submodule(".".join(parts[:cut])), BaseTunerLayer):
                return True
        return False

    def _create_and_replace(
        self,
        config: LycoConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        spec = resolve_layer_spec(config, current_key, layer)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, spec, config)
            return
        new_module = self.tuner_layer_cls(target, adapter_name, spec, config, module_name=current_key)
        self._replace_module(parent, target_name, new_module, target)


class _InjectionUndo:
    """What an injection can change in a model (child modules, adapters of existing tuner layers, trainability),
    recorded before it so a failure part-way leaves the model exactly as it was."""

    def __init__(self, model: nn.Module):
        self.children = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]
        self.layers = [
            (layer, list(layer.active_adapters)) for layer in model.modules() if isinstance(layer, BaseTunerLayer)
        ]
        self.trainable = [(param, param.requires_grad) for param in model.parameters()]

    def restore(self, adapter_name: str) -> None:
        for parent, name, child in self.children:
            if parent._modules.get(name) is not child:
                parent._modules[name] = child
        for layer, active in self.layers:
            held = (*layer.adapter_layer_names, *layer.other_param_names)
            if any(adapter_name in getattr(layer, attr, {}) for attr in held):
                layer.delete_adapter(adapter_name)
            layer.set_adapter(active)
        for param, flag in self.trainable:
            param.requires_grad_(flag)
