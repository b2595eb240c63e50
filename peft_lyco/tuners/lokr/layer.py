"""LoKr layer: its algorithm and how its ``lokr_*`` parameters start."""

from __future__ import annotations

import math

from torch import nn

from ...functional import LOKR
from ..layer import LycoLayer


class LoKrLayer(LycoLayer):
    """Linear or Conv2d with LoKr adapters (w1 full or low-rank; w2 full, low-rank or Tucker)."""

    algorithm = LOKR
    adapter_layer_names = (*LOKR.param_names, *LycoLayer.extra_param_names)

    def init_parameters(self, adapter_name: str, init_weights: bool | str) -> None:
        """LyCORIS (default): kaiming everywhere, w2_b or full w2 = 0. PEFT: w1 or w1_a = 0, rest kaiming."""
        params = self.factor_parameters(adapter_name)
        use_scalar = adapter_name in self.scalar
        zero = None
        if init_weights in (True, "lycoris") and not use_scalar:  # use_scalar: the scalar starts at 0 instead
            zero = "lokr_w2" if "lokr_w2" in params else "lokr_w2_b"
        elif init_weights == "peft" and not use_scalar:
            zero = "lokr_w1" if "lokr_w1" in params else "lokr_w1_a"
        for name, param in params.items():
            if name == zero:
                nn.init.zeros_(param)
            else:
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))
