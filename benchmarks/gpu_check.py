"""The GPU check: what the CPU tests prove, measured on CUDA, in one table.

    python benchmarks/gpu_check.py                       # on a CUDA machine (a few minutes, most of it compiling)
    python benchmarks/gpu_check.py --out gpu_check.md    # also write the table
    python benchmarks/gpu_check.py --update-docs         # and put it into docs/performance.md
    python benchmarks/gpu_check.py --device cpu --smoke  # the same code paths at tiny sizes on CPU (tests run this)

Four parts, one row each:

* precision: every LoHa/LoKr layer mode (``benchmarks.modes``) in fp32, autocast bf16/fp16, bf16/fp16 bases with
  fp32 adapters, full bf16 and float8-stored bases, eager and ``torch.compile(fullgraph=True)``: the worst relative
  error of the output and every gradient against a float64 run, next to what plain autograd through
  ``op(x, W + ΣΔW)`` makes in the same precision (the fused op may not be worse than twice that), and the number of
  graph breaks (must be 0);
* parity: the LyCORIS parity cases against lycoris-lora on the device (output and factor gradients);
* summation: ``W + ΔW`` (``add_delta``) on the device bit for bit against the rule computed on CPU, in every dtype
  mix (the CUDA kernels take other shortcuts than the CPU ones), and merged vs unmerged outputs in fp16/bf16;
* step: one real-width training step (SDXL shapes) of peft_lyco against PEFT LoRA/LoHa/LoKr, lycoris-lora and the
  bare base layer: median time and ``torch.cuda.max_memory_allocated`` above the step's start;
* cache: repeated no-grad calls as sampling makes them, ours with and without the inference cache against PEFT LoRA
  unmerged and the base (bf16 base, autocast bf16); fails when the cached output is not the uncached one bit for bit.

Exits 0 when every row passes, 1 when one fails, 2 without CUDA (unless ``--device cpu``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the checkout's packages importable
    sys.path.insert(0, str(ROOT))

import peft
import torch
import torch._inductor.config as inductor_config

from benchmarks import cases as case_lists
from benchmarks import inference_cache as cache_bench
from benchmarks import measure, modes, report
from benchmarks.cases import Case
from benchmarks.implementations import Built, Holder, build
from benchmarks.run import _quiet

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
# worst relative error allowed at all, by the dtype the products run in
BOUNDS = {torch.float32: 1e-5, torch.bfloat16: 0.08, torch.float16: 0.01}
COMPILED_FP32_BOUND = 1e-4  # compiled code may sum in another order
PARITY_BOUND = 1e-4
DOCS_MARKERS = ("<!-- gpu-check:start -->", "<!-- gpu-check:end -->")
# the inference cache rows: SDXL's cross-attention keys (77 text tokens) and attention at 1024 and 4096 latent tokens
CACHE_SHAPES = [cache_bench.SHAPES[0], cache_bench.SHAPES[2], cache_bench.SHAPES[4]]
SMOKE_CACHE_SHAPE = cache_bench.Shape("tiny 64, 8 tok", 64, 64, 8)


@dataclass(frozen=True)
class Precision:
    """One precision setting: how the base weights are stored, the autocast dtype, whether all is bf16."""

    name: str
    compute: torch.dtype
    autocast: torch.dtype | None = None
    base: torch.dtype | None = None  # storage of the adapted layers' base weights
    everything: torch.dtype | None = None  # the whole network (adapters included) and the input

    def apply(self, net: torch.nn.Module) -> None:
        if self.everything is not None:
            net.to(self.everything)
        elif self.base is not None:
            modes.store_bases_in(net, self.base)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.everything) if self.everything is not None else x


PRECISIONS = [
    Precision("fp32", torch.float32),
    Precision("autocast bf16", torch.bfloat16, autocast=torch.bfloat16),
    Precision("autocast fp16", torch.float16, autocast=torch.float16),
    Precision("bf16 base, fp32 adapters, autocast bf16", torch.bfloat16, autocast=torch.bfloat16, base=torch.bfloat16),
    Precision("fp16 base, fp32 adapters, autocast fp16", torch.float16, autocast=torch.float16, base=torch.float16),
    Precision("full bf16", torch.bfloat16, everything=torch.bfloat16),
    Precision("fp8 e4m3fn base, autocast bf16", torch.bfloat16, autocast=torch.bfloat16, base=torch.float8_e4m3fn),
    Precision("fp8 e5m2 base, autocast bf16", torch.bfloat16, autocast=torch.bfloat16, base=torch.float8_e5m2),
    Precision("fp8 e4m3fn base, fp32 compute", torch.float32, base=torch.float8_e4m3fn),
]
SMOKE_PRECISIONS = [PRECISIONS[0], PRECISIONS[1], PRECISIONS[6]]


@dataclass(frozen=True)
class Row:
    """One line of the table: ``ok`` is None for rows that only report (timings)."""

    part: str
    case: str
    setting: str
    measured: str
    reference: str
    ok: bool | None


# ------------------------------------------------------------------------------------------------------- precision
def _autocast_forward(net: torch.nn.Module, precision: Precision, device: str) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.split(":")[0], dtype=precision.autocast, enabled=precision.autocast is not None):
            return net(x)

    return forward


def _graph_breaks(forward: Callable, x: torch.Tensor) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(forward)(x).graph_break_count


def precision_rows(device: str, *, width: int, precisions: list[Precision], backend: str, compiled: bool) -> list[Row]:
    rows = []
    for algorithm in ("loha", "lokr"):
        for precision in precisions:
            net = modes.adapted_net(algorithm, width=width).to(device)
            precision.apply(net)
            x = precision.input(modes.net_input(width, device=device))
            reference_net = copy.deepcopy(net).double()
            reference = modes.training_step(reference_net, reference_net, x.double())
            forward = _autocast_forward(net, precision, device)
            with modes.unfused(net):
                plain_error, _ = modes.max_relative_error(modes.training_step(net, forward, x), reference)
            variants = [("eager", forward)]
            if compiled:
                torch._dynamo.reset()
                variants.append((f"compiled ({backend})", torch.compile(forward, fullgraph=True, backend=backend)))
            for label, run in variants:
                try:
                    error, where = modes.max_relative_error(modes.training_step(net, run, x), reference)
                except Exception as failure:  # noqa: BLE001  (a compile failure is a row of the table, not the end)
                    rows.append(_failed("precision", algorithm, f"{precision.name}, {label}", failure))
                    continue
                bound = BOUNDS[precision.compute]
                if label != "eager" and precision.compute == torch.float32:
                    bound = COMPILED_FP32_BOUND
                ok = error <= max(2 * plain_error, 1e-6) and error < bound
                measured = f"{error:.2e} ({where})"
                if label != "eager":
                    breaks = _graph_breaks(forward, x)
                    ok = ok and breaks == 0
                    measured += f", {breaks} graph breaks"
                reference_text = f"plain autograd {plain_error:.2e}; bound {bound:g}"
                rows.append(Row("precision", algorithm, f"{precision.name}, {label}", measured, reference_text, ok))
    return rows


def _failed(part: str, case: str, setting: str, failure: Exception) -> Row:
    message = str(failure).strip().splitlines()[0][:120] if str(failure).strip() else ""
    return Row(part, case, setting, f"{type(failure).__name__}: {message}", "", False)


# ------------------------------------------------------------------------------------------------------- summation
def summation_rows(device: str) -> list[Row]:
    """``W + ΔW`` on the device against the rule computed independently on CPU (float64, then the summation dtype,
    then the result dtype) in every dtype mix, both signs, into a new buffer and inside ΔW's; then, per algorithm,
    merged against unmerged outputs on the device in the half precisions (bit-identical)."""
    from peft_lyco.functional import add_delta, add_delta_into

    failures, checked = [], 0
    for weight_dtype, delta_dtype, dtype in modes.SUMMATION_DTYPES:
        weight, delta = modes.summation_operands(weight_dtype, delta_dtype)
        weight, delta = weight.to(device), delta.to(device)
        for sign in (1, -1):
            expected = modes.summation_reference(weight, delta, sign, dtype)
            for into in (False, True):
                function = add_delta_into if into else add_delta
                differ = modes.differing_bits(function(weight, delta.clone(), sign, dtype=dtype), expected)
                checked += 1
                if differ:
                    failures.append(
                        f"{weight_dtype}+{delta_dtype}->{dtype} sign {sign}{' into' if into else ''}: {differ}"
                    )
    rows = [
        Row(
            "summation",
            "add_delta",
            f"{len(modes.SUMMATION_DTYPES)} dtype mixes x 2 signs x (new buffer, inside ΔW)",
            f"{checked - len(failures)} of {checked} bit-identical"
            + (f"; {'; '.join(failures[:3])}" if failures else ""),
            "float64 sum, rounded to the summation dtype, then to the result (on CPU)",
            not failures,
        )
    ]
    settings = {"full bf16": (BF16, BF16), "full fp16": (F16, F16), "bf16 base, fp32 adapters": (BF16, F32)}
    for algorithm in ("loha", "lokr"):
        found = []
        for name, (weight_dtype, adapter_dtype) in settings.items():
            net = modes.adapted_net(algorithm, adapters=("a",), rank_dropout=0.0).to(device=device, dtype=weight_dtype)
            for layer in modes.adapted_layers(net):
                for tensor in layer.adapter_parameters("a").values():
                    tensor.data = tensor.data.to(adapter_dtype)
            net.eval()
            x = modes.net_input(dtype=weight_dtype, device=device)
            with torch.no_grad():
                unmerged = net(x)
                for layer in modes.adapted_layers(net):
                    layer.merge()
                found.append((name, modes.differing_bits(net(x), unmerged.cpu())))
        rows.append(
            Row(
                "summation",
                algorithm,
                "merged vs unmerged output, " + ", ".join(found_name for found_name, _ in found),
                ", ".join(f"{differ} differ" for _, differ in found),
                "bit-identical",
                all(differ == 0 for _, differ in found),
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------------------- parity
def _named_factors(item: Built) -> dict[str, torch.Tensor]:
    module = item.module
    if hasattr(module, "adapter_parameters"):
        return module.adapter_parameters("default")
    return {name: p for name, p in module.named_parameters() if name.startswith(("hada_", "lokr_"))}


def parity_rows(device: str, cases: list[Case]) -> list[Row]:
    """peft_lyco against lycoris-lora on the same factors: output and factor gradients, relative to ours."""
    rows = []
    for case in cases:
        built = build(case, device)
        ours, theirs = built["peft_lyco"], built["lycoris"]
        if theirs.notes and any("layout differs" in note for note in theirs.notes):
            rows.append(Row("parity", case.name, "lycoris-lora", "layouts differ", "", None))
            continue
        torch.manual_seed(1)
        x = torch.randn(case.input_shape, device=device, dtype=case.torch_dtype)
        results = []
        for item in (ours, theirs):
            for tensor in item.trainable:
                tensor.grad = None
            out = item.module(x)
            out.float().square().sum().div(2).backward()
            results.append((out.detach(), {name: p.grad for name, p in _named_factors(item).items()}))
        (out_a, grads_a), (out_b, grads_b) = results
        errors = [(modes.relative_error(out_b, out_a), "output")]
        errors += [(modes.relative_error(grads_b[name], grad), name) for name, grad in grads_a.items()]
        error, where = max(errors)
        rows.append(
            Row(
                "parity",
                case.name,
                "vs lycoris-lora",
                f"{error:.2e} ({where})",
                f"bound {PARITY_BOUND:g}",
                error <= PARITY_BOUND,
            )
        )
    return rows


# ------------------------------------------------------------------------------------------------------------ step
def _peft_lora(case: Case, base: torch.nn.Module) -> Built:
    rank = min(case.rank, 64)  # full-matrix LoKr cases carry a huge nominal rank
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["layer"])
    model = peft.get_peft_model(Holder(copy.deepcopy(base)), config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Built(model, trainable, list(model.parameters()))


def step_rows(device: str, cases: list[Case], *, autocast: torch.dtype | None, warmup: int, reps: int) -> list[Row]:
    """Median training-step time and peak memory of each implementation on real-width layers."""
    rows = []
    device_type = device.split(":")[0]
    for case in cases:
        built = build(case, device)
        built["peft LoRA"] = _peft_lora(case, built["base"].module)
        torch.manual_seed(1)
        x = torch.randn(case.input_shape, device=device, dtype=case.torch_dtype, requires_grad=True)

        def step_of(item: Built, x: torch.Tensor = x) -> tuple[Callable[[], None], Callable[[], None]]:
            def reset() -> None:
                x.grad = None
                for tensor in item.trainable:
                    tensor.grad = None

            def step() -> None:
                with torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
                    out = item.module(x)
                out.float().square().mean().backward()

            return reset, step

        steps = {name: step_of(item) for name, item in built.items()}
        peaks = {name: measure.peak_step_bytes(*steps[name], device) for name in steps}
        times = measure.interleaved(steps, warmup, reps, device)
        ours = measure.median(times["peft_lyco"])
        setting = f"{case.dtype} base" + (f", autocast {str(autocast).removeprefix('torch.')}" if autocast else "")
        for name, values in times.items():
            seconds = measure.median(values)
            peak = peaks[name]
            memory = f", peak {peak / report.MB:.1f} MiB" if peak is not None else ""
            ratio = f"peft_lyco takes {ours / seconds:.2f}× this" if name != "peft_lyco" else ""
            rows.append(Row("step", case.name, f"{name}; {setting}", f"{seconds * 1e3:.2f} ms{memory}", ratio, None))
    return rows


# ------------------------------------------------------------------------------------------------- inference cache
def cache_rows(device: str, shapes: list, *, dtype: torch.dtype, autocast: torch.dtype | None, reps: int) -> list[Row]:
    """Repeated no-grad calls (sampling): ours with the inference cache and without, PEFT LoRA unmerged and the base;
    the row fails when the cached output is not the uncached one bit for bit."""
    rows = []
    setting = f"{str(dtype).removeprefix('torch.')} base" + (
        f", autocast {str(autocast).removeprefix('torch.')}" if autocast else ""
    )
    for shape in shapes:
        for algo in ("lokr", "loha"):
            result = cache_bench.measure_shape(shape, algo, dtype, 2, reps, device=device, autocast=autocast)
            times = ", ".join(
                f"{name.removesuffix(' ms')} {result[name]:.3f}" for name in result if name.endswith(" ms")
            )
            measured = f"{times} ms; cache {result['cache_mb']:.1f} MiB"
            reference = f"cached/LoRA {result['cached/lora']:.2f}×, uncached/LoRA {result['uncached/lora']:.2f}×"
            rows.append(Row("cache", f"{algo} {shape.name}", setting, measured, reference, bool(result["identical"])))
    return rows


# ----------------------------------------------------------------------------------------------------------- table
def markdown(rows: list[Row], header: str) -> str:
    lines = [header, "", "| part | case | setting | measured | reference | result |", "|---|---|---|---|---|---|"]
    for row in rows:
        result = "" if row.ok is None else ("ok" if row.ok else "**FAIL**")
        lines.append(f"| {row.part} | {row.case} | {row.setting} | {row.measured} | {row.reference} | {result} |")
    return "\n".join(lines) + "\n"


@contextmanager
def _exact_cuda_math() -> Iterator[None]:
    """No TF32 while errors are measured (cuDNN allows it for convolutions by default)."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return (
            f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, torch {torch.__version__}"
        )
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke run")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few settings: every code path, quickly")
    parser.add_argument("--backend", default=None, help="torch.compile backend (default inductor; aot_eager on CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) to this file")
    parser.add_argument("--update-docs", action="store_true", help="put the table into docs/performance.md")
    args = parser.parse_args(argv)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "gpu_check: CUDA is not available on this machine (torch.cuda.is_available() is False), so there is "
            "nothing to check. Run it on a CUDA machine, or `python benchmarks/gpu_check.py --device cpu --smoke` "
            "for a CPU run of the same code paths.",
            file=sys.stderr,
        )
        return 2
    backend = args.backend or ("inductor" if device.startswith("cuda") else "aot_eager")
    start = time.perf_counter()
    with _quiet(), inductor_config.patch(fallback_random=True):  # compiled rank dropout draws as eager does
        with _exact_cuda_math():
            rows = precision_rows(
                device,
                width=1 if args.smoke else 16,
                precisions=SMOKE_PRECISIONS if args.smoke else PRECISIONS,
                backend=backend,
                compiled=not args.no_compile,
            )
            rows += parity_rows(device, case_lists.TINY if args.smoke else case_lists.TINY + case_lists.HEADLINE)
            rows += summation_rows(device)
        if args.smoke:
            step_cases, autocast, warmup, reps = case_lists.TINY[:1], None, 1, 2
        else:
            step_cases = [dataclasses.replace(case, dtype="bfloat16") for case in case_lists.HEADLINE]
            autocast, warmup, reps = torch.bfloat16, 3, 10
        rows += step_rows(device, step_cases, autocast=autocast, warmup=warmup, reps=reps)
        if args.smoke:
            rows += cache_rows(device, [SMOKE_CACHE_SHAPE], dtype=torch.float32, autocast=None, reps=2)
        else:
            rows += cache_rows(device, CACHE_SHAPES, dtype=torch.bfloat16, autocast=torch.bfloat16, reps=20)
    failed = [row for row in rows if row.ok is False]
    command = "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (
        f"### GPU check\n\n`{command.strip()}` on {_machine(device)}, {time.perf_counter() - start:.0f} s: "
        f"{len(rows) - len(failed)} of {len(rows)} rows pass or report"
        + (f", **{len(failed)} fail**" if failed else "")
        + "."
    )
    table = markdown(rows, header)
    print(table)
    if args.out:
        report.write_atomic(args.out, table)
    if args.update_docs:
        report.update_docs(ROOT / "docs" / "performance.md", table, markers=DOCS_MARKERS)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
