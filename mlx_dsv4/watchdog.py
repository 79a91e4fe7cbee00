"""A dead or unreachable rank must end the job with a clear error, never a hang.

Three ways a peer's loss shows on a rank, each turned into one `error:` line and exit status 1:
- MLX's ring backend fails the pending send/recv ("connection to a peer was lost") about a
  second after a peer's socket closes: `guard` rewords it;
- mlx.launch stops the other ranks (SIGTERM) once one exits with an error, possibly while this
  rank's main thread is blocked inside a collective where no Python signal handler can run: the
  signal's wakeup byte reaches a watcher thread instead (MLX releases the GIL while it waits);
- a peer that neither answers nor closes (a cable pulled, a stopped process): the watchdog
  thread ends the process once a guarded wait passes the timeout.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager


class DistributedError(RuntimeError):
    """A collective failed because a peer rank died or cannot be reached."""


def die(message: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    os._exit(1)


class Watchdog:
    def __init__(self, rank: int, timeout: float):
        self.rank, self.timeout = rank, timeout
        self._waiting: tuple[float, str] | None = None
        threading.Thread(target=self._watch, daemon=True, name="mlx_dsv4-watchdog").start()

    @contextmanager
    def guard(self, what: str):
        """Wrap one blocking evaluation that involves collectives."""
        self._waiting = (time.monotonic(), what)
        try:
            yield
        except RuntimeError as e:
            if "[ring]" in str(e) or "jaccl" in str(e).lower():
                raise DistributedError(f"rank {self.rank}: {what} failed, a peer rank died or cannot be "
                                       f"reached ({e})") from None
            raise
        finally:
            self._waiting = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(0.25, self.timeout / 4))
            w = self._waiting
            if w is not None and time.monotonic() - w[0] > self.timeout:
                die(f"rank {self.rank}: no answer from the other ranks for {self.timeout:g} s during {w[1]}; "
                    "a rank died or cannot be reached (MLX_DSV4_DIST_TIMEOUT sets the limit)")


def on_termination(rank: int) -> None:
    """Print a clear error when mlx.launch (or anyone) sends SIGTERM, even while the main thread
    is blocked in MLX. Call from the main thread; a no-op elsewhere. The event loop of the server
    installs its own handlers later and takes precedence there (the guard and watchdog remain)."""
    if threading.current_thread() is not threading.main_thread():
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.signal(signal.SIGTERM, lambda *_: None)  # a Python-level handler so the wakeup byte is written
    signal.set_wakeup_fd(w)

    def watch():
        while os.read(r, 1) != bytes([signal.SIGTERM]):
            pass
        die(f"rank {rank}: the job was stopped (SIGTERM): another rank exited or was killed, "
            "see mlx.launch's warning above")

    threading.Thread(target=watch, daemon=True, name="mlx_dsv4-sigterm").start()
