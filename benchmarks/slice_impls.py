"""One slice adapted several ways on the same frozen weights: PEFT LoRA (the reference), peft_lyco LoKr/LoHa,
PEFT's built-in LoKr/LoHa and lycoris-lora's LokrModule/LohaModule, all on the sd-scripts target set.

Every implementation shares the slice's frozen parameters (no copy of the base weights); adapters are created in
the case's adapter dtype. With ``init="random"`` the adapters get non-zero factors (ΔW small next to W, as after some
training) and ours are copied into PEFT's and LyCORIS' modules wherever the factor names and shapes agree, so the
three LoKr (LoHa) implementations compute the same function; with ``init="default"`` every library keeps its own
initialisation, under which every adapter is zero (LoRA's B, LoKr's w2, LoHa's second pair) and the output equals
the base's.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import peft
import torch
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from torch import nn

import peft_lyco
from peft_lyco import LoHaConfig, LoKrConfig

from .implementations import copy_factors
from .slices import Slice, SliceCase

LIBRARIES = ("ours", "peft", "lycoris")
FACTOR_PREFIXES = ("lora_", "hada_", "lokr_")
RANDOM_STD = 0.1


@dataclass
class Adapted:
    """One implementation of a slice: the module, its trainable tensors and notes on how it was built."""

    name: str
    module: nn.Module
    trainable: list[torch.Tensor]
    notes: list[str] = field(default_factory=list)


def implementation_names(case: SliceCase, libraries: tuple[str, ...] = LIBRARIES) -> list[str]:
    """``base``, ``lora`` and ``<library>-<algo>`` for every library and algorithm of the case."""
    return ["base", "lora"] + [f"{lib}-{algo}" for lib in libraries for algo in case.algos]


def _shared_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure that shares its parameters and buffers (frozen, never written)."""
    memo = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return copy.deepcopy(module, memo)


def _peft_config(name: str, case: SliceCase, targets: list[str], random: bool):
    common = {"r": case.rank, "target_modules": list(targets)}
    if name == "lora":
        return peft.LoraConfig(lora_alpha=case.rank, init_lora_weights=not random, **common)
    algo = name.split("-", 1)[1]
    if name.startswith("ours-"):
        cls = LoHaConfig if algo == "loha" else LoKrConfig
        extra = {} if algo == "loha" else {"factor": case.factor}
        return cls(alpha=case.rank, init_weights=not random, **extra, **common)
    if algo == "loha":
        return peft.LoHaConfig(alpha=case.rank, init_weights=not random, **common)
    return peft.LoKrConfig(alpha=case.rank, decompose_factor=case.factor, init_weights=not random, **common)


def _wrap_lycoris(module: nn.Module, algo: str, case: SliceCase, targets: list[str]) -> None:
    """Replace every target by lycoris-lora's module around it (what ``create_lycoris`` + ``apply_to`` amount to)."""
    cls = LohaModule if algo == "loha" else LokrModule
    extra = {} if algo == "loha" else {"factor": case.factor}
    for path in targets:
        parent_path, _, child = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        original = getattr(parent, child)
        name = "lycoris_" + path.replace(".", "_")
        weight = original.weight
        wrapped = cls(name, original, multiplier=1.0, lora_dim=case.rank, alpha=case.rank, **extra)
        setattr(parent, child, wrapped.to(weight.device))


def _factor_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every adapter tensor (names containing ``lora_``, ``hada_`` or ``lokr_``); the base's are never trainable."""
    return [(n, p) for n, p in module.named_parameters() if any(tag in n for tag in FACTOR_PREFIXES)]


def layer_factors(module: nn.Module, path: str, library: str) -> dict[str, torch.Tensor]:
    """The adapter tensors of the layer at ``path`` under their kohya names (``lokr_w1``, ``hada_w2_b``, ...)."""
    layer = module.get_submodule(path)
    if library == "ours":
        return dict(layer.factor_parameters("default"))
    if library == "peft":
        return {
            name: getattr(layer, name)["default"]
            for name in layer.adapter_layer_names
            if "default" in getattr(layer, name) and name.startswith(("hada_", "lokr_"))
        }
    return {n: p for n, p in layer.named_parameters(recurse=False) if n.startswith(("hada_", "lokr_"))}


def _build_one(name: str, piece: Slice, random: bool) -> nn.Module:
    case = piece.case
    module = _shared_copy(piece.module)
    if name == "base":
        return module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name.startswith("lycoris-"):
            _wrap_lycoris(module, name.split("-", 1)[1], case, piece.targets)
        else:
            peft.inject_adapter_in_model(_peft_config(name, case, piece.targets, random), module)
    for param_name, param in _factor_params(module):
        param.data = param.data.to(case.adapter_dtype)
        param.requires_grad_(True)
    return module


def build_implementations(
    piece: Slice, names: list[str] | None = None, *, init: str = "random", seed: int = 0
) -> dict[str, Adapted]:
    """Every implementation of ``piece`` (``names`` defaults to all of ``implementation_names``)."""
    if init not in ("random", "default"):
        raise ValueError(f"init must be 'random' or 'default', got {init!r}")
    peft_lyco.register()
    case = piece.case
    names = names or implementation_names(case)
    random = init == "random"
    built: dict[str, Adapted] = {}
    torch.manual_seed(seed)
    for name in names:
        module = _build_one(name, piece, random)
        params = [p for _, p in _factor_params(module)]
        if random:
            with torch.no_grad():
                for param in params:
                    param.normal_(std=RANDOM_STD)
        built[name] = Adapted(name, module.train(), params)
    if random:
        _share_factor_values(built, piece)
    return built


def _share_factor_values(built: dict[str, Adapted], piece: Slice) -> None:
    """Copy ours' factors into the PEFT and LyCORIS modules of the same algorithm, layer by layer, where the layouts
    agree; note the layers where they do not (those keep their own random factors)."""
    for algo in piece.case.algos:
        ours = built.get(f"ours-{algo}")
        if ours is None:
            continue
        for library in ("peft", "lycoris"):
            peer = built.get(f"{library}-{algo}")
            if peer is None:
                continue
            differ = [
                path
                for path in piece.targets
                if not copy_factors(layer_factors(ours.module, path, "ours"), layer_factors(peer.module, path, library))
            ]
            if differ:
                peer.notes.append(f"factor layout differs from ours on {len(differ)} of {len(piece.targets)} layers")


def forward_fn(piece: Slice, item: Adapted) -> Callable[[], torch.Tensor]:
    """The slice's forward through ``item`` on the slice's inputs, under bf16 autocast where the case says so."""
    call, inputs, module = piece.call, piece.inputs, item.module
    device_type = inputs["x"].device.type
    if not piece.case.autocast:
        return lambda: call(module, inputs)

    def run() -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return call(module, inputs)

    return run
