"""Under autocast, ΔW comes out in autocast's dtype for LoKr as for LoHa: the Kronecker product (no autocast op) runs
on operands cast as autocast casts those of ``mm``, so a half-precision base meets it in one same-dtype add."""

import pytest
import torch
import torch.nn.functional as F

from peft_lyco.functional import LOKR, lokr_layout
from peft_lyco.functional.adapted import adapted_op
from peft_lyco.functional.base_op import LinearOp
from peft_lyco.functional.term import DeltaTerm

BF16 = torch.bfloat16


def _params(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) * 0.3 for name, shape in layout.shapes.items()}


@pytest.mark.parametrize(
    "layout",
    [lokr_layout(24, 32, (), 2, factor=4), lokr_layout(24, 32, (), 2, factor=4, decompose_both=True)],
    ids=["w1-full", "both-lowrank"],
)
def test_lokr_delta_under_autocast_is_the_kron_of_autocast_cast_halves(layout):
    params = _params(layout)
    with torch.autocast("cpu", dtype=BF16):
        delta = LOKR.delta(params, 0.7)
    assert delta.dtype == BF16
    halves = []
    for name in ("lokr_w1", "lokr_w2"):
        if name in params:
            halves.append(params[name].to(BF16))
        else:  # autocast's mm: bf16 operands, bf16 result
            halves.append(params[f"{name}_a"].to(BF16) @ params[f"{name}_b"].to(BF16))
    expected = torch.kron(*halves) * 0.7
    assert torch.equal(delta, expected)
    # outside autocast nothing changes: float32 throughout
    assert LOKR.delta(params, 0.7).dtype == torch.float32


def test_fused_lokr_forward_under_autocast_is_one_same_dtype_add_on_a_bf16_base():
    layout = lokr_layout(24, 32, (), 2, factor=4)
    params = {name: p.requires_grad_(True) for name, p in _params(layout).items()}
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(24, 32, generator=g).to(BF16)
    x = torch.randn(5, 32, generator=g)
    with torch.autocast("cpu", dtype=BF16):
        out = adapted_op(x, weight, None, LinearOp(), [DeltaTerm(LOKR, params, 0.7)])
        delta = LOKR.delta(params, 0.7)
    expected = F.linear(x.to(BF16), weight + delta)  # bf16 + bf16: summed in float32, rounded once
    assert out.dtype == BF16
    assert torch.equal(out, expected)
