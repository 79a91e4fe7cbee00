"""mHC Sinkhorn split: the pure-MLX reference and the Metal kernel (metal_kernels/sinkhorn_split.metal).

mix [..., (2+hc)*hc] -> pre [..., hc] = sigmoid(mix[:hc] * scale[0] + base[:hc]) + eps,
post [..., hc] = 2 sigmoid(mix[hc:2hc] * scale[1] + base[hc:2hc]), comb [..., hc, hc]: row softmax
of mix[2hc:] * scale[2] + base[2hc:] plus eps, a column normalisation, then iters - 1 rounds of
row and column normalisation (each divides by sum + eps). All float32.
"""

from __future__ import annotations

import math

import mlx.core as mx

from . import fuse, registry


def _hc(width: int) -> int:
    hc = round(math.sqrt(width + 1) - 1)  # (2 + hc) * hc = width
    if hc < 1 or (2 + hc) * hc != width:
        raise ValueError(f"sinkhorn_split: last dim of mixes must be (2+hc)*hc (24 for hc=4), got {width}")
    return hc


def _check(mixes: mx.array, scale: mx.array, base: mx.array, iters: int) -> int:
    hc = _hc(mixes.shape[-1])
    if scale.shape != (3,) or base.shape != (mixes.shape[-1],):
        raise ValueError(f"sinkhorn_split: scale must be [3] and base [{mixes.shape[-1]}], "
                         f"got {scale.shape} and {base.shape}")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"sinkhorn_split: iters must be an int >= 1, got {iters!r}")
    return hc


def _split(hc: int, iters: int, eps: float, mix: mx.array, scale: mx.array, base: mx.array):
    mix, scale, base = (a.astype(mx.float32) for a in (mix, scale, base))
    pre = mx.sigmoid(mix[..., :hc] * scale[0] + base[:hc]) + eps
    post = 2 * mx.sigmoid(mix[..., hc : 2 * hc] * scale[1] + base[hc : 2 * hc])
    c = mix[..., 2 * hc :] * scale[2] + base[2 * hc :]
    c = mx.softmax(c.reshape(*c.shape[:-1], hc, hc), axis=-1, precise=True) + eps
    c = c / (c.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(axis=-1, keepdims=True) + eps)
        c = c / (c.sum(axis=-2, keepdims=True) + eps)
    return pre, post, c


def sinkhorn_split_reference(mixes: mx.array, scale: mx.array, base: mx.array, iters: int = 20,
                             eps: float = 1e-6) -> tuple[mx.array, mx.array, mx.array]:
    """Pure MLX (compiled per hc/iters/eps: ~60 small elementwise ops fuse into a few kernels)."""
    hc = _check(mixes, scale, base, iters)
    return fuse.run(_split, (hc, iters, float(eps)), mixes, scale, base, always=True)


def sinkhorn_split_kernel(mixes: mx.array, scale: mx.array, base: mx.array, iters: int = 20,
                          eps: float = 1e-6) -> tuple[mx.array, mx.array, mx.array]:
    """The Metal kernel (hc = 4 only): 16 lanes per token, one launch for all tokens."""
    if _check(mixes, scale, base, iters) != 4:
        raise ValueError(f"sinkhorn_split kernel is specialised for hc=4, got mixes [..., {mixes.shape[-1]}]")
    lead = mixes.shape[:-1]
    n = math.prod(lead)
    if n == 0:
        return mx.zeros((*lead, 4)), mx.zeros((*lead, 4)), mx.zeros((*lead, 4, 4))
    f32 = mx.float32
    pre, post, comb = registry.launch(
        "sinkhorn_split",
        [mixes.reshape(n, 24).astype(f32), scale.astype(f32), base.astype(f32), registry.constant(eps, f32)],
        template={"ITERS": iters}, grid=(16 * n, 1, 1), threadgroup=(min(16 * n, 256), 1, 1),
        output_shapes=[(n, 4), (n, 4), (n, 4, 4)], output_dtypes=[f32, f32, f32],
    )
    return pre.reshape(*lead, 4), post.reshape(*lead, 4), comb.reshape(*lead, 4, 4)


def sinkhorn_split(mixes: mx.array, scale: mx.array, base: mx.array, iters: int = 20,
                   eps: float = 1e-6) -> tuple[mx.array, mx.array, mx.array]:
    """pre, post, comb (float32): the kernel on Metal for hc = 4, the reference otherwise."""
    if registry.use_kernels() and mixes.shape[-1] == 24:
        return sinkhorn_split_kernel(mixes, scale, base, iters, eps)
    return sinkhorn_split_reference(mixes, scale, base, iters, eps)
