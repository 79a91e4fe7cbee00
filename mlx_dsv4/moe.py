"""Mixture of experts: every layer is MoE (no dense FFN), plus one always-on shared expert.

Router in float32: s = sqrt(softplus(gate . x)). The first `n_hash_layers` layers pick experts by
a fixed token-id table (tid2eid); the others by top-k of s + bias (the bias steers selection only).
Weights are the selected s renormalised, times route_scale. Experts are SwiGLU with the gate
clamped from above and the up projection clamped on both sides (routed and shared alike).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear

from .config import ModelArgs
from .kernels import experts as expert_kernels
from .kernels import moe_router, registry
from .kernels.experts import clamped_swiglu

# Rows (tokens x selected experts) from which the experts sort rows by expert, so MLX's gather_qmm
# reads each expert's weights once for all its rows. Below it both paths read one expert matrix per
# row; there the fused kernels (decode: N k = 6 per token) read the same bytes in 2 launches
# instead of ~10, so they take over exactly where sorting does not pay.
SORT_ROWS = 64


class Gate(nn.Module):
    def __init__(self, args: ModelArgs, hashed: bool):
        super().__init__()
        self.weight = mx.zeros((args.n_routed_experts, args.dim))
        if hashed:
            self.tid2eid = mx.zeros((args.vocab_size, args.n_activated_experts), dtype=mx.int32)
        else:
            self.bias = mx.zeros((args.n_routed_experts,), dtype=mx.float32)
        self.topk, self.route_scale = args.n_activated_experts, args.route_scale

    def __call__(self, x: mx.array, tokens: mx.array) -> tuple[mx.array, mx.array]:
        """x [N, d] (or [..., d]), tokens [N] -> (weights [N, k] float32, expert ids [N, k])."""
        table = dict(tid2eid=self.tid2eid, tokens=tokens) if "tid2eid" in self else dict(bias=self.bias)
        return moe_router.moe_router(x, self.weight, self.topk, self.route_scale, **table)


class Expert(nn.Module):
    """The shared expert: a plain clamped-SwiGLU FFN."""

    def __init__(self, dim: int, inter: int, limit: float):
        super().__init__()
        self.w1 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)
        self.w3 = nn.Linear(dim, inter, bias=False)
        self.limit = limit

    def __call__(self, x: mx.array) -> mx.array:
        return self.w2(clamped_swiglu(self.w1(x), self.w3(x), self.limit).astype(x.dtype))

    def mxfp8(self) -> tuple | None:
        """The (w1, w3, w2) (weight, scales) pairs if all three are in the layout the expert kernels
        read as their shared slot (nn.QuantizedLinear mxfp8, group 32, no bias), else None."""
        layers = (self.w1, self.w3, self.w2)
        if all(_is_mx(m, "mxfp8", 8) and type(m) is nn.QuantizedLinear for m in layers):
            return tuple((m.weight, m.scales) for m in layers)
        return None


@dataclass(frozen=True)
class ExpertWeights:
    """One projection of a stack of experts [n, out, in] as MLX holds it: a dense weight, or a
    quantized (weight, scales, biases) with its MLX format. The resident model's come from its
    SwitchLinear layers; a streamed model's from the expert store, holding only some experts."""

    weight: mx.array
    scales: mx.array | None = None
    biases: mx.array | None = None
    mode: str | None = None
    bits: int | None = None
    group_size: int | None = None

    @classmethod
    def of(cls, layer: nn.Module) -> ExpertWeights:
        if "bias" in layer or getattr(layer, "global_scale", None) is not None:
            raise ValueError("routed experts: biases and global scales are not part of DeepSeek-V4")
        if "scales" not in layer:
            return cls(layer.weight)
        return cls(layer.weight, layer.scales, layer.get("biases"), layer.mode, layer.bits, layer.group_size)

    def is_mx(self, mode: str, bits: int) -> bool:
        """In the layout the expert kernels read (group 32, no biases)."""
        return self.mode == mode and self.group_size == 32 and self.bits == bits and self.biases is None

    def __call__(self, x: mx.array, idx: mx.array, sorted_indices: bool) -> mx.array:
        """x @ W_idx^T for the selected experts (what mlx-lm's SwitchLinear / QuantizedSwitchLinear do)."""
        if self.scales is not None:
            return mx.gather_qmm(x, self.weight, self.scales, self.biases, rhs_indices=idx, transpose=True,
                                 group_size=self.group_size, bits=self.bits, mode=self.mode,
                                 sorted_indices=sorted_indices)
        w = self.weight
        if w.dtype != mx.float32 and mx.default_device() == mx.cpu:
            # MLX's CPU gather_mm is float32-only; dense low-precision experts only occur on CPU in tests
            return mx.gather_mm(x.astype(mx.float32), mx.swapaxes(w.astype(mx.float32), -1, -2), rhs_indices=idx,
                                sorted_indices=sorted_indices).astype(x.dtype)
        return mx.gather_mm(x, mx.swapaxes(w, -1, -2), rhs_indices=idx, sorted_indices=sorted_indices)


def _by_expert(xe: mx.array, ids: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """xe [N, 1, 1, d], ids [N, k] -> one row per selection, ordered by expert ([N k, 1, d]), their expert
    ids in that order [N k], and the permutation that restores the selection order."""
    flat = ids.reshape(-1)
    order = mx.argsort(flat)
    return xe.reshape(-1, *xe.shape[-2:])[order // ids.shape[-1]], flat[order], mx.argsort(order)


def _is_mx(layer: nn.Module, mode: str, bits: int) -> bool:
    """A quantized layer in the layout the expert kernels read (group 32, no biases of any kind)."""
    return (getattr(layer, "mode", None) == mode and layer.group_size == 32 and layer.bits == bits
            and getattr(layer, "biases", None) is None and getattr(layer, "global_scale", None) is None
            and "bias" not in layer)


class RoutedExperts(nn.Module):
    """All routed experts stacked: w1/w3 [E, inter, d], w2 [E, d, inter] (dense or quantized).

    streamed=True: the module holds no weights; each call gets the selected experts' (w1, w3, w2)
    from the expert store (`stacks`), with ids renumbered into those stacks."""

    def __init__(self, dim: int, inter: int, n_experts: int, limit: float, streamed: bool = False):
        super().__init__()
        if not streamed:
            self.w1 = SwitchLinear(dim, inter, n_experts, bias=False)
            self.w2 = SwitchLinear(inter, dim, n_experts, bias=False)
            self.w3 = SwitchLinear(dim, inter, n_experts, bias=False)
        self.limit = limit

    @property
    def streamed(self) -> bool:
        return "w1" not in self

    def stacks(self) -> tuple[ExpertWeights, ExpertWeights, ExpertWeights]:
        if self.streamed:
            raise ValueError("routed experts are streamed: the call needs the expert store's stacks")
        return tuple(ExpertWeights.of(m) for m in (self.w1, self.w3, self.w2))

    def takes_kernels(self, ids: mx.array, stacks=None) -> bool:
        """Decode-sized routing (no sorting) on mxfp4 weights with the kernels available."""
        if ids.size >= SORT_ROWS or not registry.use_kernels():
            return False
        return all(w.is_mx("mxfp4", 4) for w in (stacks or self.stacks()))

    def __call__(self, x: mx.array, ids: mx.array, weights: mx.array, shared=None, stacks=None,
                 sort: bool | None = None, dtype: mx.Dtype = mx.float32) -> mx.array:
        """x [N, d], ids/weights [N, k] -> sum_e w_e * expert_e(x) [N, d] in float32; with shared (the
        shared expert's Expert.mxfp8() pairs, kernel path only) + the shared expert's output. On the kernel
        path x may have any leading axes (y has x's) and y comes in `dtype` (the float32 sum rounded once).
        stacks: the (w1, w3, w2) ExpertWeights that ids index (default: this module's). sort: group rows
        by expert (default: ids.size >= SORT_ROWS; a streamed call split into parts passes the whole's)."""
        w1, w3, w2 = stacks = stacks or self.stacks()
        do_sort = ids.size >= SORT_ROWS if sort is None else sort
        kernels = not do_sort and self.takes_kernels(ids, stacks)
        if shared is not None and not kernels:
            raise ValueError("routed experts: shared is fused only on the kernel path (see takes_kernels)")
        if kernels:
            pairs = ((w.weight, w.scales) for w in stacks)
            return expert_kernels.routed_experts(x, ids, weights, *pairs, self.limit, shared, dtype)
        xe = mx.expand_dims(x, (-2, -3))  # [N, 1, 1, d]
        idx, inv, wts = ids, None, weights
        if do_sort:  # group rows by expert so each expert's weights are read once
            xe, idx, inv = _by_expert(xe, ids)
            wts = weights.flatten()[mx.argsort(ids.flatten())][:, None, None]
        else:
            wts = weights[..., None, None]
        h = clamped_swiglu(w1(xe, idx, do_sort), w3(xe, idx, do_sort), self.limit)
        h = (h * wts).astype(x.dtype)  # the reference scales before w2
        y = w2(h, idx, do_sort).astype(mx.float32)
        if do_sort:
            y = y[inv].reshape(*ids.shape, *y.shape[1:])  # back to [N, k, 1, d], row order
        return y.squeeze(-2).sum(axis=-2)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, hashed: bool, streamed: bool = False, shard=None):
        """shard (distributed.TensorShard): hold only its routed experts and its rows of the shared
        expert (possibly none); the gate stays whole so every rank routes alike."""
        super().__init__()
        self.shard = shard
        self.gate = Gate(args, hashed)
        n_experts = args.n_routed_experts if shard is None else len(shard.experts)
        self.experts = RoutedExperts(args.dim, args.moe_inter_dim, n_experts, args.swiglu_limit, streamed)
        inter = args.moe_inter_dim if shard is None else len(shard.shared)
        if inter:
            self.shared_experts = Expert(args.dim, inter, args.swiglu_limit)

    def __call__(self, x: mx.array, tokens: mx.array, experts=None) -> mx.array:
        """experts: this layer's view of the expert store (expert_store.LayerExperts) when the routed
        experts are streamed from disk; None when they are resident."""
        shape = x.shape
        w, ids = self.gate(x, tokens.reshape(-1))
        if self.shard is None and experts is None and self.experts.takes_kernels(ids) and (
                shared := self.shared_experts.mxfp8()) is not None:
            # decode on a converted checkpoint: routed + shared in two kernels, which take x and give y as the
            # stream takes it (x's shape and dtype: no reshape or cast node in a compiled step)
            return self.experts(x, ids, w, shared, dtype=x.dtype)
        flat = x.reshape(-1, shape[-1])
        if self.shard is not None:
            y = self._partial(flat, w, ids)
        elif experts is not None:
            y = self._streamed(flat, w, ids, experts)
        else:
            y = self.experts(flat, ids, w) + self.shared_experts(flat).astype(mx.float32)
        return y.astype(x.dtype).reshape(shape)  # back to the model dtype: fp32 must not leak

    def _partial(self, flat: mx.array, w: mx.array, ids: mx.array) -> mx.array:
        """Tensor mode: this rank's experts' terms (the others' selections run on local expert 0 with
        weight 0, which the reference's scaling before w2 turns into exact zeros) plus its slice of the
        shared expert, summed over ranks in one all_sum (float32, as the single-process sum). The zeroed
        rows still run: a decode step reads at most one extra expert, but a prefill computes every row
        (dropping them needs a data-dependent shape, i.e. a sync per layer)."""
        own = self.shard.experts
        mine = (ids >= own.start) & (ids < own.stop)
        y = self.experts(flat, mx.where(mine, ids - own.start, 0), mx.where(mine, w, 0.0))
        if "shared_experts" in self:
            y = y + self.shared_experts(flat).astype(mx.float32)
        return self.shard.all_sum(y)

    def _streamed(self, flat: mx.array, w: mx.array, ids: mx.array, experts) -> mx.array:
        """The same computation on the store's stacks. The store may split the rows into parts whose
        experts fit its budget; each part is evaluated before the next load overwrites its slots, and
        every part takes the path (sorted or not, kernels or not) the whole call would take."""
        sort = ids.size >= SORT_ROWS
        parts, outs = experts.select(ids), []
        fused = None
        for (r0, r1), local, stacks in parts:
            if fused is None:
                fused = not sort and self.experts.takes_kernels(local, stacks) and self.shared_experts.mxfp8()
            shared = fused or None
            outs.append(self.experts(flat[r0:r1], local, w[r0:r1], shared, stacks, sort))
            if r1 < flat.shape[0]:
                mx.eval(outs[-1])
        y = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
        return y if fused else y + self.shared_experts(flat).astype(mx.float32)
