"""LoHa/LoKr on quantized Linear bases (bitsandbytes 8-bit and 4-bit, torchao int8), injected through PEFT as PEFT
does LoRA on them: the adapters run beside the quantized layer, gradients reach the factors and the input, merging
dequantizes and quantizes again with a warning (bitsandbytes) or refuses (torchao). All of these run on CPU."""

import copy
import warnings

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_lyco import LoHaConfig, LoKrConfig
from peft_lyco.functional import delta_weight
from tests.conftest import Holder

bnb = pytest.importorskip("bitsandbytes")
torchao_quantization = pytest.importorskip("torchao.quantization")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:bitsandbytes")

IN, OUT = 64, 48
CUDA = pytest.param(
    "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
)


def _plain() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(IN, OUT)


def _bnb_int8(plain: nn.Linear, device: str) -> nn.Module:
    layer = bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=False, threshold=0.0)
    layer.load_state_dict(plain.state_dict())
    return layer.to(device)  # quantizes


def _bnb_nf4(plain: nn.Linear, device: str) -> nn.Module:
    layer = bnb.nn.Linear4bit(IN, OUT, quant_type="nf4", compute_dtype=torch.float32)
    layer.load_state_dict(plain.state_dict())
    return layer.to(device)


def _torchao_int8(plain: nn.Linear, device: str) -> nn.Module:
    holder = nn.Sequential(copy.deepcopy(plain).to(device))
    torchao_quantization.quantize_(holder, torchao_quantization.Int8WeightOnlyConfig())
    return holder[0]


BASES = {"bnb-int8": _bnb_int8, "bnb-nf4": _bnb_nf4, "torchao-int8": _torchao_int8}
CONFIGS = {
    "loha": lambda: LoHaConfig(r=4, alpha=4, init_weights=False, target_modules=["layer"]),
    "lokr": lambda: LoKrConfig(r=2, alpha=2, factor=4, init_weights=False, target_modules=["layer"]),
}


def _adapted(base_name: str, kind: str, device: str = "cpu"):
    quantized = BASES[base_name](_plain(), device)
    model = get_peft_model(Holder(quantized), CONFIGS[kind]())
    layer = model.base_model.model.layer
    with torch.no_grad():  # a ΔW whose effect on the output is far above the quantization error
        for tensor in layer.adapter_parameters("default").values():
            tensor.normal_(std=0.6)
    return model, layer, quantized


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("base_name", list(BASES))
def test_quantized_base_forward_and_gradients_match_base_plus_adapter(base_name, kind, device):
    model, layer, quantized = _adapted(base_name, kind, device)
    assert layer.get_base_layer() is quantized
    x = torch.randn(2, 5, IN, device=device, requires_grad=True)
    out = model(x)
    out.backward(out.detach())
    params = layer.adapter_parameters("default")

    # reference: the quantized layer's own output and input gradient, plus the adapter in float64 by plain autograd
    x_ref = x.detach().clone().requires_grad_(True)
    base_out = quantized(x_ref)
    leaves = {name: p.detach().double().requires_grad_(True) for name, p in params.items()}
    adapter = x_ref.double() @ delta_weight(leaves, layer.scaling["default"]).T
    reference = base_out.double() + adapter
    torch.autograd.backward([base_out, adapter], [out.detach(), out.detach().double()])

    effect = adapter.abs().max().item()
    assert (out.double() - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()
    assert effect > 0.5 * base_out.abs().max().item()  # the adapter matters in this comparison
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4 * x_ref.grad.abs().max().item())
    for name, param in params.items():
        expected = leaves[name].grad
        assert torch.allclose(param.grad.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item()), name
    assert quantized.weight.grad is None


def _dequantized(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight
    if isinstance(weight, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    scales = weight.SCB if weight.SCB is not None else layer.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float()


def _round_trip(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` quantized as ``layer`` stores its weight, and dequantized: what a merge can at best store."""
    if isinstance(layer.weight, bnb.nn.Params4bit):
        data, state = bnb.functional.quantize_4bit(
            weight,
            blocksize=layer.weight.blocksize,
            compress_statistics=layer.weight.compress_statistics,
            quant_type=layer.weight.quant_type,
        )
        return bnb.functional.dequantize_4bit(data, state).float()
    rows, scales, _ = bnb.functional.int8_vectorwise_quant(weight.half())
    return bnb.functional.int8_vectorwise_dequant(rows, scales).float()


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("base_name", ["bnb-int8", "bnb-nf4"])
def test_bitsandbytes_merge_requantizes_with_a_warning(base_name, kind):
    model, layer, quantized = _adapted(base_name, kind)
    x = torch.randn(4, IN)
    delta = layer.get_delta_weight("default").detach()
    original = _dequantized(quantized)
    with pytest.warns(UserWarning, match="dequantizes the weight, adds ΔW and quantizes it again"):
        layer.merge()
    base = layer.get_base_layer()
    assert layer.merged and type(base.weight) is type(quantized.weight)
    merged = _dequantized(base)
    assert torch.allclose(merged, _round_trip(base, original + delta), atol=1e-6)
    assert (merged - (original + delta)).abs().max() < 0.2 * delta.abs().max()  # it did move by ΔW
    with torch.no_grad():  # the merged model runs the quantized layer alone, on the merged weight
        assert torch.equal(model(x), base(x))
    with pytest.warns(UserWarning, match="quantizes it again"):
        layer.unmerge()
    assert not layer.merged
    assert torch.allclose(_dequantized(layer.get_base_layer()), _round_trip(base, merged - delta), atol=1e-6)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_torchao_merge_is_refused_and_leaves_the_layer_as_it_was(kind):
    model, layer, quantized = _adapted("torchao-int8", kind)
    weight = quantized.weight
    x = torch.randn(3, IN)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(ValueError, match=r"'layer' \(adapter default\): cannot merge into a torchao-quantized"):
        layer.merge()
    assert quantized.weight is weight and not layer.merged
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(model(x), before)
