"""Pure tensor math for LoHa and LoKr: shapes, ΔW, and how ΔW meets the base weight. No modules, no PEFT."""

from .delta import LOHA_PARAMS, LOKR_PARAMS, add_delta, add_delta_into, delta_weight, rank_dropout_mask
from .factorization import (
    LoHaLayout,
    LoKrLayout,
    check_alpha,
    check_factor,
    check_rank,
    factorization,
    loha_layout,
    lokr_layout,
    uses_tucker,
)
from .loha import loha_delta_weight
from .lokr import lokr_delta_weight
from .tucker import rebuild_tucker

__all__ = [
    "LOHA_PARAMS",
    "LOKR_PARAMS",
    "LoHaLayout",
    "LoKrLayout",
    "add_delta",
    "add_delta_into",
    "check_alpha",
    "check_factor",
    "check_rank",
    "delta_weight",
    "factorization",
    "loha_delta_weight",
    "loha_layout",
    "lokr_delta_weight",
    "lokr_layout",
    "rank_dropout_mask",
    "rebuild_tucker",
    "uses_tucker",
]
