"""RMSNorm as the reference computes it: fp32 statistics, weight applied in fp32, cast back."""

import mlx.core as mx
import mlx.nn as nn


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    xf = x.astype(mx.float32)
    y = xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(mx.float32)
    return y.astype(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self.weight, self.eps)
