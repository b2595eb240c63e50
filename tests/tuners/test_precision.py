"""Adapted layers in the precisions people train in, against a float64 run of the same network: autocast bf16/fp16,
half-precision bases with float32 adapters, full bf16, and bases stored in float8 (sd-scripts' ``--fp8_base``).

Each check runs every layer mode (Linear, Conv2d flat/Tucker/grouped, LoKr low-rank/decompose_both/full matrix, two
adapters, rank dropout) at two widths: width 1 takes the dense gradient route, width 8 the structured ones. The
tolerance is the error that plain autograd through ``op(x, W + ΣΔW)`` makes in the same precision (``unfused``): the
fused op may not be less accurate than the textbook formula (within a factor 2), and stays below a fixed bound.
"""

import copy

import pytest
import torch

from benchmarks.modes import (
    adapted_layers,
    adapted_net,
    max_relative_error,
    net_input,
    store_bases_in,
    training_step,
    unfused,
)

FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2]
CUDA = pytest.param(
    "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
)
DEVICES = ["cpu", CUDA]
# worst relative error (output and every gradient) allowed at all, per compute dtype
BOUND = {torch.bfloat16: 0.08, torch.float16: 0.01, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def _no_tf32():
    """Exact float32 products on CUDA while errors are measured (cuDNN convolutions default to TF32)."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _autocast(net, dtype):
    def forward(x):
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            return net(x)

    return forward


def _check(net, x, *, autocast=None, compute=None):
    """Our step and plain autograd's step in the net's precision, each against the float64 step (all on the input's
    device)."""
    net.to(x.device)
    reference_net = copy.deepcopy(net).double()
    reference = training_step(reference_net, reference_net, x.double())
    ours = training_step(net, _autocast(net, autocast), x)
    with unfused(net):
        plain = training_step(net, _autocast(net, autocast), x)
    assert ours.output.dtype == plain.output.dtype
    error, where = max_relative_error(ours, reference)
    plain_error, _ = max_relative_error(plain, reference)
    bound = BOUND[compute or autocast]
    assert error <= max(2 * plain_error, 1e-6) and error < bound, (error, where, plain_error)
    return error


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("width", [1, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
def test_autocast_matches_float64(algorithm, dtype, width, device):
    net = adapted_net(algorithm, width=width)
    _check(net, net_input(width, device=device), autocast=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
def test_half_bases_with_float32_adapters_match_float64(algorithm, dtype, autocast, device):
    net = adapted_net(algorithm, width=8)
    for layer in adapted_layers(net):
        layer.get_base_layer().to(dtype)
    x = net_input(8, dtype=torch.float32 if autocast else dtype, device=device)
    _check(net, x, autocast=dtype if autocast else None, compute=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
def test_full_bf16_matches_float64(algorithm, device):
    net = adapted_net(algorithm, width=8).to(torch.bfloat16)
    _check(net, net_input(8, dtype=torch.bfloat16, device=device), compute=torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
@pytest.mark.parametrize("fp8", FLOAT8)
@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
def test_float8_bases_upcast_per_call_and_match_float64(algorithm, fp8, autocast, device):
    net = adapted_net(algorithm, width=8).to(device)
    store_bases_in(net, fp8)
    weights = {name: (p.data_ptr(), p.dtype) for name, p in net.named_parameters()}
    x = net_input(8, device=device)
    _check(net, x, autocast=autocast, compute=autocast or torch.float32)
    # nothing upcast is kept: the stored weights are untouched, and autograd keeps no weight-sized upcast copy
    assert {name: (p.data_ptr(), p.dtype) for name, p in net.named_parameters()} == weights
    saved = []

    def pack(tensor):
        saved.append((tensor.dtype, tensor.numel()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = _autocast(net, autocast)(x.requires_grad_(True))
    out.float().sum().backward()
    weight_sizes = {layer.get_base_layer().weight.numel() for layer in adapted_layers(net)}
    assert saved and not [(dtype, n) for dtype, n in saved if n in weight_sizes and dtype != fp8]


def test_float8_base_that_requires_grad_is_refused():
    net = adapted_net("lokr")
    store_bases_in(net, torch.float8_e4m3fn)
    net.lin_a.get_base_layer().weight.requires_grad_(True)
    with pytest.raises(ValueError, match="module 'lin_a'.*float8 storage is for frozen bases"):
        net(net_input())


@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
def test_merging_into_float8_warns_and_rounds_the_sum(algorithm):
    net = adapted_net(algorithm, adapters=("a",))
    store_bases_in(net, torch.float8_e4m3fn)
    layer = net.lin_a
    weight = layer.get_base_layer().weight
    expected = (weight.float() + layer.get_delta_weight("a")).to(torch.float8_e4m3fn)
    with pytest.warns(UserWarning, match="'lin_a' \\(adapter a\\): merging into a torch.float8_e4m3fn base weight"):
        layer.merge()
    assert weight.dtype == torch.float8_e4m3fn and torch.equal(weight.float(), expected.float())
    with pytest.warns(UserWarning, match="does not restore the original bits"):
        layer.unmerge()
    assert weight.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("path", ["disabled", "merged", "none-active"])
@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
def test_float8_base_alone_is_upcast_per_call(algorithm, path):
    """With the adapters disabled, merged or none active, a float8 base runs as the float32 layer holding the same
    rounded values (``nn.Linear``/``nn.Conv2d`` cannot run a float8 weight themselves)."""
    net = adapted_net(algorithm, adapters=("a",), rank_dropout=0.0).eval()
    store_bases_in(net, torch.float8_e4m3fn)
    plain = copy.deepcopy(net)
    store_bases_in(plain, torch.float32)  # the float8-rounded values, stored in float32
    layers, plain_layers = list(adapted_layers(net)), list(adapted_layers(plain))
    x = net_input()
    if path == "merged":
        with pytest.warns(UserWarning, match="rounds W"):
            for layer in layers:
                layer.merge()
        for layer in plain_layers:
            layer.merge()
            weight = layer.get_base_layer().weight
            weight.data = weight.data.to(torch.float8_e4m3fn).float()  # the same rounding of W + ΔW
    else:
        for group in (layers, plain_layers):
            for layer in group:
                if path == "disabled":
                    layer.enable_adapters(False)
                else:
                    layer.set_adapter([])
    with torch.no_grad():
        ours, expected = net(x), plain(x)
    assert ours.dtype == torch.float32 and torch.allclose(ours, expected, rtol=1e-5, atol=1e-6)
