"""Pipelined decoding (PlainDecoder(ahead=True)): the step feeding token n is submitted before token n
is read back. Truths: the previous loop (ahead=False, build / evaluate / read) for tokens, log-probs
and the cache it leaves; MLX's lazy graph itself for "nothing synchronises inside a step"."""

import collections
import importlib
import re
import tempfile
import threading
import time

import mlx.core as mx
import numpy as np
import pytest

import mlx_dsv4.model as model_mod
from mlx_dsv4.generate import PlainDecoder, stream_generate
from mlx_dsv4.load import load
from sync_count import count_syncs
from tinymodels import flat_state

generate = importlib.import_module("mlx_dsv4.generate")  # the package re-exports a function of that name

PROMPT = "<｜begin▁of▁sentence｜><｜User｜>Tell me a story about a dragon.<｜Assistant｜></think>"


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-random")


def run(model, tok, pipeline, monkeypatch, **kw):
    monkeypatch.setattr(generate, "PIPELINE", pipeline)
    cache = model.make_cache()
    rs = list(stream_generate(model, tok, PROMPT, prompt_cache=cache, **kw))
    return rs, cache


@pytest.mark.parametrize("kw", [
    dict(max_tokens=9),  # ends on max_tokens: nothing was fed ahead
    dict(max_tokens=9, temperature=0.8, top_k=40, seed=3),  # sampling: the same random draws
    dict(max_tokens=9, repetition_penalty=1.5, num_top_logprobs=2),  # processors read the lazy history
    dict(max_tokens=40, stop=["\x00never\x00"], should_stop=None),  # crosses CSA windows (ratio 4)
])
def test_same_tokens_logprobs_and_cache_as_the_previous_loop(tiny, monkeypatch, kw):
    model, tok = tiny
    old, old_cache = run(model, tok, False, monkeypatch, **kw)
    new, new_cache = run(model, tok, True, monkeypatch, **kw)
    assert [r.token for r in new] == [r.token for r in old]
    # the same graph evaluated in the same order: log-probs agree exactly
    assert [r.logprob for r in new] == [r.logprob for r in old]
    assert [r.top_logprobs for r in new] == [r.top_logprobs for r in old]
    a, b = flat_state(old_cache), flat_state(new_cache)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_an_early_stop_drops_the_step_fed_ahead(tiny, monkeypatch):
    """EOS, a stop string or a cancel stops the stream after the next step went in: close() rolls it
    back, so the cache holds the prompt and every generated token but the last, as before."""
    model, tok = tiny
    ref, _ = run(model, tok, False, monkeypatch, max_tokens=12)
    text = "".join(r.text for r in ref)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    polls = []
    n_prompt = len(tok.encode(PROMPT, add_special_tokens=False))
    for kw in (dict(stop=[stop]), dict(should_stop=lambda: polls.append(1) or len(polls) > 5)):
        polls.clear()
        old, old_cache = run(model, tok, False, monkeypatch, max_tokens=12, **kw)
        polls.clear()
        new, new_cache = run(model, tok, True, monkeypatch, max_tokens=12, **kw)
        assert [r.token for r in new] == [r.token for r in old]
        assert new[-1].finish_reason == old[-1].finish_reason in ("stop", "cancelled")
        assert new_cache[0].offset == old_cache[0].offset == n_prompt + len([r for r in new if r.token]) - 1
        a, b = flat_state(old_cache), flat_state(new_cache)
        assert all(np.array_equal(a[k], b[k]) for k in a)


def _labels(*outs) -> collections.Counter:
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *outs)
        return collections.Counter(re.findall(r'label ="([^"]+)", shape=rectangle', open(f.name).read()))


def _two_lazy_steps(model, tok):
    """Build step 1 and step 2 (fed step 1's unread token) without evaluating anything; returns the
    argmax count of step 1's graph and of step 2's. Step 2's graph reaches back into step 1 only if
    nothing was evaluated on the way: any evaluation (mx.eval, .item(), np.array, ...) of something
    that depends on step 1 materialises it and cuts its graph off."""
    cache = model.make_cache()
    model(mx.array(tok.encode(PROMPT, add_special_tokens=False))[None], cache)
    mx.eval([c.state for c in cache])
    dec = PlainDecoder(model, cache, lambda lp: mx.argmax(lp, axis=-1), [], None)
    y1, _ = dec.build(mx.array([[5]]))
    one = _labels(y1)["ArgReduce"]
    y2, _ = dec.build(y1.reshape(1, 1))
    return one, _labels(y2)["ArgReduce"]


def test_nothing_synchronises_inside_a_decode_step(tiny, monkeypatch):
    model, tok = tiny
    one, two = _two_lazy_steps(model, tok)
    assert one == 1 and two == 2  # the sampler's argmax of each step: step 1 is still lazy under step 2
    # negative control: one read-back inside a layer (as a stray .item() would be) is caught
    post = model_mod.hc_post
    monkeypatch.setattr(model_mod, "hc_post", lambda *a: (out := post(*a), out.sum().item())[0])
    one, two = _two_lazy_steps(model, tok)
    assert two == 1


def test_one_submission_and_no_blocking_evaluation_per_token(tiny, monkeypatch):
    """Each further token costs one submission to the evaluator thread, no evaluation on the decoding
    thread (the worker's own mx.eval is not counted) and two read-backs (the token, its log-prob)."""
    model, tok = tiny
    calls = count_syncs(monkeypatch)
    seen = []
    for n in (6, 16):
        calls.clear()
        run(model, tok, True, monkeypatch, max_tokens=n)
        seen.append(dict(calls))
    extra = {k: seen[1].get(k, 0) - seen[0].get(k, 0) for k in ("eval", "async_eval", "submit", "item")}
    assert extra == {"eval": 0, "async_eval": 0, "submit": 10, "item": 20}


def test_interleaved_streams_sampling_from_the_global_key(tiny, monkeypatch):
    """Two unseeded sampled streams read in turn on one thread: the second starts while the first has a
    step in flight, which split the global key on the worker's stream. The second stream's start waits
    for the worker before it evaluates the key here (the worker is slowed so that the step is surely in
    flight; evaluating the key at once fails with 'no Stream(cpu, N) in current thread')."""
    model, tok = tiny
    slow, worker_eval = threading.current_thread, mx.eval
    monkeypatch.setattr(mx, "eval", lambda *a: (slow().name == "mlx-dsv4-eval" and time.sleep(0.2), worker_eval(*a)))
    one = stream_generate(model, tok, PROMPT, max_tokens=5, temperature=1.0)
    got = {1: [next(one)], 2: []}
    for r in stream_generate(model, tok, PROMPT + " Now.", max_tokens=5, temperature=1.0):
        got[2].append(r)
        got[1] += [r for r in [next(one, None)] if r is not None]
    assert [[r.token is not None for r in rs] for rs in got.values()] == [[True] * 5] * 2
