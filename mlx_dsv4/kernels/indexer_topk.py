"""Lightning-indexer top-k: the pure-MLX reference and the Metal kernel (metal_kernels/indexer_topk.metal).

Per query row (b, l): the ids of the k highest scores among the entries it can see,
n < (start + l + 1) // ratio, with -1 in the slots beyond the visible count; k is capped at N.
The order of the ids within a row is unspecified (sparse attention does not depend on it): the
reference returns argpartition's order, the kernel ascending ids. Ties at the k-th value: the
kernel takes the lowest indices (argpartition any). Drop-in for `indexer.top_k_visible`.
"""

from __future__ import annotations

import mlx.core as mx

from . import registry

MAX_THREADS = 1024


def _check(scores: mx.array, k, start, ratio) -> None:
    if scores.ndim != 3:
        raise ValueError(f"top_k_visible: scores must be [B, L, N], got shape {scores.shape}")
    if isinstance(start, mx.array) and start.ndim == 0 and mx.issubdtype(start.dtype, mx.integer):
        start = 0  # a compiled step's position (an array): its value is not known here
    for name, v, lo in (("k", k, 1), ("start", start, 0), ("ratio", ratio, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"top_k_visible: {name} must be an int >= {lo} (start: or an int scalar array), "
                             f"got {v!r}")


def top_k_visible_reference(scores: mx.array, k: int, start: int, ratio: int) -> mx.array:
    """Pure MLX: ids [B, L, min(k, N)] int32 (argpartition), -1 where fewer are visible."""
    _check(scores, k, start, ratio)
    N = scores.shape[-1]
    k = min(k, N)
    if k < N:
        idx = mx.stop_gradient(mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k].astype(mx.int32))
    else:
        idx = mx.broadcast_to(mx.arange(N, dtype=mx.int32), scores.shape)
    visible = ((start + mx.arange(scores.shape[1]) + 1) // ratio)[None, :, None]
    return mx.where(idx < visible, idx, -1)


def threads(N: int) -> int:
    """Threads per row: enough for one entry each, a whole number of SIMD groups, at most 1024."""
    return min(MAX_THREADS, 32 * max(1, -(-N // 32)))


def top_k_visible_kernel(scores: mx.array, k: int, start: int, ratio: int) -> mx.array:
    """The Metal kernel: one threadgroup per query row; ids ascending, ties lowest index first."""
    _check(scores, k, start, ratio)
    if not mx.issubdtype(scores.dtype, mx.floating):
        raise ValueError(f"top_k_visible kernel: scores must be floating point, got {scores.dtype}")
    B, L, N = scores.shape
    k = min(k, N)
    if B * L * k == 0:
        return mx.zeros((B, L, k), dtype=mx.int32)
    tg = threads(N)
    (ids,) = registry.launch(
        "indexer_topk",
        [scores.astype(mx.float32), mx.broadcast_to(registry.int_inputs(start), (B,)), registry.constant(k, mx.int32)],
        template={"RATIO": ratio}, grid=(tg, L, B), threadgroup=(tg, 1, 1),
        output_shapes=[(B, L, k)], output_dtypes=[mx.int32],
    )
    return ids


def top_k_visible(scores: mx.array, k: int, start: int, ratio: int) -> mx.array:
    """Top-k entry ids per query [B, L, min(k, N)] (int32), -1 where fewer than k are visible:
    the kernel on Metal, the reference elsewhere."""
    if registry.use_kernels() and mx.issubdtype(scores.dtype, mx.floating):
        return top_k_visible_kernel(scores, k, start, ratio)
    return top_k_visible_reference(scores, k, start, ratio)
