"""python cli.py COMMAND [options]  (same as the `mlx_dsv4` command)."""

from mlx_dsv4.cli import app

if __name__ == "__main__":
    app(prog_name="mlx_dsv4")
