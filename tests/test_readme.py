"""Every code block of README.md runs here, so the README cannot drift from what the code does.

```python blocks run in order in one namespace (as a reader pastes them), with the Hub id replaced
by "tiny" and max_tokens capped. ```bash blocks run in bash (pipes, $(cat ...), ~ and exports as a
shell does them) with `mlx_dsv4` bound to a function that records each call's arguments and stdin;
the calls are then run in order through the CLI in this process (the tiny model loads once), with
arguments rewritten (`rewrite`) so nothing is downloaded and every run is quick: generate/chat get
`--model tiny` (replacing a Hub id or placeholder path) and at most 8 tokens; convert reads a tiny
official checkpoint instead of a Hub id; bench measures contexts of 128 and 256. ```json and
```toml blocks must parse. Lines that cannot run here are left out by the explicit list SKIP, each
with its reason; every other command must exit 0."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mlx_dsv4.prompt_cache import TOKENS_KEY

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

SKIP = {  # line pattern -> why it cannot run in the test suite
    r"^bash scripts/test\.sh$": "runs this very test suite",
    r"^mlx_dsv4 serve\b": "starts a server that runs until stopped (tests/test_server_*.py cover it)",
    r"^claude$": "Claude Code is not installed here",
    r"^mlx\.launch --hostfile\b": "needs several Macs (tests/test_distributed*.py run mlx.launch on 127.0.0.1)",
    r"^python -m mlx_dsv4\.train_tiny\b": "trains for an hour (tests/test_train_tiny.py runs the recipe in small)",
}
STRIP = {r"^pip install -e \. && ": "the package is installed already (and the network is not used)"}


MAX_TOKENS = 8


def _value_index(args: list[str], *names: str) -> int | None:
    for i, a in enumerate(args[:-1]):
        if a in names:
            return i + 1
    return None


def rewrite(args: list[str]) -> list[str]:
    args = list(args)
    cmd = args[0] if args else ""
    if cmd in ("generate", "chat"):
        i = _value_index(args, "--model", "-m")
        if i is None:
            args[1:1] = ["--model", "tiny"]
        elif not os.path.isdir(os.path.expanduser(args[i])):
            args[i] = "tiny"  # a Hub id or a placeholder path
        i = _value_index(args, "--max-tokens", "-n")
        if i is None:
            args[1:1] = ["--max-tokens", str(MAX_TOKENS)]
        else:
            args[i] = str(min(int(args[i]), MAX_TOKENS))
    elif cmd == "convert":
        i = _value_index(args, "--hf-path")
        if i is not None and not os.path.isdir(os.path.expanduser(args[i])):
            args[i] = os.environ["README_OFFICIAL_CHECKPOINT"]  # a tiny official checkpoint
        args.append("--no-progress")
    elif cmd == "perplexity":
        i = _value_index(args, "--model", "-m")
        if i is not None and not os.path.isdir(os.path.expanduser(args[i])):
            args[i] = "tiny"
        i = _value_index(args, "--data")
        if i is not None and not os.path.exists(os.path.expanduser(args[i])):
            args[i] = os.environ["README_PYTHON_SOURCE"]  # a small source folder
        i = _value_index(args, "--num-tokens")
        args += ["--sequence-length", "64"]
        if i is not None:
            args[i] = "256"
    elif cmd == "bench":
        i = _value_index(args, "--contexts")
        if i is not None:
            args[i] = "128,256"
        args += ["--gen-tokens", "2", "--chunk", "128"]
    return args


def blocks(lang: str) -> list[str]:
    """The ```lang blocks, indented ones (inside list items) included, dedented."""
    out = []
    for m in re.finditer(rf"^( *)```{lang}\n(.*?)^\1```$", README, re.S | re.M):
        ind = len(m[1])
        out.append("".join(line[ind:] for line in m[2].splitlines(keepends=True)))
    return out


def test_the_readme_has_the_blocks_this_file_expects():
    assert len(blocks("python")) == 3 and len(blocks("bash")) >= 5 and blocks("json") and blocks("toml")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch folder holding what the examples refer to: a long document, a home for ~/models."""
    d = tmp_path_factory.mktemp("readme")
    (d / "long-document.md").write_text("# A document\n\n## Section 2\n\nThe sea is wide and deep. " * 20)
    (d / "home").mkdir()
    from mlx_dsv4.checkpoint import random_official_weights, write_official_checkpoint
    from mlx_dsv4.tiny import tiny_hf_config

    cfg = tiny_hf_config("flash")
    write_official_checkpoint(d / "official", cfg, random_official_weights(cfg, seed=0))
    return d


def _bash_script(block: str) -> str:
    lines = []
    for line in block.splitlines():
        cmd = line.split("  #")[0].strip()
        if any(re.search(p, cmd) for p in SKIP):
            continue
        for p in STRIP:
            cmd = re.sub(p, "", cmd)
        lines.append(cmd)
    return "\n".join(lines)


RECORD = r'''set -euo pipefail
n=0
mlx_dsv4() { n=$((n+1)); printf '%s\0' "$@" > "$CALLS/$n.args"; cat > "$CALLS/$n.in"; }
'''


@pytest.fixture(scope="module")
def tiny_once():
    from mlx_dsv4.load import load

    return load("tiny")


@pytest.mark.parametrize("i", range(len(blocks("bash"))))
def test_bash_block_runs(i, workdir, tiny_once, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from mlx_dsv4.cli import app

    loader = importlib.import_module("mlx_dsv4.load")  # the package attribute is the function

    script = _bash_script(blocks("bash")[i])
    if not script.strip():
        pytest.skip("every line of this block is in SKIP")
    home = workdir / "home"
    env = dict(os.environ, HOME=str(home), HF_HUB_OFFLINE="1", CALLS=str(tmp_path))
    p = subprocess.run(["bash", "-c", RECORD + script], cwd=workdir, env=env, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=60)
    assert p.returncode == 0, f"README bash block {i} failed in bash:\n{script}\n{p.stderr}"
    calls = sorted(tmp_path.glob("*.args"), key=lambda f: int(f.stem))
    assert calls or "mlx_dsv4" not in script
    real_load = loader.load
    monkeypatch.setattr(loader, "load",
                        lambda name, *a, **k: tiny_once if name == "tiny" else real_load(name, *a, **k))
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("README_OFFICIAL_CHECKPOINT", str(workdir / "official"))
    monkeypatch.setenv("README_PYTHON_SOURCE", str(ROOT / "mlx_dsv4" / "chat"))
    monkeypatch.delenv("MLX_DSV4_DEBUG", raising=False)
    for f in calls:
        args = f.read_bytes().decode().split("\0")[:-1]
        stdin = f.with_suffix(".in").read_text() or ("Hi\n/exit\n" if args[0] == "chat" else "")
        r = CliRunner().invoke(app, rewrite(args), input=stdin, catch_exceptions=False)
        assert r.exit_code == 0, f"README bash block {i}: mlx_dsv4 {' '.join(args)}\n{r.output[-3000:]}"


def test_python_blocks_run(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    ns: dict = {}
    for code in blocks("python"):
        code = code.replace('"deepseek-ai/DeepSeek-V4-Flash"', '"tiny"')
        code = re.sub(r"max_tokens=\d+", "max_tokens=8", code)
        exec(compile(code, "README.md", "exec"), ns)
    assert "finish: " in capsys.readouterr().out and ns["meta"][TOKENS_KEY] and ns["cache"][0].offset > len(ns["system"])
    # the batch example: each prompt's text is its solo greedy text
    m, tok = ns["model"], ns["tokenizer"]
    solo = [ns["mlx_dsv4"].generate(m, tok, p, max_tokens=8) for p in ("def add(a, b):", "import os\n")]
    assert ns["res"].texts[:2] == solo


def test_config_blocks_parse():
    for b in blocks("json"):
        json.loads(b)
    for b in blocks("toml"):
        tomllib.loads(b)


def test_troubleshooting_convert_option(workdir, tmp_path):
    """The Troubleshooting section's conversion option is one `mlx_dsv4 convert` accepts."""
    m = re.search(r"convert with `([^`]+)`", README)
    assert m, "the Troubleshooting line moved"
    p = subprocess.run([sys.executable, "-m", "mlx_dsv4", "convert", "--hf-path", str(workdir / "official"),
                        "--mlx-path", str(tmp_path / "out"), *m[1].split(), "--no-progress"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stderr
    assert "affine" in json.loads((tmp_path / "out" / "config.json").read_text())["mlx_dsv4"]["formats"]["attention"]
