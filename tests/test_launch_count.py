"""The launch-count benchmark as a regression guard (a count, not a timing): with the kernels, one
decode step costs at most 40 launches per layer on average over a compressor window cycle, for
every layer type (issue target), against hundreds for the compiled reference."""

from kernel_util import benchmark


def test_at_most_40_launches_per_layer(capsys):
    means = benchmark("launch_count").main([])
    printed = capsys.readouterr().out
    assert set(means) == {0, 4, 128} and "| CSA (ratio 4) |" in printed
    for ratio, (reference, kernels) in means.items():
        assert kernels <= 40, f"ratio {ratio}: {kernels:.1f} launches per decode step"
        assert reference > 5 * kernels  # the counting sees the reference's primitives too
