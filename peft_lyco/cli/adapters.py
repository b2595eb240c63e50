"""Adapter files for the command line: read any kohya file, PEFT folder (ours or PEFT's built-in LoHa/LoKr) into
modules, their ΔW under the readers' scale rule, and write modules back as a kohya file or PEFT folders."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file

from ..convert import ComponentAdapter, KohyaConversion, kohya_to_peft, load_kohya, peft_to_kohya, save_kohya
from ..convert.builtin import PEFT_PREFIX, builtin_geometry, builtin_module
from ..convert.kohya import build_component
from ..convert.modules import ModuleAdapter, read_module
from ..convert.names import NameResolver, detect_model_type, flatten, model_names
from ..functional import LOHA_PARAMS, LOKR_PARAMS, delta_weight

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PEFT_TYPES = {"LOHA": "builtin", "LOKR": "builtin", "LYCO_LOHA": "ours", "LYCO_LOKR": "ours", "LORA": "lora"}


@dataclass
class Adapter:
    """An adapter read from disk: model family, its modules (kohya layouts), and the file's metadata."""

    model_type: str
    modules: list[ModuleAdapter]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "kohya"


def read_adapter(path: str | os.PathLike, model_type: str | None = None) -> Adapter:
    """A kohya ``.safetensors`` file or a PEFT adapter folder (``adapter_config.json``), as modules."""
    path = Path(path)
    if path.is_dir():
        return read_peft_folder(path, model_type)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    state_dict, metadata = load_kohya(path)
    conversion = kohya_to_peft(state_dict, metadata=metadata, model_type=model_type)
    modules = [m for component in conversion.values() for m in component.modules]
    return Adapter(conversion.model_type, modules, metadata, "kohya")


def read_peft_folder(folder: Path, model_type: str | None = None, component: str | None = None) -> Adapter:
    """A PEFT adapter folder: PEFT's LoRA, LoHa, LoKr or our LYCO_LOHA/LYCO_LOKR, as kohya modules (ΔW unchanged)."""
    config_path = folder / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{config_path}: not a readable PEFT adapter config ({err})") from err
    peft_type = str(config.get("peft_type", "")).upper()
    kind = PEFT_TYPES.get(peft_type)
    if kind is None:
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LoRA, LoHa or LoKr")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{folder}: no adapter_model.safetensors (only safetensors adapters are read)")
    state_dict, _ = load_kohya(weights)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    known = (*LOHA_PARAMS, *LOKR_PARAMS, "lora_A.weight", "lora_B.weight")
    for key, tensor in state_dict.items():
        body = key.removeprefix(PEFT_PREFIX)
        param = next((p for p in known if body.endswith("." + p)), None)
        if param is None:
            raise ValueError(f"{weights}: key {key!r} is not a {peft_type} parameter")
        groups.setdefault(body[: -len(param) - 1], {})[param] = tensor
    scheme = model_names(model_type or detect_model_type([f"lora_unet_{flatten(p)}" for p in groups]))
    component = component or scheme.components[0].name
    resolver = NameResolver(scheme)
    modules, problems = [], []
    for path, tensors in sorted(groups.items()):
        rank = _pattern(config.get("rank_pattern") or {}, path, config.get("r"))
        alpha = _pattern(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", config.get("alpha")))
        hint = resolver.kernel_hint(component, path)
        try:
            if kind == "builtin":
                modules.append(builtin_module(tensors, rank, alpha, builtin_geometry(tensors, hint), component, path))
                continue
            if kind == "lora":
                if config.get("use_rslora"):
                    alpha = alpha * rank**0.5
                tensors = {"lora_down.weight": tensors["lora_A.weight"], "lora_up.weight": tensors["lora_B.weight"]}
            params = {**tensors, "alpha": torch.tensor(float(alpha or rank))}
            modules.append(read_module(params, component, path, None, hint))
        except (ValueError, TypeError) as err:
            problems.append(f"{component} '{path}': {err}")
    if problems:
        raise ValueError(f"{folder}: cannot read these modules:\n  " + "\n  ".join(problems))
    for module in modules:
        module.name = resolver.kohya_name(module.component, module.path)
    return Adapter(scheme.model_type, modules, {}, f"peft:{peft_type}")


def _pattern(patterns, path, default):
    key = get_pattern_key(patterns.keys(), path)
    return patterns.get(key, default)


# ------------------------------------------------------------------------------------------------------ ΔW
def module_scale(module: ModuleAdapter) -> float:
    """The scale our layers (and kohya readers) apply: 1 for LoKr with both halves full, else alpha / rank."""
    if module.algo == "lokr" and module.layout.both_full:
        return 1.0
    return module.alpha / module.rank


def module_delta(module: ModuleAdapter, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ΔW of a module with its scale, in ``dtype``, shaped like the layer's weight ``(out, in, *kernel)``."""
    g = module.geometry
    tensors = {name: tensor.to(dtype) for name, tensor in module.tensors.items()}
    if module.algo == "lora":
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1) * module_scale(module)
    else:
        delta = delta_weight(tensors, module_scale(module))
    return delta.reshape(g.out_features, g.in_features, *g.kernel)


# ----------------------------------------------------------------------------------------------------- writing
def make_module(component, path, name, algo, tensors, alpha, geometry) -> ModuleAdapter:
    """A new module from kohya tensors, validated (and its layout options found) by the file reader."""
    params = {**tensors, "alpha": torch.tensor(float(alpha))}
    module = read_module(params, component, path, geometry)
    module.name = name
    return module


def as_conversion(adapter: Adapter, *, configs: bool = True) -> KohyaConversion:
    """The modules as a ``KohyaConversion``: per component PEFT configs and state dicts, or (``configs=False``, enough
    for writing kohya files) the modules alone, which also holds layouts no config reproduces (PEFT LoKr splits)."""
    by_component: dict[str, list[ModuleAdapter]] = {}
    for module in adapter.modules:
        by_component.setdefault(module.component, []).append(module)
    components = {
        name: build_component(name, modules) if configs else ComponentAdapter(name, modules, {})
        for name, modules in by_component.items()
    }
    return KohyaConversion(adapter.model_type, components, dict(adapter.metadata))


def write_kohya(
    out: str | os.PathLike, adapter: Adapter, *, naming: str = "sgm", dtype: torch.dtype | None = None
) -> Path:
    """Write the modules as a kohya file (atomically), carrying over the source's other metadata."""
    return save_kohya(out, *kohya_contents(adapter, naming=naming, dtype=dtype))


def kohya_contents(
    adapter: Adapter, *, naming: str = "sgm", dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The kohya state dict and metadata of the modules (the source's metadata kept, the network entries rewritten)."""
    kept = {k: v for k, v in adapter.metadata.items() if not k.startswith(("ss_network_", "ss_base_model_version"))}
    return peft_to_kohya(
        as_conversion(adapter, configs=all(m.algo == "lora" or m.candidates for m in adapter.modules)),
        naming=naming,
        dtype=dtype,
        metadata=kept,
    )


def write_peft_folders(out: str | os.PathLike, adapter: Adapter, dtype: torch.dtype | None = None) -> list[Path]:
    """Write one PEFT adapter folder per component and method under ``out`` (``out`` itself when there is only one),
    each ``adapter_config.json`` + ``adapter_model.safetensors`` as ``save_pretrained`` writes them. The whole tree is
    built in a temporary folder next to ``out`` and renamed into place."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; choose a new folder")
    conversion = as_conversion(adapter)
    parts = [(c, method, part) for c, comp in conversion.items() for method, part in comp.parts.items()]
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    written = []
    try:
        for component, method, part in parts:
            sub = (
                "."
                if len(parts) == 1
                else (component if len(conversion[component].parts) == 1 else f"{component}_{method}")
            )
            folder = temp / sub
            folder.mkdir(parents=True, exist_ok=True)
            part.config.save_pretrained(str(folder))
            tensors = {
                PEFT_PREFIX + key: (value.to(dtype) if dtype else value).contiguous()
                for key, value in part.state_dict.items()
            }
            save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
            written.append(out / sub)
        _apply_umask(temp)
        if out.exists():
            out.rmdir()
        os.replace(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return [Path(os.path.normpath(p)) for p in written]


def _apply_umask(root: Path) -> None:
    """mkdtemp makes 0700 folders; give the tree the permissions the user's umask asks for."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
