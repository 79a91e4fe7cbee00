"""The lossless repacks are bit-exact: MLX's own dequantization of the repacked arrays equals a
straightforward numpy decoding of the official bytes (written here from the format definitions),
for every code, scales across the exponent range, and partial 128x128 blocks."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from ckpt_util import dequant_fp4, dequant_fp8

from mlx_dsv4.checkpoint.transforms import convert, dequantize

RNG = np.random.default_rng(0)


def _fp4(out, inp, lo=100, hi=150):
    w = RNG.integers(0, 256, (out, inp // 2), dtype=np.uint8).view(np.int8)
    return w, RNG.integers(lo, hi, (out, inp // 32), dtype=np.uint8)


def _fp8(out, inp, lo=100, hi=150):
    w = RNG.integers(0, 256, (out, inp), dtype=np.uint8)
    w.reshape(-1)[:256] = np.arange(256)  # every code, NaNs included
    return w, RNG.integers(lo, hi, (-(-out // 128), -(-inp // 128)), dtype=np.uint8)


def _mx_dequant(parts, bits, mode):
    return np.array(mx.dequantize(parts["weight"], parts["scales"], group_size=32, bits=bits, mode=mode,
                                  dtype=mx.float32))


def _same(a, b):  # equality of float32 values (a float64 reference beyond fp32 range is inf), NaN == NaN
    with np.errstate(over="ignore"):
        return np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), equal_nan=True)


@pytest.mark.parametrize("shape", [(64, 64), (200, 96), (3, 4096)])
def test_fp4_to_mxfp4_bit_exact(shape):
    w, s = _fp4(*shape)
    parts = convert("fp4", "mxfp4", mx.array(w), mx.array(s), shape, 64)
    assert parts["weight"].dtype == mx.uint32 and parts["weight"].shape == (shape[0], shape[1] // 8)
    assert np.array(parts["weight"]).tobytes() == w.tobytes()  # a pure reinterpretation
    assert _same(_mx_dequant(parts, 4, "mxfp4"), dequant_fp4(w, s))


def test_fp4_extreme_scales_bit_exact():
    w, s = _fp4(16, 256, lo=0, hi=255)  # 2^-127 (subnormal) .. 2^127 (some values overflow to inf)
    s[0, :2] = (0, 254)
    parts = convert("fp4", "mxfp4", mx.array(w), mx.array(s), (16, 256), 64)
    assert _same(_mx_dequant(parts, 4, "mxfp4"), dequant_fp4(w, s))


@pytest.mark.parametrize("shape", [(256, 256), (200, 96), (130, 160), (64, 32)])
def test_fp8_to_mxfp8_bit_exact(shape):
    """Includes partial blocks: 200 rows = 1.56 block rows, 96 and 160 columns = partial columns."""
    w, s = _fp8(*shape)
    parts = convert("fp8", "mxfp8", mx.array(w), mx.array(s), shape, 64)
    assert parts["scales"].shape == (shape[0], shape[1] // 32)
    assert _same(_mx_dequant(parts, 8, "mxfp8"), dequant_fp8(w, s))


def test_fp4_to_mxfp8_bit_exact():
    w, s = _fp4(40, 128)
    parts = convert("fp4", "mxfp8", mx.array(w), mx.array(s), (40, 128), 64)
    assert _same(_mx_dequant(parts, 8, "mxfp8"), dequant_fp4(w, s))


@pytest.mark.parametrize("source", ["fp8", "fp4"])
def test_float_outputs_are_the_official_values(source):
    w, s = _fp8(200, 96) if source == "fp8" else _fp4(40, 128)
    shape = (200, 96) if source == "fp8" else (40, 128)
    ref = dequant_fp8(w, s) if source == "fp8" else dequant_fp4(w, s)
    x = convert(source, "fp32", mx.array(w), mx.array(s), shape, 64)["weight"]
    assert _same(np.array(x), ref)
    finite = np.isfinite(ref)  # FP8/FP4 values times 2^k are exact in bf16 (NaN stays NaN)
    b = np.array(convert(source, "bf16", mx.array(w), mx.array(s), shape, 64)["weight"].astype(mx.float32))
    assert _same(b[finite], ref[finite]) and np.isnan(b[~finite]).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_affine_quantizes_the_official_values(bits):
    """Lossy by design; what must hold is that the affine quantization starts from the exact
    official values (decoded here in numpy, rounded to bf16 exactly) and nothing else."""
    w, s = _fp8(128, 256, lo=120, hi=124)
    ref = dequant_fp8(w, s)
    ref[np.isnan(ref)] = 0
    w[(w & 0x7F) == 0x7F] = 0  # NaN codes -> 0 in both
    parts = convert("fp8", f"affine{bits}", mx.array(w), mx.array(s), (128, 256), 64)
    expect = mx.quantize(mx.array(ref.astype(np.float32)).astype(mx.bfloat16), group_size=64, bits=bits)
    for got, want in zip((parts["weight"], parts["scales"], parts["biases"]), expect):
        assert got.dtype == want.dtype and mx.array_equal(got, want).item()


def test_negative_controls():
    """The comparisons above would catch a swapped nibble order or a transposed scale expansion."""
    w, s = _fp4(8, 64)
    swapped = ((w.view(np.uint8) >> 4) | (w.view(np.uint8) << 4)).astype(np.uint8).view(np.int8)
    parts = convert("fp4", "mxfp4", mx.array(swapped), mx.array(s), (8, 64), 64)
    assert not _same(_mx_dequant(parts, 4, "mxfp4"), dequant_fp4(w, s))
    w8, s8 = _fp8(256, 384)  # a 2x3 scale grid
    s8[:] = np.arange(6).reshape(2, 3) + 120
    # the classic slip: group g read from block column g // 128 instead of g * 32 // 128
    wrong = {"weight": mx.array(w8).view(mx.uint32),
             "scales": mx.array(np.repeat(s8, 128, 0)[:, [g // 128 for g in range(12)]].copy())}
    assert not _same(_mx_dequant(wrong, 8, "mxfp8"), dequant_fp8(w8, s8))


def test_dequantize_matches_numpy_decoders():
    w, s = _fp8(130, 160)
    assert _same(np.array(dequantize("fp8", mx.array(w), mx.array(s), (130, 160))), dequant_fp8(w, s))
    w, s = _fp4(5, 96)
    assert _same(np.array(dequantize("fp4", mx.array(w), mx.array(s), (5, 96))), dequant_fp4(w, s))
