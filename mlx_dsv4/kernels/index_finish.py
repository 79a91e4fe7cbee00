"""Indexer q / key finishing: the reference (composed from norm, rope and formats) and the Metal kernel
(metal_kernels/index_finish.metal).

x [B, L, H, D] (or [B, L, D]) -> optional weighted RMSNorm (the indexer keys), RoPE on the last
2 * freqs.size channels at position pos0 + t * pos_step for token t (q: start + t; keys: entry j at
j * ratio), then, with `simulate`, the trained-format round trip formats.indexer_roundtrip (Hadamard,
bf16, FP4 e2m1 in 1x32 blocks) cast back to x.dtype, exactly what formats.indexer_roundtrip(x).astype(x.dtype) returns.
"""

from __future__ import annotations

import mlx.core as mx

from ..formats import indexer_roundtrip
from ..norm import rms_norm
from ..rope import apply_rope, table
from . import fuse, registry

KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
KERNEL_WIDTHS = (32, 64, 128, 256)
ROWS_PER_THREADGROUP = 4  # SIMD groups (one row each) per threadgroup


def _check(x: mx.array, freqs: mx.array, pos0: int, pos_step: int, weight, D: int | None = None) -> None:
    """D: the row width (x's last axis unless x is a projection's [B, L, H D])."""
    D = D or x.shape[-1]
    if x.ndim not in (3, 4) or not mx.issubdtype(x.dtype, mx.floating):
        raise ValueError(f"index_finish: x must be a float [B, L, H, D] or [B, L, D], got {x.dtype} {x.shape}")
    if freqs.ndim != 1 or 2 * freqs.shape[0] > D:
        raise ValueError(f"index_finish: freqs must be [R/2] with R <= D = {D}, got {freqs.shape}")
    if not isinstance(pos0, (int, mx.array)) or not isinstance(pos_step, int) or pos_step < 1:
        raise ValueError(f"index_finish: pos0 must be an int or an int array, pos_step an int >= 1; got {pos0!r}, "
                         f"{pos_step!r}")
    if weight is not None and weight.shape != (D,):
        raise ValueError(f"index_finish: weight must be [{D}], got {weight.shape}")


def index_finish_reference(x: mx.array, freqs: mx.array, pos0: int, pos_step: int, simulate: bool,
                           weight: mx.array | None = None, eps: float = 0.0, cs=None) -> mx.array:
    """The reference path itself: rms_norm, cos_sin + apply_rope, formats.indexer_roundtrip, one fused
    piece after the angle table (kernels/fuse.py). cs: cos_sin of the positions, [L, R/2] or per batch
    row [B, L, R/2] (rows at their own positions, batch.py; pos0 / pos_step are then unused)."""
    _check(x, freqs, pos0, pos_step, weight)
    cos, sin = cs if cs is not None else table(freqs, pos0, x.shape[1], pos_step)
    w = () if weight is None else (weight,)
    return fuse.run(_finish, (simulate, float(eps)), x, cos, sin, *w)


def _finish(simulate, eps, x, cos, sin, *w):
    if w:
        x = rms_norm(x, w[0], eps)
    if x.ndim == 4:
        cos, sin = cos[..., None, :], sin[..., None, :]
    x = apply_rope(x, cos, sin)
    return indexer_roundtrip(x).astype(x.dtype) if simulate else x


def _kernel_ok(x: mx.array, freqs: mx.array, D: int | None = None) -> bool:
    return x.dtype in KERNEL_DTYPES and (D or x.shape[-1]) in KERNEL_WIDTHS and freqs.dtype == mx.float32


def _heads(x: mx.array, heads: int | None) -> tuple:
    """The rows' shape [B, L, heads, D] of a projection's x [B, L, heads D] (x's own without heads)."""
    if heads is None:
        return x.shape
    if x.ndim != 3 or not isinstance(heads, int) or heads < 1 or x.shape[-1] % heads:
        raise ValueError(f"index_finish: heads must be a positive int dividing the last axis of x [B, L, H*D], got "
                         f"{heads!r} for x {x.shape}")
    return (*x.shape[:2], heads, x.shape[-1] // heads)


def index_finish_kernel(x: mx.array, freqs: mx.array, pos0: int, pos_step: int, simulate: bool,
                        weight: mx.array | None = None, eps: float = 0.0, heads: int | None = None) -> mx.array:
    """The Metal kernel: one SIMD group per row, one launch. heads: x is [B, L, heads D] as a projection gives it
    (rows of width D; the output [B, L, heads, D])."""
    shape = _heads(x, heads)
    _check(x, freqs, pos0, pos_step, weight, shape[-1])
    if not _kernel_ok(x, freqs, shape[-1]):
        raise ValueError(f"index_finish kernel: x must be one of {KERNEL_DTYPES} with D in {KERNEL_WIDTHS} and "
                         f"freqs float32; got {x.dtype}, D={shape[-1]}, freqs {freqs.dtype}")
    if x.size == 0:
        return x.reshape(shape)
    D = shape[-1]
    threads = 32 * (x.size // D)
    # x as it is, q [B, L, H, D] or [B, L, H D] or keys [B, L, D]: the kernel reads H from its shape (no reshape
    # nodes)
    (out,) = registry.launch(
        "index_finish",
        [x, freqs, freqs if weight is None else weight.astype(mx.float32),  # unread without NORM
         registry.int_inputs(pos0, pos_step), registry.constant((eps, D**-0.5), mx.float32)],
        template={"T": x.dtype, "D": D, "R2": freqs.shape[0], "NORM": weight is not None, "QAT": bool(simulate)},
        grid=(threads, 1, 1), threadgroup=(min(threads, 32 * ROWS_PER_THREADGROUP), 1, 1),
        output_shapes=[shape], output_dtypes=[x.dtype],
    )
    return out


def index_finish(x: mx.array, freqs: mx.array, pos0: int, pos_step: int, simulate: bool,
                 weight: mx.array | None = None, eps: float = 0.0, cs=None, heads: int | None = None) -> mx.array:
    """Finished indexer q / keys in x.dtype: the kernel on Metal, the reference otherwise or with a
    per-row angle table `cs` (the kernel takes one scalar position). heads: x is [B, L, heads D] (q as its
    projection gives it), finished as its [B, L, heads, D] rows."""
    shape = _heads(x, heads)
    if cs is None and registry.use_kernels() and _kernel_ok(x, freqs, shape[-1]):
        return index_finish_kernel(x, freqs, pos0, pos_step, simulate, weight, eps, heads)
    return index_finish_reference(x.reshape(shape) if heads else x, freqs, pos0, pos_step, simulate, weight, eps, cs)
