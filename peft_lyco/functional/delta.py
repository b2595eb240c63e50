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

# fp16/bf16: elementwise arithmetic in these runs in float32 and rounds once (``_sum`` relies on it)
HALF_DTYPES = (torch.float16, torch.bfloat16)

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
    """``weight + sign * delta`` summed in ``summation_dtype`` (at least float32) and rounded once to ``dtype``
    (default: the weight's), as a new tensor.

    This is the one summation rule of the package: the fused forward, the weight rebuilt in its backward, merging,
    unmerging and conversion all sum through it, so merged and unmerged layers agree bit for bit. fp16/bf16 weights
    are never summed in their own precision; how the two roundings are carried out is ``_sum``'s business.
    """
    return _sum(weight, delta, sign, weight.dtype if dtype is None else dtype, reuse=False)


def add_delta_into(
    weight: torch.Tensor, delta: torch.Tensor, sign: int = 1, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``add_delta(weight, delta, sign, dtype=dtype)``, bit for bit, summed inside ``delta`` where its dtype allows (a
    temporary the caller gives up: its contents are undefined afterwards), without a second weight-sized buffer."""
    return _sum(weight, delta, sign, weight.dtype if dtype is None else dtype, reuse=True)


def _sum(weight: torch.Tensor, delta: torch.Tensor, sign: int, dtype: torch.dtype, *, reuse: bool) -> torch.Tensor:
    """``(W.to(S) ± ΔW.to(S)).to(dtype)`` with ``S = summation_dtype(W, ΔW)``, in as few weight-sized passes as give
    exactly those bits:

    * one dtype throughout (``W``, ``ΔW`` and the result all fp16, all bf16, ...): one elementwise add in that dtype.
      PyTorch computes fp16/bf16 elementwise arithmetic in float32 and rounds the result once, on CPU and CUDA alike,
      which is the same two roundings as the float32 sum followed by the cast, with no float32 buffer and no casts;
    * otherwise on CUDA: one add whose result is stored in ``dtype`` (the kernel upcasts each element, sums in ``S``
      and rounds on store);
    * otherwise (CPU): the sum in ``S`` (inside ``delta`` when it is in ``S``), then one cast. The CPU kernels would
      upcast a mixed-dtype operand into a temporary anyway, and a result dtype other than ``S`` costs two more.

    A float8 weight is first upcast for this call to ``delta``'s dtype where that is fp16/bf16 (exact: every float8
    value is an fp16 and a bf16 value), else to ``S``.
    """
    delta = delta.reshape(weight.shape)
    compute = summation_dtype(weight.dtype, delta.dtype)
    if weight.dtype in FLOAT8_DTYPES:
        weight = weight.to(delta.dtype if delta.dtype in HALF_DTYPES else compute)
    add = torch.add if sign > 0 else torch.sub
    if weight.dtype == delta.dtype == dtype:
        return add(weight, delta, out=delta) if reuse else add(weight, delta)
    if weight.is_cuda:
        out = delta if reuse and delta.dtype == dtype else torch.empty_like(weight, dtype=dtype)
        return add(weight, delta, out=out)
    if reuse and delta.dtype == compute:
        return add(weight, delta, out=delta).to(dtype)
    return add(weight.to(compute), delta.to(compute)).to(dtype)


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
