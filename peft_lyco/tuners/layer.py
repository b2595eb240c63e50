"""What LoHa and LoKr layers share: per-adapter scale, dropouts, the fused forward, merge and unmerge.

Subclasses only name their algorithm (``functional.LOHA``/``LOKR``) and say how parameters are initialised; ΔW always
comes from the algorithm object, so forward, merge, unmerge and export use one formula with the scale applied once.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..compat import conv_mode_padding, parameter_dict_entries
from ..functional import Algorithm, DeltaTerm, rank_dropout_mask
from ..functional.adapted import adapted_op, inference_forward, merged_weight, term_delta
from ..functional.base_op import BaseOp, Conv2dOp, LinearOp
from ..functional.dora import WeightDecompose, initial_magnitude, magnitude_shape
from ..functional.term import module_dropout_term
from .bases import base_weight
from .config import LycoConfig
from .inference_cache import cached_inference_weight, forget_layer
from .options import LayerSpec, layer_geometry


class LycoLayer(nn.Module, BaseTunerLayer):
    """A Linear or Conv2d with any number of LoHa/LoKr adapters, held in ``ParameterDict``s keyed by adapter name.

    Training and inference run one op per call on ``W + Σ scale·ΔW`` (the base weight is never modified; a float8
    weight is upcast inside the op per call); when the base is itself a tuner layer (e.g. PEFT LoRA underneath) or a
    quantized layer (bitsandbytes, torchao; see ``bases``), the ΔW op is added to its output instead.
    """

    algorithm: Algorithm
    adapter_layer_names: tuple[str, ...] = ()
    # parameters beside the algorithm's factors: DoRA's magnitude and LyCORIS' use_scalar multiplier
    extra_param_names: tuple[str, ...] = ("dora_scale", "scalar")
    other_param_names = (
        "r",
        "wd_on_output",
        "rs_lora",
        "dropout",
        "alpha",
        "base_scale",
        "scaling",
        "layouts",
        "rank_dropout",
        "rank_dropout_scale",
        "module_dropout",
    )

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, spec: LayerSpec, config: LycoConfig, module_name: str = ""
    ):
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name
        self.out_features, self.in_features, self.kernel_size = layer_geometry(self.get_base_layer(), module_name)
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict())
        for name in self.other_param_names:
            setattr(self, name, {})
        self._merged_scale: dict[str, float] = {}
        self._unmerged_weights: dict[str, torch.Tensor] = {}  # DoRA adapters: the base weight before their merge
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, spec, config)

    # ----------------------------------------------------------------------------------------------- construction
    @abstractmethod
    def init_parameters(self, adapter_name: str, init_weights: bool | str) -> None:
        """Initialise the freshly created parameters of ``adapter_name``."""

    def update_layer(self, adapter_name: str, spec: LayerSpec, config: LycoConfig) -> None:
        """Create (or re-create) adapter ``adapter_name`` from a resolved spec."""
        layout = self.algorithm.layout(self.out_features, self.in_features, self.kernel_size, spec.rank, spec.options)
        self._drop_parameters(adapter_name)
        base_weight = self.get_base_layer().weight
        dtype = base_weight.dtype if base_weight.dtype in (torch.float32, torch.float64) else torch.float32
        for name, shape in layout.shapes.items():
            getattr(self, name)[adapter_name] = nn.Parameter(torch.empty(shape, device=base_weight.device, dtype=dtype))
        self.layouts[adapter_name] = layout
        self.r[adapter_name] = spec.rank
        self.alpha[adapter_name] = spec.alpha
        options = spec.options
        if options.get("weight_decompose"):
            on_output = bool(options.get("wd_on_output", True))
            shape = magnitude_shape(tuple(base_weight.shape), on_output)
            self.dora_scale[adapter_name] = nn.Parameter(torch.empty(shape, device=base_weight.device, dtype=dtype))
            self.wd_on_output[adapter_name] = on_output
        else:
            self.wd_on_output[adapter_name] = None
        if options.get("use_scalar"):
            self.scalar[adapter_name] = nn.Parameter(torch.empty((), device=base_weight.device, dtype=dtype))
        self.rs_lora[adapter_name] = bool(options.get("rs_lora"))
        self.dropout[adapter_name] = config.dropout
        self.base_scale[adapter_name] = self.algorithm.scale(layout, spec.alpha, spec.rank, self.rs_lora[adapter_name])
        self.scaling[adapter_name] = self.base_scale[adapter_name]
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.rank_dropout_scale[adapter_name] = config.rank_dropout_scale
        self.module_dropout[adapter_name] = config.module_dropout
        if not any(p.is_meta for p in self.adapter_parameters(adapter_name).values()):
            # meta tensors (low_cpu_mem_usage loading) hold no values, and torch initialises them on a slow path
            with torch.no_grad():
                self.init_parameters(adapter_name, config.init_weights)
                if adapter_name in self.scalar:  # LyCORIS: ΔW starts at 0 through the scalar (random for tests)
                    scalar = self.scalar[adapter_name]
                    scalar.zero_() if config.init_weights is not False else nn.init.normal_(scalar)
                if adapter_name in self.dora_scale:
                    magnitude = initial_magnitude(base_weight, self.wd_on_output[adapter_name])
                    self.dora_scale[adapter_name].copy_(magnitude)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _drop_parameters(self, adapter_name: str) -> None:
        for name in self.adapter_layer_names:
            if adapter_name in getattr(self, name):
                del getattr(self, name)[adapter_name]

    def delete_adapter(self, adapter_name: str) -> None:
        """PEFT's ``delete_adapter``, freeing the layer's cached inference weight first."""
        forget_layer(self)
        super().delete_adapter(adapter_name)

    def adapter_parameters(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under their kohya names (``hada_w1_a``, ``lokr_w1``, ..., ``dora_scale``, ``scalar``)."""
        return {
            name: getattr(self, name)[adapter_name]
            for name in self.adapter_layer_names
            if adapter_name in getattr(self, name)
        }

    def factor_parameters(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The algorithm's factors of the adapter (no ``dora_scale``/``scalar``), in ``param_names`` order."""
        return parameter_dict_entries(self, self.algorithm.param_names, adapter_name)

    def kohya_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors as a kohya/LyCORIS file holds them (detached): ``use_scalar``'s multiplier folded into
        the factor ΔW is linear in, as LyCORIS saves it, and ``dora_scale`` when the adapter is DoRA."""
        tensors = {name: tensor.detach() for name, tensor in self.factor_parameters(adapter_name).items()}
        if adapter_name in self.scalar:
            name = self.algorithm.scalar_factor(tensors)
            tensors[name] = tensors[name] * self.scalar[adapter_name].detach()
        if adapter_name in self.dora_scale:
            tensors["dora_scale"] = self.dora_scale[adapter_name].detach()
        return tensors

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move an adapter to the base weight's device, keeping its dtype (PEFT's version would also cast it to a
        half-precision base's dtype, so adapters loaded with ``low_cpu_mem_usage`` would differ from others)."""
        device = device if device is not None else self.get_base_layer().weight.device
        if device.type == "meta":
            return
        for name in self.adapter_layer_names:
            params = getattr(self, name)
            if adapter_name in params and not params[adapter_name].is_meta and params[adapter_name].device != device:
                param = params[adapter_name]
                params[adapter_name] = nn.Parameter(param.data.to(device), requires_grad=param.requires_grad)

    @property
    def _available_adapters(self) -> set[str]:
        return set(self.layouts)

    @property
    def weight_shape(self) -> torch.Size:
        """The base weight's logical shape ``(out, in, *kernel)`` (a quantized weight's storage has another one)."""
        return torch.Size((self.out_features, self.in_features, *self.kernel_size))

    @property
    def groups(self) -> int:
        """The base convolution's ``groups`` (1 for Linear); PEFT's LoRA reads it when stacked on this layer."""
        return getattr(self.get_base_layer(), "groups", 1)

    # --------------------------------------------------------------------------------------------------- scaling
    def set_scale(self, adapter: str, scale: float) -> None:
        """Set the user weight of ``adapter`` (diffusers ``set_adapters``): scaling = weight · own scale."""
        if adapter in self._available_adapters:
            self.scaling[adapter] = scale * self.base_scale[adapter]

    def scale_layer(self, scale: float) -> None:
        """Multiply the scaling of the active adapters (diffusers ``fuse_lora(lora_scale=...)``)."""
        for adapter in self.active_adapters:
            if adapter in self._available_adapters:
                self.scaling[adapter] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        """Undo ``scale_layer``; with ``None`` reset the active adapters to their own scale."""
        for adapter in self.active_adapters:
            if adapter in self._available_adapters:
                if scale is None:
                    self.scaling[adapter] = self.base_scale[adapter]
                else:
                    self.scaling[adapter] /= scale

    # ------------------------------------------------------------------------------------------------------- ΔW
    def get_delta_weight(self, adapter_name: str, *, apply_rank_dropout: bool = False) -> torch.Tensor:
        """ΔW of one adapter in the base weight's shape, times its current scaling, in the adapter's dtype.

        For a DoRA adapter it is its effective contribution ``s ⊙ (W + ΔW) − W`` (in the base weight's dtype)."""
        return self._delta(adapter_name, self.scaling[adapter_name], apply_rank_dropout)

    def _delta(self, adapter_name: str, scale: float, apply_rank_dropout: bool = False) -> torch.Tensor:
        term = self._term(adapter_name, scale, apply_rank_dropout)
        delta = term_delta(term, self.weight_shape)
        if term.decompose is None:
            return delta
        weight = self.get_base_layer().weight
        return merged_weight(weight, [term], [delta], weight.dtype) - weight

    def _term(self, adapter_name: str, scale: float, apply_rank_dropout: bool) -> DeltaTerm:
        """The adapter's factors and scale for one call, with a fresh rank-dropout row mask when asked for.

        ``scale`` is the adapter's scaling (own scale times user weight); a DoRA adapter applies its own scale to ΔW
        and the user weight as DoRA's multiplier, as LyCORIS does."""
        params = self.factor_parameters(adapter_name)
        extras = parameter_dict_entries(self, self.extra_param_names, adapter_name)
        if "scalar" in extras:  # LyCORIS use_scalar: ΔW is linear in this factor
            name = self.algorithm.scalar_factor(params)
            params[name] = params[name] * extras["scalar"]
        decompose = None
        if "dora_scale" in extras:
            own = self.base_scale[adapter_name]
            multiplier = scale / own if own else 0.0
            decompose = WeightDecompose(extras["dora_scale"], self.wd_on_output[adapter_name], multiplier)
            scale = own
        p = self.rank_dropout[adapter_name]
        mask = None
        if apply_rank_dropout and p > 0:
            like = next(iter(params.values()))
            mask = rank_dropout_mask(
                self.out_features, p, self.rank_dropout_scale[adapter_name], device=like.device, dtype=like.dtype
            )
        return DeltaTerm(self.algorithm, params, scale, mask, decompose)

    def _active_terms(self) -> list[tuple[str, DeltaTerm]]:
        """The active adapters for this call (name, term), honouring module dropout and rank dropout in training."""
        terms = []
        for adapter in self.active_adapters:
            if adapter not in self._available_adapters:
                continue
            p = self.module_dropout[adapter] if self.training else 0.0
            compiling = torch.compiler.is_compiling()
            if p > 0 and not compiling and torch.rand(1).item() < p:  # eager: a dropped adapter costs nothing
                continue
            term = self._term(adapter, self.scaling[adapter], apply_rank_dropout=self.training)
            if p > 0 and compiling:  # the same coin as a tensor: a Python branch on it would break the graph
                term = module_dropout_term(term, p, self.out_features)
            terms.append((adapter, term))
        return terms

    # -------------------------------------------------------------------------------------------------- forward
    def _op_and_input(self, x: torch.Tensor) -> tuple[BaseOp, torch.Tensor]:
        """The base layer's op and its input prepared for it (padding modes other than zeros and ``"same"`` padding
        applied with ``F.pad`` first, as ``nn.Conv2d`` does; unbatched conv inputs given a batch dimension)."""
        base = self.get_base_layer()
        if not isinstance(base, nn.Conv2d):
            return LinearOp(), x
        if x.dim() == 3:
            x = x.unsqueeze(0)
        padding = base.padding
        if base.padding_mode != "zeros":
            x = F.pad(x, conv_mode_padding(base), mode=base.padding_mode)
            padding = (0, 0)
        elif padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            totals = [d * (k - 1) for d, k in zip(base.dilation, base.kernel_size)]
            if any(total % 2 for total in totals):
                # odd total: the extra row/column goes to the bottom/right, as F.conv2d(padding="same") does
                x = F.pad(x, (totals[1] // 2, totals[1] - totals[1] // 2, totals[0] // 2, totals[0] - totals[0] // 2))
                padding = (0, 0)
            else:
                padding = (totals[0] // 2, totals[1] // 2)
        return Conv2dOp(tuple(base.stride), tuple(padding), tuple(base.dilation), base.groups), x

    def _base_only(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer's output alone (adapters disabled, merged or none active), through its weight kind so that a
        float8-stored base (which ``nn.Linear``/``nn.Conv2d`` cannot run) is upcast for this call only."""
        base = self.get_base_layer()
        if self.base_layer is not base:
            return self.base_layer(x, *args, **kwargs)
        return base_weight(base).base_output(base, x, *self._op_and_input(x))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self._base_only(x, *args, **kwargs)
        if self.merged:
            return self._base_only(x, *args, **kwargs)
        active = self._active_terms()
        if not active:
            return self._base_only(x, *args, **kwargs)
        base = self.get_base_layer()
        op, prepared = self._op_and_input(x)
        dropouts = {self.dropout[name] if self.training else 0.0 for name, _ in active}
        kind = base_weight(base)
        if self.base_layer is base:
            kind.check_trainable(base.weight, f"module '{self.module_name}'")
        if self.base_layer is base and kind.fused and dropouts == {0.0}:
            out = self._adapted(prepared, base.weight, base.bias, op, active)
            return out.squeeze(0) if out.dim() > x.dim() else out  # unbatched conv input
        # bypass: the base layer's (or the tuner layer or quantized layer underneath's) output plus the adapters' op
        # on ΣΔW, each group of adapters with its own dropout on the input of the ΔW branch
        if self.base_layer is base:
            result = kind.base_output(base, x, op, prepared)
        else:
            result = self.base_layer(x, *args, **kwargs)
        for p in sorted(dropouts):
            group = [(name, term) for name, term in active if (self.dropout[name] if self.training else 0.0) == p]
            inp = prepared.to(group[0][1].dtype)
            inp = F.dropout(inp, p) if p > 0 else inp
            out = self._adapted(inp, None, None, op, group)
            out = out.squeeze(0) if out.dim() > x.dim() else out
            result = result + out.to(result.dtype)
        return result

    def _adapted(self, x, weight, bias, op: BaseOp, active: list[tuple[str, DeltaTerm]]) -> torch.Tensor:
        """``adapted_op`` on the active terms; a call without gradients in eval mode may reuse the weight it built
        last time (``inference_cache``)."""
        merged = cached_inference_weight(self, x, weight, active, self.weight_shape)
        if merged is not None:
            return inference_forward(x, merged, bias, op)
        return adapted_op(x, weight, bias, op, [term for _, term in active], weight_shape=self.weight_shape)

    # ---------------------------------------------------------------------------------------------- merge/unmerge
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' scaled ΔW into the base weight (summed in float32 for fp16/bf16 weights; float8 and
        bitsandbytes weights are rounded back with a warning; torchao weights refuse)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        forget_layer(self)
        base = self.get_base_layer()
        for adapter in adapter_names:
            if adapter not in self._available_adapters:
                continue
            scale = self.scaling[adapter]
            where = f"'{self.module_name}' (adapter {adapter})"
            with torch.no_grad():
                if adapter not in self.dora_scale:
                    base_weight(base).merge(base, self._delta(adapter, scale), sign=1, where=where, safe=safe_merge)
                else:  # not additive: keep the weight for an exact unmerge
                    term = self._term(adapter, scale, apply_rank_dropout=False)
                    delta = term_delta(term, base.weight.shape)
                    merged = merged_weight(base.weight.data, [term], [delta], base.weight.dtype)
                    if safe_merge and not torch.isfinite(merged).all():
                        raise ValueError(f"NaNs detected in the merged weights of {where}; the adapter is broken")
                    self._unmerged_weights[adapter] = base.weight.data.clone()
                    _store(base.weight, merged)
            self._merged_scale[adapter] = scale
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract exactly what ``merge`` added (same ΔW, same scale), newest first; a DoRA adapter's merge is undone
        by restoring the weight kept at merge time (bit-exact; DoRA has no exact additive inverse)."""
        forget_layer(self)
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            scale = self._merged_scale.pop(adapter)
            if adapter in self._unmerged_weights:
                base.weight.data = self._unmerged_weights.pop(adapter)
            elif adapter in self._available_adapters:
                where = f"'{self.module_name}' (adapter {adapter})"
                with torch.no_grad():
                    base_weight(base).merge(base, self._delta(adapter, scale), sign=-1, where=where, safe=False)

    def __repr__(self) -> str:
        return f"{type(self).__module__.split('.')[-2]}.{super().__repr__()}"


def _store(weight: nn.Parameter, summed: torch.Tensor) -> None:
    """Make ``summed`` (``add_delta_into``'s result) the weight's data: taken over as it is in the weight's dtype,
    else rounded into the weight's own storage (the cast ``add_delta`` ends with, without another buffer)."""
    if summed.dtype == weight.dtype:
        weight.data = summed
    else:
        weight.data.copy_(summed)
