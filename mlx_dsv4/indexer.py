"""Lightning Indexer (CSA layers): picks, per query, the top-k compressed entries to attend to.

score(t, j) = sum_h w_h(t) * ReLU(q_h(t) . k_j), with k_j from the indexer's own ratio-4
Compressor (width index_head_dim) and w = weights_proj(x) / sqrt(index_head_dim * index_n_heads).
Entries not yet complete for query t (j >= (t+1) // 4) are masked *before* the top-k, so early
queries never waste slots on invisible entries; selected slots that are still invisible
(fewer than k visible entries) come back as -1.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .compressor import Compressor
from .kernels.index_finish import index_finish
from .kernels.indexer_topk import top_k_visible
from .kernels.indexer_score import indexer_score, scoring_keys
from .kvstore import Rows
from .rope import cos_sin

_SCORE_BUDGET = 1 << 20  # elements of the [Lb, H, Nb] score block kept live at once


def index_scores(q: mx.array, k, w: mx.array, start: int, ratio: int) -> mx.array:
    """q [B, L, H, Dk], k [B, N, Dk] or a key store, w [B, L, H] -> causal scores [B, L, N] (float32, -inf masked).

    One Metal kernel on a Mac, the pure-MLX reference elsewhere (kernels/indexer_score.py)."""
    return indexer_score(q, k, w, start, ratio)


def select(q: mx.array, k, w: mx.array, start: int, ratio: int, topk: int) -> mx.array:
    """Score and select per query block, so neither [L, H, N] nor [L, N] is ever materialised whole.
    k: [B, N, Dk] or the key store (kvstore.Rows), which the kernel reads in place where it can."""
    B, L, H, _ = q.shape
    k = scoring_keys(q, k)
    step = max(1, min(L, _SCORE_BUDGET // max(1, B * H * (k.n if isinstance(k, Rows) else k.shape[1]))))
    ids = []
    for s in range(0, L, step):
        sc = index_scores(q[:, s : s + step], k, w[:, s : s + step], start + s, ratio)
        ids.append(top_k_visible(sc, topk, start + s, ratio))
    return ids[0] if len(ids) == 1 else mx.concatenate(ids, axis=1)


class Indexer(nn.Module):
    def __init__(self, dim: int, q_lora_rank: int, n_heads: int, head_dim: int, ratio: int, norm_eps: float):
        super().__init__()
        self.n_heads, self.head_dim, self.ratio = n_heads, head_dim, ratio
        self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.weights_proj = nn.Linear(dim, n_heads, bias=False)
        self.compressor = Compressor(dim, head_dim, ratio, norm_eps)
        self.weight_scale = (head_dim * n_heads) ** -0.5

    def __call__(self, x, qr, start, cache, freqs, simulate: bool, topk: int) -> mx.array | None:
        """Update the indexer keys in `cache` and return top-k ids [B, L, k], or None when the top-k
        would hold every complete entry (none yet, or at most k): the selection is then exactly the
        causal set, and neither its scores nor its gathers are built.

        q and the keys are finished alike: RoPE, then (simulate) the Hadamard + FP4 trained format;
        the keys first pass the compressor's norm, with RoPE at their window's first position."""
        B, L, _ = x.shape
        comp = self.compressor
        c, first = comp.pool(x, start, cache.index_state)
        if c.shape[1]:
            cache.push_index_keys(index_finish(c.astype(x.dtype), freqs, first * comp.ratio, comp.ratio, simulate,
                                               comp.norm.weight, comp.norm.eps))
        K = cache.index_store  # the kernel reads it in place; otherwise select decodes it once
        if K.n <= topk:
            return None
        q = index_finish(self.wq_b(qr).reshape(B, L, self.n_heads, self.head_dim), freqs, start, 1, simulate)
        w = self.weights_proj(x).astype(mx.float32) * self.weight_scale
        return select(q, K, w, start, self.ratio, topk)

    def select_ring(self, x, qr, cache, freqs, simulate: bool, topk: int) -> mx.array:
        """__call__ for one token over a RingCache (ring_cache.py) at its array position: ids [B, 1, k] of the
        top-k visible keys of the whole capacity (-1 = none; k = min(topk, capacity))."""
        comp, arr, pos = self.compressor, cache.arrays, cache.pos
        c, arr["index_rows"] = comp.pool_ring(x, pos, arr["index_rows"], cache.ends_window)
        if c is not None:
            j = pos // comp.ratio
            cache.write("index", index_finish(c.astype(x.dtype), freqs, j * comp.ratio, comp.ratio, simulate,
                                              comp.norm.weight, comp.norm.eps), j)
        q = index_finish(self.wq_b(qr), freqs, pos, 1, simulate, heads=self.n_heads)  # q as projected: no reshape
        w = self.weights_proj(x).astype(mx.float32) * self.weight_scale
        keys = cache.store("index")
        sc = indexer_score(q, scoring_keys(q, keys), w, pos, self.ratio)  # [B, 1, C], -inf past the visible
        return top_k_visible(sc, topk, pos, self.ratio)

    def select_rows(self, x, qr, caches, freqs, simulate: bool, topk: int, cs) -> list[mx.array | None]:
        """__call__ for rows each at its own position (batch.py: x [B, 1, dim], row i at caches[i].offset;
        cs: the rows' angle table [B, 1, R/2]). The projections run over all rows at once; per row only
        the selection, and only where top-k leaves some of the row's entries out. Returns per row the ids
        [1, 1, k], or None where the row attends to all of its compressed entries."""
        B = x.shape[0]
        comp = self.compressor
        c, done = comp.pool_rows(x, [c.offset for c in caches], [c.index_state for c in caches])
        if c is not None:
            kcs = cos_sin(mx.array([j * comp.ratio for _, j in done])[:, None], freqs)
            keys = index_finish(c.astype(x.dtype), freqs, 0, comp.ratio, simulate, comp.norm.weight, comp.norm.eps,
                                cs=kcs)
            for (i, _), k in zip(done, mx.split(keys, len(done))):
                caches[i].push_index_keys(k)
        pick = [i for i, c in enumerate(caches) if min(topk, c.index_store.n) < c.n_compressed]
        out = [None] * B
        if pick:
            q = index_finish(self.wq_b(qr).reshape(B, 1, self.n_heads, self.head_dim), freqs, 0, 1, simulate, cs=cs)
            w = self.weights_proj(x).astype(mx.float32) * self.weight_scale
            for i in pick:
                out[i] = select(q[i : i + 1], caches[i].index_store, w[i : i + 1], caches[i].offset, self.ratio, topk)
        return out
