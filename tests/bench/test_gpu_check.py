"""``benchmarks/gpu_check.py``: its CPU smoke run goes through every part (precision matrix, LyCORIS parity, the
timed step), a failing row makes it fail, and without CUDA it stops with a message. Nothing here asserts a timing."""

import pytest
import torch

from benchmarks import gpu_check, report


def test_without_cuda_it_exits_with_a_message(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--device cpu --smoke" in err


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "table.md"
    code = gpu_check.main(["--device", "cpu", "--smoke", "--no-compile", "--out", str(out)])
    return code, out.read_text()


def _rows(table: str, part: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in table.splitlines()
        if line.startswith(f"| {part} |")
    ]


def test_cpu_smoke_run_fills_one_table_and_passes(smoke):
    code, table = smoke
    assert code == 0 and "**FAIL**" not in table
    precision = _rows(table, "precision")
    settings = {(row[1], row[2]) for row in precision}
    expected = {(a, f"{p.name}, eager") for a in ("loha", "lokr") for p in gpu_check.SMOKE_PRECISIONS}
    assert settings == expected and all(row[5] == "ok" for row in precision)
    assert [row[1] for row in _rows(table, "parity")] == ["tiny-loha-lin", "tiny-lokr-conv"]
    implementations = {row[2].split(";")[0] for row in _rows(table, "step")}
    assert implementations == {"base", "peft_lyco", "peft", "lycoris", "peft LoRA"}
    cache = _rows(table, "cache")
    assert [row[1] for row in cache] == ["lokr tiny 64, 8 tok", "loha tiny 64, 8 tok"] and all(
        r[5] == "ok" for r in cache
    )


def test_a_failing_row_fails_the_check(monkeypatch, capsys):
    monkeypatch.setitem(gpu_check.BOUNDS, torch.bfloat16, 1e-9)  # no bf16 run is that exact
    monkeypatch.setattr(gpu_check, "SMOKE_PRECISIONS", [gpu_check.PRECISIONS[1]])
    monkeypatch.setattr(gpu_check, "step_rows", lambda *args, **kwargs: [])
    monkeypatch.setattr(gpu_check, "parity_rows", lambda *args, **kwargs: [])
    assert gpu_check.main(["--device", "cpu", "--smoke", "--no-compile"]) == 1
    assert "**FAIL**" in capsys.readouterr().out


def test_docs_section_is_replaced_between_its_own_markers(tmp_path):
    start, end = gpu_check.DOCS_MARKERS
    page = tmp_path / "performance.md"
    page.write_text(f"intro\n{report.DOCS_START}\nbench\n{report.DOCS_END}\n{start}\nold\n{end}\noutro\n")
    report.update_docs(page, "new table\n", markers=gpu_check.DOCS_MARKERS)
    assert page.read_text() == (
        f"intro\n{report.DOCS_START}\nbench\n{report.DOCS_END}\n{start}\nnew table\n{end}\noutro\n"
    )
