"""An adapted layer reads its adapters' factors, scales and extras on every call (nothing is kept from one call to the
next): each change a user can make between two calls shows in the very next output, checked against a float64
reference built from the layer's state by hand (``W + Σ scaling · kron(w1, w2_a @ w2_b)``)."""

import torch
import torch.nn.functional as F
from torch import nn

from peft_lyco import LoKrConfig
from peft_lyco.compat import parameter_dict_entries
from peft_lyco.tuners.options import resolve_layer_spec
from tests.conftest import adapted_layer


def _layer(**options):
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    return adapted_layer(base, LoKrConfig(r=2, alpha=2, factor=4, init_weights=False, **options))


def _reference(layer, x, adapters):
    """Float64 output from the layer's current tensors and scalings, independent of its forward."""
    base = layer.get_base_layer()
    weight = base.weight.detach().double()
    for name in adapters:
        w1 = layer.lokr_w1[name].detach().double()
        w2 = layer.lokr_w2_a[name].detach().double() @ layer.lokr_w2_b[name].detach().double()
        weight = weight + layer.scaling[name] * torch.kron(w1, w2)
    return F.linear(x.double(), weight, base.bias.detach().double())


def _check(layer, x, adapters):
    with torch.no_grad():
        out = layer(x)
    assert torch.allclose(out.double(), _reference(layer, x, adapters), rtol=1e-5, atol=1e-5)


def test_each_change_between_calls_shows_in_the_next_output():
    layer = _layer()
    x = torch.randn(3, 64)
    _check(layer, x, ["default"])
    layer.set_scale("default", 0.25)  # the user weight
    _check(layer, x, ["default"])
    layer.scale_layer(3.0)
    _check(layer, x, ["default"])
    # a factor replaced by a new Parameter object (load_state_dict(assign=True), a device move)
    layer.lokr_w1["default"] = nn.Parameter(torch.randn(4, 4))
    _check(layer, x, ["default"])
    with torch.no_grad():  # and changed in place
        layer.lokr_w2_a["default"].mul_(-2.0)
    _check(layer, x, ["default"])
    layer.update_layer("other", *_spec(layer))
    layer.set_adapter(["default", "other"])
    _check(layer, x, ["default", "other"])
    layer.set_adapter("other")
    _check(layer, x, ["other"])
    layer.delete_adapter("other")
    assert layer.active_adapters == ["default"]
    _check(layer, x, ["default"])
    layer.double()  # dtype move: the factors' dtype is read per call too
    assert layer(x.double()).dtype == torch.float64
    _check(layer, x.double(), ["default"])


def _spec(layer):
    """A spec and config for a second adapter on ``layer`` (built the way the tuner builds one)."""
    config = LoKrConfig(r=2, alpha=4, factor=4, init_weights=False)
    return resolve_layer_spec(config, "layer", layer.get_base_layer()), config


def test_training_mode_and_rank_dropout_are_read_per_call():
    layer = _layer(rank_dropout=0.5)
    x = torch.randn(2, 64)
    layer.train()
    torch.manual_seed(1)
    with torch.no_grad():
        dropped = layer(x)
    assert not torch.allclose(dropped.double(), _reference(layer, x, ["default"]), rtol=1e-5, atol=1e-5)
    layer.eval()
    _check(layer, x, ["default"])


def test_parameter_dict_entries_are_the_public_lookups():
    layer = _layer(use_scalar=True)
    for key in ("default", "missing"):
        names = layer.algorithm.param_names + layer.extra_param_names
        public = {n: getattr(layer, n)[key] for n in names if key in getattr(layer, n)}
        found = parameter_dict_entries(layer, names, key)
        assert list(found) == list(public) and all(found[n] is public[n] for n in public)
    assert list(parameter_dict_entries(layer, ("scalar",), "default")) == ["scalar"]
