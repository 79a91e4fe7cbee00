"""The launch-count benchmark as a regression guard (a count, not a timing): with the kernels, one
decode step costs at most 40 launches per layer on average over a compressor window cycle, for
every layer type (issue target), against hundreds for the compiled reference."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "launch_count.py"


def test_at_most_40_launches_per_layer(capsys):
    spec = importlib.util.spec_from_file_location("launch_count", BENCH)
    lc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lc)
    means = lc.main([])
    printed = capsys.readouterr().out
    assert set(means) == {0, 4, 128} and "| CSA (ratio 4) |" in printed
    for ratio, (reference, kernels) in means.items():
        assert kernels <= 40, f"ratio {ratio}: {kernels:.1f} launches per decode step"
        assert reference > 5 * kernels  # the counting sees the reference's primitives too
