"""sd-scripts' LoHa/LoKr experience for PEFT users: architecture presets and ``--network_args`` → explicit configs.

``build_config("lokr", unet, network_dim=16, network_alpha=8, network_args=["conv_dim=8"])`` returns a
``LoKrConfig`` listing exactly the modules sd-scripts would adapt, with their ranks and alphas.
"""

from .architectures import ANIMA_DEFAULT_EXCLUDES, Architecture, architectures, detect_architecture
from .build import ModuleRow, build_config, describe, format_table
from .network_args import NetworkArgs, NetworkArgsError, parse_network_args

__all__ = [
    "ANIMA_DEFAULT_EXCLUDES",
    "Architecture",
    "ModuleRow",
    "NetworkArgs",
    "NetworkArgsError",
    "architectures",
    "build_config",
    "describe",
    "detect_architecture",
    "format_table",
    "parse_network_args",
]
