"""Fused reference pieces (mlx_dsv4/kernels/fuse.py) and the other decode-graph savings change no bit.

Truths: the same model run with the pieces unfused (the ops one by one, MLX_DSV4_FUSE=0) for logits and
caches, bitwise, in a chunked prefill that crosses the indexer's top-k (tiny: k = 16 of up to 37 entries)
and the ratio-128 boundary, then token-by-token decode; a closed form (numpy float32) for RoPE; MLX's own
graph for the node count a decode step costs.
"""

import subprocess
import sys
import threading

import mlx.core as mx
import numpy as np
import pytest

from mlx_dsv4.kernels import fuse
from mlx_dsv4.rope import apply_rope, cos_sin, inv_freq, table
from tinymodels import flat_state, mlx_model, tokens

PREFILL, DECODE = 150, 6


def _run(model, toks, fused: bool):
    fuse.set_enabled(fused)
    try:
        cache, outs = model.make_cache(), []
        for s in range(0, PREFILL, 50):
            outs.append(np.array(model(mx.array(toks[:, s : s + 50]), cache)))
        t = mx.array(toks[:, PREFILL : PREFILL + 1])
        for _ in range(DECODE):
            y = model(t, cache, last_only=True)
            outs.append(np.array(y))
            t = mx.argmax(y[:, -1], axis=-1, keepdims=True)
        return outs, flat_state(cache)
    finally:
        fuse.set_enabled(True)


@pytest.mark.parametrize("kind", ["flash", "pro"])
def test_fused_pieces_change_no_bit(kind):
    model = mlx_model(kind, simulate_qat=True)
    toks = tokens(PREFILL + 1)
    a, ca = _run(model, toks, False)
    b, cb = _run(model, toks, True)
    for i, (x, y) in enumerate(zip(a, b)):
        assert np.array_equal(x, y), f"call {i}: max |diff| {np.abs(x - y).max()}"
    assert ca.keys() == cb.keys()
    for k in ca:
        assert np.array_equal(ca[k], cb[k]), k


def test_negative_control_a_piece_off_by_a_rounding_is_seen(monkeypatch):
    """The comparison above sees a fused piece that differs in the last bits (hc_post's, scaled by 1 + 2^-20)."""
    from mlx_dsv4.kernels import hc

    real = fuse._compiled

    def nudged(fn, static, stream):
        f = real(fn, static, stream)
        return (lambda *a: f(*a) * (1 + 2**-20)) if fn is hc._post else f

    monkeypatch.setattr(fuse, "_compiled", nudged)
    model = mlx_model("flash", simulate_qat=True)
    toks = tokens(PREFILL + 1)
    a, _ = _run(model, toks, False)
    b, _ = _run(model, toks, True)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))


def _nodes(out) -> int:
    import collections
    import re
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, out)
        return sum(collections.Counter(re.findall(r'label ="([^"]+)", shape=rectangle', open(f.name).read())).values())


def test_a_fused_decode_step_is_a_smaller_graph():
    """What the pieces are for: fewer graph nodes per decode step (each is scheduled one by one on the CPU).
    Measured 0.70x on the Flash-schedule bench model; the tiny's 4 layers give a similar share."""
    model = mlx_model("flash", simulate_qat=True)
    toks = tokens(PREFILL + 1)
    cache = model.make_cache()
    mx.eval(model(mx.array(toks[:, :PREFILL]), cache), [c.state for c in cache])
    counts = {}
    for fused in (False, True):
        fuse.set_enabled(fused)
        snap = [c.copy() for c in cache]
        counts[fused] = _nodes(model(mx.array(toks[:, PREFILL:]), snap, last_only=True))
    fuse.set_enabled(True)
    assert counts[True] <= 0.85 * counts[False], counts


def test_rope_is_the_closed_form_bit_for_bit():
    """(x0 c - x1 s, x0 s + x1 c) and its inverse, in float32 as numpy computes them (IEEE: the same bits)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3, 24)).astype(np.float32)
    ang = rng.uniform(-40, 40, (5, 1, 8)).astype(np.float32)
    c, s = np.cos(ang), np.sin(ang)
    x0, x1 = x[..., 8::2], x[..., 9::2]
    for inverse, sg in ((False, 1.0), (True, -1.0)):
        want = x.copy()
        want[..., 8::2] = x0 * c - x1 * (sg * s)
        want[..., 9::2] = x0 * (sg * s) + x1 * c
        got = np.array(apply_rope(mx.array(x), mx.array(c), mx.array(s), inverse=inverse))
        assert np.array_equal(got, want), f"inverse={inverse}: max |diff| {np.abs(got - want).max()}"


def test_position_tables_are_shared_per_thread_and_exact():
    from mlx_dsv4.config import from_hf_config
    from mlx_dsv4.tiny import tiny_hf_config

    args = from_hf_config(tiny_hf_config("flash"))
    f4, f128, f0 = inv_freq(args, 4), inv_freq(args, 128), inv_freq(args, 0)
    assert f4 is f128 and f0 is not f4, "layers of a kind share one frequency array"
    a, b = table(f4, 37, 3, 4), table(f4, 37, 3, 4)
    assert a[0] is b[0], "a second layer of the step reuses the table"
    want = cos_sin(mx.arange(37, 49, 4), f4)
    assert all(np.array_equal(np.array(x), np.array(y)) for x, y in zip(a, want))
    other = []
    t = threading.Thread(target=lambda: other.append(table(f4, 37, 3, 4)))
    t.start()
    t.join()
    assert other[0][0] is not a[0], "another thread (its own stream) builds its own"


def test_the_switch_reads_the_environment():
    code = "from mlx_dsv4.kernels import fuse; print(fuse.enabled())"
    run = lambda env: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # noqa: E731
                                     env={**__import__("os").environ, **env}, timeout=120).stdout.strip()
    assert run({"MLX_DSV4_FUSE": "0"}) == "False"
    assert run({"MLX_DSV4_FUSE": "1"}) == "True"
