"""Configuration fields shared by LoHa and LoKr, with validation that names the bad field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from peft.tuners.lycoris_utils import LycorisConfig

from ..functional import check_alpha, check_factor, check_rank

INIT_CHOICES = (True, False, "lycoris", "peft")


@dataclass
class LycoConfig(LycorisConfig):
    """Fields common to ``LoHaConfig`` and ``LoKrConfig`` (PEFT's ``rank_pattern``/``alpha_pattern`` included).

    Scale is ``alpha / r`` (``alpha`` None or 0 means ``alpha = r``), applied exactly once. kxk convolutions use
    ``conv_r``/``conv_alpha`` when set. ``rank_pattern``/``alpha_pattern``/``option_pattern`` override per module with
    PEFT's pattern rule (``re.match(rf"(.*\\.)?({key})$", name)``, first match wins).
    """

    r: int = field(default=8, metadata={"help": "Rank of Linear and 1x1-conv adapters (kohya network_dim)."})
    alpha: float | None = field(
        default=8.0, metadata={"help": "Scale numerator: scale = alpha / r. None or 0 means alpha = r (scale 1)."}
    )
    conv_r: int | None = field(
        default=None, metadata={"help": "Rank for kxk convolutions (kohya conv_dim); None uses r."}
    )
    conv_alpha: float | None = field(
        default=None, metadata={"help": "Alpha for kxk convolutions (kohya conv_alpha); None uses alpha."}
    )
    use_tucker: bool = field(
        default=False, metadata={"help": "Tucker cores for kxk convolutions instead of folding the kernel into in."}
    )
    weight_decompose: bool = field(
        default=False,
        metadata={
            "help": "DoRA (LyCORIS weight_decompose, kohya dora_wd): W' = s ⊙ (W + ΔW), s = dora_scale / ‖W + ΔW‖ "
            "along one axis, dora_scale trained and initialised to ‖W‖."
        },
    )
    wd_on_output: bool = field(
        default=True,
        metadata={
            "help": "DoRA norm per output row (LyCORIS default, dora_scale (out, 1, ...)); False: per input column "
            "(dora_scale (1, in, ...), the layout ComfyUI and A1111 compute exactly)."
        },
    )
    use_scalar: bool = field(
        default=False,
        metadata={
            "help": "LyCORIS use_scalar: ΔW times a trained scalar that starts at 0 (the zero-initialised factor "
            "then starts random); folded into the first factor on export."
        },
    )
    rs_lora: bool = field(default=False, metadata={"help": "Rank-stabilised scale alpha / sqrt(r) (LyCORIS rs_lora)."})
    dropout: float = field(
        default=0.0,
        metadata={
            "help": "Probability of dropping input features of the ΔW branch in training: y = W x + ΔW dropout(x) "
            "(as LoRA's dropout on the adapter's input); not with weight_decompose."
        },
    )
    rank_dropout: float = field(
        default=0.0, metadata={"help": "Probability of dropping an output row of ΔW in training (kohya semantics)."}
    )
    rank_dropout_scale: bool = field(
        default=True, metadata={"help": "Rescale kept rows by 1/(1-p) (sd-scripts); False leaves them (LyCORIS)."}
    )
    module_dropout: float = field(
        default=0.0, metadata={"help": "Probability of skipping the whole adapter of a module in a training step."}
    )
    init_weights: bool | str = field(
        default=True,
        metadata={
            "help": "True or 'lycoris': kohya/LyCORIS init (ΔW = 0). 'peft': PEFT's init (ΔW = 0). "
            "False: random non-zero factors, for tests."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names, suffixes or a regex to adapt (nn.Linear and nn.Conv2d), as in PEFT."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names, suffixes or a regex never to adapt, as in PEFT."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Layer indices to adapt, as in PEFT."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list that layers_to_transform indexes, as in PEFT."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules to train in full and save, as in PEFT."}
    )
    option_pattern: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={
            "help": "Per-module layout overrides: pattern -> {option: value}, options as the config's own layout "
            "fields (e.g. {'conv_in': {'use_tucker': False}}). The converter writes these for files."
        },
    )

    layout_options: ClassVar[tuple[str, ...]] = ("use_tucker",)
    # per-module options beside the layout (also through option_pattern)
    adapter_options: ClassVar[tuple[str, ...]] = ("weight_decompose", "wd_on_output", "use_scalar", "rs_lora")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        self._validate()

    def _validate(self) -> None:
        name = type(self).__name__
        check_rank(self.r, f"{name}.r")
        if self.conv_r is not None:
            check_rank(self.conv_r, f"{name}.conv_r")
        for key, rank in self.rank_pattern.items():
            check_rank(rank, f"{name}.rank_pattern[{key!r}]")
        check_alpha(self.alpha, f"{name}.alpha")
        check_alpha(self.conv_alpha, f"{name}.conv_alpha")
        for key, alpha in self.alpha_pattern.items():
            check_alpha(alpha, f"{name}.alpha_pattern[{key!r}]")
        for what in ("rank_dropout", "module_dropout", "dropout"):
            p = getattr(self, what)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name}.{what} must be in [0, 1), got {p!r}")
        if self.init_weights not in INIT_CHOICES:
            raise ValueError(f"{name}.init_weights must be one of {INIT_CHOICES}, got {self.init_weights!r}")
        if self.dropout > 0 and (
            self.weight_decompose or any(o.get("weight_decompose") for o in self.option_pattern.values())
        ):
            raise ValueError(
                f"{name}.dropout cannot be combined with weight_decompose: DoRA re-normalises the whole weight, so "
                "there is no separate ΔW branch whose input could be dropped"
            )
        allowed = (*self.layout_options, *self.adapter_options)
        for key, options in self.option_pattern.items():
            unknown = set(options) - set(allowed)
            if unknown:
                raise ValueError(
                    f"{name}.option_pattern[{key!r}] has unknown options {sorted(unknown)}; allowed: {list(allowed)}"
                )
            if "factor" in options:
                check_factor(options["factor"])
