"""`mlx_dsv4 generate` under mlx.launch (ring on loopback): greedy text exactly the single-process
text, printed once (by rank 0), on the trained tiny checkpoint read in its official FP8/FP4 layout."""

import subprocess
import sys

import pytest

from dist_util import ROOT, env, launch

ARGS = ["-m", "mlx_dsv4", "generate", "-m", "tiny", "--raw", "-n", "16", "The capital of France is"]


@pytest.fixture(scope="module")
def single():
    p = subprocess.run([sys.executable, *ARGS], env=env(), capture_output=True, text=True, timeout=300, cwd=ROOT,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0 and p.stdout.strip(), p.stderr
    return p.stdout


# each mode once, and both rank counts (test_distributed.py checks every mode's logits at 2 and 3 ranks)
@pytest.mark.parametrize("sharding, n", [("pipeline", 3), ("tensor", 2)])
def test_generate_under_mlx_launch_prints_the_single_process_text(single, sharding, n):
    p = launch(n, [sys.executable, *ARGS, "--sharding", sharding], timeout=300)
    assert p.returncode == 0 and "WARN" not in p.stderr, p.stderr[-3000:]
    assert p.stdout == single


def test_unknown_sharding_is_one_line_error():
    p = subprocess.run([sys.executable, *ARGS, "--sharding", "expert"], env=env(), capture_output=True, text=True,
                       timeout=300, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert p.returncode == 1 and p.stderr.startswith("error: unknown sharding 'expert'"), p.stderr


def test_speculative_serve_under_mlx_launch_is_refused_clearly():
    p = launch(2, [sys.executable, "-m", "mlx_dsv4", "serve", "--model", "tiny-random", "--port", "1",
                   "--num-draft-tokens", "2"], timeout=120)
    assert "error: --num-draft-tokens is not available under mlx.launch" in p.stderr, \
        p.stderr[-2000:]
    assert "Uvicorn running" not in p.stderr and "loading" not in p.stderr, p.stderr[-2000:]  # refused before loading
