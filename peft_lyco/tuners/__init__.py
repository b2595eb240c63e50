"""PEFT tuner types: configs, layers and tuner models for LoHa and LoKr."""

from .config import LycoConfig
from .layer import LycoLayer
from .loha import LoHaConfig, LoHaLayer, LoHaModel
from .lokr import LoKrConfig, LoKrLayer, LoKrModel

__all__ = ["LoHaConfig", "LoHaLayer", "LoHaModel", "LoKrConfig", "LoKrLayer", "LoKrModel", "LycoConfig", "LycoLayer"]
