"""peft_lyco vs PEFT's built-in LoHa/LoKr vs lycoris-lora vs the frozen base layer, in one process, interleaved.

    python benchmarks/run.py            # every case, real-size SDXL loading, whole-model slices
    python benchmarks/run.py --quick    # the issue's three cases, a tiny loading run, a tiny whole-model slice
    python benchmarks/run.py --no-whole-model   # without the whole-model slices (benchmarks/whole_model.py)

Writes ``results.json`` and ``results.md`` to ``--out`` (default ``benchmarks/results``); ``--update-docs`` also puts
the tables into ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the checkout's packages importable
    sys.path.insert(0, str(ROOT))

import torch

from benchmarks import cases as case_lists
from benchmarks import measure, report, whole_model, whole_model_report
from benchmarks.cases import Case
from benchmarks.implementations import IMPLS, build, output_differences
from benchmarks.loading import run_loading


@dataclass(frozen=True)
class Settings:
    mode: str
    warmup: int
    reps: int
    merge_reps: int
    loading_real_size: bool
    loading_reps: int


FULL = Settings("full", warmup=3, reps=9, merge_reps=5, loading_real_size=True, loading_reps=3)
QUICK = Settings("quick", warmup=1, reps=3, merge_reps=2, loading_real_size=False, loading_reps=3)


def _inputs(case: Case, device: str, module) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randn(case.input_shape, device=device, dtype=case.torch_dtype, requires_grad=True)
    with torch.no_grad():
        grad_out = torch.randn_like(module(x))
    return x, grad_out


def _ratio_set(times: dict[str, list[float]], pairs: list[tuple[str, str]]) -> dict[str, float]:
    return {f"{a}/{b}": measure.paired_ratio(times[_impl(a)], times[_impl(b)]) for a, b in pairs}


def _impl(label: str) -> str:
    return "peft_lyco" if label == "ours" else label


def bench_case(case: Case, settings: Settings, device: str) -> dict[str, Any]:
    """Step time, no-grad forward, bytes kept for backward and merge time of the four implementations."""
    built = build(case, device)
    x, grad_out = _inputs(case, device, built["base"].module)
    steps = {name: measure.training_step(item, x, grad_out) for name, item in built.items()}
    step_times = measure.interleaved(steps, settings.warmup, settings.reps, device)

    def no_grad_forward(item):
        def run():
            with torch.no_grad():
                item.module(x)

        return (lambda: None, run)

    infer_times = measure.interleaved(
        {n: no_grad_forward(i) for n, i in built.items()}, settings.warmup, settings.reps, device
    )
    saved = {name: measure.saved_for_backward(item, x) for name, item in built.items()}
    merge_times = {
        name: measure.merge_seconds(item, settings.merge_reps, device) for name, item in built.items() if item.merge
    }
    faster_peer = [min(p, q) for p, q in zip(step_times["peft"], step_times["lycoris"])]
    peers = [("ours", "base"), ("ours", "peft"), ("ours", "lycoris")]
    return {
        "case": case.as_dict(),
        "step_seconds": {name: measure.median(t) for name, t in step_times.items()},
        "step_seconds_all": step_times,
        "infer_seconds": {name: measure.median(t) for name, t in infer_times.items()},
        "saved": saved,
        "merge_seconds": {name: measure.median(t) for name, t in merge_times.items()},
        "ratios": {
            "step": {
                **_ratio_set(step_times, peers),
                "ours/faster_peer": measure.paired_ratio(step_times["peft_lyco"], faster_peer),
            },
            "infer": _ratio_set(infer_times, [("ours", "base"), ("peft", "base"), ("lycoris", "base")]),
            "saved": {
                f"ours/{p}": saved["peft_lyco"]["total"] / saved[p]["total"] for p in ("base", "peft", "lycoris")
            },
            "merge": {
                f"ours/{p}": measure.median(merge_times["peft_lyco"]) / measure.median(merge_times[p])
                for p in ("peft", "lycoris")
            },
        },
        "output_difference": output_differences(built, x),
        "notes": sorted({note for item in built.values() for note in item.notes}),
    }


def peak_case(case: Case, device: str) -> dict[str, int | None]:
    """Peak memory of one training step of each implementation (run before the timings, see measure)."""
    built = build(case, device)
    x, grad_out = _inputs(case, device, built["base"].module)
    peaks = {
        name: measure.peak_step_bytes(*measure.training_step(item, x, grad_out), device) for name, item in built.items()
    }
    del built, x, grad_out
    gc.collect()
    return peaks


def _machine(device: str) -> dict[str, Any]:
    from importlib.metadata import version

    import diffusers
    import peft

    import peft_lyco

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3 if hasattr(os, "sysconf") else 0.0
    versions = {"python": platform.python_version(), "torch": torch.__version__, "peft": peft.__version__}
    versions.update(
        {
            "diffusers": diffusers.__version__,
            "lycoris-lora": version("lycoris-lora"),
            "peft_lyco": peft_lyco.__version__,
        }
    )
    return {
        "cpu": torch.cuda.get_device_name() if device.startswith("cuda") else cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "memory_gib": memory,
        "device": device,
        "versions": versions,
        "load_before": _load_average(),
    }


def _load_average() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def run_suite(
    cases: list[Case],
    settings: Settings,
    out_dir: Path,
    *,
    device: str = "cpu",
    loading: bool = True,
    command: str = "",
    whole_model_cases: list | None = None,
    whole_model_settings: whole_model.WholeSettings | None = None,
    whole_model_impls: list[str] | None = None,
) -> dict[str, Any]:
    """Run every case (peak memory first, then timings), then loading, then the whole-model slices; write JSON +
    markdown; return the result."""
    start = time.perf_counter()
    result: dict[str, Any] = {"command": command, "settings": {**settings.__dict__}, "machine": _machine(device)}
    on_cpu = device == "cpu"
    if on_cpu:
        measure.return_freed_memory_to_the_os()
    peaks = []
    for case in cases:
        print(f"[peak memory] {case.name}", flush=True)
        peaks.append(peak_case(case, device))
    if on_cpu:
        measure.keep_freed_memory()
    result["cases"] = []
    for case, peak in zip(cases, peaks):
        print(f"[timing] {case.name}", flush=True)
        entry = bench_case(case, settings, device)
        entry["peak_bytes"] = peak
        if peak["base"] and peak["peft_lyco"] is not None:
            entry["ratios"]["peak"] = {
                f"ours/{p}": peak["peft_lyco"] / peak[p] for p in IMPLS if p != "peft_lyco" and peak[p]
            }
        result["cases"].append(entry)
        gc.collect()
    if loading:
        print("[bench] loading", flush=True)
        result["loading"] = run_loading(settings.loading_real_size, settings.loading_reps)
    if whole_model_cases:
        result["whole_model"] = whole_model.run_whole_model(
            whole_model_cases, whole_model_settings, device=device, impls=whole_model_impls
        )
    result["machine"]["load_after"] = _load_average()
    result["seconds"] = time.perf_counter() - start
    report.write(result, out_dir)
    return result


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep the console to progress lines while the suite runs: the libraries' per-layer notices (full-matrix LoKr,
    missing text-encoder keys, dtype casts) say nothing about the measurements."""
    loggers = [logging.getLogger(name) for name in ("peft_lyco", "diffusers", "transformers", "peft", "LyCORIS")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the issue's three cases, few rounds, tiny loading run")
    parser.add_argument("--cases", nargs="*", help="only these case names")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-loading", action="store_true", help="skip the SDXL loading/fuse part")
    parser.add_argument("--update-docs", action="store_true", help="write the tables into docs/performance.md")
    parser.add_argument("--no-whole-model", action="store_true", help="skip the whole-model slices")
    whole_model.add_arguments(parser, prefix="whole-model-")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    known = {case.name: case for case in case_lists.FULL + case_lists.TINY}
    if args.cases:
        unknown = sorted(set(args.cases) - set(known))
        if unknown:
            parser.error(f"unknown case(s) {unknown}; known: {sorted(known)}")
        cases = [known[name] for name in args.cases]
    else:
        cases = case_lists.QUICK if args.quick else case_lists.FULL
    whole_model_cases = []
    if not args.no_whole_model:
        try:
            whole_model_cases = whole_model.select_cases(
                args.whole_model_cases,
                quick=args.quick,
                tokens=args.whole_model_tokens,
                precisions=args.whole_model_precision,
            )
        except ValueError as error:
            parser.error(str(error))
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with _quiet():
        result = run_suite(
            cases,
            settings,
            args.out,
            device=args.device,
            loading=not args.no_loading,
            command=command.strip(),
            whole_model_cases=whole_model_cases,
            whole_model_settings=whole_model.settings_from(args, args.quick, prefix="whole-model-"),
            whole_model_impls=args.whole_model_impls,
        )
    table = report.markdown(result)
    print(table)
    if args.update_docs:
        docs = ROOT / "docs" / "performance.md"
        report.update_docs(docs, table)
        if "whole_model" in result:
            whole = whole_model_report.markdown(
                {**result["whole_model"], "command": result["command"], "machine": result["machine"]}
            )
            report.update_docs(docs, whole, whole_model_report.MARKERS)
    return result


if __name__ == "__main__":
    main()
