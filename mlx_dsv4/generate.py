"""Text generation: `stream_generate` yields one GenerationResponse per token, `generate` returns
the text. Sampling and logits processors are mlx-lm's; prefill runs in chunks through the cache.

Cache contract: when the stream ends, `prompt_cache` (if given) holds the prompt plus every
generated token except the last one (the last token is sampled, never fed), so a caller that
knows the tokens can keep using the cache.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors, make_sampler

from . import compiled_step, evaluator
from .prompt_cache import load_prompt_cache, save_prompt_cache  # noqa: F401  (re-exported)
from .sampling import SamplingParams
from .speculative import Distribution, Emitted, Speculator, prefill_with_streams, processed_logprobs
from .text_stream import Detokenizer, StopStrings


@dataclass
class GenerationResponse:
    text: str  # new text since the previous response
    token: int | None
    logprob: float | None  # of the sampled token, after logits processors, before temperature
    top_logprobs: list[tuple[int, float]] | None
    prompt_tokens: int
    cached_tokens: int  # prompt tokens served from the given prompt_cache
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None  # None while running; "stop", "length" or "cancelled" at the end
    from_draft: bool = False  # an MTP draft accepted by verification (num_draft_tokens > 0)
    draft_acceptance: list[float] | None = None  # so far, per draft position (speculative only)
    mean_accepted_length: float | None = None  # tokens emitted per verify pass (speculative only)
    expert_stats: dict | None = None  # streamed experts (last response only): ExpertStore.stats(), since load


def prompt_tokens(tokenizer, prompt: str | list[int] | mx.array, vocab_size: int | None = None) -> list[int]:
    """The prompt as a list of ids. Strings are encoded without special tokens: prompts from
    encode_messages already start with BOS."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_special_tokens=False)
    elif isinstance(prompt, mx.array):
        if prompt.ndim == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.ndim != 1 or not mx.issubdtype(prompt.dtype, mx.integer):
            raise ValueError(f"prompt array must hold integer ids, [length] or [1, length]; got "
                             f"{prompt.dtype} of shape {prompt.shape}")
        ids = prompt.tolist()
    else:
        ids = list(prompt)
        if not all(isinstance(t, numbers.Integral) for t in ids):
            raise ValueError("prompt list must contain only integer token ids")
        ids = [int(t) for t in ids]
    if not ids:
        raise ValueError("empty prompt: it must contain at least one token")
    if vocab_size is not None:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    return ids


def prefill(model, tokens: list[int], cache: list, step: int = 512,
            progress: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> bool:
    """Run `tokens` through the cache in chunks of `step`, materialising the cache after each.
    should_stop() is polled before each chunk; returns False if it stopped the prefill."""
    if step < 1:
        raise ValueError(f"prefill_step_size must be >= 1, got {step}")
    for s in range(0, len(tokens), step):
        if should_stop is not None and should_stop():
            return False
        chunk = mx.array(tokens[s : s + step])[None]
        model(chunk, cache=cache, last_only=True)
        mx.eval([c.state for c in cache])
        if progress is not None:
            progress(min(s + step, len(tokens)), len(tokens))
    return True


def stream_generate(model, tokenizer, prompt: str | list[int] | mx.array, **kwargs) -> Iterator[GenerationResponse]:
    """Yield one response per generated token; the last one carries finish_reason.

    prompt_cache, if given, already holds the first `prompt_cache[0].offset` prompt tokens (the
    caller guarantees they match) and at least the last prompt token must be left to feed.
    progress_callback(done, total) follows the prefill of the uncached prompt tokens;
    should_stop() is polled before every token (e.g. for client disconnects). num_draft_tokens K > 0
    drafts up to K tokens per step with the model's MTP layer and verifies them in one pass (see
    speculative.py): the same tokens as plain decoding when greedy, the same distribution when
    sampling. Bad arguments raise ValueError here, at the call; the prefill starts with the first
    response. The keyword arguments are those of `prepare`."""
    plan = prepare(model, tokenizer, prompt, **kwargs)
    if plan.seed is not None:
        mx.random.seed(plan.seed)
    return _stream(plan)


@dataclass
class Plan:
    """A validated generation request: what `_stream` runs (and batch rows run step by step)."""
    model: object
    tokenizer: object
    ids: list[int]
    cache: list
    cached: int
    max_tokens: int
    sampler: Callable
    processors: list[Callable]
    stop: list[str] | None
    prefill_step_size: int
    num_top_logprobs: int
    progress_callback: Callable | None
    should_stop: Callable | None
    draft: tuple | None
    seed: int | None


def prepare(model, tokenizer, prompt: str | list[int] | mx.array, *, max_tokens: int = 256,
            temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
            repetition_penalty: float | None = None, seed: int | None = None,
            sampler: Callable[[mx.array], mx.array] | None = None,
            logits_processors: list[Callable] | None = None, stop: list[str] | None = None,
            prompt_cache: list | None = None, prefill_step_size: int = 512,
            num_top_logprobs: int = 0, progress_callback: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None,
            num_draft_tokens: int = 0) -> Plan:
    """Check every argument of stream_generate (ValueError, at the call) and build its Plan."""
    vocab = model.args.vocab_size
    ids = prompt_tokens(tokenizer, prompt, vocab)
    context = model.args.max_position_embeddings
    if len(ids) > context:
        raise ValueError(f"prompt has {len(ids)} tokens, longer than the model's context of {context}")
    if not (isinstance(max_tokens, int) and max_tokens >= 0):
        raise ValueError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")
    if prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be >= 1, got {prefill_step_size}")
    if num_top_logprobs < 0:
        raise ValueError(f"num_top_logprobs must be >= 0, got {num_top_logprobs}")
    SamplingParams(temperature, top_p, top_k, min_p, repetition_penalty, seed).check()
    top_k = min(top_k, vocab - 1) if top_k else 0  # top_k >= vocab keeps everything anyway
    cache = prompt_cache if prompt_cache is not None else model.make_cache()
    cached = cache[0].offset if cache else 0
    if cached >= len(ids):
        raise ValueError(f"prompt_cache already holds {cached} tokens but the prompt has {len(ids)}: "
                         "leave at least the last prompt token uncached")
    draft = None
    if not (isinstance(num_draft_tokens, int) and num_draft_tokens >= 0):
        raise ValueError(f"num_draft_tokens must be a non-negative integer, got {num_draft_tokens!r}")
    if num_draft_tokens:
        if getattr(model, "stage", None) is not None or getattr(model, "shard", None) is not None:
            raise ValueError("num_draft_tokens > 0 is not available with a model split across ranks yet "
                             "(pipeline: the MTP block sits on the last rank, the embedding it shares on the "
                             "first; tensor: not tested)")
        if not model.mtp:
            raise ValueError("num_draft_tokens > 0 needs an MTP layer, and this checkpoint has none")
        if sampler is not None:
            raise ValueError("num_draft_tokens > 0 needs the built-in sampling options (temperature, top_p, "
                             "top_k, min_p), not a custom sampler: drafts are accepted by probability ratio")
        if num_draft_tokens >= model.args.window_size:
            raise ValueError(f"num_draft_tokens must be below the window size {model.args.window_size}")
        draft = (num_draft_tokens, Distribution(temperature, top_p, min_p, top_k))
    if sampler is None:
        sampler = (make_sampler(temperature, top_p, min_p, top_k=top_k) if seed is None or temperature == 0
                   else keyed_sampler(temperature, top_p, min_p, top_k, seed))
    processors = list(logits_processors or []) + make_logits_processors(repetition_penalty=repetition_penalty)
    max_tokens = min(max_tokens, context - len(ids))  # prompt + generated never exceeds the context
    stop = [stop] if isinstance(stop, str) else stop
    return Plan(model, tokenizer, ids, cache, cached, max_tokens, sampler, processors, stop, prefill_step_size,
                num_top_logprobs, progress_callback, should_stop, draft, seed)


def keyed_sampler(temperature: float, top_p: float, min_p: float, top_k: int, seed: int) -> Callable:
    """mlx-lm's sampling chain (top-p, min-p, top-k, then a categorical draw at the temperature) drawing
    from its own key chain: a stream's draws depend on its seed alone, not on other streams drawing
    from the global generator in between (batch rows, the server's concurrent requests)."""
    filters = []
    if 0 < top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p != 0.0:
        filters.append(lambda x: apply_min_p(x, min_p, 1))
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))
    key = mx.random.key(seed)

    def draw(logprobs: mx.array) -> mx.array:
        nonlocal key
        for f in filters:
            logprobs = f(logprobs)
        key, sub = mx.random.split(key)
        return mx.random.categorical(logprobs * (1.0 / temperature), key=sub)

    return draw


log = logging.getLogger("mlx_dsv4")
PIPELINE = True  # PlainDecoder's and Speculator's default: submit work before reading back what it yields


class PlainDecoder:
    """One token per round from the trunk alone: the same interface as Speculator.

    ahead=True pipelines decoding: the step that feeds token n is built and submitted before token n
    is read back, so the host builds step n + 1's graph while step n computes instead of after it
    (on the CPU through evaluator.Evaluator, elsewhere with mx.async_eval as mlx-lm does). A stream
    that stops early has then fed one token too many: close() rolls every layer cache back by that
    step (LayerCache.rollback), so the cache contract holds. ahead=False is the previous loop (build,
    evaluate, read, then build the next step).

    compiled=True (where compiled_step.supported; default: compiled_step.wanted) runs each step as one
    compiled graph over ring caches made from `cache` at the first round; close() writes them back into
    `cache`, which until then keeps the prefilled state."""

    def __init__(self, model, cache: list, sampler: Callable, processors: list[Callable], history: mx.array | None,
                 ahead: bool | None = None, compiled: bool | None = None):
        self.model, self.cache, self.sampler, self.processors, self.history = model, cache, sampler, processors, history
        self.ahead = PIPELINE if ahead is None else ahead
        self._compile = (compiled_step.wanted(model, cache) if compiled is None
                         else compiled and compiled_step.supported(model, cache))
        self._strict = compiled is True or compiled_step.forced()  # asked for: a failure is an error
        self._compiled = None  # the CompiledDecode, from the first round on
        self._ev = evaluator.for_this_thread() if self.ahead and not model.evaluates_inside else None
        if self._ev is not None:  # what the worker evaluates may not reach back into this thread's lazy graphs
            self._ev.adopt(model.parameters(), [c.state for c in cache], history)
        self.stats = None
        self._next = None  # (token, logprobs, cache checkpoints) of the step submitted ahead

    def build(self, fed: mx.array) -> tuple[mx.array, mx.array]:
        """The graph of the step feeding `fed` [1, 1] (lazy or not): (token [1], logprobs [V]).
        Nothing in it may synchronise (tests/test_decode_pipeline.py checks): that would stall the pipeline."""
        logits = None
        if self._compiled is not None:
            try:
                logits = self._compiled(fed)
            except Exception as e:  # a default that cannot trace here gives way to the eager step, once said
                if self._strict:
                    raise
                self._give_up_compiling(e)
        self._undo = None  # what close() needs to undo this step (a compiled one: nothing, see write_back)
        if logits is None:
            if self.ahead:  # only a step fed ahead is ever undone
                self._undo = [c.checkpoint() for c in self.cache]
            logits = self.model(fed, cache=self.cache, last_only=True)[:, -1, :]
        logprobs = processed_logprobs(logits, self.processors, self.history)
        return self.sampler(logprobs), logprobs[0]

    def _give_up_compiling(self, error: Exception) -> None:
        """Go on eagerly from the state the compiled steps reached (a failed call changed nothing)."""
        first = (str(error).splitlines() or [""])[0]
        log.warning("note: the compiled decode step failed (%s: %s); decoding eagerly (MLX_DSV4_COMPILE=0 skips "
                    "it, =1 makes this an error)", type(error).__name__, first)
        self._compiled.write_back(self.cache)
        self._compiled, self._compile = None, False

    def _step(self, fed: mx.array) -> tuple[mx.array, mx.array]:
        """Build and submit the step feeding `fed`; nothing is read back."""
        y, lp = self.build(fed)
        # the cache too: states not read by this token's logits would otherwise stay lazy for
        # up to `ratio` steps, holding every intermediate activation alive
        states = self._compiled.arrays if self._compiled is not None else [c.state for c in self.cache]
        if self._ev is not None:
            self._ev.submit(y, lp, states)
        else:
            (mx.async_eval if self.ahead else mx.eval)(y, lp, states)
        return y, lp

    def next_round(self, last: int, budget: int) -> list[Emitted]:
        if self._compile and self._compiled is None:  # made and evaluated here: this thread's stream
            self._compiled = compiled_step.CompiledDecode(self.model, self.cache, budget)
            mx.eval(self._compiled.arrays)
        with mx.stream(self._ev.stream) if self._ev is not None else contextlib.nullcontext():
            if self._next is None:
                y, lp = self._step(mx.array([[last]]))
            else:  # submitted last round, feeding the (then unread) token `last`
                y, lp, _ = self._next
                self._next = None
            if self.ahead and budget > 1:  # the next step goes in before this token is read
                if self.history is not None:
                    self.history = mx.concatenate([self.history, y.reshape(1).astype(self.history.dtype)])
                self._next = (*self._step(y.reshape(1, 1)), self._undo)
        if self._ev is not None:  # this token's step is done; the one fed ahead may still run
            self._ev.wait(keep=int(self._next is not None))
        self._y = y
        return [Emitted(y.item(), lp, False)]

    def commit(self, used: int) -> None:
        if self.history is not None and self._next is None:  # a step fed ahead has appended it already
            self.history = mx.concatenate([self.history, self._y.reshape(1).astype(self.history.dtype)])

    def close(self) -> None:
        """End of stream: drop the step fed ahead, if any (its token was never emitted)."""
        if self._ev is not None:
            self._ev.wait()
        ahead, self._next = self._next, None
        if self._compiled is not None:
            self._compiled.write_back(self.cache, drop=int(ahead is not None))
            self._compiled = None
        elif ahead is not None:
            for c, s in zip(self.cache, ahead[-1]):
                c.rollback(s, 0)
        mx.eval([c.state for c in self.cache])


# Read-backs (the sampled token's log-probability, the top ones) run on their own stream: on the
# decode stream they would queue behind the step submitted ahead and wait for it. One per thread:
# MLX streams belong to the thread that made them (the server decodes on its own thread).
_readout = threading.local()


def _readout_stream():
    if not hasattr(_readout, "stream"):
        _readout.stream = mx.new_stream(mx.cpu)
    return _readout.stream


def _stream(plan: Plan, source=None) -> Iterator[GenerationResponse]:
    """The responses of a Plan. source: the token source when the caller has prefilled the cache
    (a batch row, fed by batched steps); by default a PlainDecoder or Speculator after the prefill."""
    (model, tokenizer, ids, cache, cached, max_tokens, sampler, processors, stop, prefill_step_size,
     num_top_logprobs, progress_callback, should_stop, draft, _) = (getattr(plan, f.name) for f in fields(plan))
    vocab = model.args.vocab_size
    tic = time.perf_counter()
    todo = ids[cached:]
    report = progress_callback and (lambda done, _total: progress_callback(done, len(todo)))
    history = mx.array(ids) if processors else None  # what the logits processors look back on
    if source is not None:
        if len(todo) != 1:
            raise ValueError(f"a given token source needs every prompt token but the last cached, {len(todo)} are not")
    elif draft is None:
        prefill(model, todo[:-1], cache, prefill_step_size, report)
        source = PlainDecoder(model, cache, sampler, processors, history)
    else:
        k, dist = draft
        h = prefill_with_streams(model, todo[:-1], cache, prefill_step_size, model.args.window_size, report)
        pending = None if h is None else (h, todo[len(todo) - h.shape[1] :])
        source = Speculator(model, cache, k, dist, processors, history, pending, ahead=PIPELINE)
    detok, stops = Detokenizer(tokenizer), StopStrings(stop)

    def close() -> tuple[str, bool]:  # end of stream: release held bytes and held text
        tail, hit = stops.feed(detok.finish())
        return tail + ("" if hit else stops.flush()), hit

    n, prompt_tps, gen_tic, last = 0, 0.0, tic, todo[-1]
    emitted, used = [], 0
    try:
        while True:
            if used == len(emitted):  # round done: keep it all, start the next
                if emitted:
                    source.commit(used)
                    last = emitted[-1].token
                emitted, used = [], 0
            token = lp = top = finish = e = None
            if should_stop is not None and should_stop():
                finish = "cancelled"
            elif n >= max_tokens:
                finish = "length"
            else:
                if not emitted:
                    emitted = source.next_round(last, max_tokens - n)
                e = emitted[used]
                used += 1
                token = e.token
                with mx.stream(_readout_stream()):
                    lp = e.logprobs[token].item()
                    if num_top_logprobs:
                        kk = min(num_top_logprobs, vocab)
                        idx = mx.argpartition(-e.logprobs, kk - 1)[:kk]
                        vals = e.logprobs[idx]
                        order = mx.argsort(-vals)
                        top = list(zip(idx[order].tolist(), vals[order].tolist()))
                if n == 0:
                    prompt_tps = len(todo) / (time.perf_counter() - tic)
                    gen_tic = time.perf_counter()
                    if progress_callback is not None:
                        progress_callback(len(todo), len(todo))
                n += 1
            if token is None:
                text, _ = close()
            elif token in tokenizer.eos_token_ids:
                text, _ = close()
                finish = "stop"
            else:
                text, hit = stops.feed(detok.add(token))
                if hit:
                    finish = "stop"
                elif n == max_tokens:
                    tail, hit = close()
                    text, finish = text + tail, "stop" if hit else "length"
            gen_time = time.perf_counter() - gen_tic
            stats = source.stats
            yield GenerationResponse(
                text=text, token=token, logprob=lp, top_logprobs=top, prompt_tokens=len(ids),
                cached_tokens=cached, prompt_tps=prompt_tps, generation_tokens=n,
                generation_tps=(n - 1) / gen_time if n > 1 and gen_time > 0 else 0.0,
                peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish,
                from_draft=bool(e and e.from_draft),
                draft_acceptance=stats.acceptance if stats else None,
                mean_accepted_length=stats.mean_accepted_length if stats else None,
                expert_stats=_expert_stats(model) if finish is not None else None)
            if finish is not None:
                return
    finally:  # however the stream ends, the cache keeps exactly the tokens emitted (but the last)
        if emitted:
            source.commit(max(used, 1))
        if hasattr(source, "close"):
            source.close()


def _expert_stats(model) -> dict | None:
    store = getattr(model, "expert_store", None)
    return store.stats() if store is not None else None


def generate(model, tokenizer, prompt: str | list[int] | mx.array, verbose: bool = False, **kwargs) -> str:
    """The generated text (stop strings and EOS excluded). verbose prints it as it streams, then stats."""
    text, r = [], None
    for r in stream_generate(model, tokenizer, prompt, **kwargs):
        text.append(r.text)
        if verbose:
            print(r.text, end="", flush=True)
    if verbose and r is not None:
        print()
        print("=" * 10)
        print(format_stats(r))
    return "".join(text)


def format_stats(r: GenerationResponse) -> str:
    cached = f" ({r.cached_tokens} cached)" if r.cached_tokens else ""
    lines = []
    if r.draft_acceptance is not None:
        per = ", ".join(f"{a:.2f}" for a in r.draft_acceptance)
        lines.append(f"Drafts: {r.mean_accepted_length:.2f} tokens per verify, acceptance per position [{per}]")
    lines += [f"Prompt: {r.prompt_tokens} tokens{cached}, {r.prompt_tps:.3f} tokens-per-sec",
             f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec",
             f"Peak memory: {r.peak_memory:.3f} GB"]
    if r.expert_stats:
        lines.append(format_expert_stats(r.expert_stats))
    return "\n".join(lines + [f"Finish reason: {r.finish_reason}"])


def format_expert_stats(s: dict) -> str:
    rate = "-" if s["hit_rate"] is None else f"{100 * s['hit_rate']:.1f}%"
    per = "-" if s["bytes_per_token"] is None else f"{s['bytes_per_token'] / 1e6:.2f} MB"
    return (f"Experts streamed: hit rate {rate}, {per} read per token, {s['bytes_read'] / 1e9:.3f} GB read "
            f"over {s['tokens']} tokens, budget {s['budget_gb']:.3g} GB = {s['capacity_experts']} experts "
            f"of {s['experts_total_gb']:.3g} GB")
