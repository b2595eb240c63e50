"""kohya/LyCORIS state dicts <-> PEFT adapters, both ways.

``kohya_to_peft`` turns a file's modules into per-component PEFT configs (``LoHaConfig``/``LoKrConfig``, ``LoraConfig``
for the plain LoRA modules of mixed files) with exact-path ``rank_pattern``/``alpha_pattern``/``option_pattern`` for
every module that differs from the shared defaults, plus PEFT state dicts. ``peft_to_kohya`` writes adapters held by
models (or a conversion) as a kohya file following the writer rules listed in docs/conversion.md (complete key
sets, 0-d alpha, 2-D flat factors, one dtype per module, Tucker LoKr rebuilt for ComfyUI).
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig, PeftConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..functional import ALGORITHMS
from ..tuners import LoHaConfig, LoKrConfig, LycoConfig, LycoLayer
from ..tuners.options import layer_geometry, resolve_layer_spec
from ..tuners.targets import exact_pattern_key, exact_target_modules, unwrap
from .adapter_metadata import adapter_configs, config_alpha
from .builtin import builtin_layer_module, is_builtin_layer
from .modules import (
    FILE_PARAMS,
    Geometry,
    LycoFileError,
    ModuleAdapter,
    algo_of,
    kohya_tensors,
    read_module,
)
from .names import (
    ModelNames,
    NameResolver,
    detect_model_type,
    foreign_family_tags,
    model_names,
    model_type_of,
    split_key,
)

logger = logging.getLogger(__name__)

ALGO_CONFIGS = {"loha": LoHaConfig, "lokr": LoKrConfig}
NETWORK_MODULES = {"loha": "networks.loha", "lokr": "networks.lokr", "lora": "networks.lora"}
# A1111 applies CLIP-bigG attention projections only through its fused MultiheadAttention: all four or none.
# what sd-scripts, LyCORIS, ComfyUI and A1111 all read as adapter weights
FILE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COMPLETE_SETS = {("sdxl", "text_encoder_2"): (r"^(.*\.self_attn)\.(q_proj|k_proj|v_proj|out_proj)$", 4)}


@dataclass
class PeftPart:
    """One PEFT method's share of a component: its config and its PEFT state dict (``<module path>.<param>``)."""

    config: PeftConfig
    state_dict: dict[str, torch.Tensor]


@dataclass
class ComponentAdapter:
    """What a file holds for one model component: its modules and one ``PeftPart`` per method (loha/lokr/lora)."""

    name: str
    modules: list[ModuleAdapter]
    parts: dict[str, PeftPart]

    @property
    def config(self) -> PeftConfig:
        """The component's config; raises if the file mixes methods on this component (use ``parts``)."""
        if len(self.parts) != 1:
            raise ValueError(f"{self.name} mixes {sorted(self.parts)} modules; use .parts[method].config")
        return next(iter(self.parts.values())).config

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The PEFT state dict of all methods together (their keys never collide)."""
        return {key: value for part in self.parts.values() for key, value in part.state_dict.items()}


@dataclass
class KohyaConversion(Mapping):
    """Result of ``kohya_to_peft``: a mapping component name -> ``ComponentAdapter``, plus the file's metadata."""

    model_type: str
    components: dict[str, ComponentAdapter]
    metadata: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> ComponentAdapter:
        return self.components[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.components)

    def __len__(self) -> int:
        return len(self.components)


# ------------------------------------------------------------------------------------------------------- reading
def kohya_to_peft(
    state_dict: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    model_type: str | None = None,
    model: Any = None,
    ignore_unknown_keys: bool = False,
) -> KohyaConversion:
    """Convert a kohya/LyCORIS LoHa/LoKr (and LoRA) state dict into PEFT configs and state dicts per component.

    ``model`` (a pipeline, a mapping component -> model, or the denoiser alone) makes names and layer shapes exact:
    names are looked up in its modules and every module is checked against its layer. Without it names are parsed
    into the default diffusers/transformers layout. Unknown keys and names that match no module raise a
    ``LycoFileError`` listing them, unless ``ignore_unknown_keys`` (then they are skipped with a warning); invalid
    modules (incomplete key sets, wrong shapes, NaN, DoRA) always raise.
    """
    groups, unknown = _group_keys(state_dict)
    scheme = model_names(model_type or detect_model_type(groups, metadata))
    foreign = foreign_family_tags(metadata, scheme.model_type)
    if foreign:
        warnings.warn(
            f"the file is tagged {', '.join(foreign)}, another model family than {scheme.model_type}; it is loaded "
            "because its module names fit, but it was trained for a different base model",
            UserWarning,
            stacklevel=2,
        )
    models = component_models(scheme, model)
    resolver = NameResolver(scheme, models)
    preferred_factor = _metadata_factor(metadata)
    wd_on_output_hint = _metadata_wd_on_output(metadata)
    configs = adapter_configs(metadata)
    _refuse_unscaled_peft_file(groups, configs)
    denoiser = scheme.components[0].name
    modules, unmatched, errors, owners = [], [], [], {}
    for name, params in groups.items():
        target = resolver.resolve(name)
        if target is None and None in configs:  # a model-level save (save_lora_adapter): the denoiser's own paths
            target = resolver.resolve(f"{denoiser}.{name}")
        if target is None:
            unmatched.append(name)
            continue
        component, path = target
        if (component, path) in owners:
            errors.append(f"{name}: targets {component} module '{path}' already adapted by {owners[component, path]}")
            continue
        owners[component, path] = name
        try:
            layer = resolver.layers(component).get(path)
            geometry = Geometry(*layer_geometry(layer, path)) if layer is not None else None
            hint = None if geometry else resolver.kernel_hint(component, path)
            config = configs.get(component, configs.get(None))
            if config is not None and "alpha" not in params:
                kernel = geometry.kernel if geometry else (hint or ())
                alpha = config_alpha(config, path, any(k != 1 for k in kernel))
                params = params if alpha is None else {**params, "alpha": torch.tensor(alpha)}
            module = read_module(params, component, path, geometry, hint, preferred_factor, wd_on_output_hint)
        except (ValueError, TypeError) as err:  # ModuleError, or a layout/geometry check naming the problem
            errors.append(f"{name} ({component} '{path}'): {err}")
            continue
        module.name = name
        modules.append(module)
    _report(unknown, unmatched, errors, ignore_unknown_keys, scheme, models)
    if not modules:
        raise LycoFileError("the state dict holds no LoHa, LoKr or LoRA module")
    by_component: dict[str, list[ModuleAdapter]] = {}
    for module in modules:
        by_component.setdefault(module.component, []).append(module)
    components = {name: build_component(name, found, models.get(name)) for name, found in by_component.items()}
    return KohyaConversion(scheme.model_type, components, dict(metadata or {}))


def _refuse_unscaled_peft_file(groups: Mapping[str, Mapping[str, torch.Tensor]], configs: Mapping) -> None:
    """Refuse LoHa/LoKr tensors under PEFT module paths with neither alpha tensors nor the adapter config.

    That is what diffusers' ``save_lora_weights`` writes for a LoHa/LoKr adapter unless given its config: read with
    kohya's "no alpha means alpha = rank" rule, its output would be off by the adapter's whole scale.
    """
    lyco = [name for name, params in groups.items() if algo_of(params) in ("loha", "lokr")]
    if configs or not lyco or any("alpha" in params for params in groups.values()):
        return
    if all("." in name for name in lyco):
        raise LycoFileError(
            f"the file holds LoHa/LoKr tensors under PEFT module paths ({lyco[0]}, ...) but no alpha and no adapter "
            f"config ('lora_adapter_metadata'), so their scale is unknown. It was probably written by diffusers' "
            "save_lora_weights without unet_lora_adapter_metadata=...peft_config[name].to_dict(); write LoHa/LoKr "
            "adapters with peft_lyco.convert.peft_to_kohya + save_kohya (or pass the adapter metadata)."
        )


def _group_keys(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        split = split_key(key, FILE_PARAMS) if isinstance(tensor, torch.Tensor) else None
        if split is None:
            unknown.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = tensor
    return groups, unknown


def _report(unknown, unmatched, errors, ignore_unknown_keys, scheme: ModelNames, models) -> None:
    """Raise one ``LycoFileError`` listing every problem (unknown/unmatched only warn with ``ignore_unknown_keys``)."""
    sections = []
    where = f"the {scheme.model_type} " + ("model" if models else "naming scheme")
    skippable = [
        (f"keys with no known parameter name ({len(unknown)})", unknown),
        (f"module names that match no module of {where} ({len(unmatched)})", unmatched),
    ]
    for title, items in skippable:
        if items and ignore_unknown_keys:
            logger.warning("skipping %s: %s", title, ", ".join(sorted(items)))
        elif items:
            sections.append((title, items))
    if errors:
        sections.append((f"invalid modules ({len(errors)})", errors))
    if sections:
        body = "\n".join(f"{title}:\n    " + "\n    ".join(sorted(items)) for title, items in sections)
        hint = (
            ""
            if ignore_unknown_keys or not skippable[0][1] + skippable[1][1]
            else ("\n(pass ignore_unknown_keys=True to skip unknown and unmatched keys)")
        )
        raise LycoFileError(f"cannot convert the LoHa/LoKr file:\n{body}{hint}")


def _metadata_factor(metadata: Mapping[str, str] | None) -> int | None:
    """The LoKr factor recorded in sd-scripts' ``ss_network_args``, if any."""
    try:
        return int(json.loads((metadata or {}).get("ss_network_args", "{}")).get("factor"))
    except (TypeError, ValueError, AttributeError):
        return None


def _metadata_wd_on_output(metadata: Mapping[str, str] | None) -> bool | None:
    """DoRA's axis from sd-scripts' ``ss_network_args`` (``dora_wd``, ``wd_on_output``; LyCORIS' default is the output
    axis), or ``None`` when the file does not record DoRA."""
    try:
        args = json.loads((metadata or {}).get("ss_network_args", "{}"))
    except (TypeError, ValueError):
        return None
    if not isinstance(args, dict) or str(args.get("dora_wd", "false")).lower() != "true":
        return None
    return str(args.get("wd_on_output", "true")).lower() == "true"


def component_models(scheme: ModelNames, model: Any) -> dict[str, nn.Module]:
    """Component name -> model from a pipeline, a mapping, or the denoiser alone (``None``: no models)."""
    if model is None:
        return {}
    names = [component.name for component in scheme.components]
    if isinstance(model, Mapping):
        unknown = sorted(set(model) - set(names))
        if unknown:
            raise ValueError(f"unknown {scheme.model_type} components {unknown}; expected some of {names}")
        return {name: unwrap(value) for name, value in model.items() if isinstance(value, nn.Module)}
    if isinstance(model, nn.Module):
        return {names[0]: unwrap(model)}
    found = {}
    for component in scheme.components:
        held = [getattr(model, a, None) for a in component.attributes or (component.name,)]
        held = [value for value in held if isinstance(value, nn.Module)]
        if held:
            found[component.name] = unwrap(held[0])
    return found


# ----------------------------------------------------------------------------------------------- PEFT configs
def build_component(name: str, modules: list[ModuleAdapter], model: nn.Module | None = None) -> ComponentAdapter:
    """Group a component's modules by method and build each method's config and state dict.

    With the component's ``model`` the configs' ``target_modules`` are a plain list where that is exact; without it
    they are a full-match regex of the paths, which never reaches a module the file does not adapt.
    """
    by_algo: dict[str, list[ModuleAdapter]] = {}
    for module in modules:
        by_algo.setdefault(module.algo, []).append(module)
    names = [n for n, _ in model.named_modules()] if model is not None else None
    parts = {algo: _peft_part(algo, found, names) for algo, found in sorted(by_algo.items())}
    return ComponentAdapter(name, modules, parts)


def _most_common(values: list) -> Any:
    return Counter(values).most_common(1)[0][0]


def _peft_part(algo: str, modules: list[ModuleAdapter], module_names: list[str] | None) -> PeftPart:
    rank = _most_common([m.rank for m in modules])
    alpha = _most_common([m.alpha for m in modules])
    patterns = {
        "target_modules": exact_target_modules((m.path for m in modules), module_names),
        "rank_pattern": {exact_pattern_key(m.path): m.rank for m in modules if m.rank != rank},
        "alpha_pattern": {exact_pattern_key(m.path): m.alpha for m in modules if m.alpha != alpha},
    }
    if algo == "lora":
        config = LoraConfig(r=rank, lora_alpha=alpha, **patterns)
        state_dict = {
            f"{m.path}.{peft}": m.tensors[kohya]
            for m in modules
            for kohya, peft in (("lora_down.weight", "lora_A.weight"), ("lora_up.weight", "lora_B.weight"))
        }
        return PeftPart(config, state_dict)
    defaults = _shared_options(modules)
    dora = dict(_most_common([tuple(sorted(m.dora_options.items())) for m in modules]))
    option_pattern = {
        exact_pattern_key(m.path): {**m.options, **m.dora_options}
        for m in modules
        if ALGORITHMS[algo].layout(*m.geometry.shape, m.rank, defaults, warn=False) != m.layout
        or m.dora_options != dora
    }
    config = ALGO_CONFIGS[algo](r=rank, alpha=alpha, option_pattern=option_pattern, **defaults, **dora, **patterns)
    _verify(config, algo, modules)
    state_dict = {f"{m.path}.{param}": tensor for m in modules for param, tensor in m.tensors.items()}
    state_dict.update({f"{m.path}.dora_scale": m.dora_scale for m in modules if m.dora_scale is not None})
    return PeftPart(config, state_dict)


def _shared_options(modules: list[ModuleAdapter]) -> dict[str, Any]:
    """The layout option set that reproduces the most modules (each module votes for every set that fits it)."""
    votes = Counter(tuple(sorted(options.items())) for m in modules for options in m.candidates)
    return dict(votes.most_common(1)[0][0])


def _verify(config: LycoConfig, algo: str, modules: list[ModuleAdapter]) -> None:
    """Check that the config gives every module its file layout, rank and alpha (the patterns are exact)."""
    for m in modules:
        g = m.geometry
        stand_in = (
            nn.Conv2d(g.in_features, g.out_features, g.kernel, device="meta")
            if g.kernel
            else nn.Linear(g.in_features, g.out_features, device="meta")
        )
        spec = resolve_layer_spec(config, m.path, stand_in)
        dora = {name: bool(spec.options.get(name)) for name in m.dora_options}
        if (spec.rank, spec.alpha, ALGORITHMS[algo].layout(*g.shape, spec.rank, spec.options), dora) != (
            m.rank,
            m.alpha,
            m.layout,
            m.dora_options,
        ):
            raise RuntimeError(f"internal error: the {algo} config does not reproduce module '{m.path}'")


# ------------------------------------------------------------------------------------------------------- writing
def peft_to_kohya(
    components: Any,
    *,
    adapter_name: str = "default",
    model_type: str | None = None,
    naming: str = "sgm",
    dtype: torch.dtype | None = None,
    lokr_tucker: bool = False,
    metadata: Mapping[str, str] | None = None,
    strict: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Write adapter ``adapter_name`` as a kohya state dict and metadata that sd-scripts, LyCORIS, ComfyUI and A1111 load.

    ``components``: a pipeline, a mapping component -> model (with LoHa/LoKr/LoRA layers injected), the denoiser
    alone, or a ``KohyaConversion``. UNet names use the SGM layout (``naming="sgm"``, what sd-scripts writes and every
    consumer resolves) or the diffusers layout; ``naming="comfy"`` writes what ComfyUI reads (SGM names for SDXL;
    ``diffusion_model.<path>`` and ``text_encoders.qwen3_06b.transformer.model.<path>`` for Anima, whose
    ``lora_te_`` names ComfyUI ignores); text-encoder names always carry ``text_model_``. Tensors keep their
    dtype unless ``dtype`` is given (one dtype per module: ``torch.float32``, ``float16`` or ``bfloat16``; a value that
    overflows it raises naming the module). Tucker LoKr is rebuilt to a full 4-D ``lokr_w2`` unless
    ``lokr_tucker``. With ``strict``, layouts some consumer would silently drop (a partial CLIP-bigG q/k/v/out set)
    raise instead of warning.
    """
    if dtype is not None and dtype not in FILE_DTYPES:
        raise ValueError(
            f"cannot write dtype {dtype}: kohya files hold float32, float16 or bfloat16 tensors (what sd-scripts, "
            "LyCORIS, ComfyUI and A1111 read); pass one of those or None to keep the adapter's dtype"
        )
    scheme, modules, configs = _collect(components, adapter_name, model_type)
    resolver = NameResolver(
        scheme, {} if isinstance(components, KohyaConversion) else component_models(scheme, components)
    )
    _check_complete_sets(scheme, modules, strict)
    state_dict: dict[str, torch.Tensor] = {}
    written, overflow = [], []
    for module in sorted(modules, key=lambda m: (m.component, m.path)):
        name = resolver.kohya_name(module.component, module.path, naming)
        tensors, alpha = kohya_tensors(module, lokr_tucker)
        target = dtype or _common_dtype(tensors.values())
        for param, tensor in tensors.items():
            state_dict[f"{name}.{param}"] = tensor.detach().to(device="cpu", dtype=target).contiguous()
            if not torch.isfinite(state_dict[f"{name}.{param}"].abs().amax()):
                overflow.append(f"{name}.{param} ({module.component} '{module.path}')")
        alpha_tensor = torch.tensor(alpha, dtype=target)
        # a rank of 100000 overflows fp16: keep that (ignored, both-full) alpha in fp32 rather than write inf
        state_dict[f"{name}.alpha"] = alpha_tensor if torch.isfinite(alpha_tensor) else torch.tensor(alpha)
        written.append((module.algo, module.rank, alpha))
    if overflow:
        raise ValueError(
            "NaN or infinite values after conversion to the file dtype (the adapter diverged, or its values exceed "
            f"{dtype or 'its dtype'}; try dtype=torch.bfloat16 or torch.float32):\n  " + "\n  ".join(overflow)
        )
    tucker = any(key.endswith((".hada_t1", ".lokr_t2")) for key in state_dict)
    dora_axes = [m.wd_on_output for m in modules if m.dora_scale is not None]
    return dict(sorted(state_dict.items())), _file_metadata(
        scheme, written, configs, metadata, strict, tucker, dora_axes
    )


def _collect(components: Any, adapter_name: str, model_type: str | None):
    """(scheme, modules, configs) of the adapter to write, from a conversion or from models."""
    if isinstance(components, KohyaConversion):
        scheme = model_names(model_type or components.model_type)
        modules = [m for component in components.values() for m in component.modules]
        configs = [part.config for component in components.values() for part in component.parts.values()]
        return scheme, modules, configs
    scheme = model_names(model_type or model_type_of(components))
    modules, problems, configs = [], [], []
    for name, model in component_models(scheme, components).items():
        found, bad = modules_from_model(name, model, adapter_name)
        modules += found
        problems += bad
        config = getattr(model, "peft_config", {}).get(adapter_name)
        configs += [config] if config is not None else []
    if problems:
        raise ValueError(f"cannot write adapter '{adapter_name}':\n  " + "\n  ".join(problems))
    if not modules:
        raise ValueError(f"no LoHa, LoKr or LoRA layer holds an adapter named '{adapter_name}'")
    return scheme, modules, configs


def modules_from_model(component: str, model: nn.Module, adapter_name: str) -> tuple[list[ModuleAdapter], list[str]]:
    """The adapter's modules held by LoHa/LoKr/LoRA layers of ``model``, and a description of any it cannot write."""
    modules, problems = [], []
    for path, layer in unwrap(model).named_modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        path = re.sub(r"(^|\.)base_layer(?=\.|$)", "", path)
        base = layer.get_base_layer()
        try:
            geometry = Geometry(*layer_geometry(base, path))
            module = _layer_module(layer, adapter_name, component, path, geometry)
        except (TypeError, ValueError) as err:
            problems.append(f"{component} '{path}': {err}")
            continue
        if module is not None:
            modules.append(module)
    return modules, problems


def _layer_module(layer, adapter: str, component: str, path: str, geometry: Geometry) -> ModuleAdapter | None:
    if isinstance(layer, LycoLayer):
        if adapter not in layer.layouts:
            return None
        tensors = layer.kohya_tensors(adapter)
        dora_scale = tensors.pop("dora_scale", None)
        layout, rank, alpha = layer.layouts[adapter], layer.r[adapter], layer.alpha[adapter]
        if layer.rs_lora[adapter]:  # readers scale by alpha / r: store the alpha that gives the trained scale
            alpha = layer.base_scale[adapter] * rank
            if getattr(layout, "both_full", False):  # readers use scale 1 here: bake LyCORIS' r / sqrt(r) into w1
                tensors["lokr_w1"] = tensors["lokr_w1"] * layer.base_scale[adapter]
        module = ModuleAdapter(component, path, layer.algorithm.name, tensors, rank, alpha, geometry, layout)
        module.dora_scale, module.wd_on_output = dora_scale, layer.wd_on_output[adapter]
        return module
    if isinstance(layer, LoraLayer):
        if adapter not in layer.lora_A:
            return None
        if layer.use_dora.get(adapter) or layer.lora_bias.get(adapter):
            raise ValueError("LoRA with DoRA or lora_bias has no kohya form")
        rank, alpha = layer.r[adapter], layer.lora_alpha[adapter]
        if layer.use_rslora.get(adapter):
            alpha = alpha * rank**0.5  # PEFT scales by alpha/sqrt(r); kohya readers divide by r
        tensors = {
            "lora_down.weight": layer.lora_A[adapter].weight.detach(),
            "lora_up.weight": layer.lora_B[adapter].weight.detach(),
        }
        return ModuleAdapter(component, path, "lora", tensors, rank, float(alpha), geometry)
    if is_builtin_layer(layer):  # PEFT's own LoHa/LoKr: scale folded so kohya readers give PEFT's ΔW
        return builtin_layer_module(layer, adapter, component, path) if adapter in layer._available_adapters else None
    if any(adapter in getattr(layer, name, {}) for name in layer.adapter_layer_names):
        raise ValueError(f"{type(layer).__module__}.{type(layer).__name__} layers cannot be written as kohya modules")
    return None


def _common_dtype(tensors) -> torch.dtype:
    dtype = None
    for tensor in tensors:
        dtype = tensor.dtype if dtype is None else torch.promote_types(dtype, tensor.dtype)
    return dtype


def _check_complete_sets(scheme: ModelNames, modules: list[ModuleAdapter], strict: bool) -> None:
    incomplete = []
    for (model_type, component), (pattern, size) in COMPLETE_SETS.items():
        if model_type != scheme.model_type:
            continue
        groups: dict[str, set[str]] = {}
        for m in modules:
            match = re.match(pattern, m.path) if m.component == component else None
            if match:
                groups.setdefault(match.group(1), set()).add(match.group(2))
        incomplete += [
            f"{component} '{prefix}': {sorted(members)}" for prefix, members in groups.items() if len(members) != size
        ]
    if incomplete:
        message = (
            "A1111 applies CLIP-bigG attention projections only when q_proj, k_proj, v_proj and out_proj of a layer "
            "are all present and silently skips the others; incomplete layers:\n  " + "\n  ".join(sorted(incomplete))
        )
        if strict:
            raise ValueError(message + "\n(pass strict=False to write the file anyway)")
        logger.warning(message)


def _file_metadata(
    scheme: ModelNames,
    written,
    configs,
    extra: Mapping[str, str] | None,
    strict: bool,
    tucker: bool,
    dora_axes: list[bool] = (),
) -> dict[str, str]:
    """sd-scripts' network metadata (module, dim, alpha, args, base model version) plus the caller's entries.

    ``ss_network_args`` holds the algorithm(s) and the adapter config's layout options, with ``use_tucker`` saying
    whether the file itself has Tucker factors (Tucker LoKr is rebuilt to full ``lokr_w2`` by default), and
    ``dora_wd``/``wd_on_output`` when modules carry ``dora_scale`` (the most common axis; the shapes say each one's).
    """
    algos = sorted({algo for algo, _, _ in written})
    args: dict[str, str] = {"algo": "+".join(algos)}
    lyco = next((c for c in configs if isinstance(c, LycoConfig)), None)
    if lyco is not None:
        args.update({name: str(getattr(lyco, name)) for name in type(lyco).layout_options})
        args["use_tucker"] = str(tucker)
    if dora_axes:
        args["dora_wd"] = "True"
        args["wd_on_output"] = str(_most_common(list(dora_axes)))
    metadata = {
        "ss_network_module": NETWORK_MODULES[algos[0]] if len(algos) == 1 else "lycoris.kohya",
        "ss_network_dim": str(_most_common([rank for _, rank, _ in written])),
        "ss_network_alpha": str(_most_common([alpha for _, _, alpha in written])),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": scheme.base_model_version,
    }
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str; got {key!r}: {type(value).__name__}")
        metadata[key] = value
    version = metadata["ss_base_model_version"]
    if strict and not version.startswith(scheme.base_model_version.split("_")[0]):
        raise ValueError(
            f"ss_base_model_version={version!r} does not name {scheme.model_type}; A1111 would file it under another model"
        )
    return metadata


def is_lycoris_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True if any key holds a LoHa (``hada_*``) or LoKr (``lokr_*``) tensor, i.e. the file needs peft_lyco."""
    for key in state_dict:
        split = split_key(key, FILE_PARAMS)
        if split is not None and algo_of({split[1]: None}) in ("loha", "lokr"):
            return True
    return False
