"""Splitting V4 across Macs with mx.distributed: the world group, the two ways to split a model
and which checkpoint tensors (or slices of them) a rank reads.

Pipeline mode: rank r holds a contiguous run of layers. Stages are balanced by the bytes they hold,
with the embedding on the first rank and everything after the last layer (hc_head, norm, head,
MTP) on the last, so each rank reads and keeps about 1/N of the checkpoint. The transport between
stages is MLX's own (send / recv / all_sum on the group mlx.launch set up): see Stage.

Tensor mode (TensorShard): every rank runs every layer on its slice of the weights, and two
all_sums per layer rebuild the full output (one after the attention, one after the MoE).
- Attention is split by output group: V4's wo_a is block-diagonal over o_groups groups of heads,
  then wo_b is dense, so sum over ranks of wo_b[:, my groups] . wo_a[my groups] . o[my heads] is
  the full output. A rank holds its groups' query heads (wq_b rows, attn_sink entries), their wo_a
  groups ([G, R, in] in the model: the first axis) and the matching input columns of wo_b.
- Replicated in the attention: wkv, kv_norm, the Compressor and the Indexer. V4 has one K = V head
  (MQA) that all heads read, and the indexer's top-k picks the compressed entries every head sees,
  so every rank needs the full KV cache and the same selection: splitting them would cost one
  all_gather per layer for tensors smaller than the all_sum's. wq_a / q_norm (the query's low-rank
  input, shared by all heads and by the indexer) are replicated too.
- Routed experts: a rank holds a contiguous run of ~E/N experts. The gate (weights, bias, hash
  table) is replicated, so every rank routes every token identically and computes only its own
  experts' terms (the others' weights are zeroed). The shared expert is split along its
  intermediate dimension (w1 / w3 rows, w2 columns): a SwiGLU is a sum over its intermediate
  units, so the slices add up exactly. The shared and routed partials meet in one all_sum.
- Embedding, mHC, norms, hc_head and head are replicated (the head is one matrix read per token;
  sharding the vocabulary would add an all_gather of the logits to save 1.9 GB per Mac on Pro).
  Every rank computes the same logits and keeps the full LayerCache (the KV is replicated).
- Uneven splits: groups, experts and shared-expert units go to ranks in contiguous runs as even as
  possible (the first ranks take one more). Every rank must hold at least one output group and one
  expert (so at most o_groups ranks: 8 for Flash, 16 for Pro); the shared expert is cut at the
  quantization group size of its w2 (packed inputs cannot be split inside a group), and a rank may
  hold none of it.
- The slicing happens once, at load (TensorShard.select), and the modules stay plain Linear /
  SwitchLinear of the local shapes: mlx.nn's AllToShardedLinear / ShardedToAllLinear split one
  Linear evenly and all_sum it alone, while here the splits follow output groups (uneven), cut
  packed weights on quantization-group boundaries and share one all_sum between two modules.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import mlx.core as mx

from .watchdog import Watchdog, on_termination

SHARDINGS = ("pipeline", "tensor")
_LAYER = re.compile(r"^layers\.(\d+)\.")
# tensors tensor mode splits: (attention projection | routed / shared expert projection)
_SPLIT = re.compile(r"^(?:layers|mtp)\.\d+\."
                    r"(?:attn\.(wq_b|wo_a|wo_b|attn_sink)|ffn\.(experts|shared_experts)\.(w[123]))(?:\.|$)")
_OFFICIAL_EXPERT = re.compile(r"\.ffn\.experts\.(\d+)\.")  # one routed expert's tensor
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
        raise ValueError(f"unknown sharding {sharding!r}: choose pipeline (contiguous layer stages) or tensor "
                         "(heads and experts split inside every layer)")
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


class OnGroup:
    """This process's place in the group mlx.launch set up."""

    group: object

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()


@dataclass
class Stage(OnGroup):
    """This rank's part of a pipeline: its layers, its neighbours, the dtype of the mHC streams
    passed between stages (the embedding's, agreed at load) and the watchdog on its waits."""

    group: object
    layers: range
    stream_dtype: mx.Dtype
    watchdog: Watchdog

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


def even_split(total: int, n: int, r: int) -> range:
    """Rank r's contiguous run of `total` units split n ways as evenly as possible (first ranks +1)."""
    q, m = divmod(total, n)
    start = r * q + min(r, m)
    return range(start, start + q + (r < m))


@dataclass
class TensorShard(OnGroup):
    """This rank's slice of every layer in tensor mode (see the module docstring): its output groups,
    its routed experts and its rows of the shared expert's intermediate dimension. `calls` / `sent`
    count the all_sums issued and their bytes (per rank), for the benchmark."""

    group: object
    args: object  # config.ModelArgs
    o_groups: range
    experts: range
    shared: range
    watchdog: Watchdog
    calls: int = 0
    sent: int = 0

    def all_sum(self, x: mx.array) -> mx.array:
        self.calls += 1
        self.sent += x.nbytes
        return mx.distributed.all_sum(x, group=self.group)

    def part(self, name: str) -> tuple[int, range, int] | None:
        """(axis, this rank's range, total units along it) of a split tensor; None: replicated."""
        m = _SPLIT.match(name)
        if m is None:
            return None
        a = self.args
        if m[1]:
            return (-1 if m[1] == "wo_b" else 0), self.o_groups, a.o_groups
        if m[2] == "experts":
            return 0, self.experts, a.n_routed_experts
        return (-1 if m[3] == "w2" else 0), self.shared, a.moe_inter_dim

    def select(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """{model name: full tensor} -> this rank's tensors: split ones sliced (a gather, so the full
        tensor is not kept alive), replicated ones as they are. Stacked routed experts may arrive
        already cut to this rank's experts (the loaders stack only those)."""
        out = {}
        for name, w in weights.items():
            p = self.part(name)
            if p is None:
                out[name] = w
                continue
            axis, own, total = p
            n = w.shape[axis]
            if not own:
                continue  # e.g. no unit of the shared expert on this rank
            if own is self.experts and n == len(own) < total:  # stacked for this rank's experts only
                out[name] = w
                continue
            if (n * own.start) % total or (n * own.stop) % total:
                raise ValueError(f"{name}: cannot cut {n} entries along axis {axis} into {total} parts at "
                                 f"[{own.start}, {own.stop}) (quantization groups would be split)")
            out[name] = mx.take(w, mx.arange(n * own.start // total, n * own.stop // total), axis=axis)
        return out


def tensor_experts(group, args) -> range:
    """The routed experts this rank holds in tensor mode (the loaders read only these)."""
    n = group.size()
    if n > min(args.o_groups, args.n_routed_experts):
        raise ValueError(f"tensor sharding needs an output group and a routed expert per rank: this model has "
                         f"{args.o_groups} groups and {args.n_routed_experts} experts, not enough for {n} ranks "
                         "(use fewer ranks or --sharding pipeline)")
    return even_split(args.n_routed_experts, n, group.rank())


def shard_bytes(sizes: dict[str, int], shard: TensorShard) -> int:
    """Bytes of a checkpoint {tensor name: bytes} (model or official names) that `shard`'s rank holds."""
    held = 0
    for name, n in sizes.items():
        e = _OFFICIAL_EXPERT.search(name)
        if e:
            held += n if int(e[1]) in shard.experts else 0
        elif (p := shard.part(name)) is not None:
            held += n * p[1].stop // p[2] - n * p[1].start // p[2]  # sums to n exactly over the ranks
        else:
            held += n
    return held


def plan_tensor(group, args, quantization: dict | None, timeout: float) -> TensorShard:
    """This rank's TensorShard. The shared expert is cut in units of its w2's quantization group size."""
    n, r = group.size(), group.rank()
    own_experts = tensor_experts(group, args)
    unit = max([q.get("group_size", 1) for k, q in (quantization or {}).items()
                if isinstance(q, dict) and k.endswith("shared_experts.w2")] or [1])
    if args.moe_inter_dim % unit:
        raise ValueError(f"the shared expert's {args.moe_inter_dim} units do not split into groups of {unit}")
    sh = even_split(args.moe_inter_dim // unit, n, r)
    return TensorShard(group, args, even_split(args.o_groups, n, r), own_experts,
                       range(sh.start * unit, sh.stop * unit), Watchdog(r, timeout))


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
