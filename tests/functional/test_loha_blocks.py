"""LoHa's weight-sized products formed block of rows by block of rows (CPU): ΔW, its gradients and the fused op's dense
route over several blocks against the unblocked formula in float64."""

import pytest
import torch
import torch.nn.functional as F

from peft_lyco.functional import DeltaTerm, add_delta, loha_layout
from peft_lyco.functional import loha as loha_module
from peft_lyco.functional.adapted import adapted_op
from peft_lyco.functional.base_op import Conv2dOp, LinearOp
from peft_lyco.functional.loha import LOHA, loha_delta_weight

CONV = Conv2dOp(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
# name: (op, weight shape, layout, input shape); 7 output rows so the blocks do not divide them evenly
CASES = {
    "flat-linear": (LinearOp(), (7, 10), loha_layout(7, 10, (), 3, False), (2, 4, 10)),
    "tucker-conv": (CONV, (7, 3, 3, 3), loha_layout(7, 3, (3, 3), 2, True), (1, 3, 5, 5)),
}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 2-4 rows: every loop runs several blocks and one ragged last block."""
    monkeypatch.setattr(loha_module, "BLOCK_ELEMENTS", 30)


def _factors(layout, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, dtype=dtype, generator=g) * 0.5 for name, shape in layout.shapes.items()}


def _formula(p, scale):
    """ΔW written as LyCORIS writes it (einsum for Tucker), independent of the blocked code."""
    if "hada_t1" not in p:
        return scale * (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
    side = [
        torch.einsum("i j k l, j r, i p -> p r k l", p[f"hada_t{n}"], p[f"hada_w{n}_b"], p[f"hada_w{n}_a"])
        for n in (1, 2)
    ]
    return scale * side[0] * side[1]


def _apply(op, x, weight, bias):
    if isinstance(op, LinearOp):
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, op.stride, op.padding, op.dilation, op.groups)


@pytest.mark.parametrize("case", sorted(CASES))
def test_blocked_delta_and_its_gradients_match_the_formula(case):
    _, wshape, layout, _ = CASES[case]
    params = {k: v.requires_grad_(True) for k, v in _factors(layout).items()}
    blocks = loha_module._row_blocks(wshape[0], 30, torch.device("cpu"))
    assert len(blocks) > 2
    delta = LOHA.delta(params, 0.7)
    reference = _formula(params, 0.7)
    torch.testing.assert_close(delta.reshape(reference.shape), reference, rtol=1e-12, atol=1e-12)
    cotangent = torch.randn(reference.shape, dtype=torch.float64)
    got = torch.autograd.grad(delta, list(params.values()), cotangent.reshape(delta.shape))
    expected = torch.autograd.grad(reference, list(params.values()), cotangent)
    for name, a, b in zip(params, got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_blocked_dense_route_matches_plain_autograd(case, masked):
    op, wshape, layout, xshape = CASES[case]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(xshape, dtype=torch.float64, generator=g)
    weight = torch.randn(wshape, dtype=torch.float64, generator=g)
    bias = torch.randn(wshape[0], dtype=torch.float64, generator=g)
    mask = (torch.rand(wshape[0], generator=g) > 0.4).double() * 1.5 if masked else None
    results = []
    for fused in (True, False):
        xl = x.clone().requires_grad_(True)
        params = {k: v.requires_grad_(True) for k, v in _factors(layout).items()}
        if fused:  # the dense route: ΔW rebuilt for ∂L/∂x, factor gradients from ∂L/∂W
            out = adapted_op(xl, weight, bias, op, [DeltaTerm(LOHA, params, 0.7, mask)], structured_grads=False)
        else:
            delta = _formula(params, 0.7).reshape(wshape)
            delta = delta if mask is None else delta * mask.view(-1, *[1] * (delta.dim() - 1))
            out = _apply(op, xl, weight + delta, bias)
        out.pow(2).sum().backward()
        results.append((out.detach(), [xl.grad, *[p.grad for p in params.values()]]))
    (out, grads), (ref_out, ref_grads) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", sorted(CASES))
def test_blocked_fused_forward_is_bit_identical_to_the_merged_layer(case):
    op, wshape, layout, xshape = CASES[case]
    params = {k: v.requires_grad_(True) for k, v in _factors(layout, torch.float32).items()}
    x, weight = torch.randn(xshape), torch.randn(wshape)
    fused = adapted_op(x, weight, None, op, [DeltaTerm(LOHA, params, 0.7)])
    with torch.no_grad():
        merged = add_delta(weight, LOHA.delta(params, 0.7))
    assert torch.equal(fused, _apply(op, x, merged, None))


def test_blocked_delta_under_autocast_has_the_autocast_dtype():
    params = _factors(CASES["flat-linear"][2], torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        delta = loha_delta_weight(*[params[n] for n in loha_module.LOHA_PARAMS[:4]], scale=0.7)
    assert delta.dtype == torch.bfloat16
    reference = _formula({k: v.double() for k, v in params.items()}, 0.7)
    torch.testing.assert_close(delta.double(), reference, rtol=3e-2, atol=3e-2 * reference.abs().max().item())
