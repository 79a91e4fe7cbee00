"""`python -m mlx_dsv4 ...`: the same as the `mlx_dsv4` command."""

from mlx_dsv4.cli import app

app(prog_name="mlx_dsv4")
