"""``LoHaConfig``: LyCORIS-exact LoHa as its own PEFT method type (``LYCO_LOHA``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..._registry import LYCO_LOHA
from ..config import LycoConfig


@dataclass
class LoHaConfig(LycoConfig):
    """LoHa: ``ΔW = (alpha/r) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``; with ``use_tucker`` kxk convs use Tucker cores.

    Parameters carry kohya/LyCORIS names and layouts (``hada_w1_a`` ... ``hada_t2``). Defaults follow PEFT
    (``r=8``, ``alpha=8``); see ``LycoConfig`` for every field.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LYCO_LOHA
