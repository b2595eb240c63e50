"""How much of ours' training step on the whole-model slices is the forward's ``W + ΣΔW`` build.

    python benchmarks/forward_build.py                               # the default whole-model cases
    python benchmarks/forward_build.py --cases sdxl-res1280-32 --reps 5

The fused op's forward runs ``op(x, W + ΣΔW)``, bit for bit the merged layer's, so a training step builds ``W + ΣΔW``
once per adapted layer (``peft_lyco.functional.adapted.inference_weight``): weight-sized work LoRA does not have. This
script times those calls inside real training steps of the slices (the function is wrapped for the timed steps only)
and counts the ΔW the backward rebuilds for the input gradient, next to the steps of the frozen base, PEFT LoRA and
ours, so the whole-model report's ratios to LoRA can be read against it. Rounds are interleaved; medians.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the checkout's packages importable
    sys.path.insert(0, str(ROOT))

import torch

from benchmarks.slice_impls import build_implementations
from benchmarks.slices import SliceCase, build_slice
from benchmarks.whole_model import _grad_out, _step, select_cases
from peft_lyco.functional import adapted


@dataclass
class Tally:
    """What the wrapped functions saw during one step."""

    build_seconds: float = 0.0
    builds: int = 0
    backward_rebuilds: int = 0


@contextlib.contextmanager
def tallied(tally: Tally) -> Iterator[None]:
    """Within the block, every forward ``W + ΣΔW`` build is timed into ``tally`` and every ΔW the backward rebuilds
    for the input gradient is counted."""
    build, rebuild = adapted.inference_weight, adapted._rebuilt_delta

    def timed_build(*args: Any, **kwargs: Any) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return build(*args, **kwargs)
        finally:
            tally.build_seconds += time.perf_counter() - start
            tally.builds += 1

    def counted_rebuild(*args: Any, **kwargs: Any) -> Any:
        tally.backward_rebuilds += 1
        return rebuild(*args, **kwargs)

    adapted.inference_weight, adapted._rebuilt_delta = timed_build, counted_rebuild
    try:
        yield
    finally:
        adapted.inference_weight, adapted._rebuilt_delta = build, rebuild


def measure_case(case: SliceCase, reps: int, device: str = "cpu") -> dict[str, Any]:
    """Per implementation (base, lora, ours-*): median step ms; for ours also the median forward build ms per step,
    the builds per step and the backward rebuilds per step. One warm-up round, then ``reps`` interleaved rounds."""
    piece = build_slice(case, device)
    names = ["base", "lora", *(f"ours-{algo}" for algo in case.algos)]
    built = build_implementations(piece, names)
    steps: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
        name: _step(piece, item, _grad_out(piece, item)) for name, item in built.items()
    }
    seconds: dict[str, list[float]] = {name: [] for name in names}
    tallies: dict[str, list[Tally]] = {name: [] for name in names}
    for round_index in range(reps + 1):
        for name in names:
            reset, step = steps[name]
            reset()
            tally = Tally()
            with tallied(tally):
                start = time.perf_counter()
                step()
                elapsed = time.perf_counter() - start
            if round_index:
                seconds[name].append(elapsed)
                tallies[name].append(tally)
    result: dict[str, Any] = {"case": case.name, "layers": len(piece.targets)}
    for name in names:
        entry = {"step_ms": 1000 * statistics.median(seconds[name])}
        if name.startswith("ours-"):
            entry["build_ms"] = 1000 * statistics.median(t.build_seconds for t in tallies[name])
            entry["builds"] = tallies[name][-1].builds
            entry["backward_rebuilds"] = tallies[name][-1].backward_rebuilds
        result[name] = entry
    return result


def markdown(results: list[dict[str, Any]]) -> str:
    """One row per case and algorithm: steps of base, LoRA and ours, ours above LoRA, and the build's share of it."""
    lines = [
        "| case | algorithm | base ms | LoRA ms | ours ms | ours / LoRA | ours − LoRA ms | builds ms (layers) | rebuilds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        base, lora = result["base"]["step_ms"], result["lora"]["step_ms"]
        for name in (key for key in result if key.startswith("ours-")):
            ours = result[name]
            lines.append(
                f"| {result['case']} | {name[len('ours-') :]} | {base:.0f} | {lora:.0f} | {ours['step_ms']:.0f} | "
                f"{ours['step_ms'] / lora:.2f}× | {ours['step_ms'] - lora:+.0f} | {ours['build_ms']:.0f} "
                f"({ours['builds']}) | {ours['backward_rebuilds']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", help="whole-model case names (default: the full list)")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    results = []
    for case in select_cases(args.cases, quick=False, tokens=None, precisions=None):
        results.append(measure_case(case, args.reps, args.device))
        print(markdown(results[-1:]).splitlines()[-1], flush=True)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
