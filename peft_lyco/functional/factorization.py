"""Parameter layouts of LoHa and LoKr: which factors a layer gets and their exact shapes.

This is the single source of truth for shapes. Layers create their parameters from it, the converter validates
and infers files with it, and the full-matrix / decomposition decisions of LyCORIS live here and nowhere else.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from math import prod
from typing import Literal

logger = logging.getLogger(__name__)

Kernel = tuple[int, ...]
Shape = tuple[int, ...]


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with ``m <= n`` and ``m * n == dimension``, exactly as LyCORIS does.

    A positive ``factor`` that divides ``dimension`` gives ``(factor, dimension // factor)`` ordered smaller first
    (the ordering PEFT's copy lacks). Otherwise the most balanced divisor pair whose smaller part is at most
    ``factor`` is returned; a negative factor means no cap.
    """
    if not isinstance(dimension, int) or dimension <= 0:
        raise ValueError(f"factorization needs a positive integer dimension, got {dimension!r}")
    check_factor(factor)
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    cap = dimension if factor < 0 else factor
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > cap:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


def check_factor(factor: int) -> None:
    """Reject LoKr factors that have no meaning (0, or a negative other than the "no cap" value -1)."""
    if isinstance(factor, bool) or not isinstance(factor, int) or (factor <= 0 and factor != -1):
        raise ValueError(f"LoKr factor must be -1 (balanced) or a positive integer, got {factor!r}")


def check_rank(rank: int, what: str = "rank") -> None:
    """Reject ranks that are not positive integers."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"{what} must be a positive integer, got {rank!r}")


def check_alpha(alpha: float | None, what: str = "alpha") -> None:
    """Reject alphas that are not finite real numbers (``None`` is allowed: it means alpha = rank).

    An infinite or NaN alpha makes even a zero-initialised adapter output NaN (0 * inf), so it is refused up front.
    """
    if alpha is None:
        return
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"{what} must be a finite number or None, got {alpha!r}")
    if not math.isfinite(alpha):
        raise ValueError(f"{what} must be a finite number, got {alpha!r}")


def uses_tucker(kernel: Kernel, use_tucker: bool) -> bool:
    """Tucker cores only make sense for convolutions with a spatial kernel; 1x1 convs and Linears stay flat."""
    return bool(use_tucker) and any(k != 1 for k in kernel)


@dataclass(frozen=True)
class LoHaLayout:
    """Shapes of one LoHa adapter on one layer (``kernel`` is ``()`` for Linear)."""

    out_features: int
    in_features: int
    kernel: Kernel
    rank: int
    tucker: bool

    @property
    def mode(self) -> str:
        if not self.kernel:
            return "linear"
        return "tucker" if self.tucker else ("1x1" if prod(self.kernel) == 1 else "flat")

    @property
    def shapes(self) -> dict[str, Shape]:
        r, out, inn = self.rank, self.out_features, self.in_features
        if self.tucker:
            core = (r, r, *self.kernel)
            return {
                "hada_w1_a": (r, out),
                "hada_w1_b": (r, inn),
                "hada_w2_a": (r, out),
                "hada_w2_b": (r, inn),
                "hada_t1": core,
                "hada_t2": core,
            }
        flat_in = inn * prod(self.kernel)
        return {
            "hada_w1_a": (out, r),
            "hada_w1_b": (r, flat_in),
            "hada_w2_a": (out, r),
            "hada_w2_b": (r, flat_in),
        }


def loha_layout(out_features: int, in_features: int, kernel: Kernel, rank: int, use_tucker: bool) -> LoHaLayout:
    """LoHa parameter layout for a layer of weight shape ``(out, in, *kernel)``."""
    check_rank(rank)
    return LoHaLayout(out_features, in_features, tuple(kernel), rank, uses_tucker(kernel, use_tucker))


W2Mode = Literal["full", "lowrank", "tucker"]


@dataclass(frozen=True)
class LoKrLayout:
    """Shapes of one LoKr adapter: ``ΔW = kron(w1, w2)`` with ``w1`` (out_l, in_m) and ``w2`` (out_k, in_n, *kernel)."""

    out_l: int
    out_k: int
    in_m: int
    in_n: int
    kernel: Kernel
    rank: int
    w1_decomposed: bool
    w2_mode: W2Mode

    @property
    def both_full(self) -> bool:
        """Both Kronecker halves are full matrices: LyCORIS and kohya then use scale 1 and save alpha = rank."""
        return not self.w1_decomposed and self.w2_mode == "full"

    @property
    def mode(self) -> str:
        if self.w2_mode == "tucker":
            return "tucker"
        if not self.kernel:
            kind = "linear"
        else:
            kind = "1x1" if prod(self.kernel) == 1 else "flat"
        return f"{kind}-full" if self.w2_mode == "full" else kind

    @property
    def shapes(self) -> dict[str, Shape]:
        r = self.rank
        shapes: dict[str, Shape] = {}
        if self.w1_decomposed:
            shapes["lokr_w1_a"] = (self.out_l, r)
            shapes["lokr_w1_b"] = (r, self.in_m)
        else:
            shapes["lokr_w1"] = (self.out_l, self.in_m)
        if self.w2_mode == "full":
            shapes["lokr_w2"] = (self.out_k, self.in_n, *self.kernel)
        elif self.w2_mode == "tucker":
            shapes["lokr_w2_a"] = (r, self.out_k)
            shapes["lokr_w2_b"] = (r, self.in_n)
            shapes["lokr_t2"] = (r, r, *self.kernel)
        else:
            shapes["lokr_w2_a"] = (self.out_k, r)
            shapes["lokr_w2_b"] = (r, self.in_n * prod(self.kernel))
        return shapes


def lokr_layout(
    out_features: int,
    in_features: int,
    kernel: Kernel,
    rank: int,
    *,
    factor: int = -1,
    decompose_both: bool = False,
    use_tucker: bool = False,
    full_matrix: bool = False,
    unbalanced_factorization: bool = False,
    warn: bool = True,
) -> LoKrLayout:
    """LoKr parameter layout for a layer of weight shape ``(out, in, *kernel)``, following LyCORIS 4.1.3's rules.

    ``w2`` becomes a full matrix when ``rank >= max(out_k, in_n) / 2`` (logged, as LyCORIS and sd-scripts do) or when
    ``full_matrix`` is asked for; ``w1`` is low-rank only with ``decompose_both`` and ``rank < max(out_l, in_m) / 2``.
    """
    check_rank(rank)
    in_m, in_n = factorization(in_features, factor)
    out_l, out_k = factorization(out_features, factor)
    if unbalanced_factorization:
        out_l, out_k = out_k, out_l
    w1_decomposed = bool(decompose_both) and not full_matrix and rank < max(out_l, in_m) / 2
    if full_matrix or rank >= max(out_k, in_n) / 2:
        if not full_matrix and warn:
            _warn_full_matrix(rank, max(in_features, out_features), factor, bool(kernel))
        w2_mode: W2Mode = "full"
    elif uses_tucker(kernel, use_tucker):
        w2_mode = "tucker"
    else:
        w2_mode = "lowrank"
    return LoKrLayout(out_l, out_k, in_m, in_n, tuple(kernel), rank, w1_decomposed, w2_mode)


_warned_full_matrix: set[tuple[int, int, int, bool]] = set()


def _warn_full_matrix(rank: int, dim: int, factor: int, conv: bool) -> None:
    """Log the full-matrix fallback once per (rank, dim, factor), with sd-scripts' wording."""
    key = (rank, dim, factor, conv)
    if key in _warned_full_matrix:
        return
    _warned_full_matrix.add(key)
    suffix = " for Conv2d." if conv else "."
    logger.warning(
        "LoKr: lora_dim %d is large for dim=%d and factor=%d, using full matrix mode%s "
        "w2 is trained as a full matrix; where w1 is full too, the scale is 1 and alpha is ignored.",
        rank,
        dim,
        factor,
        suffix,
    )
