"""Speculative decoding with the model's own MTP layer: draft K tokens, verify them in one pass.

A round, with the trunk's cache holding positions < n and t_n sampled but not yet fed:
1. Draft. The MTP block first takes the verified pairs it has not seen, (trunk streams h_i,
   token t_{i+1}) for i up to n - 1; its last row predicts d_1. Then it recurses K - 1 times on its
   own output streams as the stand-in for the trunk's (as vLLM and mlx-vlm do), at positions n..
2. Verify. The trunk runs [t_n, d_1..d_K] in one forward: K + 1 rows of logits and streams.
3. Accept. Greedy: while d_j is the target's argmax. Sampling: the standard rejection rule
   (accept with min(1, p/q), else draw from max(p - q, 0)), so the emitted tokens follow the
   target distribution exactly, with p and q after the same processors, filters and temperature.
   Then one more token from the target: the correction or, if all K were accepted, the bonus.
4. Roll back. Caches must be what plain decoding would have built for the tokens actually kept.
   `LayerCache.rollback` trims the call's tail: window rows, compressed entries and indexer keys of
   windows that a rejected token completed, and rebuilds the compressor leftovers and overlap half
   from the checkpointed rows plus the kept ones. No forward pass is repeated: a snapshot and
   re-run of the accepted tokens would cost one more trunk pass on every rejection, which on a
   bandwidth-bound Mac is most of a decode step, i.e. most of what drafting saves. The MTP cache
   drops its recursive rows (they came from its own streams, not the trunk's) and takes the true
   pairs at the next round's first draft call.

Only the last `window_size` MTP rows are ever read (the MTP layer is window-only and each row
depends on its own position only), so after a prefill the MTP cache is seeded from the prompt's
last window of trunk streams; tokens served from a prompt cache have no streams here, which can
lower the first drafts' acceptance but never changes the output.

A round synchronises once: the drafts stay lazy (each feeds the next MTP call and the verify input
as an array), acceptance is computed for every position in the verify's graph, and one read-back
returns the number accepted and the tokens. On the CPU the draft chain goes to the evaluator's
worker (evaluator.py) and the verify is built while it runs; elsewhere mx.async_eval does the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from . import evaluator


@dataclass
class Emitted:
    token: int
    logprobs: mx.array  # [V] target log-probabilities of this position (after processors)
    from_draft: bool


@dataclass
class DraftStats:
    """Per draft position j: how many drafts were proposed and accepted; verify passes; tokens."""

    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    verifies: int = 0
    emitted: int = 0

    def record(self, k: int, a: int, used: int) -> None:
        grow = k - len(self.proposed)
        if grow > 0:
            self.proposed += [0] * grow
            self.accepted += [0] * grow
        for j in range(k):
            self.proposed[j] += 1
            self.accepted[j] += j < a
        self.verifies += 1
        self.emitted += used

    @property
    def acceptance(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify pass (1 + accepted drafts, on average)."""
        return self.emitted / self.verifies if self.verifies else 0.0


class Distribution:
    """The sampling distribution that mlx-lm's make_sampler draws from, made explicit so drafts can
    be accepted by probability ratio: the same filters in the same order, then the temperature."""

    def __init__(self, temperature: float, top_p: float, min_p: float, top_k: int):
        self.greedy = temperature == 0
        self.temperature = temperature
        self.filters = []
        if 0 < top_p < 1.0:
            self.filters.append(lambda x: apply_top_p(x, top_p))
        if min_p != 0.0:
            self.filters.append(lambda x: apply_min_p(x, min_p, 1))
        if top_k > 0:
            self.filters.append(lambda x: apply_top_k(x, top_k))

    def probs(self, logprobs: mx.array) -> mx.array:
        for f in self.filters:
            logprobs = f(logprobs)
        return mx.softmax(logprobs * (1.0 / self.temperature), axis=-1)

    def draw(self, logprobs: mx.array) -> tuple[mx.array, mx.array | None]:
        """(token, the distribution it was drawn from; None when greedy), both lazy: reading the token
        here would stall the draft chain on every draft."""
        if self.greedy:
            return mx.argmax(logprobs, axis=-1).astype(mx.int32), None
        p = self.probs(logprobs)
        return mx.random.categorical(mx.log(p)).astype(mx.int32), p

    def pick(self, rows: mx.array) -> mx.array:
        """One token per row of what `judge` returns for rejections: argmax, or a draw from the row."""
        if self.greedy:
            return mx.argmax(rows, axis=-1).astype(mx.int32)
        return mx.random.categorical(mx.log(rows)).astype(mx.int32)


def processed_logprobs(logits: mx.array, processors: list[Callable], history: mx.array | None) -> mx.array:
    """Logits processors (e.g. the repetition penalty, looking back on `history`), then log-softmax:
    the log-probabilities every decoding path samples from and reports."""
    for p in processors:
        logits = p(history, logits)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def judge(dist: Distribution, lp: mx.array, d: mx.array, q: mx.array | None) -> tuple[mx.array, mx.array]:
    """All positions at once, lazily: (accepted [k] bool, what a rejection draws from [k, V]) for drafts
    d [k] drawn from q [k, V], against the target log-probabilities lp [k, V]; dist.pick draws from it.

    Greedy: accepted iff d is the target's argmax, else the argmax (the rows are lp). Sampling:
    accepted with probability min(1, p(d) / q(d)), else a token from max(p - q, 0) renormalised (p
    itself if that has no mass): the emitted token is then distributed exactly as p. Every position
    draws its uniform, whether or not an earlier one is rejected: the draws are independent, so the
    first rejection still sees a fresh one."""
    if dist.greedy:
        return d == mx.argmax(lp, axis=-1), lp
    p = dist.probs(lp)
    idx = d.reshape(-1, 1)
    pd, qd = mx.take_along_axis(p, idx, axis=-1)[:, 0], mx.take_along_axis(q, idx, axis=-1)[:, 0]
    ok = mx.random.uniform(shape=pd.shape) * qd <= pd
    resid = mx.maximum(p - q, 0.0)
    mass = resid.sum(axis=-1, keepdims=True)
    return ok, mx.where(mass > 0, resid / mx.maximum(mass, 1e-30), p)


def settle(dist: Distribution, lp: mx.array, d: mx.array | None, q: mx.array | None) -> mx.array:
    """The round's outcome as one small int32 array, [a, d_1..d_k, t]: a drafts accepted (the first
    rejection decides), then the target's token at position a (the correction, or the bonus from the
    last row of lp [k + 1, V] when all k were accepted). Lazy: the round reads it back once."""
    k = lp.shape[0] - 1
    if k == 0:
        return mx.concatenate([mx.zeros(1, mx.int32), dist.draw(lp[0])[0].reshape(1)])
    ok, rows = judge(dist, lp[:k], d, q)
    a = mx.cumprod(ok.astype(mx.int32)).sum()
    last = lp[k:] if dist.greedy else dist.probs(lp[k:])
    t = dist.pick(mx.take(mx.concatenate([rows, last]), a, axis=0))
    return mx.concatenate([a.reshape(1).astype(mx.int32), d, t.reshape(1)])


class Speculator:
    """Drafts with the MTP layer, verifies with the trunk, rolls the caches back to what is kept.

    next_round() returns the emitted tokens of one round; the caller takes `used` of them (fewer
    when a stop string, EOS or max_tokens ends the stream inside the round) and calls commit(used),
    and close() at the end of the stream.

    ahead=True (the default) evaluates on this thread's evaluator where there is one (the CPU): the
    draft chain is submitted, the verify built while the worker runs it. Everything the worker
    evaluates is built under its stream, commit's rollback included (evaluator.py: what is built on
    a stream must be evaluated by its thread), and what it reads from this thread is evaluated first."""

    def __init__(self, model, cache: list, k: int, dist: Distribution, processors: list[Callable],
                 history: mx.array | None, pending: tuple[mx.array, list[int]] | None, ahead: bool = True):
        self.model, self.cache, self.k, self.dist = model, cache, k, dist
        self.processors, self.history = processors, history
        self.mtp_cache = model.make_mtp_cache()
        self.stats = DraftStats()
        # verified (trunk streams at i, token i + 1) pairs the MTP layer has not taken yet
        self.pending_h, self.pending_t = (pending[0], list(pending[1])) if pending else (None, [])
        if pending:
            self.mtp_cache[0].offset = cache[0].offset - len(self.pending_t)
        self._round = None
        self._ev = evaluator.for_this_thread() if ahead and not model.evaluates_inside else None
        if self._ev is not None:
            self._ev.adopt(model.parameters(), [c.state for c in cache], history, self.pending_h)

    def _here(self):
        """Where the round's graphs are built: the worker's stream, if it evaluates them."""
        return mx.stream(self._ev.stream) if self._ev is not None else contextlib.nullcontext()

    def _launch(self, *arrays) -> None:
        """Start evaluating `arrays` (with the random key: Evaluator.submit); returns at once."""
        if self._ev is not None:
            self._ev.submit(*arrays)
        else:
            mx.async_eval(*arrays)

    def _process(self, logits: mx.array, extra: list[mx.array]) -> mx.array:
        """Processors see the history (up to the newest emitted token) plus the drafts before this row."""
        hist = self.history
        if self.processors and extra:
            hist = mx.concatenate([hist, *(d.astype(hist.dtype) for d in extra)])
        return processed_logprobs(logits, self.processors, hist)

    def _draft(self, k: int) -> tuple[mx.array, mx.array | None, tuple]:
        """k lazy drafts [k], the distributions they were drawn from [k, V] (None when greedy), and the
        MTP cache checkpoint taken after the verified pairs went in (the recursive rows after it are
        dropped at commit)."""
        m = self.model
        X = m.mtp_streams(self.pending_h, mx.array(self.pending_t)[None], self.mtp_cache)
        mtp_ck = self.mtp_cache[0].checkpoint()
        drafts, qs = [], []
        for j in range(k):
            logits = m.logits(m.mtp[0].collapse(X[:, -1:]))[0, -1]
            d, q = self.dist.draw(self._process(logits[None], drafts)[0])
            drafts.append(d.reshape(1))
            qs.append(q)
            if j + 1 < k:
                X = m.mtp_streams(X[:, -1:], d.reshape(1, 1), self.mtp_cache)
        return mx.concatenate(drafts), None if self.dist.greedy else mx.stack(qs), mtp_ck

    def _target(self, logits: mx.array, drafts: mx.array | None) -> mx.array:
        """Target log-probabilities [k + 1, V] of the verify's rows; row j's processors see drafts[:j]."""
        if not self.processors:
            return processed_logprobs(logits, [], None)
        rows = [self._process(logits[j : j + 1], [drafts[:j]] if j else []) for j in range(logits.shape[0])]
        return mx.concatenate(rows)

    def next_round(self, last: int, budget: int) -> list[Emitted]:
        """One round after feeding `last` (the newest emitted token); at most `budget` tokens."""
        m = self.model
        k = min(self.k, budget - 1) if self.pending_t else 0
        drafts = qs = mtp_ck = None
        if k > 0:
            with self._here():
                drafts, qs, mtp_ck = self._draft(k)
                self._launch(drafts, qs, self.mtp_cache[0].live)
        with self._here():
            ck = [c.checkpoint() for c in self.cache]
            fed = mx.array([last], mx.int32)
            H = m.hidden_streams((fed if drafts is None else mx.concatenate([fed, drafts]))[None], self.cache)
            lp = self._target(m.logits(m.collapse(H))[0], drafts)
            outcome = settle(self.dist, lp, drafts, qs)
            rows = [lp[j] for j in range(k + 1)]  # the caller reads these: evaluated with the round
            # the cache goes in with the commit, after its rollback: what of it the outcome does not
            # read then runs while this thread builds the next round
            self._launch(outcome, rows, H)
        if self._ev is not None:
            self._ev.wait()
        a, *tokens = outcome.tolist()  # the round's one read-back
        tokens = tokens[:a] + tokens[-1:]
        out = [Emitted(t, rows[j], j < a) for j, t in enumerate(tokens)]
        self._round = (ck, mtp_ck, k, a, H, out)
        return out

    def commit(self, used: int) -> None:
        """Keep the first `used` emitted tokens of the round: the trunk keeps `last` and the first
        used - 1 of them (the newest emitted token is never fed), the MTP cache its true rows.
        Submitted, not waited for: the next round's graphs queue behind it."""
        ck, mtp_ck, k, a, H, out = self._round
        self._round = None
        if not 1 <= used <= len(out):
            raise ValueError(f"commit of {used} tokens from a round of {len(out)}")
        kept = [e.token for e in out[:used]]
        with self._here():
            for c, s in zip(self.cache, ck):
                c.rollback(s, used)
            if k > 0:
                self.mtp_cache[0].rollback(mtp_ck, 0)
                self.pending_h, self.pending_t = H[:, :used], kept
            else:  # no draft call took the pending pairs: append to them
                h = H[:, :used]
                if self.pending_h is None:
                    self.mtp_cache[0].offset = ck[0][0]  # the MTP rows start where the trunk's streams do
                self.pending_h = h if self.pending_h is None else mx.concatenate([self.pending_h, h], axis=1)
                self.pending_t += kept
            if self.history is not None:
                self.history = mx.concatenate([self.history, mx.array(kept, self.history.dtype)])
            self._launch(self.pending_h, [c.live for c in self.cache], self.mtp_cache[0].live, self.history)
        self.stats.record(k, a, used)

    def close(self) -> None:
        """End of stream: the last commit evaluated, so the caches can be read from this thread."""
        if self._ev is not None:
            self._ev.wait()


def prefill_with_streams(model, tokens: list[int], cache: list, step: int, keep: int,
                         progress: Callable[[int, int], None] | None = None) -> mx.array | None:
    """Prefill like generate.prefill, returning the trunk streams of the last `keep` tokens (what
    the MTP layer's window will read), or None for no tokens."""
    tail = []
    for s in range(0, len(tokens), step):
        X = model.hidden_streams(mx.array(tokens[s : s + step])[None], cache)
        if s + step > len(tokens) - keep:
            tail.append(X[:, max(0, len(tokens) - keep - s) :])
        mx.eval(tail, [c.state for c in cache])
        if progress is not None:
            progress(min(s + step, len(tokens)), len(tokens))
    if not tail:
        return None
    return tail[0] if len(tail) == 1 else mx.concatenate(tail, axis=1)
