"""What autocast does to the products of a layer's ΔW: the one place that asks whether it is on and in what dtype."""

from __future__ import annotations

import torch

# input dtypes autocast casts (it leaves float64 alone)
AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs products in on this device type, or ``None`` where it is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def as_autocast_product(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The operands of a product autocast does not list (``torch.kron``) cast as it casts those of ``mm``: to its
    dtype where it is on for their device and they are eligible, else unchanged. A ΔW formed from them then comes out
    in the layer's compute dtype, as the ``mm`` products of LoHa's ΔW do, and meets a half-precision weight in one
    same-dtype add instead of a float32 sum over a float32 copy of the weight."""
    dtype = autocast_dtype(tensors[0].device.type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t.dtype in AUTOCAST_ELIGIBLE else t for t in tensors)
