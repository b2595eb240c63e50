"""One adapted Linear's training step (forward + backward) against PEFT LoRA at the same rank, interleaved and paired:
where the per-call Python overhead and the backward's ΔW rebuild show, at small and mid sizes.

    python benchmarks/layer_overhead.py                       # the default sizes, 3 repeats of 60 paired rounds
    python benchmarks/layer_overhead.py --sizes 320x77 --profile lokr   # also cProfile ours' LoKr step
    python benchmarks/layer_overhead.py --routes      # also each ∂L/∂x route forced: checks the cost model's pick

Each repeat builds the layers afresh and reports, per implementation, the median over rounds of the per-round ratio
to PEFT LoRA's step (``measure.paired_ratio``); the spread is the range of those medians over the repeats.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import statistics
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the checkout's packages importable
    sys.path.insert(0, str(ROOT))

import peft
import torch
from torch import nn

import peft_lyco
from benchmarks import measure
from benchmarks.implementations import Holder
from peft_lyco import LoHaConfig, LoKrConfig
from peft_lyco.functional import structured

DEFAULT_SIZES = ("320x77", "1280x256", "1280x1024")


def build(width: int, rank: int, factor: int) -> dict[str, nn.Module]:
    """PEFT LoRA (the reference), ours LoKr and LoHa on copies of one frozen Linear, all with nonzero factors."""
    peft_lyco.register()
    torch.manual_seed(0)
    base = Holder(nn.Linear(width, width)).requires_grad_(False)
    configs = {
        "lora": peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["layer"], init_lora_weights=False),
        "lokr": LoKrConfig(r=rank, alpha=rank, factor=factor, init_weights=False, target_modules=["layer"]),
        "loha": LoHaConfig(r=rank, alpha=rank, init_weights=False, target_modules=["layer"]),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {name: peft.get_peft_model(copy.deepcopy(base), config) for name, config in configs.items()}
    return {name: model.train() for name, model in models.items()}


def _step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    trainable = [p for p in model.parameters() if p.requires_grad]

    def reset() -> None:
        x.grad = None
        for p in trainable:
            p.grad = None

    def step() -> None:
        model(x).backward(grad)

    return reset, step


def _forced(run, rebuild_macs: int):
    """``run`` with the cost model's rebuild cost set to ``rebuild_macs`` for its duration (0: always rebuild)."""
    reset, step = run

    def forced() -> None:
        saved = structured.REBUILD_MACS_PER_WEIGHT
        structured.REBUILD_MACS_PER_WEIGHT = rebuild_macs
        try:
            step()
        finally:
            structured.REBUILD_MACS_PER_WEIGHT = saved

    return reset, forced


def run_size(width: int, tokens: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """Per implementation, the paired median ratio to LoRA of each repeat."""
    ratios: dict[str, list[float]] = {"lokr": [], "loha": [], "lora_ms": []}
    for _ in range(args.repeats):
        models = build(width, args.rank, args.factor)
        x = torch.randn(args.batch, tokens, width, requires_grad=True)
        grad = torch.randn(args.batch, tokens, width)
        runs = {name: _step(model, x, grad) for name, model in models.items()}
        if args.routes:  # each adapter's ∂L/∂x forced through its route, then through the rebuilt weight
            for name in ("lokr", "loha"):
                runs[f"{name}-routed"] = _forced(runs[name], 10**12)
                runs[f"{name}-rebuilt"] = _forced(runs[name], 0)
        times = measure.interleaved(runs, args.warmup, args.rounds, "cpu")
        for name in runs:
            if name != "lora":
                ratios.setdefault(name, []).append(measure.paired_ratio(times[name], times["lora"]))
        ratios["lora_ms"].append(1e3 * measure.median(times["lora"]))
    return ratios


def profile(width: int, tokens: int, name: str, args: argparse.Namespace) -> str:
    model = build(width, args.rank, args.factor)[name]
    x = torch.randn(args.batch, tokens, width, requires_grad=True)
    reset, step = _step(model, x, torch.randn(args.batch, tokens, width))
    for _ in range(10):
        reset()
        step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(100):
        reset()
        step()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(20)
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="*", default=list(DEFAULT_SIZES), help="WIDTHxTOKENS (square Linear)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--factor", type=int, default=8, help="LoKr factor")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--routes", action="store_true", help="also time each adapter with ∂L/∂x forced routed / rebuilt (cost model)"
    )
    parser.add_argument("--profile", choices=("lora", "lokr", "loha"), help="print a cProfile of this step too")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    measure.keep_freed_memory()  # as run.py's timings: weight-sized temporaries are reused, not page-faulted afresh
    print(f"threads {torch.get_num_threads()}, rank {args.rank}, LoKr factor {args.factor}, batch {args.batch}")
    print("| size | LoRA step (ms) | LoKr / LoRA | LoHa / LoRA |")
    print("|---|---|---|---|")
    for size in args.sizes:
        width, tokens = (int(v) for v in size.split("x"))
        ratios = run_size(width, tokens, args)

        def cell(values: list[float], fmt: str = "{:.3f}") -> str:
            middle = fmt.format(statistics.median(values))
            return f"{middle} ({fmt.format(min(values))}–{fmt.format(max(values))})"

        print(f"| {size} | {cell(ratios['lora_ms'], '{:.2f}')} | {cell(ratios['lokr'])} | {cell(ratios['loha'])} |")
        for name in sorted(set(ratios) - {"lora_ms", "lokr", "loha"}):
            cells = [cell(ratios[name]), ""] if name.startswith("lokr") else ["", cell(ratios[name])]
            print(f"| {size} {name.split('-')[1]} ∂L/∂x | | {cells[0]} | {cells[1]} |")
        if args.profile:
            print(profile(width, tokens, args.profile, args))


if __name__ == "__main__":
    main()
