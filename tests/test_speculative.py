"""MTP speculative decoding: the same tokens and caches as plain decoding, the target's distribution.

Random tiny models rarely agree with their own MTP layer, so most tests also run an oracle drafter:
the real MTP drafting runs (its cache bookkeeping included), then its drafts are replaced by the
plain greedy continuation with some positions corrupted, so every acceptance length from 0 to K
occurs and the rollback is exercised at every offset, across CSA (4) and HCA (128) windows.
"""

import collections
import threading

import numpy as np
import pytest
import mlx.core as mx

from mlx_dsv4 import evaluator, speculative
from mlx_dsv4.cache import CompressorState, LayerCache
from mlx_dsv4.generate import stream_generate
from mlx_dsv4.speculative import Distribution, Speculator, judge, settle
from mlx_dsv4.tokenizer import load_tokenizer
from tinymodels import mlx_model

# A prompt that ends 6 tokens before the HCA window boundary at 128: generation crosses it, and
# the 128-row sliding window wraps.
PROMPT = np.random.default_rng(3).integers(10, 1000, 122).tolist()
N = 20


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def models():
    return {(k, sim): mlx_model(k, simulate_qat=sim) for k in ("flash", "pro") for sim in (False, True)}


def plain(model, tok, prompt=PROMPT, n=N, **kw):
    cache = model.make_cache()
    rs = list(stream_generate(model, tok, prompt, max_tokens=n, prompt_cache=cache, **kw))
    return rs, cache


def oracle(monkeypatch, ref, seed=0, p_bad=0.3):
    """Replace the MTP drafts by the reference continuation, each wrong with probability p_bad."""
    rng = np.random.default_rng(seed)
    real = Speculator._draft

    def draft(self, k):
        _, _, mtp_ck = real(self, k)
        n = self.stats.emitted
        d = [t if rng.random() > p_bad else (t + 1) % 129280 for t in ref[n : n + k]]
        d += [7] * (k - len(d))
        return mx.array(d, mx.int32), None, mtp_ck

    monkeypatch.setattr(Speculator, "_draft", draft)


def spec(model, tok, k, prompt=PROMPT, n=N, **kw):
    cache = model.make_cache()
    rs = list(stream_generate(model, tok, prompt, max_tokens=n, prompt_cache=cache, num_draft_tokens=k, **kw))
    return rs, cache


def cache_arrays(cache):
    out = {}
    for i, c in enumerate(cache):
        out[f"{i}.meta"] = (c.offset, c.n_compressed, c.index_store.n, c.comp_state.pending, c.index_state.pending)
        for name, v in (("window", c.window), ("comp", c.compressed), ("index", c.index_keys)):
            out[f"{i}.{name}"] = v
        for s_name, s in (("comp_state", c.comp_state), ("index_state", c.index_state)):
            for f, v in s.arrays().items():
                out[f"{i}.{s_name}.{f}"] = v
    return out


def assert_caches_equal(a, b, tol):
    """Same structure exactly; values within tol of the largest magnitude (a multi-token verify and
    one-token steps sum in other orders: ~1e-6 relative in float32)."""
    A, B = cache_arrays(a), cache_arrays(b)
    assert A.keys() == B.keys()
    for k in A:
        x, y = A[k], B[k]
        if k.endswith(".meta"):
            assert x == y, k
            continue
        assert (x is None) == (y is None), k
        if x is None:
            continue
        assert x.shape == y.shape, k
        x, y = np.array(x.astype(mx.float32)), np.array(y.astype(mx.float32))
        err = np.abs(x - y).max() / max(np.abs(y).max(), 1e-6)
        assert err <= tol, f"{k}: {err:.2e}"


@pytest.mark.parametrize("kind,sim,k", [("flash", True, 1), ("flash", True, 2), ("flash", False, 3),
                                        ("flash", True, 4), ("pro", False, 1), ("pro", False, 2),
                                        ("pro", True, 3), ("pro", True, 4)])
def test_greedy_tokens_and_caches_equal_plain_decoding(models, tok, monkeypatch, kind, sim, k):
    model = models[(kind, sim)]
    ref, ref_cache = plain(model, tok)
    ref_tokens = [r.token for r in ref]
    oracle(monkeypatch, ref_tokens, seed=k)
    rs, cache = spec(model, tok, k)
    assert [r.token for r in rs] == ref_tokens
    acc = rs[-1].draft_acceptance
    assert len(acc) == k and acc[0] > 0 and acc[-1] < 1, acc  # drafts both accepted and rejected
    assert sum(r.from_draft for r in rs) > 0
    # log-probabilities of the emitted tokens are the target's (1e-4: chunking noise, see above)
    np.testing.assert_allclose([r.logprob for r in rs], [r.logprob for r in ref], atol=1e-4)
    # float32 runs: 1e-4 of the largest value; with the simulation, rare FP8 / FP4 rounding-boundary
    # flips of single codes (a 1-ulp input difference) are allowed: 0.15 covers one e4m3 step
    assert_caches_equal(cache, ref_cache, 0.15 if sim else 1e-4)


def test_real_mtp_drafts_are_exact_too(models, tok):
    model = models[("flash", True)]
    ref, _ = plain(model, tok, n=12)
    rs, _ = spec(model, tok, 3, n=12)
    assert [r.token for r in rs] == [r.token for r in ref]


@pytest.mark.parametrize("broken", ["compressor_state", "window_row"])
def test_broken_rollbacks_are_caught(models, tok, monkeypatch, broken):
    """Negative controls: each omission must change the cache (and usually the tokens)."""
    model = models[("flash", False)]
    ref, ref_cache = plain(model, tok)
    oracle(monkeypatch, [r.token for r in ref], seed=2)
    if broken == "compressor_state":
        monkeypatch.setattr(CompressorState, "rollback", lambda self, ck, start, keep, ratio: None)
    else:
        real = LayerCache.rollback

        def keep_one_more(self, ck, keep):
            fed, post = self.offset - ck[0], self.window
            real(self, ck, keep)
            if keep < fed:  # a rejected row stays in the window
                extra = post[:, post.shape[1] - fed : post.shape[1] - fed + keep + 1]
                self.window = extra if ck[1] is None else mx.concatenate([ck[1], extra], 1)[:, -self.window_size :]

        monkeypatch.setattr(LayerCache, "rollback", keep_one_more)
    with pytest.raises(AssertionError):
        rs, cache = spec(model, tok, 3)
        assert [r.token for r in rs] == [r.token for r in ref]
        assert_caches_equal(cache, ref_cache, 1e-4)


def test_stops_max_tokens_and_logprobs(models, tok, monkeypatch):
    model = models[("flash", False)]
    ref, _ = plain(model, tok, n=N, num_top_logprobs=3)
    oracle(monkeypatch, [r.token for r in ref], seed=5, p_bad=0.1)
    for n in (1, 2, 5, 9):  # max_tokens never exceeded, whatever the round size
        rs, cache = spec(model, tok, 4, n=n)
        assert [r.token for r in rs] == [r.token for r in ref[:n]]
        assert cache[0].offset == len(PROMPT) + n - 1  # prompt + generated but the last
    text = "".join(r.text for r in ref)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    a = "".join(r.text for r in plain(model, tok, stop=[stop])[0])
    rs, cache = spec(model, tok, 4, stop=[stop])
    assert "".join(r.text for r in rs) == a and rs[-1].finish_reason == "stop"
    assert cache[0].offset == len(PROMPT) + len(rs) - 1
    rs, _ = spec(model, tok, 4, num_top_logprobs=3)
    for r, q in zip(rs, ref):
        assert [t for t, _ in r.top_logprobs] == [t for t, _ in q.top_logprobs]


def test_prompt_cache_and_repetition_penalty(models, tok, monkeypatch):
    model = models[("pro", False)]
    ref, _ = plain(model, tok, repetition_penalty=1.3)
    oracle(monkeypatch, [r.token for r in ref], seed=7)
    cache = model.make_cache()
    list(stream_generate(model, tok, PROMPT[:50], max_tokens=1, prompt_cache=cache))  # holds PROMPT[:50]
    rs = list(stream_generate(model, tok, PROMPT, max_tokens=N, prompt_cache=cache, num_draft_tokens=2,
                              repetition_penalty=1.3))
    assert rs[0].cached_tokens == 50
    assert [r.token for r in rs] == [r.token for r in ref]


def test_bad_arguments(models, tok):
    model = models[("flash", False)]
    with pytest.raises(ValueError, match="custom sampler"):
        stream_generate(model, tok, PROMPT, num_draft_tokens=2, sampler=lambda x: mx.argmax(x, -1))
    with pytest.raises(ValueError, match="non-negative"):
        stream_generate(model, tok, PROMPT, num_draft_tokens=-1)
    saved = model.mtp
    model.mtp = []
    try:
        with pytest.raises(ValueError, match="no MTP layer|has none"):
            stream_generate(model, tok, PROMPT, num_draft_tokens=1)
    finally:
        model.mtp = saved


# ---- one host synchronisation per round ----------------------------------------------------

READS = ("item", "tolist", "__bool__", "__int__", "__float__")


def count_syncs(model, tok, monkeypatch, **kw):
    """Host synchronisations made inside Speculator.next_round and commit, on this thread (the worker's
    own mx.eval is not one), and the number of rounds. Reads are every way an array reaches Python."""
    calls, inside = collections.Counter(), [False]

    def counted(name, f):
        def g(*a, **k):
            if inside[0] and threading.current_thread() is threading.main_thread():
                calls[name] += 1
            return f(*a, **k)
        return g

    def in_round(name, f):
        def g(*a, **k):
            calls[name] += 1
            inside[0] = True
            try:
                return f(*a, **k)
            finally:
                inside[0] = False
        return g

    for name in READS:
        monkeypatch.setattr(mx.array, name, counted(name, getattr(mx.array, name)))
    monkeypatch.setattr(mx, "eval", counted("eval", mx.eval))
    monkeypatch.setattr(mx, "async_eval", counted("async_eval", mx.async_eval))
    monkeypatch.setattr(evaluator.Evaluator, "submit", counted("submit", evaluator.Evaluator.submit))
    monkeypatch.setattr(evaluator.Evaluator, "wait", counted("wait", evaluator.Evaluator.wait))
    monkeypatch.setattr(Speculator, "next_round", in_round("rounds", Speculator.next_round))
    monkeypatch.setattr(Speculator, "commit", in_round("commits", Speculator.commit))
    draft = Speculator._draft
    monkeypatch.setattr(Speculator, "_draft", lambda self, k: calls.update(["drafted"]) or draft(self, k))
    rs, _ = spec(model, tok, 3, n=12, **kw)
    calls["reads"] = sum(calls.pop(name, 0) for name in READS)
    return dict(calls), rs


@pytest.mark.parametrize("sampled", [False, True])
def test_one_read_back_per_round(models, tok, monkeypatch, sampled):
    """Per round: one read-back (the outcome) and one wait. With the worker: a submission of the verify
    and one of the commit, one more of the drafts if the round drafts (the last round of a stream may
    have room for no draft), and no evaluation here; without it: the same as mx.async_eval."""
    model = models[("flash", False)]
    kw = dict(temperature=0.8, top_k=50, seed=4) if sampled else {}
    c, _ = count_syncs(model, tok, monkeypatch, **kw)
    r, dr = c["rounds"], c["drafted"]
    assert r >= 4 and dr >= r - 1
    assert c == {"rounds": r, "commits": r, "drafted": dr, "reads": r, "wait": r, "submit": 2 * r + dr}, c
    monkeypatch.setattr(evaluator, "_enabled", False)
    c, _ = count_syncs(model, tok, monkeypatch, **kw)
    r, dr = c["rounds"], c["drafted"]
    assert c == {"rounds": r, "commits": r, "drafted": dr, "reads": r, "async_eval": 2 * r + dr}, c


def test_a_read_inside_the_draft_chain_is_counted(models, tok, monkeypatch):
    """Negative control: drafts read back one by one (as Distribution.draw did with .item()) add K
    reads per round; on the worker's stream the read fails outright (only the worker may evaluate)."""
    model = models[("flash", False)]
    draw = Distribution.draw

    def read_each(self, lp):
        d, q = draw(self, lp)
        return mx.array(d.item(), mx.int32), q

    monkeypatch.setattr(Distribution, "draw", read_each)
    monkeypatch.setattr(evaluator, "_enabled", False)
    c, _ = count_syncs(model, tok, monkeypatch)
    r = c["rounds"]
    assert c["reads"] > r  # the drafts of every round with K > 0, and the k = 0 round's token
    monkeypatch.setattr(evaluator, "_enabled", True)
    with pytest.raises(RuntimeError, match="Stream"):
        spec(model, tok, 3, n=4)


def test_with_and_without_the_worker(models, tok, monkeypatch):
    """The same graphs either way: greedy tokens as plain decoding, seeded sampling the same tokens; the
    random key the worker split is usable here afterwards."""
    model = models[("pro", False)]
    ref, ref_cache = plain(model, tok, n=10)
    kw = dict(temperature=0.9, top_p=0.95, seed=11, repetition_penalty=1.2)
    runs = []
    for on in (True, False):
        monkeypatch.setattr(evaluator, "_enabled", on)
        rs, cache = spec(model, tok, 2, n=10)
        assert [r.token for r in rs] == [r.token for r in ref]
        assert_caches_equal(cache, ref_cache, 1e-4)
        runs.append([r.token for r in spec(model, tok, 3, n=10, **kw)[0]])
        mx.eval(mx.random.normal((2,)))
    assert runs[0] == runs[1]


def test_settle_takes_the_first_rejection():
    """The round's outcome [a, drafts, token]: acceptance stops at the first rejection even when a later
    draft matches; the token is the correction there, or the bonus when every draft was accepted."""
    greedy = Distribution(0.0, 1.0, 0.0, 0)
    lp = mx.log(mx.array(np.eye(V)[[2, 4, 1, 5]] * 0.9 + 0.1 / V, mx.float32))  # argmax 2, 4, 1, 5
    for d, want in (([2, 0, 1], [1, 2, 0, 1, 4]), ([3, 4, 1], [0, 3, 4, 1, 2]), ([2, 4, 1], [3, 2, 4, 1, 5])):
        assert settle(greedy, lp, mx.array(d, mx.int32), None).tolist() == want
    assert settle(greedy, lp[:1], None, None).tolist() == [0, 2]
    # sampling: q = p accepts for sure; a draft p gives no mass to is rejected, its correction drawn
    # from max(p - q, 0) (here p itself, as q is that draft's point mass)
    dist = Distribution(1.0, 1.0, 0.0, 0)
    p0 = np.full(V, 1 / V)
    p1 = np.array([0.0, 0.0, 0.5, 0.0, 0.5, 0.0])
    bonus = np.eye(V)[3] * 0.999 + 0.001 / V
    lp = mx.log(mx.array(np.stack([p0, p1, bonus]), mx.float32))
    mx.random.seed(0)
    seen = set()
    for _ in range(20):
        a, d0, d1, t = settle(dist, lp, mx.array([5, 1], mx.int32), mx.array(np.stack([p0, np.eye(V)[1]]),
                                                                               mx.float32)).tolist()
        assert (a, d0, d1) == (1, 5, 1) and t in (2, 4)
        seen.add(t)
    assert seen == {2, 4}
    q = mx.array(np.stack([p0, p1]), mx.float32)
    assert settle(dist, lp, mx.array([0, 2], mx.int32), q).tolist()[0] == 2


# ---- the sampling rule, on a small vocabulary -------------------------------------------------

V = 6
TARGET = np.log(np.array([0.30, 0.05, 0.25, 0.10, 0.20, 0.10]))
DRAFT = np.log(np.array([0.05, 0.40, 0.15, 0.20, 0.10, 0.10]))


def judged(dist, lp, d, q):
    """The token each position emits on its own: the draft if accepted, else a draw of the correction."""
    ok, rows = judge(dist, lp, d, q)
    return mx.where(ok, d, dist.pick(rows))


def emitted_counts(dist, rule, draws=8000, seed=0):
    """All draws judged at once (judge works on every position of a round in one graph)."""
    mx.random.seed(seed)
    lp = mx.broadcast_to(mx.array(TARGET, mx.float32), (draws, V))
    q = mx.broadcast_to(dist.probs(mx.array(DRAFT, mx.float32)), (draws, V))
    ds = mx.random.categorical(mx.log(q[0]), num_samples=draws).astype(mx.int32)
    counts = np.bincount(np.array(rule(dist, lp, ds, q)), minlength=V).astype(float)
    return counts, np.array(dist.probs(lp[0]))


def chi2_pvalue(counts, p):
    from scipy.stats import chisquare

    p = np.asarray(p, np.float64).reshape(-1)
    if np.any(counts[p == 0]):  # a token the distribution excludes was emitted
        return 0.0
    keep = p > 0
    return chisquare(counts[keep], counts.sum() * p[keep] / p[keep].sum()).pvalue


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 1.0, 0), (1.0, 0.8, 0), (1.3, 1.0, 4)])
def test_rejection_sampling_emits_the_target_distribution(temperature, top_p, top_k):
    dist = Distribution(temperature, top_p, 0.0, top_k)
    counts, p = emitted_counts(dist, judged)
    assert chi2_pvalue(counts, p) > 1e-3
    # negative control: accepting every draft emits the draft's distribution instead
    bad, _ = emitted_counts(dist, lambda dist, lp, d, q: d, draws=3000)
    assert chi2_pvalue(bad, p) < 1e-6


def test_distribution_is_what_mlx_lm_samples():
    """Distribution.probs must be the law of mlx-lm's make_sampler with the same options."""
    from mlx_lm.sample_utils import make_sampler

    lp = mx.array(TARGET, mx.float32)[None]
    for temperature, top_p, min_p, top_k in [(0.8, 0.9, 0.0, 0), (1.0, 1.0, 0.3, 0), (1.2, 1.0, 0.0, 3)]:
        mx.random.seed(1)
        sampler = make_sampler(temperature, top_p, min_p, top_k=top_k)
        draws = np.array([sampler(lp).item() for _ in range(3000)])
        p = np.array(Distribution(temperature, top_p, min_p, top_k).probs(lp[0]))
        assert chi2_pvalue(np.bincount(draws, minlength=V).astype(float), p) > 1e-3


def test_stats_bookkeeping():
    s = speculative.DraftStats()
    s.record(3, 2, 3)
    s.record(3, 0, 1)
    s.record(2, 2, 3)
    assert s.proposed == [3, 3, 2] and s.accepted == [2, 2, 0]
    assert s.acceptance == [2 / 3, 2 / 3, 0.0] and s.mean_accepted_length == 7 / 3


def test_server_drafts_and_answers_as_plain_greedy(caplog):
    """serve --num-draft-tokens: the same greedy reply as a cold plain run (the prefix cache is in
    play from the second request on), drafting reported in the request log."""
    import logging

    import openai
    from server_util import oracle, prompt_ids, start

    msgs = [{"role": "user", "content": "Write a short poem about the sea."}]
    want, _ = oracle(prompt_ids(msgs), 10)
    with caplog.at_level(logging.INFO, logger="mlx_dsv4.server"), start(num_draft_tokens=2) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x")
        for _ in range(2):
            r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
            assert r.choices[0].message.content == want
    assert "tokens per verify" in caplog.text


def test_server_refuses_drafts_without_mtp():
    from mlx_dsv4.server.engine import Engine
    from server_util import tiny

    model, tok = tiny()
    saved, model.mtp = model.mtp, []
    try:
        with pytest.raises(ValueError, match="MTP layer"):
            Engine(model, tok, num_draft_tokens=2)
    finally:
        model.mtp = saved
