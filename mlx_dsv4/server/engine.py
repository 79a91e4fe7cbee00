"""The model-owning worker: one thread runs every MLX call; requests are decoded together.

MLX streams belong to the thread that made them, so HTTP handlers never touch the model: they
submit a Job with a callback and receive its GenerationResponses through it. Up to `max_batch`
jobs are in flight (batch.BatchGenerator: one decode step for all, a joining prompt prefilled one
chunk per step), the rest wait first come first served; a job is admitted only while the analytic
cache bytes (cache_size.py) of the jobs in flight, each at its prompt + max_tokens, fit
`cache_budget`. Each job keeps its own sampling parameters, seed, stop strings and logprobs. A
cancelled job (client gone) stops at the next step, or is skipped if it has not started.
With --num-draft-tokens the jobs run one at a time through speculative decoding instead.

Prefix reuse: the compressed caches cannot be trimmed, so the PrefixCache keeps whole-cache
snapshots keyed by the token prefix they hold, taken at the end of each prompt but its last token
(prefill prompt[:-1], snapshot, then generate: a follow-up turn that re-encodes the reply
differently still shares the prompt) and after each reply. A new prompt resumes from the longest
stored prefix that leaves at least one token to feed.

Under mlx.launch (lockstep.py) every rank runs this loop: rank 0 with the HTTP server, the others
fed by its messages. What enters the loop (new jobs, cancellations, shutdown) is read only at the
top of an iteration and shared first, so every rank makes the same model calls; the prefix cache
then weighs its snapshots by their analytic size (the same on every rank, each of which holds only
its own layers) so that every rank evicts the same entries.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from ..batch import BatchGenerator
from ..cache_size import cache_bytes
from ..generate import prefill, stream_generate

DONE = object()  # emitted after a job's last response (or its error)
IDLE_TICK = 0.1  # s: in lockstep an idle rank 0 shares (nothing) this often; the ring backend's wait spins


def _nowhere(_item) -> None:
    """A follower rank's jobs answer nobody: rank 0 alone serves HTTP."""


class Job:
    def __init__(self, tokens: list[int], params: dict, emit: Callable[[object], None]):
        self.tokens, self.params, self.emit = list(tokens), params, emit
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.cached = 0  # prompt tokens resumed from a snapshot
        self.finish_reason: str | None = None  # as the generator reported it; "skipped" if never started
        self.cancel_shared = False  # lockstep: its cancellation went out to the other ranks

    def cancel(self) -> None:
        self.cancelled.set()


class PrefixCache:
    """LRU snapshots of the whole per-layer cache, keyed by the token prefix they hold.
    weigh(key, snapshot) -> bytes counted against max_bytes (default: the snapshot's own)."""

    def __init__(self, max_entries: int = 8, max_bytes: int = 4 << 30,
                 weigh: Callable[[tuple, list], int] | None = None):
        self.entries: OrderedDict[tuple, list] = OrderedDict()
        self.sizes: dict[tuple, int] = {}
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.weigh = weigh or (lambda _key, snapshot: sum(c.nbytes for c in snapshot))
        self.lock = threading.Lock()

    def lookup(self, tokens: list[int]) -> tuple[int, list | None]:
        """(n, a private copy of the snapshot of tokens[:n]) for the longest n < len(tokens), or (0, None)."""
        with self.lock:
            best = max((k for k in self.entries if len(k) < len(tokens) and tuple(tokens[: len(k)]) == k),
                       key=len, default=None)
            if best is None:
                return 0, None
            self.entries.move_to_end(best)
            return len(best), [c.copy() for c in self.entries[best]]

    def store(self, tokens: list[int], cache: list) -> None:
        key = tuple(tokens[: cache[0].offset])
        if not key or self.max_entries < 1:
            return
        snapshot = [c.copy() for c in cache]
        with self.lock:
            self.entries[key], self.sizes[key] = snapshot, self.weigh(key, snapshot)
            self.entries.move_to_end(key)
            # the newest entry stays even when it alone exceeds the byte bound
            while len(self.entries) > self.max_entries or (len(self.entries) > 1 and self._nbytes() > self.max_bytes):
                del self.sizes[self.entries.popitem(last=False)[0]]

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.sizes.clear()

    def _nbytes(self) -> int:
        return sum(self.sizes.values())

    @property
    def nbytes(self) -> int:
        with self.lock:
            return self._nbytes()


class Engine:
    def __init__(self, model, tokenizer, prefix_cache: PrefixCache | None = None, prefill_step: int = 512,
                 progress: Callable[[int, int], None] | None = None, num_draft_tokens: int = 0,
                 max_batch: int = 8, cache_budget: int = 8 << 30, lockstep=None):
        """lockstep (lockstep.Lockstep): under mlx.launch, run in step with the other ranks; on a
        follower rank (not the leader) jobs come from rank 0, not submit()."""
        if num_draft_tokens and lockstep is not None:
            raise ValueError("--num-draft-tokens is not available under mlx.launch: the MTP block sits on the last "
                             "rank, the embedding it shares on the first")
        if num_draft_tokens and not model.mtp:
            raise ValueError("--num-draft-tokens needs an MTP layer, and this checkpoint has none")
        if not (isinstance(max_batch, int) and max_batch >= 1):
            raise ValueError(f"--max-batch must be a positive integer, got {max_batch!r}")
        # Lazy weights are graphs bound to the loading thread's stream: materialise them there,
        # about a GiB at a time so that progress(done_bytes, total_bytes) can follow.
        weights = [v for _, v in tree_flatten(model.parameters())]
        total, done, evaluated, start = sum(v.nbytes for v in weights), 0, 0, 0
        for k, v in enumerate(weights):
            done += v.nbytes
            if done - evaluated >= 1 << 30 or k == len(weights) - 1:
                mx.eval(weights[start : k + 1])
                start, evaluated = k + 1, done
                if progress is not None:
                    progress(done, total)
        self.model, self.tokenizer = model, tokenizer
        self.prefix = prefix_cache if prefix_cache is not None else PrefixCache()
        self.lockstep = lockstep
        if lockstep is not None:  # each rank holds its own layers' bytes: weigh what every rank computes alike
            self.prefix.weigh = lambda key, _snapshot: self.row_bytes(len(key))
        self.prefill_step = prefill_step
        # every request drafts with the MTP layer: greedy output is unchanged, sampling keeps its law
        self.num_draft_tokens = num_draft_tokens
        self.max_batch, self.cache_budget = max_batch, cache_budget
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.waiting = 0  # jobs admitted to the batch that have not produced their first token
        self.thread = threading.Thread(target=self._run, name="mlx-dsv4-engine", daemon=True)
        self.thread.start()

    def submit(self, tokens: list[int], params: dict, emit: Callable[[object], None]) -> Job:
        """Queue a generation; emit(response) per token, emit(exception) on failure, then emit(DONE)."""
        job = Job(tokens, params, emit)
        self.jobs.put(job)
        return job

    @property
    def pending(self) -> int:
        """Jobs waiting for their first token: queued, or in the batch and still prefilling."""
        return self.jobs.qsize() + self.waiting

    def row_bytes(self, n_tokens: int) -> int:
        """The analytic cache bytes of one sequence of n_tokens in this model's cache format."""
        m = self.model
        fmt = "compact" if m.simulate_qat else "bf16"
        size = m.layers[m.owned[0]].attn_norm.weight.dtype.size  # a layer this rank holds (all load alike)
        return cache_bytes(m.args, n_tokens, fmt, size)["total"]

    def admits(self, plan, running: list) -> bool:
        need = sum(self.row_bytes(len(p.ids) + p.max_tokens) for p in [plan, *running])
        return need <= self.cache_budget

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _run(self) -> None:
        mx.set_default_stream(mx.new_stream(mx.default_device()))  # this thread's own stream
        if not self.num_draft_tokens:
            return self._run_batched()
        while (job := self.jobs.get()) is not None:
            try:
                if job.cancelled.is_set():
                    job.finish_reason = "skipped"
                else:
                    self._generate(job)
            except Exception as e:  # noqa: BLE001 - reported to its request; the worker lives on
                job.emit(e)
            finally:
                job.done.set()
                job.emit(DONE)

    def _generate(self, job: Job) -> None:
        toks = job.tokens
        vocab = self.model.args.vocab_size
        if toks and (min(toks) < 0 or max(toks) >= vocab):  # an id past the embedding table crashes the process
            raise ValueError(f"prompt token ids outside the model's vocabulary [0, {vocab})")
        n, cache = self.prefix.lookup(toks)
        job.cached = n
        cache = cache or self.model.make_cache()
        if len(toks) - n > 1:  # prefill all but the last prompt token, then snapshot
            if not prefill(self.model, toks[n:-1], cache, self.prefill_step, should_stop=job.cancelled.is_set):
                job.finish_reason = "cancelled"
                return
            self.prefix.store(toks, cache)
        generated = []
        for r in stream_generate(self.model, self.tokenizer, toks, prompt_cache=cache,
                                 should_stop=job.cancelled.is_set, num_draft_tokens=self.num_draft_tokens,
                                 **job.params):
            if r.token is not None:
                generated.append(r.token)
            r.cached_tokens = n  # from an earlier request's snapshot, not this request's own prefill
            job.finish_reason = r.finish_reason
            job.emit(r)
        if cache[0].offset > len(toks):  # the cache now holds the reply but its last token
            self.prefix.store(toks + generated, cache)

    # -- continuous batching ---------------------------------------------------------------------
    def _run_batched(self) -> None:
        gen = self._new_batch()
        live: dict[int, tuple] = {}  # uid -> (job, generated tokens, its generation plan)
        closing = False  # close() was called: the jobs already submitted finish, then the thread ends
        while True:
            closing = self._intake(gen, live, closing) if self.lockstep is None else self._shared(gen, live, closing)
            if closing and not len(gen):
                return
            try:
                events = gen.step()
            except Exception as e:  # noqa: BLE001 - a failed step fails its rows; the worker lives on
                for job, *_ in live.values():
                    self._end(job, e)
                live.clear()
                gen = self._new_batch()
                continue
            for uid, r in events:
                job, generated, plan = live[uid]
                if r is None:  # cancelled while queued
                    job.finish_reason = "skipped"
                else:
                    if r.token is not None:
                        generated.append(r.token)
                    r.cached_tokens = job.cached  # from an earlier request's snapshot
                    job.finish_reason = r.finish_reason
                    job.emit(r)
                    if r.finish_reason is None:
                        continue
                    cache = plan.cache
                    if cache[0].offset > len(job.tokens):  # the cache holds the reply but its last token
                        self.prefix.store(job.tokens + generated, cache)
                del live[uid]
                self._end(job)
            self.waiting = sum(1 for j, g, _ in live.values() if not g and j.finish_reason is None)

    def _intake(self, gen: BatchGenerator, live: dict, closing: bool) -> bool:
        """Join the submitted jobs; blocks for work only when nothing is in flight. -> closing"""
        try:
            while not closing:
                job = self.jobs.get(block=not len(gen))
                if job is None:
                    closing = True
                else:
                    self._join(gen, job, live)
        except queue.Empty:
            pass
        return closing

    def _shared(self, gen: BatchGenerator, live: dict, closing: bool) -> bool:
        """_intake in lockstep: rank 0 sends what entered since the last iteration (new jobs, the
        uids of rows whose client left, shutdown), then every rank applies it alike. -> closing"""
        idle = not len(gen) and not closing
        message, jobs, was_closing = None, [], closing
        if self.lockstep.leader:
            block = idle
            while not closing:
                try:  # while idle, wake every tick: the followers wait in the next share meanwhile
                    job = self.jobs.get(timeout=IDLE_TICK) if block else self.jobs.get_nowait()
                except queue.Empty:
                    break
                block = False
                if job is None:
                    closing = True
                elif job.cancelled.is_set():  # never shared: the other ranks never hear of it
                    job.finish_reason = "skipped"
                    self._end(job)
                else:
                    if job.params.get("seed") is None and job.params.get("temperature", 0.0) > 0:
                        job.params = dict(job.params, seed=random.getrandbits(63))  # every rank draws alike
                    jobs.append(job)
            cancel = [uid for uid, (job, *_) in live.items() if job.cancelled.is_set() and not job.cancel_shared]
            for uid in cancel:
                live[uid][0].cancel_shared = True
            if jobs or cancel or closing != was_closing:
                message = {"jobs": [[j.tokens, j.params] for j in jobs], "cancel": cancel, "close": closing}
        elif idle:
            time.sleep(IDLE_TICK)  # rank 0 shares about then: wait here, not spinning in the collective
        message = self.lockstep.share(message)
        if message is None:
            return closing
        if not self.lockstep.leader:
            jobs = [Job(tokens, params, _nowhere) for tokens, params in message["jobs"]]
        for job in jobs:
            self._join(gen, job, live)
        for uid in message["cancel"]:
            gen.cancel(uid)
        return closing or message["close"]

    def _new_batch(self) -> BatchGenerator:
        return BatchGenerator(self.model, self.tokenizer, self.max_batch, self.prefill_step, admit=self.admits,
                              prefilled=lambda plan: self.prefix.store(plan.ids, plan.cache))

    def _join(self, gen: BatchGenerator, job: Job, live: dict) -> None:
        if job.cancelled.is_set() and self.lockstep is None:
            job.finish_reason = "skipped"
            return self._end(job)
        try:
            toks, vocab = job.tokens, self.model.args.vocab_size
            if toks and (min(toks) < 0 or max(toks) >= vocab):  # an id past the embedding table crashes
                raise ValueError(f"prompt token ids outside the model's vocabulary [0, {vocab})")
            n, cache = self.prefix.lookup(toks)
            job.cached = n
            # in lockstep a cancellation arrives as a message (gen.cancel), never read mid-step
            stop = job.cancelled.is_set if self.lockstep is None else None
            uid = gen.insert(toks, should_stop=stop, prompt_cache=cache, **job.params)
        except Exception as e:  # noqa: BLE001 - reported to its request
            return self._end(job, e)
        live[uid] = (job, [], gen.plan(uid))

    @staticmethod
    def _end(job: Job, error: Exception | None = None) -> None:
        if error is not None:
            job.emit(error)
        job.done.set()
        job.emit(DONE)
