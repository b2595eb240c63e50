"""The layers' fused training op against plain autograd through ``op(x, W + Σ scale·ΔW)``, in the situations a
training loop meets: several adapters, dropouts, half-precision bases, stacked tuner layers, trainable bases,
inference, every conv padding flavour, and what is kept for backward."""

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import inject_adapter_in_model
from torch import nn

from peft_lyco import LoHaConfig, LoKrConfig
from peft_lyco.functional import rank_dropout_mask
from tests.conftest import Holder

# several adapters are injected one after another into one holder, which PEFT warns about by design
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")

CONFIGS = {
    "loha": lambda **kw: LoHaConfig(r=2, alpha=1, init_weights=False, **kw),
    "loha-tucker": lambda **kw: LoHaConfig(r=2, alpha=1, use_tucker=True, init_weights=False, **kw),
    "lokr": lambda **kw: LoKrConfig(r=1, alpha=1, factor=4, init_weights=False, **kw),
    "lokr-tucker": lambda **kw: LoKrConfig(r=1, alpha=1, factor=4, use_tucker=True, init_weights=False, **kw),
}
BASES = {"linear": lambda: nn.Linear(16, 32), "conv": lambda: nn.Conv2d(8, 16, 3, padding=1)}


def _input(base, dtype=torch.float32):
    shape = (3, 5, base.in_features) if isinstance(base, nn.Linear) else (2, base.in_channels, 6, 6)
    return torch.randn(shape, dtype=dtype)


def _with_adapters(base, kind, names=("default",), **kw):
    """``base`` wrapped with one adapter per name (all active), each with its own random factors."""
    holder = Holder(copy.deepcopy(base))
    for name in names:
        config = CONFIGS[kind](**kw)
        config.target_modules = ["layer"]
        inject_adapter_in_model(config, holder, adapter_name=name)
    holder.layer.set_adapter(list(names))
    return holder.layer


def _base_op(layer, x, weight):
    base = layer.get_base_layer()
    return F.linear(x, weight, base.bias) if isinstance(base, nn.Linear) else base._conv_forward(x, weight, base.bias)


def _adapter_grads(layer):
    return {n: p.grad for n, p in layer.named_parameters() if p.requires_grad and "base_layer" not in n}


def _compare(layer, x, reference, *, fused=None, tol=1e-5):
    """Forward + backward through the layer (or ``fused``) and through ``reference(x)``; outputs and gradients of the
    input and of every adapter factor close."""
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs, grads = [], []
    for fn, xi in ((fused or layer, xs[0]), (reference, xs[1])):
        layer.zero_grad(set_to_none=True)
        out = fn(xi)
        out.float().pow(2).sum().backward()
        outs.append(out.detach())
        grads.append({"x": xi.grad, **_adapter_grads(layer)})
    assert torch.allclose(outs[0], outs[1], atol=tol, rtol=tol)
    assert grads[0].keys() == grads[1].keys()
    for name, ref in grads[1].items():
        assert ref is not None and grads[0][name] is not None, name
        scale = ref.float().abs().max().item()
        assert torch.allclose(grads[0][name].float(), ref.float(), rtol=tol, atol=tol * scale), name
    return outs[0]


@pytest.mark.parametrize(
    "kind, base_kind",
    [(k, b) for k in sorted(CONFIGS) for b in sorted(BASES) if b == "conv" or not k.endswith("tucker")],
)
def test_multiple_active_adapters_match_plain_autograd(kind, base_kind):
    layer = _with_adapters(BASES[base_kind]().requires_grad_(False), kind, names=("a", "b", "c"))
    layer.set_scale("b", 0.5)
    x = _input(layer.get_base_layer())

    def plain(x):
        deltas = [layer.get_delta_weight(n) for n in ("a", "b", "c")]
        return _base_op(layer, x, layer.get_base_layer().weight + deltas[0] + deltas[1] + deltas[2])

    _compare(layer, x, plain)


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_rank_dropout_masks_rows_in_forward_and_backward(kind, rescale):
    layer = _with_adapters(
        nn.Linear(16, 32), kind, names=("a", "b"), rank_dropout=0.5, rank_dropout_scale=rescale
    ).train()
    x = _input(layer.get_base_layer())

    def plain(x):
        # the layer draws one row mask per adapter per call, in adapter order: redraw them from the same seed
        torch.manual_seed(7)
        weight = layer.get_base_layer().weight
        for name in ("a", "b"):
            mask = rank_dropout_mask(32, 0.5, rescale)
            weight = weight + layer.get_delta_weight(name) * mask[:, None]
        return F.linear(x, weight, layer.get_base_layer().bias)

    def fused(x):
        torch.manual_seed(7)
        return layer(x)

    out = _compare(layer, x, plain, fused=fused)
    torch.manual_seed(8)
    assert not torch.allclose(layer(x), out), "a new call must draw a new mask"


def test_module_dropout_skips_the_adapter_and_its_gradients():
    layer = _with_adapters(nn.Linear(16, 32), "lokr", names=("a",), module_dropout=0.5).train()
    x = _input(layer.get_base_layer()).requires_grad_(True)
    base = layer.get_base_layer()
    skipped = kept = 0
    for _ in range(40):
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        out.sum().backward()
        grads = _adapter_grads(layer)
        if torch.equal(out, base(x)):
            skipped += 1
            assert all(g is None for g in grads.values())
        else:
            kept += 1
            assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert skipped > 5 and kept > 5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["loha", "lokr", "loha-tucker"])
def test_half_base_float32_adapters_sum_in_float32(kind, dtype):
    base = BASES["conv" if kind.endswith("tucker") else "linear"]().to(dtype).requires_grad_(False)
    layer = _with_adapters(base, kind, names=("a", "b"))
    assert all(p.dtype == torch.float32 for n in ("a", "b") for p in layer.adapter_parameters(n).values())
    x = _input(base, dtype)

    def plain(x):
        delta = layer.get_delta_weight("a") + layer.get_delta_weight("b")
        return _base_op(layer, x, (base.weight.float() + delta).to(dtype))

    out = _compare(layer, x, plain, tol=2e-2)
    assert out.dtype == dtype
    with torch.no_grad():
        assert torch.equal(layer(x), plain(x))  # bit-identical forward: same summation as merge


@pytest.mark.parametrize("inner, outer", [("loha", "lokr"), ("lokr", "loha-tucker"), ("loha-tucker", "lokr-tucker")])
def test_stacked_tuner_layers_bypass_into_the_inner_output(inner, outer):
    base = BASES["conv"]().requires_grad_(False)
    holder = Holder(copy.deepcopy(base))
    for name, kind in (("inner", inner), ("outer", outer)):
        config = CONFIGS[kind]()
        config.target_modules = ["layer"]
        holder = inject_adapter_in_model(config, holder, adapter_name=name)
    layer = holder.layer
    assert layer.base_layer is not layer.get_base_layer()
    x = _input(base)

    def plain(x):
        weight = base.weight + layer.base_layer.get_delta_weight("inner") + layer.get_delta_weight("outer")
        return F.conv2d(x, weight, base.bias, padding=1)

    _compare(layer, x, plain)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_trainable_base_weight_gets_the_plain_gradient(kind):
    layer = _with_adapters(nn.Linear(16, 32), kind)
    base = layer.get_base_layer().requires_grad_(True)  # full fine-tuning beside the adapter
    x = _input(base)
    grads = []
    for use_layer in (True, False):
        layer.zero_grad(set_to_none=True)
        out = layer(x) if use_layer else F.linear(x, base.weight + layer.get_delta_weight("default"), base.bias)
        out.pow(2).sum().backward()
        grads.append((base.weight.grad, base.bias.grad))
    for got, ref in zip(*grads):
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_no_grad_inference_keeps_no_graph():
    layer = _with_adapters(nn.Linear(16, 32), "loha")
    x = _input(layer.get_base_layer())
    with torch.no_grad():
        out = layer(x)
        expected = F.linear(
            x, layer.get_base_layer().weight + layer.get_delta_weight("default"), layer.get_base_layer().bias
        )
    assert out.grad_fn is None and torch.allclose(out, expected, atol=1e-6)
    with torch.inference_mode():
        assert torch.equal(layer(x), out)


CONV_FLAVOURS = {
    "same-odd-kernel": lambda: nn.Conv2d(8, 16, 3, padding="same"),
    "same-even-kernel": lambda: nn.Conv2d(8, 16, (2, 4), padding="same", dilation=(1, 1)),
    "same-dilated": lambda: nn.Conv2d(8, 16, 2, padding="same", dilation=3),
    "valid-strided": lambda: nn.Conv2d(8, 16, 3, padding="valid", stride=2),
    "reflect": lambda: nn.Conv2d(8, 16, 3, padding=2, padding_mode="reflect", dilation=2),
    "circular-asymmetric": lambda: nn.Conv2d(8, 16, (3, 1), padding=(1, 0), padding_mode="circular"),
    "replicate-grouped": lambda: nn.Conv2d(8, 16, 3, padding=1, padding_mode="replicate", groups=4),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("unbatched", [False, True])
@pytest.mark.parametrize("flavour", sorted(CONV_FLAVOURS))
def test_every_conv_padding_flavour_matches_the_base_op(flavour, unbatched):
    layer = _with_adapters(CONV_FLAVOURS[flavour]().requires_grad_(False), "loha")
    x = _input(layer.get_base_layer())[0 if unbatched else slice(None)]

    def plain(x):
        return layer.get_base_layer()._conv_forward(
            x, layer.get_base_layer().weight + layer.get_delta_weight("default"), layer.get_base_layer().bias
        )

    out = _compare(layer, x, plain)
    assert out.shape == plain(x).shape == layer.get_base_layer()(x).shape


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_backward_keeps_input_frozen_weight_and_factors_only(kind):
    base = BASES["conv" if kind.endswith("tucker") else "linear"]().requires_grad_(False)
    layer = _with_adapters(base, kind, names=("a", "b")).train()
    x = _input(base).requires_grad_(True)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    allowed = {t.untyped_storage().data_ptr() for t in [x, *layer.parameters()]}
    assert set(saved) <= allowed
    assert sum(saved.values()) <= x.untyped_storage().nbytes() + sum(
        p.untyped_storage().nbytes() for p in layer.parameters()
    )
