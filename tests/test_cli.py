"""The installed `mlx_dsv4` command, run in a subprocess with the tiny model: its output equals the
Python API's for the same prompt (the API is checked against the model's own logits in
test_generate.py), the chat keeps and resets history, bad flags fail with a readable message."""

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_dsv4.generate import generate
from mlx_dsv4.load import load

ROOT = Path(__file__).resolve().parents[1]
BOS = "<｜begin▁of▁sentence｜>"


def cli(*args, stdin=None, check=True):
    """Run the console script (or `python -m mlx_dsv4` where it is not installed) on this checkout."""
    exe = shutil.which("mlx_dsv4")
    cmd = [exe] if exe else [sys.executable, "-m", "mlx_dsv4"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               COLUMNS="200", NO_COLOR="1")
    env.pop("MLX_DSV4_DEBUG", None)
    p = subprocess.run(cmd + list(args), check=False, input=stdin, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-random")


def chat_prompt(messages, mode="chat"):
    from mlx_dsv4.chat import encode_messages

    return encode_messages(messages, thinking_mode=mode)


def test_generate_from_argument_and_from_stdin(tiny):
    model, tok = tiny
    expected = generate(model, tok, chat_prompt([{"role": "user", "content": "Hi there"}]), max_tokens=8)
    assert cli("generate", "--model", "tiny-random", "-n", "8", "Hi there").stdout == expected + "\n"
    p = cli("generate", "--model", "tiny-random", "-n", "8", "--verbose", stdin="Hi there\n")
    assert p.stdout == expected + "\n"
    assert "Generation: 8 tokens" in p.stderr and "Peak memory" in p.stderr


def test_generate_raw_prompt(tiny):
    model, tok = tiny
    ids = [0] + tok.encode("Once upon a time", add_special_tokens=False)
    assert cli("generate", "-m", "tiny-random", "--raw", "-n", "6", "Once upon a time").stdout == \
        generate(model, tok, ids, max_tokens=6) + "\n"


def test_prompt_cache_file_across_runs(tiny, tmp_path):
    model, tok = tiny
    f = str(tmp_path / "sys.safetensors")
    system = "You are a helpful assistant who knows the following document by heart. " * 3
    base = ["generate", "-m", "tiny-random", "-n", "6", "--system", system, "--prompt-cache-file", f, "-v"]
    for q in ("First question?", "Second question?"):  # the first run writes the file, the second reuses it
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": q}]
        p = cli(*base, q)
        assert p.stdout == generate(model, tok, chat_prompt(msgs), max_tokens=6) + "\n"
    n_sys = len(tok.encode(chat_prompt([{"role": "system", "content": system}]), add_special_tokens=False))
    assert f"({n_sys} cached)" in p.stderr
    p = cli("generate", "-m", "tiny-random", "-n", "2", "--system", "another", "--prompt-cache-file", f, "q", check=False)
    assert p.returncode == 1 and "not a proper prefix" in p.stderr and "Traceback" not in p.stderr


def test_chat_session_through_stdin(tiny):
    model, tok = tiny
    script = "Hello\n\nHow are you?\n/reset\nHello\n/exit\nnever read\n"
    p = cli("chat", "-m", "tiny-random", "-n", "6", "-v", stdin=script)
    turn1 = [{"role": "user", "content": "Hello"}]
    first = generate(model, tok, chat_prompt(turn1), max_tokens=6)
    # history: the second prompt holds the first exchange; after /reset the first turn comes again
    turn2 = turn1 + [{"role": "assistant", "content": first}, {"role": "user", "content": "How are you?"}]
    second = generate(model, tok, chat_prompt(turn2), max_tokens=6)
    assert p.stdout == f"{first}\n{second}\n{first}\n"
    prompts = [int(n) for n in re.findall(r"Prompt: (\d+) tokens", p.stderr)]
    n1, n2 = (len(tok.encode(chat_prompt(t), add_special_tokens=False)) for t in (turn1, turn2))
    assert prompts == [n1, n2, n1]  # three turns: nothing after /exit is read
    assert "(history cleared)" in p.stderr


def test_chat_thinking_mode_frames_the_reasoning():
    # the tiny model never closes its reasoning: the whole reply is reasoning, framed apart
    p = cli("chat", "-m", "tiny-random", "-n", "4", "--thinking", stdin="Hi\n")
    assert p.stdout.startswith("Thinking...\n") and p.stdout.endswith("\n...done thinking.\n")
    assert cli("chat", "-m", "tiny-random", "-n", "4", "--thinking", "--hide-reasoning", stdin="Hi\n").stdout == ""


def test_display_keeps_reasoning_apart():
    from mlx_dsv4.repl import Display

    out = io.StringIO()
    d = Display(out, "thinking")
    for piece in ("Let me ", "think.</th", "ink>The ans", "wer."):
        d.feed(piece)
    d.finish()
    assert "".join(d.reasoning) == "Let me think." and "".join(d.content) == "The answer."
    assert out.getvalue() == "Thinking...\nLet me think.\n...done thinking.\n\nThe answer.\n"
    out = io.StringIO()
    d = Display(out, "thinking", show_reasoning=False)
    d.feed("hidden</think>shown")
    d.finish()
    assert out.getvalue() == "shown\n"
    out = io.StringIO()
    d = Display(out, "chat")  # chat mode: everything is the answer, even a stray </think>
    d.feed("a</think>b")
    d.finish()
    assert out.getvalue() == "a</think>b\n" and d.reasoning == []


@pytest.mark.parametrize("args, code, message", [
    (["generate", "-m", "tiny-random", "--temp", "-1", "x"], 2, "--temperature"),
    (["generate", "-m", "tiny-random", "--bogus", "x"], 2, "No such option"),
    (["generate", "-m", "tiny-random", "--reasoning-effort", "max", "x"], 2, "--reasoning-effort needs --thinking"),
    (["generate", "-m", "tiny-random", "--reasoning-effort", "medium", "x"], 2, "--reasoning-effort"),
    (["generate", "-m", "tiny-random", "--prompt-cache-file", "c.bin", "x"], 2, "must end in .safetensors"),
    (["generate", "-m", "no-such-model", "x"], 1, "error: model 'no-such-model'"),
    (["generate", "-m", "/no/such/dir", "x"], 1, "no such directory"),
    (["generate", "-m", "tiny-random", " "], 2, "the prompt is empty"),
    (["bench", "--contexts", "1k"], 2, "--contexts must be comma-separated integers"),
    (["convert", "--hf-path", "/no/such/dir", "--mlx-path", "/tmp/x"], 1, "no such directory"),
    (["frobnicate"], 2, "No such command"),
])
def test_bad_flags_fail_readably(args, code, message):
    p = cli(*args, check=False)
    assert p.returncode == code and message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_prompt_longer_than_the_context(tiny, monkeypatch):
    # in process: the tiny model's context is 1M tokens, so shrink it for this run
    import dataclasses

    from typer.testing import CliRunner

    import mlx_dsv4.cli as cli_mod

    model, tok = tiny
    small = dataclasses.replace(model.args, max_position_embeddings=5)
    monkeypatch.setattr(model, "args", small)
    monkeypatch.setattr(cli_mod, "load_model", lambda name, verbose, *a, **k: (model, tok))
    r = CliRunner().invoke(cli_mod.app, ["generate", "--raw", "a rather long prompt of many words"])
    assert r.exit_code == 1 and "longer than the model's context of 5" in r.output


def test_version_and_help():
    p = cli("--help")
    assert all(c in p.stdout for c in ("generate", "chat", "convert", "serve", "bench"))
    from mlx_dsv4 import __version__

    assert cli("--version").stdout.strip() == __version__


def test_python_m_and_the_package_exports():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "mlx_dsv4", "--version"], check=True, capture_output=True,
                       text=True, env=env)
    from mlx_dsv4 import __version__

    assert p.stdout.strip() == __version__
    code = ("import sys, mlx_dsv4; assert 'mlx.core' not in sys.modules, 'import mlx_dsv4 must stay cheap'\n"
            "import mlx_dsv4.generate, mlx_dsv4.load, mlx_dsv4.chat\n"  # binding submodules must not shadow
            "from mlx_dsv4.generate import stream_generate as sg\n"
            "assert callable(mlx_dsv4.generate) and mlx_dsv4.generate.__name__ == 'generate'\n"
            "assert mlx_dsv4.load.__name__ == 'load' and mlx_dsv4.stream_generate is sg\n"
            "assert mlx_dsv4.encode_messages.__name__ == 'encode_messages' and mlx_dsv4.parse_completion\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_unseeded_sampling(tiny, monkeypatch):
    """`--temp` without `--seed` draws from mx.random's global key, which the decode worker splits: it
    crashed once ("There is no Stream(cpu, 0) in current thread"). In process, with the key left lazy here
    first, as an earlier draw leaves it; afterwards a draw here works (the worker evaluated the key it
    split: without the hand-over this draw fails); a seeded run twice gives the same text."""
    import mlx.core as mx
    from typer.testing import CliRunner

    import mlx_dsv4.cli as cli_mod

    monkeypatch.setattr(cli_mod, "load_model", lambda name, verbose, *a, **k: tiny)
    mx.random.normal((1,))
    args = ["generate", "--raw", "--temp", "0.8", "-n", "6", "--verbose", "Once upon a time"]
    r = CliRunner().invoke(cli_mod.app, args)
    assert r.exit_code == 0 and "Generation: 6 tokens" in r.output, r.output
    mx.eval(mx.random.normal((2,)))
    seeded = [CliRunner().invoke(cli_mod.app, args[:-2] + ["--seed", "3", args[-1]]) for _ in range(2)]
    assert seeded[0].exit_code == 0 and seeded[0].stdout == seeded[1].stdout
