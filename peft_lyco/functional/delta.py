"""ΔW of one adapted module from its kohya-named tensors, and how a ΔW meets the base weight.

Layers, merging, conversion checks and benchmarks all go through these functions, so the scale is applied in one place
(``delta_weight``) and the summation dtype rule in one place (``add_delta``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch

from .loha import loha_delta_weight
from .lokr import lokr_delta_weight

LOHA_PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARAMS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def delta_weight(params: Mapping[str, torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """ΔW of one LoHa (``hada_*``) or LoKr (``lokr_*``) module, multiplied by ``scale`` exactly once.

    The result is 2-D ``(out, in * prod(kernel))`` for Linear and flat convs, ``(out, in, *kernel)`` for Tucker and full
    conv factors; callers reshape it to the weight's shape.
    """
    if "hada_w1_a" in params:
        return loha_delta_weight(
            params["hada_w1_a"],
            params["hada_w1_b"],
            params["hada_w2_a"],
            params["hada_w2_b"],
            params.get("hada_t1"),
            params.get("hada_t2"),
            scale=scale,
        )
    if any(name in params for name in LOKR_PARAMS):
        return lokr_delta_weight(**{name[len("lokr_") :]: params.get(name) for name in LOKR_PARAMS}, scale=scale)
    raise ValueError(f"not a LoHa or LoKr parameter set: {sorted(params)}")


def add_delta(weight: torch.Tensor, delta: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """``weight + sign * delta`` summed in at least float32 and cast once to the weight's dtype.

    fp16/bf16 weights are never summed in their own precision, so merging and the fused forward agree bit for bit.
    """
    compute = torch.promote_types(torch.promote_types(weight.dtype, delta.dtype), torch.float32)
    delta = delta.reshape(weight.shape).to(compute)
    if weight.dtype == compute:
        return weight + delta if sign > 0 else weight - delta
    total = weight.to(compute)
    total = total + delta if sign > 0 else total - delta
    return total.to(weight.dtype)


def add_delta_into(weight: torch.Tensor, delta: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """``add_delta(weight, delta, sign)`` before its final cast, summed inside ``delta`` (a temporary the caller gives
    up): the same bits in the summation dtype, without a second weight-sized buffer or an upcast copy of the weight.
    """
    compute = torch.promote_types(torch.promote_types(weight.dtype, delta.dtype), torch.float32)
    delta = delta.reshape(weight.shape).to(compute)
    return torch.add(weight, delta, out=delta) if sign > 0 else torch.sub(weight, delta, out=delta)


def rank_dropout_mask(
    out_features: int,
    p: float,
    rescale: bool,
    *,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """kohya/LyCORIS "rank" dropout: a Bernoulli keep-mask over the output rows of ΔW, one draw per call.

    With ``rescale`` kept rows are multiplied by ``1 / (1 - p)`` (sd-scripts); without it they are left as they are
    (LyCORIS' default).
    """
    keep = (torch.rand(out_features, device=device) > p).to(dtype)
    return keep / (1.0 - p) if rescale else keep
