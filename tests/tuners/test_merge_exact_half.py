"""One summation rule for ``W + ΔW`` in fp16, bf16 and float8 bases: the weight the fused forward multiplies with, the
weight its backward rebuilds for ∂L/∂x, and the weight ``merge`` stores are the same bits, and the merged layer's
output is bit-identical to the unmerged one.

The weights are caught where the layer op receives them (``LinearOp``/``Conv2dOp`` forward and backward), so a
change to any one path's summation (say, summing in the half dtype, or rounding ΔW first) fails here.
"""

import copy
import dataclasses

import pytest
import torch
from peft import inject_adapter_in_model

from benchmarks.modes import adapted_layers, adapted_net, adapter_config, net_input, store_bases_in
from peft_lyco.functional import add_delta
from peft_lyco.functional.base_op import Conv2dOp, LinearOp
from peft_lyco.functional.delta import FLOAT8_DTYPES

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
# name: (base weight dtype, adapter dtype, input dtype, autocast dtype)
PRECISIONS = {
    "full bf16": (BF16, BF16, BF16, None),
    "full fp16": (F16, F16, F16, None),
    "bf16 base, fp32 adapters": (BF16, F32, BF16, None),
    "fp16 base, fp32 adapters": (F16, F32, F16, None),
    "fp32 base, autocast bf16": (F32, F32, F32, BF16),
    "full bf16, autocast bf16": (BF16, BF16, BF16, BF16),
    "bf16 base, fp32 adapters, autocast bf16": (BF16, F32, F32, BF16),
    "fp8 base, bf16 adapters": (torch.float8_e4m3fn, BF16, BF16, None),
    "fp8 base, fp32 adapters": (torch.float8_e5m2, F32, F32, None),
    "fp8 base, fp32 adapters, autocast bf16": (torch.float8_e4m3fn, F32, F32, BF16),
}


def _net(algorithm: str, precision: str, *, dora: bool = False) -> torch.nn.Module:
    """Every layer mode with adapter ``a`` (and, with ``dora``, a DoRA adapter ``b`` beside it) in this precision."""
    weight_dtype, adapter_dtype, _, _ = PRECISIONS[precision]
    net = adapted_net(algorithm, adapters=("a",), rank_dropout=0.0)
    if dora:
        config = dataclasses.replace(adapter_config(algorithm), weight_decompose=True)
        inject_adapter_in_model(config, net, adapter_name="b")
        for layer in adapted_layers(net):
            layer.set_adapter(["a", "b"])
    if weight_dtype in FLOAT8_DTYPES:  # the rest of the net in the adapters' dtype, as sd-scripts' --fp8_base
        net.to(adapter_dtype)
        store_bases_in(net, weight_dtype)
        return net
    net.to(weight_dtype)
    for layer in adapted_layers(net):
        for name in layer.active_adapters:
            for tensor in layer.adapter_parameters(name).values():
                tensor.data = tensor.data.to(adapter_dtype)
    return net


class _Spy:
    """Records the weight every layer op receives in forward and in backward (the rebuilt ``W + ΣΔW``), by layer."""

    def __init__(self, monkeypatch):
        self.forward: list[torch.Tensor] = []
        self.backward: list[torch.Tensor] = []
        for cls in (LinearOp, Conv2dOp):
            monkeypatch.setattr(cls, "forward", self._wrap(cls.forward, self.forward, 1))
            monkeypatch.setattr(cls, "backward", self._wrap(cls.backward, self.backward, 2))

    @staticmethod
    def _wrap(method, into, position):
        def spy(op, *args):
            weight = args[position]
            into.append(None if weight is None else weight.detach().clone())
            return method(op, *args)

        return spy


def _step(net, precision, x):
    _, _, _, autocast = PRECISIONS[precision]
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast or BF16, enabled=autocast is not None):
        out = net(x)
    out.float().square().sum().backward()
    return out.detach()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
def test_forward_backward_and_merge_use_one_summation(algorithm, precision, monkeypatch):
    weight_dtype, _, input_dtype, autocast = PRECISIONS[precision]
    net = _net(algorithm, precision).eval()
    x = net_input(dtype=input_dtype)
    spy = _Spy(monkeypatch)
    unmerged = _step(net, precision, x)
    layers = list(adapted_layers(net))
    assert len(spy.forward) == len(layers) and len(spy.backward) == len(layers)
    for layer, used, rebuilt in zip(layers, spy.forward, reversed(spy.backward)):
        assert rebuilt is not None and _same_bits(used, rebuilt), layer.module_name
        if autocast is None:  # merging runs outside autocast, which changes how ΔW's products are rounded
            weight = layer.get_base_layer().weight
            expected = add_delta(weight, layer.get_delta_weight("a"), dtype=used.dtype)
            assert _same_bits(used, expected), layer.module_name
    if weight_dtype in (BF16, F16) and autocast is None:  # float8 merges round the sum to float8 (with a warning)
        forward_weights = [w.clone() for w in spy.forward]
        for layer in layers:
            layer.merge()
        for layer, used in zip(layers, forward_weights):
            assert _same_bits(layer.get_base_layer().weight.data, used), layer.module_name
        with torch.no_grad():
            merged = net(x)
        assert _same_bits(merged, unmerged)


@pytest.mark.parametrize("precision", ["fp32 base, autocast bf16", "bf16 base, fp32 adapters, autocast bf16"])
@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
def test_dora_backward_rebuilds_forwards_weight_under_autocast(algorithm, precision, monkeypatch):
    """DoRA next to an additive adapter: the backward's ``M = W + ΔW_a + s ⊙ (W + ΔW_b) − W`` is forward's, bit for
    bit, under autocast too (its ``V = W + ΔW_b`` repeats forward's ΔW, whose products autocast rounded)."""
    _, _, input_dtype, _ = PRECISIONS[precision]
    net = _net(algorithm, precision, dora=True).eval()
    spy = _Spy(monkeypatch)
    _step(net, precision, net_input(dtype=input_dtype))
    layers = list(adapted_layers(net))
    assert len(spy.forward) == len(layers) and len(spy.backward) == len(layers)
    for layer, used, rebuilt in zip(layers, spy.forward, reversed(spy.backward)):
        assert rebuilt is not None and _same_bits(used, rebuilt), layer.module_name


@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
def test_input_gradient_alone_rebuilds_forwards_weight_under_autocast(algorithm, monkeypatch):
    """Frozen adapters (only ∂L/∂x wanted): the rebuilt weight, which then shares nothing with factor gradients, is
    forward's too."""
    precision = "bf16 base, fp32 adapters, autocast bf16"
    net = _net(algorithm, precision).eval().requires_grad_(False)
    spy = _Spy(monkeypatch)
    _step(net, precision, net_input(dtype=PRECISIONS[precision][2]))
    layers = list(adapted_layers(net))
    assert len(spy.forward) == len(layers) and len(spy.backward) == len(layers)
    for layer, used, rebuilt in zip(layers, spy.forward, reversed(spy.backward)):
        assert rebuilt is not None and _same_bits(used, rebuilt), layer.module_name


@pytest.mark.parametrize("precision", ["full bf16", "bf16 base, fp32 adapters", "full fp16"])
def test_unmerge_subtracts_with_the_same_rule(precision):
    net = _net("lokr", precision)
    weights = {layer: layer.get_base_layer().weight.data.clone() for layer in adapted_layers(net)}
    for layer, before in weights.items():
        delta = layer.get_delta_weight("a")
        layer.merge()
        merged = layer.get_base_layer().weight.data
        expected_merged = (before.double() + delta.double()).float().to(before.dtype)
        assert _same_bits(merged, expected_merged)
        layer.unmerge()
        expected = (expected_merged.double() - delta.double()).float().to(before.dtype)
        assert _same_bits(layer.get_base_layer().weight.data, expected)


def test_the_spy_sees_a_diverging_rule(monkeypatch):
    """The check above can fail: a forward that sums a bf16 base and float32 ΔW in bf16 is caught."""
    from peft_lyco.functional import adapted

    net = _net("loha", "bf16 base, fp32 adapters").eval()
    x = net_input(dtype=BF16)
    spy = _Spy(monkeypatch)
    original = adapted._merged_weight

    def half_sum(weight, total, dtype, *, owned=True):
        return original(weight, total, dtype, owned=owned) if weight is None else weight + total.to(dtype)

    monkeypatch.setattr(adapted, "_merged_weight", half_sum)
    copy.deepcopy(net)(x)
    layers = list(adapted_layers(net))
    differs = [
        not _same_bits(used, add_delta(layer.get_base_layer().weight, layer.get_delta_weight("a")))
        for layer, used in zip(layers, spy.forward)
    ]
    assert any(differs)


def test_safe_merge_catches_a_sum_that_overflows_the_half_dtype():
    """The finite check sees the sum as it will be stored: an fp16 weight near 65504 plus ΔW overflows to inf in fp16
    although the float32 sum is finite (the check used to look at the float32 sum and let inf through)."""
    net = _net("loha", "fp16 base, fp32 adapters")
    layer = next(adapted_layers(net))
    weight = layer.get_base_layer().weight
    with torch.no_grad():
        weight[0].fill_(65000.0)
        for tensor in layer.adapter_parameters("a").values():
            tensor.fill_(30.0)
    before = weight.data.clone()
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    assert torch.equal(weight.data, before) and not layer.merged_adapters
