"""The benchmark suite's own logic on tiny cases (what ``--quick`` runs, minus the sizes). No timing is asserted:
speed targets belong to the benchmark's report, not to unit tests."""

import json
import math
import os

import pytest
import torch

from benchmarks import report
from benchmarks.cases import TINY
from benchmarks.implementations import IMPLS, build
from benchmarks.measure import saved_for_backward
from benchmarks.run import main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = main(["--quick", "--cases", *[case.name for case in TINY], "--out", str(out)])
    return result, out


def test_quick_run_writes_json_and_markdown_with_every_ratio(quick_run):
    result, out = quick_run
    assert json.loads((out / "results.json").read_text())["cases"][0]["case"]["name"] == TINY[0].name
    table = (out / "results.md").read_text()
    for case in TINY:
        assert f"| {case.name} |" in table
    assert "### Training step" in table and "### Memory" in table and "### Loading and fusing" in table
    for entry in result["cases"]:
        assert set(entry["step_seconds"]) == set(IMPLS) and set(entry["saved"]) == set(IMPLS)
        assert set(entry["merge_seconds"]) == {"peft_lyco", "peft", "lycoris"}
        ratios = [
            *entry["ratios"]["step"].values(),
            *entry["ratios"]["saved"].values(),
            *entry["ratios"]["merge"].values(),
        ]
        assert len(ratios) == 9 and all(math.isfinite(r) and r > 0 for r in ratios)
        assert all(len(times) == 3 for times in entry["step_seconds_all"].values())


def test_quick_run_includes_the_whole_model_smoke_case(quick_run):
    result, out = quick_run
    (train,) = result["whole_model"]["train"]
    assert train["case"]["name"] == "tiny-sdxl-attn" and set(train["step_vs_lora"]) >= {"ours-lokr", "ours-loha"}
    table = (out / "results.md").read_text()
    assert "### Whole-model slices" in table and "| tiny-sdxl-attn |" in table


def test_quick_run_checks_that_all_implementations_compute_the_same_layer(quick_run):
    result, _ = quick_run
    for entry in result["cases"]:
        assert entry["output_difference"]["lycoris"] < 1e-4  # same factors, same layout as LyCORIS
        if not entry["notes"] or all("PEFT" not in note for note in entry["notes"]):
            assert entry["output_difference"]["peft"] < 1e-4


def test_quick_run_loads_and_fuses_both_file_kinds(quick_run):
    loading = quick_run[0]["loading"]
    assert loading["modules"] > 100 and set(loading["diffusers_lora"]) == {"load", "fuse", "unfuse"}
    for algo in ("lokr", "loha"):
        row = loading[f"peft_lyco_{algo}"]
        assert all(
            math.isfinite(row[f"{k}/diffusers"]) and row[f"{k}/diffusers"] > 0 for k in ("load", "fuse", "unfuse")
        )


@pytest.mark.parametrize("case", TINY, ids=[case.name for case in TINY])
def test_saved_bytes_count_storages_once_and_separate_what_training_holds_anyway(case):
    built = build(case)
    x = torch.randn(case.input_shape, requires_grad=True)
    saved = {name: saved_for_backward(item, x) for name, item in built.items()}
    # ours keeps the input, the weight and the factors only; the peers also keep a weight-sized ΔW
    assert saved["peft_lyco"]["beyond_input_and_params"] == 0
    weight_bytes = built["base"].module.weight.numel() * 4
    for peer in ("peft", "lycoris"):
        assert saved[peer]["beyond_input_and_params"] >= weight_bytes
    assert (
        saved["base"]["total"]
        <= saved["peft_lyco"]["total"]
        <= saved["base"]["total"] + x.numel() * 4 + sum(t.numel() * 4 for t in built["peft_lyco"].trainable)
    )


def test_update_docs_replaces_only_the_marked_section(tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text(f"intro\n{report.DOCS_START}\nold table\n{report.DOCS_END}\noutro\n")
    report.update_docs(doc, "new table\n")
    assert doc.read_text() == f"intro\n{report.DOCS_START}\nnew table\n{report.DOCS_END}\noutro\n"
    doc.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        report.update_docs(doc, "x")


def test_rewritten_docs_keep_ordinary_permissions(tmp_path):
    """The docs page was rewritten through mkstemp and came back 0600 (unreadable to other accounts)."""
    doc = tmp_path / "performance.md"
    doc.write_text(f"{report.DOCS_START}\nold\n{report.DOCS_END}\n")
    old = os.umask(0o022)
    try:
        report.update_docs(doc, "new\n")
    finally:
        os.umask(old)
    assert doc.stat().st_mode & 0o777 == 0o644
