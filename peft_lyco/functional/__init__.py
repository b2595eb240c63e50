"""Pure tensor math for LoHa and LoKr: shapes, ΔW, and how ΔW meets the base weight. No modules, no PEFT."""

from .algorithm import Algorithm
from .delta import (
    ALGORITHMS,
    add_delta,
    add_delta_into,
    algorithm_for,
    delta_weight,
    rank_dropout_mask,
)
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
from .loha import LOHA, LOHA_PARAMS, loha_delta_weight
from .lokr import LOKR, LOKR_PARAMS, lokr_delta_weight
from .term import DeltaTerm
from .tucker import rebuild_tucker

__all__ = [
    "ALGORITHMS",
    "LOHA",
    "LOHA_PARAMS",
    "LOKR",
    "LOKR_PARAMS",
    "Algorithm",
    "DeltaTerm",
    "LoHaLayout",
    "LoKrLayout",
    "add_delta",
    "add_delta_into",
    "algorithm_for",
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
