"""Mixture of experts: every layer is MoE (no dense FFN), plus one always-on shared expert.

Router in float32: s = sqrt(softplus(gate . x)). The first `n_hash_layers` layers pick experts by
a fixed token-id table (tid2eid); the others by top-k of s + bias (the bias steers selection only).
Weights are the selected s renormalised, times route_scale. Experts are SwiGLU with the gate
clamped from above and the up projection clamped on both sides (routed and shared alike).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear, _gather_sort, _scatter_unsort

from .config import ModelArgs
from .kernels import experts as expert_kernels
from .kernels import registry, router
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
        """x [N, d], tokens [N] -> (weights [N, k] float32, expert ids [N, k])."""
        table = dict(tid2eid=self.tid2eid, tokens=tokens) if "tid2eid" in self else dict(bias=self.bias)
        return router.route(x, self.weight, self.topk, self.route_scale, **table)


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


def _expert_mm(layer: nn.Module, x: mx.array, idx: mx.array, sorted_indices: bool) -> mx.array:
    """One stacked projection for the selected experts (dense or quantized, via mlx-lm's layers)."""
    if "scales" not in layer and layer.weight.dtype != mx.float32 and mx.default_device() == mx.cpu:
        # MLX's CPU gather_mm is float32-only; dense low-precision experts only occur on CPU in tests
        w = layer.weight.astype(mx.float32)
        return mx.gather_mm(x.astype(mx.float32), mx.swapaxes(w, -1, -2), rhs_indices=idx,
                            sorted_indices=sorted_indices).astype(x.dtype)
    return layer(x, idx, sorted_indices=sorted_indices)


def _is_mx(layer: nn.Module, mode: str, bits: int) -> bool:
    """A quantized layer in the layout the expert kernels read (group 32, no biases of any kind)."""
    return (getattr(layer, "mode", None) == mode and layer.group_size == 32 and layer.bits == bits
            and getattr(layer, "biases", None) is None and getattr(layer, "global_scale", None) is None
            and "bias" not in layer)


def _is_mxfp4(layer: nn.Module) -> bool:
    """mlx-lm's QuantizedSwitchLinear in the layout the expert kernels read (no biases of any kind)."""
    return _is_mx(layer, "mxfp4", 4)


class RoutedExperts(nn.Module):
    """All routed experts stacked: w1/w3 [E, inter, d], w2 [E, d, inter] (dense or quantized)."""

    def __init__(self, dim: int, inter: int, n_experts: int, limit: float):
        super().__init__()
        self.w1 = SwitchLinear(dim, inter, n_experts, bias=False)
        self.w2 = SwitchLinear(inter, dim, n_experts, bias=False)
        self.w3 = SwitchLinear(dim, inter, n_experts, bias=False)
        self.limit = limit

    def takes_kernels(self, ids: mx.array) -> bool:
        """Decode-sized routing (no sorting) on mxfp4 weights with the kernels available."""
        layers = (self.w1, self.w3, self.w2)
        return ids.size < SORT_ROWS and registry.use_kernels() and all(_is_mxfp4(m) for m in layers)

    def __call__(self, x: mx.array, ids: mx.array, weights: mx.array, shared=None) -> mx.array:
        """x [N, d], ids/weights [N, k] -> sum_e w_e * expert_e(x) [N, d] in float32; with shared (the
        shared expert's Expert.mxfp8() pairs, kernel path only) + the shared expert's output."""
        kernels = self.takes_kernels(ids)
        if shared is not None and not kernels:
            raise ValueError("routed experts: shared is fused only on the kernel path (see takes_kernels)")
        if kernels:
            w1, w3, w2 = ((m.weight, m.scales) for m in (self.w1, self.w3, self.w2))
            return expert_kernels.routed_experts(x, ids, weights, w1, w3, w2, self.limit, shared)
        xe = mx.expand_dims(x, (-2, -3))  # [N, 1, 1, d]
        do_sort = ids.size >= SORT_ROWS  # group rows by expert so each expert's weights are read once
        idx, inv, wts = ids, None, weights
        if do_sort:
            xe, idx, inv = _gather_sort(xe, ids)
            wts = weights.flatten()[mx.argsort(ids.flatten())][:, None, None]
        else:
            wts = weights[..., None, None]
        h = clamped_swiglu(_expert_mm(self.w1, xe, idx, do_sort), _expert_mm(self.w3, xe, idx, do_sort), self.limit)
        h = (h * wts).astype(x.dtype)  # the reference scales before w2
        y = _expert_mm(self.w2, h, idx, do_sort).astype(mx.float32)
        if do_sort:
            y = _scatter_unsort(y, inv, ids.shape)
        return y.squeeze(-2).sum(axis=-2)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, hashed: bool):
        super().__init__()
        self.gate = Gate(args, hashed)
        self.experts = RoutedExperts(args.dim, args.moe_inter_dim, args.n_routed_experts, args.swiglu_limit)
        self.shared_experts = Expert(args.dim, args.moe_inter_dim, args.swiglu_limit)

    def __call__(self, x: mx.array, tokens: mx.array) -> mx.array:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        w, ids = self.gate(flat, tokens.reshape(-1))
        shared = self.shared_experts.mxfp8() if self.experts.takes_kernels(ids) else None
        if shared is not None:  # decode on a converted checkpoint: routed + shared in the two kernels
            y = self.experts(flat, ids, w, shared)
        else:
            y = self.experts(flat, ids, w) + self.shared_experts(flat).astype(mx.float32)
        return y.astype(x.dtype).reshape(shape)  # back to the model dtype: fp32 must not leak
