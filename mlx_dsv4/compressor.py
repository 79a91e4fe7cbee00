"""Compressor: gated pooling of every `ratio` tokens into one KV entry (paper's C^Comp).

Per token p (float32): a_p = wkv x_p, g_p = wgate x_p + ape[p mod ratio]. Entry j is a
per-feature softmax(g)-weighted sum of a over its window. With ratio 4 windows overlap:
entry j pools 8 slots, the previous window's tokens with the first half of the features and
window j's tokens with the second half (before the first window: a = 0, g = -inf).
Post-processing: RMSNorm, RoPE at position j * ratio (the window's first token), and the
trained-format rounding (FP8 for the main KV, Hadamard + FP4 for the indexer keys).

The official wkv and wgate are held as one projection, wkv_gate (rows wkv then wgate; load.py fuses them):
one matmul and, in a compiled decode step, one ring write per compressor and token instead of two.

Rows wait for their window without ape, added when the window is pooled (the same fp32 sums, so the same
entries): a decode step that completes no window does nothing with ape (on Metal: two launches less per
compressor and token).

State across calls (in the cache, see CompressorState): the rows of the unfinished window and,
for the overlap, the first half of the last complete window.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cache import CompressorState
from .kernels.compressor_pool import compressor_pool
from .kernels.rows_finish import rows_finish, rows_finish_reference
from .norm import RMSNorm
from .rope import cos_sin


class Compressor(nn.Module):
    def __init__(self, dim: int, out_dim: int, ratio: int, norm_eps: float):
        super().__init__()
        self.ratio, self.out_dim = ratio, out_dim
        self.overlap = ratio == 4
        coff = 2 if self.overlap else 1
        self.wkv_gate = nn.Linear(dim, 2 * coff * out_dim, bias=False)
        self.ape = mx.zeros((ratio, coff * out_dim), dtype=mx.float32)
        self.norm = RMSNorm(out_dim, norm_eps)

    def project(self, x: mx.array) -> mx.array:
        """[a | g] = [wkv x | wgate x] (float32, g before ape) for x [B, L, dim]: [B, L, 2 coff D]."""
        # fp32 x fp32-promoted weights: the reference runs these projections in float32.
        return self.wkv_gate(x.astype(mx.float32)).astype(mx.float32)

    def split(self, ag: mx.array) -> tuple[mx.array, mx.array]:
        """[a | g] -> (a, g)."""
        n = ag.shape[-1] // 2
        return ag[..., :n], ag[..., n:]

    def gated(self, wg: mx.array, prev_g: mx.array | None = None) -> tuple[mx.array, mx.array | None]:
        """Windows of g rows [..., ratio, coff*D] (and the overlap's previous window [..., ratio, D]) with
        ape added: window rows sit at positions j * ratio + t, so row t takes ape[t]."""
        ape = self.ape.astype(mx.float32)
        return wg + ape, None if prev_g is None else prev_g + ape[:, : prev_g.shape[-1]]

    def pool(self, x: mx.array, start: int, state: CompressorState) -> tuple[mx.array, int]:
        """Pool the windows completed by x [B, L, dim] (first token at absolute position `start`).

        Returns (entries [B, n, out_dim] float32 before post-processing, index of the first one)
        and updates `state` in place.
        """
        windows, first = self.take_windows(*self.split(self.project(x)), start, state)
        if windows is None:
            return mx.zeros((x.shape[0], 0, self.out_dim), dtype=mx.float32), first
        wa, wg, prev_a, prev_g = windows
        wg, prev_g = self.gated(wg, prev_g)
        return compressor_pool(wa, wg, prev_a, prev_g, self.overlap), first

    def take_windows(self, a: mx.array, g: mx.array, start: int, state: CompressorState):
        """The stateful half of `pool`: feed the projected rows a, g [B, L, coff*D] to `state`. Returns
        ((wa, wg, prev_a, prev_g): the completed windows [B, n, m, coff*D] and the overlap's previous
        window, compressor_pool's arguments once `gated`; None if no window completes) and the first's index."""
        m, D = self.ratio, self.out_dim
        B, L, _ = a.shape
        state.recent = (a, g)
        pending = state.pending
        first = (start - pending) // m
        if pending + L < m:  # no window completes: keep the rows for later, copy nothing
            state.add(a, g)
            return None, first
        a, g = state.joined(a, g)
        n = a.shape[1] // m
        state.rows_kv, state.rows_gate = (a[:, n * m :], g[:, n * m :]) if a.shape[1] > n * m else (None, None)
        wa = a[:, : n * m].reshape(B, n, m, -1)
        wg = g[:, : n * m].reshape(B, n, m, -1)
        prev = (None, None)
        if self.overlap:
            prev = (state.prev_kv, state.prev_gate)
            state.prev_kv, state.prev_gate = wa[:, -1, :, :D], wg[:, -1, :, :D]
        return (wa, wg, *prev), first

    def pool_rows(self, x: mx.array, starts: list[int], states: list[CompressorState]):
        """`pool` for rows each at its own position (batch.py: x [B, 1, dim], row i at starts[i] with
        states[i]): the projections run over all rows at once and the windows completed this step are
        pooled together. Returns (entries [Bc, 1, out_dim] float32 or None, [(row, entry index)] of the
        Bc rows that completed one)."""
        B, L, _ = x.shape
        if L != 1 or len(starts) != B or len(states) != B:
            raise ValueError(f"pool_rows: one token per row and one start / state per row, got x {x.shape}, "
                             f"{len(starts)} starts, {len(states)} states")
        a, g = self.split(self.project(x))
        done, wins = [], []
        for i, (ai, gi) in enumerate(zip(mx.split(a, B), mx.split(g, B))):
            w, first = self.take_windows(ai, gi, starts[i], states[i])
            if w is not None:
                done.append((i, first))
                wins.append(w)
        if not done:
            return None, []
        if self.overlap:  # before the first window the previous one is a = 0, g = -inf (compressor_pool's own)
            D, m = self.out_dim, self.ratio
            wins = [w if w[2] is not None else (*w[:2], mx.zeros((1, m, D), mx.float32),
                                                mx.full((1, m, D), -mx.inf, mx.float32)) for w in wins]
        cols = list(zip(*wins))[: 4 if self.overlap else 2]
        wa, wg, *prev = [mx.concatenate(p, axis=0) if len(p) > 1 else p[0] for p in cols]
        prev_a, prev_g = prev or (None, None)
        wg, prev_g = self.gated(wg, prev_g)
        return compressor_pool(wa, wg, prev_a, prev_g, self.overlap), done

    def pool_ring(self, x: mx.array, pos: mx.array, ring: mx.array, ends: bool):
        """One token x [B, 1, dim] at position `pos` (an array) into the ring [a | g] of the last window's rows
        (two windows with the overlap; ring_cache.py) and, where it ends its window (`ends`, known when the step is
        traced), the window's pooling. Returns (entry [B, 1, out_dim] float32 before post-processing, or None;
        the ring)."""
        size = ring.shape[1]
        ring = mx.slice_update(ring, self.project(x), (pos % size).reshape(1), axes=(1,))
        if not ends:
            return None, ring
        ra, rg = self.split(ring)
        # slot s holds a position p with p % ratio == s % ratio: the ring's rows take ape in slot order
        g = self.gated(rg.reshape(rg.shape[0], size // self.ratio, self.ratio, -1))[0].reshape(rg.shape)
        if not self.overlap:  # the ring is the window
            return compressor_pool(ra, g, None, None, False), ring
        # window j in one half of the ring, window j - 1 in the other (before the first window the ring holds
        # a = 0, g = -inf there: ring_cache.py, and -inf + ape stays -inf); the kernel reads them in place
        return compressor_pool(ra, g, None, None, True, pos), ring

    def __call__(self, x, start, state, freqs, dtype, fp8_nope: int) -> mx.array:
        """Pooled, normalised, rotated (RoPE at the window's first position j * ratio) entries
        [B, n, out_dim] in `dtype`, FP8-rounded on the first fp8_nope channels (0: none). The indexer's
        compressor finishes its keys differently (Hadamard + FP4): it calls `pool` itself."""
        c, first = self.pool(x, start, state)
        if c.shape[1] == 0:
            return c.astype(dtype)
        return rows_finish(c, freqs, first * self.ratio, self.ratio, norm=True, weight=self.norm.weight,
                           eps=self.norm.eps, fp8_nope=fp8_nope, dtype=dtype)

    def call_rows(self, x, starts, states, freqs, dtype, fp8_nope: int):
        """__call__ for rows each at its own position (pool_rows): (entries [Bc, 1, out_dim] or None,
        [(row, entry index)]), each entry rotated at its own window's first position (the reference's
        per-row angle table: the kernel takes one scalar position)."""
        c, done = self.pool_rows(x, starts, states)
        if c is None:
            return None, done
        cs = cos_sin(mx.array([j * self.ratio for _, j in done])[:, None], freqs)
        return rows_finish_reference(c, freqs, 0, self.ratio, norm=True, weight=self.norm.weight, eps=self.norm.eps,
                                     fp8_nope=fp8_nope, dtype=dtype, cs=cs), done
