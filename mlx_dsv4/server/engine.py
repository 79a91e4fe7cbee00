"""The model-owning worker: one thread runs every MLX call, requests wait in a queue.

MLX streams belong to the thread that made them, so HTTP handlers never touch the model: they
submit a Job and read its events. The prefix cache keeps cache snapshots keyed by the token
prefix they hold (at the end of each prompt and after each reply), bounded in entries and bytes;
a new prompt resumes from the longest stored prefix, so an agent's growing conversation is
prefilled incrementally. (The compressed caches cannot be trimmed, hence snapshots.)
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import mlx.core as mx

from ..generate import stream_generate

_DONE = object()


@dataclass
class Job:
    tokens: list[int]
    params: dict
    events: "queue.Queue" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def __iter__(self):
        while True:
            item = self.events.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class PrefixCache:
    def __init__(self, max_entries: int = 8, max_bytes: int = 4 << 30):
        self.entries: OrderedDict[tuple, list] = OrderedDict()
        self.max_entries, self.max_bytes = max_entries, max_bytes

    def lookup(self, tokens: list[int]):
        """Longest stored prefix leaving at least one token to feed -> (n, copied cache) or (0, None)."""
        best = None
        for key in self.entries:
            n = len(key)
            if n < len(tokens) and (best is None or n > len(best)) and tuple(tokens[:n]) == key:
                best = key
        if best is None:
            return 0, None
        self.entries.move_to_end(best)
        return len(best), [c.copy() for c in self.entries[best]]

    def store(self, tokens: list[int], cache: list) -> None:
        key = tuple(tokens[: cache[0].offset])
        if not key:
            return
        self.entries[key] = [c.copy() for c in cache]
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries or (len(self.entries) > 1 and self.nbytes > self.max_bytes):
            self.entries.popitem(last=False)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for cache in self.entries.values() for c in cache)


class Engine:
    def __init__(self, model, tokenizer, prefix_cache: PrefixCache | None = None, prefill_step: int = 512):
        self.model, self.tokenizer = model, tokenizer
        self.prefix = prefix_cache or PrefixCache()
        self.prefill_step = prefill_step
        self.jobs: "queue.Queue[Job | None]" = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="mlx-dsv4-engine", daemon=True)
        self.thread.start()

    def submit(self, tokens: list[int], **params) -> Job:
        job = Job(list(tokens), params)
        self.jobs.put(job)
        return job

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _run(self) -> None:
        # MLX streams belong to the thread that makes them: this thread gets its own.
        mx.set_default_stream(mx.new_stream(mx.default_device()))
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                if not job.cancelled.is_set():
                    self._generate(job)
            except BaseException as e:  # reported to the request, the worker lives on
                job.events.put(e)
            finally:
                job.events.put(_DONE)

    def _generate(self, job: Job) -> None:
        toks = job.tokens
        n, cache = self.prefix.lookup(toks)
        cache = cache or self.model.make_cache()
        if len(toks) - n > 1:  # prefill all but the last prompt token and keep a snapshot there
            for s in range(n, len(toks) - 1, self.prefill_step):
                if job.cancelled.is_set():
                    return
                chunk = mx.array(toks[s : min(s + self.prefill_step, len(toks) - 1)])[None]
                mx.eval(self.model(chunk, cache, last_only=True), [c.state for c in cache])
            self.prefix.store(toks, cache)
        generated = []
        for r in stream_generate(self.model, self.tokenizer, toks, prompt_cache=cache,
                                 should_stop=job.cancelled.is_set, **job.params):
            if r.token is not None:
                generated.append(r.token)
            r.cached_tokens = n  # tokens served from an earlier request's snapshot
            job.events.put(r)
        if cache[0].offset > len(toks):
            self.prefix.store(toks + generated, cache)
