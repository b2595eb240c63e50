"""Adapters trained with PEFT's built-in LoHa/LoKr (``peft.LoHaConfig``/``peft.LoKrConfig``) as kohya modules and
as our LoHa/LoKr types, with the same ΔW.

PEFT's LoHa is LyCORIS' (same factors, scale ``alpha / r``). PEFT's LoKr differs in two ways that a file must absorb:
its scale is ``alpha / r`` even when both Kronecker halves are full (kohya readers then use scale 1), and its
``factorization`` returns ``(factor, dim // factor)`` unordered, so its halves may be split in a way LyCORIS never
writes. Kohya readers infer the split from the tensors' shapes, so any split is written as it is; where a reader's
scale rule would not give PEFT's scale (a full ``w2``, ``alpha = 0``) the scale is baked into ``w1`` and alpha is
written as the rank. ``file_module_delta`` computes what those readers compute, for the per-module check.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft.tuners.loha.layer import LoHaLayer as PeftLoHaLayer
from peft.tuners.lokr.layer import LoKrLayer as PeftLoKrLayer
from torch import nn

from ..functional import LOHA_PARAMS, LoKrLayout, delta_weight, loha_layout
from ..tuners.options import layer_geometry
from . import kohya
from .io import load_kohya
from .modules import Geometry, ModuleAdapter, read_module
from .names import detect_model_type, flatten, model_names

BUILTIN_LAYERS = (PeftLoHaLayer, PeftLoKrLayer)
PEFT_PREFIX = "base_model.model."


def is_builtin_layer(layer: nn.Module) -> bool:
    """True for PEFT's own LoHa/LoKr layers (not ours, which subclass neither)."""
    return isinstance(layer, BUILTIN_LAYERS)


def builtin_module(
    tensors: Mapping[str, torch.Tensor], rank: int, alpha: float, geometry: Geometry, component: str, path: str
) -> ModuleAdapter:
    """One PEFT built-in LoHa/LoKr adapter (its ``hada_*``/``lokr_*`` tensors, PEFT ``r`` and ``alpha``) as a kohya
    module whose readers compute PEFT's ΔW ``alpha / r · ΔW_factors``.

    The returned module's ``alpha`` and ``rank`` are what a file stores and what our layers use; its tensors may carry
    the scale (see the module docstring). Raises ``ValueError`` naming the module for shapes that fit no layout.
    """
    tensors = {name: tensor.detach() for name, tensor in tensors.items()}
    where = f"{component} '{path}'"
    if rank <= 0:
        raise ValueError(f"{where}: PEFT r must be positive, got {rank}")
    scale = alpha / rank
    if any(name in tensors for name in LOHA_PARAMS):
        layout = loha_layout(geometry.out_features, geometry.in_features, geometry.kernel, rank, "hada_t1" in tensors)
        algo = "loha"
        bake = alpha == 0
        scaled = "hada_t1" if "hada_t1" in tensors else "hada_w1_a"
    else:
        layout = _lokr_layout(tensors, rank, geometry, where)
        algo = "lokr"
        bake = alpha == 0 or layout.w2_mode == "full"  # readers use scale 1 whenever lokr_w2 is full
        scaled = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
    got = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if got != layout.shapes:
        raise ValueError(f"{where}: PEFT {algo} tensors {got} do not fit a {geometry.describe()} layer")
    if bake:
        tensors[scaled] = tensors[scaled] * scale
        alpha = float(rank)
    return ModuleAdapter(component, path, algo, tensors, rank, float(alpha), geometry, layout)


def _lokr_layout(tensors: Mapping[str, torch.Tensor], rank: int, geometry: Geometry, where: str) -> LoKrLayout:
    """The layout PEFT's LoKr built, read from its tensors (any split of out/in, including PEFT's unordered ones)."""
    if "lokr_w1" in tensors:
        out_l, in_m = tensors["lokr_w1"].shape
    elif "lokr_w1_a" in tensors and "lokr_w1_b" in tensors:
        out_l, in_m = tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1]
    else:
        raise ValueError(f"{where}: LoKr without lokr_w1 or lokr_w1_a/lokr_w1_b")
    out_k, in_n = geometry.out_features // out_l, geometry.in_features // in_m
    mode = "full" if "lokr_w2" in tensors else ("tucker" if "lokr_t2" in tensors else "lowrank")
    return LoKrLayout(out_l, out_k, in_m, in_n, geometry.kernel, rank, "lokr_w1" not in tensors, mode)


# ----------------------------------------------------------------------------------------------- from models
def builtin_modules(component: str, model: nn.Module, adapter_name: str = "default") -> list[ModuleAdapter]:
    """Every PEFT built-in LoHa/LoKr adapter ``adapter_name`` in ``model`` (the plain model, not a ``PeftModel``, so
    paths are the model's own) as kohya modules (see ``builtin_module``)."""
    modules, problems = [], []
    for path, layer in model.named_modules():
        if not is_builtin_layer(layer) or adapter_name not in layer._available_adapters:
            continue
        path = re.sub(r"(^|\.)base_layer(?=\.|$)", "", path)
        try:
            module = builtin_layer_module(layer, adapter_name, component, path)
        except (TypeError, ValueError) as err:
            problems.append(str(err))
            continue
        modules.append(module)
    if problems:
        raise ValueError(f"cannot convert PEFT adapter '{adapter_name}':\n  " + "\n  ".join(problems))
    return modules


def builtin_layer_module(layer: nn.Module, adapter_name: str, component: str, path: str) -> ModuleAdapter:
    """One built-in layer's adapter as a kohya module (Linear and Conv2d bases only)."""
    geometry = Geometry(*layer_geometry(layer.get_base_layer(), path))
    tensors = {
        name: getattr(layer, name)[adapter_name]
        for name in layer.adapter_layer_names
        if adapter_name in getattr(layer, name)
    }
    return builtin_module(tensors, layer.r[adapter_name], layer.alpha[adapter_name], geometry, component, path)


def builtin_to_lyco(
    components: Any, adapter_name: str = "default", model_type: str | None = None
) -> kohya.KohyaConversion:
    """Turn a model's PEFT built-in LoHa/LoKr adapter into our ``LoHaConfig``/``LoKrConfig`` configs and state dicts.

    ``components``: a pipeline, a mapping component -> model, or the denoiser alone, holding PEFT built-in layers.
    The result is a ``KohyaConversion`` (per component a config and a PEFT state dict for ``get_peft_model`` +
    ``set_peft_model_state_dict``, or ``peft_to_kohya``) whose ΔW equals PEFT's per module. Raises ``ValueError``
    naming the modules our layouts cannot hold (PEFT LoKr split an input dimension larger half first, which happens
    with a ``decompose_factor`` above the square root of the layer's input size); ``peft_to_kohya`` still writes those.
    """
    scheme = model_names(model_type or _model_type(components))
    converted, problems = {}, []
    for name, model in kohya.component_models(scheme, components).items():
        modules = []
        for module in builtin_modules(name, model, adapter_name):
            try:
                modules.append(as_lyco_module(module))
            except ValueError as err:
                problems.append(str(err))
        if modules:
            converted[name] = kohya.build_component(name, modules, model)
    if problems:
        shown = problems[:8] + ([f"... ({len(problems)} modules in all)"] if len(problems) > 8 else [])
        raise ValueError("cannot hold these PEFT adapters in peft_lyco layers:\n  " + "\n  ".join(shown))
    if not converted:
        raise ValueError(f"no PEFT built-in LoHa/LoKr layer holds an adapter named '{adapter_name}'")
    return kohya.KohyaConversion(scheme.model_type, converted)


def _model_type(components: Any) -> str:
    """The model family from the denoiser's built-in layer paths (``detect_model_type`` on their kohya names)."""
    if isinstance(components, Mapping):
        held = [components.get(name) for name in ("unet", "transformer")]
    else:
        held = [components] + [getattr(components, name, None) for name in ("unet", "transformer", "dit")]
    names = [
        "lora_unet_" + flatten(re.sub(r"^base_model\.model\.", "", path))
        for model in held
        if isinstance(model, nn.Module)
        for path, layer in model.named_modules()
        if is_builtin_layer(layer)
    ]
    if not names:
        raise ValueError("cannot tell the model family (no denoiser with PEFT LoHa/LoKr layers); pass model_type")
    return detect_model_type(names)


def as_lyco_module(module: ModuleAdapter) -> ModuleAdapter:
    """Re-read a module through the file reader, which finds our layout options (factor, flags) for its shapes."""
    params = dict(module.tensors)
    params["alpha"] = torch.tensor(module.alpha)
    try:
        found = read_module(params, module.component, module.path, module.geometry)
    except ValueError as err:
        raise ValueError(f"{module.component} '{module.path}': {err}") from err
    found.name = module.name
    return found


# ----------------------------------------------------------------------------------------------- geometry
def builtin_geometry(tensors: Mapping[str, torch.Tensor], kernel_hint: tuple[int, ...] | None) -> Geometry:
    """Layer geometry from PEFT LoHa/LoKr tensors (``kernel_hint`` for flat convs, whose kernel is folded in)."""
    if "hada_w1_a" in tensors:
        if "hada_t1" in tensors:
            t = tensors["hada_t1"]
            return Geometry(tensors["hada_w1_a"].shape[1], tensors["hada_w1_b"].shape[1], tuple(t.shape[2:]))
        kernel = kernel_hint or ()
        return Geometry(tensors["hada_w1_a"].shape[0], tensors["hada_w1_b"].shape[1] // math.prod(kernel), kernel)
    if "lokr_w1" in tensors:
        out_l, in_m = tensors["lokr_w1"].shape
    else:
        out_l, in_m = tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1]
    if "lokr_w2" in tensors:
        w2 = tensors["lokr_w2"]
        out_k, in_n, kernel = w2.shape[0], w2.shape[1], tuple(w2.shape[2:])
    elif "lokr_t2" in tensors:
        out_k, in_n = tensors["lokr_w2_a"].shape[1], tensors["lokr_w2_b"].shape[1]
        kernel = tuple(tensors["lokr_t2"].shape[2:])
    else:
        kernel = kernel_hint or ()
        out_k, in_n = tensors["lokr_w2_a"].shape[0], tensors["lokr_w2_b"].shape[1] // math.prod(kernel)
    return Geometry(out_l * out_k, in_m * in_n, kernel)


# ----------------------------------------------------------------------------------------------- checking files
def file_module_delta(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """ΔW of one kohya module as kohya readers compute it from the file alone (float64, 2-D ``(out, -1)``).

    Rank from the tensors (``hada_w1_b``, ``lokr_w2_b``/``lokr_w1_b`` rows, ``lora_down`` rows); scale 1 when
    ``lokr_w2`` is full or alpha is missing, else ``alpha / rank``.
    """
    tensors = {name: tensor.double() for name, tensor in params.items() if name != "alpha"}
    alpha = float(params["alpha"]) if "alpha" in params else None
    if "lora_down.weight" in tensors:
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        rank = down.shape[0]
        delta = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
    else:
        if "hada_w1_b" in tensors:
            rank = tensors["hada_w1_b"].shape[0]
        elif "lokr_w2" in tensors:
            rank = None
        else:
            rank = tensors["lokr_w2_b"].shape[0] if "lokr_w2_b" in tensors else tensors["lokr_w1_b"].shape[0]
        delta = delta_weight(tensors)
        delta = delta.reshape(delta.shape[0], -1)
    scale = 1.0 if rank is None or alpha is None or alpha == 0 else alpha / rank
    return delta * scale


def check_reloaded(path: str | Path, expected: Mapping[str, torch.Tensor], *, rtol: float = 1e-5) -> dict[str, float]:
    """Reload a written kohya file and compare each module's reader ΔW with ``expected`` (see ``check_deltas``)."""
    state_dict, _ = load_kohya(path)
    return check_deltas(state_dict, expected, rtol=rtol, where=str(path))


def check_deltas(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *, rtol: float = 1e-5, where: str = ""
) -> dict[str, float]:
    """Compare each module's reader ΔW in a kohya state dict with ``expected`` (module name -> ΔW).

    Returns module name -> relative Frobenius error; raises ``ValueError`` naming the modules above ``rtol`` or
    missing from the state dict.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        name, _, param = key.partition(".")
        groups.setdefault(name, {})[param] = tensor
    errors, bad = {}, []
    for name, reference in expected.items():
        if name not in groups:
            bad.append(f"{name}: missing")
            continue
        reference = reference.double().reshape(reference.shape[0], -1)
        got = file_module_delta(groups[name])
        norm = float(reference.norm())
        errors[name] = float((got - reference).norm()) / (norm if norm > 0 else 1.0)
        if errors[name] > rtol:
            bad.append(f"{name}: relative ΔW error {errors[name]:.3g} > {rtol:g}")
    if bad:
        raise ValueError(f"{where or 'state dict'}: ΔW differs from the adapter's:\n  " + "\n  ".join(bad))
    return errors
