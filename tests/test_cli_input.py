"""The command line's input handling: --prompt/-p beside the positional prompt, backslash escapes in
--stop, --top-p's help and validation agreeing, help readable at 80 columns, bench --png refused
before the run without matplotlib, and the default model's ~160 GB download asked for, not started
silently (the Hub layer is replaced: nothing here touches the network)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_cli import ROOT, cli
from typer.testing import CliRunner

import mlx_dsv4.cli as cli_mod
from mlx_dsv4.checkpoint import hub
from mlx_dsv4.checkpoint.errors import CheckpointNotFoundError


def test_prompt_option_is_the_positional_prompt():
    want = _run(["generate", "-m", "tiny-random", "-n", "5", "Hi there"]).stdout
    assert _run(["generate", "-m", "tiny-random", "-n", "5", "--prompt", "Hi there"]).stdout == want
    assert _run(["generate", "-m", "tiny-random", "-n", "5", "-p", "Hi there"]).stdout == want
    assert want != _run(["generate", "-m", "tiny-random", "-n", "5", "-p", "Hi"]).stdout  # the prompt matters
    r = _run(["generate", "-m", "tiny-random", "-p", "Hi", "Hi there"])
    assert r.exit_code == 2 and "not both" in r.output


def test_stop_escapes():
    assert cli_mod.unescape(r"\n\n") == "\n\n" and cli_mod.unescape(r"a\tb\r\\n") == "a\tb\r\\n"
    assert cli_mod.unescape(r"C:\dir") == r"C:\dir" and cli_mod.unescape("é\n") == "é\n"


def test_stop_from_the_shell_reaches_generation_unescaped(monkeypatch):
    seen = {}

    def fake_generate(prompt, model, system, mode, effort, raw, opts, *rest):
        seen.update(opts)

    monkeypatch.setattr(cli_mod, "_generate", fake_generate)
    # what a shell passes for --stop "\n\n": backslash, n, backslash, n
    r = CliRunner().invoke(cli_mod.app, ["generate", "-m", "tiny-random", "--stop", "\\n\\n", "--stop", "end", "x"])
    assert r.exit_code == 0, r.output
    assert seen["stop"] == ["\n\n", "end"]


def test_stop_ends_the_reply_in_a_real_run(tiny_reply):
    """The reply of a run with --stop X ends right before the first X of the free-running reply;
    X is taken from that reply and passed with its backslash escapes, as a shell would."""
    text = tiny_reply
    cut = text[len(text) // 2: len(text) // 2 + 3]
    stop = cut.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    got = cli("generate", "-m", "tiny-random", "-n", "24", "--raw", "--stop", stop, "Once upon a time").stdout
    assert got == text[: text.index(cut)] + "\n"


@pytest.fixture(scope="module")
def tiny_reply():
    return cli("generate", "-m", "tiny-random", "-n", "24", "--raw", "Once upon a time").stdout[:-1]


@pytest.mark.parametrize("value, ok", [("0", False), ("-0.1", False), ("1.5", False), ("1", True), ("0.5", True)])
def test_top_p_help_and_validation_agree(value, ok, monkeypatch):
    monkeypatch.setattr(cli_mod, "_generate", lambda *a: None)
    r = CliRunner().invoke(cli_mod.app, ["generate", "-m", "tiny-random", "--top-p", value, "x"])
    assert (r.exit_code == 0) == ok, r.output
    if not ok:
        assert "0 < top_p <= 1" in r.output
    help_text = CliRunner().invoke(cli_mod.app, ["generate", "--help"]).output
    assert "0 < top_p <= 1" in help_text and "0.0<=x<=1.0]" not in help_text.split("--top-p")[1].split("--top-k")[0]


@pytest.mark.parametrize("command", ["generate", "chat", "convert", "bench"])
def test_help_is_whole_at_80_columns(command):
    import re

    p = subprocess.run([sys.executable, "-m", "mlx_dsv4", command, "--help"], capture_output=True, text=True,
                       env={"COLUMNS": "80", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, check=True)
    assert "…" not in p.stdout and max(len(line) for line in p.stdout.splitlines()) <= 80
    # every long option of the command appears whole (rich's panels cut them: "--reasoning-effo…")
    import typer.main

    for param in typer.main.get_command(cli_mod.app).commands[command].params:
        for opt in (o for o in param.opts + param.secondary_opts if o.startswith("--")):
            assert re.search(re.escape(opt) + r"(?![\w-])", p.stdout), (command, opt)


def test_bench_png_without_matplotlib_fails_before_running():
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'matplotlib': raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from mlx_dsv4.cli import app\n"
            "app(['bench', '--contexts', '64', '--png', 'b.png'], prog_name='mlx_dsv4')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/tmp",
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2 and "--png needs matplotlib" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert "machine:" not in p.stdout  # refused before the benchmark started


def test_bench_context_shorter_than_a_compression_window():
    """Used to divide by zero after the run (no completed ratio-128 window to measure)."""
    r = CliRunner().invoke(cli_mod.app, ["bench", "--model", "tiny-random", "--contexts", "64"])
    assert r.exit_code == 1 and "at least 128 tokens" in r.output


# -- the default model's download ---------------------------------------------------------------
@pytest.fixture
def offline_hub(monkeypatch):
    """Nothing is cached, and a download records its repo and fails as an offline Hub would."""
    calls = []

    def download(repo, revision=None):
        calls.append(repo)
        raise CheckpointNotFoundError("offline (test)", f"hf://{repo}")

    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(hub, "download", download)
    monkeypatch.setattr(cli_mod, "_interactive", lambda: False)
    return calls


def _run(args, input=None):
    return CliRunner().invoke(cli_mod.app, args, input=input)


@pytest.mark.parametrize("command", [["generate", "Hello"], ["chat"]])
def test_default_model_is_not_downloaded_silently(offline_hub, command):
    r = _run(command)
    assert r.exit_code == 1 and offline_hub == []
    assert "about 160 GB" in r.output and "no --model given" in r.output and "--yes" in r.output


def test_yes_or_an_explicit_model_downloads(offline_hub):
    for args in (["generate", "--yes", "Hello"], ["generate", "-y", "Hello"],
                 ["generate", "--model", cli_mod.DEFAULT_MODEL, "Hello"]):
        r = _run(args)
        assert "about 160 GB" in r.output and "offline (test)" in r.output and r.exit_code == 1
    assert offline_hub == [cli_mod.DEFAULT_MODEL] * 3


def test_a_terminal_is_asked(offline_hub, monkeypatch):
    monkeypatch.setattr(cli_mod, "_interactive", lambda: True)
    r = _run(["generate", "Hello"], input="n\n")
    assert r.exit_code == 1 and "Download it now?" in r.output and "not downloading" in r.output
    assert offline_hub == []
    r = _run(["generate", "Hello"], input="y\n")
    assert "offline (test)" in r.output and offline_hub == [cli_mod.DEFAULT_MODEL]


def test_a_cached_model_is_not_asked_about(offline_hub, monkeypatch):
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda repo, f, **k: f"/cache/{repo}/{f}")
    r = _run(["generate", "Hello"])
    assert "not downloaded yet" not in r.output and offline_hub == [cli_mod.DEFAULT_MODEL]
