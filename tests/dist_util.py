"""Running a command under mlx.launch with the ring backend on loopback (127.0.0.1 only), bounded
in time, with this worktree's code first on the path."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# mlx.launch itself (its console script's entry point), with this interpreter
LAUNCH = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]


def free_ports(n: int) -> int:
    """The first of n consecutive loopback ports that are free now (the ring listens on them)."""
    for _ in range(200):
        p = random.randint(20000, 60000)
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p + i))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free loopback ports")


def env(**extra) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), e.get("PYTHONPATH", "")])
    e.update({k: str(v) for k, v in extra.items()})
    return e


def launch_cmd(n: int, command: list[str]) -> list[str]:
    return [*LAUNCH, "--hosts", "127.0.0.1", "-n", str(n), "-p", str(free_ports(n)), "--backend", "ring",
            "--", *command]


def launch(n: int, command: list[str], timeout: float = 300, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(launch_cmd(n, command), env=env(**extra), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
