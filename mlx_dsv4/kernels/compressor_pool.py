"""Compressor gated pooling: the pure-MLX reference and the Metal kernel (metal_kernels/compressor_pool.metal).

Windows wa, wg [B, n, m, coff*D] float32 (a and g + ape of m consecutive tokens; one window may come as
[B, m, coff*D]) -> entries [B, n, D]:
entry[j, f] = sum over slots s of softmax_s(g[s, f]) * a[s, f] (spec §4.1). Without overlap the slots are
window j's m rows. With overlap (ratio 4, coff = 2) they are 2m: window j-1's rows on the first half of the
features, then window j's rows on the second half; before window 0 of this call the previous window is
prev_a / prev_g [B, m, D] (the state's first halves), or, before the first window of all (prev None),
a = 0 and g = -inf (weight 0). The caller keeps the state.
A compiled decode step (ring_cache.py) passes its compressor's ring instead, [B, 2m, 2D] with overlap, and its
position `pos`: window pos // m sits in the ring's half (pos // m) % 2, the window before it in the other.
"""

from __future__ import annotations

import mlx.core as mx

from . import registry


def _dims(wa: mx.array) -> tuple[int, int, int, int]:
    """(B, n, m, coff*D) of windows [B, n, m, coff*D], or of one window [B, m, coff*D] (n = 1)."""
    return wa.shape if wa.ndim == 4 else (wa.shape[0], 1, *wa.shape[1:])


def _check(wa: mx.array, wg: mx.array, prev_a, prev_g, overlap: bool, pos=None) -> int:
    if pos is not None and (not overlap or prev_a is not None or wa.ndim != 3 or wa.shape[1] % 2 or wg.shape != wa.shape
                            or pos.size != 1 or not mx.issubdtype(pos.dtype, mx.integer)):
        raise ValueError(f"compressor_pool: a ring takes overlap, no prev, wa / wg [B, 2m, 2D] and one integer "
                         f"position, got overlap={overlap}, wa {wa.shape}, wg {wg.shape}, pos {pos.dtype} {pos.shape}")
    if wa.ndim not in (3, 4) or wg.shape != wa.shape:
        raise ValueError(f"compressor_pool: wa and wg must be [B, n, m, coff*D] (or one window [B, m, coff*D]) of "
                         f"one shape, got wa {wa.shape}, wg {wg.shape}")
    B, _, m, W = _dims(wa)
    if overlap and W % 2:
        raise ValueError(f"compressor_pool: wa with overlap must have an even width 2*D, got {W}")
    D = W // 2 if overlap else W
    if (prev_a is None) != (prev_g is None):
        raise ValueError("compressor_pool: prev_a and prev_g must both be given or both be None")
    if prev_a is not None and (not overlap or prev_a.shape != (B, m, D) or prev_g.shape != (B, m, D)):
        raise ValueError(f"compressor_pool: prev_a / prev_g must be [B, m, D] = {(B, m, D)} and need overlap; got "
                         f"{prev_a.shape}, {prev_g.shape}, overlap={overlap}")
    return D


def overlap_slots(wa, wg, prev_a, prev_g, D: int):
    """[B, n, m, 2D] windows -> [B, n, 2m, D] slots: window j-1's first half, then window j's second."""
    B, _, m, _ = wa.shape
    if prev_a is None:
        prev_a = mx.zeros((B, m, D), dtype=wa.dtype)
        prev_g = mx.full((B, m, D), -mx.inf, dtype=wg.dtype)
    pa = mx.concatenate([prev_a[:, None], wa[:, :-1, :, :D]], axis=1)
    pg = mx.concatenate([prev_g[:, None], wg[:, :-1, :, :D]], axis=1)
    return mx.concatenate([pa, wa[..., D:]], axis=2), mx.concatenate([pg, wg[..., D:]], axis=2)


def ring_windows(ra: mx.array, rg: mx.array, pos: mx.array):
    """A ring's window pos // m [B, m, 2D] and the first halves of the one before [B, m, D], as (wa, wg, pa, pg):
    dynamic slices (a gather by index would be several nodes of a compiled step)."""
    B, size, F = ra.shape
    m, D = size // 2, F // 2
    j = pos.reshape(1) // m
    this, prev = (j % 2) * m, ((j + 1) % 2) * m
    wa, wg = (mx.slice(r, this, (1,), (B, m, F)) for r in (ra, rg))
    pa, pg = (mx.slice(r, prev, (1,), (B, m, D)) for r in (ra, rg))
    return wa, wg, pa, pg


def compressor_pool_reference(wa: mx.array, wg: mx.array, prev_a, prev_g, overlap: bool, pos=None) -> mx.array:
    """Pure MLX: the slot layout, then a per-feature softmax over the slots and the weighted sum."""
    D = _check(wa, wg, prev_a, prev_g, overlap, pos)
    if pos is not None:
        wa, wg, prev_a, prev_g = ring_windows(wa, wg, pos)
    if wa.ndim == 3:
        wa, wg = wa[:, None], wg[:, None]
    if wa.shape[1] == 0:
        return mx.zeros((wa.shape[0], 0, D), dtype=mx.float32)
    if overlap:
        wa, wg = overlap_slots(wa, wg, prev_a, prev_g, D)
    return (mx.softmax(wg, axis=2, precise=True) * wa).sum(axis=2)


def _kernel_ok(wa, wg, prev_a) -> bool:
    """float32, and every buffer >= 8 elements: smaller inputs land in Metal's constant address space,
    which the kernel's device pointers cannot take (never the case for the real widths 128 / 512)."""
    small = wa.size < 8 or (prev_a is not None and prev_a.size < 8)
    return wa.dtype == mx.float32 and wg.dtype == mx.float32 and not small


def launch_geometry(B: int, n: int, D: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    return (D, n, B), (min(D, 256), 1, 1)


def compressor_pool_kernel(wa: mx.array, wg: mx.array, prev_a, prev_g, overlap: bool, pos=None) -> mx.array:
    """The Metal kernel (float32): one thread per (b, j, feature), one launch."""
    D = _check(wa, wg, prev_a, prev_g, overlap, pos)
    ring = pos is not None
    # a single window is launched as it is (the kernel reads n from wa's rank): no reshape; a ring too
    B, n, m, _ = (wa.shape[0], 1, wa.shape[1] // 2, wa.shape[2]) if ring else _dims(wa)
    if B * n * D == 0:
        return mx.zeros((B, n, D), dtype=mx.float32)
    if not _kernel_ok(wa, wg, prev_a):
        psize = None if prev_a is None else prev_a.size
        raise ValueError(f"compressor_pool kernel: wa and wg must be float32 and wa / prev_a at least 8 "
                         f"elements, got {wa.dtype}, {wg.dtype}, sizes {wa.size}, {psize}")
    has_prev = prev_a is not None
    # Without a previous window the kernel never reads prev_*: pass wa / wg (device buffers, no allocation).
    pa, pg = (prev_a.astype(mx.float32), prev_g.astype(mx.float32)) if has_prev else (wa, wg)
    grid, tg = launch_geometry(B, n, D)
    at = pos.reshape(1).astype(mx.int32) if ring else registry.constant((0,), mx.int32)  # read only by a ring
    (out,) = registry.launch(
        "compressor_pool", [wa, wg, pa, pg, at],
        template={"RATIO": m, "OVERLAP": overlap, "HAS_PREV": has_prev, "RING": ring},
        grid=grid, threadgroup=tg, output_shapes=[(B, n, D)], output_dtypes=[mx.float32],
    )
    return out


def compressor_pool(wa: mx.array, wg: mx.array, prev_a, prev_g, overlap: bool, pos=None) -> mx.array:
    """Pooled entries [B, n, D] float32 (a ring's: [B, 1, D]): the kernel on Metal (float32 windows), the
    reference otherwise."""
    if registry.use_kernels() and _kernel_ok(wa, wg, prev_a):
        return compressor_pool_kernel(wa, wg, prev_a, prev_g, overlap, pos)
    return compressor_pool_reference(wa, wg, prev_a, prev_g, overlap, pos)
