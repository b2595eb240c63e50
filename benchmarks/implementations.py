"""One benchmark case built four ways from one frozen base layer: the base itself, peft_lyco, PEFT's built-in
LoHa/LoKr and lycoris-lora, all holding the same factor values wherever their layouts agree."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import peft
import torch
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from torch import nn

import peft_lyco
from peft_lyco import LoHaConfig, LoKrConfig

from .cases import Case

IMPLS = ("base", "peft_lyco", "peft", "lycoris")


class Holder(nn.Module):
    """A one-layer model so PEFT can target the layer by name."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@dataclass
class Built:
    """A callable layer, its trainable tensors, and how to merge it into its base weight and undo that."""

    module: Callable[[torch.Tensor], torch.Tensor]
    trainable: list[torch.Tensor]
    all_tensors: list[torch.Tensor]
    merge: Callable[[], None] | None = None
    restore: Callable[[], None] | None = None
    notes: list[str] = field(default_factory=list)


def base_layer(case: Case, device: str) -> nn.Module:
    """The frozen base layer of ``case`` with random weights."""
    if case.is_conv:
        layer = nn.Conv2d(case.in_features, case.out_features, case.kernel, padding=case.kernel // 2)
    else:
        layer = nn.Linear(case.in_features, case.out_features)
    return layer.to(device=device, dtype=case.torch_dtype).requires_grad_(False)


def _ours(case: Case, base: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    common = dict(
        r=case.rank, alpha=case.alpha or case.rank, use_tucker=case.tucker, init_weights=False, target_modules=["layer"]
    )
    config = LoHaConfig(**common) if case.algo == "loha" else LoKrConfig(factor=case.factor, **common)
    layer = peft.inject_adapter_in_model(config, Holder(copy.deepcopy(base))).layer
    return layer, layer.adapter_parameters("default")


def _peft(case: Case, base: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    common = dict(r=case.rank, alpha=case.alpha or case.rank, use_effective_conv2d=case.tucker, init_weights=False)
    if case.algo == "loha":
        config = peft.LoHaConfig(target_modules=["layer"], **common)
    else:
        config = peft.LoKrConfig(target_modules=["layer"], decompose_factor=case.factor, **common)
    # get_peft_model keeps adapters in float32 on half-precision bases, as training scripts do
    layer = peft.get_peft_model(Holder(copy.deepcopy(base)), config).base_model.model.layer
    params = {
        name: getattr(layer, name)["default"] for name in layer.adapter_layer_names if "default" in getattr(layer, name)
    }
    return layer, params


def _lycoris(case: Case, base: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    kwargs = dict(multiplier=1.0, lora_dim=case.rank, alpha=case.alpha or case.rank, use_tucker=case.tucker)
    if case.algo == "loha":
        module = LohaModule("bench", copy.deepcopy(base), **kwargs)
    else:
        module = LokrModule("bench", copy.deepcopy(base), factor=case.factor, **kwargs)
    module.to(base.weight.device)
    params = {n: p for n, p in module.named_parameters() if n.startswith(("hada_", "lokr_"))}
    return module, params


def copy_factors(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> bool:
    """Give ``target`` the values of ``source`` when both have the same factor names and shapes."""
    if {n: tuple(t.shape) for n, t in source.items()} != {n: tuple(t.shape) for n, t in target.items()}:
        return False
    with torch.no_grad():
        for name, tensor in source.items():
            target[name].copy_(tensor)
    return True


def build(case: Case, device: str = "cpu") -> dict[str, Built]:
    """The four implementations of ``case`` on one base layer (ours' factors copied into the others)."""
    peft_lyco.register()
    torch.manual_seed(0)
    base = base_layer(case, device)
    ours, ours_params = _ours(case, base)
    with torch.no_grad():
        for tensor in ours_params.values():  # a ΔW about as large as the weight's own entries
            tensor.normal_(std=0.2)
    built = {"base": Built(base, [], list(base.parameters()))}
    built["peft_lyco"] = Built(ours, list(ours_params.values()), list(ours.parameters()), ours.merge, ours.unmerge)
    peft_layer, peft_params = _peft(case, base)
    notes = [] if copy_factors(ours_params, peft_params) else ["PEFT's factor layout differs (its own random factors)"]
    built["peft"] = Built(
        peft_layer,
        list(peft_params.values()),
        list(peft_layer.parameters()),
        peft_layer.merge,
        peft_layer.unmerge,
        notes,
    )
    lyco, lyco_params = _lycoris(case, base)
    notes = (
        [] if copy_factors(ours_params, lyco_params) else ["LyCORIS' factor layout differs (its own random factors)"]
    )
    lyco_weight = lyco.org_module[0].weight
    saved_weight = lyco_weight.detach().clone()
    built["lycoris"] = Built(
        lyco,
        list(lyco_params.values()),
        [*lyco.parameters(), *lyco.org_module[0].parameters()],
        lambda: lyco.merge_to(1.0),
        lambda: lyco_weight.data.copy_(saved_weight),
        notes + ["merge_to applies alpha/rank twice (LyCORIS defect); timed as it is"],
    )
    for item in built.values():
        item.module.train()
    return built


def output_differences(built: dict[str, Built], x: torch.Tensor) -> dict[str, float]:
    """Largest |ours − theirs| relative to the largest |ours − base| (the adapter's own effect), per peer."""
    with torch.no_grad():
        outs = {name: item.module(x).float() for name, item in built.items()}
    effect = (outs["peft_lyco"] - outs["base"]).abs().max().item()
    return {
        name: (outs["peft_lyco"] - outs[name]).abs().max().item() / max(effect, 1e-30) for name in ("peft", "lycoris")
    }
