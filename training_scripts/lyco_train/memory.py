"""Low-memory training modes shared by both trainers: a frozen base stored in float8 (sd-scripts ``--fp8_base``), the
adapter and its optimizer states in bf16 (``--full_bf16``), and ``torch.compile`` of the denoiser."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from peft_lyco import LycoLayer

FP8_STORAGE = torch.float8_e4m3fn
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class UpcastOnUse(nn.Module):
    """A parametrization: the stored (float8) weight is read as ``dtype`` each time the layer uses it. The upcast
    copy lives only as long as the call (and the backward that needs it); nothing persistent is added."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.dtype)


def store_weights_in_fp8(model: nn.Module, compute_dtype: torch.dtype, storage: torch.dtype = FP8_STORAGE) -> int:
    """Store every frozen Linear/Conv weight of ``model`` in ``storage`` (float8), the way sd-scripts' ``--fp8_base``
    halves a bf16 base. Biases, norms and embeddings keep ``compute_dtype`` (they are small, and float8 lookups/norms
    are not supported). Returns the number of weights converted.

    Base layers of LoHa/LoKr adapters keep the plain float8 weight: the adapted op upcasts it inside each call and
    saves only the float8 weight for backward. Every other layer reads its weight as ``compute_dtype`` through a
    parametrization, whose upcast copy autograd keeps for backward where the layer's input needs a gradient."""
    adapted_bases = {id(layer.get_base_layer()) for layer in model.modules() if isinstance(layer, LycoLayer)}
    converted = 0
    for module in model.modules():
        if not isinstance(module, WEIGHT_LAYERS) or parametrize.is_parametrized(module, "weight"):
            continue
        weight = module.weight
        if weight.requires_grad or not weight.is_floating_point():
            continue
        module.weight = nn.Parameter(weight.detach().to(storage), requires_grad=False)
        if id(module) not in adapted_bases:
            parametrize.register_parametrization(module, "weight", UpcastOnUse(compute_dtype), unsafe=True)
        converted += 1
    return converted


def stored_dtypes(model: nn.Module) -> dict[torch.dtype, int]:
    """Bytes of parameters per stored dtype (float8 weights counted as stored, not as read)."""
    counts: dict[torch.dtype, int] = {}
    for parameter in model.parameters():
        counts[parameter.dtype] = counts.get(parameter.dtype, 0) + parameter.numel() * parameter.element_size()
    return counts


def cast_trainable(models: dict[str, nn.Module], dtype: torch.dtype) -> None:
    """Put every trainable parameter in ``dtype`` in place (``--full_bf16``): the optimizer then keeps its states,
    and autograd the gradients, in that dtype."""
    for model in models.values():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.to(dtype)


def compile_denoiser(model: nn.Module, backend: str) -> None:
    """``torch.compile`` the model's forward in place (``nn.Module.compile``): parameter names, the PEFT adapter and
    accelerate's unwrapping stay as without compilation, so files and states are the same."""
    model.compile(backend=backend, dynamic=None)


def apply_memory_options(
    args, frozen: tuple[nn.Module, ...], trained: dict[str, nn.Module], denoiser: nn.Module, compute_dtype: torch.dtype
) -> None:
    """After the adapter is injected: ``--fp8_base`` on the frozen models, ``--full_bf16`` on the adapter,
    ``--torch_compile`` on the denoiser (UNet/DiT)."""
    if args.fp8_base:
        for model in frozen:
            store_weights_in_fp8(model, compute_dtype)
    if args.full_bf16:
        cast_trainable(trained, torch.bfloat16)
    if args.torch_compile:
        compile_denoiser(denoiser, args.dynamo_backend)
