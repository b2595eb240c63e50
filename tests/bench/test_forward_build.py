"""The forward-build benchmark on a tiny slice: it sees one ``W + ΣΔW`` build per adapted layer per step, and no
build outside ours. No timing is asserted."""

import pytest

from benchmarks import forward_build
from benchmarks.slices import TINY


@pytest.mark.parametrize("case", TINY, ids=[case.name for case in TINY])
def test_one_forward_build_per_adapted_layer_and_step(case):
    result = forward_build.measure_case(case, reps=1)
    for algo in case.algos:
        ours = result[f"ours-{algo}"]
        assert ours["builds"] == result["layers"] > 0
        assert ours["build_ms"] > 0
    table = forward_build.markdown([result])
    assert table.count("\n") == 1 + len(case.algos)  # header, separator, one row per algorithm


def test_the_wrapper_is_gone_after_the_block():
    from peft_lyco.functional import adapted

    before = adapted.inference_weight, adapted._rebuilt_delta
    with forward_build.tallied(forward_build.Tally()):
        assert adapted.inference_weight is not before[0]
    assert (adapted.inference_weight, adapted._rebuilt_delta) == before
