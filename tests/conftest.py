"""Shared test helpers: wrap a single layer with our adapter, copy tensors into LyCORIS' modules."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peft_lyco  # noqa: F401  (registers the tuner types)


class Holder(nn.Module):
    """A one-layer model so PEFT can target the layer by name."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def adapted_layer(base: nn.Module, config) -> nn.Module:
    """A deep copy of ``base`` with our adapter injected as adapter "default" (config.target_modules is set here)."""
    from peft import inject_adapter_in_model

    config.target_modules = ["layer"]
    holder = inject_adapter_in_model(config, Holder(copy.deepcopy(base)))
    return holder.layer


@pytest.fixture(scope="session", autouse=True)
def _one_cpu_thread():
    """Every model in the suite is tiny: torch's intra-op thread pool only adds overhead on the 2-core CI machine
    (measured 60 s vs 320 s for tests/convert + tests/diffusers while the other core was busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
