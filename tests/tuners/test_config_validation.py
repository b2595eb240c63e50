"""Bad configs are refused before a model is touched: non-finite alpha anywhere, unsupported or malformed targets,
and invalid adapter names, each with a message naming the field or module (issue 9 items 6, 7, 11)."""

import pytest
import torch
from peft import get_peft_model, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_lyco import LoHaConfig, LoKrConfig
from peft_lyco.presets import build_config

NON_FINITE = [float("inf"), float("-inf"), float("nan")]
CONFIGS = [LoHaConfig, LoKrConfig]


class Mixed(nn.Module):
    """Linear layers and a transformers Conv1D (GPT-2 style) that LoHa/LoKr cannot adapt."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.c_attn = Conv1D(8, 8)
        self.z = nn.Linear(8, 8)

    def forward(self, x):
        return self.z(self.c_attn(self.a(x)))


def structure(model):
    return [(name, type(module)) for name, module in model.named_modules()]


@pytest.mark.parametrize("config_cls", CONFIGS)
@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("field", ["alpha", "conv_alpha", "alpha_pattern"])
def test_non_finite_alpha_is_refused_everywhere(config_cls, value, field):
    kwargs = {"alpha_pattern": {"proj": value}} if field == "alpha_pattern" else {field: value}
    with pytest.raises(ValueError, match=rf"{config_cls.__name__}\.{field}.*finite"):
        config_cls(target_modules=["a"], **kwargs)


@pytest.mark.parametrize("value", ["8", True, [1.0]])
def test_alpha_of_the_wrong_type_is_refused(value):
    with pytest.raises(TypeError, match=r"LoHaConfig\.alpha"):
        LoHaConfig(alpha=value)


def test_finite_alpha_still_works_and_gives_a_finite_no_op():
    model = inject_adapter_in_model(LoKrConfig(alpha=1e3, target_modules=["a"]), Mixed())
    x = torch.randn(2, 8)
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("value", NON_FINITE)
def test_build_config_refuses_non_finite_network_alpha(value):
    with pytest.raises(ValueError, match="network_alpha"):
        build_config("lokr", Mixed(), network_alpha=value, target_modules=["a"])


@pytest.mark.parametrize("config_cls", CONFIGS)
@pytest.mark.parametrize(
    "targets",
    [
        "all-linear",
        ["a", "c_attn", "z"],
        r".*(a|c_attn|z)",
    ],
    ids=["all-linear", "list", "regex"],
)
@pytest.mark.parametrize("entry", ["inject", "get_peft_model"])
def test_unsupported_target_is_refused_before_the_model_is_touched(config_cls, targets, entry):
    """'all-linear' selected transformers' Conv1D and raised after 'a' was already replaced (issue 9.7)."""
    model = Mixed()
    before = structure(model)
    config = config_cls(r=2, target_modules=targets)
    with pytest.raises(ValueError, match=r"c_attn.*Conv1D"):
        if entry == "inject":
            inject_adapter_in_model(config, model)
        else:
            get_peft_model(model, config)
    assert structure(model) == before and not hasattr(model, "peft_config")


def test_a_failure_during_injection_leaves_the_model_as_it_was(monkeypatch):
    """Anything that fails after the first replacement (here: the second module) is rolled back."""
    from peft_lyco.tuners.model import LycoTuner

    model = inject_adapter_in_model(LoHaConfig(r=2, target_modules=["a"]), Mixed(), adapter_name="kept")
    before = structure(model)
    real = LycoTuner._create_and_replace
    calls = []

    def failing(self, config, adapter_name, target, target_name, parent, current_key):
        calls.append(current_key)
        if len(calls) == 2:
            raise RuntimeError("simulated failure")
        return real(self, config, adapter_name, target, target_name, parent, current_key)

    monkeypatch.setattr(LycoTuner, "_create_and_replace", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        inject_adapter_in_model(LoHaConfig(r=2, target_modules=["a", "z"]), model, adapter_name="new")
    assert structure(model) == before and len(calls) == 2
    assert list(model.a.layouts) == ["kept"] and model.a.active_adapters == ["kept"]


@pytest.mark.parametrize("config_cls", CONFIGS)
def test_layers_to_transform_and_patterns_are_checked_first(config_cls):
    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), Conv1D(4, 4)) for _ in range(2)])

    model = Blocks()
    before = structure(model)
    config = config_cls(r=2, target_modules=["0", "1"], layers_to_transform=[1], layers_pattern="layers")
    with pytest.raises(ValueError, match=r"layers\.1\.1.*Conv1D"):
        inject_adapter_in_model(config, model)
    assert structure(model) == before
    ok = inject_adapter_in_model(
        config_cls(r=2, target_modules=["0"], layers_to_transform=[1], layers_pattern="layers"), model
    )
    assert isinstance(ok.layers[1][0], BaseTunerLayer) and type(ok.layers[0][0]) is nn.Linear


@pytest.mark.parametrize("name, error", [("a.b", ValueError), ("", ValueError), (123, TypeError)])
def test_bad_adapter_names_are_refused_before_injection(name, error):
    model = Mixed()
    before = structure(model)
    with pytest.raises(error, match="adapter_name"):
        inject_adapter_in_model(LoKrConfig(r=2, target_modules=["a"]), model, adapter_name=name)
    assert structure(model) == before
