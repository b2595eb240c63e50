"""Adapted layers at real widths in the half precisions people train in, against PEFT LoRA in the same precision.

    python benchmarks/half_precision.py                 # every case and precision (a few minutes on 2 CPU cores)
    python benchmarks/half_precision.py --quick         # one Linear per algorithm, bf16 modes only
    python benchmarks/half_precision.py --profile CASE  # where one step of ours spends its time, per aten op

Precisions (``--precision``): ``autocast`` (bf16 base, float32 adapters, ``torch.autocast`` bf16: what diffusers and
sd-scripts do with ``--mixed_precision bf16``), ``bf16`` (base and adapters in bf16, no autocast: ``--full_bf16``),
``fp16`` (likewise in float16), ``fp32`` (the reference precision, to show it is unchanged).

Each row is the median over rounds of the per-round ratio of ours' training step (forward + backward) to PEFT
LoRA's at the same rank, both run back to back in every round (``measure.interleaved``), with the spread (min-max of
the per-round ratios): the machine may be shared, so only the ratios mean anything.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import warnings
from dataclasses import dataclass
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

PRECISIONS = {
    # name: (base dtype, adapter dtype, autocast dtype)
    "autocast": (torch.bfloat16, torch.float32, torch.bfloat16),
    "bf16": (torch.bfloat16, torch.bfloat16, None),
    "fp16": (torch.float16, torch.float16, None),
    "fp32": (torch.float32, torch.float32, None),
}


@dataclass(frozen=True)
class Case:
    name: str
    algo: str
    in_features: int
    out_features: int
    rank: int
    tokens: int = 0  # Linear rows
    side: int = 0  # 3x3 conv map side
    factor: int = -1

    @property
    def conv(self) -> bool:
        return self.side > 0


CASES = [
    Case("loha-lin1280", "loha", 1280, 1280, 16, tokens=2048),
    Case("lokr-lin1280", "lokr", 1280, 1280, 16, tokens=256, factor=8),
    Case("lokr-lin1280x5120", "lokr", 1280, 5120, 16, tokens=1024, factor=8),
    Case("loha-lin1280x5120-4096", "loha", 1280, 5120, 8, tokens=4096),
    Case("lokr-conv640-32", "lokr", 640, 640, 8, side=32, factor=8),
    Case("loha-conv640-32", "loha", 640, 640, 8, side=32),
]
QUICK = [CASES[0], CASES[2]]


def _base(case: Case, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.Conv2d(case.in_features, case.out_features, 3, padding=1) if case.conv else None
    layer = layer or nn.Linear(case.in_features, case.out_features)
    return layer.to(dtype).requires_grad_(False)


def _layers(case: Case, precision: str) -> dict[str, tuple[nn.Module, list[torch.Tensor]]]:
    """Ours and PEFT LoRA (same rank) on copies of one frozen base, adapters in the precision's adapter dtype."""
    base_dtype, adapter_dtype, _ = PRECISIONS[precision]
    base = _base(case, base_dtype)
    common = {"r": case.rank, "alpha": case.rank, "init_weights": False, "target_modules": ["layer"]}
    config = LoHaConfig(**common) if case.algo == "loha" else LoKrConfig(factor=case.factor, **common)
    ours = peft.inject_adapter_in_model(config, Holder(copy.deepcopy(base))).layer
    lora_config = peft.LoraConfig(r=case.rank, lora_alpha=case.rank, target_modules=["layer"], init_lora_weights=False)
    lora = peft.get_peft_model(Holder(copy.deepcopy(base)), lora_config).base_model.model.layer
    built = {}
    for name, layer in (("ours", ours), ("lora", lora)):
        params = [p for p in layer.parameters() if p.requires_grad]
        with torch.no_grad():
            for p in params:
                p.data = p.data.to(adapter_dtype).normal_(std=0.05)
        built[name] = (layer, params)
    return built


def _steps(case: Case, precision: str):
    base_dtype, _, autocast = PRECISIONS[precision]
    built = _layers(case, precision)
    torch.manual_seed(1)
    shape = (1, case.in_features, case.side, case.side) if case.conv else (1, case.tokens, case.in_features)
    x = torch.randn(shape, dtype=torch.float32 if autocast else base_dtype, requires_grad=True)
    context = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast else contextlib.nullcontext
    with torch.no_grad(), context():
        grad_out = torch.randn_like(built["ours"][0](x))
    runs = {}
    for name, (layer, params) in built.items():

        def reset(params=params):
            x.grad = None
            for p in params:
                p.grad = None

        def step(layer=layer):
            with context():
                out = layer(x)
            out.backward(grad_out.to(out.dtype))

        runs[name] = (reset, step)
    return runs


def bench(case: Case, precision: str, warmup: int, reps: int) -> dict:
    times = measure.interleaved(_steps(case, precision), warmup, reps, "cpu")
    ratios = [a / b for a, b in zip(times["ours"], times["lora"])]
    return {
        "case": case.name,
        "precision": precision,
        "ratio": statistics.median(ratios),
        "spread": (min(ratios), max(ratios)),
        "ours_ms": 1e3 * statistics.median(times["ours"]),
        "lora_ms": 1e3 * statistics.median(times["lora"]),
    }


def profile(case: Case, precision: str, rows: int = 18) -> str:
    reset, step = _steps(case, precision)["ours"]
    for _ in range(2):
        reset()
        step()
    reset()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--precision", nargs="*", choices=list(PRECISIONS), default=None)
    parser.add_argument("--case", nargs="*", default=None, help="case names (default: all, or the quick ones)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--profile", metavar="CASE")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    peft_lyco.register()
    by_name = {case.name: case for case in CASES}
    precisions = args.precision or (["autocast", "bf16"] if args.quick else list(PRECISIONS))
    if args.profile:
        for precision in precisions:
            print(f"== {args.profile} {precision}")
            print(profile(by_name[args.profile], precision))
        return
    cases = [by_name[n] for n in args.case] if args.case else (QUICK if args.quick else CASES)
    reps = args.reps or (5 if args.quick else 9)
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}; ours / PEFT LoRA step, median (min-max)")
    for case in cases:
        for precision in precisions:
            row = bench(case, precision, warmup=2, reps=reps)
            low, high = row["spread"]
            print(
                f"{row['case']:24s} {precision:9s} {row['ratio']:.3f} ({low:.3f}-{high:.3f})"
                f"   ours {row['ours_ms']:.1f} ms, LoRA {row['lora_ms']:.1f} ms",
                flush=True,
            )


if __name__ == "__main__":
    main()
