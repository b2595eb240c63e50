"""ΔW formulas against element-wise fp64 references, and the custom LoHa backward against autograd."""

import itertools

import pytest
import torch

from peft_lyco.functional import (
    add_delta,
    delta_weight,
    loha_delta_weight,
    lokr_delta_weight,
    rank_dropout_mask,
)

f64 = dict(dtype=torch.float64)


def _rand(*shape):
    return torch.randn(*shape, **f64)


def _tucker_reference(t, w_a, w_b):
    """Tucker rebuild written as explicit sums: out[p, r, k, l] = Σ_i Σ_j t[i, j, k, l] · w_a[i, p] · w_b[j, r]."""
    rank, _, kh, kw = t.shape
    out = torch.zeros(w_a.shape[1], w_b.shape[1], kh, kw, **f64)
    for i, j in itertools.product(range(rank), range(rank)):
        out += t[i, j][None, None] * w_a[i][:, None, None, None] * w_b[j][None, :, None, None]
    return out


def test_loha_flat_matches_hadamard_formula():
    w1a, w1b, w2a, w2b = _rand(6, 3), _rand(3, 10), _rand(6, 3), _rand(3, 10)
    expected = 0.25 * (w1a @ w1b) * (w2a @ w2b)
    assert torch.allclose(loha_delta_weight(w1a, w1b, w2a, w2b, scale=0.25), expected, atol=1e-12)


def test_loha_tucker_matches_explicit_sums():
    t1, t2 = _rand(3, 3, 3, 3), _rand(3, 3, 3, 3)
    w1a, w2a, w1b, w2b = _rand(3, 6), _rand(3, 6), _rand(3, 5), _rand(3, 5)
    expected = 0.5 * _tucker_reference(t1, w1a, w1b) * _tucker_reference(t2, w2a, w2b)
    got = loha_delta_weight(w1a, w1b, w2a, w2b, t1, t2, scale=0.5)
    assert got.shape == (6, 5, 3, 3)
    assert torch.allclose(got, expected, atol=1e-12)


def test_lokr_matches_element_form():
    w1, w2a, w2b = _rand(4, 3), _rand(5, 2), _rand(2, 7)
    w2 = w2a @ w2b
    got = lokr_delta_weight(w1=w1, w2_a=w2a, w2_b=w2b, scale=2.0)
    assert got.shape == (20, 21)
    for a, b, c, d in itertools.product(range(4), range(5), range(3), range(7)):
        assert abs(got[a * 5 + b, c * 7 + d] - 2.0 * w1[a, c] * w2[b, d]) < 1e-12


def test_lokr_flat_conv_equals_4d_kron():
    # a flat conv's 2-D kron reshaped to the weight equals the kron of w1 with the 4-D w2 (kohya's flat conv LoKr)
    w1, w2a, w2b = _rand(2, 3), _rand(4, 2), _rand(2, 5 * 9)
    flat = lokr_delta_weight(w1=w1, w2_a=w2a, w2_b=w2b).reshape(8, 15, 3, 3)
    four_d = torch.kron(w1[:, :, None, None], (w2a @ w2b).reshape(4, 5, 3, 3))
    assert torch.allclose(flat, four_d, atol=1e-12)


def test_lokr_tucker_and_decomposed_w1():
    w1a, w1b, t2, w2a, w2b = _rand(4, 2), _rand(2, 3), _rand(2, 2, 3, 3), _rand(2, 5), _rand(2, 7)
    got = lokr_delta_weight(w1_a=w1a, w1_b=w1b, t2=t2, w2_a=w2a, w2_b=w2b, scale=0.5)
    w1 = w1a @ w1b
    w2 = _tucker_reference(t2, w2a, w2b)
    expected = 0.5 * torch.einsum("ac,bdkl->abcdkl", w1, w2).reshape(20, 21, 3, 3)
    assert torch.allclose(got, expected, atol=1e-12)


def test_delta_weight_dispatches_on_kohya_names():
    params = {"lokr_w1": _rand(2, 2), "lokr_w2": _rand(3, 3)}
    assert torch.equal(delta_weight(params, 3.0), 3.0 * torch.kron(params["lokr_w1"], params["lokr_w2"]))
    with pytest.raises(ValueError, match="not a LoHa or LoKr"):
        delta_weight({"lora_up.weight": _rand(2, 2)})
    with pytest.raises(ValueError, match="both hada_t1 and hada_t2"):
        loha_delta_weight(_rand(2, 3), _rand(2, 3), _rand(2, 3), _rand(2, 3), _rand(2, 2, 1, 1), None)


def _loha_plain(w1a, w1b, w2a, w2b, t1=None, t2=None, scale=1.0):
    """The same ΔW written for plain autograd (no custom backward)."""
    if t1 is None:
        return (w1a @ w1b) * (w2a @ w2b) * scale
    r1 = torch.einsum("ijkl,jr,ip->prkl", t1, w1b, w1a)
    r2 = torch.einsum("ijkl,jr,ip->prkl", t2, w2b, w2a)
    return r1 * r2 * scale


@pytest.mark.parametrize("tucker", [False, True])
def test_loha_custom_backward_passes_gradcheck(tucker):
    if tucker:
        args = [_rand(3, 4), _rand(3, 5), _rand(3, 4), _rand(3, 5), _rand(3, 3, 3, 3), _rand(3, 3, 3, 3)]
    else:
        args = [_rand(4, 3), _rand(3, 5), _rand(4, 3), _rand(3, 5)]
    for a in args:
        a.requires_grad_(True)
    fn = lambda *xs: loha_delta_weight(*xs, scale=0.7)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("tucker", [False, True])
def test_loha_custom_backward_equals_plain_autograd(tucker):
    if tucker:
        args = [_rand(4, 12), _rand(4, 9), _rand(4, 12), _rand(4, 9), _rand(4, 4, 3, 3), _rand(4, 4, 3, 3)]
    else:
        args = [_rand(12, 4), _rand(4, 9), _rand(12, 4), _rand(4, 9)]
    weight = _rand(12, 9, 3, 3) if tucker else _rand(12, 9)
    grads = []
    for fn in (loha_delta_weight, _loha_plain):
        leaves = [a.clone().requires_grad_(True) for a in args]
        (fn(*leaves, scale=0.3) * weight).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for ours, plain in zip(*grads):
        assert torch.allclose(ours, plain, atol=1e-10, rtol=1e-10)


def test_loha_custom_backward_saves_only_factors():
    w = [torch.randn(640, 8, requires_grad=True), torch.randn(8, 2880, requires_grad=True)] * 2
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loha_delta_weight(*w)
    assert sum(saved) == 2 * (640 * 8 + 8 * 2880)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_delta_sums_half_weights_in_float32(dtype):
    weight = torch.randn(16, 8).to(dtype)
    delta = torch.randn(16, 8) * 1e-3
    expected = (weight.float() + delta).to(dtype)
    assert torch.equal(add_delta(weight, delta), expected)
    assert torch.equal(add_delta(expected, delta, sign=-1), (expected.float() - delta).to(dtype))


def test_rank_dropout_mask_semantics():
    mask = rank_dropout_mask(10000, 0.25, rescale=True, dtype=torch.float64)
    assert set(mask.unique().tolist()) == {0.0, 1.0 / 0.75}
    assert abs((mask > 0).float().mean().item() - 0.75) < 0.03
    plain = rank_dropout_mask(100, 0.25, rescale=False)
    assert set(plain.unique().tolist()) <= {0.0, 1.0}
