"""benchmarks/layer_overhead.py runs end to end at a tiny size and prints one table row with positive ratios."""

import re

from benchmarks import layer_overhead


def test_layer_overhead_prints_a_row_of_positive_ratios(capsys):
    layer_overhead.main(["--sizes", "32x4", "--repeats", "1", "--rounds", "2", "--warmup", "1", "--rank", "2"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 32x4 |"))
    numbers = [float(v) for v in re.findall(r"\d+\.\d+", row)]
    assert len(numbers) == 9 and all(v > 0 for v in numbers)
