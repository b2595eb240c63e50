"""sd-scripts ``--network_args`` for LoHa/LoKr, parsed strictly into typed, validated options.

sd-scripts silently drops unknown keys and malformed values; here every problem raises ``NetworkArgsError``
naming the argument. The same options can be given as keyword arguments with Python values.
"""

from __future__ import annotations

import ast
import difflib
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Pairs = tuple[tuple[str, Any], ...]


class NetworkArgsError(ValueError):
    """A network argument is unknown, malformed or out of range; the message names it."""


@dataclass(frozen=True)
class NetworkArgs:
    """Every option ``build_config``/``param_groups`` understand, after parsing (``None`` = not given)."""

    conv_dim: int | None = None
    conv_alpha: float | None = None
    use_tucker: bool = False
    factor: int | None = None
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    exclude_patterns: tuple[str, ...] = ()
    include_patterns: tuple[str, ...] = ()
    network_reg_dims: Pairs = ()
    network_reg_lrs: Pairs = ()
    train_llm_adapter: bool = False
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    verbose: bool = False
    dropout: float | None = None
    rank_dropout_scale: bool | None = None
    decompose_both: bool | None = None
    full_matrix: bool | None = None
    unbalanced_factorization: bool | None = None
    dora_wd: bool = False
    wd_on_output: bool = True
    use_scalar: bool = False
    rs_lora: bool = False

    def training_options(self) -> dict[str, Any]:
        """The options that belong to ``peft_lyco.training.param_groups`` (regex lrs and LoRA+ ratios)."""
        return {
            "reg_lrs": dict(self.network_reg_lrs) or None,
            "loraplus_lr_ratio": self.loraplus_lr_ratio,
            "loraplus_unet_lr_ratio": self.loraplus_unet_lr_ratio,
            "loraplus_text_encoder_lr_ratio": self.loraplus_text_encoder_lr_ratio,
        }


# ------------------------------------------------------------------------------------------- value conversion
def _bool_from_text(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ("true", "false"):
        raise ValueError("expected True or False")
    return lowered == "true"


def _literal(text: str) -> Any:
    """``ast.literal_eval`` (as sd-scripts), quiet about ``'\\.'`` in non-raw strings: the regex is what was meant."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))
            return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"expected a Python literal such as ['regex', ...] ({err})") from None


def _pairs_from_text(text: str) -> list[tuple[str, str]]:
    """``regex=value,regex=value`` → pairs. Regexes may contain ``,`` and ``=``: a piece is only closed where what
    follows its last ``=`` is a number and what precedes it compiles (sd-scripts splits on every comma)."""
    pairs, pending = [], ""
    for piece in text.split(","):
        pending = f"{pending},{piece}" if pending else piece
        if not pending.strip():
            pending = ""
            continue
        key, sep, value = pending.rpartition("=")
        if sep and key.strip() and _is_number(value) and _compiles(key.strip()):
            pairs.append((key.strip(), value.strip()))
            pending = ""
    if pending:
        raise ValueError(f"cannot read {pending!r} as regex=value")
    return pairs


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


# ------------------------------------------------------------------------------------------- typed validation
def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected a bool")
    return value


def _integer(value: Any, minimum: int) -> int:
    if isinstance(value, str):
        value = int(value.strip()) if re.fullmatch(r"\s*[-+]?\d+\s*", value) else value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected an integer")
    if value < minimum:
        raise ValueError(f"must be >= {minimum}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError("expected a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("expected a finite number")
    return float(value)


def _non_negative(value: Any) -> float:
    value = _number(value)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _positive(value: Any) -> float:
    value = _number(value)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _probability(value: Any) -> float:
    value = _number(value)
    if not 0.0 <= value < 1.0:
        raise ValueError("must be in [0, 1)")
    return value


def _factor(value: Any) -> int:
    value = _integer(value, -1)
    if value == 0:
        raise ValueError("must be -1 (balanced) or a positive integer")
    return value


def _patterns(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise ValueError("expected a regex string or a list of regex strings")
    for item in items:
        try:
            re.compile(item)
        except re.error as err:
            raise ValueError(f"invalid regex {item!r}: {err}") from None
    return tuple(items)


def _pairs(check: Callable[[Any], Any]) -> Callable[[Any], Pairs]:
    def convert(value: Any) -> Pairs:
        if isinstance(value, str):
            value = _pairs_from_text(value)
        elif isinstance(value, Mapping):
            value = list(value.items())
        if not isinstance(value, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
            raise ValueError("expected 'regex=value,...', a dict {regex: value} or a list of (regex, value) pairs")
        result = []
        for pattern, number in value:
            pattern = _patterns(pattern)[0]
            try:
                result.append((pattern, check(number)))
            except ValueError as err:
                raise ValueError(f"value of {pattern!r}: {err}") from None
        return tuple(result)

    return convert


def _neuron_dropout(value: Any) -> float | None:
    """Plain dropout (``--network_dropout`` or ``dropout=``): drops input features of the ΔW branch in training."""
    if value is None or value == "None":
        return None
    return _probability(value)


@dataclass(frozen=True)
class _Option:
    from_text: Callable[[str], Any]  # sd-scripts string -> Python value
    check: Callable[[Any], Any]  # Python value -> validated value


def _scalar(check: Callable[[Any], Any]) -> _Option:
    return _Option(lambda text: text, check)


OPTIONS: dict[str, _Option] = {
    "conv_dim": _scalar(lambda v: _integer(v, 0)),
    "conv_alpha": _scalar(_non_negative),
    "use_tucker": _Option(_bool_from_text, _boolean),
    "factor": _scalar(_factor),
    "rank_dropout": _scalar(_probability),
    "module_dropout": _scalar(_probability),
    "exclude_patterns": _Option(_literal, _patterns),
    "include_patterns": _Option(_literal, _patterns),
    "network_reg_dims": _scalar(_pairs(lambda v: _integer(v, 0))),
    "network_reg_lrs": _scalar(_pairs(_non_negative)),
    "train_llm_adapter": _Option(_bool_from_text, _boolean),
    "loraplus_lr_ratio": _scalar(_positive),
    "loraplus_unet_lr_ratio": _scalar(_positive),
    "loraplus_text_encoder_lr_ratio": _scalar(_positive),
    "verbose": _Option(_bool_from_text, _boolean),
    "dropout": _scalar(_neuron_dropout),
    "rank_dropout_scale": _Option(_bool_from_text, _boolean),
    "decompose_both": _Option(_bool_from_text, _boolean),
    "full_matrix": _Option(_bool_from_text, _boolean),
    "unbalanced_factorization": _Option(_bool_from_text, _boolean),
    "dora_wd": _Option(_bool_from_text, _boolean),
    "wd_on_output": _Option(_bool_from_text, _boolean),
    "use_scalar": _Option(_bool_from_text, _boolean),
    "rs_lora": _Option(_bool_from_text, _boolean),
}

UNSUPPORTED = {
    "bypass_mode": "bypass mode is not implemented",
    "preset": "presets are chosen from the model's architecture; use exclude_patterns/include_patterns",
    "algo": "pass the algorithm as build_config's first argument ('loha' or 'lokr')",
    "train_norm": "norm-layer training is not implemented",
    "block_dims": "block-wise dims are LoRA-only in sd-scripts; use network_reg_dims",
    "block_alphas": "block-wise alphas are LoRA-only in sd-scripts; use network_reg_dims",
    "conv_block_dims": "block-wise dims are LoRA-only in sd-scripts; use network_reg_dims",
    "conv_block_alphas": "block-wise alphas are LoRA-only in sd-scripts; use network_reg_dims",
    "down_lr_weight": "block-wise lr weights are LoRA-only in sd-scripts; use network_reg_lrs",
    "mid_lr_weight": "block-wise lr weights are LoRA-only in sd-scripts; use network_reg_lrs",
    "up_lr_weight": "block-wise lr weights are LoRA-only in sd-scripts; use network_reg_lrs",
}


def _unknown(name: str) -> NetworkArgsError:
    if name in UNSUPPORTED:
        return NetworkArgsError(f"network argument {name!r} is not supported: {UNSUPPORTED[name]}")
    close = difflib.get_close_matches(name, OPTIONS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return NetworkArgsError(f"unknown network argument {name!r}.{hint} Known: {', '.join(sorted(OPTIONS))}")


def _validated(name: str, value: Any, raw: Any) -> Any:
    try:
        return OPTIONS[name].check(value)
    except ValueError as err:
        raise NetworkArgsError(f"network argument {name}={raw!r}: {err}") from None


def split_network_args(network_args: Sequence[str] | None) -> dict[str, str]:
    """``["key=value", ...]`` → ``{key: value}`` (split at the first ``=``), rejecting repeats and bad items."""
    if network_args is None:
        return {}
    if isinstance(network_args, (str, bytes)) or not isinstance(network_args, Sequence):
        raise NetworkArgsError(f"network_args must be a list of 'key=value' strings, got {network_args!r}")
    result: dict[str, str] = {}
    for item in network_args:
        if not isinstance(item, str) or "=" not in item:
            raise NetworkArgsError(f"network argument {item!r} is not of the form key=value")
        key, value = (part.strip() for part in item.split("=", 1))
        if key in result:
            raise NetworkArgsError(f"network argument {key!r} is given twice")
        result[key] = value
    return result


def parse_network_args(network_args: Sequence[str] | None = None, **options: Any) -> NetworkArgs:
    """sd-scripts strings (``"conv_dim=16"``, ``"exclude_patterns=[r'.*norm.*']"``) and/or keyword options with
    Python values → ``NetworkArgs``. Unknown, repeated or malformed arguments raise ``NetworkArgsError``."""
    values: dict[str, Any] = {}
    for name, text in split_network_args(network_args).items():
        if name not in OPTIONS:
            raise _unknown(name)
        try:
            value = OPTIONS[name].from_text(text)
        except ValueError as err:
            raise NetworkArgsError(f"network argument {name}={text!r}: {err}") from None
        values[name] = _validated(name, value, text)
    for name, value in options.items():
        if name not in OPTIONS:
            raise _unknown(name)
        if name in values:
            raise NetworkArgsError(f"network argument {name!r} is given both in network_args and as a keyword")
        values[name] = _validated(name, value, value)
    if values.get("conv_alpha") is not None and values.get("conv_dim") is None:
        raise NetworkArgsError("network argument conv_alpha needs conv_dim (without conv_dim no kxk conv is adapted)")
    return NetworkArgs(**values)
