"""Pipelined batched decoding (BatchGenerator(ahead=True)): each step() submits the next decode step, fed
with the unread tokens of the step in flight, then reads those. Truth: the unpipelined generator
(ahead=False: build, evaluate, read) on the same requests, for every response and for the cache each
row leaves behind (the cache contract: prompt plus generated tokens but the last).

Where the two build the same steps (every row joins at once, rows end on max_tokens only), both evaluate
the same graphs in the same order: responses and caches agree exactly. Elsewhere a row joining while a step
is in flight enters one step later, and a row that ends on a stop string or a cancel was fed one step more
(then undone), so steps of the other rows have another batch size: BLAS sums the [B, d] projections in
another order, ~1e-6 relative, which TOL covers while a row whose undo went wrong is a whole token off
(the negative control).
"""

import collections
import threading
import time

import mlx.core as mx
import numpy as np
import pytest
from sync_count import count_syncs
from tinymodels import flat_state

from mlx_dsv4 import evaluator
from mlx_dsv4.batch import BatchGenerator
from mlx_dsv4.load import load

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-random")


@pytest.fixture(params=[True, False], ids=["worker-thread", "async_eval"])
def worker(request):
    """Pipelined through the evaluator thread (the CPU) or mx.async_eval (what a GPU runs)."""
    evaluator.set_enabled(request.param)
    yield request.param
    evaluator.set_enabled(True)


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 129280, n).tolist() for n in lengths]


def run(model, tok, ahead, rows, joins=(), cancel_at=None, prefill_step=64, **kw):
    """rows: [(prompt, kwargs)]; joins: {step: [(prompt, kwargs)]}; cancel_at: (row, step).
    Returns ([responses] per row, [cache] per row)."""
    g = BatchGenerator(model, tok, 8, prefill_step=prefill_step, ahead=ahead)
    caches, uids = [], []

    def insert(p, k):
        caches.append(model.make_cache())
        uids.append(g.insert(p, prompt_cache=caches[-1], **dict(kw, **k)))

    for p, k in rows:
        insert(p, k)
    out, step, joins = collections.defaultdict(list), 0, dict(joins)
    while len(g) or joins:
        for p, k in joins.pop(step, []):
            insert(p, k)
        if cancel_at is not None and step == cancel_at[1]:
            g.cancel(uids[cancel_at[0]])
        for uid, r in g.step():
            out[uid].append(r)
        step += 1
    return [out[u] for u in uids], caches


def compare(model, tok, exact, **case):
    old, old_caches = run(model, tok, False, **case)
    new, new_caches = run(model, tok, True, **case)
    for a, b in zip(old, new):
        assert [r.token for r in b] == [r.token for r in a]
        assert [(r.text, r.finish_reason) for r in b] == [(r.text, r.finish_reason) for r in a]
        for ra, rb in zip(a, b):
            if ra.token is not None:
                assert rb.logprob == ra.logprob if exact else abs(rb.logprob - ra.logprob) < TOL
    for ca, cb in zip(old_caches, new_caches):
        sa, sb = flat_state(ca), flat_state(cb)
        assert sa.keys() == sb.keys()
        for k in sa:
            close = not exact and isinstance(sa[k], np.ndarray) and sa[k].dtype.kind == "f"
            same = np.allclose(sa[k], sb[k], rtol=TOL, atol=TOL) if close else np.array_equal(sa[k], sb[k])
            assert same, k
    return new


def test_rows_ending_on_max_tokens_are_exactly_the_unpipelined_ones(tiny, worker):
    """Different lengths (CSA / HCA window completions at different steps), the repetition penalty (reads
    the lazy history), top log-probs and seeded sampling side by side; all prefilled in the first step."""
    model, tok = tiny
    ps = prompts([3, 4, 40, 126, 130], seed=1)
    rows = [(ps[0], dict(max_tokens=7)), (ps[1], dict(max_tokens=1)), (ps[2], dict(max_tokens=12)),
            (ps[3], dict(max_tokens=9, repetition_penalty=1.5, num_top_logprobs=2)),
            (ps[4], dict(max_tokens=10, temperature=1.5, seed=4))]
    new = compare(model, tok, True, rows=rows, prefill_step=512)
    assert [sum(r.token is not None for r in rs) for rs in new] == [7, 1, 12, 9, 10]


def test_rows_that_stop_join_or_are_cancelled_midway(tiny, worker, monkeypatch):
    """A stop string met (the row was already fed its next step: undone), rows joining while a step is in
    flight, a cancel latched while the row's token is in flight (dropped, as unpipelined)."""
    model, tok = tiny
    ps = prompts([5, 9, 130, 3, 60], seed=2)
    probe, _ = run(model, tok, False, [(ps[0], dict(max_tokens=10))])
    text = "".join(r.text for r in probe[0])
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    rows = [(ps[0], dict(max_tokens=10, stop=[stop])), (ps[1], dict(max_tokens=10)), (ps[2], dict(max_tokens=8))]
    joins = {3: [(ps[3], dict(max_tokens=6))], 5: [(ps[4], dict(max_tokens=5, repetition_penalty=1.3))]}
    undone, undo = [], BatchGenerator._undo
    monkeypatch.setattr(BatchGenerator, "_undo", lambda self, row, ck: undone.append(row.uid) or undo(self, row, ck))
    new = compare(model, tok, False, rows=rows, joins=joins, cancel_at=(1, 4))
    assert sorted(undone) == [0, 1]  # both paths ran: the stopped row's step fed ahead, the cancelled one's in flight
    assert new[0][-1].finish_reason == "stop" and len(new[0]) < 10
    assert new[1][-1].finish_reason == "cancelled" and 0 < len(new[1]) - 1 < 10


def test_an_undo_left_out_is_caught(tiny, monkeypatch):
    """Negative control: without rolling back the step fed to a row that then stopped, its cache holds
    one token more than the contract allows, and the comparison above fails."""
    model, tok = tiny
    monkeypatch.setattr(BatchGenerator, "_undo", lambda self, row, ck: None)
    ps = prompts([5, 9], seed=2)
    probe, _ = run(model, tok, False, [(ps[0], dict(max_tokens=10))])
    text = "".join(r.text for r in probe[0])
    rows = [(ps[0], dict(max_tokens=10, stop=[text[len(text) // 2 : len(text) // 2 + 2]])), (ps[1], {})]
    with pytest.raises(AssertionError, match=r"^0\.offset"):  # layer 0's offset: the first key compared
        compare(model, tok, False, rows=rows, max_tokens=10)


def test_one_submission_and_no_evaluation_per_steady_step(tiny, monkeypatch):
    """Once every row decodes, a step costs one submission to the evaluator thread, no evaluation on the
    decoding thread and two read-backs per row (its token, its log-prob), whatever the batch size."""
    model, tok = tiny
    calls = count_syncs(monkeypatch)
    for b in (1, 3):
        g = BatchGenerator(model, tok, 8, prefill_step=512, ahead=True)
        for p in prompts([20] * b, seed=b):
            g.insert(p, max_tokens=50)
        for _ in range(3):  # prefill, the first two steps
            g.step()
        calls.clear()
        for _ in range(10):
            assert len(g.step()) == b
        assert dict(calls) == {"submit": 10, "item": 20 * b}, b


def test_unseeded_sampling_rows_and_the_global_key(tiny, monkeypatch):
    """Rows sampling from the global generator: its key goes to the worker evaluated and comes back
    evaluated, so the rows decode and a later draw on this thread works (a key left lazy on either
    thread's stream fails with 'no Stream(cpu, N) in current thread'). A row joining while a step is in
    flight finds the key lazy on the worker's stream: it must not be evaluated here then (the worker is
    slowed down so that the step is surely still in flight)."""
    model, tok = tiny
    slow, worker_eval = threading.current_thread, mx.eval
    monkeypatch.setattr(mx, "eval", lambda *a: (slow().name == "mlx-dsv4-eval" and time.sleep(0.2), worker_eval(*a)))
    mx.random.uniform()  # the global key lazy on this thread's stream, as any earlier draw leaves it
    ps = prompts([4, 9, 5], seed=3)
    got, _ = run(model, tok, True, [(p, {}) for p in ps[:2]], joins={3: [(ps[2], {})]}, max_tokens=6,
                 temperature=1.0)
    assert [sum(r.token is not None for r in rs) for rs in got] == [6, 6, 6]
    assert 0 <= mx.random.uniform().item() < 1
