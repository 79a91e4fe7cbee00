"""Finishing attention rows: the pure-MLX reference and the Metal kernel (metal_kernels/rows_finish.metal).

A row of width D (the last axis of x [B, L, D] or [B, L, H, D]) goes through, in this order and with the
reference's rounding points: optional RMSNorm (`norm`, with an optional `weight`), interleaved RoPE on the
last 2 len(freqs) channels at position pos0 + l step for the token at index l along L (`inverse` rotates
back), optional FP8 e4m3 1x64 block rounding of the first `fp8_nope` channels (0: none). Used for q (per-head
weightless norm), the window K = V (kv_norm + FP8), the inverse rotation of the attention output and the main
compressor's entries (norm, RoPE at j * ratio, FP8), and with freqs None (no RoPE) q_norm. One launch
instead of ~3-20 small ops each.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..formats import fp8_block_roundtrip
from ..norm import rms_norm
from ..rope import apply_rope, table
from . import fuse, registry

KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
MAX_D = 2048  # the kernel keeps a row in registers: D / 32 floats per lane (q_lora_rank 1536 in Pro)
ROWS_PER_THREADGROUP = 8  # SIMD groups (one row each) per threadgroup


def _check(x, freqs, weight, fp8_nope, step, dtype, heads=None) -> tuple[int, int]:
    """Raises ValueError naming the bad argument; returns (D, R)."""
    if x.ndim not in (3, 4) or not mx.issubdtype(x.dtype, mx.floating):
        raise ValueError(f"rows_finish: x must be a float [B, L, D] or [B, L, H, D] array, got {x.dtype} {x.shape}")
    if heads is not None and (x.ndim != 3 or not isinstance(heads, int) or heads < 1 or x.shape[-1] % heads):
        raise ValueError(f"rows_finish: heads must be a positive int dividing the last axis of x [B, L, H*D], got "
                         f"{heads!r} for x {x.shape}")
    D = x.shape[-1] // (heads or 1)
    if freqs is not None and (freqs.ndim != 1 or freqs.dtype != mx.float32 or not 0 < 2 * freqs.shape[0] <= D):
        raise ValueError(f"rows_finish: freqs must be None (no RoPE) or float32 [R / 2] with 0 < R <= D = {D}, "
                         f"got {freqs.dtype} {freqs.shape}")
    if D % 2:
        raise ValueError(f"rows_finish: x's last axis must be even (rotated pairs), got {D}")
    if weight is not None and weight.shape != (D,):
        raise ValueError(f"rows_finish: weight must be [D] = [{D}], got {weight.shape}")
    if not 0 <= fp8_nope <= D:
        raise ValueError(f"rows_finish: fp8_nope must be in 0..{D}, got {fp8_nope}")
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"rows_finish: step must be a positive int, got {step!r}")
    if dtype is not None and not mx.issubdtype(dtype, mx.floating):
        raise ValueError(f"rows_finish: dtype must be a float dtype, got {dtype}")
    return D, 0 if freqs is None else 2 * freqs.shape[0]


def rows_finish_reference(x, freqs, pos0: int, step: int = 1, *, norm=False, weight=None, eps=1e-6,
                          inverse=False, fp8_nope=0, dtype=None, cs=None) -> mx.array:
    """Pure MLX, the model's own ops: x.astype(dtype), rms_norm, cos_sin + apply_rope, the trained FP8
    rounding (formats.fp8_block_roundtrip) of the first fp8_nope channels. cs: cos_sin of these positions when
    the caller shares one table across calls (attention's q, kv and output rotate at the same
    positions), so a reference decode step builds it once, not thrice;
    [L, R/2], or [B, L, R/2] for rows at their own positions (batch.py; pos0 is then unused).
    The chain after the table is one fused piece (kernels/fuse.py)."""
    _check(x, freqs, weight, fp8_nope, step, dtype)
    L = x.shape[1]
    rope = ()
    if freqs is not None:
        rope = cs if cs is not None else table(freqs, pos0, L, step)
    w = () if weight is None or not norm else (weight,)
    static = (dtype, norm, bool(w), float(eps), bool(rope), inverse, fp8_nope)
    return fuse.run(_finish, static, x, *w, *rope)


def _finish(dtype, norm, has_weight, eps, has_rope, inverse, fp8_nope, x, *arrays):
    y = x if dtype is None else x.astype(dtype)
    if norm:
        y = rms_norm(y, arrays[0] if has_weight else None, eps)
    if has_rope:
        cos, sin = arrays[-2:]
        if x.ndim == 4:  # one angle per position, shared by the heads ([L] or per batch row [B, L] tables)
            cos, sin = cos[..., None, :], sin[..., None, :]
        y = apply_rope(y, cos, sin, inverse=inverse)
    return fp8_block_roundtrip(y, block=64, dims=fp8_nope) if fp8_nope else y


def _kernel_ok(x, freqs, pos0, step, dtype, D=None) -> bool:
    """Float inputs and output, a row that fits the registers, positions exact in int32 (as the reference's)."""
    L = x.shape[1]
    out = x.dtype if dtype is None else dtype
    last = pos0 + max(L - 1, 0) * step
    fits = isinstance(pos0, mx.array) or (-(2**31) <= min(pos0, last) and max(pos0, last) < 2**31)
    return x.dtype in KERNEL_DTYPES and out in KERNEL_DTYPES and (D or x.shape[-1]) <= MAX_D and fits


def launch_geometry(rows: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    return (32, rows, 1), (32, min(rows, ROWS_PER_THREADGROUP), 1)


def rows_finish_kernel(x, freqs, pos0: int, step: int = 1, *, norm=False, weight=None, eps=1e-6,
                       inverse=False, fp8_nope=0, dtype=None) -> mx.array:
    """The Metal kernel: one SIMD group per row, one launch."""
    D, R = _check(x, freqs, weight, fp8_nope, step, dtype)
    if not _kernel_ok(x, freqs, pos0, step, dtype):
        raise ValueError(f"rows_finish kernel: x and dtype must be float32/float16/bfloat16 with D <= {MAX_D} and "
                         f"positions within int32, got {x.dtype} -> {dtype}, D = {D}, pos0 {pos0}, step {step}")
    return _launch(x, freqs, pos0, step, D, R, norm, weight, eps, inverse, fp8_nope, dtype)


def _launch(x, freqs, pos0, step, D, R, norm, weight, eps, inverse, fp8_nope, dtype, shape=None) -> mx.array:
    """rows_finish_kernel once its arguments are checked (the dispatcher checks them only once); shape: the
    output's (the same rows in another shape, what the consumer takes: no reshape node after the launch)."""
    T = x.dtype if dtype is None else dtype
    B, L = x.shape[:2]
    H = x.shape[2] if x.ndim == 4 else x.shape[2] // D  # rank 3: [B, L, H D], H rows of width D per position
    rows = B * L * H
    shape = (x.shape if H == 1 or x.ndim == 4 else (B, L, H, D)) if shape is None else tuple(shape)
    if rows == 0:
        return mx.zeros(shape, dtype=T)
    grid, tg = launch_geometry(rows)
    pos = registry.int_inputs(pos0, step)
    if freqs is None:  # no RoPE (R = 0): the kernel never reads inv_freq
        freqs = registry.placeholder((8,), mx.float32)
    w = freqs if weight is None else weight  # never read without a weight
    tmpl = {"T": T, "D": D, "R": R, "NOPE": fp8_nope, "NORM": bool(norm), "WEIGHT": bool(norm and weight is not None),
            "INVERSE": bool(inverse)}
    # x as it is, [B, L, D] or [B, L, H, D]: the kernel reads H from its rank (no reshape nodes)
    (out,) = registry.launch("rows_finish", [x, w, freqs, pos, registry.constant(eps, mx.float32)],
                             template=tmpl, grid=grid, threadgroup=tg, output_shapes=[shape], output_dtypes=[T])
    return out


def rows_finish(x, freqs, pos0: int, step: int = 1, *, norm=False, weight=None, eps=1e-6, inverse=False,
                fp8_nope=0, dtype=None, cs=None, shape=None, heads=None) -> mx.array:
    """Finished rows in `dtype` (default x.dtype): the kernel on Metal, the reference otherwise
    (`cs`: see rows_finish_reference; the kernel computes its angles itself). shape: the output's, the same
    elements in another shape (default x's; the kernel writes it directly). heads: x is [B, L, heads D] as a
    projection gives it, rows of width D (the output [B, L, heads, D] by default; the kernel reads x as it is)."""
    if shape is not None and (len(shape) < 1 or -1 in shape or int(np.prod(shape)) != x.size):
        raise ValueError(f"rows_finish: shape {tuple(shape)} does not hold the {x.size} elements of x {x.shape}")
    if registry.use_kernels() or heads is not None:  # (the reference checks its own arguments)
        D, R = _check(x, freqs, weight, fp8_nope, step, dtype, heads)
        if registry.use_kernels() and _kernel_ok(x, freqs, pos0, step, dtype, D):
            return _launch(x, freqs, pos0, step, D, R, norm, weight, eps, inverse, fp8_nope, dtype, shape)
        if heads is not None:
            x = x.reshape(*x.shape[:2], heads, D)
    y = rows_finish_reference(x, freqs, pos0, step, norm=norm, weight=weight, eps=eps, inverse=inverse,
                              fp8_nope=fp8_nope, dtype=dtype, cs=cs)
    return y if shape is None else y.reshape(shape)
