"""Encoding rows for the compact cache: the references (the formats functions themselves) and the Metal
kernel (metal_kernels/store_encode.metal).

fp8_encode: rows [..., D] -> (e4m3 codes uint8 [..., nope], E8M0 exps uint8 [..., ceil(nope / 64)]), the
compressed entries' non-RoPE channels (kvstore.FP8Rows). fp4_encode: rows [..., D] -> (e2m1 codes packed two
per byte [..., D / 2], E8M0 exps [..., D / 32]), the indexer keys (kvstore.FP4Rows). One launch instead of
~20-40 small ops per append.
"""

from __future__ import annotations

import numbers

import mlx.core as mx

from ..formats import fp4_block_quantize, fp8_block_quantize, pack_fp4
from . import registry

KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
ROWS_PER_THREADGROUP = 8  # SIMD groups (one row each) per threadgroup


def _check(rows, nope: int | None) -> int:
    """Raises ValueError naming the bad argument; returns D. nope None: FP4 (all D channels, packed)."""
    if not isinstance(rows, mx.array) or rows.ndim == 0 or not mx.issubdtype(rows.dtype, mx.floating):
        raise ValueError(f"store_encode: rows must be a float array [..., D], got "
                         f"{getattr(rows, 'dtype', type(rows))} {getattr(rows, 'shape', '')}")
    D = rows.shape[-1]
    if nope is None and (D == 0 or D % 2):
        raise ValueError(f"fp4_encode: rows' last axis must be even and > 0 (codes are packed in pairs), got {D}")
    if nope is not None and (not isinstance(nope, numbers.Integral) or isinstance(nope, bool) or not 0 < nope <= D):
        raise ValueError(f"fp8_encode: nope must be an int in 1..{D} (rows' last axis), got {nope!r}")
    return D


def fp8_encode_reference(rows: mx.array, nope: int, block: int = 64) -> tuple[mx.array, mx.array]:
    return fp8_block_quantize(rows, block=block, dims=nope)


def fp4_encode_reference(rows: mx.array, block: int = 32) -> tuple[mx.array, mx.array]:
    codes, exps = fp4_block_quantize(rows, block=block)
    return pack_fp4(codes), exps


def launch_geometry(rows: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    return (32, rows, 1), (32, min(rows, ROWS_PER_THREADGROUP), 1)


def _kernel(rows: mx.array, nope: int | None) -> tuple[mx.array, mx.array, mx.array | None]:
    """(codes, exps, rows[..., nope:] (FP8 with nope < D; else None))."""
    D = _check(rows, nope)
    fp4, n = nope is None, D if nope is None else int(nope)
    if rows.dtype not in KERNEL_DTYPES:
        raise ValueError(f"store_encode kernel: rows must be one of {KERNEL_DTYPES}, got {rows.dtype}")
    lead = rows.shape[:-1]
    R = rows.size // D
    nb = -(-n // (32 if fp4 else 64))
    width = n // 2 if fp4 else n
    rest = 0 if fp4 else D - n
    if R == 0:
        return mx.zeros((*lead, width), mx.uint8), mx.zeros((*lead, nb), mx.uint8), rows[..., n:] if rest else None
    grid, tg = launch_geometry(R)
    # the kernel indexes rows by the grid alone (it reads no shape): rows and outputs keep the caller's shapes,
    # no reshape nodes around the launch (a compiled decode step replays each one)
    codes, exps, tail = registry.launch(
        "store_encode", [rows], template={"D": D, "N": n, "FP4": fp4}, grid=grid, threadgroup=tg,
        output_shapes=[(*lead, width), (*lead, nb), (*lead, rest) if rest else (1,)],
        output_dtypes=[mx.uint8, mx.uint8, rows.dtype])
    return codes, exps, tail if rest else None


def fp8_encode_kernel(rows: mx.array, nope: int, rest: bool = False) -> tuple[mx.array, ...]:
    """The Metal kernel: one SIMD group per row, one launch; rest: also rows[..., nope:], which it copies."""
    codes, exps, tail = _kernel(rows, nope)
    return (codes, exps, rows[..., nope:] if tail is None else tail) if rest else (codes, exps)


def fp4_encode_kernel(rows: mx.array) -> tuple[mx.array, mx.array]:
    return _kernel(rows, None)[:2]


def fp8_encode(rows: mx.array, nope: int, block: int = 64, rest: bool = False) -> tuple[mx.array, ...]:
    """(codes, exps) of rows[..., :nope] in FP8 1 x block blocks: the kernel on Metal (block 64, the trained
    one), the reference otherwise. rest: also rows[..., nope:], the channels stored as they are (from the kernel:
    no slice node)."""
    _check(rows, nope)
    if registry.use_kernels() and rows.dtype in KERNEL_DTYPES and block == 64:
        return fp8_encode_kernel(rows, nope, rest)
    return (*fp8_encode_reference(rows, nope, block), *((rows[..., nope:],) if rest else ()))


def fp4_encode(rows: mx.array, block: int = 32) -> tuple[mx.array, mx.array]:
    """(packed codes, exps) of rows in FP4 1 x block blocks: the kernel on Metal (block 32, the trained one),
    the reference otherwise."""
    _check(rows, None)
    if registry.use_kernels() and rows.dtype in KERNEL_DTYPES and block == 32:
        return fp4_encode_kernel(rows)
    return fp4_encode_reference(rows, block)
