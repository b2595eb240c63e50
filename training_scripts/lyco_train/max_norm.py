"""sd-scripts' ``--scale_weight_norms``: after every optimizer step, each adapted module whose ΔW (with its alpha/dim
scale) has a Frobenius norm above the cap is scaled down to exactly the cap; the step reports how many modules were
scaled and the mean and largest ΔW norm after scaling (sd-scripts' "Keys Scaled" and "Average key norm").

ΔW of LoHa and LoKr is a product in which every factor tensor appears once, so multiplying each of a module's n factor
tensors by ratio^(1/n) multiplies ΔW by ratio and spreads the change over the factors as LyCORIS' ``apply_max_norm``
does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from peft_lyco.tuners import LycoLayer

from .network import ADAPTER_NAME


@dataclass(frozen=True)
class MaxNormReport:
    """One application: modules scaled, mean and largest ΔW norm over all modules after scaling."""

    keys_scaled: int
    mean_norm: float
    max_norm: float

    def logs(self) -> dict[str, float]:
        """Tracker values under sd-scripts' names."""
        return {
            "max_norm/keys_scaled": self.keys_scaled,
            "max_norm/average_key_norm": self.mean_norm,
            "max_norm/max_key_norm": self.max_norm,
        }


def adapted_layers(models: Iterable[torch.nn.Module], adapter: str = ADAPTER_NAME) -> list[LycoLayer]:
    return [m for model in models for m in model.modules() if isinstance(m, LycoLayer) and adapter in m.layouts]


@torch.no_grad()
def apply_max_norm(models: Iterable[torch.nn.Module], cap: float, adapter: str = ADAPTER_NAME) -> MaxNormReport:
    """Scale every module of ``adapter`` in ``models`` whose ‖ΔW‖_F exceeds ``cap`` down to ``cap``."""
    norms, scaled = [], 0
    for layer in adapted_layers(models, adapter):
        norm = float(layer.get_delta_weight(adapter).double().norm())
        ratio = cap / norm if norm > cap else 1.0
        if ratio != 1.0:
            factors = list(layer.factor_parameters(adapter).values())  # ΔW is linear in each (use_scalar too)
            for tensor in factors:
                tensor.mul_(ratio ** (1.0 / len(factors)))
            scaled += 1
        norms.append(norm * ratio)
    if not norms:
        return MaxNormReport(0, 0.0, 0.0)
    return MaxNormReport(scaled, sum(norms) / len(norms), max(norms))
