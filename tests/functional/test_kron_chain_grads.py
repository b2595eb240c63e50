"""The Linear LoKr route's hand-written derivative (``_kron_chain_grads``) against float64 autograd through the dense
ΔW, for every subset of wanted factors, with and without the input gradient, and in mixed precision; and the cached
order search against a fresh one."""

from itertools import combinations

import pytest
import torch

from peft_lyco.functional import lokr_layout
from peft_lyco.functional.lokr import _ORDERS, LOKR, _cheapest_order, _kron_halves, _search_order

LAYOUTS = {
    "w1-full-w2-lowrank": lokr_layout(16, 24, (), 2, factor=4),
    "both-lowrank": lokr_layout(16, 24, (), 1, factor=4, decompose_both=True),
    "both-full": lokr_layout(8, 6, (), 8, factor=2, warn=False),
}


def _factors(layout, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g, dtype=dtype) * 0.5 for name, shape in layout.shapes.items()}


def _reference(params, x, grad, scale, want):
    """``(factor grads, input grad)`` by float64 autograd through ``x @ (scale · ΔW)ᵀ`` with the dense ΔW."""
    leaves = {n: p.detach().double().requires_grad_(n in want) for n, p in params.items()}
    x64 = x.detach().double().requires_grad_(True)
    out = x64 @ LOKR.delta(leaves, scale).T
    out.backward(grad.double())
    return {n: leaves[n].grad for n in want}, x64.grad


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("input_grad", [False, True])
def test_every_subset_of_wanted_factors_matches_autograd(name, input_grad):
    params = _factors(LAYOUTS[name], torch.float64)
    names = list(params)
    g = torch.Generator().manual_seed(1)
    out_features, in_features = LOKR.delta(params, 1.0).shape
    x = torch.randn(7, in_features, generator=g, dtype=torch.float64)
    grad = torch.randn(7, out_features, generator=g, dtype=torch.float64)
    pieces = [(x[:3], grad[:3]), (x[3:], grad[3:])]  # two chunks: the factor gradients are summed over them
    for count in range(len(names) + 1):
        for want in combinations(names, count):
            grads, grad_x = LOKR.linear_grads(params, list(want), pieces, 0.3, input_grad)
            ref, ref_x = _reference(params, x, grad, 0.3, want)
            assert len(grads) == len(want)
            for n, got in zip(want, grads):
                assert got.dtype == torch.float64
                assert torch.allclose(got, ref[n], rtol=1e-10, atol=1e-12), (name, want, n)
            if input_grad:
                assert torch.allclose(torch.cat(grad_x), ref_x, rtol=1e-10, atol=1e-12), (name, want)
            else:
                assert grad_x == []


def test_mixed_precision_gradients_come_back_in_the_factors_dtype():
    # bf16 input and output gradient (autocast), float32 factors: products in bf16, gradients summed in float32
    params = _factors(LAYOUTS["w1-full-w2-lowrank"], torch.float32)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 24, generator=g).bfloat16()
    grad = torch.randn(40, 16, generator=g).bfloat16()
    pieces = [(x[:20], grad[:20]), (x[20:], grad[20:])]
    grads, grad_x = LOKR.linear_grads(params, list(params), pieces, 0.5, True)
    ref, ref_x = _reference(params, x.float(), grad.float(), 0.5, list(params))
    for n, got in zip(params, grads):
        assert got.dtype == torch.float32
        assert torch.allclose(got.double(), ref[n], rtol=3e-2, atol=3e-2 * ref[n].abs().max().item()), n
    assert grad_x[0].dtype == torch.bfloat16
    assert torch.allclose(torch.cat(grad_x).double(), ref_x, rtol=3e-2, atol=3e-2 * ref_x.abs().max().item())


def test_cached_order_is_the_searched_order_for_each_shape_set():
    # two layouts whose shapes differ: the cache must not hand one the other's order
    for layout in (lokr_layout(64, 64, (), 4, factor=8), lokr_layout(64, 64, (), 4, factor=2, decompose_both=True)):
        params = _factors(layout, torch.float32)
        left, right = _kron_halves(params)
        shapes = (tuple(tuple(m.shape) for m in left), tuple(tuple(m.shape) for m in right))
        _ORDERS.pop(shapes, None)
        first = _cheapest_order(left, right)
        assert shapes in _ORDERS and first == _search_order(*shapes)
        assert _cheapest_order(left, right) == first


def _dispatched_ops(fn) -> int:
    """How many ATen ops ``fn`` dispatches (the profiler counts the ones a kernel calls inside itself too)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for event in prof.events() if event.name.startswith("aten::"))


def test_strided_tokens_cost_the_same_ops_whatever_the_token_count():
    """A layer whose input and output gradient are permuted views (SDXL's proj_in/proj_out get ``(B, C, H, W)``
    maps seen as tokens) runs each chain step as one product, as for contiguous tokens. Strided 3-D tokens made
    ``matmul`` run a batched product with one small copy per token: 2048 extra ops per 1024 tokens on the real slice,
    a third of LoKr's cost above LoRA there."""
    params = _factors(lokr_layout(1280, 1280, (), 8, factor=8), torch.float32)  # an SDXL 1280-wide layer's
    out_features, in_features = LOKR.delta(params, 1.0).shape

    def run(tokens):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(1, in_features, tokens, generator=g).transpose(1, 2)  # (1, tokens, in) with stride 1 on tokens
        grad = torch.randn(1, out_features, tokens, generator=g).transpose(1, 2)
        pieces = [(x.reshape(-1, in_features), grad.reshape(-1, out_features))]
        return _dispatched_ops(lambda: LOKR.linear_grads(params, list(params), pieces, 0.5, True))

    assert run(16) == run(256)
