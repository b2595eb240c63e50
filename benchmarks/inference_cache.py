"""Sampling-style repeated no-grad calls of one adapted layer: ours with and without the inference cache against PEFT
LoRA unmerged (same rank) and the frozen base, at the token counts a 1024² SDXL sample runs (77 text tokens for the
cross-attention keys/values, 1024 and 4096 latent tokens), batch 2 (classifier-free guidance).

Every round calls each implementation once, in a rotating order (``measure.interleaved``); the first rounds are
dropped (the cache's first call builds its entry). Ratios are medians of per-round ratios; ``--repeat`` runs the whole
measurement again and the table gives the median ratio over repeats with its spread (min–max).

    PYTHONPATH=. python -m benchmarks.inference_cache --quick        # about 1 minute on 2 CPU cores
    PYTHONPATH=. python -m benchmarks.inference_cache --repeat 3     # the table in docs/performance.md
    PYTHONPATH=. python -m benchmarks.inference_cache --slice sdxl-attn1280-32 --slice-tokens 256   # a whole slice

"Ours, uncached" runs the layer in training mode under ``no_grad`` (training mode bypasses the cache; with no dropout
configured it is the same no-grad op the layer ran before the cache existed).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
from dataclasses import dataclass

import peft
import torch
from torch import nn

import peft_lyco
from peft_lyco import LoHaConfig, LoKrConfig
from peft_lyco.tuners.inference_cache import inference_cache, inference_cache_info

from . import measure
from .implementations import Holder


@dataclass(frozen=True)
class Shape:
    name: str
    in_features: int
    out_features: int
    tokens: int


SHAPES = [
    Shape("xattn-k 2048→1280, 77 tok", 2048, 1280, 77),
    Shape("attn 1280, 77 tok", 1280, 1280, 77),
    Shape("attn 1280, 1024 tok", 1280, 1280, 1024),
    Shape("attn 640, 4096 tok", 640, 640, 4096),
    Shape("attn 1280, 4096 tok", 1280, 1280, 4096),
]
QUICK_SHAPES = [SHAPES[1], SHAPES[2], SHAPES[3]]


def _implementations(shape: Shape, algo: str, dtype: torch.dtype, device: str) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = nn.Linear(shape.in_features, shape.out_features).to(device=device, dtype=dtype).requires_grad_(False)
    common = {"r": 16, "alpha": 16, "init_weights": False, "target_modules": ["layer"]}
    config = LoHaConfig(**common) if algo == "loha" else LoKrConfig(factor=8, **common)
    ours = peft.inject_adapter_in_model(config, Holder(copy.deepcopy(base))).requires_grad_(False)
    uncached = copy.deepcopy(ours)
    lora = peft.get_peft_model(
        Holder(copy.deepcopy(base)), peft.LoraConfig(r=16, lora_alpha=16, target_modules=["layer"])
    ).requires_grad_(False)
    return {
        "base": base.eval(),
        "lora": lora.eval(),
        "ours uncached": uncached.train(),  # training mode: the cache is bypassed
        "ours cached": ours.eval(),
    }


def measure_shape(
    shape: Shape,
    algo: str,
    dtype: torch.dtype,
    warmup: int,
    reps: int,
    device: str = "cpu",
    autocast: torch.dtype | None = None,
) -> dict[str, float]:
    """Per-round-median ratios of one interleaved run, median milliseconds, the cache's bytes for the layer, and
    whether the cached output equals the uncached one bit for bit (``identical``, 1.0 or 0.0)."""
    impls = _implementations(shape, algo, dtype, device)
    x = torch.randn(2, shape.tokens, shape.in_features, dtype=dtype, device=device)
    device_type = device.split(":")[0]

    def call(module: nn.Module):
        def run() -> None:
            with torch.no_grad(), torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
                module(x)

        return (lambda: None, run)

    def output(name: str) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
            return impls[name](x)

    with inference_cache(1 << 40):
        identical = torch.equal(output("ours cached"), output("ours uncached")) and torch.equal(
            output("ours cached"), output("ours uncached")
        )
        times = measure.interleaved({n: call(m) for n, m in impls.items()}, warmup, reps, device)
        held = inference_cache_info().used
    ratio = measure.paired_ratio
    return {
        "uncached/lora": ratio(times["ours uncached"], times["lora"]),
        "cached/lora": ratio(times["ours cached"], times["lora"]),
        "uncached/base": ratio(times["ours uncached"], times["base"]),
        "cached/base": ratio(times["ours cached"], times["base"]),
        "lora/base": ratio(times["lora"], times["base"]),
        **{f"{name} ms": 1e3 * measure.median(t) for name, t in times.items()},
        "base_ms": 1e3 * measure.median(times["base"]),
        "cache_mb": held / 2**20,
        "identical": float(identical),
    }


def slice_sampling(case_name: str, tokens: int | None, steps: int, reps: int, max_rows: int) -> str:
    """A whole-model slice (``benchmarks.slices``) sampled ``steps`` times per run after an in-place touch of every
    factor: base, PEFT LoRA, and ours uncached, cached, and cached with ``max_rows``; per-round ratios to LoRA and the
    bytes the cache held."""
    from benchmarks.slice_impls import build_implementations, forward_fn
    from benchmarks.slices import build_slice, known_cases

    case = known_cases()[case_name]
    case = case.with_tokens(tokens) if tokens else case
    piece = build_slice(case, "cpu")
    built = build_implementations(piece, ["base", "lora", *(f"ours-{algo}" for algo in case.algos)])
    held: dict[str, int] = {}

    for item in built.values():
        item.module.eval()

    def run_of(name: str, item, budget: int = 0, rows: int | None = None):
        forward = forward_fn(piece, item)

        def reset() -> None:
            with torch.no_grad():
                for tensor in item.trainable:
                    tensor.mul_(1.0)  # an optimizer step: new versions, the cache rebuilds on the first call

        def run() -> None:
            cache = inference_cache(budget, max_rows=rows) if budget else contextlib.nullcontext()
            with torch.no_grad(), cache:
                for _ in range(steps):
                    forward()
                held[name] = inference_cache_info().used

        return reset, run

    runs = {"base": run_of("base", built["base"]), "lora": run_of("lora", built["lora"])}
    for algo in case.algos:
        item = built[f"ours-{algo}"]
        runs[f"ours {algo}"] = run_of(f"ours {algo}", item)
        runs[f"ours {algo} cached"] = run_of(f"ours {algo} cached", item, 1 << 40)
        runs[f"ours {algo} cached, max_rows={max_rows}"] = run_of(
            f"ours {algo} cached, max_rows={max_rows}", item, 1 << 40, max_rows
        )
    times = measure.interleaved(runs, 0, reps, "cpu")
    lines = [
        f"{case.name} at {case.tokens} tokens, {steps} no-grad calls per run, {reps} interleaved rounds",
        "",
        "| run | s per run | / LoRA | cache MiB |",
        "|---|---|---|---|",
    ]
    for name, values in times.items():
        ratios = [a / b for a, b in zip(values, times["lora"])]
        lines.append(
            f"| {name} | {statistics.median(values):.2f} | {_cell([statistics.median(ratios)])} "
            f"({min(ratios):.2f}–{max(ratios):.2f}) | {held.get(name, 0) / 2**20:.0f} |"
        )
    return "\n".join(lines)


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}×"
    return f"{statistics.median(values):.2f}× ({min(values):.2f}–{max(values):.2f})"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="three shapes, LoKr, float32, few rounds")
    parser.add_argument("--repeat", type=int, default=1, help="run each measurement this many times (spread)")
    parser.add_argument("--algos", nargs="*", default=["lokr", "loha"])
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    parser.add_argument("--tokens", nargs="*", type=int, help="only the shapes with these token counts")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine two threads wait on each other in every small op)",
    )
    parser.add_argument("--slice", help="instead: sample a whole-model slice (e.g. sdxl-attn1280-32)")
    parser.add_argument("--slice-tokens", type=int, help="the slice's latent tokens (default: its own)")
    parser.add_argument("--slice-steps", type=int, default=10, help="no-grad calls per sampling run")
    parser.add_argument("--max-rows", type=int, default=77, help="the slice's max_rows variant")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.slice:
        table = slice_sampling(args.slice, args.slice_tokens, args.slice_steps, max(args.repeat, 3), args.max_rows)
        print(table)
        return table
    peft_lyco.register()
    shapes, algos, dtypes = SHAPES, args.algos, args.dtypes
    warmup, reps = 2, 9
    if args.quick:
        shapes, algos, dtypes, warmup, reps = QUICK_SHAPES, ["lokr"], ["float32"], 1, 5
    if args.tokens:
        shapes = [shape for shape in shapes if shape.tokens in args.tokens]
    keys = ["uncached/lora", "cached/lora", "uncached/base", "cached/base", "lora/base"]
    header = (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of per-round ratios, "
        f"{reps} rounds after {warmup} warm-up, median (min–max) over {args.repeat} repeat(s)"
    )
    lines = [
        header,
        "",
        "| layer | algo | dtype | base ms | cache MB | " + " | ".join(keys) + " |",
        "|---|---|---|---|---|" + "---|" * len(keys),
    ]
    for dtype_name in dtypes:
        for algo in algos:
            for shape in shapes:
                runs = [
                    measure_shape(shape, algo, getattr(torch, dtype_name), warmup, reps) for _ in range(args.repeat)
                ]
                if not all(run["identical"] for run in runs):
                    raise AssertionError(f"{shape.name} {algo} {dtype_name}: cached output differs from uncached")
                cells = [_cell([run[k] for run in runs]) for k in keys]
                base_ms = statistics.median(run["base_ms"] for run in runs)
                lines.append(
                    f"| {shape.name} | {algo} | {dtype_name} | {base_ms:.1f} | {runs[0]['cache_mb']:.1f} | "
                    + " | ".join(cells)
                    + " |"
                )
                print(lines[-1], flush=True)
    table = "\n".join(lines)
    print()
    print(table)
    return table


if __name__ == "__main__":
    main()
