"""Continuous batching (mlx_dsv4/batch.py): every row of a batch against its own solo run.

Truth: stream_generate on the same prompt alone (a cold cache, the B=1 path). Greedy tokens must be
identical; log-probabilities agree to TOL (GEN_TOL over a generation, below): the batched projections
are one [B, d] matmul where the solo path runs a [1, d] one, and BLAS sums those in a different order
(~1e-6 relative on fp32 logits of magnitude ~10), which 1e-4 covers while a row fed at a wrong position
is off by O(1).
The tiny-random Flash schedule is [0, 0, 4, 128, 4] with a 128-token window: prompt lengths around 4,
128 and 256 put the rows' CSA / HCA window completions and window evictions at different steps.
"""

import types

import mlx.core as mx
import numpy as np
import pytest
from tinymodels import mlx_model

from mlx_dsv4 import attention
from mlx_dsv4.batch import BatchGenerator, batch_generate, step_logits
from mlx_dsv4.cache_size import cache_bytes
from mlx_dsv4.generate import generate, prefill, stream_generate
from mlx_dsv4.kernels.sparse_attention import rows_attention, sparse_attention_reference
from mlx_dsv4.kvstore import make_rows
from mlx_dsv4.load import load

TOL = 1e-4
# Over a whole generation the trained-format simulation's FP8 / FP4 rounding of activations can turn a
# ~1e-6 summation-order difference into one rounding step of one value, which later tokens carry: up to
# 3e-4 in log-probability was measured on an AVX2 machine (OpenBLAS Haswell kernels). Still far from the
# O(1) of a row fed at a wrong position.
GEN_TOL = 2e-3
LENGTHS = [1, 3, 4, 126, 128, 129, 255, 258]


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-random")


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 129280, n).tolist() for n in lengths]


def solo(model, tok, prompt, **kw):
    return list(stream_generate(model, tok, prompt, **kw))


def run_batch(model, tok, rows, max_batch=8, joins=(), cancel_at=None, **kw):
    """rows: [(prompt, kwargs)]; joins: {step: [(prompt, kwargs)]} inserted before that step;
    cancel_at: (row index, step). Returns {insertion index: [responses]}."""
    g = BatchGenerator(model, tok, max_batch, prefill_step=64)
    uids = [g.insert(p, **dict(kw, **k)) for p, k in rows]
    out, step = {u: [] for u in uids}, 0
    joins = dict(joins)
    while len(g) or joins:
        for p, k in joins.pop(step, []):
            uids.append(g.insert(p, **dict(kw, **k)))
            out[uids[-1]] = []
        if cancel_at is not None and step == cancel_at[1]:
            g.cancel(uids[cancel_at[0]])
        for uid, r in g.step():
            out[uid].append(r)
        step += 1
    return [out[u] for u in uids]


def same(batch_rs, solo_rs):
    assert [r.token for r in batch_rs] == [r.token for r in solo_rs]
    assert [r.text for r in batch_rs] == [r.text for r in solo_rs]
    assert batch_rs[-1].finish_reason == solo_rs[-1].finish_reason
    for a, b in zip(batch_rs, solo_rs):
        if a.token is not None:
            assert abs(a.logprob - b.logprob) < GEN_TOL


def test_rows_at_different_offsets_match_their_solo_runs(tiny):
    model, tok = tiny
    ps = prompts(LENGTHS)
    got = run_batch(model, tok, [(p, {}) for p in ps], max_tokens=6, num_top_logprobs=3)
    for p, rs in zip(ps, got):
        want = solo(model, tok, p, max_tokens=6, num_top_logprobs=3)
        same(rs, want)
        for a, b in zip(rs, want):
            assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]


def test_compact_cache_with_simulated_formats_matches_solo(tiny):
    _, tok = tiny
    model = mlx_model("flash", simulate_qat=True)
    ps = prompts([2, 127, 130, 257], seed=3)
    got = run_batch(model, tok, [(p, {}) for p in ps], max_tokens=5)
    for p, rs in zip(ps, got):
        same(rs, solo(model, tok, p, max_tokens=5))


def test_rows_joining_leaving_and_cancelled_midway_leave_the_others_exact(tiny):
    model, tok = tiny
    ps = prompts([5, 130, 3, 200, 9], seed=5)
    rows = [(ps[0], {"max_tokens": 9}), (ps[1], {"max_tokens": 3}), (ps[2], {"max_tokens": 9})]
    joins = {4: [(ps[3], {"max_tokens": 6})], 6: [(ps[4], {"max_tokens": 4})]}
    got = run_batch(model, tok, rows, joins=joins, cancel_at=(2, 5))
    kws = [9, 3, None, 6, 4]
    for i, (p, n) in enumerate(zip(ps, kws)):
        if n is not None:
            same(got[i], solo(model, tok, p, max_tokens=n))
    # the cancelled row: its tokens so far are the solo ones, then it ends "cancelled"
    c = got[2]
    assert c[-1].finish_reason == "cancelled" and c[-1].token is None
    want = [r.token for r in solo(model, tok, ps[2], max_tokens=9)]
    toks = [r.token for r in c[:-1]]
    assert 0 < len(toks) < 9 and toks == want[: len(toks)]


def test_more_requests_than_rows_queue_in_order(tiny):
    model, tok = tiny
    ps = prompts([3, 4, 5, 6, 7], seed=7)
    got = run_batch(model, tok, [(p, {}) for p in ps], max_batch=2, max_tokens=3)
    for p, rs in zip(ps, got):
        same(rs, solo(model, tok, p, max_tokens=3))


def test_batch_generate_returns_each_prompts_solo_text(tiny):
    model, tok = tiny
    ps = ["Hello there", "A much longer prompt about dragons and their hoards of gold " * 3, "x"]
    res = batch_generate(model, tok, ps, max_tokens=5)
    assert res.texts == [generate(model, tok, p, max_tokens=5) for p in ps]
    assert [r.generation_tokens for r in res.responses] == [5, 5, 5]


def test_a_row_fed_at_another_rows_offset_differs(tiny):
    """Negative control: the per-row offsets matter, and the comparison above would see them mixed up."""
    model, _ = tiny
    a, b = prompts([10, 140], seed=9)
    caches = [model.make_cache(), model.make_cache()]
    for p, c in zip((a, b), caches):
        prefill(model, p[:-1], c)
    ref = step_logits(model, mx.array([a[-1], b[-1]]), [[c.copy() for c in cs] for cs in caches])
    wrong = [c.copy() for c in caches[0]]
    for c, o in zip(wrong, caches[1]):
        c.offset = o.offset  # row a's state at row b's position
    bad = step_logits(model, mx.array([a[-1], b[-1]]), [wrong, [c.copy() for c in caches[1]]])
    assert mx.abs(bad[0] - ref[0]).max().item() > 100 * TOL
    assert mx.abs(bad[1] - ref[1]).max().item() < TOL  # the other row is untouched


def test_cache_bytes_per_row_equal_the_analytic_figure(tiny):
    _, tok = tiny
    model = mlx_model("flash", simulate_qat=True)  # compact cache: FP8 entries, FP4 indexer keys
    ps = prompts([5, 131, 300], seed=11)
    g = BatchGenerator(model, tok, 4, prefill_step=64)
    uids = [g.insert(p, max_tokens=4) for p in ps]
    rows = {r.uid: r for r in g.running + list(g.queued)}
    while len(g):
        g.step()
    for u, p in zip(uids, ps):
        cache = rows[u].plan.cache
        n = cache[0].offset
        assert n == len(p) + 3  # prompt + generated but the last
        want = cache_bytes(model.args, n, "compact", dtype_bytes=4)  # fp32 model: window and RoPE part in fp32
        stored = sum(c.compressed_store.nbytes + c.index_store.nbytes for c in cache)
        ring = sum(c.window.nbytes for c in cache)
        states = sum(c.nbytes for c in cache) - stored - ring
        assert stored == want["compressed"] and ring == want["rings"]
        assert 0 <= states <= want["states_max"]


def test_seeded_sampling_rows_draw_from_their_own_seed(tiny):
    """Each row samples from its own key chain: the same tokens as its solo seeded run, whatever its
    neighbours draw (a row with another seed is the control: its tokens differ)."""
    model, tok = tiny
    ps = prompts([6, 40], seed=13)
    ps = [ps[0], ps[0], ps[1]]
    kw = [{"seed": 1}, {"seed": 2}, {"seed": 1, "top_p": 0.9, "min_p": 0.01, "top_k": 50}]
    got = run_batch(model, tok, [(p, k) for p, k in zip(ps, kw)], max_tokens=8, temperature=5.0)
    sol = [solo(model, tok, p, max_tokens=8, temperature=5.0, **k) for p, k in zip(ps, kw)]
    for rs, want in zip(got, sol):
        same(rs, want)
    assert ps[0] == ps[1] and [r.token for r in got[0]] != [r.token for r in got[1]]


def _row_case(rng, W, N, t, H=4, D=64, ratio=4, selected=None):
    """One row at position t: W window rows ending at t, a store of N entries (one more than visible when
    N > (t + 1) // ratio), optionally a selection of ids (-1 = none)."""
    f = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    store = make_rows("dense")
    store.append(f(1, N, D))
    ids = None if selected is None else mx.array(np.array(selected, np.int32).reshape(1, 1, -1))
    return f(1, 1, H, D), f(1, W, D), store, ids


def test_rows_attention_with_padding_equals_each_rows_reference_attention():
    """kernels.sparse_attention.rows_attention (batch.py's one attention over all rows) against the reference run
    row by row: rows with fewer window rows and entries than others, a full 128-row window, an entry the
    query cannot see yet, a selection with -1 slots. Padding slots hold random values (the mask alone must
    silence them). Both sides sum the same fp32 terms in other orders: 1e-5 of the output's scale covers
    that, while one key wrongly seen shifts the output by about 1 / keys (the negative controls: over 100x the
    tolerance, and in that row only)."""
    rng = np.random.default_rng(0)
    ws, ratio, H, D = 128, 4, 4, 64
    sink = mx.array(rng.standard_normal(H).astype(np.float32))
    rows = [dict(W=3, N=0, t=2), dict(W=40, N=10, t=39), dict(W=128, N=33, t=130),  # t=130: 32 entries visible
            dict(W=9, N=3, t=8), dict(W=128, N=60, t=300, selected=[5, -1, 17, 59, -1, 0])]
    ref, pieces = [], []
    for r in rows:
        q, win, store, ids = _row_case(rng, r["W"], r["N"], r["t"], H, D, ratio, r.get("selected"))
        t = r["t"]
        ref.append(sparse_attention_reference(q, win, t - r["W"] + 1, store if store.n else None, ids, sink, t, ratio,
                                              ws, D**-0.5))
        if ids is not None:
            comp = store.take(mx.maximum(ids, 0)).reshape(1, -1, D)
            seen = np.array(ids).reshape(-1) >= 0
        else:
            comp = store.view() if store.n else mx.zeros((1, 0, D))
            seen = np.arange(store.n) < (t + 1) // ratio
        pieces.append((q, mx.concatenate([win, comp], axis=1), np.concatenate([np.ones(r["W"], bool), seen])))
    S = max(k.shape[1] for _, k, _ in pieces)
    junk = lambda n: mx.array(rng.standard_normal((1, n, D)).astype(np.float32))  # noqa: E731
    pad = lambda k: mx.concatenate([k, junk(S - k.shape[1])], axis=1)  # noqa: E731
    q = mx.concatenate([p[0] for p in pieces])
    keys = mx.concatenate([pad(p[1]) for p in pieces])
    mask = np.stack([np.concatenate([p[2], np.zeros(S - p[2].size, bool)]) for p in pieces])
    want = mx.concatenate(ref)
    scale = mx.abs(want).max().item()
    got = rows_attention(q, keys, mx.array(mask)[:, None], sink, D**-0.5)
    assert mx.abs(got - want).max().item() < 1e-5 * scale
    for row, slot in [(0, 5), (2, 160), (4, 129)]:  # a padding slot, the entry not yet visible, a -1 slot
        bad = mask.copy()
        assert not bad[row, slot]
        bad[row, slot] = True
        wrong = rows_attention(q, keys, mx.array(bad)[:, None], sink, D**-0.5)
        assert mx.abs(wrong[row] - want[row]).max().item() > 100 * 1e-5 * scale
        assert mx.abs(wrong - want).max().item() == mx.abs(wrong[row] - want[row]).max().item()


@pytest.mark.parametrize("per_row", [False, True], ids=["batched", "per-row"])
def test_batched_step_leaves_each_rows_cache_as_its_solo_step_does(tiny, monkeypatch, per_row):
    """One batched decode step (step_logits) against each row's plain solo step: every layer's cache (window,
    compressed entries, indexer keys, compressor leftovers and overlap halves) ends equal. The rows feed
    positions 3 (the first ratio-4 window completes, no previous window), 7 (the second, with one),
    127 (ratio 128 and ratio 4 complete), 200 and 64 (none completes; the indexer selects, top-k 16 < 50).
    Tolerance: the batched projections are [B, d] matmuls where the solo ones are [1, d] (BLAS order,
    ~1e-6 relative); a row pooled with another row's phase or position is off by O(1). per-row: the path
    taken where the kernels run (Attention sees use_kernels(); every other module keeps its reference)."""
    model, _ = tiny
    if per_row:
        monkeypatch.setattr(attention, "registry", types.SimpleNamespace(use_kernels=lambda: True))
        monkeypatch.setattr(attention.Attention, "attend_rows", lambda *a: pytest.fail("the batched attention ran"))
    ps = prompts([3, 7, 127, 200, 64], seed=17)
    caches = [model.make_cache() for _ in ps]
    for p, c in zip(ps, caches):
        prefill(model, p, c)
    toks = mx.array([p[-1] for p in ps])
    solo_caches = [[c.copy() for c in cs] for cs in caches]
    batch = step_logits(model, toks, caches)
    solo = mx.concatenate([model(toks[i : i + 1, None], cache=cs, last_only=True)[:, -1]  # the plain B=1 path
                           for i, cs in enumerate(solo_caches)])
    assert mx.abs(batch - solo).max().item() < TOL

    def arrays(d, path=""):
        if isinstance(d, dict):
            return [x for k, v in sorted(d.items()) for x in arrays(v, f"{path}/{k}")]
        return [(path, d)] if isinstance(d, mx.array) else [(path, d)] if d is not None else []

    for b, s in zip(caches, solo_caches):
        for lb, ls in zip(b, s):
            got, want = arrays(lb.state), arrays(ls.state)
            assert [k for k, _ in got] == [k for k, _ in want]
            for (k, x), (_, y) in zip(got, want):
                if isinstance(x, mx.array):
                    assert x.shape == y.shape, k
                    assert mx.abs(x - y).max().item() <= 1e-5 * max(1.0, mx.abs(y).max().item()), k
                else:
                    assert x == y, k
