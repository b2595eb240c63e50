"""Initialisation, scaling, dropouts, dtypes, devices and the errors a user sees."""

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_lyco import LoHaConfig, LoKrConfig
from tests.conftest import Holder, adapted_layer

ALGOS = {"loha": LoHaConfig, "lokr": LoKrConfig}


def _linear_effect(layer, base, x):
    with torch.no_grad():
        return layer(x) - base(x)


# ------------------------------------------------------------------------------------------------------------ init
@pytest.mark.parametrize("algo", sorted(ALGOS))
@pytest.mark.parametrize("init", [True, "lycoris", "peft"])
@pytest.mark.parametrize("tucker", [False, True])
def test_default_inits_are_a_no_op(algo, init, tucker):
    base = nn.Conv2d(16, 32, 3, padding=1)
    layer = adapted_layer(base, ALGOS[algo](r=2, factor=2, init_weights=init, use_tucker=tucker) if algo == "lokr" else ALGOS[algo](r=2, init_weights=init, use_tucker=tucker))
    x = torch.randn(1, 16, 5, 5)
    assert torch.equal(layer(x), base(x))
    assert all(p.abs().sum() > 0 for n, p in layer.adapter_parameters("default").items() if n not in ("hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a", "lokr_w2_b", "lokr_w2"))


def test_lycoris_init_distributions():
    layer = adapted_layer(nn.Linear(512, 512), LoHaConfig(r=64))
    p = layer.adapter_parameters("default")
    assert torch.equal(p["hada_w2_a"], torch.zeros_like(p["hada_w2_a"]))
    assert abs(p["hada_w1_a"].std().item() - 0.1) < 0.01
    assert abs(p["hada_w1_b"].std().item() - 1.0) < 0.05
    kr = adapted_layer(nn.Linear(512, 512), LoKrConfig(r=4)).adapter_parameters("default")
    assert torch.equal(kr["lokr_w2_b"], torch.zeros_like(kr["lokr_w2_b"]))
    bound = 1 / kr["lokr_w1"].shape[1] ** 0.5  # kaiming_uniform(a=sqrt 5) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert kr["lokr_w1"].abs().max() <= bound and kr["lokr_w1"].abs().max() > 0.8 * bound
    peft_style = adapted_layer(nn.Linear(512, 512), LoKrConfig(r=4, init_weights="peft")).adapter_parameters("default")
    assert torch.equal(peft_style["lokr_w1"], torch.zeros_like(peft_style["lokr_w1"]))


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_init_weights_false_gives_a_non_zero_adapter(algo):
    base = nn.Linear(64, 64)
    layer = adapted_layer(base, ALGOS[algo](r=2, init_weights=False))
    assert _linear_effect(layer, base, torch.randn(2, 64)).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------------------- scaling
def test_scale_is_alpha_over_r_applied_once():
    base = nn.Linear(32, 16)
    layer = adapted_layer(base, LoHaConfig(r=4, alpha=1, init_weights=False))
    p = {k: v.detach() for k, v in layer.adapter_parameters("default").items()}
    delta = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * (1 / 4)
    x = torch.randn(3, 32)
    assert torch.allclose(_linear_effect(layer, base, x), x @ delta.T, atol=1e-6)
    assert torch.allclose(layer.get_delta_weight("default"), delta, atol=1e-7)


def test_set_scale_scale_layer_unscale_layer():
    base = nn.Linear(32, 16)
    layer = adapted_layer(base, LoKrConfig(r=2, alpha=1, init_weights=False))
    x = torch.randn(3, 32)
    effect = _linear_effect(layer, base, x)
    layer.set_scale("default", 0.5)
    assert torch.allclose(_linear_effect(layer, base, x), 0.5 * effect, atol=1e-6)
    layer.scale_layer(3.0)
    assert torch.allclose(_linear_effect(layer, base, x), 1.5 * effect, atol=1e-6)
    layer.unscale_layer(3.0)
    assert torch.allclose(_linear_effect(layer, base, x), 0.5 * effect, atol=1e-6)
    layer.unscale_layer()
    assert torch.allclose(_linear_effect(layer, base, x), effect, atol=1e-6)


def test_unmerge_subtracts_what_merge_added_even_if_scale_changed():
    base = nn.Linear(32, 16)
    layer = adapted_layer(base, LoHaConfig(r=2, init_weights=False))
    layer.scale_layer(0.3)
    layer.merge()
    layer.unscale_layer()
    layer.unmerge()
    assert (layer.get_base_layer().weight - base.weight).abs().max() <= 1e-6


# -------------------------------------------------------------------------------------------------------- dropouts
def test_rank_dropout_masks_output_rows_with_kohya_rescale():
    base = nn.Linear(32, 64)
    layer = adapted_layer(base, LoHaConfig(r=4, init_weights=False, rank_dropout=0.5))
    x = torch.randn(5, 32)
    full = _linear_effect(layer.eval(), base, x)
    layer.train()
    dropped = _linear_effect(layer, base, x)
    kept = dropped.abs().sum(0) > 0
    assert 0 < kept.sum() < 64
    # one mask for the whole batch; kept rows are scaled by 1 / (1 - p)
    assert torch.allclose(dropped[:, kept], 2.0 * full[:, kept], atol=1e-5)
    layer.rank_dropout_scale["default"] = False
    dropped = _linear_effect(layer, base, x)
    kept = dropped.abs().sum(0) > 0
    assert torch.allclose(dropped[:, kept], full[:, kept], atol=1e-5)


def test_module_dropout_skips_whole_module_in_training_only():
    base = nn.Linear(8, 8)
    layer = adapted_layer(base, LoKrConfig(r=1, init_weights=False, module_dropout=0.5))
    x = torch.randn(2, 8)
    full = _linear_effect(layer.eval(), base, x)
    layer.train()
    outcomes = [_linear_effect(layer, base, x) for _ in range(400)]
    skipped = sum(torch.equal(o, torch.zeros_like(o)) for o in outcomes)
    assert all(torch.equal(o, torch.zeros_like(o)) or torch.allclose(o, full, atol=1e-6) for o in outcomes)
    assert 140 < skipped < 260
    layer.eval()
    assert all(torch.allclose(_linear_effect(layer, base, x), full) for _ in range(20))


# ---------------------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_half_base_with_float32_adapters(dtype, algo):
    base32 = nn.Linear(64, 32)
    layer = adapted_layer(base32.to(dtype), ALGOS[algo](r=4, init_weights=False))
    assert all(p.dtype == torch.float32 for p in layer.adapter_parameters("default").values())
    reference = adapted_layer(base32.float(), ALGOS[algo](r=4, init_weights=False))
    reference.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    x = torch.randn(4, 64)
    out = layer(x.to(dtype))
    assert out.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert torch.allclose(out.float(), reference(x), atol=tol, rtol=tol)
    unmerged = out.detach()
    weight_before = layer.get_base_layer().weight.detach().clone()
    layer.merge()
    expected = (weight_before.float() + layer.get_delta_weight("default")).to(dtype)
    assert torch.equal(layer.get_base_layer().weight, expected)
    assert torch.equal(layer(x.to(dtype)), unmerged)


def test_float32_base_with_bfloat16_adapters_and_gradients_flow():
    base = nn.Linear(64, 32)
    layer = adapted_layer(base, LoHaConfig(r=4, init_weights=False))
    layer.to(torch.bfloat16)
    layer.base_layer.float()
    x = torch.randn(4, 64, requires_grad=True)
    out = layer(x)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in layer.adapter_parameters("default").values())
    assert x.grad is not None


def test_adapters_follow_meta_device_of_base():
    with torch.device("meta"):
        base = nn.Linear(1280, 1280)
    layer = adapted_layer(base, LoKrConfig(r=8))
    assert all(p.is_meta for p in layer.adapter_parameters("default").values())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adapters_follow_cuda_base():
    base = nn.Linear(64, 64).cuda().to(torch.bfloat16)
    layer = adapted_layer(base, LoHaConfig(r=4, init_weights=False))
    assert all(p.is_cuda and p.dtype == torch.float32 for p in layer.adapter_parameters("default").values())
    assert layer(torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------- errors
class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.emb = nn.Embedding(10, 8)
        self.conv1d = nn.Conv1d(8, 8, 3)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("target", ["emb", "conv1d"])
def test_unsupported_layer_is_refused_by_name_and_model_untouched(target):
    model = Mixed()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"module '{target}' is a torch.nn.modules.*Linear and torch.nn.Conv2d"):
        get_peft_model(model, LoKrConfig(target_modules=["lin", target]))
    assert isinstance(model.lin, nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("field, value", [("r", 0), ("r", -3), ("conv_r", 0), ("rank_dropout", 1.0), ("init_weights", "kaiming")])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LoHaConfig(**{field: value})


def test_bad_factor_and_bad_rank_pattern():
    with pytest.raises(ValueError, match="factor"):
        LoKrConfig(factor=0)
    with pytest.raises(ValueError, match="rank_pattern"):
        LoKrConfig(rank_pattern={"lin": 0})


def test_grouped_conv_delta_has_grouped_weight_shape():
    base = nn.Conv2d(8, 16, 3, padding=1, groups=4)
    layer = adapted_layer(base, LoHaConfig(r=2, init_weights=False))
    delta = layer.get_delta_weight("default")
    assert delta.shape == base.weight.shape == (16, 2, 3, 3)
    x = torch.randn(1, 8, 5, 5)
    expected = nn.functional.conv2d(x, base.weight + delta, base.bias, padding=1, groups=4)
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_holder_forward_with_peft_model_training_step_changes_output():
    base = nn.Linear(16, 16)
    model = get_peft_model(Holder(copy.deepcopy(base)), LoKrConfig(r=2, factor=4, target_modules=["layer"]))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, target = torch.randn(8, 16), torch.randn(8, 16)
    before = model(x).detach()
    assert torch.equal(before, base(x))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        opt.step()
    assert not torch.allclose(model(x), before)
