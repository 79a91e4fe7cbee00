"""Attention shared by the three layer types: sliding (ratio 0), CSA (ratio 4), HCA (ratio 128).

One K = V head of width head_dim (MQA). Queries see the last `window_size` tokens plus
compressed entries: all complete ones (HCA) or the indexer's top-k (CSA). A learned per-head
sink joins the softmax denominator only. K = V carries RoPE on its trailing channels, so the
output is rotated back by the query's position before the grouped low-rank output projection.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import LayerCache
from .compressor import Compressor
from .config import ModelArgs
from .indexer import Indexer
from .kernels.sparse_attention import kernel_supported, rows_attention, sparse_attention, sparse_attention_decode
from .kernels import registry
from .kernels.rows_finish import rows_finish
from .norm import RMSNorm
from .ring_cache import RingCache
from .rope import cos_sin, inv_freq, table


class GroupedLinear(nn.Module):
    """wo_a: G independent projections [R, in], one per output group (the block-diagonal half of the grouped
    output), held as one [G, R, in] weight. The official tensor is [G R, in]; load.to_model_layout splits its
    rows by group once, where a split in the step would be a node at every token. Quantized along its inputs
    as nn.QuantizedLinear is (the split is along the outputs, so packing and scales split with it)."""

    def __init__(self, groups: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = mx.zeros((groups, out_dim, in_dim))

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode: str = "affine",
                     quantize_input: bool = False) -> GroupedLinear:
        """For nn.quantize: the same projection quantized as nn.QuantizedLinear would (its defaults per mode)."""
        if quantize_input:
            raise ValueError("wo_a: quantized activations are not supported")
        G, R, n = self.weight.shape
        flat = nn.Linear(n, G * R, bias=False)
        flat.weight = self.weight.reshape(G * R, n)
        q = flat.to_quantized(group_size=group_size, bits=bits, mode=mode)
        out = GroupedLinear(G, n, R)
        for k in ("weight", "scales", "biases"):
            if k in q:
                out[k] = q[k].reshape(G, R, -1)
        out.group_size, out.bits, out.mode = q.group_size, q.bits, q.mode
        return out


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, shard=None):
        """shard (distributed.TensorShard): hold only its output groups' heads; the output is then
        this rank's partial sum, completed by one all_sum (KV, compressor and indexer stay whole)."""
        super().__init__()
        self.args = args
        self.ratio = args.ratio(layer)
        self.shard = shard
        self.o_groups = args.o_groups if shard is None else len(shard.o_groups)
        self.n_heads = args.n_heads // args.o_groups * self.o_groups
        d, H, D = args.dim, self.n_heads, args.head_dim
        self.wq_a = nn.Linear(d, args.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(args.q_lora_rank, args.norm_eps)
        self.wq_b = nn.Linear(args.q_lora_rank, H * D, bias=False)
        self.wkv = nn.Linear(d, D, bias=False)
        self.kv_norm = RMSNorm(D, args.norm_eps)
        self.wo_a = GroupedLinear(self.o_groups, args.n_heads * D // args.o_groups, args.o_lora_rank)
        self.wo_b = nn.Linear(self.o_groups * args.o_lora_rank, d, bias=False)
        self.attn_sink = mx.zeros((H,), dtype=mx.float32)
        if self.ratio:
            self.compressor = Compressor(d, D, self.ratio, args.norm_eps)
        if self.ratio == 4:
            self.indexer = Indexer(d, args.q_lora_rank, args.index_n_heads, args.index_head_dim, 4, args.norm_eps)
        self._freqs = inv_freq(args, self.ratio)

    def grouped_shape(self, B: int, L: int) -> tuple[int, ...]:
        """The attention output [B, L, H, D] as grouped_out takes it: [B, L, G, 1, H D / G]."""
        return (B, L, self.o_groups, 1, self.n_heads * self.args.head_dim // self.o_groups)

    def grouped_out(self, o: mx.array) -> mx.array:
        """o [B, L, H, D] (or [B, L, H*D]) -> wo_b(concat_g wo_a[g] . o_g): a block-diagonal then a dense
        projection."""
        G, R = self.o_groups, self.args.o_lora_rank
        og = o.reshape(self.grouped_shape(o.shape[0], o.shape[1]))  # no node when o comes in this shape
        B, L = o.shape[:2]
        wo_a = self.wo_a
        if "scales" in wo_a:
            # in decode the rows' indices are a shared constant (MLX's own are an arange, which a compiled step
            # replays per layer)
            lhs = registry.constant(tuple(range(B * G)), mx.uint32).reshape(B, L, G) if L == 1 else None
            a = mx.gather_qmm(og, wo_a.weight, wo_a.scales, wo_a.get("biases"), lhs_indices=lhs,
                              rhs_indices=registry.constant(tuple(range(G)), mx.uint32), transpose=True,
                              group_size=wo_a.group_size, bits=wo_a.bits, mode=wo_a.mode)
        else:
            a = og @ mx.swapaxes(wo_a.weight, -1, -2)
        return self.wo_b(a.reshape(B, L, G * R))

    def __call__(self, x: mx.array, cache, simulate: bool) -> mx.array:
        """x [B, L, dim] -> [B, L, dim]. cache: one LayerCache (every row at its offset), or a
        batch.RowCaches (one LayerCache per row, each at its own offset): then everything but the
        compressors, the indexer, the attention itself and the cache pushes runs over all rows at once."""
        a = self.args
        B, L, _ = x.shape
        qr = rows_finish(self.wq_a(x), None, 0, norm=True, weight=self.q_norm.weight, eps=self.q_norm.eps)
        q, kv = self.wq_b(qr), self.wkv(x)  # q [B, L, H D]: a ring step's kernel takes it so (no reshape node)
        rows = getattr(cache, "rows", None)
        if isinstance(cache, RingCache):
            o = self.attend_ring(x, qr, q, kv, cache, simulate)
        elif rows is None:
            o = self.attend(x, qr, q.reshape(B, L, self.n_heads, a.head_dim), kv, cache, simulate)
        else:
            if len(rows) != B:
                raise ValueError(f"{len(rows)} row caches for a batch of {B}")
            starts = [c.offset for c in rows]
            q, kv, cs = self.finish_rows(q.reshape(B, L, self.n_heads, a.head_dim), kv, starts, simulate)
            if L == 1 and not registry.use_kernels():
                o = self.attend_rows(x, qr, q, kv, rows, simulate, cs)
            else:  # the kernels take one scalar position: row by row
                o = mx.concatenate([self.attend(x[i : i + 1], qr[i : i + 1], q[i : i + 1], kv[i : i + 1], c, simulate,
                                                finished=True) for i, c in enumerate(rows)], axis=0)
            o = self._finish(o, starts, lambda t, p0, c: rows_finish(t, self._freqs, p0, inverse=True, cs=c), cs)
        y = self.grouped_out(o)
        return y if self.shard is None else self.shard.all_sum(y)

    def finish_rows(self, q: mx.array, kv: mx.array, starts: list[int], simulate: bool):
        """q / kv norms, RoPE at each row's own positions and kv's FP8 rounding, for all rows at once: the
        same elementwise ops as the solo path with a per-row angle table. Returns (q, kv, the table)."""
        a = self.args
        L = q.shape[1]
        nope_fp8 = a.head_dim - a.rope_head_dim if simulate else 0
        cs = cos_sin(mx.array(starts)[:, None] + mx.arange(L), self._freqs)  # [B, L, r/2]
        q = self._finish(q, starts, lambda t, p0, c: rows_finish(t, self._freqs, p0, norm=True, eps=a.norm_eps,
                                                                   cs=c), cs)
        kv = self._finish(kv, starts, lambda t, p0, c: rows_finish(
            t, self._freqs, p0, norm=True, weight=self.kv_norm.weight, eps=self.kv_norm.eps, fp8_nope=nope_fp8,
            cs=c), cs)
        return q, kv, cs

    @staticmethod
    def _finish(t: mx.array, starts: list[int], fn, cs):
        """fn(rows, pos0, angle table) over all rows with the per-row table; where the kernel runs (it takes
        one scalar position), one call per row."""
        if not registry.use_kernels():
            return fn(t, starts[0], cs)
        return mx.concatenate([fn(t[i : i + 1], p0, None) for i, p0 in enumerate(starts)], axis=0)

    def attend_rows(self, x: mx.array, qr: mx.array, q: mx.array, kv: mx.array, rows: list[LayerCache], simulate: bool,
                    cs) -> mx.array:
        """`attend` (finished=True) for one token per row, each row at its own offset, on the reference path:
        the compressor and indexer projections over all rows at once, the windows completed this step
        pooled together, the cache pushes per row, then one attention over every row's window rows and
        compressed (or selected) entries, padded to a common length and masked. cs: finish_rows' table."""
        a = self.args
        B, D = x.shape[0], a.head_dim
        nope_fp8 = D - a.rope_head_dim if simulate else 0
        if self.ratio:
            e, done = self.compressor.call_rows(x, [c.offset for c in rows], [c.comp_state for c in rows],
                                                self._freqs, x.dtype, nope_fp8)
            for (i, _), ei in zip(done, mx.split(e, len(done)) if done else ()):
                rows[i].push_compressed(ei)
        ids = [None] * B
        if self.ratio == 4:
            ids = self.indexer.select_rows(x, qr, rows, self._freqs, simulate, a.index_topk, cs)
        # After its push a row's window is exactly what its query sees: the last window_size positions.
        for c, k in zip(rows, mx.split(kv, B)):
            c.push_window(k)
            c.offset += 1
        keys, mask = self._row_keys(rows, ids)
        return rows_attention(q, keys, mask[:, None], self.attn_sink, D ** -0.5)

    def _row_keys(self, rows: list[LayerCache], ids: list) -> tuple[mx.array, mx.array]:
        """Every row's keys [B, S, D] (its window rows, then its compressed entries: all of them, or its
        selection ids[i] [1, 1, k]) padded to a common length, and the mask [B, S] of what its query sees.
        One gather per stored component over the rows' concatenated buffers, whatever B: the padding
        slots read some real row (finite), which the mask gives probability exactly 0."""
        B = len(rows)
        wins = [c.window for c in rows]
        n_w = [w.shape[1] for w in wins]
        W, base = max(n_w), np.cumsum([0] + n_w[:-1])
        take = np.where(np.arange(W) < np.array(n_w)[:, None], base[:, None] + np.arange(W), 0).astype(np.int32)
        flat = mx.concatenate(wins, axis=1)
        keys = mx.take(flat.reshape(-1, flat.shape[-1]), mx.array(take), axis=0)  # [B, W, D]
        mask = np.arange(W) < np.array(n_w)[:, None]
        stores = [c.compressed_store for c in rows]
        n_c = [0 if i is not None else (s.n if self.ratio else 0) for s, i in zip(stores, ids)]
        n_k = [n if i is None else i.shape[-1] for n, i in zip(n_c, ids)]
        K = max(n_k)
        if not K:
            return keys, mx.array(mask)
        full = [s for s in stores if s.n]  # the stores read: those holding entries
        n_s = [s.n for s in full]
        base_s = dict(zip(map(id, full), np.cumsum([0] + n_s[:-1])))
        ctake = np.zeros((B, K), np.int32)
        cmask = np.zeros((B, K), bool)
        for r, (c, n) in enumerate(zip(rows, n_c)):
            if n:  # all causally complete entries
                ctake[r, :n] = base_s[id(stores[r])] + np.arange(n)
                cmask[r, :n] = np.arange(n) < c.offset // self.ratio
        ctake, cmask = mx.array(ctake), mx.array(cmask)
        for r, i in enumerate(ids):
            if i is not None:  # the selection (-1 = none)
                i = i.reshape(-1)
                ctake[r, : i.size] = mx.maximum(i, 0) + int(base_s[id(stores[r])])
                cmask[r, : i.size] = i >= 0
        parts = {}
        for name in full[0].parts:
            flat = mx.concatenate([s.parts[name][:, : s.n] for s in full], axis=1)
            parts[name] = mx.take(flat.reshape(-1, *flat.shape[2:]), ctake, axis=0)  # [B, K, ...]
        comp = full[0].decode(parts, None)
        return mx.concatenate([keys, comp], axis=1), mx.concatenate([mx.array(mask), cmask], axis=1)

    def attend(self, x: mx.array, qr: mx.array, q: mx.array, kv: mx.array, cache: LayerCache, simulate: bool,
               finished: bool = False) -> mx.array:
        """The position-dependent part at the cache's offset: q / kv norms and RoPE, compressor,
        indexer, sparse attention, cache pushes. q [B, L, H, D] and kv [B, L, D] are the raw
        projections; returns the attention output [B, L, H, D], rotated back. finished: q and kv
        are already finished (finish_rows) and the output is left unrotated (the caller rotates it)."""
        a = self.args
        L = x.shape[1]
        start = cache.offset
        D, r = a.head_dim, a.rope_head_dim
        nope_fp8 = D - r if simulate else 0  # the trained FP8 on the non-RoPE channels, or nothing
        fr = self._freqs
        if not finished:
            cs = table(fr, start, L)  # one table for q, kv and the output (reference path)
            # weightless per-head norm, then RoPE
            q = rows_finish(q, fr, start, norm=True, eps=a.norm_eps, cs=cs)
            kv = rows_finish(kv, fr, start, norm=True, weight=self.kv_norm.weight, eps=self.kv_norm.eps,
                             fp8_nope=nope_fp8, cs=cs)

        comp, idx = None, None
        if self.ratio:
            cache.push_compressed(self.compressor(x, start, cache.comp_state, fr, x.dtype, nope_fp8))
            if self.ratio == 4:
                # None: the top-k would cover every entry, so the dense causal path gives the same result
                idx = self.indexer(x, qr, start, cache, fr, simulate, a.index_topk)
                comp = cache.compressed_store if cache.n_compressed else None
            else:
                comp = cache.compressed_store  # read in place (kernels) or decoded once (reference)

        prev = cache.window
        win = kv if prev is None else mx.concatenate([prev, kv], axis=1)
        win_start = start - (0 if prev is None else prev.shape[1])
        o = sparse_attention(q, win, win_start, comp, idx, self.attn_sink, start, self.ratio or 1,
                             a.window_size, D ** -0.5)
        cache.push_window(kv)
        cache.offset += L
        return o if finished else rows_finish(o, fr, start, inverse=True, cs=cs)

    def attend_ring(self, x: mx.array, qr: mx.array, q: mx.array, kv: mx.array, cache: RingCache,
                    simulate: bool) -> mx.array:
        """`attend` for one token over a RingCache at its array position cache.pos (compiled_step.py): the same
        values from fixed-size buffers, the rows past what the query sees masked (the kernels take the position
        as an input array). q comes as projected, [B, 1, H D]; the output in grouped_out's shape."""
        a = self.args
        if x.shape[1] != 1:
            raise ValueError(f"a ring cache takes one token per step, got {x.shape[1]}")
        D, fr, pos, m = a.head_dim, self._freqs, cache.pos, self.ratio
        nope_fp8 = D - a.rope_head_dim if simulate else 0
        cs = table(fr, pos, 1)  # the reference's angles for q, kv and the output
        q = rows_finish(q, fr, pos, norm=True, eps=a.norm_eps, cs=cs, heads=self.n_heads)  # q [B, 1, H D] as given
        kv = rows_finish(kv, fr, pos, norm=True, weight=self.kv_norm.weight, eps=self.kv_norm.eps, fp8_nope=nope_fp8,
                         cs=cs)
        win, ws = cache.push_window(kv)
        store = ids = None
        if m:
            comp, arr = self.compressor, cache.arrays
            c, arr["comp_rows"] = comp.pool_ring(x, pos, arr["comp_rows"], cache.ends_window)
            if c is not None:
                j = pos // m
                cache.write("comp", rows_finish(c, fr, j * m, m, norm=True, weight=comp.norm.weight,
                                                eps=comp.norm.eps, fp8_nope=nope_fp8, dtype=x.dtype), j)
            store = cache.store("comp")
            if m == 4:
                ids = self.indexer.select_ring(x, qr, cache, fr, simulate, a.index_topk)  # [B, 1, k]
        if registry.use_kernels() and kernel_supported(q, win, store):
            o = sparse_attention_decode(q, win, ws, store, ids, self.attn_sink, pos, m or 1, a.window_size, D ** -0.5,
                                        ring=True)
        else:
            o = self._ring_reference(q, win, ws, store, ids, pos)
        return rows_finish(o, fr, pos, inverse=True, cs=cs, shape=self.grouped_shape(*o.shape[:2]))

    def _ring_reference(self, q, win, ws, store, ids, pos) -> mx.array:
        """The decode kernel's attention in the reference's ops: every window row (in position order, as the
        kernel reads the ring) and compressed entry (HCA) or selected one (CSA) as a key, masked unless the query
        at pos sees it."""
        B, W, R = win.shape[0], self.args.window_size, win.shape[1]
        p = ws + mx.arange(R)
        win = mx.take(win, p % R, axis=1)
        keys, masks = [win], [mx.broadcast_to((p >= 0) & (p > pos - W), (B, win.shape[1]))]
        if ids is not None:
            keys.append(store.take(mx.maximum(ids, 0))[:, 0])
            masks.append(ids[:, 0] >= 0)
        elif store is not None:
            keys.append(store.view())
            masks.append(mx.broadcast_to(mx.arange(store.n) < (pos + 1) // self.ratio, (B, store.n)))
        mask = mx.concatenate(masks, axis=1)[:, None]
        return rows_attention(q, mx.concatenate(keys, axis=1), mask, self.attn_sink, self.args.head_dim ** -0.5)
