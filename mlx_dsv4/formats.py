"""The numeric formats DeepSeek-V4 was trained with, as pure MLX ops (traceable, CPU and Metal).

E8M0 is a bare power-of-two exponent byte (2^(b-127); 0 is the subnormal 2^-127, 255 is NaN) used
for every block scale. FP8 e4m3fn (bias 7, 3 mantissa bits, max 448, no infinities, NaN 0x7f/0xff)
holds the dense weights and the simulated window-KV / compressed-entry channels; FP4 e2m1 (codes
0..15, bit 3 the sign, values 0..6) holds the routed experts, two codes per byte with element 2k in
the low nibble, and the simulated indexer q/k. A block of `block` consecutive values on the last
axis shares the scale 2^ceil(log2(amax * fp32(1/qmax))), amax floored (1e-4 for FP8, 6*2^-126 for
FP4); values are multiplied by the exact reciprocal of that scale, clamped to +-qmax and rounded to
nearest-even. The indexer additionally applies the normalised Sylvester Walsh-Hadamard rotation
(fp32, rounded to bf16) before its FP4 step. Scales are derived from float bits, never log2/exp,
because one wrong exponent changes a whole block (spec sections 4.1, 4.2, 7.2-7.4). Round trips
are defined as dequantize(quantize(x)), so a compact cache that stores the codes and exponent
bytes reads back exactly what the simulation computes.

Where they apply: with the simulation on (Model.simulate_qat, as the reference runs) the window KV
and compressed entries pass through fp8_block_roundtrip on their non-RoPE channels, and the indexer's
q and keys through indexer_roundtrip. Off, both are identity: the Hadamard is orthogonal, so dropping
it on q and k together leaves q . k unchanged.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_AMAX_FLOOR = 1e-4
FP4_AMAX_FLOOR = 6.0 * 2.0**-126

_E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)
_E2M1_TABLE = mx.array(_E2M1)
# Midpoints between consecutive e2m1 magnitudes; at a tie, round-to-nearest-even goes to the even
# code, i.e. up (>=) exactly when the lower code is odd.
_E2M1_MIDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True),
              (2.5, False), (3.5, True), (5.0, False))


def _check_dtype(x: mx.array, name: str, ok: tuple) -> None:
    if x.dtype not in ok:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in ok]}, got {x.dtype}")


def _check_float(x: mx.array, name: str) -> None:
    if not mx.issubdtype(x.dtype, mx.floating):
        raise TypeError(f"{name}: expected a floating-point array, got {x.dtype}")


# ---- scalar codecs ----------------------------------------------------------------------------


def e8m0_to_float(b: mx.array) -> mx.array:
    """uint8 exponent bytes -> float32 2^(b-127), exactly (built from bits; 0 -> 2^-127, 255 -> NaN)."""
    _check_dtype(b, "e8m0_to_float", (mx.uint8,))
    u = b.astype(mx.uint32)
    bits = mx.where(u == 0, mx.array(0x00400000, mx.uint32), u << 23)
    bits = mx.where(u == 255, mx.array(0x7FC00000, mx.uint32), bits)
    return bits.view(mx.float32)


def e4m3_to_float(b: mx.array) -> mx.array:
    """uint8 e4m3fn codes -> float32 (exact for all 256 codes; 0x7f/0xff are NaN, 0x80 is -0)."""
    _check_dtype(b, "e4m3_to_float", (mx.uint8,))
    return mx.from_fp8(b, dtype=mx.float32)


def float_to_e4m3(x: mx.array) -> mx.array:
    """float -> uint8 e4m3fn code, round-to-nearest-even; keeps the sign of zero.

    Callers clamp to +-448 first: MLX saturates only at |x| >= 480, so [464, 480) would round to the
    NaN code. NaN and +-inf map to +-448 (code 0x7e/0xfe).
    """
    _check_float(x, "float_to_e4m3")
    return mx.to_fp8(x.astype(mx.float32))


def e2m1_to_float(codes: mx.array) -> mx.array:
    """uint8 e2m1 codes 0..15 -> float32 (code 8 is -0). Codes above 15 are not checked (traced)."""
    _check_dtype(codes, "e2m1_to_float", (mx.uint8,))
    return mx.take(_E2M1_TABLE, codes.astype(mx.uint32))


def float_to_e2m1(x: mx.array) -> mx.array:
    """float -> uint8 e2m1 code, round-to-nearest-even, saturating at +-6; keeps the sign of zero.

    NaN maps to code 0 or 8 (callers only pass finite, clamped values).
    """
    _check_float(x, "float_to_e2m1")
    x = x.astype(mx.float32)
    a = mx.abs(x)
    code = mx.zeros(x.shape, mx.uint8)
    for mid, up_at_tie in _E2M1_MIDS:
        code = code + ((a >= mid) if up_at_tie else (a > mid)).astype(mx.uint8)
    sign = (x.view(mx.uint32) >> 31).astype(mx.uint8)
    return code | (sign << 3)


def pack_fp4(codes: mx.array) -> mx.array:
    """uint8 codes [..., n] (n even) -> uint8 bytes [..., n/2]; element 2k low nibble, 2k+1 high."""
    _check_dtype(codes, "pack_fp4", (mx.uint8,))
    n = codes.shape[-1] if codes.ndim else 0
    if n % 2 or codes.ndim == 0:
        raise ValueError(f"pack_fp4: last axis must be even, got shape {tuple(codes.shape)}")
    pairs = codes.reshape(*codes.shape[:-1], n // 2, 2)
    return (pairs[..., 0] & 15) | ((pairs[..., 1] & 15) << 4)


def unpack_fp4(packed: mx.array) -> mx.array:
    """int8/uint8 bytes [..., m] -> uint8 codes [..., 2m] (inverse of pack_fp4)."""
    _check_dtype(packed, "unpack_fp4", (mx.uint8, mx.int8))
    if packed.ndim == 0:
        raise ValueError("unpack_fp4: expected at least one axis, got a scalar")
    p = packed.view(mx.uint8)
    codes = mx.stack([p & 15, p >> 4], axis=-1)
    return codes.reshape(*p.shape[:-1], 2 * p.shape[-1])


# ---- block scaling ------------------------------------------------------------------------------


def _ceil_log2_byte(y: mx.array) -> mx.array:
    """E8M0 byte of 2^ceil(log2(y)) for float32 y > 0, from the bits: exponent + (mantissa != 0).

    Non-finite y gives 255 (NaN), so a block holding inf/NaN dequantizes to NaN.
    """
    bits = y.view(mx.uint32)
    e = ((bits >> 23) & 0xFF).astype(mx.int32) + ((bits & 0x7FFFFF) != 0).astype(mx.int32)
    return mx.clip(e, 0, 255).astype(mx.uint8)


def _blocks(x: mx.array, block: int, dims: int | None, name: str) -> tuple[mx.array, int, int]:
    """x[..., :dims] as float32 [..., nb, block] (zero-padded tail block), plus dims and nb."""
    _check_float(x, name)
    if x.ndim == 0:
        raise ValueError(f"{name}: expected at least one axis, got a scalar")
    D = x.shape[-1]
    dims = D if dims is None else dims
    if not isinstance(block, (int, np.integer)) or block <= 0:
        raise ValueError(f"{name}: block must be a positive int, got {block!r}")
    if not 0 < dims <= D:
        raise ValueError(f"{name}: dims must be in 1..{D} (last axis), got {dims}")
    nb = -(-dims // block)
    v = x[..., :dims].astype(mx.float32)
    if nb * block != dims:  # zeros never raise a block's amax, which is floored above 0 anyway
        pad = [(0, 0)] * (v.ndim - 1) + [(0, nb * block - dims)]
        v = mx.pad(v, pad)
    return v.reshape(*v.shape[:-1], nb, block), dims, nb


def _block_quantize(x, block, dims, qmax, floor, encode, name):
    v, dims, nb = _blocks(x, block, dims, name)
    amax = mx.maximum(mx.max(mx.abs(v), axis=-1, keepdims=True), floor)
    exps = _ceil_log2_byte(amax * mx.array(1.0 / qmax, mx.float32))  # fp32(1/qmax), as trained
    inv = e8m0_to_float(mx.array(254, mx.uint8) - exps)  # 2^(127-b): the exact reciprocal
    # The clamp mirrors the trained kernel; with the scale rounded up it never binds for finite input
    # (|v * inv| <= qmax * (1 + 2e-8)), but it keeps the e4m3 NaN band [464, 480) out of reach.
    codes = encode(mx.clip(v * inv, -qmax, qmax))
    codes = codes.reshape(*codes.shape[:-2], nb * block)[..., :dims]
    return codes, exps.squeeze(-1)


def _block_dequantize(codes, exps, block, out_dtype, decode, name):
    _check_dtype(codes, name, (mx.uint8,))
    _check_dtype(exps, name, (mx.uint8,))
    if codes.ndim == 0 or not isinstance(block, (int, np.integer)) or block <= 0:
        raise ValueError(f"{name}: need codes with a last axis and a positive int block, got "
                         f"shape {tuple(codes.shape)}, block {block!r}")
    dims, nb = codes.shape[-1], exps.shape[-1] if exps.ndim else -1
    if nb != -(-dims // block) or codes.shape[:-1] != exps.shape[:-1]:
        raise ValueError(f"{name}: exps shape {tuple(exps.shape)} does not match codes "
                         f"{tuple(codes.shape)} with block {block}")
    if nb * block != dims:
        codes = mx.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, nb * block - dims)])
    vals = decode(codes.reshape(*codes.shape[:-1], nb, block)) * e8m0_to_float(exps)[..., None]
    return vals.reshape(*vals.shape[:-2], nb * block)[..., :dims].astype(out_dtype)


def _roundtrip(x, dims, quant, dequant):
    dims = x.shape[-1] if dims is None else dims
    codes, exps = quant(x, dims=dims)
    y = dequant(codes, exps, out_dtype=x.dtype)  # exact in bf16/fp32: few mantissa bits, 2^k scale
    return y if dims == x.shape[-1] else mx.concatenate([y, x[..., dims:]], axis=-1)


def fp8_block_quantize(x: mx.array, block: int = 64, dims: int | None = None) -> tuple[mx.array, mx.array]:
    """x[..., :dims] -> (e4m3 codes uint8 [..., dims], E8M0 exps uint8 [..., ceil(dims/block)]).

    Blocks start at dim 0; a partial last block is scaled by its own amax.
    """
    return _block_quantize(x, block, dims, FP8_MAX, FP8_AMAX_FLOOR, float_to_e4m3, "fp8_block_quantize")


def fp8_block_dequantize(codes: mx.array, exps: mx.array, block: int = 64,
                         out_dtype: mx.Dtype = mx.float32) -> mx.array:
    """Inverse of fp8_block_quantize: e4m3(code) * 2^(exp-127), computed in fp32, cast to out_dtype."""
    return _block_dequantize(codes, exps, block, out_dtype, e4m3_to_float, "fp8_block_dequantize")


def fp8_block_roundtrip(x: mx.array, block: int = 64, dims: int | None = None) -> mx.array:
    """FP8 simulation of x[..., :dims] (window KV / compressed entries: dims = nope dims); the rest
    of the last axis passes through untouched. Returns x.dtype."""
    return _roundtrip(x, dims, lambda v, dims: fp8_block_quantize(v, block, dims),
                      lambda c, e, out_dtype: fp8_block_dequantize(c, e, block, out_dtype))


def fp4_block_quantize(x: mx.array, block: int = 32, dims: int | None = None) -> tuple[mx.array, mx.array]:
    """x[..., :dims] -> (e2m1 codes uint8 0..15 [..., dims], E8M0 exps [..., ceil(dims/block)]).

    Codes are one per byte; pack_fp4 halves them for storage.
    """
    return _block_quantize(x, block, dims, FP4_MAX, FP4_AMAX_FLOOR, float_to_e2m1, "fp4_block_quantize")


def fp4_block_dequantize(codes: mx.array, exps: mx.array, block: int = 32,
                         out_dtype: mx.Dtype = mx.float32) -> mx.array:
    """Inverse of fp4_block_quantize: e2m1(code) * 2^(exp-127) in fp32, cast to out_dtype."""
    return _block_dequantize(codes, exps, block, out_dtype, e2m1_to_float, "fp4_block_dequantize")


def fp4_block_roundtrip(x: mx.array, block: int = 32, dims: int | None = None) -> mx.array:
    """FP4 simulation of x[..., :dims]; the rest passes through. Returns x.dtype."""
    return _roundtrip(x, dims, lambda v, dims: fp4_block_quantize(v, block, dims),
                      lambda c, e, out_dtype: fp4_block_dequantize(c, e, block, out_dtype))


# ---- indexer rotation ---------------------------------------------------------------------------


def hadamard(x: mx.array) -> mx.array:
    """Normalised Sylvester-order Walsh-Hadamard transform of the last axis (a power of two), float32.

    Uses MLX's native O(n log n) primitive (CPU and Metal) on fp32 input: it sums in fp32 and scales
    by fp32(n^-1/2) once at the end, which is what the trained vectors need (pre-scaling the
    matrix, or summing in bf16, changes last bits). Chosen over a reshape butterfly and a
    cached-matrix matmul, which it beat 2-10x on CPU for n = 128 (benchmarks/bench_formats.py).
    """
    _check_float(x, "hadamard")
    n = x.shape[-1] if x.ndim else 0
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard: last axis must be a power of two, got shape {tuple(x.shape)}")
    return mx.hadamard_transform(x.astype(mx.float32), scale=float(n) ** -0.5)


def indexer_roundtrip(x: mx.array, block: int = 32) -> mx.array:
    """Indexer q/k simulation: Hadamard (fp32), rounded to bf16, then FP4 1x`block` round trip.

    Returns x.dtype (the FP4 values times a power of two are exact in bf16 and fp32).
    """
    r = hadamard(x).astype(mx.bfloat16)
    return fp4_block_roundtrip(r, block).astype(x.dtype)
