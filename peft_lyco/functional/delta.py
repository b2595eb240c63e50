"""ΔW of one adapted module from its kohya-named tensors, and how a ΔW meets the base weight.

Layers, merging, conversion checks and benchmarks all go through these functions, so the scale is applied in one place
(``delta_weight``) and the summation dtype rule in one place (``add_delta``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .algorithm import Algorithm
from .loha import LOHA
from .lokr import LOKR

# Weights stored in these are storage only: the fused op and merging upcast them per call (sd-scripts' --fp8_base)
FLOAT8_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
)

ALGORITHMS: dict[str, Algorithm] = {algorithm.name: algorithm for algorithm in (LOHA, LOKR)}


def algorithm_for(names: Iterable[str]) -> Algorithm | None:
    """The algorithm whose kohya tensor names these are (a file's module), or ``None`` if none matches.

    The one place where tensor names decide the algorithm: the math takes the object this returns.
    """
    names = set(names)
    for algorithm in ALGORITHMS.values():
        if names & set(algorithm.param_names):
            return algorithm
    return None


def delta_weight(params: Mapping[str, torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """ΔW of one LoHa (``hada_*``) or LoKr (``lokr_*``) module given by kohya names, multiplied by ``scale`` once.

    The result is 2-D ``(out, in * prod(kernel))`` for Linear and flat convs, ``(out, in, *kernel)`` for Tucker and full
    conv factors; callers reshape it to the weight's shape.
    """
    algorithm = algorithm_for(params)
    if algorithm is None:
        raise ValueError(f"not a LoHa or LoKr parameter set: {sorted(params)}")
    return algorithm.delta(params, scale)


def summation_dtype(weight: torch.dtype, *others: torch.dtype) -> torch.dtype:
    """The dtype ``W + ΔW`` is summed in: at least float32, wide enough for every operand (a float8 weight is storage
    only and counts as float32; float8 does not promote)."""
    compute = torch.float32 if weight in FLOAT8_DTYPES else torch.promote_types(weight, torch.float32)
    for dtype in others:
        compute = torch.promote_types(compute, dtype)
    return compute


def add_delta(
    weight: torch.Tensor, delta: torch.Tensor, sign: int = 1, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``weight + sign * delta`` summed in at least float32 and cast once to ``dtype`` (default: the weight's).

    fp16/bf16 weights are never summed in their own precision, so merging and the fused forward agree bit for bit.
    """
    compute = summation_dtype(weight.dtype, delta.dtype)
    delta = delta.reshape(weight.shape).to(compute)
    total = weight.to(compute)
    total = total + delta if sign > 0 else total - delta
    return total.to(weight.dtype if dtype is None else dtype)


def add_delta_into(weight: torch.Tensor, delta: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """``add_delta(weight, delta, sign)`` before its final cast, summed inside ``delta`` (a temporary the caller gives
    up): the same bits in the summation dtype, without a second weight-sized buffer or an upcast copy of the weight.
    """
    compute = summation_dtype(weight.dtype, delta.dtype)
    delta = delta.reshape(weight.shape).to(compute)
    if weight.dtype in FLOAT8_DTYPES:  # upcast for this call only
        weight = weight.to(compute)
    return torch.add(weight, delta, out=delta) if sign > 0 else torch.sub(weight, delta, out=delta)


def rank_dropout_mask(
    out_features: int,
    p: float,
    rescale: bool,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """kohya/LyCORIS "rank" dropout: a Bernoulli keep-mask over the output rows of ΔW, one draw per call.

    With ``rescale`` kept rows are multiplied by ``1 / (1 - p)`` (sd-scripts); without it they are left as they are
    (LyCORIS' default).
    """
    keep = (torch.rand(out_features, device=device) > p).to(dtype)
    return keep / (1.0 - p) if rescale else keep
