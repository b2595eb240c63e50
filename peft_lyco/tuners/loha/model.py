"""``LoHaModel``: the PEFT tuner for ``LoHaConfig``."""

from __future__ import annotations

from ..model import LycoTuner
from .layer import LoHaLayer


class LoHaModel(LycoTuner):
    """Injects ``LoHaLayer``s into the modules a ``LoHaConfig`` targets; parameters start with ``hada_``."""

    prefix = "hada_"
    tuner_layer_cls = LoHaLayer
