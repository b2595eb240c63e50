"""Whole-model slices (SDXL transformer and ResNet blocks, Anima DiT blocks at real widths) adapted by PEFT LoRA,
peft_lyco LoKr/LoHa, PEFT's built-in LoKr/LoHa and lycoris-lora, measured in one process, interleaved.

    python benchmarks/whole_model.py                          # every default case, fp32 and bf16
    python benchmarks/whole_model.py --cases sdxl-attn1280-32 --impls lora ours-lokr ours-loha
    python benchmarks/whole_model.py --tokens 256 --reps 3    # smaller token counts / fewer rounds
    python benchmarks/whole_model.py --device cuda --all      # on a GPU (peak = torch.cuda.max_memory_allocated),
                                                              # with the 4096-token Anima and full-bf16 cases
    python benchmarks/whole_model.py --sample-only            # only the sampling (no-grad denoiser calls) part

Per case, training: the step time (forward + backward of the slice, input requiring grad) of every implementation
relative to PEFT LoRA's, as the median and range of per-round ratios; the activation bytes autograd holds for
backward; the peak memory of one step. Sampling: ``--sample-steps`` no-grad forwards of the slice in eval mode with
the adapter unmerged, as a sampler calls the denoiser, after an in-place touch of every factor (what an optimizer
step does, so a cache keyed on tensor versions has to rebuild once per sampling run), against PEFT LoRA unmerged
and the frozen base. Writes ``whole_model.json`` and ``whole_model.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the checkout's packages importable
    sys.path.insert(0, str(ROOT))

import torch

from benchmarks import measure
from benchmarks.slice_impls import LIBRARIES, Adapted, build_implementations, forward_fn, implementation_names
from benchmarks.slices import EXTRA, FULL, PRECISIONS, QUICK, Slice, SliceCase, build_slice, known_cases
from peft_lyco import inference_cache

REFERENCE = "lora"
CACHE_BUDGET = 1 << 40  # the "+cache" sampling runs cache every adapted layer of the slice


@dataclass(frozen=True)
class WholeSettings:
    """Rounds of the training-step and sampling measurements."""

    mode: str
    warmup: int
    reps: int
    sample_steps: int
    sample_warmup: int
    sample_reps: int
    train: bool = True
    sample: bool = True


FULL_SETTINGS = WholeSettings("full", warmup=1, reps=4, sample_steps=20, sample_warmup=0, sample_reps=2)
QUICK_SETTINGS = WholeSettings("quick", warmup=0, reps=2, sample_steps=2, sample_warmup=0, sample_reps=1)


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of per-round values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def per_round_ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    return [a / b for a, b in zip(numerator, denominator)]


# ------------------------------------------------------------------------------------------------------ training
def _grad_out(piece: Slice, item: Adapted) -> torch.Tensor:
    torch.manual_seed(2)
    with torch.no_grad():
        out = forward_fn(piece, item)()
    return torch.randn_like(out)


def _step(piece: Slice, item: Adapted, grad_out: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """(reset, step): reset clears the gradients outside the timed region; step is forward + backward."""
    forward = forward_fn(piece, item)
    x = piece.inputs["x"]

    def reset() -> None:
        x.grad = None
        for tensor in item.trainable:
            tensor.grad = None

    def step() -> None:
        forward().backward(grad_out)

    return reset, step


def held_for_backward(piece: Slice, item: Adapted) -> dict[str, int]:
    """Bytes of the distinct storages autograd keeps between the slice's forward and its backward.

    ``activations``: storages that are neither a parameter (frozen base or adapter) nor a slice input, i.e. what
    training a network of such blocks accumulates per block until backward; ``total`` counts everything once.
    """
    held_anyway = {
        t.untyped_storage().data_ptr() for t in [*piece.module.parameters(), *item.trainable, *piece.inputs.values()]
    }
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward_fn(piece, item)()
    del out
    return {
        "total": sum(storages.values()),
        "activations": sum(n for ptr, n in storages.items() if ptr not in held_anyway),
        "tensors": len(storages),
    }


def output_differences(piece: Slice, built: dict[str, Adapted]) -> dict[str, float]:
    """``max|ours − peer| / max|ours − base|`` per peer of the same algorithm (same factors where layouts agree)."""
    with torch.no_grad():
        outs = {name: forward_fn(piece, item)().float() for name, item in built.items()}
    diffs = {}
    for algo in piece.case.algos:
        ours = outs.get(f"ours-{algo}")
        if ours is None:
            continue
        effect = (ours - outs["base"]).abs().max().item() if "base" in outs else 1.0
        for library in LIBRARIES[1:]:
            peer = outs.get(f"{library}-{algo}")
            if peer is not None:
                diffs[f"{library}-{algo}"] = (ours - peer).abs().max().item() / max(effect, 1e-30)
    return diffs


def train_case(case: SliceCase, settings: WholeSettings, device: str, names: list[str] | None = None) -> dict[str, Any]:
    """Peak memory first, then activations, then interleaved timings. On CPU glibc returns freed blocks to the OS
    from before the case is built until the peaks are taken, so the resident set follows live tensors."""
    on_cpu = device == "cpu"
    if on_cpu:
        measure.return_freed_memory_to_the_os()
    piece = build_slice(case, device)
    built = build_implementations(piece, names)
    grad_outs = {name: _grad_out(piece, item) for name, item in built.items()}
    steps = {name: _step(piece, item, grad_outs[name]) for name, item in built.items()}
    peaks = {name: measure.peak_step_bytes(*steps[name], device) for name in built}
    if on_cpu:
        measure.keep_freed_memory()
    held = {name: held_for_backward(piece, item) for name, item in built.items()}
    differences = output_differences(piece, built)
    times = measure.interleaved(steps, settings.warmup, settings.reps, device)
    entry: dict[str, Any] = {
        "case": case.as_dict(),
        "targets": len(piece.targets),
        "conv_targets": len(piece.conv_targets),
        "trainable": {name: sum(t.numel() for t in item.trainable) for name, item in built.items()},
        "step_seconds": {name: statistics.median(t) for name, t in times.items()},
        "step_seconds_all": times,
        "held_bytes": held,
        "peak_bytes": peaks,
        "output_difference": differences,
        "notes": {name: item.notes for name, item in built.items() if item.notes},
    }
    if REFERENCE in times:
        entry["step_vs_lora"] = {
            name: spread(per_round_ratios(t, times[REFERENCE])) for name, t in times.items() if name != REFERENCE
        }
    del built, steps, piece
    gc.collect()
    return entry


# ------------------------------------------------------------------------------------------------------ sampling
def _sampling_run(
    piece: Slice, item: Adapted, steps: int, cache_budget: int = 0
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(reset, run): reset touches every factor in place (an optimizer step: new tensor versions, same values);
    run is ``steps`` no-grad forwards of the slice in eval mode, inside ``peft_lyco.inference_cache(cache_budget)``
    when a budget is given (as the trainers sample: built on the first call, freed after the last)."""
    forward = forward_fn(piece, item)

    def reset() -> None:
        with torch.no_grad():
            for tensor in item.trainable:
                tensor.mul_(1.0)

    def run() -> None:
        with torch.no_grad(), inference_cache(cache_budget) if cache_budget else contextlib.nullcontext():
            for _ in range(steps):
                forward()

    return reset, run


def sample_case(
    case: SliceCase, settings: WholeSettings, device: str, names: list[str] | None = None
) -> dict[str, Any]:
    """Seconds of ``sample_steps`` no-grad calls per implementation (default: base, LoRA and ours), interleaved."""
    piece = build_slice(case, device)
    names = names or ["base", REFERENCE] + [f"ours-{algo}" for algo in case.algos]
    built = build_implementations(piece, names)
    for item in built.values():
        item.module.eval()
    runs = {name: _sampling_run(piece, item, settings.sample_steps) for name, item in built.items()}
    for name in [n for n in built if n.startswith("ours-")]:  # the same module with the inference cache on
        runs[f"{name}+cache"] = _sampling_run(piece, built[name], settings.sample_steps, CACHE_BUDGET)
    times = measure.interleaved(runs, settings.sample_warmup, settings.sample_reps, device)
    entry: dict[str, Any] = {
        "case": case.as_dict(),
        "steps": settings.sample_steps,
        "run_seconds": {name: statistics.median(t) for name, t in times.items()},
        "run_seconds_all": times,
    }
    for reference in ("base", REFERENCE):
        if reference in times:
            entry[f"vs_{reference}"] = {
                name: spread(per_round_ratios(t, times[reference])) for name, t in times.items() if name != reference
            }
    del built, runs, piece
    gc.collect()
    return entry


# ------------------------------------------------------------------------------------------------------ the run
def run_whole_model(
    cases: list[SliceCase],
    settings: WholeSettings,
    *,
    device: str = "cpu",
    impls: list[str] | None = None,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
    after_case: Callable[[dict[str, Any]], None] = lambda partial: None,
) -> dict[str, Any]:
    """Every case's training and sampling measurements; ``impls`` restricts the implementations (``base`` and
    ``lora`` are always kept, they are the references). ``after_case`` gets the result so far after every case (a
    long run writes it, so an interruption keeps what was measured)."""
    start = time.perf_counter()
    result: dict[str, Any] = {"settings": {**settings.__dict__}, "device": device, "train": [], "sample": []}
    for case in cases:
        names = _names(case, impls)
        if settings.train:
            log(f"[whole-model train] {case.name}")
            result["train"].append(train_case(case, settings, device, names))
        if settings.sample:
            log(f"[whole-model sample] {case.name}")
            sample_names = [n for n in names if n in ("base", REFERENCE) or n.startswith("ours-")]
            result["sample"].append(sample_case(case, settings, device, sample_names))
        result["seconds"] = time.perf_counter() - start
        after_case(result)
    result["seconds"] = time.perf_counter() - start
    return result


def _names(case: SliceCase, impls: list[str] | None) -> list[str]:
    every = implementation_names(case)
    if not impls:
        return every
    return [name for name in every if name in ("base", REFERENCE) or name in impls]


def select_cases(
    names: list[str] | None,
    *,
    quick: bool,
    tokens: int | None,
    precisions: list[str] | None,
    every: bool = False,
) -> list[SliceCase]:
    """The cases named (default: the full or quick list; ``every``: the full list and the extra cases), resized to
    ``tokens`` and filtered by precision."""
    known = known_cases()
    if every:
        cases = FULL + EXTRA
    elif names:
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise ValueError(f"unknown whole-model case(s) {unknown}; known: {sorted(known)}")
        cases = [known[name] for name in names]
    else:
        cases = list(QUICK if quick else FULL)
    if precisions:
        cases = [case for case in cases if case.precision in precisions]
    if tokens:
        cases = [case.with_tokens(tokens) for case in cases]
    return cases


def add_arguments(parser: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """The whole-model options (``prefix`` keeps them apart when another script carries them)."""
    p = prefix
    parser.add_argument(f"--{p}cases", nargs="*", help="whole-model case names (default: the full list)")
    parser.add_argument(
        f"--{p}impls", nargs="*", help="implementations besides base and lora, e.g. ours-lokr peft-loha"
    )
    parser.add_argument(f"--{p}tokens", type=int, help="latent tokens (ResNet: pixels) of every case; a square number")
    parser.add_argument(f"--{p}precision", nargs="*", choices=PRECISIONS, help="only cases in these precisions")
    parser.add_argument(f"--{p}reps", type=int, help="timed rounds (default 4; quick 2)")
    parser.add_argument(f"--{p}sample-steps", type=int, help="no-grad calls per sampling run (default 20)")


def settings_from(args: argparse.Namespace, quick: bool, *, prefix: str = "") -> WholeSettings:
    p = prefix.replace("-", "_")
    settings = QUICK_SETTINGS if quick else FULL_SETTINGS
    reps, steps = getattr(args, f"{p}reps"), getattr(args, f"{p}sample_steps")
    if reps:
        settings = replace(settings, reps=reps, sample_reps=max(1, min(reps, settings.sample_reps)))
    if steps:
        settings = replace(settings, sample_steps=steps)
    return settings


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks import whole_model_report
    from benchmarks.report import update_docs
    from benchmarks.run import _load_average, _machine, _quiet

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="one tiny-width smoke case, few rounds")
    parser.add_argument(
        "--all", action="store_true", help="the default cases and the extra ones (4096-token Anima, bf16-full)"
    )
    parser.add_argument("--train-only", action="store_true", help="skip the sampling part")
    parser.add_argument("--sample-only", action="store_true", help="skip the training-step part")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--update-docs", action="store_true", help="write the tables into docs/performance.md")
    args = parser.parse_args(argv)
    if args.train_only and args.sample_only:
        parser.error("--train-only and --sample-only exclude each other")
    try:
        cases = select_cases(
            args.cases, quick=args.quick, tokens=args.tokens, precisions=args.precision, every=args.all
        )
    except ValueError as error:
        parser.error(str(error))
    settings = replace(settings_from(args, args.quick), train=not args.sample_only, sample=not args.train_only)
    command = "python benchmarks/whole_model.py " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = _machine(args.device)
    args.out.mkdir(parents=True, exist_ok=True)

    def write(partial: dict[str, Any]) -> None:
        machine["load_after"] = _load_average()
        partial.update(command=command.strip(), machine=machine)
        whole_model_report.write(partial, args.out)

    with _quiet():
        result = run_whole_model(cases, settings, device=args.device, impls=args.impls, after_case=write)
    write(result)
    table = whole_model_report.markdown(result)
    print(table)
    if args.update_docs:
        update_docs(ROOT / "docs" / "performance.md", table, whole_model_report.MARKERS)
    return result


if __name__ == "__main__":
    main()
