"""Lightning-indexer scores: the pure-MLX reference and the Metal kernel (metal_kernels/indexer_score.metal).

score[b, l, n] = sum_h w[b, l, h] * relu(q[b, l, h] . k[b, n]) in float32 for the entries query l of
row b can see, n < (offset[b] + l + 1) // ratio, and -inf for the others (spec §4.2).
"""

from __future__ import annotations

import mlx.core as mx

from . import registry

SCORE_BUDGET = 1 << 21  # elements of a [B, Lb, H, Nb] block the reference keeps live at once
KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def _offsets(offset, batch: int) -> mx.array:
    off = mx.array(offset, dtype=mx.int32) if isinstance(offset, int) else offset.astype(mx.int32)
    if off.ndim == 0:
        off = mx.broadcast_to(off, (batch,))
    if off.shape != (batch,):
        raise ValueError(f"indexer_score: offset must be an int or one per row [{batch}], got shape {off.shape}")
    return off


def _check(q: mx.array, k: mx.array, w: mx.array, ratio: int) -> None:
    if q.ndim != 4 or k.ndim != 3 or w.ndim != 3:
        raise ValueError(f"indexer_score: want q [B, L, H, D], k [B, N, D], w [B, L, H]; got q {q.shape}, "
                         f"k {k.shape}, w {w.shape}")
    B, L, H, D = q.shape
    if k.shape[0] != B or k.shape[2] != D or w.shape != (B, L, H):
        raise ValueError(f"indexer_score: shapes disagree: q {q.shape}, k {k.shape}, w {w.shape}")
    if not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"indexer_score: ratio must be an int >= 1, got {ratio!r}")


def indexer_score_reference(q: mx.array, k: mx.array, w: mx.array, offset: int | mx.array, ratio: int) -> mx.array:
    """[B, L, N] float32 scores; blocks over queries and keys keep at most SCORE_BUDGET elements live."""
    _check(q, k, w, ratio)
    B, L, H, _ = q.shape
    N = k.shape[1]
    off = _offsets(offset, B)
    if L * N == 0:
        return mx.zeros((B, L, N), dtype=mx.float32)
    step_n = max(1, min(N, SCORE_BUDGET // max(1, B * H)))
    step_l = max(1, min(L, SCORE_BUDGET // max(1, B * H * step_n)))
    q32, k32, w32 = q.astype(mx.float32), k.astype(mx.float32), w.astype(mx.float32)
    rows = []
    for s in range(0, L, step_l):
        visible = (off[:, None] + mx.arange(s, min(L, s + step_l))[None, :] + 1) // ratio  # [B, Lb]
        cols = []
        for t in range(0, N, step_n):
            kb = mx.swapaxes(k32[:, t : t + step_n], -1, -2)[:, None]  # [B, 1, D, Nb]
            sc = mx.maximum(q32[:, s : s + step_l] @ kb, 0.0)  # [B, Lb, H, Nb]
            sc = (w32[:, s : s + step_l, :, None] * sc).sum(axis=2)
            n = mx.arange(t, t + sc.shape[-1])
            cols.append(mx.where(n[None, None, :] < visible[..., None], sc, -mx.inf))
        rows.append(cols[0] if len(cols) == 1 else mx.concatenate(cols, axis=-1))
    return rows[0] if len(rows) == 1 else mx.concatenate(rows, axis=1)


def indexer_score_kernel(q: mx.array, k: mx.array, w: mx.array, offset: int | mx.array, ratio: int) -> mx.array:
    """The Metal kernel: one threadgroup per (query, 32-key tile)."""
    _check(q, k, w, ratio)
    B, L, H, D = q.shape
    N = k.shape[1]
    if q.dtype != k.dtype or q.dtype not in KERNEL_DTYPES or D > 256:
        raise ValueError(f"indexer_score kernel: q and k must share a dtype in {KERNEL_DTYPES} with head dim "
                         f"<= 256; got {q.dtype}, {k.dtype}, D={D}")
    if B * L * N == 0:
        return mx.full((B, L, N), -mx.inf, dtype=mx.float32)
    (score,) = registry.launch(
        "indexer_score", [q, k, w.astype(mx.float32), _offsets(offset, B)],
        template={"T": q.dtype, "H": H, "DQ": D, "RATIO": ratio},
        grid=(128 * (-(-N // 32)), L, B), threadgroup=(128, 1, 1),
        output_shapes=[(B, L, N)], output_dtypes=[mx.float32],
    )
    return score


def indexer_score(q: mx.array, k: mx.array, w: mx.array, offset: int | mx.array, ratio: int) -> mx.array:
    """Causal indexer scores [B, L, N]: the kernel on Metal, the reference elsewhere."""
    if registry.use_kernels() and q.dtype == k.dtype and q.dtype in KERNEL_DTYPES and q.shape[-1] <= 256:
        return indexer_score_kernel(q, k, w, offset, ratio)
    return indexer_score_reference(q, k, w, offset, ratio)
