"""Our layers' forward equals lycoris-lora 4.1.3's forward with the same tensors, in every mode (fp32, <= 1e-5)."""

import pytest
import torch
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from torch import nn

from peft_lyco import LoHaConfig, LoKrConfig
from tests.conftest import adapted_layer

TOL = 1e-5


def _input(layer):
    if isinstance(layer, nn.Conv2d):
        return torch.randn(2, layer.in_channels, 8, 8)
    return torch.randn(3, 5, layer.in_features)


def _compare(base, ours_config, theirs_cls, **theirs_kwargs):
    ours = adapted_layer(base, ours_config)
    params = ours.adapter_parameters("default")
    theirs = theirs_cls("m", base, multiplier=1.0, **theirs_kwargs)
    their_params = dict(theirs.named_parameters())
    assert set(params) == {n for n in their_params if n.startswith(("hada_", "lokr_"))}
    with torch.no_grad():
        for name, tensor in params.items():
            tensor.normal_(std=0.2)
            their_params[name].copy_(tensor)
    x = _input(base)
    with torch.no_grad():
        diff = (ours(x) - theirs(x)).abs().max().item()
        effect = (ours(x) - base(x)).abs().max().item()
    assert effect > 1e-3, "the adapter must change the output for the comparison to mean anything"
    assert diff <= TOL, f"max abs diff {diff:.3g}"
    return diff


LOHA_CASES = {
    "linear": (lambda: nn.Linear(320, 640), {}),
    "linear_1280": (lambda: nn.Linear(1280, 1280), {}),
    "conv1x1": (lambda: nn.Conv2d(640, 320, 1), {}),
    "conv3x3_flat": (lambda: nn.Conv2d(32, 64, 3, padding=1), {}),
    "conv3x3_tucker": (lambda: nn.Conv2d(32, 64, 3, padding=1), {"use_tucker": True}),
    "conv1x1_tucker_falls_back": (lambda: nn.Conv2d(64, 32, 1), {"use_tucker": True}),
    "grouped_conv": (lambda: nn.Conv2d(32, 64, 3, padding=1, groups=4), {}),
    "tiny": (lambda: nn.Linear(4, 4), {}),
}


@pytest.mark.parametrize("case", sorted(LOHA_CASES))
def test_loha_matches_lycoris(case):
    make, extra = LOHA_CASES[case]
    rank = 2 if case == "tiny" else 8
    config = LoHaConfig(r=rank, alpha=4, init_weights=False, **extra)
    _compare(make(), config, LohaModule, lora_dim=rank, alpha=4, **extra)


LOKR_CASES = {
    "linear": (lambda: nn.Linear(1280, 640), {}),
    "linear_5120": (lambda: nn.Linear(1280, 5120), {}),
    "conv1x1": (lambda: nn.Conv2d(640, 320, 1), {}),
    "conv3x3_flat": (lambda: nn.Conv2d(320, 640, 3, padding=1), {}),
    "conv3x3_tucker": (lambda: nn.Conv2d(320, 640, 3, padding=1), {"use_tucker": True}),
    "decompose_both": (lambda: nn.Linear(320, 640), {"decompose_both": True}),
    "unbalanced": (lambda: nn.Linear(320, 640), {"unbalanced_factorization": True}),
    "full_matrix_flag": (lambda: nn.Linear(320, 640), {"full_matrix": True}),
    "tiny": (lambda: nn.Linear(4, 4), {}),
}


@pytest.mark.parametrize("case", sorted(LOKR_CASES))
@pytest.mark.parametrize("factor", [-1, 4, 8, 16, 32])
def test_lokr_matches_lycoris(case, factor):
    make, extra = LOKR_CASES[case]
    rank = 1 if case == "tiny" else 4
    config = LoKrConfig(r=rank, alpha=2, factor=factor, init_weights=False, **extra)
    _compare(make(), config, LokrModule, lora_dim=rank, alpha=2, factor=factor, **extra)


@pytest.mark.parametrize("make", [lambda: nn.Linear(320, 640), lambda: nn.Conv2d(320, 640, 3, padding=1), lambda: nn.Conv2d(64, 32, 1)])
@pytest.mark.parametrize("factor", [-1, 8])
def test_lokr_full_matrix_fallback_matches_lycoris(make, factor):
    # a rank this large makes both halves full: scale 1, alpha ignored, in both implementations
    config = LoKrConfig(r=100000, alpha=3, factor=factor, init_weights=False)
    _compare(make(), config, LokrModule, lora_dim=100000, alpha=3, factor=factor)
