"""``peft-lyco inspect``: what a kohya/LyCORIS file holds, module by module, and what consumers will make of it."""

from __future__ import annotations

import json
import math
from collections import Counter

import torch

from ..convert import LycoFileError, kohya_to_peft, load_kohya
from ..convert.kohya import _check_complete_sets
from ..convert.modules import FILE_PARAMS
from ..convert.names import model_names, split_key
from .adapters import module_scale

# names A1111 silently skips (formats.md writer rules): diffusers-style names it cannot map, and lora_te_ on SDXL
A1111_DROPPED = ("lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_add_embedding_", "lora_te_")


def inspect_file(path: str, model_type: str | None = None) -> dict:
    """A JSON-ready report of the file: format, naming, model type, modules, metadata summary and warnings."""
    state_dict, metadata = load_kohya(path)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        split = split_key(key, FILE_PARAMS)
        if split is None:
            unknown.append(key)
        else:
            groups.setdefault(split[0], {})[split[1]] = tensor
    warnings = [f"key with no known parameter name: {key}" for key in sorted(unknown)]
    raw = {name: _raw_facts(name, params, warnings) for name, params in sorted(groups.items())}
    report: dict = {"file": str(path), "format": _format(groups), "naming": _naming(groups), "modules": []}
    try:
        conversion = kohya_to_peft(state_dict, metadata=metadata, model_type=model_type, ignore_unknown_keys=True)
    except (LycoFileError, ValueError) as err:
        warnings.append(f"the library cannot load this file: {err}")
        report.update(model_type=model_type, metadata=_metadata_summary(metadata), warnings=warnings)
        report["modules"] = [dict(name=name, **facts) for name, facts in raw.items()]
        return report
    report["model_type"] = conversion.model_type
    modules = sorted((m for c in conversion.values() for m in c.modules), key=lambda m: m.name)
    for module in modules:
        report["modules"].append({"name": module.name, **_module_facts(module, metadata), **raw.get(module.name, {})})
    try:
        _check_complete_sets(model_names(conversion.model_type), modules, strict=True)
    except ValueError as err:
        warnings.append(str(err).split("\n(pass")[0])
    if conversion.model_type == "sdxl":
        dropped = [m.name for m in modules if m.name.startswith(A1111_DROPPED)]
        warnings += [f"{name}: A1111 silently skips this module name" for name in dropped]
    report["metadata"] = _metadata_summary(metadata)
    report["warnings"] = warnings
    return report


def _format(groups) -> str:
    algos = Counter()
    for params in groups.values():
        names = set(params)
        algos["loha" if names & {"hada_w1_a"} else "lokr" if any(n.startswith("lokr_") for n in names) else "lora"] += 1
    return "+".join(sorted(algos)) or "empty"


def _naming(groups) -> str:
    names = list(groups)
    if any("." in name for name in names):
        return "dotted (ComfyUI/diffusers style)"
    if any(
        n.startswith("lora_unet_") and ("input_blocks" in n or "output_blocks" in n or "middle_block" in n)
        for n in names
    ):
        return "kohya sgm"
    if any(n.startswith("lora_unet_") and ("down_blocks" in n or "up_blocks" in n or "mid_block" in n) for n in names):
        return "kohya diffusers"
    if any(n.startswith("lycoris_") for n in names):
        return "lycoris"
    return "kohya"


def _raw_facts(name: str, params: dict[str, torch.Tensor], warnings: list[str]) -> dict:
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in params.values()})
    if len(dtypes) > 1:
        warnings.append(f"{name}: mixed dtypes {dtypes} (A1111 skips such modules)")
    bad = [p for p, t in params.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        warnings.append(f"{name}: NaN/inf in {bad}")
    if "alpha" not in params:
        warnings.append(f"{name}: no alpha (readers use alpha = rank, scale 1)")
    elif params["alpha"].numel() == 1 and float(params["alpha"]) == 0:
        warnings.append(f"{name}: alpha 0 (LyCORIS/sd-scripts read it as alpha = rank, ComfyUI/A1111 as ΔW = 0)")
    if "lokr_t2" in params:
        warnings.append(f"{name}: lokr_t2 (Tucker LoKr): ComfyUI skips this module")
    return {"dtype": "/".join(dtypes)}


def _module_facts(module, metadata) -> dict:
    facts = {"component": module.component, "path": module.path, "algo": module.algo, "rank": module.rank,
             "alpha": module.alpha, "layer": module.geometry.describe()}  # fmt: skip
    scale = module_scale(module)
    if module.algo == "lokr":
        layout = module.layout
        facts["layout"] = layout.mode + (" (w1 low-rank)" if layout.w1_decomposed else "")
        facts["factor"] = f"({layout.out_l}x{layout.in_m}) ⊗ ({layout.out_k}x{layout.in_n})"
        rule = "full matrix: alpha ignored" if layout.both_full else "alpha/rank"
    elif module.algo == "loha":
        facts["layout"] = module.layout.mode
        rule = "alpha/rank"
    else:
        facts["layout"] = "locon" if module.geometry.kernel else "lora"
        rule = "alpha/rank"
    if '"rs_lora": "True"' in metadata.get("ss_network_args", "") or "'rs_lora': 'True'" in metadata.get(
        "ss_network_args", ""
    ):
        rule += " (rs_lora at training; the saved alpha already gives the training scale)"
    facts.update(scale=scale, scale_rule=rule)
    if not math.isfinite(scale):
        facts["scale_rule"] += " (not finite!)"
    return facts


def _metadata_summary(metadata: dict[str, str]) -> dict[str, str]:
    keep = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
            "ss_output_name", "ss_training_comment", "ss_steps", "ss_epoch", "ss_learning_rate", "ss_sd_model_name",
            "modelspec.architecture", "modelspec.title")  # fmt: skip
    summary = {key: metadata[key] for key in keep if key in metadata}
    others = sorted(set(metadata) - set(summary))
    if others:
        summary["other keys"] = f"{len(others)}: " + ", ".join(others[:12]) + (" ..." if len(others) > 12 else "")
    return summary


def format_report(report: dict) -> str:
    """The report as text: a header, one line per module, metadata and warnings."""
    lines = [f"file: {report['file']}", (f"format: {report['format']}   naming: {report['naming']}   "
             f"model: {report.get('model_type')}   modules: {len(report['modules'])}")]  # fmt: skip
    columns = ("name", "algo", "layout", "rank", "factor", "alpha", "scale", "scale_rule", "dtype")
    rows = [[_cell(m.get(c, "")) for c in columns] for m in report["modules"]]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    if report.get("metadata"):
        lines.append("metadata:")
        lines += [f"  {k}: {v}" for k, v in report["metadata"].items()]
    lines.append(f"warnings ({len(report['warnings'])}):")
    lines += [f"  {w}" for w in report["warnings"]]
    return "\n".join(lines)


def _cell(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def run(args) -> int:
    report = inspect_file(args.file, args.model_type)
    print(json.dumps(report, indent=1, ensure_ascii=False) if args.json else format_report(report))
    return 0
