"""The whole-model benchmark's builders and report, on tiny slices (and real widths on the meta device). No timing
is asserted: speed belongs to the benchmark's report."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from benchmarks import report, whole_model, whole_model_report
from benchmarks.slice_impls import Adapted, build_implementations, forward_fn, implementation_names
from benchmarks.slices import FULL, TINY, Slice, build_slice, sd_scripts_targets, slice_module
from peft_lyco.models.anima import AnimaDiT
from peft_lyco.models.sdxl import sdxl_on_meta


def _shapes(module: nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {name[len(prefix) :]: tuple(p.shape) for name, p in module.named_parameters() if name.startswith(prefix)}


@pytest.fixture(scope="module")
def sdxl_unet():
    return sdxl_on_meta()[0]


def _case(name: str):
    return next(case for case in FULL if case.name == name)


@pytest.mark.parametrize(
    "name, path",
    [("sdxl-attn1280-32", "down_blocks.2.attentions.0"), ("sdxl-attn640-64", "down_blocks.1.attentions.0")],
)
def test_sdxl_transformer_slices_have_the_real_unets_block_shapes(sdxl_unet, name, path):
    case = _case(name)
    with torch.device("meta"):
        block = slice_module(case)
    real = sdxl_unet.get_submodule(path)
    # our slice has one BasicTransformerBlock; the UNet's first one has the same parameters under the same names
    ours = _shapes(block)
    theirs = {
        k: v
        for k, v in _shapes(real).items()
        if not k.startswith("transformer_blocks.") or k.startswith("transformer_blocks.0.")
    }
    assert ours == theirs
    assert block.transformer_blocks[0].attn1.heads == real.transformer_blocks[0].attn1.heads == case.width // 64
    assert case.side**2 == case.tokens and case.side == {1280: 32, 640: 64}[case.width]  # 1024² training


@pytest.mark.parametrize(
    "name, path", [("sdxl-res1280-32", "mid_block.resnets.0"), ("sdxl-res640-64", "down_blocks.1.resnets.1")]
)
def test_sdxl_resnet_slices_have_the_real_unets_block_shapes(sdxl_unet, name, path):
    with torch.device("meta"):
        block = slice_module(_case(name))
    assert _shapes(block) == _shapes(sdxl_unet.get_submodule(path))


def test_anima_slice_is_the_released_dits_block():
    case = _case("anima-block-1024")
    with torch.device("meta"):
        block = slice_module(case)
        dit = AnimaDiT()
    assert _shapes(block) == _shapes(dit.blocks[0])
    assert block.self_attn.num_heads == dit.blocks[0].self_attn.num_heads == 16 and case.width == 2048


def test_targets_are_sd_scripts_selection():
    """Transformer blocks: every Linear (projections, attention, feed-forward); ResNet blocks with conv_dim: both 3x3
    convs and the time-embedding projection; Anima blocks: attention and MLP, not the AdaLN modulation."""
    expected = {
        "sdxl-transformer": {"proj_in", "proj_out"}
        | {f"transformer_blocks.0.{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")}
        | {"transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2"},
        "sdxl-resnet": {"conv1", "conv2", "time_emb_proj"},
        "anima-block": {
            f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in ("q_proj", "k_proj", "v_proj", "output_proj")
        }
        | {"mlp.layer1", "mlp.layer2"},
    }
    for case in TINY:
        targets, convs = sd_scripts_targets(case.kind, slice_module(case))
        assert set(targets) == expected[case.kind] and len(targets) == len(expected[case.kind])
        assert set(convs) == ({"conv1", "conv2"} if case.kind == "sdxl-resnet" else set())


@pytest.mark.parametrize("case", TINY, ids=[case.name for case in TINY])
def test_slices_run_with_the_input_shape_and_every_implementation_adapts_every_target(case):
    piece = build_slice(case)
    built = build_implementations(piece)
    assert list(built) == implementation_names(case)
    for name, item in built.items():
        out = forward_fn(piece, item)()
        assert out.shape == piece.inputs["x"].shape and torch.isfinite(out).all()
        if name == "base":
            assert item.trainable == []
        else:  # LoRA: A and B per layer; LoKr/LoHa: at least two factors per layer
            assert len(item.trainable) >= 2 * len(piece.targets)
            assert all(t.requires_grad and t.dtype == case.adapter_dtype for t in item.trainable)
    assert all(not p.requires_grad for p in piece.module.parameters())


@pytest.mark.parametrize("case", TINY, ids=[case.name for case in TINY])
def test_implementations_compute_the_same_function(case):
    """Default init: every adapter is zero and every implementation gives the base's output. Random factors copied
    from ours: LyCORIS (same layout everywhere) and PEFT, where its layout agrees on every layer, give ours'."""
    piece = build_slice(case)
    with torch.no_grad():
        base = forward_fn(piece, Adapted("base", piece.module, []))()
        for item in build_implementations(piece, init="default").values():
            assert torch.equal(forward_fn(piece, item)(), base), item.name
        built = build_implementations(piece)
        outs = {name: forward_fn(piece, item)() for name, item in built.items()}
    for algo in case.algos:
        ours = outs[f"ours-{algo}"]
        effect = (ours - base).abs().max()
        assert effect > 1e-4  # the adapters do change the output
        for library in ("lycoris", "peft"):
            peer = built[f"{library}-{algo}"]
            if peer.notes:  # PEFT's LoKr picks other factor shapes on some layers; LyCORIS never may
                assert library == "peft" and algo == "lokr"
                continue
            assert (outs[peer.name] - ours).abs().max() <= 1e-4 * effect, peer.name


def test_held_for_backward_counts_activations_once_without_parameters_and_inputs():
    """Frozen Linear → ReLU → Linear keeps both weights (not the input: no weight gradient) and the ReLU output
    (saved by ReLU and by the second Linear: one storage); only the ReLU output counts as activation."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).requires_grad_(False)
    x = torch.randn(3, 5, 4, requires_grad=True)
    piece = Slice(TINY[0], net, [], [], {"x": x}, lambda module, inputs: module(inputs["x"]))
    held = whole_model.held_for_backward(piece, Adapted("base", net, []))
    assert held["activations"] == 3 * 5 * 8 * 4
    assert held["total"] == held["activations"] + (8 * 4 + 2 * 8) * 4


def test_select_cases_resizes_and_filters():
    cases = whole_model.select_cases(None, quick=False, tokens=256, precisions=["bf16"])
    assert cases and all(case.tokens == 256 and case.side == 16 and case.precision == "bf16" for case in cases)
    every = whole_model.select_cases(None, quick=False, tokens=None, precisions=None, every=True)
    assert {"anima-block-4096", "sdxl-attn1280-32-bf16-full"} <= {case.name for case in every}
    with pytest.raises(ValueError, match="unknown whole-model case"):
        whole_model.select_cases(["nope"], quick=False, tokens=None, precisions=None)
    with pytest.raises(ValueError, match="square"):
        whole_model.select_cases(None, quick=False, tokens=1000, precisions=None)


@pytest.fixture(scope="module")
def tiny_run():
    settings = whole_model.WholeSettings("test", warmup=0, reps=2, sample_steps=2, sample_warmup=0, sample_reps=2)
    impls = ["ours-lokr", "ours-loha", "lycoris-loha"]  # every kind of implementation, not all eight (time)
    written = []  # what a long run writes after each case
    result = whole_model.run_whole_model(
        [TINY[1]], settings, impls=impls, log=lambda line: None, after_case=lambda r: written.append(len(r["train"]))
    )
    assert written == [1]
    return result


def test_run_reports_every_implementation_against_lora(tiny_run):
    (train,), (sample,) = tiny_run["train"], tiny_run["sample"]
    names = ["base", "lora", "ours-lokr", "ours-loha", "lycoris-loha"]
    assert set(train["step_seconds"]) == set(train["held_bytes"]) == set(train["peak_bytes"]) == set(names)
    assert set(train["step_vs_lora"]) == set(names) - {"lora"}
    for name, ratio in train["step_vs_lora"].items():
        rounds = [a / b for a, b in zip(train["step_seconds_all"][name], train["step_seconds_all"]["lora"])]
        assert ratio == {
            "median": (rounds[0] + rounds[1]) / 2,
            "min": min(rounds),
            "max": max(rounds),
        }
    assert set(sample["run_seconds"]) == {
        "base",
        "lora",
        "ours-lokr",
        "ours-loha",
        "ours-lokr+cache",
        "ours-loha+cache",
    }
    assert all(math.isfinite(r["median"]) and r["median"] > 0 for r in sample["vs_lora"].values())
    assert set(train["output_difference"]) == {"lycoris-loha"} and train["output_difference"]["lycoris-loha"] < 1e-4


def test_markdown_has_every_table_and_update_docs_touches_only_its_markers(tiny_run, tmp_path):
    table = whole_model_report.markdown(tiny_run)
    for heading in ("Training step relative to PEFT LoRA", "Memory relative to PEFT LoRA", "Sampling: no-grad calls"):
        assert heading in table
    assert f"| {TINY[1].name} |" in table and "ours LoKr" in table and "LyCORIS LoHa" in table
    assert "PEFT LoKr" not in table  # columns of implementations not run are left out
    start, end = whole_model_report.MARKERS
    doc = tmp_path / "performance.md"
    layer = f"{report.DOCS_START}\nlayer tables\n{report.DOCS_END}\n"
    doc.write_text(f"intro\n{layer}middle\n{start}\nold\n{end}\noutro\n")
    report.update_docs(doc, table, whole_model_report.MARKERS)
    assert doc.read_text() == f"intro\n{layer}middle\n{start}\n{table}{end}\noutro\n"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_whole_model_runs_on_cuda_with_allocator_peaks():
    settings = whole_model.WholeSettings("test", warmup=0, reps=1, sample_steps=1, sample_warmup=0, sample_reps=1)
    bf16 = next(case for case in FULL if case.precision == "bf16" and case.kind == "sdxl-resnet")
    cases = [TINY[0], dataclasses.replace(bf16, width=64, tokens=16)]
    result = whole_model.run_whole_model(cases, settings, device="cuda", log=lambda line: None)
    for train in result["train"]:
        assert all(peak is not None and peak > 0 for peak in train["peak_bytes"].values())
        assert all(math.isfinite(r["median"]) for r in train["step_vs_lora"].values())
