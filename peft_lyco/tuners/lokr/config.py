"""``LoKrConfig``: LyCORIS-exact LoKr as its own PEFT method type (``LYCO_LOKR``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..._registry import LYCO_LOKR
from ...functional import check_factor
from ..config import LycoConfig


@dataclass
class LoKrConfig(LycoConfig):
    """LoKr: ``ΔW = scale · kron(w1, w2)`` with LyCORIS' factorization, full-matrix fallback and scale rules.

    ``w2`` is full when ``r >= max(out_k, in_n) / 2`` (a warning is logged) or with ``full_matrix``; when both halves
    are full the scale is 1 and alpha is ignored, as LyCORIS and kohya save it.
    """

    factor: int = field(
        default=-1, metadata={"help": "Kronecker split: -1 gives the most balanced divisor pair, else the cap/factor."}
    )
    decompose_both: bool = field(
        default=False, metadata={"help": "Also factor w1 as lokr_w1_a @ lokr_w1_b when the rank allows it."}
    )
    full_matrix: bool = field(default=False, metadata={"help": "Train w2 (and w1) as full matrices (LyCORIS)."})
    unbalanced_factorization: bool = field(
        default=False, metadata={"help": "Put the larger output half in w1 (LyCORIS option; read from files)."}
    )

    layout_options: ClassVar[tuple[str, ...]] = (
        "use_tucker",
        "factor",
        "decompose_both",
        "full_matrix",
        "unbalanced_factorization",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_factor(self.factor)
        self.peft_type = LYCO_LOKR
