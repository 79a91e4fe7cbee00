"""Routed experts streamed from disk (load(expert_memory_gb=X)): exactly the resident model's logits
and greedy tokens, at most half its peak memory on a checkpoint whose experts are most of its
bytes, with hits and reads accounted for in closed form; bad budgets are refused clearly.

Oracle: the same checkpoint loaded resident (itself checked against the exact dequantized official
values in test_load_converted.py). Equality is bitwise: the streamed model runs the same MLX ops on
the same expert bytes, only gathered from another stack, so no tolerance applies.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from ckpt_util import small_config

from mlx_dsv4.checkpoint import convert, write_random_official_checkpoint
from mlx_dsv4.checkpoint import experts as ckpt_experts
from mlx_dsv4.load import load

ROOT = Path(__file__).resolve().parents[1]
# Experts dominate: 3 x 128 experts of 0.21 MB (mxfp4) = 80 MB against ~3 MB for everything else.
CFG = small_config(hidden_size=256, moe_intermediate_size=512, n_routed_experts=128, num_experts_per_tok=6,
                   compress_ratios=[0, 4, 0], num_hidden_layers=2)
EXPERT_MB = 3 * 256 * 512 * (0.5 + 1 / 32) / 1e6  # w1, w3, w2 in mxfp4: 4-bit codes + one E8M0 byte per 32
TOTAL_GB = 3 * 128 * EXPERT_MB / 1e3  # two layers and the MTP block


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("streaming")
    official = write_random_official_checkpoint(base / "official", CFG, seed=0)
    return {"official": official, "converted": convert(official, base / "converted", progress=False)}


def _run(model, toks: mx.array, decode: int = 3) -> list[np.ndarray]:
    """Logits of a prefill then `decode` single-token steps."""
    cache = model.make_cache()
    out = [np.array(model(toks, cache))]
    for t in range(decode):
        out.append(np.array(model(toks[:, t : t + 1], cache)))
    return out


TOKS = mx.array(np.random.default_rng(0).integers(0, CFG["vocab_size"], (1, 24)))


@pytest.mark.parametrize("kind", ["converted", "official"])
@pytest.mark.parametrize("budget", [0.4, 0.03], ids=["budget_40pct", "budget_3pct_split_rows"])
def test_same_logits_as_resident(ckpts, kind, budget):
    resident, _ = load(ckpts[kind], dtype=mx.float32)
    ref = _run(resident, TOKS)
    streamed, _ = load(ckpts[kind], dtype=mx.float32, expert_memory_gb=budget * TOTAL_GB)
    store = streamed.expert_store
    assert store is not None and "w1" not in streamed.layers[0].ffn.experts  # nothing resident
    assert store.capacity * store.expert_bytes <= store.budget_bytes
    got = _run(streamed, TOKS)
    for a, b in zip(got, ref):
        assert np.array_equal(a, b)
    s = store.stats()
    assert s["tokens"] == TOKS.shape[1] + 3 and s["misses"] > 0
    assert len(store._slot) <= store.capacity
    # each miss reads one expert's bytes from disk; mxfp4 on disk = mxfp4 in memory
    assert s["bytes_read"] == s["misses"] * store.expert_bytes == s["misses"] * round(EXPERT_MB * 1e6)


def test_a_wrong_expert_is_caught(ckpts, monkeypatch):
    """Negative control: reading a neighbouring expert's bytes changes the logits."""
    ref = _run(load(ckpts["converted"], dtype=mx.float32)[0], TOKS, decode=0)
    real = ckpt_experts.LayerExpertFiles.read_raw
    monkeypatch.setattr(ckpt_experts.LayerExpertFiles, "read_raw", lambda self, e: real(self, (e + 1) % self.n_experts))
    got = _run(load(ckpts["converted"], dtype=mx.float32, expert_memory_gb=0.4 * TOTAL_GB)[0], TOKS, decode=0)
    assert not np.array_equal(got[0], ref[0])


def test_second_pass_hits_when_the_layers_fit(ckpts):
    """A budget holding both backbone layers' experts (not the MTP's): a repeated input reads nothing."""
    model, _ = load(ckpts["converted"], dtype=mx.float32, expert_memory_gb=2.01 * 128 * EXPERT_MB / 1e3)
    store = model.expert_store
    _run(model, TOKS, decode=0)
    first = store.stats()
    store.reset_stats()
    _run(model, TOKS, decode=0)
    s = store.stats()
    assert first["misses"] > 0 and s["misses"] == 0 and s["bytes_read"] == 0 and s["hit_rate"] == 1.0


@pytest.mark.parametrize("gb", [0, -1.0, float("nan"), float("inf"), True, "2"])
def test_bad_budgets_are_refused(ckpts, gb):
    with pytest.raises(ValueError, match="expert_memory_gb must be a"):
        load(ckpts["converted"], expert_memory_gb=gb)


def test_budget_below_one_layers_top_k(ckpts):
    with pytest.raises(ValueError, match="fewer than the 6 one token needs in one layer: give at least 0.00125 GB"):
        load(ckpts["converted"], expert_memory_gb=5.5 * EXPERT_MB / 1e3)


def test_budget_above_all_experts_loads_resident(ckpts, caplog):
    with caplog.at_level(logging.WARNING, logger="mlx_dsv4"):
        model, _ = load(ckpts["converted"], expert_memory_gb=1.01 * TOTAL_GB)
    assert model.expert_store is None and "scales" in model.layers[0].ffn.experts.w1
    assert "holds all routed experts" in caplog.text


def test_tiny_has_no_files_to_stream():
    with pytest.raises(ValueError, match="'tiny-random' has none"):
        load("tiny-random", expert_memory_gb=1)


PEAK = """
import json, sys
import mlx.core as mx
from mlx_dsv4.load import load
from mlx_dsv4.generate import stream_generate
gb = {gb!r}
model, tok = load({path!r}, expert_memory_gb=gb)
mx.reset_peak_memory()
toks = [r.token for r in stream_generate(model, tok, list(range(3, 35)), max_tokens=8)]
store = model.expert_store
print(json.dumps({{"peak": mx.get_peak_memory(), "tokens": toks, "stats": store and store.stats()}}))
"""


def _child(path: Path, gb: float | None) -> dict:
    r = subprocess.run([sys.executable, "-c", PEAK.format(path=str(path), gb=gb)], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_greedy_tokens_at_half_the_peak_memory(ckpts):
    """Each run in a fresh process, peak measured by MLX's allocator (the CPU backend counts every
    array): the budget is 15% of the experts, so the peak must fall well under half."""
    resident = _child(ckpts["converted"], None)
    streamed = _child(ckpts["converted"], 0.15 * TOTAL_GB)
    assert streamed["tokens"] == resident["tokens"] and len(resident["tokens"]) == 8
    # the measurement sees the experts: the resident peak holds the two layers' 53 MB of them
    assert resident["peak"] > 2 * 128 * EXPERT_MB * 1e6
    assert streamed["peak"] <= 0.5 * resident["peak"], (streamed["peak"], resident["peak"])
    assert streamed["stats"]["bytes_read"] > 0
    print(f"peak MB: resident {resident['peak'] / 1e6:.1f}, streamed {streamed['peak'] / 1e6:.1f}")


def test_stats_reach_verbose_output_and_health(ckpts):
    from fastapi.testclient import TestClient

    from mlx_dsv4.generate import format_stats, stream_generate
    from mlx_dsv4.server.app import create_app

    model, tok = load(ckpts["converted"], dtype=mx.float32, expert_memory_gb=0.2 * TOTAL_GB)
    last = list(stream_generate(model, tok, [3, 4, 5], max_tokens=3))[-1]
    # layer 0 saw the 2 prefilled tokens, then one token per step
    assert last.expert_stats["tokens"] == 5 and last.expert_stats["bytes_per_token"] > 0
    assert "Experts streamed: hit rate" in format_stats(last)
    app = create_app(model, tok)
    try:
        assert TestClient(app).get("/health").json()["experts"]["tokens"] == 5
    finally:
        app.state.server.engine.close()


def test_cli_refuses_a_bad_budget_as_a_flag_error():
    from typer.testing import CliRunner

    import mlx_dsv4.cli as cli_mod

    for cmd in (["generate", "hi"], ["chat"], ["serve"], ["bench"]):
        r = CliRunner().invoke(cli_mod.app, [*cmd, "--expert-memory-gb", "0"])
        assert r.exit_code == 2 and "--expert-memory-gb must be a positive number of GB" in r.output, cmd
