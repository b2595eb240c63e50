"""gradcheck in float64 through the adapted layers' forward, in every LoHa and LoKr mode."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from peft_lyco import LoHaConfig, LoKrConfig
from tests.conftest import adapted_layer

MODES = {
    "loha-linear": (lambda: nn.Linear(6, 8), LoHaConfig(r=2, alpha=1, init_weights=False)),
    "loha-1x1": (lambda: nn.Conv2d(4, 6, 1), LoHaConfig(r=2, alpha=1, init_weights=False)),
    "loha-flat": (lambda: nn.Conv2d(3, 4, 3, padding=1), LoHaConfig(r=2, alpha=1, init_weights=False)),
    "loha-tucker": (lambda: nn.Conv2d(3, 4, 3, padding=1), LoHaConfig(r=2, alpha=1, use_tucker=True, init_weights=False)),
    "loha-grouped": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=2), LoHaConfig(r=2, alpha=1, init_weights=False)),
    "lokr-linear": (lambda: nn.Linear(16, 16), LoKrConfig(r=1, alpha=1, init_weights=False)),
    "lokr-1x1": (lambda: nn.Conv2d(16, 16, 1), LoKrConfig(r=1, alpha=1, init_weights=False)),
    "lokr-flat": (lambda: nn.Conv2d(16, 16, 3, padding=1), LoKrConfig(r=1, alpha=1, factor=2, init_weights=False)),
    "lokr-tucker": (
        lambda: nn.Conv2d(16, 16, 3, padding=1),
        LoKrConfig(r=1, alpha=1, factor=2, use_tucker=True, init_weights=False),
    ),
    "lokr-full-matrix": (lambda: nn.Linear(6, 8), LoKrConfig(r=64, alpha=1, init_weights=False)),
    "lokr-decompose-both": (
        lambda: nn.Linear(64, 64),
        LoKrConfig(r=1, alpha=1, factor=16, decompose_both=True, init_weights=False),
    ),
}


def _input(layer):
    if isinstance(layer, nn.Conv2d):
        return torch.randn(1, layer.in_channels, 4, 4, dtype=torch.float64)
    return torch.randn(2, layer.in_features, dtype=torch.float64)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_gradcheck_through_forward(mode):
    make, config = MODES[mode]
    layer = adapted_layer(make().double(), config)
    params = layer.adapter_parameters("default")
    names = sorted(params)
    if mode == "lokr-decompose-both":
        assert "lokr_w1_a" in names and "lokr_w2_a" in names
    if mode == "lokr-full-matrix":
        assert names == ["lokr_w1", "lokr_w2"]
    if mode.endswith("tucker"):
        assert any(n.endswith(("_t1", "_t2")) for n in names)
    leaves = [params[n].detach().clone().requires_grad_(True) for n in names]
    x = _input(layer.get_base_layer()).requires_grad_(True)

    def run(x, *tensors):
        return functional_call(layer, {f"{n}.default": t for n, t in zip(names, tensors)}, (x,))

    # every factor must reach the output, or the check below would pass vacuously
    for i in range(len(leaves)):
        changed = [leaf * (1.5 if j == i else 1.0) for j, leaf in enumerate(leaves)]
        assert not torch.allclose(run(x, *changed), run(x, *leaves)), names[i]
    assert torch.autograd.gradcheck(run, (x, *leaves), eps=1e-6, atol=1e-6)
