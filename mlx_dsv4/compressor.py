"""Compressor: gated pooling of every `ratio` tokens into one KV entry (paper's C^Comp).

Per token p (float32): a_p = wkv x_p, g_p = wgate x_p + ape[p mod ratio]. Entry j is a
per-feature softmax(g)-weighted sum of a over its window. With ratio 4 windows overlap:
entry j pools 8 slots, the previous window's tokens with the first half of the features and
window j's tokens with the second half (before the first window: a = 0, g = -inf).
Post-processing: RMSNorm, RoPE at position j * ratio (the window's first token), and the
trained-format rounding (FP8 for the main KV, Hadamard + FP4 for the indexer keys).

State across calls (in the cache, see CompressorState): the rows of the unfinished window and,
for the overlap, the first half of the last complete window.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cache import CompressorState
from .kernels.compressor_pool import compressor_pool
from .kernels.rows_finish import rows_finish
from .norm import RMSNorm


class Compressor(nn.Module):
    def __init__(self, dim: int, out_dim: int, ratio: int, norm_eps: float):
        super().__init__()
        self.ratio, self.out_dim = ratio, out_dim
        self.overlap = ratio == 4
        coff = 2 if self.overlap else 1
        self.wkv = nn.Linear(dim, coff * out_dim, bias=False)
        self.wgate = nn.Linear(dim, coff * out_dim, bias=False)
        self.ape = mx.zeros((ratio, coff * out_dim), dtype=mx.float32)
        self.norm = RMSNorm(out_dim, norm_eps)

    def pool(self, x: mx.array, start: int, state: CompressorState) -> tuple[mx.array, int]:
        """Pool the windows completed by x [B, L, dim] (first token at absolute position `start`).

        Returns (entries [B, n, out_dim] float32 before post-processing, index of the first one)
        and updates `state` in place.
        """
        m, D = self.ratio, self.out_dim
        B, L, _ = x.shape
        xf = x.astype(mx.float32)
        # fp32 x fp32-promoted weights: the reference runs these projections in float32.
        a = self.wkv(xf).astype(mx.float32)
        g = self.wgate(xf).astype(mx.float32)
        ape = self.ape.astype(mx.float32)
        o = start % m
        # Positions start.. in one window: a static slice of ape (a view); else gather by position.
        g = g + (ape[o : o + L] if o + L <= m else ape[(mx.arange(start, start + L) % m).astype(mx.int32)])
        state.recent = (a, g)
        pending = state.pending
        first = (start - pending) // m
        if pending + L < m:  # no window completes: keep the rows for later, copy nothing
            state.add(a, g)
            return mx.zeros((B, 0, D), dtype=mx.float32), first
        a, g = state.joined(a, g)
        n = a.shape[1] // m
        state.rows_kv, state.rows_gate = (a[:, n * m :], g[:, n * m :]) if a.shape[1] > n * m else (None, None)
        wa = a[:, : n * m].reshape(B, n, m, -1)
        wg = g[:, : n * m].reshape(B, n, m, -1)
        prev = (None, None)
        if self.overlap:
            prev = (state.prev_kv, state.prev_gate)
            state.prev_kv, state.prev_gate = wa[:, -1, :, :D], wg[:, -1, :, :D]
        return compressor_pool(wa, wg, *prev, self.overlap), first

    def __call__(self, x, start, state, freqs, dtype, fp8_nope: int) -> mx.array:
        """Pooled, normalised, rotated (RoPE at the window's first position j * ratio) entries
        [B, n, out_dim] in `dtype`, FP8-rounded on the first fp8_nope channels (0: none). The indexer's
        compressor finishes its keys differently (Hadamard + FP4): it calls `pool` itself."""
        c, first = self.pool(x, start, state)
        if c.shape[1] == 0:
            return c.astype(dtype)
        return rows_finish(c, freqs, first * self.ratio, self.ratio, norm=True, weight=self.norm.weight,
                           eps=self.norm.eps, fp8_nope=fp8_nope, dtype=dtype)
