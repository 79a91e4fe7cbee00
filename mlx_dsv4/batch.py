"""Continuous batching: sequences at their own positions decoded together, one token per row per step.

What does not depend on a row's position (embedding, mHC, norms, the attention's projections, MoE,
the head) runs over all rows as one [B, 1, ...] tensor. What does (RoPE, the compressors, the
indexer, sparse attention, the cache pushes) runs per row on a B=1 slice with that row's own
LayerCache, by the code the solo path runs (Attention.attend): each row keeps its own window,
compressed entries, indexer selections and compressor phase. Rows join and leave at step boundaries;
joining prompts are prefilled through the ordinary B=1 path, at most one chunk's worth of their
tokens per step (oldest first), so a long prompt delays the running rows by at most one chunk per step.

A row's responses come from generate._stream, fed by the batched steps (RowSource) instead of a
PlainDecoder: detokenizing, stop strings, log-probabilities and the cache contract are the solo ones.

Pipelined (as PlainDecoder): each step() submits the next decode step, fed with the tokens of the step
in flight before they are read, then reads those. A row that ends on a token it was already fed (EOS, a
stop string) has that step undone for its cache (LayerCache.rollback); a cancel latched at a step's start
drops the row's token in flight the same way, so every row's responses and cache are the unpipelined ones.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from . import evaluator
from .cache import LayerCache
from .generate import GenerationResponse, Plan, _stream, prefill, prepare
from .speculative import Emitted, processed_logprobs

_generate = importlib.import_module(".generate", __package__)  # the module: the package exports a function so named


class RowCaches:
    """One layer's caches of the rows of a batch, each at its own offset (see Attention.__call__)."""

    __slots__ = ("rows",)

    def __init__(self, rows: list[LayerCache]):
        self.rows = rows


def step_logits(model, tokens: mx.array, caches: list[list[LayerCache]]) -> mx.array:
    """One decode step: row i feeds tokens[i] to its cache list caches[i] -> logits [B, vocab]."""
    if tokens.size != len(caches):
        raise ValueError(f"{tokens.size} tokens for {len(caches)} rows")
    # one entry per layer this rank holds (all of them in one process; its stage's under mlx.launch)
    per_layer = [RowCaches([c[i] for c in caches]) for i in range(len(caches[0]))]
    return model(tokens.reshape(-1, 1), cache=per_layer, last_only=True)[:, -1, :]


class RowSource:
    """The token source of a row's _stream: the token its batched step sampled."""

    stats = None

    def __init__(self):
        self.ready: Emitted | None = None

    def next_round(self, last: int, budget: int) -> list[Emitted]:
        e, self.ready = self.ready, None
        if e is None:
            raise RuntimeError("a batch row asked for a token that no step computed")
        return [e]

    def commit(self, used: int) -> None:
        pass


class Row:
    def __init__(self, uid: int, plan: Plan, should_stop: Callable[[], bool] | None):
        self.uid, self.plan, self.user_stop = uid, plan, should_stop
        self.fed = plan.cached  # prompt tokens in the cache
        self.source = RowSource()
        self.stream = None  # the row's _stream, once all its prompt but the last token is in the cache
        self.cancelled = self.stopping = False
        self.n = 0
        self.last = plan.ids[-1]  # the token the next step feeds
        self.history = mx.array(plan.ids) if plan.processors else None
        self.tic = time.perf_counter()
        self.prompt_tps = 0.0
        plan.should_stop = lambda: self.stopping  # latched once per step: every row sees one decision

    @property
    def prefilling(self) -> bool:
        return self.stream is None

    def prefill_chunk(self, model, step: int) -> int:
        """Feed the next at most `step` prompt tokens (all but the last one) through the B=1 path;
        returns how many."""
        ids = self.plan.ids
        start = self.fed
        end = min(self.fed + step, len(ids) - 1)
        if end > self.fed:
            prefill(model, ids[self.fed : end], self.plan.cache, end - self.fed)
            self.fed = end
        if self.fed == len(ids) - 1:
            done = len(ids) - self.plan.cached
            self.prompt_tps = done / max(time.perf_counter() - self.tic, 1e-9)
            self.plan.cached = self.fed
            self.stream = _stream(self.plan, self.source)
        return self.fed - start

    def respond(self) -> GenerationResponse:
        r = next(self.stream)
        r.prompt_tps = self.prompt_tps
        if r.token is not None:
            self.n += 1
            self.last = r.token
        return r


@dataclass
class BatchResponse:
    texts: list[str]
    responses: list[GenerationResponse]  # each prompt's last response (finish reason, counts, rates)


class BatchGenerator:
    """Rows in flight (at most max_batch, prefilling ones included), the rest queued first come first
    served. insert() queues a request (the keyword arguments of stream_generate, num_draft_tokens
    excepted); step() runs one prefill chunk and one decode step and returns [(uid, response)].
    admit(plan, running_plans) -> bool may hold a queued request back (memory admission);
    prefilled(plan) is called when a row's prompt but its last token has been fed (prefix snapshots)."""

    def __init__(self, model, tokenizer, max_batch: int = 8, prefill_step: int = 512,
                 admit: Callable[[Plan, list[Plan]], bool] | None = None,
                 prefilled: Callable[[Plan], None] | None = None, ahead: bool | None = None):
        if not (isinstance(max_batch, int) and max_batch >= 1):
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        if prefill_step < 1:
            raise ValueError(f"prefill_step must be >= 1, got {prefill_step}")
        self.model, self.tokenizer, self.max_batch, self.prefill_step = model, tokenizer, max_batch, prefill_step
        self.admit, self.prefilled = admit, prefilled
        self.queued: deque[Row] = deque()
        self.running: list[Row] = []
        self._uids = itertools.count()
        # pipelined (see the module's docstring) unless the forward evaluates on its way (split models,
        # streamed experts): their steps cannot be handed to another thread or left in flight
        self.ahead = (_generate.PIPELINE if ahead is None else ahead) and not model.evaluates_inside
        self._flight: dict[Row, tuple] = {}  # the step in flight: row -> (token [1], logprobs [V], checkpoints)
        self._ev = self._submitted = None

    def insert(self, prompt, should_stop: Callable[[], bool] | None = None, **kwargs) -> int:
        if kwargs.get("num_draft_tokens"):
            raise ValueError("batched decoding does not draft: num_draft_tokens must be 0")
        kwargs.pop("progress_callback", None)
        row = Row(next(self._uids), prepare(self.model, self.tokenizer, prompt, **kwargs), should_stop)
        self.queued.append(row)
        return row.uid

    def cancel(self, uid: int) -> None:
        """The row ends at the next step with finish_reason "cancelled" (a queued one never starts)."""
        for row in itertools.chain(self.running, self.queued):
            if row.uid == uid:
                row.cancelled = True

    def plan(self, uid: int) -> Plan:
        for row in itertools.chain(self.running, self.queued):
            if row.uid == uid:
                return row.plan
        raise KeyError(f"no request {uid} in flight or queued")

    def __len__(self) -> int:
        return len(self.running) + len(self.queued)

    def _admit(self) -> list[tuple[int, GenerationResponse]]:
        out = []
        while self.queued and len(self.running) < self.max_batch:
            row = self.queued[0]
            if row.cancelled or (row.user_stop is not None and row.user_stop()):
                self.queued.popleft()
                out.append((row.uid, None))  # never started
                continue
            if self.admit is not None and self.running and not self.admit(row.plan, [r.plan for r in self.running]):
                break  # first come first served: nothing overtakes the head of the queue
            self.running.append(self.queued.popleft())
        return out

    def step(self) -> list[tuple[int, GenerationResponse | None]]:
        """One scheduling step. A None response: the queued request was cancelled before it started."""
        out = self._admit()
        for row in self.running:  # latch the stop decisions of this step
            row.stopping = row.cancelled or (row.user_stop is not None and row.user_stop())
        budget = self.prefill_step  # joining rows share one chunk's worth of prompt tokens, oldest first
        for row in [r for r in self.running if r.prefilling]:
            if budget <= 0:
                break
            if row.stopping:
                out.append((row.uid, self._cancelled_early(row)))
                self.running.remove(row)
                continue
            before = row.plan.cached
            budget -= max(row.prefill_chunk(self.model, budget), 1)
            if not row.prefilling and row.fed > before and self.prefilled is not None:
                self.prefilled(row.plan)
        ready = [r for r in self.running if not r.prefilling]
        if self.ahead:
            try:
                self._step_ahead(ready, out)
            except BaseException:
                self._drain()
                raise
            return out
        decode = [r for r in ready if not r.stopping and r.n < r.plan.max_tokens]
        for row in ready:
            if row not in decode:  # ends without a token: its stream reports cancelled / length
                out.append((row.uid, self._finish(row, row.respond())))
        if decode:
            picks, arrays = self._build([(r, r.last) for r in decode])
            mx.eval(arrays)
            for row, (y, lp, _) in picks.items():
                row.source.ready = Emitted(y.item(), lp, False)
                r = row.respond()
                if row.history is not None:
                    row.history = mx.concatenate([row.history, y.reshape(1).astype(row.history.dtype)])
                out.append((row.uid, self._finish(row, r)))
        return out

    def _step_ahead(self, ready: list[Row], out: list) -> None:
        """The pipelined decode step: submit the next step, then read the one in flight."""
        flight, self._flight = self._flight, {}
        dropped = [r for r in flight if r.stopping]
        if dropped:  # cancelled at this step's start: as unpipelined, the token in flight is never read
            self._settle()
            for row in dropped:
                self._undo(row, flight.pop(row)[2])
        for row in ready:
            if row not in flight and (row.stopping or row.n >= row.plan.max_tokens):
                out.append((row.uid, self._finish(row, row.respond())))
        fresh = [r for r in ready if r not in flight and not r.stopping and r.n < r.plan.max_tokens]
        if fresh and not flight:  # nothing to read yet: their step goes in now, the next one ahead of it below
            flight, fresh = self._submit([(r, r.last) for r in fresh]), []
        feed = [(r, y) for r, (y, _, _) in flight.items() if r.n + 1 < r.plan.max_tokens]
        if feed or fresh:
            self._flight = self._submit(feed + [(r, r.last) for r in fresh])
        if self._ev is not None:
            self._ev.wait(keep=int(bool(self._flight)))
        for row, (y, lp, _) in flight.items():
            row.source.ready = Emitted(y.item(), lp, False)
            r = row.respond()
            if r.finish_reason is not None and row in self._flight:  # fed ahead, then ended: undo that step
                self._settle()
                self._undo(row, self._flight.pop(row)[2])
            out.append((row.uid, self._finish(row, r)))

    def _submit(self, feed: list[tuple[Row, int | mx.array]]) -> dict[Row, tuple]:
        """Build and submit the decode step feeding each row its token (see _build); nothing is read back."""
        if self._ev is None:
            self._ev = evaluator.for_this_thread()
        ev, new = self._ev, [r for r, t in feed if isinstance(t, int)]
        if ev is not None and new:  # the worker cannot evaluate lazy graphs made on this thread's stream
            ev.adopt(self.model.parameters(), [[c.live for c in r.plan.cache] for r in new], [r.history for r in new])
        with mx.stream(ev.stream) if ev is not None else contextlib.nullcontext():
            picks, arrays = self._build(feed)
        if ev is not None:
            ev.submit(arrays)
        else:
            mx.async_eval(arrays)
            self._submitted = arrays
        return picks

    def _build(self, feed: list[tuple[Row, int | mx.array]]) -> tuple[dict[Row, tuple], list]:
        """The graph of one decode step: {row: (token [1], logprobs [V], its cache checkpoints before the
        step)} and what to evaluate (tokens, log-probs, caches). A lazy token (from the step in flight)
        joins the row's history here; an int one (its last) is there already."""
        ck = {r: [c.checkpoint() for c in r.plan.cache] for r, _ in feed}
        toks = mx.concatenate([mx.array([t], mx.int32) if isinstance(t, int) else t.reshape(1).astype(mx.int32)
                               for _, t in feed])
        logits = step_logits(self.model, toks, [r.plan.cache for r, _ in feed])
        plain = processed_logprobs(logits, [], None)  # the rows without processors, all at once
        picks = {}
        for i, (row, t) in enumerate(feed):
            if row.history is not None and not isinstance(t, int):
                row.history = mx.concatenate([row.history, t.reshape(1).astype(row.history.dtype)])
            p = row.plan.processors
            lp = processed_logprobs(logits[i : i + 1], p, row.history) if p else plain[i : i + 1]
            picks[row] = (row.plan.sampler(lp), lp[0], ck[row])
        return picks, [[[y, lp] for y, lp, _ in picks.values()], [[c.live for c in r.plan.cache] for r, _ in feed]]

    def _settle(self) -> None:
        """Until every submitted step has run (before a row's cache is rolled back on this thread)."""
        if self._ev is not None:
            self._ev.wait()
        elif self._submitted is not None:
            mx.eval(self._submitted)

    def _undo(self, row: Row, ck: list) -> None:
        for c, s in zip(row.plan.cache, ck):
            c.rollback(s, 0)
        if row.history is not None:  # it took the dropped step's token too
            row.history = row.history[: len(row.plan.ids) + row.n]
        mx.eval([c.live for c in row.plan.cache], row.history)

    def _drain(self) -> None:
        """After a failed step: nothing stays in flight (the thread's evaluator outlives this generator),
        and the random key, which a step built but never submitted may have split, is evaluated."""
        self._flight = {}
        try:
            if self._ev is not None:
                self._ev.submit()  # nothing but the key, which every submission hands over
            self._settle()
        except Exception:  # noqa: BLE001 - the step's own error is already on its way up
            pass

    def _finish(self, row: Row, r: GenerationResponse) -> GenerationResponse:
        if r.finish_reason is not None:
            row.stream.close()  # runs the stream's cleanup
            self.running.remove(row)
        return r

    def _cancelled_early(self, row: Row) -> GenerationResponse:
        """A row cancelled during its prefill: one final response, nothing generated."""
        p = row.plan
        return GenerationResponse(text="", token=None, logprob=None, top_logprobs=None, prompt_tokens=len(p.ids),
                                  cached_tokens=p.cached, prompt_tps=0.0, generation_tokens=0, generation_tps=0.0,
                                  peak_memory=mx.get_peak_memory() / 1e9, finish_reason="cancelled")


def batch_generate(model, tokenizer, prompts: list, max_batch: int = 8, prefill_step: int = 512,
                   verbose: bool = False, **kwargs) -> BatchResponse:
    """Generate for every prompt (strings or id lists), up to max_batch at once; the keyword arguments
    (max_tokens, temperature, stop, ...) apply to each prompt, as stream_generate takes them."""
    gen = BatchGenerator(model, tokenizer, max_batch, prefill_step)
    uids = [gen.insert(p, **kwargs) for p in prompts]
    texts = {u: [] for u in uids}
    last: dict[int, GenerationResponse] = {}
    while len(gen):
        for uid, r in gen.step():
            if r is not None:
                texts[uid].append(r.text)
                last[uid] = r
    if verbose:
        for u in uids:
            print(f"[{u}] {''.join(texts[u])!r} ({last[u].generation_tokens} tokens, {last[u].finish_reason})")
    return BatchResponse(["".join(texts[u]) for u in uids], [last[u] for u in uids])
