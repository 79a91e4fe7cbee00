"""A rank that dies or stops answering ends the job with a clear error on rank 0, within a bound."""

import re
import subprocess
import sys
import time

import pytest

from dist_util import env, launch
from test_distributed import case  # noqa: F401  (the module's checkpoint fixture)

LIMIT = 60  # seconds from the kill to the job's end; observed ~2 s (ring failure or mlx.launch's SIGTERM)


@pytest.mark.parametrize("case", ["flash"], indirect=True)
@pytest.mark.parametrize("sharding", ["pipeline", "tensor"])
def test_killed_rank_ends_job_with_error_on_rank0(case, sharding, tmp_path):
    root = case[1]
    p = launch(2, ["python", "tests/dist_die.py", str(root), sharding], timeout=300, MLX_DSV4_DIST_TIMEOUT=LIMIT)
    out = p.stdout + p.stderr
    assert "finished without noticing" not in out
    killed = re.search(r"rank 0 step 3 at ([\d.]+)", out)
    err = re.search(r"error: rank 0: (.*)", out)
    assert killed and err, out[-3000:]
    print(err[0])
    assert "peer rank died" in err[1] or "another rank exited" in err[1], err[0]
    ended = re.search(r"\(at ([\d.]+)\)", err[1])
    if ended:  # the ring's own failure path stamps the time; SIGTERM's path ends at once
        assert float(ended[1]) - float(killed[1]) < LIMIT


def test_watchdog_ends_a_silent_wait():
    """A peer that neither answers nor closes its socket: the guarded wait passes the timeout
    and the process exits 1 with the error (a sleep stands in for the stuck collective)."""
    code = ("import time; from mlx_dsv4.watchdog import Watchdog\n"
            "w = Watchdog(0, 0.5)\n"
            "with w.guard('a pipeline step'): time.sleep(30)\n")
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "error: rank 0: no answer from the other ranks for 0.5 s" in p.stderr, p.stderr
    assert time.monotonic() - t < 20


def test_watchdog_negative_control():
    """The same guard around a wait shorter than the timeout lets the process finish normally."""
    code = ("import time; from mlx_dsv4.watchdog import Watchdog\n"
            "w = Watchdog(0, 2.0)\n"
            "with w.guard('a pipeline step'): time.sleep(0.5)\n"
            "print('done')\n")
    p = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "done", p.stderr
