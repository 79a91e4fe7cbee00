"""Lightning-indexer scores: the pure-MLX reference and the Metal kernel (metal_kernels/indexer_score.metal).

score[b, l, n] = sum_h w[b, l, h] * relu(q[b, l, h] . k[b, n]) in float32 for the entries query l of
row b can see, n < (offset[b] + l + 1) // ratio, and -inf for the others (spec §4.2). The keys k are a
[B, N, D] array or a row store (kernels/stores.py): the kernel reads a dense or FP4 store in place, the
reference decodes it through the store's view(), as the cache's index_keys does.
"""

from __future__ import annotations

import mlx.core as mx

from . import registry
from .stores import is_store

SCORE_BUDGET = 1 << 21  # elements of a [B, Lb, H, Nb] block the reference keeps live at once
KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def _offsets(offset, batch: int) -> mx.array:
    off = mx.array(offset, dtype=mx.int32) if isinstance(offset, int) else offset.astype(mx.int32)
    if off.ndim == 0:
        off = mx.broadcast_to(off, (batch,))
    if off.shape != (batch,):
        raise ValueError(f"indexer_score: offset must be an int or one per row [{batch}], got shape {off.shape}")
    return off


def _key_shape(k, q: mx.array) -> tuple:
    """(B, N, D) of the keys: an array's shape, or a store's valid rows and decoded width."""
    if not is_store(k):
        return tuple(k.shape)
    if k.kind not in ("fp4", "dense"):
        raise ValueError(f"indexer_score: k must be an array or a dense / FP4 row store, got a {k.kind!r} store")
    if not k.n:
        return q.shape[0], 0, q.shape[-1]
    p = k.parts["packed"] if k.kind == "fp4" else k.parts["rows"]
    return p.shape[0], k.n, p.shape[2] * (2 if k.kind == "fp4" else 1)


def _check(q: mx.array, k, w: mx.array, ratio: int) -> None:
    ks = _key_shape(k, q)
    if q.ndim != 4 or len(ks) != 3 or w.ndim != 3:
        raise ValueError(f"indexer_score: want q [B, L, H, D], k [B, N, D], w [B, L, H]; got q {q.shape}, "
                         f"k {ks}, w {w.shape}")
    B, L, H, D = q.shape
    if ks[0] != B or ks[2] != D or w.shape != (B, L, H):
        raise ValueError(f"indexer_score: shapes disagree: q {q.shape}, k {ks}, w {w.shape}")
    if not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"indexer_score: ratio must be an int >= 1, got {ratio!r}")


def indexer_score_reference(q: mx.array, k, w: mx.array, offset: int | mx.array, ratio: int) -> mx.array:
    """[B, L, N] float32 scores; blocks over queries and keys keep at most SCORE_BUDGET elements live."""
    _check(q, k, w, ratio)
    if is_store(k):
        k = k.view() if k.n else mx.zeros((q.shape[0], 0, q.shape[-1]), q.dtype)
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


def _key_inputs(q: mx.array, k):
    """(FP4, k, kexp, n): the keys as the kernel reads them, in place, or None for forms it does not
    cover. The keys the kernel sees (decoded, for FP4) must be in q's dtype."""
    if not is_store(k):
        return (False, k, _no_exps(), k.shape[1]) if k.dtype == q.dtype else None
    if k.kind == "fp4":
        decoded = k.dtype or mx.float32  # what FP4Rows.decode gives (float32 for a store restored from arrays)
        if not k.n or k.block != 32 or q.shape[-1] % 32 or decoded != q.dtype:
            return None
        return True, k.parts["packed"], k.parts["exps"], k.n
    if k.kind == "dense" and k.n and k.parts["rows"].dtype == q.dtype:
        return False, k.parts["rows"], _no_exps(), k.n
    return None


def _no_exps() -> mx.array:
    return registry.placeholder((8,), mx.uint8)  # the dense form's kexp, never read


def kernel_supported(q: mx.array, k) -> bool:
    return q.dtype in KERNEL_DTYPES and q.shape[-1] <= 256 and _key_inputs(q, k) is not None


def indexer_score_kernel(q: mx.array, k, w: mx.array, offset: int | mx.array, ratio: int) -> mx.array:
    """The Metal kernel: one threadgroup per (query, 32-key tile); a store is read in place."""
    _check(q, k, w, ratio)
    B, L, H, D = q.shape
    N = _key_shape(k, q)[1]
    if B * L * N == 0:
        return mx.full((B, L, N), -mx.inf, dtype=mx.float32)
    if not kernel_supported(q, k):
        raise ValueError(f"indexer_score kernel: q and k must share a dtype in {KERNEL_DTYPES} with head dim "
                         f"<= 256, k an array or a dense / FP4 (32-channel blocks, D % 32 == 0) store; got q "
                         f"{q.dtype}, k {getattr(k, 'dtype', None) or type(k).__name__}, D={D}")
    fp4, kk, kexp, n = _key_inputs(q, k)
    (score,) = registry.launch(
        "indexer_score", [q, kk, kexp, w.astype(mx.float32), _offsets(offset, B), mx.array(n, dtype=mx.int32)],
        template={"T": q.dtype, "H": H, "DQ": D, "RATIO": ratio, "FP4": fp4},
        grid=(128 * (-(-N // 32)), L, B), threadgroup=(128, 1, 1),
        output_shapes=[(B, L, N)], output_dtypes=[mx.float32],
    )
    return score


def scoring_keys(q: mx.array, k):
    """What indexer_score should be given for these keys: a store the kernel will read in place as is,
    any other store decoded once here (not once per query block) through its view()."""
    if is_store(k) and not (registry.use_kernels() and kernel_supported(q, k)):
        return k.view()
    return k


def indexer_score(q: mx.array, k, w: mx.array, offset: int | mx.array, ratio: int) -> mx.array:
    """Causal indexer scores [B, L, N]: the kernel on Metal, the reference elsewhere or for key forms
    the kernel does not cover. k: [B, N, D] or a row store."""
    if registry.use_kernels() and kernel_supported(q, k):
        return indexer_score_kernel(q, k, w, offset, ratio)
    return indexer_score_reference(q, k, w, offset, ratio)
