"""Splitting V4 across Macs with mx.distributed: the world group, the pipeline stage plan and
which checkpoint tensors a rank reads.

Pipeline mode: rank r holds a contiguous run of layers. Stages are balanced by the bytes they hold,
with the embedding on the first rank and everything after the last layer (hc_head, norm, head,
MTP) on the last, so each rank reads and keeps about 1/N of the checkpoint. The transport between
stages is MLX's own (send / recv / all_sum on the group mlx.launch set up): see pipeline.py.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import mlx.core as mx

from .watchdog import Watchdog, on_termination

SHARDINGS = ("pipeline",)
_LAYER = re.compile(r"^layers\.(\d+)\.")
TIMEOUT_ENV = "MLX_DSV4_DIST_TIMEOUT"  # seconds a rank may wait inside one model call
DEFAULT_TIMEOUT = 300.0  # one prefill chunk of the slowest stage on a Mac, with a wide margin


def launched() -> bool:
    """True when started by mlx.launch (which sets MLX_RANK on every process it starts)."""
    return "MLX_RANK" in os.environ


def world_group():
    """The group mlx.launch set up (ring or JACCL, as its hostfile says), or None when this
    process runs alone. Commands call this, so they need no flag to find their peers."""
    if not launched():
        return None
    try:
        g = mx.distributed.init(strict=True)
    except RuntimeError as e:
        raise ValueError(f"mlx.launch started this process but no distributed backend came up: {e}") from None
    if g.size() == 1:
        return None
    on_termination(g.rank())
    return g


def check_sharding(sharding: str) -> str:
    if sharding not in SHARDINGS:
        raise ValueError(f"unknown sharding {sharding!r}: this version splits models by {', '.join(SHARDINGS)} "
                         "only (tensor / expert parallelism is not implemented)")
    return sharding


def tensor_bytes(sizes: dict[str, int], n_layers: int) -> tuple[int, list[int], int]:
    """{tensor name: bytes} -> (bytes before the first layer, bytes of each layer, bytes after
    the last). Works on model and official names alike (mtp.* counts after the last layer)."""
    first, last, layers = 0, 0, [0] * n_layers
    for name, n in sizes.items():
        m = _LAYER.match(name)
        if m:
            layers[int(m[1])] += n
        elif name.startswith("embed."):
            first += n
        else:
            last += n
    return first, layers, last


def stage_bytes(first: int, layers: list[int], last: int, plan: list[range]) -> list[int]:
    """Bytes each rank holds under `plan`."""
    return [sum(layers[i] for i in r) + (first if s == 0 else 0) + (last if s == len(plan) - 1 else 0)
            for s, r in enumerate(plan)]


def plan_stages(first: int, layers: list[int], last: int, n: int) -> list[range]:
    """Contiguous layer ranges, one per rank, minimising the largest stage's bytes (the first stage
    also holds `first` bytes, the last `last`). Every stage gets at least one layer. Exact: a DP
    over (stages, layers), tiny for any real model (61 layers, 4 ranks)."""
    L = len(layers)
    if not 1 <= n <= L:
        raise ValueError(f"cannot split {L} layers into {n} pipeline stages: use at most {L} ranks")
    prefix = [0]
    for b in layers:
        prefix.append(prefix[-1] + b)

    def cost(s: int, a: int, b: int) -> int:  # stage s holds layers [a, b)
        return prefix[b] - prefix[a] + (first if s == 0 else 0) + (last if s == n - 1 else 0)

    inf = float("inf")
    best = [[inf] * (L + 1) for _ in range(n + 1)]  # best[s][j]: first s stages hold layers [0, j)
    cut = [[0] * (L + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for s in range(1, n + 1):
        for j in range(s, L - (n - s) + 1):
            for i in range(s - 1, j):
                v = max(best[s - 1][i], cost(s - 1, i, j))
                if v < best[s][j]:
                    best[s][j], cut[s][j] = v, i
    bounds, j = [], L
    for s in range(n, 0, -1):
        bounds.append(range(cut[s][j], j))
        j = cut[s][j]
    return bounds[::-1]


@dataclass
class Stage:
    """This rank's part of a pipeline: its layers, its neighbours, the dtype of the mHC streams
    passed between stages (the embedding's, agreed at load) and the watchdog on its waits."""

    group: object
    layers: range
    stream_dtype: mx.Dtype
    watchdog: Watchdog

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    def owns(self, name: str) -> bool:
        """Whether this rank holds (and so reads) the model tensor `name`."""
        m = _LAYER.match(name)
        if m:
            return int(m[1]) in self.layers
        return self.first if name.startswith("embed.") else self.last

    def receive(self, shape: tuple[int, ...]) -> mx.array:
        """The previous stage's output streams [B, L, hc, d] (lazy: the wait happens at eval)."""
        return mx.distributed.recv(shape, self.stream_dtype, self.rank - 1, group=self.group)

    def finish(self, X: mx.array, logits: mx.array | None, shape: tuple[int, ...] | None, cache: list):
        """End of one pass on this rank: send the streams on (all but the last stage), then, if
        `shape` is given, hand every rank the last stage's logits (an all_sum of them with zeros:
        exact). Evaluated here under the watchdog, the send strictly before the all_sum, which
        could otherwise be scheduled first and deadlock against the next stage's recv."""
        states = [c.state for c in cache]
        with self.watchdog.guard("a pipeline step"):
            if self.last:
                mx.eval(states)
            else:
                mx.eval(mx.distributed.send(X, self.rank + 1, group=self.group), states)
            if shape is None:
                return None
            y = mx.distributed.all_sum(logits if self.last else mx.zeros(shape, mx.float32), group=self.group)
            mx.eval(y)
        return y


def dtype_code(dtype: mx.Dtype) -> int:
    return _DTYPES.index(dtype)


_DTYPES = [mx.float32, mx.bfloat16, mx.float16]


def agree_stream_dtype(group, dtype: mx.Dtype | None) -> mx.Dtype:
    """Rank 0 knows the embedding's output dtype; the others learn it here (one tiny all_sum)."""
    code = mx.array([dtype_code(dtype) if group.rank() == 0 else 0], dtype=mx.int32)
    return _DTYPES[int(mx.distributed.all_sum(code, group=group).item())]


def timeout_from_env() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        t = float(raw)
    except ValueError:
        t = -1.0
    if not t > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return t
