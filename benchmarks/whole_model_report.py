"""Markdown and JSON of a whole-model run: step time, activations and peak relative to PEFT LoRA, and sampling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .report import write_atomic
from .slices import PRECISION_DOC

# the goals of issue 13, relative to PEFT LoRA at the same rank
STEP_GOAL = {"lokr": 1.00, "loha": 1.10}
HELD_GOAL = 1.00
MARKERS = ("<!-- whole-model:start -->", "<!-- whole-model:end -->")
MB = 1024 * 1024

COLUMNS = [
    ("ours-lokr", "ours LoKr"),
    ("ours-loha", "ours LoHa"),
    ("peft-lokr", "PEFT LoKr"),
    ("peft-loha", "PEFT LoHa"),
    ("lycoris-lokr", "LyCORIS LoKr"),
    ("lycoris-loha", "LyCORIS LoHa"),
]


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def _ratio_cell(name: str, ratio: dict[str, float] | None) -> str:
    """``median× (min–max)``, with the goal mark on ours."""
    if ratio is None:
        return "–"
    cell = f"{ratio['median']:.2f}× ({ratio['min']:.2f}–{ratio['max']:.2f})"
    if name.startswith("ours-"):
        cell += " " + _mark(ratio["median"] <= STEP_GOAL[name.split("-", 1)[1]])
    return cell


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / MB:.1f}"


def _vs(value: int | None, reference: int | None, *, goal: float | None = None) -> str:
    if value is None or not reference:
        return _mb(value)
    cell = f"{_mb(value)} ({value / reference:.2f}×)"
    return cell + (" " + _mark(value / reference <= goal) if goal is not None else "")


def _case_label(case: dict) -> str:
    return f"{case['name']}"


def _columns(entries: list[dict], key: str) -> list[tuple[str, str]]:
    present = {name for entry in entries for name in entry.get(key, {})}
    return [(name, label) for name, label in COLUMNS if name in present]


def _train_lines(entries: list[dict], settings: dict) -> list[str]:
    if not entries:
        return []
    columns = _columns(entries, "step_seconds")
    head = " | ".join(label for _, label in columns)
    sep = "|---" * (3 + len(columns)) + "|"
    lines = [
        "#### Training step relative to PEFT LoRA",
        "",
        (
            f"Forward + backward of the whole slice (input requiring grad, frozen base); base and LoRA in ms (median of "
            f"{settings['reps']} interleaved rounds after {settings['warmup']} warm-up), every adapter as the median "
            "(min–max) of its per-round ratio to LoRA's step in the same round. Goal: ours LoKr ≤ 1.00×, LoHa ≤ 1.10×."
        ),
        "",
        f"| case | base ms | LoRA ms | {head} |",
        sep,
    ]
    for entry in entries:
        t, r = entry["step_seconds"], entry.get("step_vs_lora", {})
        cells = [_ratio_cell(name, r.get(name)) for name, _ in columns]
        lines.append(
            f"| {_case_label(entry['case'])} | {t['base'] * 1000:.0f} | {t['lora'] * 1000:.0f} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "#### Memory relative to PEFT LoRA",
        "",
        (
            "Held for backward: MB of the distinct storages autograd keeps from the slice's forward to its backward "
            "(`saved_tensors_hooks`) that are neither parameters nor the slice's inputs, i.e. the activations a network of "
            "such blocks accumulates (goal: ≤ LoRA's). Peak: the step's peak above what the process held before it "
            "(CPU: resident-set high-water mark `VmHWM` after `clear_refs`, with glibc returning freed blocks to the OS; "
            "CUDA: `torch.cuda.max_memory_allocated`). Ratios to LoRA in brackets."
        ),
        "",
        f"| case | held base | held LoRA | {head} | peak base | peak LoRA | {head} |",
        "|---" * (5 + 2 * len(columns)) + "|",
    ]
    for entry in entries:
        held = {name: value["activations"] for name, value in entry["held_bytes"].items()}
        peak = entry["peak_bytes"]
        lines.append(
            f"| {_case_label(entry['case'])} | {_mb(held.get('base'))} | {_mb(held.get('lora'))} | "
            + " | ".join(
                _vs(held.get(n), held.get("lora"), goal=HELD_GOAL if n.startswith("ours-") else None)
                if n in held
                else "–"
                for n, _ in columns
            )
            + f" | {_mb(peak.get('base'))} | {_mb(peak.get('lora'))} | "
            + " | ".join(_vs(peak.get(n), peak.get("lora")) if n in peak else "–" for n, _ in columns)
            + " |"
        )
    return lines


def _sample_lines(entries: list[dict], settings: dict) -> list[str]:
    if not entries:
        return []
    variants = [
        name
        for algo in ("lokr", "loha")
        for name in (f"ours-{algo}", f"ours-{algo}+cache")
        if any(name in e["run_seconds"] for e in entries)
    ]

    def label(name: str) -> str:
        algo, _, cached = name.removeprefix("ours-").partition("+")
        return "ours " + {"lokr": "LoKr", "loha": "LoHa"}[algo] + (" cached" if cached else "")

    head = " | ".join(f"{label(n)} / LoRA" for n in variants)
    head_base = " | ".join(f"{label(n)} / base" for n in variants)
    lines = [
        "#### Sampling: no-grad calls of the unmerged slice",
        "",
        (
            f"{settings['sample_steps']} no-grad forwards of the slice in eval mode (a sampler's denoiser calls), adapters "
            "unmerged, after an in-place touch of every factor (an optimizer step); seconds per run for the base, then "
            f'median (min–max) of per-round ratios over {settings["sample_reps"]} interleaved rounds. "cached": the '
            "same run inside `peft_lyco.inference_cache(...)` (W + ΣΔW built on the first call, reused by the others)."
        ),
        "",
        f"| case | base s | LoRA / base | {head} | {head_base} |",
        "|---" * (3 + 2 * len(variants)) + "|",
    ]
    for entry in entries:
        vs_lora, vs_base = entry.get("vs_lora", {}), entry.get("vs_base", {})

        def cell(ratio: dict | None) -> str:
            return "–" if ratio is None else f"{ratio['median']:.2f}× ({ratio['min']:.2f}–{ratio['max']:.2f})"

        lines.append(
            f"| {_case_label(entry['case'])} | {entry['run_seconds']['base']:.2f} | {cell(vs_base.get('lora'))} | "
            + " | ".join(cell(vs_lora.get(n)) for n in variants)
            + " | "
            + " | ".join(cell(vs_base.get(n)) for n in variants)
            + " |"
        )
    return lines


def _case_lines(result: dict) -> list[str]:
    seen, lines = set(), []
    for entry in result.get("train", []) + result.get("sample", []):
        case = entry["case"]
        if case["name"] in seen:
            continue
        seen.add(case["name"])
        size = f"{case['tokens']} tokens" if case["kind"] != "sdxl-resnet" else f"{case['tokens']} pixels"
        adapters = f"r {case['rank']} (alpha {case['rank']})" + (
            f", LoKr factor {case['factor']}" if "lokr" in case["algos"] else ""
        )
        targets = next((e for e in result.get("train", []) if e["case"]["name"] == case["name"]), None)
        target_text = (
            f"; {targets['targets']} adapted layers ({targets['conv_targets']} 3x3 convs)"
            if targets is not None
            else ""
        )
        lines.append(
            f"- `{case['name']}`: {case['source'] or case['kind']}; {case['kind']} {case['width']} wide, {size}, "
            f"batch {case['batch']}, {case['precision']}; {adapters}{target_text}"
        )
    return lines


def _check_lines(result: dict) -> list[str]:
    lines = []
    for entry in result.get("train", []):
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in entry["output_difference"].items())
        notes = "; ".join(f"{k}: {', '.join(v)}" for k, v in entry["notes"].items())
        if not diffs and not notes:  # no peer in this run: nothing was compared
            continue
        lines.append(
            f"- {entry['case']['name']}: |ours − peer| / |ours − base| = {diffs}" + (f"; {notes}" if notes else "")
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The whole-model tables of one run, with the command, the machine and what each column measures."""
    machine, settings = result.get("machine", {}), result["settings"]
    precisions = sorted({e["case"]["precision"] for e in result.get("train", []) + result.get("sample", [])})
    lines = []
    if "command" in result:
        lines += [f"Command: `{result['command']}` ({settings['mode']} run, {result['seconds']:.0f} s)", ""]
    if machine:
        lines += [
            f"Machine: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['threads']}, device "
            f"`{machine['device']}`; load average {machine['load_before']} before, {machine.get('load_after', 'n/a')} "
            "after. " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()) + ".",
            "",
        ]
    lines += ["Precision: " + "; ".join(f"`{p}` = {PRECISION_DOC[p]}" for p in precisions) + ".", ""]
    lines += ["Cases:", "", *_case_lines(result), ""]
    lines += _train_lines(result.get("train", []), settings)
    lines += [""] + _sample_lines(result.get("sample", []), settings)
    checks = _check_lines(result)
    if checks:
        lines += [
            "",
            (
                "Checks: ours' factors are copied into the peers where their layouts agree; in bf16 the peers' "
                "`base(x) + op(x, ΔW)` rounds differently from ours' `op(x, W + ΔW)`, so differences there are rounding."
            ),
            "",
            *checks,
        ]
    return "\n".join(lines).rstrip("\n") + "\n"


def write(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """``whole_model.json`` and ``whole_model.md`` in ``out_dir``."""
    json_path, md_path = out_dir / "whole_model.json", out_dir / "whole_model.md"
    write_atomic(json_path, json.dumps(result, indent=2, sort_keys=True) + "\n")
    write_atomic(md_path, markdown(result))
    return json_path, md_path
