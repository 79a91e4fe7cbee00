"""Manifold-constrained hyper-connections (mHC): four residual streams per token.

Each sub-layer reads a weighted sum of the streams (pre), writes its output back into every
stream (post) and mixes the streams with a doubly-stochastic matrix from 20 Sinkhorn rounds
(comb). Everything here runs in float32; the streams themselves are stored in the model dtype.
The mixing is X'_k = post_k * y + sum_j comb[j, k] * X_j: comb is applied transposed.
"""

from __future__ import annotations

import mlx.core as mx

from .kernels import hc as kernels_hc
from .kernels import sinkhorn_split as kernels_sinkhorn


def sinkhorn_split(mix: mx.array, scale: mx.array, base: mx.array, hc: int, iters: int, eps: float):
    """mix [..., (2+hc)*hc] -> pre [..., hc], post [..., hc], comb [..., hc, hc] (float32).

    One fused Metal kernel on a Mac, the compiled pure-MLX reference elsewhere (kernels/sinkhorn_split.py)."""
    if mix.shape[-1] != (2 + hc) * hc:
        raise ValueError(f"sinkhorn_split: mix must end in (2+hc)*hc = {(2 + hc) * hc} for hc={hc}, got {mix.shape}")
    return kernels_sinkhorn.sinkhorn_split(mix, scale, base, iters, eps)


def hc_pre(X, fn, scale, base, iters: int, eps: float, norm_eps: float, norm=None, after=None):
    """X [B, L, hc, d] -> (branch input u [B, L, d] in X.dtype, post, comb); norm = (weight, eps):
    u comes out through the sub-layer's RMSNorm. after = (y, post, comb) of the previous sub-layer, X its
    input streams: that sub-layer's hc_post comes first, and its streams X' are returned fourth.

    One fused Metal kernel on a Mac for hc = 4, the pure-MLX reference elsewhere (kernels/hc.py)."""
    return kernels_hc.hc_pre(X, fn, scale, base, iters, eps, norm_eps, norm, after)


def hc_post(y: mx.array, X: mx.array, post: mx.array, comb: mx.array) -> mx.array:
    """X'_k = post_k * y + sum_j comb[j, k] * X_j, in float32, stored back in X.dtype (kernels/hc.py)."""
    return kernels_hc.hc_post(y, X, post, comb)


def hc_head(X, fn, scale, base, eps: float, norm_eps: float) -> mx.array:
    """Final collapse of the streams: sigmoid weights only (no Sinkhorn, no post)."""
    pre = mx.sigmoid(kernels_hc.mixes(X, fn, norm_eps) * scale[0] + base) + eps
    return (pre[..., None] * X.astype(mx.float32)).sum(axis=-2).astype(X.dtype)
