"""Conversion between kohya/LyCORIS LoHa/LoKr files and PEFT adapters (names, shapes, alpha rules, file I/O)."""

from .io import load_kohya, save_kohya
from .kohya import (
    ComponentAdapter,
    KohyaConversion,
    PeftPart,
    is_lycoris_state_dict,
    kohya_to_peft,
    peft_to_kohya,
)
from .modules import LycoFileError, ModuleAdapter
from .names import ANIMA, SDXL, NameResolver, detect_model_type, model_names

__all__ = [
    "ANIMA",
    "SDXL",
    "ComponentAdapter",
    "KohyaConversion",
    "LycoFileError",
    "ModuleAdapter",
    "NameResolver",
    "PeftPart",
    "detect_model_type",
    "is_lycoris_state_dict",
    "kohya_to_peft",
    "load_kohya",
    "model_names",
    "peft_to_kohya",
    "save_kohya",
]
