"""Every LoHa/LoKr layer mode in small networks, for the compile, precision and quantized-base checks.

The CPU tests and ``benchmarks/gpu_check.py`` build the same networks, so what the GPU check reports on CUDA is what
the tests prove on CPU. ``width`` scales every layer (tests use 1, the GPU check a real width).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import inject_adapter_in_model
from torch import nn

import peft_lyco
from peft_lyco import LoHaConfig, LoKrConfig, LycoConfig
from peft_lyco.functional.delta import FLOAT8_DTYPES


class ModeNet(nn.Module):
    """Convolutions (flat, Tucker, grouped) on an ``(N, 8w, 6, 6)`` map, then Linears over its 36 pixels as tokens.

    ``forward`` takes an image-like input and returns ``(N, 36, 32w)`` tokens; ``tokens`` varies the map side (the
    token count, as aspect-ratio bucketing does).
    """

    def __init__(self, width: int = 1):
        super().__init__()
        c, d = 8 * width, 16 * width
        self.conv = nn.Conv2d(c, d, 3, padding=1)
        self.conv_tucker = nn.Conv2d(d, d, 3, padding=1)
        self.conv_grouped = nn.Conv2d(d, d, 3, padding=1, groups=2)
        self.lin_a = nn.Linear(d, 2 * d)
        self.lin_b = nn.Linear(2 * d, 2 * d)
        self.lin_c = nn.Linear(2 * d, 2 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.conv(x))
        h = h + self.conv_tucker(h)
        h = h + self.conv_grouped(h)
        tokens = h.flatten(2).transpose(1, 2)
        tokens = torch.nn.functional.gelu(self.lin_a(tokens))
        return self.lin_c(tokens + self.lin_b(tokens))


def net_input(width: int = 1, side: int = 6, batch: int = 2, dtype: torch.dtype = torch.float32, device="cpu"):
    """A random input for ``ModeNet(width)`` on a ``side``² map (``side²`` tokens for the Linears)."""
    return torch.randn(batch, 8 * width, side, side, dtype=dtype, device=device)


TARGETS = ["conv", "conv_tucker", "conv_grouped", "lin_a", "lin_b", "lin_c"]

# algorithm -> (config kwargs shared by both adapters, per-module layout overrides)
ALGORITHMS: dict[str, tuple[type[LycoConfig], dict, dict[str, dict]]] = {
    "loha": (
        LoHaConfig,
        {"r": 2, "alpha": 1.0},
        {"conv_tucker": {"use_tucker": True}, "conv_grouped": {"use_tucker": True}},
    ),
    "lokr": (
        LoKrConfig,
        {"r": 2, "alpha": 1.0, "factor": 4},
        {
            "conv_tucker": {"use_tucker": True},
            "lin_b": {"decompose_both": True},
            "lin_c": {"full_matrix": True},
        },
    ),
}


def adapter_config(algorithm: str, *, rank_dropout: float = 0.0) -> LycoConfig:
    """The config of one adapter on every ``ModeNet`` layer, each layer in its own mode."""
    cls, kwargs, options = ALGORITHMS[algorithm]
    return cls(
        target_modules=list(TARGETS),
        option_pattern=copy.deepcopy(options),
        rank_dropout=rank_dropout,
        init_weights=False,
        **kwargs,
    )


def adapted_net(
    algorithm: str,
    *,
    width: int = 1,
    adapters: Sequence[str] = ("a", "b"),
    rank_dropout: float = 0.3,
    seed: int = 0,
    base: nn.Module | None = None,
) -> nn.Module:
    """``ModeNet`` (or ``base``) with one adapter per name, all active; the second and later adapters use rank
    dropout. Factors are random (not zero) so every gradient is exercised."""
    peft_lyco.register()
    torch.manual_seed(seed)
    net = base if base is not None else ModeNet(width)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for i, name in enumerate(adapters):
            config = adapter_config(algorithm, rank_dropout=rank_dropout if i else 0.0)
            inject_adapter_in_model(config, net, adapter_name=name)
    for layer in adapted_layers(net):
        layer.set_adapter(list(adapters))
        with torch.no_grad():  # a ΔW about as large as the weights' own entries
            for params in (layer.adapter_parameters(name) for name in adapters):
                for tensor in params.values():
                    tensor.mul_(0.5)
    return net


def adapted_layers(net: nn.Module) -> Iterator[peft_lyco.LycoLayer]:
    return (module for module in net.modules() if isinstance(module, peft_lyco.LycoLayer))


def store_bases_in(net: nn.Module, dtype: torch.dtype) -> None:
    """Store every adapted layer's base weight in ``dtype`` (float8 as sd-scripts' ``--fp8_base``), frozen; biases
    and adapters keep theirs."""
    for layer in adapted_layers(net):
        weight = layer.get_base_layer().weight
        weight.data = weight.data.to(dtype)
        weight.requires_grad_(False)


@contextlib.contextmanager
def unfused(net: nn.Module) -> Iterator[None]:
    """Run every adapted layer of ``net`` by plain autograd through ``op(x, W + Σ ΔW)`` (ΔW with the same rank-dropout
    draws), the textbook formula the fused op must match in every precision. A float8 weight is upcast first."""
    layers = list(adapted_layers(net))
    for layer in layers:
        layer.forward = _plain_forward(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _plain_forward(layer: peft_lyco.LycoLayer) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        base = layer.get_base_layer()
        weight = base.weight
        stored = x.dtype if weight.dtype in FLOAT8_DTYPES else weight.dtype
        if weight.dtype in FLOAT8_DTYPES:
            weight = weight.to(x.dtype)
        total = weight
        for adapter in layer.active_adapters:
            total = total + layer.get_delta_weight(adapter, apply_rank_dropout=layer.training)
        total = total.to(stored)
        bias = base.bias
        if isinstance(base, nn.Linear):
            return F.linear(x, total, bias)
        return base._conv_forward(x, total, bias)

    return forward


def trainable(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in net.named_parameters() if p.requires_grad}


@dataclass(frozen=True)
class StepResult:
    """The output and the gradients (input first, then every trainable tensor by name) of one training step."""

    output: torch.Tensor
    grads: dict[str, torch.Tensor]


def training_step(
    net: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, seed: int = 0
) -> StepResult:
    """Forward (after seeding the RNG, so rank dropout draws the same masks) and backward of ``sum(out²)/2``."""
    for p in net.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = forward(x)
    out.float().square().sum().div(2).backward()
    grads = {"input": x.grad}
    grads.update({name: p.grad for name, p in trainable(net).items()})
    return StepResult(out.detach(), grads)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``max|value − reference| / max|reference|`` in float64."""
    value, reference = value.double(), reference.double()
    return ((value - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def max_relative_error(result: StepResult, reference: StepResult) -> tuple[float, str]:
    """The worst relative error over the output and every gradient, with what it was found in."""
    worst = (relative_error(result.output, reference.output), "output")
    for name, grad in reference.grads.items():
        found = result.grads[name]
        if grad is None or found is None:
            if (grad is None) != (found is None):
                return float("inf"), f"{name} (gradient missing on one side)"
            continue
        worst = max(worst, (relative_error(found, grad), name))
    return worst


# ------------------------------------------------------------------------------------------- the summation rule
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
BITS = {F64: torch.int64, F32: torch.int32, F16: torch.int16, BF16: torch.int16}
# (weight, ΔW, result) dtypes people meet: full half precision, half bases with float32 adapters (also under autocast
# to the other half dtype), float32 bases under autocast, float64, float8 bases with half or float32 adapters
SUMMATION_DTYPES = [
    (BF16, BF16, BF16),
    (F16, F16, F16),
    (BF16, F32, BF16),
    (F16, F32, F16),
    (BF16, BF16, F32),
    (F32, F32, BF16),
    (F32, BF16, BF16),
    (F32, F16, F16),
    (F32, F32, F32),
    (F64, F32, F64),
    (BF16, F16, BF16),
    *[
        (fp8, delta, result)
        for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2)
        for delta, result in [(BF16, BF16), (F16, F16), (F32, BF16), (F32, F32)]
    ],
]


def summation_operands(
    weight_dtype: torch.dtype, delta_dtype: torch.dtype, n: int = 4099
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and ΔW (on CPU; odd length for vectorized kernels' tails) that stress both roundings of the summation
    rule: wide exponent ranges (float32 sums that are inexact), ΔW that puts the float32 sum exactly halfway between
    two values of a half-precision weight's dtype or a hair beside it, subnormals, overflow, signed zeros, inf, NaN."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, generator=g, dtype=F64) * torch.exp2(torch.randint(-20, 20, (n,), generator=g).double())
    d = torch.randn(n, generator=g, dtype=F64) * torch.exp2(torch.randint(-40, 10, (n,), generator=g).double())
    if weight_dtype in FLOAT8_DTYPES:
        w = w.clamp(-200, 200)
    w = w.to(weight_dtype)
    if weight_dtype in (F16, BF16) and delta_dtype == F32:
        ulp = {F16: 2.0**-10, BF16: 2.0**-7}[weight_dtype]
        quarter = n // 4
        step = w[:quarter].double().abs().clamp_min(1e-3) * ulp
        offsets = torch.tensor([1.0, 1.0 + 2**-20, 1.0 - 2**-20, 3.0], dtype=F64).repeat(quarter // 4 + 1)
        d[:quarter] = step / 2 * offsets[:quarter]
    specials = [0.0, -0.0, 0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-42, 6e-8, 60000.0, 3e38]
    partners = [-0.0, 0.0, 0.0, -0.0, 1.0, float("inf"), 1.0, 1e-40, 1e-42, 6e-8, 60000.0, 3e38]
    if weight_dtype not in FLOAT8_DTYPES:
        w[-len(specials) :] = torch.tensor(specials).to(weight_dtype)
    d[-len(partners) :] = torch.tensor(partners, dtype=F64)
    return w, d.to(delta_dtype)


def summation_reference(weight: torch.Tensor, delta: torch.Tensor, sign: int, dtype: torch.dtype) -> torch.Tensor:
    """The rule's result computed independently (on CPU): ``W ± ΔW`` summed in float64, rounded to the summation dtype,
    then to ``dtype``. Rounded to float32 this is the correctly rounded float32 sum (53 >= 2 * 24 + 2 bits: double
    rounding through float64 is innocuous for addition)."""
    from peft_lyco.functional.delta import summation_dtype

    exact = weight.cpu().double() + sign * delta.cpu().reshape(weight.shape).double()
    return exact.to(summation_dtype(weight.dtype, delta.dtype)).to(dtype)


def differing_bits(got: torch.Tensor, expected: torch.Tensor) -> int:
    """How many elements of ``got`` differ from ``expected`` in their bits (NaN matches any NaN); -1 on a dtype or
    shape mismatch."""
    got = got.cpu()
    if got.dtype != expected.dtype or got.shape != expected.shape:
        return -1
    nan = expected.isnan()
    bits = BITS[got.dtype]
    differ = (got.view(bits) != expected.view(bits)) & ~nan
    return int(differ.sum()) + int((got.isnan() != nan).sum())
