"""The whole decode step as one compiled graph: what keeps the host's graph building per token small.

Eagerly, a Flash-schedule decode step is some 25,000 Python calls building ~10,000 graph nodes, every
step again (~35-45 ms of host time on a 2-core x86 VM, README "Host time per decode step"). Compiled
once, the step replays its recorded graph. That needs a step whose graph does not change with the
position: the caches become RingCaches (ring_cache.py, fixed-size buffers) and the position an array.
A new capacity (the cache outgrew its buffers) traces once more. Each trace is specialised on which
compressor windows the step completes (`ends`: none on 3 of 4 steps, the CSA ones on the 4th, the HCA ones
too on every 128th): only those steps pool a window and write its entry, so three traces serve every
position and the common one holds none of the 62 poolings, entry finishes and store writes of a Flash step.

It is the default where the model's kernels run (Metal): there the ring caches cost the device little.
On the CPU's reference path they cost more than they save (each step's indexer scores every entry a
capacity holds, 1,024 at the smallest, and its attention reads every ring row, where the eager path reads
what the position holds: ~1.5x the evaluation on a 2-core x86 VM at context 512) and the evaluator thread
already hides the host's building behind the evaluation, so the eager path stays the default there.
MLX_DSV4_COMPILE=1 / 0 turns it on / off everywhere.
"""

from __future__ import annotations

import os
import weakref

import mlx.core as mx
from mlx.utils import tree_flatten

from .cache import LayerCache
from .kernels import fuse, registry
from .ring_cache import SPARE, RingCache

ENV = "MLX_DSV4_COMPILE"
SMALLEST = 4096  # capacities (tokens) run SMALLEST, x 1.5, x 4/3, x 1.5, ...: requests of similar lengths share a
# trace, and the whole capacity (which a step's indexer scores) stays within 1.5x of the need
_TRACES: dict = {}  # id(model) -> (its weights' identity, {(stream, kernels, fusing, layers' meta): compiled step})


def supported(model, cache: list) -> bool:
    """Whether `cache` of `model` can decode through a compiled step: one process holding the whole model
    (no streamed experts or ranks, whose steps evaluate on their way) and plain LayerCaches."""
    return not model.evaluates_inside and bool(cache) and all(type(c) is LayerCache for c in cache)


def wanted(model, cache: list) -> bool:
    """Whether plain decoding takes the compiled step (see the module docstring for the default)."""
    env = os.environ.get(ENV)
    return (registry.use_kernels() if env is None else env != "0") and supported(model, cache)


def forced() -> bool:
    """MLX_DSV4_COMPILE=1: a compiled step that fails raises instead of giving way to the eager one."""
    return os.environ.get(ENV) == "1"


def ends(rings: list[RingCache], pos: int) -> tuple[int, ...]:
    """The compressor ratios whose windows the step at position `pos` completes (what a trace is specialised on)."""
    return tuple(sorted({r.ratio for r in rings if r.ratio and (pos + 1) % r.ratio == 0}))


def _step(model, rings: list[RingCache], ended: tuple[int, ...]):
    """The decode step over ring caches laid out as `rings`, at a position that completes the windows of the
    ratios `ended`, as a function of arrays only."""
    templates = [RingCache(r.ratio, r.window_size, r.stores, {}) for r in rings]  # no arrays kept alive
    for t in templates:
        t.ends_window = t.ratio in ended
    ref = weakref.ref(model)  # neither: a trace lives as long as its model

    def step(tokens: mx.array, pos: mx.array, arrays: list[dict]):
        caches = [t.with_arrays(a, pos) for t, a in zip(templates, arrays)]
        logits = ref()(tokens, cache=caches, last_only=True)[:, -1, :]
        return logits, [c.arrays for c in caches]

    return step


def _evaluate_weights(params: list[tuple[str, mx.array]]) -> None:
    """Before a trace: a weight still lazy (loaded lazily and not read by the prefill, e.g. an indexer's when its
    top-k covered every entry, or quantized in place) would be traced with the graph that makes it, and made again
    at every step. The MTP layers' are no part of a step."""
    mx.eval([v for k, v in params if not k.startswith("mtp.")])


def _traced(model, rings: list[RingCache], ended: tuple[int, ...]):
    """The compiled step for this model, its weights, the stream, the cache layout and the windows ended: what a
    trace bakes in (its stream: one per thread; the weight arrays as constants: a model given new ones is traced
    anew)."""
    params = tree_flatten(model.parameters())
    weights = hash(tuple(id(v) for _, v in params))
    held = _TRACES.get(id(model))
    if held is None or held[0] != weights:  # new weights: the old traces (and the arrays they hold) go
        if held is None:
            weakref.finalize(model, _TRACES.pop, id(model), None)
        held = _TRACES[id(model)] = (weights, {})
    key = (str(mx.default_stream(mx.default_device())), registry.use_kernels(), fuse.enabled(),
           tuple(r.meta for r in rings), ended)
    fn = held[1].get(key)
    if fn is None:
        _evaluate_weights(params)
        fn = held[1][key] = mx.compile(_step(model, rings, ended))
    return fn


class CompiledDecode:
    """Decodes one token per call through a compiled step over RingCaches made from `cache` (LayerCaches at
    a common offset); `write_back` makes those LayerCaches what plain decoding would have left."""

    def __init__(self, model, cache: list[LayerCache], tokens: int, compiled: bool = True):
        """tokens: how many steps are expected (the capacity grows past it if need be). compiled=False runs the
        same step eagerly (what the Metal kernels' CPU harness can execute)."""
        self.model, self.pos, self.compiled = model, cache[0].offset, compiled
        self._set_rings(cache, self._room(tokens))

    def _room(self, tokens: int) -> int:
        """The capacity for `tokens` more steps (at most a quarter of the context so far, or SMALLEST, at a time):
        the first rung of the ladder that holds them, never past the model's context."""
        need = self.pos + SPARE + min(tokens, max(SMALLEST, self.pos // 4))
        cap = SMALLEST
        while cap < need:
            cap = cap * 3 // 2 if cap & (cap - 1) == 0 else cap * 4 // 3
        return min(cap, -(-(self.model.args.max_position_embeddings + SPARE + 1) // 256) * 256)

    def _set_rings(self, cache: list[LayerCache], cap: int) -> None:
        """Ring caches of capacity `cap` from `cache`, and the step that runs over them."""
        a, e = self.model.args, self.model.embed
        dtype = (e.scales if "scales" in e else e.weight).dtype  # the model's (a quantized table's are uint32)
        self.rings = [RingCache.from_layer(c, cap, dtype, a.head_dim, a.index_head_dim) for c in cache]
        self.capacity = cap  # tokens the rings hold
        self._steps = {}  # ends(...) -> the step

    def _step(self, ended: tuple[int, ...]):
        fn = self._steps.get(ended)
        if fn is None:
            fn = self._steps[ended] = (_traced if self.compiled else _step)(self.model, self.rings, ended)
        return fn

    @property
    def arrays(self) -> list[dict]:
        """Everything the caches hold: what to evaluate with a step."""
        return [r.arrays for r in self.rings]

    def __call__(self, tokens: mx.array) -> mx.array:
        """Feed tokens [B, 1] at the current position -> logits [B, vocab] (lazy)."""
        if self.pos + 1 > self.capacity:  # outgrown: more room, through LayerCaches
            lcs = [LayerCache(r.ratio, r.window_size) for r in self.rings]
            self.write_back(lcs)
            self._set_rings(lcs, self._room(1 << 62))
        if tokens.dtype != mx.int32:  # one trace for every token source (prompt ids, an argmax's uint32)
            tokens = tokens.astype(mx.int32)
        step = self._step(ends(self.rings, self.pos))
        logits, arrays = step(tokens, mx.array(self.pos, mx.int32), self.arrays)
        for r, a in zip(self.rings, arrays):
            r.arrays = a
        self.pos += 1
        return logits

    def write_back(self, cache: list[LayerCache], drop: int = 0) -> None:
        """Make `cache` what plain decoding leaves after all steps but the last `drop` (<= SPARE)."""
        for r, c in zip(self.rings, cache):
            r.to_layer(c, self.pos - drop, self.pos)
