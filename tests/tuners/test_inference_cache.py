"""The no-grad inference cache of ``W + ΣΔW``: bit-identical outputs, every change that must invalidate it, the byte
budget, and the calls that must bypass it (gradients, training mode, torch.compile).

Invalidation tests follow one pattern: fill the cache, change one thing the weight depends on, and compare the next
call with a fresh copy of the layer (a first call always builds the weight); they also check the change moved the
output, so a stale entry would fail them.
"""

import copy

import pytest
import torch
from peft import inject_adapter_in_model
from torch import nn

import peft_lyco
from peft_lyco import LoHaConfig, LoKrConfig
from peft_lyco.tuners.inference_cache import (
    clear_inference_cache,
    inference_cache,
    inference_cache_info,
    set_inference_cache_budget,
)
from tests.conftest import Holder

BUDGET = 1 << 20


@pytest.fixture(autouse=True)
def _cache_on():
    set_inference_cache_budget(BUDGET)
    clear_inference_cache()
    yield
    set_inference_cache_budget(0)


def _config(algo: str, **options):
    cls = {"loha": LoHaConfig, "lokr": LoKrConfig}[algo]
    extra = {"factor": 4} if algo == "lokr" else {}
    return cls(r=4, alpha=2, init_weights=False, target_modules=["layer"], **extra, **options)


def _model(base: nn.Module, algo: str = "lokr", adapters=("a",), **options) -> nn.Module:
    torch.manual_seed(0)
    model = Holder(base)
    for name in adapters:
        model = inject_adapter_in_model(_config(algo, **options), model, adapter_name=name)
    return model.eval()


def _run(model, x):
    with torch.no_grad():
        return model(x)


def _fresh(model, x):
    """The output a layer computes without any cached weight (a copy of it has no entry yet)."""
    return _run(copy.deepcopy(model), x)


def _uncached(model, x):
    """The output with the cache off (``adapted_op``'s no-grad path), leaving the cache's entries as they were."""
    info = inference_cache_info()
    peft_lyco.tuners.inference_cache._CACHE.budget = 0
    try:
        return _run(model, x)
    finally:
        peft_lyco.tuners.inference_cache._CACHE.budget = info.budget


LINEAR, X_LINEAR = nn.Linear(32, 48), torch.randn(3, 5, 32)
CONV, X_CONV = nn.Conv2d(16, 32, 3, padding=1), torch.randn(2, 16, 6, 6)


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("algo", ["loha", "lokr"])
@pytest.mark.parametrize(
    "base, x, options",
    [
        (LINEAR, X_LINEAR, {}),
        (CONV, X_CONV, {}),
        (CONV, X_CONV, {"use_tucker": True}),
        (LINEAR, X_LINEAR, {"weight_decompose": True}),
        (LINEAR, X_LINEAR, {"use_scalar": True}),
    ],
    ids=["linear", "conv", "tucker", "dora", "scalar"],
)
def test_cached_outputs_are_bit_identical_to_uncached(algo, base, x, options):
    model = _model(copy.deepcopy(base), algo, adapters=("a", "b"), **options)
    model.layer.set_adapter(["a", "b"])
    if options.get("use_scalar"):
        with torch.no_grad():
            for scalar in model.layer.scalar.values():
                scalar.fill_(0.7)
    expected = _uncached(model, x)
    first, second = _run(model, x), _run(model, x)
    info = inference_cache_info()
    assert (info.misses, info.hits, info.entries) == (1, 1, 1)
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_cached_outputs_match_under_bf16_autocast_and_key_on_it():
    model = _model(copy.deepcopy(LINEAR))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _uncached(model, X_LINEAR)
        cached = [_run(model, X_LINEAR) for _ in range(2)]
    assert cached[0].dtype == torch.bfloat16 and all(torch.equal(c, expected) for c in cached)
    plain = _run(model, X_LINEAR)  # autocast off: a float32 weight, not the bf16 entry
    assert plain.dtype == torch.float32 and torch.equal(plain, _fresh(model, X_LINEAR))


def test_bypass_path_over_another_tuner_layer_is_cached_exactly():
    base = Holder(copy.deepcopy(CONV))
    torch.manual_seed(1)
    model = inject_adapter_in_model(_config("loha"), base, adapter_name="style")
    model = inject_adapter_in_model(_config("lokr"), model, adapter_name="char").eval()
    expected = _uncached(model, X_CONV)
    assert torch.equal(_run(model, X_CONV), expected) and torch.equal(_run(model, X_CONV), expected)
    assert inference_cache_info().hits == 2  # both layers: the outer one caches ΣΔW of its bypass


# ---------------------------------------------------------------------------------------------- invalidation
def _set_data(layer):
    param = layer.lokr_w1["a"]
    param.data = param.data * 2


def _in_place(layer):
    with torch.no_grad():
        layer.lokr_w1["a"].mul_(1.5)


def _base_weight(layer):
    with torch.no_grad():
        layer.get_base_layer().weight.add_(0.1)


def _load_state_dict(layer):
    state = {k: v * 1.25 if "lokr_w2" in k else v for k, v in layer.state_dict().items()}
    layer.load_state_dict(state)


def _optimizer_step(layer):
    params = [p for n, p in layer.named_parameters() if "lokr" in n]
    for p in params:
        p.grad = torch.ones_like(p)
    torch.optim.SGD(params, lr=0.1).step()


def _set_scale(layer):
    layer.set_scale("a", 0.5)


def _scale_layer(layer):
    layer.scale_layer(2.0)


def _other_adapter(layer):
    layer.set_adapter("b")


def _both_adapters(layer):
    layer.set_adapter(["a", "b"])


def _to_float64(layer):
    layer.double()


def _delete_and_recreate(layer):
    layer.delete_adapter("a")
    torch.manual_seed(7)
    spec_model = inject_adapter_in_model(_config("lokr"), Holder(layer), adapter_name="a")
    assert spec_model.layer is layer
    layer.set_adapter("a")


CHANGES = [
    _set_data,
    _in_place,
    _base_weight,
    _load_state_dict,
    _optimizer_step,
    _set_scale,
    _scale_layer,
    _other_adapter,
    _both_adapters,
    _to_float64,
    _delete_and_recreate,
]


@pytest.mark.parametrize("change", CHANGES, ids=[c.__name__.strip("_") for c in CHANGES])
def test_every_change_gives_the_fresh_result(change):
    model = _model(copy.deepcopy(LINEAR), adapters=("a", "b"))
    model.layer.set_adapter("a")
    before = _run(model, X_LINEAR)
    assert torch.equal(_run(model, X_LINEAR), before) and inference_cache_info().hits == 1
    change(model.layer)
    x = X_LINEAR.double() if change is _to_float64 else X_LINEAR
    after = _run(model, x)
    assert not torch.equal(after.to(before.dtype), before), "the change must move the output"
    assert torch.equal(after, _fresh(model, x))
    assert torch.equal(_run(model, x), after)  # and the new entry is then used


@pytest.mark.parametrize("what", ["magnitude", "scalar"])
def test_dora_magnitude_and_use_scalar_changes_give_the_fresh_result(what):
    options = {"weight_decompose": True} if what == "magnitude" else {"use_scalar": True}
    model = _model(copy.deepcopy(LINEAR), **options)
    tensor = model.layer.dora_scale["a"] if what == "magnitude" else model.layer.scalar["a"]
    with torch.no_grad():
        tensor.fill_(0.5)
    before = [_run(model, X_LINEAR) for _ in range(2)][1]
    with torch.no_grad():
        tensor.mul_(1.5)
    after = _run(model, X_LINEAR)
    assert not torch.equal(after, before) and torch.equal(after, _fresh(model, X_LINEAR))


def test_dora_multiplier_from_set_scale_gives_the_fresh_result():
    model = _model(copy.deepcopy(LINEAR), weight_decompose=True)
    before = [_run(model, X_LINEAR) for _ in range(2)][1]
    model.layer.set_scale("a", 0.3)
    after = _run(model, X_LINEAR)
    assert not torch.equal(after, before) and torch.equal(after, _fresh(model, X_LINEAR))


def test_merge_unmerge_disable_and_enable():
    model = _model(copy.deepcopy(LINEAR))
    layer = model.layer
    cached = [_run(model, X_LINEAR) for _ in range(2)][1]
    layer.merge()
    assert inference_cache_info().entries == 0  # merging frees the entry
    merged = _run(model, X_LINEAR)
    with torch.no_grad():  # change the merged weight: after unmerge the layer must see W' - ΔW, not the old entry
        layer.get_base_layer().weight.add_(0.01)
    layer.unmerge()
    after = _run(model, X_LINEAR)
    assert not torch.equal(after, cached) and torch.equal(after, _fresh(model, X_LINEAR))
    assert torch.allclose(merged, cached, atol=1e-5)
    layer.enable_adapters(False)
    assert torch.equal(_run(model, X_LINEAR), layer.get_base_layer()(X_LINEAR))
    layer.enable_adapters(True)
    assert torch.equal(_run(model, X_LINEAR), after)


def test_delete_adapter_frees_the_entry():
    model = _model(copy.deepcopy(LINEAR), adapters=("a", "b"))
    _run(model, X_LINEAR)
    assert inference_cache_info().entries == 1
    model.layer.delete_adapter("b")
    assert inference_cache_info().entries == 0


# --------------------------------------------------------------------------------------------------- bypassed
def test_grad_mode_training_mode_and_rank_dropout_bypass_the_cache():
    model = _model(copy.deepcopy(LINEAR), rank_dropout=0.5)
    out = model(X_LINEAR)  # grad enabled
    assert out.requires_grad and inference_cache_info().misses == 0
    model.train()
    torch.manual_seed(3)
    with torch.no_grad():
        first, second = model(X_LINEAR), model(X_LINEAR)
    assert inference_cache_info().misses == 0 and not torch.equal(first, second)  # a new mask each call
    model.eval()
    _run(model, X_LINEAR)
    assert inference_cache_info().misses == 1


def test_compiled_no_grad_call_bypasses_the_cache_without_graph_breaks():
    torch._dynamo.reset()
    model = _model(copy.deepcopy(LINEAR))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(X_LINEAR)
    assert torch.allclose(out, _uncached(model, X_LINEAR), atol=1e-6)
    assert inference_cache_info().misses == 0
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------- budget
def _two_layers() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32))
    config = _config("lokr")
    config.target_modules = ["0", "1"]
    return inject_adapter_in_model(config, net, adapter_name="a").eval()


def test_budget_is_respected_first_come():
    net = _two_layers()
    set_inference_cache_budget(64 * 32 * 4)  # room for exactly one float32 weight
    for _ in range(3):
        _run(net, torch.randn(2, 32))
    info = inference_cache_info()
    assert (info.entries, info.used, info.hits, info.misses, info.over_budget) == (1, 64 * 32 * 4, 2, 4, 3)
    set_inference_cache_budget(0)
    assert inference_cache_info().entries == 0
    _run(net, torch.randn(2, 32))
    assert inference_cache_info().misses == 0


def test_stale_entries_are_freed_when_a_new_one_does_not_fit():
    first, second = _two_layers(), _two_layers()
    set_inference_cache_budget(2 * 64 * 32 * 4)
    _run(first, torch.randn(2, 32))
    assert inference_cache_info().entries == 2
    with torch.no_grad():
        first[0].lokr_w1["a"].add_(1.0)  # first[0]'s entry is stale now
    _run(second, torch.randn(2, 32))
    assert inference_cache_info().entries == 2 and inference_cache_info().over_budget == 1


def test_context_manager_sets_the_budget_and_frees_on_exit():
    set_inference_cache_budget(0)
    net = _two_layers()
    with inference_cache(BUDGET):
        _run(net, torch.randn(2, 32))
        assert inference_cache_info().entries == 2 and inference_cache_info().budget == BUDGET
    assert inference_cache_info() == inference_cache_info().__class__(0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="bytes"):
        set_inference_cache_budget(-1)


def test_context_manager_limited_to_some_modules():
    inside, outside = _two_layers(), _two_layers()
    with peft_lyco.inference_cache(BUDGET, inside[1]):
        _run(inside, torch.randn(2, 32))
        _run(outside, torch.randn(2, 32))
        info = inference_cache_info()
        assert (info.entries, info.misses) == (1, 1)
    set_inference_cache_budget(BUDGET)
    _run(outside, torch.randn(2, 32))
    assert inference_cache_info().entries == 2  # the restriction ended with the block


def test_float8_base_and_inference_mode_are_cached_exactly():
    model = _model(copy.deepcopy(LINEAR))
    weight = model.layer.get_base_layer().weight
    weight.data = weight.data.to(torch.float8_e4m3fn)
    expected = _uncached(model, X_LINEAR)
    with torch.inference_mode():
        first, second = model(X_LINEAR), model(X_LINEAR)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert (inference_cache_info().misses, inference_cache_info().hits) == (1, 1)
    assert torch.equal(_run(model, X_LINEAR), expected)  # the entry built in inference mode serves no_grad calls


@pytest.mark.parametrize(
    "base, small, large", [(LINEAR, X_LINEAR, torch.randn(4, 5, 32)), (CONV, X_CONV, torch.randn(3, 16, 6, 6))]
)
def test_max_rows_caches_only_calls_with_few_input_rows(base, small, large):
    model = _model(copy.deepcopy(base))
    rows = small.numel() // (small.shape[1] if small.dim() == 4 else small.shape[-1])  # 15 tokens, 72 pixels
    with peft_lyco.inference_cache(BUDGET, max_rows=rows):
        _run(model, large)
        assert inference_cache_info().misses == 0  # more rows than max_rows: not cached
        out = [_run(model, small) for _ in range(2)]
        assert (inference_cache_info().misses, inference_cache_info().hits) == (1, 1)
        assert torch.equal(out[1], _fresh(model, small))
    with pytest.raises(ValueError, match="max_rows"), peft_lyco.inference_cache(BUDGET, max_rows=0):
        pass


def test_a_layer_that_is_gone_frees_its_entry():
    import gc

    net = _two_layers()
    _run(net, torch.randn(2, 32))
    assert inference_cache_info().entries == 2
    del net
    gc.collect()
    assert inference_cache_info().entries == 0 and inference_cache_info().used == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_cached_outputs_are_bit_identical():
    model = _model(copy.deepcopy(LINEAR)).cuda()
    model.layer.get_base_layer().to(torch.bfloat16)
    x = X_LINEAR.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = _uncached(model, x)
        cached = [_run(model, x) for _ in range(2)]
    assert all(torch.equal(c, expected) for c in cached) and inference_cache_info().hits == 1
    model.cpu()  # a device change: a fresh entry on the new device
    assert torch.equal(_run(model, X_LINEAR.to(torch.bfloat16)), _fresh(model, X_LINEAR.to(torch.bfloat16)))
