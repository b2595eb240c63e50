"""LyCORIS-exact LoHa and LoKr for the Hugging Face stack.

Importing this package registers ``LYCO_LOHA`` and ``LYCO_LOKR`` with PEFT (idempotent), so ``get_peft_model``,
``PeftModel.from_pretrained`` and friends work with ``LoHaConfig``/``LoKrConfig`` beside PEFT's own LoHa/LoKr.
"""

from ._registry import LYCO_LOHA, LYCO_LOKR, register_method
from .tuners import LoHaConfig, LoHaLayer, LoHaModel, LoKrConfig, LoKrLayer, LoKrModel, LycoConfig, LycoLayer
from .tuners.inference_cache import (
    clear_inference_cache,
    inference_cache,
    inference_cache_info,
    set_inference_cache_budget,
)

__version__ = "0.1.0"


def register() -> None:
    """Register both method types with PEFT; safe to call any number of times."""
    register_method(LYCO_LOHA, LoHaConfig, LoHaModel)
    register_method(LYCO_LOKR, LoKrConfig, LoKrModel)


register()

from . import convert

__all__ = [
    "LYCO_LOHA",
    "LYCO_LOKR",
    "LoHaConfig",
    "LoHaLayer",
    "LoHaModel",
    "LoKrConfig",
    "LoKrLayer",
    "LoKrModel",
    "LycoConfig",
    "LycoLayer",
    "clear_inference_cache",
    "convert",
    "inference_cache",
    "inference_cache_info",
    "register",
    "set_inference_cache_budget",
]
