"""``torch.compile(fullgraph=True)`` of networks with every LoHa/LoKr layer mode: no graph breaks, forward and
gradients equal to eager, one recompile at most when the token count changes (aspect-ratio bucketing).

The networks (``benchmarks.modes``) hold Linear, Conv2d flat/Tucker/grouped, LoKr low-rank/decompose_both/full
matrix, two active adapters, the second with rank dropout. Width 1 takes the dense gradient routes, width 8 the
structured ones. The fast tests trace with ``aot_eager`` (dynamo + AOT autograd: what decides graph breaks and
fullgraph, forward and backward); the slow ones also generate code with inductor.
"""

import copy
import itertools
import math

import pytest
import torch
import torch._inductor.config as inductor_config
from peft import inject_adapter_in_model
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from benchmarks.modes import (
    adapted_layers,
    adapted_net,
    max_relative_error,
    net_input,
    relative_error,
    store_bases_in,
    training_step,
)
from peft_lyco import LoKrConfig
from tests.conftest import Holder

TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _graph_breaks(net, x) -> tuple[int, list[str]]:
    explanation = torch._dynamo.explain(net)(x)
    return explanation.graph_break_count, [str(reason.reason).splitlines()[0] for reason in explanation.break_reasons]


def _compiled_matches_eager(net, x, backend):
    compiled = torch.compile(net, fullgraph=True, backend=backend)
    eager = training_step(net, net, x)
    ours = training_step(net, compiled, x)
    error, where = max_relative_error(ours, eager)
    assert error <= TOLERANCE, (error, where)
    return error


@pytest.mark.slow
@pytest.mark.parametrize("width", [1, 8])
@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
def test_no_graph_breaks(algorithm, width):
    net = adapted_net(algorithm, width=width)
    assert _graph_breaks(net, net_input(width)) == (0, [])


# fullgraph=True fails on any graph break, so these also prove there are none (``explain`` counts them in the slow set)
@pytest.mark.parametrize("algorithm, width, training", [("lokr", 8, True), ("loha", 1, True)])
def test_fullgraph_compile_matches_eager(algorithm, width, training):
    net = adapted_net(algorithm, width=width).train(training)
    _compiled_matches_eager(net, net_input(width), "aot_eager")


def test_fullgraph_compile_of_no_grad_inference_matches_eager():
    net = adapted_net("lokr", width=8).eval()
    x = net_input(8)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert relative_error(compiled(x), net(x)) <= TOLERANCE


class _Tokens(torch.nn.Module):
    """One Linear over a varying number of tokens (a LoKr on it takes the structured route, chunked by tokens)."""

    def __init__(self):
        super().__init__()
        self.lin_a = torch.nn.Linear(128, 256)

    def forward(self, x):
        return self.lin_a(x)


def test_token_count_change_recompiles_once():
    net = adapted_net("lokr", base=_Tokens())
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(net, fullgraph=True, backend=counter)
    for tokens in (16, 36, 25):
        x = torch.randn(2, tokens, 128)
        error, where = max_relative_error(training_step(net, compiled, x), training_step(net, net, x))
        assert error <= TOLERANCE, (tokens, error, where)
    assert counter.frame_count == 2  # the first call's static shapes, then one graph for any token count


def test_fullgraph_compile_under_autocast_with_a_float8_base():
    net = adapted_net("loha", width=8, adapters=("a",))
    store_bases_in(net, torch.float8_e4m3fn)

    def forward(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net(x)

    x = net_input(8)
    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    eager = training_step(net, forward, x)
    ours = training_step(net, compiled, x)
    error, where = max_relative_error(ours, eager)
    assert error <= 1e-2, (error, where)  # bf16: the compiled graph may round in another order


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("width", [1, 8])
@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_matrix(backend, algorithm, width, training):
    net = adapted_net(algorithm, width=width).train(training)
    assert _graph_breaks(net, net_input(width)) == (0, [])
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):  # rank dropout draws as eager does
        _compiled_matches_eager(net, net_input(width), backend)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
def test_inductor_on_cuda_under_autocast_with_a_float8_base(algorithm):
    net = adapted_net(algorithm, width=8).cuda()
    store_bases_in(net, torch.float8_e4m3fn)

    def forward(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return net(x)

    x = net_input(8, device="cuda")
    eager = training_step(net, forward, x)
    with inductor_config.patch(fallback_random=True):
        ours = training_step(net, torch.compile(forward, fullgraph=True), x)
    error, where = max_relative_error(ours, eager)
    assert error <= 2e-2, (error, where)


# ------------------------------------------------------------------------------------------------ module dropout
def _with_module_dropout(net: nn.Module, p: float) -> nn.Module:
    for layer in adapted_layers(net):
        for adapter in layer.module_dropout:
            layer.module_dropout[adapter] = p
    return net


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["loha", "lokr"])
def test_no_graph_breaks_with_module_dropout(algorithm):
    """Every layer mode with module dropout on both adapters (the second also with rank dropout), in training."""
    net = _with_module_dropout(adapted_net(algorithm), 0.5).train()
    assert _graph_breaks(net, net_input()) == (0, [])


def _two_adapter_layer(p_a: float, p_b: float, *, dora: bool = False) -> nn.Module:
    """A Linear with LoKr adapters "a" (DoRA when asked, its magnitude moved off ``‖W‖``) and "b", both active, each
    with its own module dropout; random factors so that every subset of kept adapters gives another output."""
    torch.manual_seed(0)
    holder = Holder(nn.Linear(16, 32))
    for name, p in (("a", p_a), ("b", p_b)):
        config = LoKrConfig(
            r=1, alpha=1, factor=4, init_weights=False, module_dropout=p, weight_decompose=dora and name == "a"
        )
        config.target_modules = ["layer"]
        inject_adapter_in_model(config, holder, adapter_name=name)
    layer = holder.layer
    layer.set_adapter(["a", "b"])
    if dora:
        with torch.no_grad():
            layer.dora_scale["a"].mul_(1.25)
    return layer.train()


def _subset_references(layer: nn.Module, x: torch.Tensor) -> dict[tuple[str, ...], tuple[torch.Tensor, dict]]:
    """Per subset of kept adapters: the float64 output and gradients (input, then each parameter; zero for a dropped
    adapter's) of one step of ``sum(out²)/2`` with exactly those adapters, no dropout."""
    references = {}
    for kept in itertools.chain.from_iterable(itertools.combinations("ab", n) for n in range(3)):
        ref = copy.deepcopy(layer).double()
        for adapter in "ab":
            ref.module_dropout[adapter] = 0.0
        params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
        xd = x.detach().double().requires_grad_(True)
        if kept:
            ref.set_adapter(list(kept))
        out = ref(xd) if kept else ref.get_base_layer()(xd)
        out.square().sum().div(2).backward()
        grads = {"input": xd.grad}
        grads.update({n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in params.items()})
        references[kept] = (out.detach(), grads)
    return references


def _kept_subset(out: torch.Tensor, references: dict) -> tuple[str, ...]:
    """The subset whose reference output ``out`` is (the subsets' outputs differ by far more than the tolerance)."""
    errors = {kept: relative_error(out, ref) for kept, (ref, _) in references.items()}
    kept = min(errors, key=errors.get)
    assert errors[kept] <= 1e-5, errors
    return kept


def _binomial_bound(n: int, p: float) -> float:
    """Five standard deviations of a Binomial(n, p) count (a correct coin falls outside with probability < 1e-6)."""
    return 5 * math.sqrt(n * p * (1 - p))


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "fullgraph"])
def test_module_dropout_skip_frequency(compiled):
    """Each adapter is dropped with its own probability, independently of the other, eager (skipped) and compiled
    (a tensor-valued keep factor in the graph): counts within a binomial bound of ``n·p``, jointly too."""
    p_a, p_b, n = 0.3, 0.6, 300
    layer = _two_adapter_layer(p_a, p_b)
    x = torch.randn(4, 16)
    references = _subset_references(layer, x)
    forward = torch.compile(layer, fullgraph=True, backend="aot_eager") if compiled else layer
    torch.manual_seed(1)
    with torch.no_grad():
        outcomes = [_kept_subset(forward(x), references) for _ in range(n)]
    dropped_a = sum("a" not in kept for kept in outcomes)
    dropped_b = sum("b" not in kept for kept in outcomes)
    dropped_both = sum(kept == () for kept in outcomes)
    assert abs(dropped_a - n * p_a) <= _binomial_bound(n, p_a), dropped_a
    assert abs(dropped_b - n * p_b) <= _binomial_bound(n, p_b), dropped_b
    assert abs(dropped_both - n * p_a * p_b) <= _binomial_bound(n, p_a * p_b), dropped_both


def _compiled_steps_match_float64(dora: bool, device: str, backend: str) -> None:
    """fullgraph-compiled training steps: each step's output and gradients equal the float64 step with exactly the
    adapters it kept (a dropped adapter's gradients are zero, a dropped DoRA adapter leaves the base weight as it is),
    and every subset of kept adapters occurs."""
    layer = _two_adapter_layer(0.5, 0.5, dora=dora).to(device)
    x = torch.randn(4, 16, device=device)
    references = _subset_references(layer, x)
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    params = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    seen = set()
    for seed in range(40):
        step = training_step(layer, compiled, x, seed=seed)
        kept = _kept_subset(step.output, references)
        seen.add(kept)
        reference_grads = references[kept][1]
        for name, grad in step.grads.items():
            assert relative_error(grad, reference_grads[name]) <= TOLERANCE, (kept, name)
            if name in params and not any(f".{adapter}" in name for adapter in kept):
                assert torch.count_nonzero(grad) == 0, (kept, name)
        if len(seen) == 4:
            break
    assert len(seen) == 4, seen


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
@pytest.mark.parametrize("dora", [False, True], ids=["lokr", "dora"])
def test_compiled_module_dropout_steps_match_float64(dora):
    _compiled_steps_match_float64(dora, "cpu", "aot_eager")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_inductor_module_dropout_steps_on_cuda_match_float64():
    """The keep factor drawn by inductor's own generator on the GPU: still one of the float64 subsets per step."""
    _compiled_steps_match_float64(True, "cuda", "inductor")
