"""LoHa layer: which ``hada_*`` parameters a layout has and how they start."""

from __future__ import annotations

import math

from torch import nn

from ...functional import LOHA
from ..layer import LycoLayer


class LoHaLayer(LycoLayer):
    """Linear or Conv2d with LoHa adapters (flat, 1x1, or Tucker for kxk convs)."""

    algorithm = LOHA
    adapter_layer_names = (*LOHA.param_names, *LycoLayer.extra_param_names)

    def init_parameters(self, adapter_name: str, init_weights: bool | str) -> None:
        """LyCORIS (default): w1_a, t1, t2 ~ N(0, 0.1), w?_b ~ N(0, 1), w2_a = 0. PEFT: kaiming, w2_b = 0."""
        params = self.factor_parameters(adapter_name)
        use_scalar = adapter_name in self.scalar
        if init_weights in (True, "lycoris"):
            for name, param in params.items():
                if name == "hada_w2_a" and not use_scalar:
                    nn.init.zeros_(param)
                elif name in ("hada_w1_b", "hada_w2_b"):
                    nn.init.normal_(param, std=1.0)
                else:
                    nn.init.normal_(param, std=0.1)
            return
        for name, param in params.items():
            if init_weights == "peft" and name == "hada_w2_b" and not use_scalar:
                nn.init.zeros_(param)
            else:
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))
