"""How an adapted layer runs and merges its base weight, chosen by the weight's type.

* A plain floating weight (fp32/fp64/fp16/bf16) goes into the fused op ``op(x, W + ΣΔW)``; merging sums into it.
* A weight stored in float8 (``float8_e4m3fn``/``float8_e5m2``, sd-scripts' ``--fp8_base``) goes into the fused op
  too, which upcasts it per call; merging rounds ``W + ΔW`` back to float8, with a warning.
* A quantized weight (bitsandbytes ``Int8Params``/``Params4bit``, torchao tensor subclasses) is run by its own layer:
  the adapters add ``op(x, ΣΔW)`` to the base output (as PEFT's LoRA does for these bases). bitsandbytes weights merge
  by dequantizing, summing and quantizing again (with a warning, as PEFT); torchao weights refuse to merge.

bitsandbytes and torchao are optional: their types are checked only once the user has imported them (a weight of
theirs cannot exist before).
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

from ..functional.base_op import BaseOp
from ..functional.delta import FLOAT8_DTYPES


class BaseWeight:
    """A plain floating weight: summed into by the fused op and by merging."""

    fused = True

    def check_trainable(self, weight: torch.Tensor, where: str) -> None:
        """Raise where the base weight cannot be trained as it is stored (plain weights always can)."""

    def base_output(self, base: nn.Module, x: torch.Tensor, op: BaseOp, prepared: torch.Tensor) -> torch.Tensor:
        """The base layer's own output for ``x`` (``prepared``: ``x`` as ``op`` takes it), for the bypass path."""
        return base(x)

    def merge(self, base: nn.Module, delta: torch.Tensor, *, sign: int, where: str, safe: bool) -> None:
        """Add ``sign · delta`` (fp32 or wider, the weight's shape) into ``base.weight``; ``safe`` checks the sum is
        finite before anything is stored."""
        from ..functional import add_delta_into

        summed = add_delta_into(base.weight.data, delta, sign=sign)  # in the weight's dtype
        _check_finite(summed, where, safe)
        base.weight.data = summed


class Float8Weight(BaseWeight):
    """A weight stored in float8: the fused op upcasts it per call; merging rounds the sum back to float8."""

    def check_trainable(self, weight: torch.Tensor, where: str) -> None:
        if weight.requires_grad:
            raise ValueError(
                f"{where}: the base weight is stored in {weight.dtype} and requires grad; float8 storage is for frozen "
                "bases only (call base.weight.requires_grad_(False), or keep a trainable base in bf16/fp32)"
            )

    def base_output(self, base: nn.Module, x: torch.Tensor, op: BaseOp, prepared: torch.Tensor) -> torch.Tensor:
        """``op(x, W)`` with the float8 weight upcast to the input's dtype for this call (``nn.Linear`` cannot
        multiply float8 by anything)."""
        out = op.forward(prepared, base.weight.to(prepared.dtype), base.bias)
        return out.squeeze(0) if out.dim() > x.dim() else out

    def merge(self, base: nn.Module, delta: torch.Tensor, *, sign: int, where: str, safe: bool) -> None:
        weight = base.weight
        warnings.warn(
            f"{where}: merging into a {weight.dtype} base weight rounds W + ΔW to float8 (about 2-3 significant "
            "bits); unmerging subtracts the same ΔW from the rounded weight and does not restore the original bits. "
            "Keep the adapter unmerged (it runs on the float8 base as it is) or merge into a bf16/fp32 copy.",
            stacklevel=4,
        )
        summed = weight.data.to(delta.dtype).reshape(delta.shape).add_(delta, alpha=sign)
        _check_finite(summed, where, safe)
        limit = torch.finfo(weight.dtype).max
        weight.data.copy_(summed.clamp_(-limit, limit).reshape(weight.shape))


class QuantizedWeight(BaseWeight):
    """A weight its own layer knows how to multiply with: the adapters run beside it (bypass)."""

    fused = False
    label = "quantized"

    def check_trainable(self, weight: torch.Tensor, where: str) -> None:
        return None  # the quantized layer computes its own input gradient; its weight is never trained here

    def dequantized(self, base: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def requantize(self, base: nn.Module, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def merge(self, base: nn.Module, delta: torch.Tensor, *, sign: int, where: str, safe: bool) -> None:
        warnings.warn(
            f"{where}: merging into a {self.label} base dequantizes the weight, adds ΔW and quantizes it again; "
            "outputs differ from the unmerged adapter by the rounding, and unmerging does not restore the original "
            "weight exactly.",
            stacklevel=4,
        )
        summed = self.dequantized(base).to(delta.dtype).reshape(delta.shape).add_(delta, alpha=sign)
        _check_finite(summed, where, safe)
        self.requantize(base, summed.reshape(base.out_features, base.in_features))


class BnbInt8Weight(QuantizedWeight):
    """bitsandbytes ``Linear8bitLt`` (``Int8Params``: int8 rows with one absmax scale per row)."""

    label = "bitsandbytes 8-bit"

    def dequantized(self, base: nn.Module) -> torch.Tensor:
        import bitsandbytes as bnb

        weight = base.weight
        if weight.data.dtype != torch.int8:  # has_fp16_weights: kept unquantized
            return weight.data.float()
        scales = weight.SCB if weight.SCB is not None else base.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device)).float()

    def requantize(self, base: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        old = base.weight
        base.weight = bnb.nn.Int8Params(
            weight.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights
        ).to(old.device)
        base.state.reset_grads()


class BnbFourBitWeight(QuantizedWeight):
    """bitsandbytes ``Linear4bit`` (``Params4bit``: NF4/FP4 blocks with their quantization state)."""

    label = "bitsandbytes 4-bit"

    def dequantized(self, base: nn.Module) -> torch.Tensor:
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()

    def requantize(self, base: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        old = base.weight
        base.weight = bnb.nn.Params4bit(
            weight.to("cpu"),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=base,
        ).to(old.device)


class TorchaoWeight(QuantizedWeight):
    """A torchao-quantized ``nn.Linear`` weight (a ``TorchAOBaseTensor`` subclass)."""

    label = "torchao"

    def merge(self, base: nn.Module, delta: torch.Tensor, *, sign: int, where: str, safe: bool) -> None:
        raise ValueError(
            f"{where}: cannot merge into a torchao-quantized weight ({type(base.weight).__name__}): quantizing the "
            "sum again needs the quantization config the model was built with. Merge into the unquantized model and "
            "quantize the result, or keep the adapter unmerged."
        )


_PLAIN, _FLOAT8 = BaseWeight(), Float8Weight()
_BNB_INT8, _BNB_FOUR_BIT, _TORCHAO = BnbInt8Weight(), BnbFourBitWeight(), TorchaoWeight()


def base_weight(base: nn.Module) -> BaseWeight:
    """How ``base`` (an ``nn.Linear``/``nn.Conv2d`` or a quantized subclass) is run and merged, from its weight's type."""
    weight = base.weight
    quantized = _quantized_kind(weight)
    if quantized is not None:
        return quantized
    if weight.dtype in FLOAT8_DTYPES:
        return _FLOAT8
    return _PLAIN


def _quantized_kind(weight: torch.Tensor) -> QuantizedWeight | None:
    if "bitsandbytes" in sys.modules:
        import bitsandbytes as bnb

        if isinstance(weight, bnb.nn.Int8Params):
            return _BNB_INT8
        if isinstance(weight, bnb.nn.Params4bit):
            return _BNB_FOUR_BIT
    if "torchao" in sys.modules:
        from torchao.utils import TorchAOBaseTensor

        if isinstance(weight, TorchAOBaseTensor):
            return _TORCHAO
    return None


def _check_finite(summed: torch.Tensor, where: str, safe: bool) -> None:
    if safe and not torch.isfinite(summed).all():
        raise ValueError(f"NaNs detected in the merged weights of {where}; the adapter is broken (nothing was merged)")
