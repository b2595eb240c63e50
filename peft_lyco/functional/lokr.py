"""LoKr ΔW: ``scale * kron(w1, w2)`` with either half full, low-rank, or (w2 only) Tucker."""

from __future__ import annotations

from typing import Optional

import torch

from .tucker import rebuild_tucker


def lokr_delta_weight(
    *,
    w1: Optional[torch.Tensor] = None,
    w1_a: Optional[torch.Tensor] = None,
    w1_b: Optional[torch.Tensor] = None,
    w2: Optional[torch.Tensor] = None,
    w2_a: Optional[torch.Tensor] = None,
    w2_b: Optional[torch.Tensor] = None,
    t2: Optional[torch.Tensor] = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """LoKr ΔW = ``scale * kron(w1, w2)``, scaled once.

    ``w1`` is ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``; ``w2`` is ``lokr_w2``, ``lokr_w2_a @ lokr_w2_b`` (flat convs give
    ``(out_k, in_n * prod(kernel))``) or the Tucker rebuild of ``lokr_t2`` (``lokr_w2_a`` then is ``(r, out_k)``).
    The result has ``w2``'s rank: 2-D for Linear and flat convs, ``(out, in, *kernel)`` for full or Tucker convs.
    """
    if w1 is None:
        if w1_a is None or w1_b is None:
            raise ValueError("LoKr needs lokr_w1 or both lokr_w1_a and lokr_w1_b")
        w1 = w1_a @ w1_b
    if w2 is None:
        if w2_a is None or w2_b is None:
            raise ValueError("LoKr needs lokr_w2 or both lokr_w2_a and lokr_w2_b")
        w2 = w2_a @ w2_b if t2 is None else rebuild_tucker(t2, w2_a, w2_b)
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    delta = torch.kron(w1, w2.contiguous())
    return delta * scale if scale != 1 else delta
