"""Build an output directory next to its destination and rename it into place only when complete,
so an interrupted or failed run never leaves something that looks like a finished model.

A run killed outright (kill -9, power loss) cannot clean up after itself: its hidden sibling
stays. Each sibling therefore records its owner (host and pid), and the next run for the same
output removes the siblings whose owner is gone, and says so."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CheckpointError, OutputExistsError

log = logging.getLogger("mlx_dsv4.checkpoint")
OWNER = ".mlx_dsv4-owner"  # inside a temporary sibling: "host pid"; removed before the rename


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform lets a directory be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError("already exists and is not empty (pass overwrite to replace it)", out)


def check_not_nested(src: Path, out: Path) -> None:
    """The output may neither contain the input (replacing it would delete the input) nor lie
    inside it. Symlinks are resolved, so no alias of either gets through."""
    s, o = Path(src).expanduser().resolve(), Path(out).expanduser().resolve()
    if s == o:
        raise CheckpointError("the output directory must differ from the input", out)
    if o in s.parents:
        raise CheckpointError(f"the output directory contains the input {s}: writing it would delete the input; "
                              "choose an output outside the input", out)
    if s in o.parents:
        raise CheckpointError(f"the output directory lies inside the input {s}; choose an output outside it", out)


def check_writable(out: Path, overwrite: bool) -> None:
    """Fail now, not after the whole conversion, when the output cannot be created or replaced."""
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent)).rmdir()
    except OSError as e:
        raise CheckpointError(f"cannot write the output here: {e.strerror or e}", parent) from None
    if overwrite and out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise CheckpointError("cannot replace the existing output: it is not writable", out)


def _owner_alive(tmp: Path) -> int | None:
    """The pid of the live process on this host that is filling `tmp`, else None."""
    try:
        host, pid = (tmp / OWNER).read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        return None  # no owner file (or unreadable): not a live conversion's
    if host != socket.gethostname() or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def leftovers(out: Path) -> list[Path]:
    """Hidden temporary siblings of `out` left by earlier runs."""
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir()
                  if p.name.startswith((f".{out.name}.incomplete-", f".{out.name}.old-", f".{out.name}.probe-")))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def clean_leftovers(out: Path) -> None:
    """Remove what interrupted runs for `out` left behind; refuse while another run is writing."""
    for p in leftovers(out):
        pid = _owner_alive(p)
        if pid is not None:
            raise CheckpointError(f"another conversion (pid {pid}) is writing this output in {p.name}; wait for it "
                                  f"to end or stop it (if none is running, delete {p})", out)
        log.warning(f"removing {p} ({_size(p) / 1e9:.2f} GB), left by an interrupted conversion")
        shutil.rmtree(p, ignore_errors=True)
        if p.exists():
            raise CheckpointError(f"cannot remove the leftover {p} of an interrupted conversion; delete it", out)


@contextmanager
def terminate_cleanly() -> Iterator[None]:
    """SIGTERM (kill, a closing terminal session's supervisor) ends the run through the normal
    exception path, so the temporary directory is deleted; Python's default would skip that."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def disk_error(e: OSError, where: Path, needed: int) -> CheckpointError:
    """One-line error for an OSError while writing the output (nothing of it is kept)."""
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        free = shutil.disk_usage(where).free if where.exists() else 0
        return CheckpointError(f"the disk is full ({e.strerror}): the output needs {needed / 1e9:.2f} GB, "
                               f"{free / 1e9:.2f} GB are free now; the partial output was removed", where)
    return CheckpointError(f"writing the output failed ({e.strerror or e}); the partial output was removed",
                           e.filename or where)


@contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh hidden sibling of `out` to fill; on success it becomes `out` (replacing an
    existing one only if `overwrite`), on any failure (also Ctrl-C, SIGTERM) it is deleted.
    Leftovers of earlier killed runs are removed first."""
    out = Path(out).expanduser().absolute()
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.incomplete-", dir=out.parent))
    try:
        with terminate_cleanly():
            (tmp / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
            yield tmp
            (tmp / OWNER).unlink()
            _fsync_dir(tmp)
            check_target(out, overwrite)  # someone may have created it meanwhile
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, old / out.name)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
            _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
