"""LoKr layer: which ``lokr_*`` parameters a layout has, how they start, and the full-matrix scale rule."""

from __future__ import annotations

import math

from torch import nn

from ...functional import LOKR_PARAMS, LoKrLayout, lokr_layout
from ..layer import LycoLayer
from ..options import LayerSpec


class LoKrLayer(LycoLayer):
    """Linear or Conv2d with LoKr adapters (w1 full or low-rank; w2 full, low-rank or Tucker)."""

    adapter_layer_names = LOKR_PARAMS

    @classmethod
    def layout_for(cls, out_features: int, in_features: int, kernel: tuple[int, ...], spec: LayerSpec) -> LoKrLayout:
        return lokr_layout(out_features, in_features, kernel, spec.rank, **spec.options)

    @classmethod
    def layout_scale(cls, layout: LoKrLayout, spec: LayerSpec) -> float:
        """Both halves full: scale 1 whatever alpha says (LyCORIS/kohya); otherwise alpha / rank."""
        return 1.0 if layout.both_full else spec.alpha / spec.rank

    def init_parameters(self, adapter_name: str, init_weights: bool | str) -> None:
        """LyCORIS (default): kaiming everywhere, w2_b or full w2 = 0. PEFT: w1 or w1_a = 0, rest kaiming."""
        params = self.adapter_parameters(adapter_name)
        zero = None
        if init_weights in (True, "lycoris"):
            zero = "lokr_w2" if "lokr_w2" in params else "lokr_w2_b"
        elif init_weights == "peft":
            zero = "lokr_w1" if "lokr_w1" in params else "lokr_w1_a"
        for name, param in params.items():
            if name == zero:
                nn.init.zeros_(param)
            else:
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))
