"""Interleaved RoPE on the trailing `rope_head_dim` channels, with V4's per-layer tables.

Sliding-only layers (ratio 0) use plain `rope_theta`; compressed layers (ratio 4 / 128) use
`compress_rope_theta` with YaRN. There is no YaRN mscale: cos/sin have magnitude 1.
One table per layer serves q, the window KV, the compressed entries, the indexer and the
inverse rotation of the attention output (K = V carries position, so the output is rotated back).
"""

from __future__ import annotations

import functools
import math
import threading

import mlx.core as mx
import numpy as np

from .config import ModelArgs
from .kernels import registry


def inv_freq(args: ModelArgs, ratio: int) -> mx.array:
    """Per-pair angular frequency theta'_i (float32, rope_head_dim // 2 entries). Layers of one kind
    share the very same array, so that their position tables are built once per step (`table`)."""
    base = args.rope_theta if ratio == 0 else args.compress_rope_theta
    yarn = ratio != 0 and args.original_seq_len > 0 and args.rope_factor != 1.0
    return _inv_freq(args.rope_head_dim, float(base), yarn, args.original_seq_len, float(args.rope_factor),
                     float(args.beta_fast), float(args.beta_slow))


@functools.lru_cache(maxsize=64)
def _inv_freq(dim: int, base: float, yarn: bool, original_seq_len: int, factor: float, beta_fast: float,
              beta_slow: float) -> mx.array:
    theta = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if yarn:
        def corr(n_rot: float) -> float:
            return dim * math.log(original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))

        lo = max(math.floor(corr(beta_fast)), 0)
        hi = min(math.ceil(corr(beta_slow)), dim - 1)
        if hi == lo:
            hi += 0.001  # avoid a zero-width ramp
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
        theta = theta * (1 - ramp) + theta / factor * ramp
    t = mx.array(theta.astype(np.float32))
    mx.eval(t)  # a constant, never part of a step's graph
    return t


_TABLES: dict = {}  # (thread, id(freqs), pos0, n, step) -> (freqs, cos, sin): this step's tables
_MAX_TABLES = 32


def table(freqs: mx.array, pos0: int, n: int, step: int = 1) -> tuple[mx.array, mx.array]:
    """cos_sin of positions pos0, pos0 + step, ... (n of them), built once per thread and frequency array:
    the layers of a step that share `freqs` (inv_freq) share the table instead of building one each."""
    if isinstance(pos0, mx.array):  # a compiled step's position: a shared constant for the offsets, so that
        # mx.compile merges the layers' tables of the same freqs (an arange node, never merged, per layer before)
        return cos_sin(pos0 + registry.constant(tuple(range(0, n * step, step)), mx.int32), freqs)
    key = (threading.get_ident(), id(freqs), pos0, n, step)
    hit = _TABLES.get(key)
    if hit is not None and hit[0] is freqs:  # `is`: an id can be reused once its array is gone
        return hit[1], hit[2]
    cs = cos_sin(mx.arange(pos0, pos0 + n * step, step), freqs)
    while len(_TABLES) >= _MAX_TABLES:
        _TABLES.pop(next(iter(_TABLES)), None)
    _TABLES[key] = (freqs, *cs)
    return cs


def cos_sin(positions: mx.array, freqs: mx.array) -> tuple[mx.array, mx.array]:
    """Angles p * theta for positions [...] -> cos, sin of shape [..., rope_dim // 2] (float32)."""
    ang = positions.astype(mx.float32)[..., None] * freqs
    return mx.cos(ang), mx.sin(ang)


# pair (x0, x1) -> (x0 c - x1 s, x1 c + x0 s), and the inverse rotation
_SIGNS = {False: mx.array([-1.0, 1.0], dtype=mx.float32), True: mx.array([1.0, -1.0], dtype=mx.float32)}


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array, inverse: bool = False) -> mx.array:
    """Rotate adjacent pairs (2i, 2i+1) of the last 2*cos.shape[-1] channels of x.

    cos/sin must broadcast against x[..., :rope_dim // 2] (e.g. [L, 1, r/2] for x [B, L, H, D]).
    Computed in float32 and cast back to x.dtype. Written as pairs * cos + swapped pairs * (-sin, sin):
    the same products and sums as (x0 cos - x1 sin, x0 sin + x1 cos) bit for bit, in fewer graph
    nodes than slicing and re-stacking the two halves (kernels/fuse.py says why that counts).
    """
    r = 2 * cos.shape[-1]
    nope, rope = x[..., :-r], x[..., -r:]
    pairs = rope.astype(mx.float32).reshape(*rope.shape[:-1], r // 2, 2)
    signed = sin[..., None] * _SIGNS[inverse]
    out = (pairs * cos[..., None] + pairs[..., ::-1] * signed).reshape(rope.shape)
    return mx.concatenate([nope, out.astype(x.dtype)], axis=-1)
