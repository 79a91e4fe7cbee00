"""Sparse attention with a sink: the pure-MLX reference and two Metal kernels,
metal_kernels/sparse_attention_decode.metal (few queries) and sparse_attention_prefill.metal.

One K = V head of width D is shared by H query heads (MQA). Query l (position t = start + l) sees
window rows at positions p with win_start <= p, t - window_size < p <= t, and compressed entries:
all causally complete ones, n < (t + 1) // ratio (HCA, comp_idx None), or its own selection
comp_idx[b, l, :] (CSA, -1 = none). A per-head sink joins the softmax denominator only; the
probabilities are rounded to q.dtype before the PV product; the output is in q.dtype.
"""

from __future__ import annotations

import mlx.core as mx

from . import registry
from .stores import is_store

_ATTN_BUDGET = 1 << 22  # elements of one query block's [B, H, Lb, keys] score tile
KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
DECODE_MAX_L = 4  # up to this many queries the decode form (heads share each loaded row) runs
SIMD_GROUPS = 4  # decode: SIMD groups splitting the key range
QUERY_TILE = 4  # prefill: queries (one per SIMD group) sharing each staged window chunk
MAX_HEAD_TILE = 8  # heads served per threadgroup (registers: HT * D / 32 floats of q and of output each)
DECODE_THREADGROUPS = 32  # decode: shrink the head tile until about this many threadgroups run


def _comp_rows(comp):
    """(dense [B, N, D] array or None, store or None): HCA may get either form."""
    if is_store(comp):
        return (comp.view() if comp.n else None), comp
    return comp, None


def sink_softmax(z: mx.array, sink: mx.array, dtype) -> mx.array:
    """Logits z [B, H, L, keys] (float32, -inf masked; each query sees at least one key) -> probabilities
    with the per-head sink in the denominator only, rounded to `dtype` (the reference feeds PV in q.dtype)."""
    m = mx.max(z, axis=-1, keepdims=True)
    ez = mx.exp(z - m)
    denom = ez.sum(axis=-1, keepdims=True) + mx.exp(sink.astype(mx.float32)[None, :, None, None] - m)
    return (ez / denom).astype(dtype).astype(mx.float32)


def sparse_attention_reference(q, window, win_start, comp, comp_idx, sink, start, ratio, window_size, scale):
    """Softmax-with-sink attention of q [B, L, H, D] (first query at position `start`) over
    window rows [B, W, D] (first at position `win_start`) and compressed entries: with
    comp_idx None, `comp` ([B, N, D] array or a row store, kernels/stores.py) holds them all and each
    query sees the causally complete ones (HCA); otherwise `comp` is a row store and comp_idx
    [B, L, k] the per-query selection (CSA, -1 = none), gathered per query block. Returns [B, L, H, D].
    """
    if comp_idx is None:
        comp, _ = _comp_rows(comp)
    B, L, H, D = q.shape
    W = window.shape[1]
    N = 0 if comp is None else (comp.shape[1] if comp_idx is None else comp.n)
    n_c = N if comp_idx is None else comp_idx.shape[-1]
    # Blocks of about one window: a block of Lb queries reads Lb + window_size - 1 window rows,
    # so larger blocks waste work on masked scores; the budget bounds memory for huge N.
    step = max(1, min(L, window_size, _ATTN_BUDGET // max(1, B * H * (window_size + max(n_c, 1)))))
    outs = []
    for s in range(0, L, step):
        e = min(L, s + step)
        qb = mx.swapaxes(q[:, s:e], 1, 2).astype(mx.float32)  # [B, H, Lb, D]
        t0, t1 = start + s, start + e - 1  # the block's first and last query positions
        t = mx.arange(t0, t1 + 1)[:, None]  # [Lb, 1]
        # Window rows that any query of this block can see.
        lo = max(0, t0 - window_size + 1 - win_start, -win_start)  # rows before position 0 are padding
        hi = min(W, t1 + 1 - win_start)
        wk = window[:, lo:hi].astype(mx.float32)  # [B, Wb, D]
        # A mask every query passes everywhere (a decode step's, always) is left out: where(True, v, -inf) is v,
        # and its ops are a good part of a decode step's graph on the CPU.
        sc = (qb @ mx.swapaxes(wk, -1, -2)[:, None]) * scale
        if not (win_start + hi - 1 <= t0 and win_start + lo > t1 - window_size):
            p = mx.arange(win_start + lo, win_start + hi)[None, :]
            sc = mx.where((p <= t) & (p > t - window_size), sc, -mx.inf)
        logits = [sc]
        gathered = None
        if N and comp_idx is None:
            ck = comp.astype(mx.float32)
            sc = (qb @ mx.swapaxes(ck, -1, -2)[:, None]) * scale
            if N > (t0 + 1) // ratio:
                sc = mx.where(mx.arange(N)[None, :] < (t + 1) // ratio, sc, -mx.inf)
            logits.append(sc)
        elif N:
            ids = comp_idx[:, s:e]  # [B, Lb, k]
            gathered = comp.take(mx.maximum(ids, 0), mx.float32)  # [B, Lb, k, D], never [.., N, D]
            sc = mx.swapaxes(q[:, s:e].astype(mx.float32) @ mx.swapaxes(gathered, -1, -2), 1, 2)
            logits.append(mx.where((ids >= 0)[:, None], sc * scale, -mx.inf))  # [B, H, Lb, k]
        z = mx.concatenate(logits, axis=-1) if len(logits) > 1 else logits[0]
        prob = sink_softmax(z, sink, q.dtype)
        Wb = wk.shape[1]
        o = prob[..., :Wb] @ wk[:, None]
        if N and comp_idx is None:
            o = o + prob[..., Wb:] @ ck[:, None]
        elif N:
            o = o + mx.swapaxes(mx.swapaxes(prob[..., Wb:], 1, 2) @ gathered, 1, 2)
        outs.append(mx.swapaxes(o, 1, 2).astype(q.dtype))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)


def rows_attention(q: mx.array, keys: mx.array, mask: mx.array, sink: mx.array, scale: float) -> mx.array:
    """The reference's softmax-with-sink attention for rows that each see their own key set (batch.py):
    q [B, L, H, D] over keys [B, S, D], where mask [B, L, S] marks the keys query (b, l) sees (its window
    rows and its compressed or selected entries, in any order; the rest is padding, which must be finite:
    a masked key's probability is exactly 0). Every query must see at least one key. Returns [B, L, H, D]."""
    B, L, H, D = q.shape
    if keys.ndim != 3 or keys.shape[0] != B or keys.shape[2] != D or mask.shape != (B, L, keys.shape[1]):
        raise ValueError(f"rows_attention: want q [B, L, H, D], keys [B, S, D], mask [B, L, S]; got q {q.shape}, "
                         f"keys {keys.shape}, mask {mask.shape}")
    if sink.shape != (H,):
        raise ValueError(f"rows_attention: sink must be [{H}], got shape {sink.shape}")
    k = keys.astype(mx.float32)[:, None]  # [B, 1, S, D]
    z = mx.where(mask[:, None], (mx.swapaxes(q, 1, 2).astype(mx.float32) @ mx.swapaxes(k, -1, -2)) * scale, -mx.inf)
    return mx.swapaxes(sink_softmax(z, sink, q.dtype) @ k, 1, 2).astype(q.dtype)


# ---- kernels ------------------------------------------------------------------------------------


def _check(q, window, comp, comp_idx, sink, ratio, window_size) -> None:
    if q.ndim != 4:
        raise ValueError(f"sparse_attention: q must be [B, L, H, D], got shape {q.shape}")
    B, L, H, D = q.shape
    if window.ndim != 3 or window.shape[0] != B or window.shape[2] != D:
        raise ValueError(f"sparse_attention: window must be [{B}, W, {D}], got shape {window.shape}")
    if sink.shape != (H,):
        raise ValueError(f"sparse_attention: sink must be [{H}], got shape {sink.shape}")
    if comp_idx is not None and (not is_store(comp) or comp_idx.shape[:2] != (B, L) or comp_idx.ndim != 3):
        raise ValueError(f"sparse_attention: comp_idx must be [{B}, {L}, k] with a row store as comp, got "
                         f"comp_idx {comp_idx.shape}, comp {type(comp).__name__}")
    if comp is not None and not is_store(comp) and (comp.ndim != 3 or comp.shape[0] != B or comp.shape[2] != D):
        raise ValueError(f"sparse_attention: comp must be a row store or [{B}, N, {D}], got shape {comp.shape}")
    if not isinstance(ratio, int) or ratio < 1 or not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"sparse_attention: ratio and window_size must be ints >= 1, got {ratio!r}, {window_size!r}")


def _head_tile(H: int, D: int, queries: int | None = None) -> int:
    """Heads per threadgroup: each loaded row serves HT heads, but a decode step (queries = B L) of
    one sequence would then run on few GPU cores, so there HT shrinks until ~DECODE_THREADGROUPS run."""
    ht = max(1, min(MAX_HEAD_TILE, H, 1024 // D))  # q and accumulators: 2 HT D / 32 <= 64 floats per lane
    return ht if queries is None else max(1, min(ht, queries * H // DECODE_THREADGROUPS))


def _store_inputs(q, comp):
    """(FP8, NOPE, ck, ce, cr, n): the compressed entries as the kernel reads them, in place, or None
    when the form is not covered (the reference runs then)."""
    B, D = q.shape[0], q.shape[-1]
    ce, cr = registry.placeholder((8,), mx.uint8), registry.placeholder((8,), q.dtype)
    n = 0 if comp is None else (comp.n if is_store(comp) else comp.shape[1])
    if n == 0:
        return False, D, registry.placeholder((B, 1, D), q.dtype), ce, cr, 0
    if is_store(comp) and comp.kind == "fp8":
        p = comp.parts
        if comp.block != 64 or not 0 < comp.nope <= D or p["rope"].dtype != q.dtype:
            return None
        return True, comp.nope, p["codes"], p["exps"], p["rope"], n
    rows = (comp.parts.get("rows") if comp.kind == "dense" else None) if is_store(comp) else comp
    if rows is None or rows.dtype not in KERNEL_DTYPES:
        return None
    return False, D, rows, ce, cr, n


def kernel_supported(q, window, comp) -> bool:
    D = q.shape[-1]
    return (q.dtype in KERNEL_DTYPES and window.dtype == q.dtype and D % 32 == 0 and D <= 1024
            and _store_inputs(q, comp) is not None)


def _launch(form, q, window, win_start, comp, comp_idx, sink, start, ratio, window_size, scale, ring=False):
    _check(q, window, comp, comp_idx, sink, ratio, window_size)
    if not kernel_supported(q, window, comp):
        raise ValueError(f"sparse_attention kernel: q and window must share a dtype in {KERNEL_DTYPES}, D a "
                         f"multiple of 32, comp dense or FP8 (64-channel blocks, rope in q.dtype); got q {q.dtype}, "
                         f"window {window.dtype}, D={q.shape[-1]}, comp {type(comp).__name__}")
    B, L, H, D = q.shape
    fp8, nope, ck, ce, cr, n = _store_inputs(q, comp)
    csa = comp_idx is not None
    idx = comp_idx.astype(mx.int32) if csa else registry.placeholder((1, 1, 8), mx.int32)
    ht = _head_tile(H, D, B * L if form == "decode" else None)
    # the decode form also takes the window's row base: position p is row (p - base) % W
    pos = registry.int_inputs(start, win_start, n, *(() if form == "prefill" else (0 if ring else win_start,)))
    tile = 1 if form == "decode" else QUERY_TILE
    grid = (32 * (SIMD_GROUPS if form == "decode" else QUERY_TILE), -(-H // ht), B * -(-L // tile))
    (out,) = registry.launch(
        f"sparse_attention_{form}",
        [q, window, ck, ce, cr, idx, sink.astype(mx.float32), pos, registry.constant(scale, mx.float32)],
        template={"T": q.dtype, "D": D, "NOPE": nope, "HT": ht, "FP8": fp8, "CSA": csa, "WINDOW": window_size,
                  "RATIO": ratio},
        grid=grid, threadgroup=(grid[0], 1, 1), output_shapes=[q.shape], output_dtypes=[q.dtype])
    return out


def sparse_attention_decode(q, window, win_start, comp, comp_idx, sink, start, ratio, window_size, scale,
                            ring: bool = False):
    """The decode kernel: one threadgroup per (query, head tile); heads share each loaded row. ring: the window
    is a compiled step's ring (ring_cache.py), position p in row p % W, win_start its oldest position."""
    return _launch("decode", q, window, win_start, comp, comp_idx, sink, start, ratio, window_size, scale, ring)


def sparse_attention_prefill(q, window, win_start, comp, comp_idx, sink, start, ratio, window_size, scale):
    """The prefill kernel: one threadgroup per (4-query tile, head tile); the tile shares staged window rows."""
    return _launch("prefill", q, window, win_start, comp, comp_idx, sink, start, ratio, window_size, scale)


def sparse_attention(q, window, win_start, comp, comp_idx, sink, start, ratio, window_size, scale):
    """As sparse_attention_reference; `comp` may be a row store for HCA too, read in place by the kernels
    on Metal (decode form for L <= DECODE_MAX_L, prefill form above), the reference elsewhere or for
    inputs the kernels do not cover."""
    _check(q, window, comp, comp_idx, sink, ratio, window_size)
    if registry.use_kernels() and kernel_supported(q, window, comp):
        form = sparse_attention_decode if q.shape[1] <= DECODE_MAX_L else sparse_attention_prefill
        return form(q, window, win_start, comp, comp_idx, sink, start, ratio, window_size, scale)
    return sparse_attention_reference(q, window, win_start, comp, comp_idx, sink, start, ratio, window_size, scale)
