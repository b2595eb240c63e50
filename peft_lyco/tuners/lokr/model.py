"""``LoKrModel``: the PEFT tuner for ``LoKrConfig``."""

from __future__ import annotations

from ..model import LycoTuner
from .layer import LoKrLayer


class LoKrModel(LycoTuner):
    """Injects ``LoKrLayer``s into the modules a ``LoKrConfig`` targets; parameters start with ``lokr_``."""

    prefix = "lokr_"
    tuner_layer_cls = LoKrLayer
