"""mHC stream glue: hc_pre / hc_post as pure-MLX references and as fused Metal kernels
(metal_kernels/hc_pre.metal, hc_post.metal).

hc_pre: X [..., hc, d] -> mixes = rsqrt(mean(flat^2) + norm_eps) * (fn @ flat) with flat the hc*d
stream values in float32, the Sinkhorn split of the mixes (kernels/sinkhorn_split.py), and u = sum_k pre_k X_k
in float32 rounded to X.dtype. hc_post: X'_k = post_k * y + sum_j comb[j, k] X_j in float32, stored
in X.dtype (comb is applied transposed). The kernels cover hc = 4 with X in float32 / float16 /
bfloat16; other cases take the reference. hc_pre(..., after=(y, post, comb)) first applies the previous
sub-layer's hc_post to X: one launch on Metal (the kernel's POST), the two references elsewhere.
"""

from __future__ import annotations

import math

import mlx.core as mx

from ..norm import rms_norm
from . import fuse, registry, sinkhorn_split

KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def mixes(X: mx.array, fn: mx.array, norm_eps: float) -> mx.array:
    """[..., hc, d] -> [..., rows of fn]: the RMS of the flattened streams, applied after the
    projection (it has no weight)."""
    flat = X.reshape(*X.shape[:-2], -1).astype(mx.float32)
    rho = mx.rsqrt(mx.mean(flat * flat, axis=-1, keepdims=True) + norm_eps)
    return (flat @ fn.astype(mx.float32).T) * rho


def _check_pre(X: mx.array, fn: mx.array, scale: mx.array, base: mx.array, norm=None) -> int:
    if X.ndim < 2:
        raise ValueError(f"hc_pre: X must be [..., hc, d], got shape {X.shape}")
    hc, d = X.shape[-2:]
    if fn.shape != ((2 + hc) * hc, hc * d):
        raise ValueError(f"hc_pre: fn must be [(2+hc)*hc, hc*d] = [{(2 + hc) * hc}, {hc * d}], got {fn.shape}")
    if scale.shape != (3,) or base.shape != ((2 + hc) * hc,):
        raise ValueError(f"hc_pre: scale must be [3] and base [{(2 + hc) * hc}], got {scale.shape} and {base.shape}")
    if norm is not None and (len(norm) != 2 or norm[0].shape != (d,)):
        raise ValueError(f"hc_pre: norm must be (weight [{d}], eps), got {norm!r:.80}")
    return hc


def _check_post(y: mx.array, X: mx.array, post: mx.array, comb: mx.array) -> int:
    if X.ndim < 2 or y.shape != X.shape[:-2] + X.shape[-1:]:
        raise ValueError(f"hc_post: want X [..., hc, d] and y [..., d]; got X {X.shape}, y {y.shape}")
    hc = X.shape[-2]
    if post.shape != X.shape[:-1]:
        raise ValueError(f"hc_post: post must be {X.shape[:-1]}, got {post.shape}")
    if comb.shape != X.shape[:-1] + (hc,):
        raise ValueError(f"hc_post: comb must be {X.shape[:-1] + (hc,)}, got {comb.shape}")
    return hc


def hc_pre_reference(X, fn, scale, base, iters: int, eps: float, norm_eps: float, norm=None):
    """(u [..., d] in X.dtype, post [..., hc], comb [..., hc, hc] float32). The split goes through
    the sinkhorn_split dispatcher: its reference here, its own kernel on Metal. norm: (weight, eps)
    of the sub-layer's RMSNorm, applied to u (rms_norm) before it is returned. One fused piece
    (kernels/fuse.py) where the split is the reference."""
    _check_pre(X, fn, scale, base, norm)
    w = () if norm is None else (norm[0],)
    static = (iters, float(eps), float(norm_eps), None if norm is None else float(norm[1]))
    if registry.use_kernels():  # the split is a kernel launch: nothing to fuse around it
        return _pre(*static, X, fn, scale, base, *w)
    return fuse.run(_pre, static, X, fn, scale, base, *w)


def _pre(iters, eps, norm_eps, out_eps, X, fn, scale, base, *w):
    pre, post, comb = sinkhorn_split.sinkhorn_split(mixes(X, fn, norm_eps), scale, base, iters, eps)
    u = (pre[..., None] * X.astype(mx.float32)).sum(axis=-2).astype(X.dtype)
    return (u if out_eps is None else rms_norm(u, w[0], out_eps)), post, comb


def hc_post_reference(y: mx.array, X: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """X'_k = post_k * y + sum_j comb[j, k] * X_j, in float32, stored back in X.dtype (one fused piece)."""
    _check_post(y, X, post, comb)
    return fuse.run(_post, (), y, X, post, comb)


def _post(y, X, post, comb):
    mixed = mx.swapaxes(comb, -1, -2) @ X.astype(mx.float32)
    return (post[..., None] * y.astype(mx.float32)[..., None, :] + mixed).astype(X.dtype)


def hc_pre_kernel(X, fn, scale, base, iters: int, eps: float, norm_eps: float, norm=None, after=None):
    """The fused Metal kernel (hc = 4): one threadgroup per token, one launch for all tokens. after: (y, post, comb)
    of the previous sub-layer, X its input streams: its hc_post runs first, and X' comes back fourth."""
    hc = _check_pre(X, fn, scale, base, norm)
    if hc != 4 or X.dtype not in KERNEL_DTYPES:
        raise ValueError(f"hc_pre kernel: X must be [..., 4, d] in {KERNEL_DTYPES}, got {X.shape} {X.dtype}")
    if after is not None:
        _check_post(after[0], X, *after[1:])
        if after[0].dtype != X.dtype:
            raise ValueError(f"hc_pre kernel: y must be in X's dtype {X.dtype}, got {after[0].dtype}")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"hc_pre: iters must be an int >= 1, got {iters!r}")
    lead, d = X.shape[:-2], X.shape[-1]
    n = math.prod(lead)
    if n == 0:
        out = mx.zeros((*lead, d), dtype=X.dtype), mx.zeros((*lead, 4)), mx.zeros((*lead, 4, 4))
        return out if after is None else (*out, X)
    f32 = mx.float32
    tg = min(512, -(-4 * d // 32) * 32)
    w, out_eps = (base, 0.0) if norm is None else norm  # base: a placeholder the kernel never reads
    y, p, c = after or (registry.placeholder((8,), X.dtype), base, base)  # likewise
    # The kernel indexes its buffers by token: the arrays keep their own leading axes (no reshape nodes).
    u, post, comb, Xn = registry.launch(
        "hc_pre", [X, fn.astype(f32), scale.astype(f32), base.astype(f32),
                   registry.constant(eps, f32), registry.constant(norm_eps, f32), w.astype(f32),
                   registry.constant(out_eps, f32), y, p.astype(f32), c.astype(f32)],
        template={"T": X.dtype, "D": d, "ITERS": iters, "NORM": norm is not None, "POST": after is not None},
        grid=(tg * n, 1, 1), threadgroup=(tg, 1, 1),
        output_shapes=[(*lead, d), (*lead, 4), (*lead, 4, 4), X.shape if after else (1,)],
        output_dtypes=[X.dtype, f32, f32, X.dtype],
    )
    return (u, post, comb) if after is None else (u, post, comb, Xn)


def hc_post_kernel(y: mx.array, X: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """The Metal kernel (hc = 4): one thread per (token, d) writes the four streams."""
    hc = _check_post(y, X, post, comb)
    if hc != 4 or X.dtype not in KERNEL_DTYPES or y.dtype != X.dtype:
        raise ValueError(f"hc_post kernel: X must be [..., 4, d] in {KERNEL_DTYPES} and y of the same dtype, "
                         f"got X {X.shape} {X.dtype}, y {y.dtype}")
    lead, d = X.shape[:-2], X.shape[-1]
    n = math.prod(lead)
    if n * d == 0:
        return mx.zeros(X.shape, dtype=X.dtype)
    f32 = mx.float32
    (out,) = registry.launch(  # indexed by token, as hc_pre: no reshapes
        "hc_post", [y, X, post.astype(f32), comb.astype(f32)],
        template={"T": X.dtype, "D": d}, grid=(d, n, 1), threadgroup=(min(d, 256), 1, 1),
        output_shapes=[X.shape], output_dtypes=[X.dtype],
    )
    return out


def hc_pre(X, fn, scale, base, iters: int, eps: float, norm_eps: float, norm=None, after=None):
    """(u, post, comb): the fused kernel on Metal for hc = 4, the reference otherwise. after: (y, post, comb) of the
    previous sub-layer, X its input streams: its hc_post first (in the same launch on Metal); then the streams X'
    come back too, (u, post, comb, X')."""
    if registry.use_kernels() and X.ndim >= 2 and X.shape[-2] == 4 and X.dtype in KERNEL_DTYPES \
            and (after is None or after[0].dtype == X.dtype):
        return hc_pre_kernel(X, fn, scale, base, iters, eps, norm_eps, norm, after)
    if after is not None:
        X = hc_post(after[0], X, *after[1:])
        return (*hc_pre(X, fn, scale, base, iters, eps, norm_eps, norm), X)
    return hc_pre_reference(X, fn, scale, base, iters, eps, norm_eps, norm)


def hc_post(y: mx.array, X: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """The updated streams X': the kernel on Metal for hc = 4, the reference otherwise."""
    if registry.use_kernels() and X.ndim >= 2 and X.shape[-2] == 4 and X.dtype in KERNEL_DTYPES \
            and y.dtype == X.dtype:
        return hc_post_kernel(y, X, post, comb)
    return hc_post_reference(y, X, post, comb)
