"""The model-owning worker: one thread runs every MLX call; requests wait in a FIFO queue.

MLX streams belong to the thread that made them, so HTTP handlers never touch the model: they
submit a Job with a callback and receive its GenerationResponses through it. Jobs run one at a
time in arrival order (correct under any concurrency; not batched). A cancelled job (client gone)
stops at the next token or prefill chunk, or is skipped if it has not started.

Prefix reuse: the compressed caches cannot be trimmed, so the PrefixCache keeps whole-cache
snapshots keyed by the token prefix they hold, taken at the end of each prompt but its last token
(prefill prompt[:-1], snapshot, then generate: a follow-up turn that re-encodes the reply
differently still shares the prompt) and after each reply. A new prompt resumes from the longest
stored prefix that leaves at least one token to feed.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from ..generate import stream_generate

DONE = object()  # emitted after a job's last response (or its error)


class Job:
    def __init__(self, tokens: list[int], params: dict, emit: Callable[[object], None]):
        self.tokens, self.params, self.emit = list(tokens), params, emit
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.cached = 0  # prompt tokens resumed from a snapshot
        self.finish_reason: str | None = None  # as the generator reported it; "skipped" if never started

    def cancel(self) -> None:
        self.cancelled.set()


class PrefixCache:
    """LRU snapshots of the whole per-layer cache, keyed by the token prefix they hold."""

    def __init__(self, max_entries: int = 8, max_bytes: int = 4 << 30):
        self.entries: OrderedDict[tuple, list] = OrderedDict()
        self.max_entries, self.max_bytes = max_entries, max_bytes
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
            self.entries[key] = snapshot
            self.entries.move_to_end(key)
            # the newest entry stays even when it alone exceeds the byte bound
            while len(self.entries) > self.max_entries or (len(self.entries) > 1 and self._nbytes() > self.max_bytes):
                self.entries.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()

    def _nbytes(self) -> int:
        return sum(c.nbytes for cache in self.entries.values() for c in cache)

    @property
    def nbytes(self) -> int:
        with self.lock:
            return self._nbytes()


class Engine:
    def __init__(self, model, tokenizer, prefix_cache: PrefixCache | None = None, prefill_step: int = 512,
                 progress: Callable[[int, int], None] | None = None, num_draft_tokens: int = 0):
        if num_draft_tokens and not model.mtp:
            raise ValueError("--num-draft-tokens needs an MTP layer, and this checkpoint has none")
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
        self.prefill_step = prefill_step
        # every request drafts with the MTP layer: greedy output is unchanged, sampling keeps its law
        self.num_draft_tokens = num_draft_tokens
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="mlx-dsv4-engine", daemon=True)
        self.thread.start()

    def submit(self, tokens: list[int], params: dict, emit: Callable[[object], None]) -> Job:
        """Queue a generation; emit(response) per token, emit(exception) on failure, then emit(DONE)."""
        job = Job(tokens, params, emit)
        self.jobs.put(job)
        return job

    @property
    def pending(self) -> int:
        return self.jobs.qsize()

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _run(self) -> None:
        mx.set_default_stream(mx.new_stream(mx.default_device()))  # this thread's own stream
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
            for s in range(n, len(toks) - 1, self.prefill_step):
                if job.cancelled.is_set():
                    job.finish_reason = "cancelled"
                    return
                self.model(mx.array(toks[s : min(s + self.prefill_step, len(toks) - 1)])[None], cache,
                           last_only=True)
                mx.eval([c.state for c in cache])
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
