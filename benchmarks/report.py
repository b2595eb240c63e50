"""Markdown and JSON output of a benchmark run (written atomically)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peft_lyco.convert.io import write_atomically

# targets of issue 6 (ratios from one run)
STEP_VS_FASTER_PEER = 0.70
STEP_VS_BASE = 1.6
LOKR_STEP_VS_BASE = 1.3
SAVED_VS_BASE = 1.1
LOAD_VS_DIFFUSERS = 1.2
FUSE_VS_DIFFUSERS = 1.5

MB = 1024 * 1024


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename (umask permissions)."""
    write_atomically(path, lambda temp: Path(temp).write_text(text))


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.1f}"


def _x(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.2f}×"


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / MB:.1f}"


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def step_target(case: dict, ratios: dict) -> tuple[bool, str]:
    """Whether a case meets the step-time targets, and the bound it was held to against the base."""
    bound = LOKR_STEP_VS_BASE if case["algo"] == "lokr" else STEP_VS_BASE
    ok = ratios["ours/faster_peer"] <= STEP_VS_FASTER_PEER
    return ok, f"{_mark(ok)} (base {_mark(ratios['ours/base'] <= bound)} ≤{bound})"


def markdown(result: dict[str, Any]) -> str:
    """The tables of one run, with the machine and the command that produced them."""
    machine = result["machine"]
    lines = [
        f"Command: `{result['command']}` ({result['settings']['mode']} run, {result['seconds']:.0f} s in all)",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['threads']}, "
        f"{machine['memory_gib']:.0f} GiB RAM, device `{machine['device']}`; load average {machine['load_before']} before, "
        f"{machine['load_after']} after. " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()) + ".",
        "",
        f"Step = forward + backward of one adapted layer, frozen base weight, input requiring grad; median of "
        f"{result['settings']['reps']} interleaved rounds after {result['settings']['warmup']} warm-up rounds. "
        "Ratios are medians of the per-round ratios (every round runs all four back to back, in rotating order).",
        "",
        "### Training step",
        "",
        "| case | base ms | peft_lyco ms | PEFT ms | LyCORIS ms | ours/base | ours/PEFT | ours/LyCORIS | ours/faster peer | target ≤0.70 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in result["cases"]:
        t, r = case["step_seconds"], case["ratios"]["step"]
        lines.append(
            f"| {case['case']['name']} | {_ms(t['base'])} | {_ms(t['peft_lyco'])} | {_ms(t['peft'])} | {_ms(t['lycoris'])} "
            f"| {_x(r['ours/base'])} | {_x(r['ours/peft'])} | {_x(r['ours/lycoris'])} | {_x(r['ours/faster_peer'])} "
            f"| {step_target(case['case'], r)[1]} |"
        )
    lines += [
        "",
        "### Memory",
        "",
        "Saved for backward: bytes of the distinct storages autograd keeps between forward and backward "
        "(`torch.autograd.graph.saved_tensors_hooks`), each storage counted once, parameters and the layer input "
        'included (the base layer keeps its input and weight too); "extra" is the part that is neither a parameter nor '
        "the input. Peak step: the process's peak resident memory during one step above what it held just before "
        "(`/proc/self/clear_refs` + `VmHWM`; allocator peak on CUDA).",
        "",
        "| case | saved MB base | ours | PEFT | LyCORIS | ours/base ≤1.1 | extra MB ours | PEFT | LyCORIS | peak MB base | ours | PEFT | LyCORIS | peak ours/base |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in result["cases"]:
        s, p = case["saved"], case.get("peak_bytes") or {}
        ratio = case["ratios"]["saved"]["ours/base"]
        peak_ratio = case["ratios"].get("peak", {}).get("ours/base")
        lines.append(
            f"| {case['case']['name']} | "
            + " | ".join(_mb(s[i]["total"]) for i in ("base", "peft_lyco", "peft", "lycoris"))
            + f" | {_x(ratio)} {_mark(ratio <= SAVED_VS_BASE)} | "
            + " | ".join(_mb(s[i]["beyond_input_and_params"]) for i in ("peft_lyco", "peft", "lycoris"))
            + " | "
            + " | ".join(_mb(p.get(i)) for i in ("base", "peft_lyco", "peft", "lycoris"))
            + f" | {_x(peak_ratio)} |"
        )
    lines += [
        "",
        "### Merge and inference without merging",
        "",
        "Merge: adding the adapter into the base weight once (median; LyCORIS' `merge_to` scales by alpha/rank twice, a "
        "known defect, timed as it is). No-grad forward: the unmerged adapted layer in inference, relative to the base.",
        "",
        "| case | merge ms ours | PEFT | LyCORIS | ours/PEFT | ours/LyCORIS | no-grad fwd ours/base | PEFT/base | LyCORIS/base |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in result["cases"]:
        m, r, i = case["merge_seconds"], case["ratios"]["merge"], case["ratios"]["infer"]
        lines.append(
            f"| {case['case']['name']} | {_ms(m['peft_lyco'])} | {_ms(m['peft'])} | {_ms(m['lycoris'])} "
            f"| {_x(r['ours/peft'])} | {_x(r['ours/lycoris'])} | {_x(i['ours/base'])} | {_x(i['peft/base'])} | {_x(i['lycoris/base'])} |"
        )
    lines += ["", *_loading_lines(result.get("loading")), "", *_notes(result)]
    if result.get("whole_model"):
        from .whole_model_report import markdown as whole_model_markdown

        lines += ["", "### Whole-model slices", "", whole_model_markdown(result["whole_model"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def _loading_lines(loading: dict | None) -> list[str]:
    if loading is None:
        return ["### Loading and fusing", "", "Not run (`--no-loading`)."]
    lines = [
        "### Loading and fusing",
        "",
        f"{loading['unet']} UNet ({loading['unet_parameters'] / 1e6:,.0f} M parameters, {loading['dtype']}, random weights), "
        f"{loading['modules']} adapted modules (every Linear and Conv2d of the down/mid/up blocks), rank {loading['rank']}; "
        f"seconds, median of {loading['reps']}.",
        "",
        "| adapter | load s | fuse s | unfuse s | load / diffusers ≤1.2 | fuse / diffusers ≤1.5 |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in (
        ("diffusers_lora", "diffusers LoRA"),
        ("peft_lyco_lokr", "peft_lyco LoKr f8 (kohya SGM file)"),
        ("peft_lyco_loha", "peft_lyco LoHa (kohya SGM file)"),
    ):
        row = loading.get(key)
        if row is None:
            continue
        load_r, fuse_r = row.get("load/diffusers"), row.get("fuse/diffusers")
        lines.append(
            f"| {label} | {row['load']:.2f} | {row['fuse']:.2f} | {row['unfuse']:.2f} "
            f"| {_x(load_r)}{'' if load_r is None else ' ' + _mark(load_r <= LOAD_VS_DIFFUSERS)} "
            f"| {_x(fuse_r)}{'' if fuse_r is None else ' ' + _mark(fuse_r <= FUSE_VS_DIFFUSERS)} |"
        )
    return lines


def _notes(result: dict) -> list[str]:
    notes = []
    for case in result["cases"]:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in case["output_difference"].items())
        extra = "; ".join(case["notes"])
        notes.append(
            f"- {case['case']['name']} ({case['case']['source']}): |ours − peer| / |ours − base| = {diffs}"
            + (f"; {extra}" if extra else "")
        )
    return [
        "### Checks",
        "",
        "Every implementation computes the same layer where the factor layouts agree:",
        "",
        *notes,
    ]


def write(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """``results.json`` and ``results.md`` in ``out_dir``."""
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    write_atomic(json_path, json.dumps(result, indent=2, sort_keys=True) + "\n")
    write_atomic(md_path, markdown(result))
    return json_path, md_path


DOCS_START, DOCS_END = "<!-- results:start -->", "<!-- results:end -->"


def update_docs(path: Path, table: str, markers: tuple[str, str] = (DOCS_START, DOCS_END)) -> None:
    """Replace the generated section of ``docs/performance.md`` (between the two ``markers``) with ``table``."""
    start, end = markers
    text = path.read_text()
    head, _, rest = text.partition(start)
    _, found, tail = rest.partition(end)
    if not found:
        raise ValueError(f"{path} lacks the {start} … {end} markers")
    write_atomic(path, f"{head}{start}\n{table}{end}{tail}")
