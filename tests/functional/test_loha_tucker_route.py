"""Tucker LoHa's structured convolution route (1x1 -> rank-r1·r2 core convolution -> 1x1, never building ΔW): its
Tucker form against LyCORIS' einsum formula, its gradients against float64 autograd, and that the fused op takes it
only where the layer's products run in float32 or wider (in half precision it is less accurate than the dense route)."""

import pytest
import torch
import torch.nn.functional as F

from peft_lyco.functional import DeltaTerm, loha_layout
from peft_lyco.functional import adapted as adapted_module
from peft_lyco.functional.adapted import adapted_op, structured_grads_pay_off
from peft_lyco.functional.base_op import Conv2dOp
from peft_lyco.functional.loha import LOHA, loha_tucker_as_lowrank

CONV = Conv2dOp(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
# 32 channels, rank 2 (a rank-4 core): small, and the cost model takes the route
CHANNELS, RANK, SCALE = 32, 2, 0.5


def _einsum_delta(p):
    """ΔW as LyCORIS writes it: the Hadamard product of the two Tucker rebuilds (einsum), float64."""
    side = [
        torch.einsum("i j k l, j r, i p -> p r k l", p[f"hada_t{n}"], p[f"hada_w{n}_b"], p[f"hada_w{n}_a"])
        for n in (1, 2)
    ]
    return side[0] * side[1]


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    layout = loha_layout(CHANNELS, CHANNELS, (3, 3), RANK, True)
    params = {name: torch.randn(shape, generator=g, dtype=torch.float64) * 0.3 for name, shape in layout.shapes.items()}
    x = torch.randn(2, CHANNELS, 8, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(CHANNELS, CHANNELS, 3, 3, generator=g, dtype=torch.float64) * 0.05
    grad_out = torch.randn(2, CHANNELS, 8, 8, generator=g, dtype=torch.float64)
    return params, x, weight, grad_out


@pytest.fixture
def route_calls(monkeypatch):
    """How many times the fused op's backward ran a structured route."""
    calls = []
    original = adapted_module.structured_grads

    def spy(*args, **kwargs):
        calls.append(args[0].algorithm)
        return original(*args, **kwargs)

    monkeypatch.setattr(adapted_module, "structured_grads", spy)
    return calls


def _fused_grads(params, x, weight, grad_out, *, x_dtype, weight_dtype, factor_dtype, autocast=None, structured=None):
    """Gradients of the input and every factor through the fused op (cast to float64)."""
    leaves = {k: v.to(factor_dtype).clone().requires_grad_() for k, v in params.items()}
    x = x.to(x_dtype).clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = adapted_op(
            x, weight.to(weight_dtype), None, CONV, [DeltaTerm(LOHA, leaves, SCALE)], structured_grads=structured
        )
    out.backward(grad_out.to(out.dtype))
    return [x.grad.double(), *[p.grad.double() for p in leaves.values()]]


def _plain_float64_grads(params, x, weight, grad_out):
    """Plain autograd through conv(x, W + s·ΔW) with the einsum ΔW, float64."""
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    x = x.clone().requires_grad_()
    F.conv2d(x, weight + SCALE * _einsum_delta(leaves), padding=1).backward(grad_out)
    return [x.grad, *[p.grad for p in leaves.values()]]


def test_tucker_as_lowrank_is_the_hadamard_of_the_two_rebuilds():
    params = _data()[0]
    left, core, right = loha_tucker_as_lowrank(params)
    assert left.shape == (CHANNELS, RANK**2) and right.shape == (RANK**2, CHANNELS) and core.shape[:2] == (4, 4)
    rebuilt = torch.einsum("p i, i j k l, j q -> p q k l", left, core, right)
    torch.testing.assert_close(rebuilt, _einsum_delta(params), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_route_gradients_match_float64_autograd(dtype, tol, route_calls):
    data = _data()
    got = _fused_grads(*data, x_dtype=dtype, weight_dtype=dtype, factor_dtype=dtype)
    assert route_calls == [LOHA]  # the cost model took the route
    for g, ref in zip(got, _plain_float64_grads(*data), strict=True):
        torch.testing.assert_close(g, ref, rtol=0, atol=tol * ref.abs().max().item())


# (input dtype, base weight dtype, autocast): the layer's products run in half precision
HALF = {
    "bf16": (torch.bfloat16, torch.bfloat16, None),
    "fp16": (torch.float16, torch.float16, None),
    "bf16-base-fp32-input": (torch.float32, torch.bfloat16, None),
    "autocast-bf16": (torch.float32, torch.float32, torch.bfloat16),
    "autocast-fp16": (torch.float32, torch.float32, torch.float16),
}


@pytest.mark.parametrize("structured", [None, True])
@pytest.mark.parametrize("case", sorted(HALF))
def test_half_precision_products_keep_the_dense_route(case, structured, route_calls):
    # float32 adapters on a half-precision layer: even when the route is asked for, the factor gradients are the dense
    # route's, bit for bit
    x_dtype, weight_dtype, autocast = HALF[case]
    data = _data()
    kwargs = {"x_dtype": x_dtype, "weight_dtype": weight_dtype, "factor_dtype": torch.float32, "autocast": autocast}
    got = _fused_grads(*data, **kwargs, structured=structured)
    dense = _fused_grads(*data, **kwargs, structured=False)
    assert route_calls == []
    for g, ref in zip(got, dense, strict=True):
        assert torch.equal(g, ref)


@pytest.mark.parametrize(
    "dtype, expected",
    [(torch.float64, True), (torch.float32, True), (torch.bfloat16, False), (torch.float16, False)],
)
def test_cost_model_takes_the_route_only_in_float32_or_wider(dtype, expected):
    # the 320-channel SDXL ResNet conv at rank 8 (the route pays off); flat LoHa's route stays open in half precision
    shape = torch.Size((320, 320, 3, 3))
    for tucker, accurate in ((True, expected), (False, True)):
        params = {n: torch.empty(s) for n, s in loha_layout(320, 320, (3, 3), 8, tucker).shapes.items()}
        assert structured_grads_pay_off(CONV, DeltaTerm(LOHA, params, 1.0), shape, dtype) is accurate, tucker


@pytest.mark.parametrize("tf32", [False, True])
def test_float32_on_cuda_with_tf32_convolutions_keeps_the_dense_route(tf32, monkeypatch):
    # cuDNN's TF32 (PyTorch's default for convolutions) rounds float32 operands to 10 mantissa bits, as float16
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    shape = torch.Size((320, 320, 3, 3))
    params = {n: torch.empty(s) for n, s in loha_layout(320, 320, (3, 3), 8, True).shapes.items()}
    term = DeltaTerm(LOHA, params, 1.0)
    assert structured_grads_pay_off(CONV, term, shape, torch.float32, device_type="cuda") is not tf32
    assert structured_grads_pay_off(CONV, term, shape, torch.float64, device_type="cuda")
    assert structured_grads_pay_off(CONV, term, shape, torch.float32, device_type="cpu")
