"""store_encode (the compact cache's FP8 / FP4 row encoding): the references (formats.fp8_block_quantize,
fp4_block_quantize + pack_fp4) vs a numpy oracle written from the format definitions, the Metal kernel (CPU
harness) vs the references, dispatch through kvstore.FP8Rows / FP4Rows, broken variants, bad input.

Tolerance: none. Every output is a byte (code, packed pair or E8M0 exponent) and the kernel performs the
reference's exact fp32 operations (max, floor, one product with fp32(1 / qmax), exponent from the bits,
power-of-two reciprocal, clamp, nearest-even), so they must agree bit for bit on every finite input.
"""

import mlx.core as mx
import numpy as np
import pytest
from kernel_util import assert_caught, fake_metal, needs_cxx, variant

from mlx_dsv4.kernels import registry
from mlx_dsv4.kernels import store_encode as se
from mlx_dsv4.kernels.registry import load_spec
from mlx_dsv4.kernels.sim import run_metal_kernel_on_cpu
from mlx_dsv4.kvstore import FP4Rows, FP8Rows

SPEC = load_spec("store_encode")
F32 = np.float32


# ---- numpy oracle from the format definitions ----------------------------------------------------


def _e4m3_table():
    """Non-negative finite e4m3fn values in code order (bias 7, 3 mantissa bits, code 0x7f NaN): max 448."""
    vals = [m / 8 * 2.0**-6 for m in range(8)]
    vals += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8) if (e, m) != (15, 7)]
    return np.array(vals)


E4M3 = _e4m3_table()
E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6])
FORMATS = {False: (E4M3, 448.0, 1e-4, 64, 7), True: (E2M1, 6.0, 6 * 2.0**-126, 32, 3)}  # table, qmax, floor, block, sign bit


def _nearest_code(y, table):
    """Index of the nearest table value to |y| (|y| <= max), ties to the even index (the even code)."""
    a = np.abs(y)
    hi = np.clip(np.searchsorted(table, a), 1, len(table) - 1)
    lo = hi - 1
    dlo, dhi = a - table[lo], table[hi] - a
    return np.where((dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0)), hi, lo)


def _oracle(x, n, fp4):
    """rows [R, D] (float32 values) -> (codes or packed, exps) for the first n channels. The scale is
    2^ceil(log2(fp32(amax fp32(1/qmax)))) with amax floored, computed through frexp."""
    table, qmax, floor, block, sbit = FORMATS[fp4]
    v = np.asarray(x, F32)[:, :n].astype(np.float64)
    codes, exps = np.zeros(v.shape, np.uint8), []
    for b0 in range(0, n, block):
        blk = v[:, b0:b0 + block]
        amax = np.maximum(np.abs(blk).max(axis=1), np.float64(F32(floor)))
        t = (amax.astype(F32) * F32(1 / qmax)).astype(np.float64)
        m, e = np.frexp(t)  # t = m 2^e, m in [0.5, 1)
        k = np.where(m == 0.5, e - 1, e)
        exps.append(k + 127)
        y = np.clip(blk / 2.0 ** k[:, None], -qmax, qmax)
        codes[:, b0:b0 + block] = _nearest_code(y, table) | (np.signbit(y) << sbit)
    if fp4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return codes, np.stack(exps, axis=1).astype(np.uint8)


# ---- data ------------------------------------------------------------------------------------------


def _ties(fp4):
    """Midpoints between consecutive representable magnitudes (exact in bf16), both signs."""
    table = FORMATS[fp4][0]
    mids = (table[1:] + table[:-1]) / 2
    return np.concatenate([mids, -mids[::3]])


def _rows(R, D, n, fp4, seed, dtype):
    """R rows of D: wide dynamic range within and across rows, then edge rows (when R allows): zeros of
    both signs; values under the amax floor; per block the largest magnitude qmax 2^j (a code exactly at
    the clamp) followed by ties; a negative block max just above qmax 2^j (the E8M0 boundary), larger in
    each block than in the one before and at its start (an amax that reaches into the next block's lanes
    is caught)."""
    rng = np.random.default_rng(seed)
    _, qmax, floor, block, _ = FORMATS[fp4]
    x = rng.standard_normal((R, D)) * 2.0 ** rng.uniform(-40, 40, (R, D)) * 2.0 ** rng.uniform(-20, 20, (R, 1))
    x[1::3] = rng.standard_normal((len(x[1::3]), D)) * 2.0 ** rng.uniform(-30, 30, (len(x[1::3]), 1))
    if R > 3:
        x[0] = 0.0
        x[0, 1::2] = -0.0
        x[1] = rng.standard_normal(D) * (1e-9 if not fp4 else floor / 8)
        ties = _ties(fp4)
        for i, b0 in enumerate(range(0, D, block)):
            j = int(rng.integers(-12, 12))
            w = min(block, D - b0)
            x[2, b0:b0 + w] = np.concatenate([[qmax], np.resize(rng.permutation(ties), w - 1)]) * 2.0**j
            x[3, b0:b0 + w] = rng.uniform(-1, 1, w) * qmax * 2.0 ** (2 * i - 4)  # maxima growing block by block,
            x[3, b0 + (i % w)] = -qmax * (1 + 2.0**-7) * 2.0 ** (2 * i - 4)  # in the block's first lanes
    if dtype == mx.float16:  # stay finite
        x = np.clip(x, -6e4, 6e4)
    return mx.array(x.astype(F32)).astype(dtype)


def _f32(a) -> np.ndarray:
    return np.array(mx.array(a).astype(mx.float32))  # exact from any float dtype


def _ref(x, n, fp4):
    """(codes, exps) and for FP8 with n < D the channels stored as they are, x[..., n:]."""
    codes, exps = se.fp4_encode_reference(x) if fp4 else se.fp8_encode_reference(x, n)
    return (np.array(codes), np.array(exps), *(() if fp4 or n == x.shape[-1] else (_f32(x[..., n:]),)))


def _run(spec, x, n, fp4):
    R, D = x.shape
    nb = -(-n // FORMATS[fp4][3])
    grid, tg = se.launch_geometry(R)
    rest = 0 if fp4 else D - n
    outs = run_metal_kernel_on_cpu(spec, [x], {"D": D, "N": n, "FP4": fp4}, grid, tg,
                                   [(R, n // 2 if fp4 else n), (R, nb), (R, rest) if rest else (1,)],
                                   [np.uint8, np.uint8, x.dtype])
    return (*outs[:2], _f32(outs[2])) if rest else outs[:2]


# (R, D, n, fp4, dtype)
CASES = {
    "FP8 Flash entry: 448 of 512, bf16": (6, 512, 448, False, mx.bfloat16),
    "FP8 nope 70 of 100 (partial block), fp32, 11 rows (partial threadgroup)": (11, 100, 70, False, mx.float32),
    "FP8 nope 37 of 41 (odd, partial lanes), fp16": (5, 41, 37, False, mx.float16),
    "FP4 indexer key 128, bf16": (8, 128, 128, True, mx.bfloat16),
    "FP4 48 (partial block), fp32, 9 rows": (9, 48, 48, True, mx.float32),
    "FP4 96 (3 blocks: chunk 1 half empty), fp32, 1 row": (1, 96, 96, True, mx.float32),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_oracle(name):
    R, D, n, fp4, dtype = CASES[name]
    x = _rows(R, D, n, fp4, len(name), dtype)
    want = _oracle(np.array(x.astype(mx.float32)), n, fp4)
    for got, w in zip(_ref(x, n, fp4), want):
        np.testing.assert_array_equal(got, w)


@pytest.mark.parametrize("fp4", [False, True])
def test_edge_rows_exercise_ties_clamp_and_floor(fp4):
    """The data is not vacuous: row 2 has exact midpoints after scaling and a code at the clamp, row 3's
    blocks moved to the next exponent, rows 0 and 1 sit on the amax floor."""
    table, qmax, floor, block, _ = FORMATS[fp4]
    x = np.array(_rows(6, 128, 128, fp4, 1, mx.float32))
    _, exps = _oracle(x, 128, fp4)
    scale = np.repeat(2.0 ** (exps.astype(np.float64) - 127), block, axis=1)
    y = np.abs(x / scale)
    assert np.isin(y[2], (table[1:] + table[:-1]) / 2).sum() >= 64 and (y[2] == qmax).sum() == 128 // block
    assert (np.abs(x[3]).reshape(-1, block).max(1) / scale[3, ::block] < qmax / 1.9).all()
    assert (exps[:2] == exps[0, 0]).all()  # the floor, whatever the (tiny) values


@needs_cxx
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name):
    R, D, n, fp4, dtype = CASES[name]
    x = _rows(R, D, n, fp4, len(name), dtype)
    got, want = _run(SPEC, x, n, fp4), _ref(x, n, fp4)
    assert len(got) == len(want) == (2 if fp4 or n == D else 3)  # FP8's rest: x[..., n:] copied bit for bit
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.fixture
def fake(monkeypatch):
    k = fake_metal(monkeypatch, SPEC)
    return k


def _filled(store, x):
    store.append(x[:, :3])
    store.append(x[:, 3:4])  # a decode step's single entry
    return store


@needs_cxx
def test_row_stores_with_kernels_equal_the_reference_stores(fake, monkeypatch):
    """FP8Rows / FP4Rows (batch 2, appends of 3 and 1 rows) through the kernel: every stored part and the
    decoded view equal the reference store's exactly."""
    e = _rows(8, 96, 64, False, 3, mx.bfloat16).reshape(2, 4, 96)
    k = _rows(8, 64, 64, True, 4, mx.bfloat16).reshape(2, 4, 64)
    got = [_filled(FP8Rows(64), e), _filled(FP4Rows(), k)]
    assert fake.calls == 4
    monkeypatch.setenv(registry.REFERENCE_ENV, "1")
    want = [_filled(FP8Rows(64), e), _filled(FP4Rows(), k)]
    assert fake.calls == 4
    for g, w in zip(got, want):
        assert g.n == w.n == 4 and g.parts.keys() == w.parts.keys()
        for name in g.parts:
            assert g.parts[name].dtype == w.parts[name].dtype
            np.testing.assert_array_equal(np.array(g.parts[name].view(mx.uint8)), np.array(w.parts[name].view(mx.uint8)))
        np.testing.assert_array_equal(np.array(g.view(mx.float32)), np.array(w.view(mx.float32)))


def test_dispatch_falls_back_to_the_reference(fake):
    """Blocks other than the trained ones and non-kernel dtypes take the reference, bit-identical."""
    x = _rows(4, 64, 64, False, 5, mx.float32)
    for got, want in [(se.fp8_encode(x, 64, block=32), se.fp8_encode_reference(x, 64, 32)),
                      (se.fp4_encode(x, block=16), se.fp4_encode_reference(x, 16)),
                      (se.fp8_encode(x.astype(mx.float64), 48), se.fp8_encode_reference(x, 48))]:
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.array(g), np.array(w))
    assert fake.calls == 0


BROKEN = {  # (case, old, new)
    "nibble order swapped": ("FP4 indexer key 128, bf16", "e2m1_code(y0) | (e2m1_code(y1) << 4)",
                             "e2m1_code(y1) | (e2m1_code(y0) << 4)"),
    "FP4 halves split one lane off": ("FP4 indexer key 128, bf16", "simd_max(lane < 16 ? a : 0.0f)",
                                      "simd_max(lane < 17 ? a : 0.0f)"),
    "FP4 amax over the whole chunk": ("FP4 indexer key 128, bf16", "amax = lane < 16 ? lo : hi;",
                                      "amax = metal::max(lo, hi);"),
    "FP8 amax over neighbouring lanes only": ("FP8 Flash entry: 448 of 512, bf16", "amax = simd_max(a);",
                                              "amax = metal::max(a, simd_shuffle_xor(a, 1));"),
    "channels off by one pair": ("FP8 nope 70 of 100 (partial block), fp32, 11 rows (partial threadgroup)",
                                 "const uint c = 64 * k + 2 * lane;", "const uint c = 64 * k + 2 * lane + 2;"),
    "FP4 exponents of the halves swapped": ("FP4 48 (partial block), fp32, 9 rows", "const uint b = 2 * k + lane / 16;",
                                            "const uint b = 2 * k + 1 - lane / 16;"),
    "FP8 exponent one block off": ("FP8 nope 70 of 100 (partial block), fp32, 11 rows (partial threadgroup)",
                                   "exps[row * NB + k] = uint8_t(e);", "exps[row * NB + (k + 1) % NB] = uint8_t(e);"),
    "no amax floor": ("FP8 Flash entry: 448 of 512, bf16", "metal::max(amax, floor_)", "amax"),
    "ties away from zero": ("FP8 Flash entry: 448 of 512, bf16", "metal::rint(a * pow2i(3 - e))",
                            "metal::round(a * pow2i(3 - e))"),
    "FP8 rest copied one channel late": ("FP8 Flash entry: 448 of 512, bf16", "x[row * D + c];",
                                         "x[row * D + metal::min(c + 1, D - 1)];"),
}


@needs_cxx
@pytest.mark.parametrize("what", list(BROKEN))
def test_broken_variants_are_caught(what):
    case, old, new = BROKEN[what]
    R, D, n, fp4, dtype = CASES[case]
    x = _rows(R, D, n, fp4, len(case), dtype)
    want = _ref(x, n, fp4)

    def matches(outs):
        return all(np.array_equal(o, w) for o, w in zip(outs, want))

    section = "header" if "rint" in old else "source"
    assert assert_caught(lambda: _run(variant(SPEC, old, new, section), x, n, fp4), matches)


def test_bad_input_is_refused():
    x = mx.zeros((2, 3, 64))
    with pytest.raises(ValueError, match="rows must be"):
        se.fp8_encode(mx.zeros((2, 64), mx.int32), 48)
    with pytest.raises(ValueError, match="rows must be"):
        se.fp4_encode(mx.array(1.0))
    with pytest.raises(ValueError, match="nope must be"):
        se.fp8_encode(x, 65)
    with pytest.raises(ValueError, match="nope must be"):
        se.fp8_encode(x, 0)
    with pytest.raises(ValueError, match="last axis must be even"):
        se.fp4_encode(x[..., :63])
    with pytest.raises(ValueError, match="rows must be one of"):
        se.fp8_encode_kernel(x.astype(mx.float64), 48)
