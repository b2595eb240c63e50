"""peft_lyco's own PEFT method types, beside PEFT's built-in ``LOHA``/``LOKR``."""

from __future__ import annotations

from .compat import extend_peft_type, register_method

LYCO_LOHA = extend_peft_type("LYCO_LOHA")
LYCO_LOKR = extend_peft_type("LYCO_LOKR")

__all__ = ["LYCO_LOHA", "LYCO_LOKR", "register_method"]
