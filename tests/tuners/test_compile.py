"""``torch.compile(fullgraph=True)`` of networks with every LoHa/LoKr layer mode: no graph breaks, forward and
gradients equal to eager, one recompile at most when the token count changes (aspect-ratio bucketing).

The networks (``benchmarks.modes``) hold Linear, Conv2d flat/Tucker/grouped, LoKr low-rank/decompose_both/full
matrix, two active adapters, the second with rank dropout. Width 1 takes the dense gradient routes, width 8 the
structured ones. The fast tests trace with ``aot_eager`` (dynamo + AOT autograd: what decides graph breaks and
fullgraph, forward and backward); the slow ones also generate code with inductor.
"""

import pytest
import torch
import torch._inductor.config as inductor_config
from torch._dynamo.testing import CompileCounterWithBackend

from benchmarks.modes import adapted_net, max_relative_error, net_input, relative_error, store_bases_in, training_step

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
