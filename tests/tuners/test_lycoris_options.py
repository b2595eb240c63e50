"""LyCORIS' remaining LoHa/LoKr options on our layers against lycoris-lora 4.1.3's modules given the same tensors:
DoRA (``weight_decompose``, both ``wd_on_output`` axes), ``use_scalar``, ``rs_lora``; outputs and every gradient in
fp64, in every mode; exact merge/unmerge; the plain ``dropout``; gradcheck of the fused DoRA op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from torch import nn

from peft_lyco import LoHaConfig, LoKrConfig
from peft_lyco.functional import DeltaTerm, algorithm_for
from peft_lyco.functional.adapted import adapted_op
from peft_lyco.functional.base_op import Conv2dOp, LinearOp
from peft_lyco.functional.dora import WeightDecompose, initial_magnitude
from tests.conftest import adapted_layer

TOL = 1e-10  # fp64

# mode: (base layer, our config class and options, their module class and options); small shapes, every layout
MODES = {
    "loha-linear": (lambda: nn.Linear(12, 10), LoHaConfig, {}, LohaModule, {}),
    "loha-conv-flat": (lambda: nn.Conv2d(6, 8, 3, padding=1), LoHaConfig, {}, LohaModule, {}),
    "loha-conv-1x1": (lambda: nn.Conv2d(6, 8, 1), LoHaConfig, {}, LohaModule, {}),
    "loha-conv-tucker": (lambda: nn.Conv2d(6, 8, 3, padding=1), LoHaConfig, {"use_tucker": True}, LohaModule, {"use_tucker": True}),
    "lokr-linear": (lambda: nn.Linear(32, 24), LoKrConfig, {"factor": 4}, LokrModule, {"factor": 4}),
    "lokr-linear-decompose-both": (lambda: nn.Linear(32, 64), LoKrConfig, {"factor": 8, "decompose_both": True}, LokrModule, {"factor": 8, "decompose_both": True}),
    "lokr-linear-full-matrix": (lambda: nn.Linear(32, 24), LoKrConfig, {"factor": 4, "full_matrix": True}, LokrModule, {"factor": 4, "full_matrix": True}),
    "lokr-conv-flat": (lambda: nn.Conv2d(16, 16, 3, padding=1), LoKrConfig, {"factor": 2}, LokrModule, {"factor": 2}),
    "lokr-conv-tucker": (lambda: nn.Conv2d(16, 16, 3, padding=1), LoKrConfig, {"factor": 2, "use_tucker": True}, LokrModule, {"factor": 2, "use_tucker": True}),
    "lokr-conv-full": (lambda: nn.Conv2d(16, 16, 3, padding=1), LoKrConfig, {"factor": 2, "full_matrix": True}, LokrModule, {"factor": 2, "full_matrix": True}),
}  # fmt: skip
# the layout each mode must get (so a size change cannot silently turn a mode into the full-matrix fallback)
EXPECTED = {
    "loha-linear": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "loha-conv-flat": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "loha-conv-1x1": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "loha-conv-tucker": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr-linear": ("lokr_w1", "lokr_w2_a", "lokr_w2_b"),
    "lokr-linear-decompose-both": ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"),
    "lokr-linear-full-matrix": ("lokr_w1", "lokr_w2"),
    "lokr-conv-flat": ("lokr_w1", "lokr_w2_a", "lokr_w2_b"),
    "lokr-conv-tucker": ("lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "lokr-conv-full": ("lokr_w1", "lokr_w2"),
}
RANK, ALPHA = 2, 1.5


def _pair(mode, *, dora=None, use_scalar=False, rs_lora=False, multiplier=1.0):
    """Our adapted layer and LyCORIS' module on the same fp64 base, with the same random tensors (non-zero ΔW)."""
    make, config_cls, ours_opts, theirs_cls, theirs_opts = MODES[mode]
    base = make().double()
    wd = {} if dora is None else {"weight_decompose": True, "wd_on_output": dora}
    config = config_cls(
        r=RANK, alpha=ALPHA, init_weights=False, use_scalar=use_scalar, rs_lora=rs_lora, **wd, **ours_opts
    )
    ours = adapted_layer(base, config)
    theirs_wd = {} if dora is None else {"weight_decompose": True, "wd_on_out": dora}
    theirs = theirs_cls(
        "m",
        ours.get_base_layer(),
        multiplier=multiplier,
        lora_dim=RANK,
        alpha=ALPHA,
        use_scalar=use_scalar,
        rs_lora=rs_lora,
        **theirs_wd,
        **theirs_opts,
    ).double()
    ours.set_scale("default", multiplier)
    assert set(ours.factor_parameters("default")) == set(EXPECTED[mode]), mode
    params = ours.adapter_parameters("default")
    their_params = dict(theirs.named_parameters())
    assert set(params) == set(their_params), (sorted(params), sorted(their_params))
    with torch.no_grad():
        for name, tensor in params.items():
            if name == "dora_scale":  # both start at ‖W‖ along the axis; move it off that point
                assert torch.allclose(tensor, their_params[name], rtol=1e-6)
                tensor.mul_(1 + 0.2 * torch.rand_like(tensor))
            elif name == "scalar":
                tensor.fill_(0.8)
            else:
                tensor.normal_(std=0.3)
            their_params[name].copy_(tensor)
    return ours, theirs, params, their_params


def _run(module, params, x):
    x = x.clone().requires_grad_(True)
    for p in params.values():
        p.grad = None
    out = module(x)
    out.pow(2).sum().backward()
    return out.detach(), x.grad, {name: p.grad for name, p in params.items()}


def _input(mode):
    base = MODES[mode][0]()
    if isinstance(base, nn.Conv2d):
        return torch.randn(2, base.in_channels, 5, 5, dtype=torch.float64)
    return torch.randn(3, base.in_features, dtype=torch.float64)


def parity(mode, **options):
    """Max abs differences (output, ∂L/∂x, every parameter gradient) between our layer and LyCORIS'."""
    ours, theirs, params, their_params = _pair(mode, **options)
    x = _input(mode)
    out, gx, grads = _run(ours, params, x)
    ref_out, ref_gx, ref_grads = _run(theirs, their_params, x)
    effect = (out - ours.get_base_layer()(x)).abs().max().item()
    assert effect > 1e-3, "the adapter must change the output for the comparison to mean anything"
    diffs = {"output": (out - ref_out).abs().max().item(), "x": (gx - ref_gx).abs().max().item()}
    for name, grad in grads.items():
        assert grad is not None and ref_grads[name] is not None, name
        diffs[name] = (grad - ref_grads[name]).abs().max().item()
    return diffs


@pytest.mark.parametrize("on_output", [True, False], ids=["out-axis", "in-axis"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_dora_matches_lycoris_outputs_and_gradients(mode, on_output):
    diffs = parity(mode, dora=on_output)
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("mode", ["loha-conv-tucker", "lokr-linear-decompose-both", "lokr-conv-flat"])
def test_dora_with_scalar_rs_lora_and_multiplier_matches_lycoris(mode):
    for on_output in (True, False):
        diffs = parity(mode, dora=on_output, use_scalar=True, rs_lora=True, multiplier=0.6)
        assert max(diffs.values()) <= TOL, (on_output, diffs)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_use_scalar_and_rs_lora_match_lycoris(mode):
    diffs = parity(mode, use_scalar=True, rs_lora=True, multiplier=0.7)
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("config_cls", [LoHaConfig, LoKrConfig])
@pytest.mark.parametrize("on_output", [True, False])
def test_dora_starts_at_the_base_layer_with_lycoris_init(config_cls, on_output):
    """LyCORIS init: ΔW = 0 and dora_scale = ‖W‖ along the axis, so the layer starts as the base layer."""
    base = nn.Linear(12, 8).double()
    layer = adapted_layer(base, config_cls(r=2, weight_decompose=True, wd_on_output=on_output))
    magnitude = layer.dora_scale["default"]
    dims = 1 if on_output else 0
    assert magnitude.shape == ((8, 1) if on_output else (1, 12)) and magnitude.requires_grad
    assert torch.allclose(magnitude, base.weight.norm(dim=dims, keepdim=True), rtol=1e-12)
    x = torch.randn(4, 12, dtype=torch.float64)
    assert torch.allclose(layer(x), base(x), atol=1e-12)


@pytest.mark.parametrize("config_cls", [LoHaConfig, LoKrConfig])
def test_use_scalar_starts_at_zero_with_random_factors(config_cls):
    layer = adapted_layer(nn.Linear(16, 16), config_cls(r=2, use_scalar=True))
    assert layer.scalar["default"].item() == 0.0
    assert all(p.abs().sum() > 0 for p in layer.factor_parameters("default").values())
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), layer.get_base_layer()(x))


def test_rs_lora_scale():
    layer = adapted_layer(nn.Linear(16, 16), LoHaConfig(r=16, alpha=4, rs_lora=True))
    assert layer.scaling["default"] == 1.0  # 4 / sqrt(16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["loha-conv-flat", "lokr-linear"])
def test_dora_merge_unmerge_exact(mode, dtype):
    """Merging gives the unmerged forward's weight; unmerging restores the base weight bit for bit."""
    ours, *_ = _pair(mode, dora=False, use_scalar=True)
    ours.to(dtype)  # the base; adapter tensors stay float (as PEFT keeps them)
    base = ours.get_base_layer()
    before = base.weight.detach().clone()
    x = _input(mode).to(dtype)
    with torch.no_grad():
        unmerged = ours(x)
        ours.merge()
        merged = ours(x)
        ours.unmerge()
    assert torch.equal(base.weight, before)
    tol = 1e-12 if dtype == torch.float32 else 0.0
    assert (merged.float() - unmerged.float()).abs().max().item() <= tol + (1e-5 if dtype == torch.float32 else 0.05)
    with torch.no_grad():
        ours.merge()
        ours.set_adapter("default")
        delta = base.weight.detach() - before
        ours.unmerge()
    assert torch.equal(base.weight, before) and delta.abs().max() > 0


def test_dora_get_delta_weight_is_the_effective_change():
    ours, *_ = _pair("lokr-linear", dora=True)
    base = ours.get_base_layer()
    x = _input("lokr-linear")
    with torch.no_grad():
        expected = F.linear(x, base.weight + ours.get_delta_weight("default"), base.bias)
        assert torch.allclose(ours(x), expected, atol=1e-12)


@pytest.mark.parametrize("on_output", [True, False])
@pytest.mark.parametrize("op", ["linear", "conv"])
def test_fused_dora_gradcheck_fp64(op, on_output):
    """gradcheck of the fused op with a DoRA term and an additive term (x, W, bias, factors, magnitude)."""
    g = torch.Generator().manual_seed(0)
    if op == "linear":
        base_op, wshape, xshape, names = LinearOp(), (6, 4), (3, 4), {"hada_w1_a": (6, 2), "hada_w1_b": (2, 4), "hada_w2_a": (6, 2), "hada_w2_b": (2, 4)}  # fmt: skip
    else:
        base_op, wshape, xshape = Conv2dOp((1, 1), (1, 1), (1, 1), 1), (4, 2, 3, 3), (1, 2, 4, 4)
        names = {"lokr_w1": (2, 1), "lokr_w2_a": (2, 1), "lokr_w2_b": (1, 18)}

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)

    x, weight, bias = rand(*xshape), rand(*wshape), rand(wshape[0])
    params = {name: rand(*shape) for name, shape in names.items()}
    extra = {"lokr_w1": rand(4, 1), "lokr_w2": rand(1, 2, 3, 3)} if op == "conv" else {"lokr_w1": rand(2, 2), "lokr_w2": rand(3, 2)}  # fmt: skip
    magnitude = (initial_magnitude(weight, on_output) * 1.3).requires_grad_(True)
    flat = [x, weight, bias, *params.values(), *extra.values(), magnitude]

    def fn(x, weight, bias, *rest):
        p = dict(zip(params, rest[: len(params)]))
        e = dict(zip(extra, rest[len(params) : -1]))
        terms = [
            DeltaTerm(algorithm_for(p), p, 0.7, None, WeightDecompose(rest[-1], on_output, 0.8)),
            DeltaTerm(algorithm_for(e), e, 0.5),
        ]
        return adapted_op(x, weight, bias, base_op, terms)

    assert torch.autograd.gradcheck(fn, flat, eps=1e-6, atol=1e-7)


def test_plain_dropout_drops_the_input_of_the_delta_branch():
    """Training: y = W x + b + ΔW · dropout(x) with one mask per call; eval: no dropout."""
    layer = adapted_layer(nn.Linear(8, 6).double(), LoKrConfig(r=2, factor=2, init_weights=False, dropout=0.5))
    base = layer.get_base_layer()
    x = torch.randn(4, 8, dtype=torch.float64)
    layer.train()
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.5)
    delta = layer.get_delta_weight("default")
    assert torch.allclose(out, base(x) + dropped @ delta.T, atol=1e-12)
    assert not torch.allclose(out, base(x) + x @ delta.T)
    layer.eval()
    assert torch.allclose(layer(x), base(x) + x @ delta.T, atol=1e-12)


def test_dropout_with_weight_decompose_is_refused():
    with pytest.raises(ValueError, match="dropout cannot be combined with weight_decompose"):
        LoKrConfig(weight_decompose=True, dropout=0.1)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        LoHaConfig(dropout=1.0)


def test_dora_per_module_through_option_pattern():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    from peft import inject_adapter_in_model

    config = LoKrConfig(
        r=2, target_modules=["0", "1"], option_pattern={"^1": {"weight_decompose": True, "wd_on_output": False}}
    )
    inject_adapter_in_model(config, model)  # fmt: skip
    assert "default" not in model[0].dora_scale and model[1].dora_scale["default"].shape == (1, 8)


@pytest.mark.parametrize("config_cls", [LoHaConfig, LoKrConfig])
def test_peft_saves_trains_and_loads_dora_scale_and_scalar(config_cls):
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    def model():
        return get_peft_model(
            nn.Sequential(nn.Linear(8, 8)),
            config_cls(r=2, target_modules=["0"], weight_decompose=True, wd_on_output=False, use_scalar=True),
        )

    first = model()
    trainable = {n for n, p in first.named_parameters() if p.requires_grad}
    assert {"base_model.model.0.dora_scale.default", "base_model.model.0.scalar.default"} <= trainable
    saved = {k: v + 1 for k, v in get_peft_model_state_dict(first).items()}
    assert {"base_model.model.0.dora_scale", "base_model.model.0.scalar"} <= set(saved)
    second = model()
    assert not set_peft_model_state_dict(second, saved).unexpected_keys
    assert torch.equal(second.base_model.model[0].dora_scale["default"], saved["base_model.model.0.dora_scale"])
    assert torch.equal(second.base_model.model[0].scalar["default"], saved["base_model.model.0.scalar"])
