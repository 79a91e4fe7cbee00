"""Fused reference pieces: a static-shape chain of small ops compiled into a few graph nodes.

On MLX's CPU backend a decode step is bound by the number of graph nodes, not by arithmetic: each
costs the host about 1.5 us to build and the evaluator about 4 us to schedule, and async_eval
runs at most ~100 nodes ahead of the evaluator, so host and evaluation cannot overlap there.
mx.compile fuses elementwise chains (norms, RoPE, FP8 rounding, routing weights) into one node each
and replays a traced graph for the price of one Python call. Only pieces whose shapes repeat from
step to step are compiled (a new shape is a new trace). MLX_DSV4_FUSE=0 runs the same ops unfused:
benchmarks keep the previous loop measurable with it.
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx

_enabled = os.environ.get("MLX_DSV4_FUSE", "1") != "0"


def enabled() -> bool:
    return _enabled


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = bool(on)


@functools.lru_cache(maxsize=1024)
def _compiled(fn, static: tuple, stream: str):
    return mx.compile(functools.partial(fn, *static))


def run(fn, static: tuple, *arrays: mx.array, always: bool = False):
    """fn(*static, *arrays), compiled once per (fn, static) and stream when fusing is on. static: hashable
    Python values (flags, eps, dtypes) baked into the trace; arrays: the only traced inputs. A trace
    records the stream it was made on, and each thread has its own (the server's engine thread), so a
    trace is never replayed on another thread's stream. always: compiled even with fusing off (a piece
    that was compiled before the switch existed, so the unfused loop stays the previous one)."""
    if not (_enabled or always):
        return fn(*static, *arrays)
    return _compiled(fn, static, str(mx.default_stream(mx.default_device())))(*arrays)


def clear() -> None:
    """Forget every trace: a traced piece keeps the functions it called when it was traced, so code that
    swaps one of them (a test's deliberate break) must retrace."""
    _compiled.cache_clear()
