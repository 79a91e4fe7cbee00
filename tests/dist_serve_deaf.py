"""`python -m mlx_dsv4` whose follower ranks ignore rank 0's cancellations: the negative control of
tests/test_distributed_serve.py (a lockstep that drops what it was sent must not pass for exact)."""

import os

from mlx_dsv4.server import lockstep

if os.environ.get("MLX_RANK", "0") != "0":
    _share = lockstep.Lockstep.share

    def deaf(self, message):
        m = _share(self, message)
        return m if m is None else dict(m, cancel=[])

    lockstep.Lockstep.share = deaf

from mlx_dsv4.cli import app  # noqa: E402

app(prog_name="mlx_dsv4")
