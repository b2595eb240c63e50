"""Make LoHa and LoKr known to PEFT as their own method types, beside PEFT's built-in ``LOHA``/``LOKR``.

PEFT's ``PeftType`` is a closed ``str`` enum and ``register_peft_method`` accepts only existing members and refuses a
second call, so members are added at runtime (name == value, as PEFT looks them up both ways) and registration skips
types that are already mapped to the same classes.
"""

from __future__ import annotations

from peft.utils import PeftType


def extend_peft_type(name: str) -> PeftType:
    """Return the ``PeftType`` member ``name``, adding it to the enum first if it is missing (re-import safe)."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType.__members__)
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


LYCO_LOHA = extend_peft_type("LYCO_LOHA")
LYCO_LOKR = extend_peft_type("LYCO_LOKR")


def register_method(peft_type: PeftType, config_cls: type, model_cls: type) -> None:
    """Register one method with PEFT; calling it again with the same classes does nothing.

    A second call with different classes (e.g. after ``importlib.reload`` of the tuner modules) replaces the entries,
    so the newest definitions win instead of PEFT's ``KeyError``.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is model_cls and PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is config_cls:
        return
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING or peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = model_cls.prefix
        return
    register_peft_method(name=peft_type.value.lower(), config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
