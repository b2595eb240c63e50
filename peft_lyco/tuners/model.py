"""The PEFT tuner that injects LoHa/LoKr layers, checking every target before the model is touched."""

from __future__ import annotations

from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from torch import nn

from .config import LycoConfig
from .layer import LycoLayer
from .options import layer_geometry, resolve_layer_spec


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
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        self._check_targets(model, self.peft_config[adapter_name], state_dict)
        super().inject_adapter(
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )

    def _check_targets(self, model: nn.Module, config: LycoConfig, state_dict: Optional[dict]) -> None:
        """Raise before any replacement if a targeted module cannot take this adapter, naming every bad module."""
        if state_dict is not None:
            wanted = {key.rsplit("." + self.prefix, 1)[0].removeprefix("_orig_mod.") for key in state_dict}
            targeted = [(name, module) for name, module in model.named_modules() if name in wanted]
        elif config.target_modules is None or config.target_modules == "all-linear":
            return
        else:
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
