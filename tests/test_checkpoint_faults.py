"""The converter under hostile conditions: an output that contains (or lies inside) its input is
refused with the input intact; a conversion killed with kill -9 leaves a hidden sibling that the
next run removes (and says so); SIGTERM cleans up at once; a full disk and an unwritable output
end in one line with nothing half-written kept, the latter checked before any work."""

from __future__ import annotations

import errno
import importlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from ckpt_util import no_leftovers, small_config

from mlx_dsv4.checkpoint import CheckpointError, convert, random_official_weights, write_official_checkpoint
from mlx_dsv4.checkpoint import atomic, safetensors_io

ROOT = Path(__file__).resolve().parents[1]
conv = importlib.import_module("mlx_dsv4.checkpoint.convert")  # the package attribute is the function


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    cfg = small_config("flash")
    return write_official_checkpoint(tmp_path_factory.mktemp("faults") / "ck", cfg,
                                     random_official_weights(cfg, seed=3), max_shard_bytes=250_000)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra)
    env.pop("MLX_DSV4_DEBUG", None)
    return env


def _hidden(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "mlx_dsv4", *args], capture_output=True, text=True, env=_env(),
                          timeout=300, **kw)


# -- output and input nested -------------------------------------------------------------------
def test_output_containing_the_input_is_refused(official, tmp_path):
    p = tmp_path / "p"
    shutil.copytree(official, p / "src")
    (p / "notes.txt").write_text("mine")
    before = _digest(p)
    alias = tmp_path / "alias"
    alias.symlink_to(p)
    for out in (p, alias, tmp_path):  # the parent itself, a symlink to it, a grandparent
        with pytest.raises(CheckpointError, match="contains the input.*would delete the input"):
            convert(p / "src", out, overwrite=True, progress=False)
    r = _cli("convert", "--hf-path", str(p / "src"), "--mlx-path", str(p), "--overwrite", "--no-progress")
    assert r.returncode == 1 and "contains the input" in r.stderr and "Traceback" not in r.stderr
    assert _digest(p) == before and not _hidden(tmp_path)  # the input and its neighbours are intact


def test_output_inside_the_input_is_refused(official, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(official, src)
    before = _digest(src)
    for out in (src / "mlx", src / "a" / "b", src):
        with pytest.raises(CheckpointError, match="inside the input|must differ"):
            convert(src, out, progress=False)
    (tmp_path / "link").symlink_to(src)
    with pytest.raises(CheckpointError, match="inside the input"):
        convert(tmp_path / "link", src / "mlx", progress=False)
    assert _digest(src) == before
    convert(src, tmp_path / "mlx", progress=False)  # the control: a sibling output is fine


# -- killed runs ---------------------------------------------------------------------------------
# The conversion runs the real CLI in a subprocess whose writer pauses after its first write, so the
# signal lands mid-conversion with a partly written hidden output on disk.
PAUSING_CLI = """
import sys, time, pathlib
from mlx_dsv4.checkpoint import safetensors_io
real, flag = safetensors_io.SafetensorsWriter.write, pathlib.Path(sys.argv[1])
def write(self, *a, **k):
    real(self, *a, **k)
    flag.touch()
    time.sleep(600)
safetensors_io.SafetensorsWriter.write = write
from mlx_dsv4.cli import app
app(sys.argv[2:], prog_name="mlx_dsv4")
"""


def _start_and_signal(official, tmp_path, sig) -> subprocess.CompletedProcess:
    flag = tmp_path / "writing"
    args = ["convert", "--hf-path", str(official), "--mlx-path", str(tmp_path / "out"), "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", PAUSING_CLI, str(flag), *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not flag.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the conversion never started writing"
            time.sleep(0.05)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_kill_9_then_rerun_leaves_no_leftovers(official, tmp_path):
    r = _start_and_signal(official, tmp_path, signal.SIGKILL)
    assert r.returncode == -signal.SIGKILL
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.incomplete-")]
    assert len(left) == 1 and any(left[0].rglob("*.partial"))  # what kill -9 really leaves
    rerun = _cli("convert", "--hf-path", str(official), "--mlx-path", str(tmp_path / "out"), "--no-progress")
    assert rerun.returncode == 0, rerun.stderr
    assert f"removing {left[0]}" in rerun.stderr and "left by an interrupted conversion" in rerun.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "writing"]
    convert(official, tmp_path / "ref", progress=False)
    assert _digest(tmp_path / "out") == _digest(tmp_path / "ref")


def test_sigterm_cleans_up_at_once(official, tmp_path):
    r = _start_and_signal(official, tmp_path, signal.SIGTERM)
    assert r.returncode == 128 + signal.SIGTERM and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["writing"]


def test_a_live_conversion_is_not_removed(official, tmp_path):
    """A hidden sibling whose owner still runs (here: this test's parent process) is another
    conversion in progress: refused, and left alone."""
    busy = tmp_path / ".out.incomplete-busy"
    busy.mkdir()
    (busy / atomic.OWNER).write_text(f"{os.uname().nodename} {os.getppid()}\n")
    with pytest.raises(CheckpointError, match=f"another conversion \\(pid {os.getppid()}\\)"):
        convert(official, tmp_path / "out", progress=False)
    assert busy.exists() and not (tmp_path / "out").exists()
    (busy / atomic.OWNER).write_text(f"{os.uname().nodename} 999999999\n")  # its owner is gone
    convert(official, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "config.json").exists() and not _hidden(tmp_path)


# -- disk full and free space ----------------------------------------------------------------------
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["shard", "tokenizer"])
def test_disk_full_is_one_line_and_leaves_nothing(official, tmp_path, monkeypatch, where):
    from typer.testing import CliRunner

    from mlx_dsv4.cli import app

    if where == "shard":
        calls = []
        real = safetensors_io.SafetensorsWriter._pwrite

        def pwrite(self, *a):
            calls.append(1)
            return _enospc() if len(calls) > 3 else real(self, *a)

        monkeypatch.setattr(safetensors_io.SafetensorsWriter, "_pwrite", pwrite)
    else:  # the shards are written; the disk fills while the tokenizer is copied
        monkeypatch.setattr(conv, "shutil", SimpleNamespace(**{**vars(shutil), "copyfile": _enospc}))
    with pytest.raises(CheckpointError, match="the disk is full .*the output needs .* GB.*partial output was removed"):
        convert(official, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []
    r = CliRunner().invoke(app, ["convert", "--hf-path", str(official), "--mlx-path", str(tmp_path / "out"),
                                 "--no-progress"])
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert r.exit_code == 1 and len(lines) == 1 and "disk is full" in lines[0] and "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []


def test_free_space_check_counts_every_file(official, tmp_path, monkeypatch):
    """The truth: the bytes a finished conversion really holds (shards with their headers, index,
    config, tokenizer). One byte less free space than that is refused before anything is written."""
    done = convert(official, tmp_path / "done", progress=False)
    real_size = sum(p.stat().st_size for p in done.iterdir())
    free = real_size - 1
    usage = shutil._ntuple_diskusage(10**12, 10**12 - free, free)
    monkeypatch.setattr(conv, "shutil", SimpleNamespace(**{**vars(shutil), "disk_usage": lambda p: usage}))
    with pytest.raises(CheckpointError, match="needs .* GB of free disk space"):
        convert(official, tmp_path / "out", progress=False)
    assert no_leftovers(tmp_path, "out")


# -- unwritable output -------------------------------------------------------------------------------
@contextmanager
def read_only(path: Path, fill=None):
    """`path` made read-only after `fill(path)` ran: by permissions for a normal user, and for root
    (whom permissions do not stop) as a read-only tmpfs mount."""
    path.mkdir()
    if os.geteuid() != 0:
        if fill:
            fill(path)
        for p in [path, *path.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield path
        finally:
            for p in [path, *path.rglob("*")]:
                p.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("running as root without permission to mount a read-only folder")
    try:
        if fill:
            fill(path)
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_unwritable_output_fails_before_any_work(official, tmp_path, monkeypatch):
    opened = []
    monkeypatch.setattr(conv, "open_official", lambda *a: opened.append(a) or pytest.fail("read the input"))
    with read_only(tmp_path / "ro") as ro:
        with pytest.raises(CheckpointError, match="cannot write the output here"):
            convert(official, ro / "out", progress=False)
        assert list(ro.iterdir()) == []

    def old_output(d):
        (d / "out").mkdir()
        (d / "out" / "old.txt").write_text("old")

    with read_only(tmp_path / "ro2", old_output) as ro:  # an output the user may not replace
        with pytest.raises(CheckpointError, match="cannot (write the output here|replace the existing output)"):
            convert(official, ro / "out", progress=False, overwrite=True)
        assert sorted(p.name for p in ro.iterdir()) == ["out"] and (ro / "out" / "old.txt").read_text() == "old"
    assert opened == []  # refused before the input was even opened
    monkeypatch.undo()
    convert(official, tmp_path / "ro" / "out", progress=False)  # the control: writable again, it converts
