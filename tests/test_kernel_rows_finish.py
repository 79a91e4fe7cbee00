"""rows_finish (norm + RoPE + FP8 of attention rows): the reference vs a float64 numpy oracle with an e4m3
rounding written from the format definition, the Metal kernel (CPU harness) vs the reference, dispatch,
broken variants.

Tolerances (elementwise, s = |ref|, on rope channels the larger magnitude of the rotated pair, u = 2^-24):
- norm / rope vs the reference (and the reference vs float64): |diff| <= 3 ulp_T(s) + (D + 8) u s. The sum of
  squares is reduced in another order (<= (D - 1) u relative each way), rsqrt / cos / sin differ by a few
  fp32 ulps (C library here, MLX's own in the reference); where that moves a value across a rounding
  boundary of T it lands one ulp_T away, and one ulp moved at the norm's rounding moves a rotated pair by
  <= sqrt(2) ulp before the rope's own rounding adds one more. bf16 differences are also counted: they must
  be rare (<= 2% of elements), as they only occur near rounding boundaries.
- FP8: bit-exact (sign of zero included) against formats.fp8_block_roundtrip of the kernel's own pre-FP8
  values, and against the reference wherever a row's pre-FP8 values agree bit for bit.
"""

import mlx.core as mx
import numpy as np
import pytest
from kernel_util import assert_caught, fake_metal, needs_cxx, variant

from mlx_dsv4.formats import fp8_block_roundtrip
from mlx_dsv4.kernels import registry
from mlx_dsv4.kernels import rows_finish as rf
from mlx_dsv4.kernels.registry import load_spec
from mlx_dsv4.kernels.sim import run_metal_kernel_on_cpu
from mlx_dsv4.norm import rms_norm

SPEC = load_spec("rows_finish")
U = 2.0**-24
EPS = 1e-6


# ---- independent numpy oracle ------------------------------------------------------------------


def _to_t(y, dtype):
    """float64/float32 -> float32 values of T: fp32 rounding, then bf16 / fp16 round-to-nearest-even."""
    f = np.asarray(y, np.float64).astype(np.float32)
    if dtype == mx.bfloat16:
        b = f.view(np.uint32).astype(np.uint64)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16 << 16).astype(np.uint32)
        return b.view(np.float32)
    return f.astype(np.float16).astype(np.float32) if dtype == mx.float16 else f


def _ulp(s, dtype):
    """Spacing of T at magnitude s (normal range)."""
    bits = {mx.float32: 23, mx.bfloat16: 7, mx.float16: 10}[dtype]
    return 2.0 ** (np.floor(np.log2(np.maximum(np.abs(s), 1e-30))) - bits)


def _e4m3_table():
    """All non-negative finite e4m3fn values in code order: bias 7, 3 mantissa bits, subnormals at
    exponent 0, code 0x7f (exponent 15, mantissa 7) is NaN, so the largest is 1.75 * 2^8 = 448."""
    vals = [m / 8 * 2.0**-6 for m in range(8)]
    vals += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8) if (e, m) != (15, 7)]
    return np.array(vals)


E4M3 = _e4m3_table()


def _e4m3(y):
    """Nearest e4m3 value, ties to the even code (the table is in code order), sign of zero kept."""
    a = np.abs(y)
    hi = np.clip(np.searchsorted(E4M3, a), 1, len(E4M3) - 1)
    lo = hi - 1
    dlo, dhi = a - E4M3[lo], E4M3[hi] - a
    pick = np.where((dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0)), hi, lo)
    return np.copysign(E4M3[pick], y)


def _fp8_oracle(v, nope, dtype):
    """Block rounding of v[..., :nope] (T values): amax floored at fp32(1e-4), scale 2^ceil(log2(amax
    fp32(1/448))) (the product in fp32, as trained), e4m3 of v / scale clamped to +-448."""
    out = np.array(v, np.float64)
    for b0 in range(0, nope, 64):
        blk = out[..., b0:min(b0 + 64, nope)]
        amax = np.maximum(np.abs(blk).max(axis=-1, keepdims=True), np.float64(np.float32(1e-4)))
        t = (amax.astype(np.float32) * np.float32(1 / 448)).astype(np.float64)
        m, e = np.frexp(t)  # t = m 2^e, m in [0.5, 1)
        s = 2.0 ** np.where(m == 0.5, e - 1, e)
        out[..., b0:min(b0 + 64, nope)] = _e4m3(np.clip(blk / s, -448, 448)) * s
    return _to_t(out, dtype)


def _oracle(x, w, freqs, pos0, step, norm, inverse, dtype):
    """float64 norm and rotation with the reference's rounding points (T after each), fp32 angles."""
    y = _to_t(np.asarray(x, np.float32), dtype).astype(np.float64)
    if norm:
        y = y / np.sqrt((y * y).mean(axis=-1, keepdims=True) + np.float64(np.float32(EPS)))
        y = _to_t(y * (1.0 if w is None else np.asarray(w, np.float64)), dtype).astype(np.float64)
    L, R = x.shape[1], 2 * len(freqs)
    ang = (np.float32(pos0) + np.arange(L, dtype=np.float32) * np.float32(step))[:, None] * freqs  # fp32
    ang = ang.astype(np.float64)[:, None] if x.ndim == 4 else ang.astype(np.float64)
    c, s = np.cos(ang), (-1 if inverse else 1) * np.sin(ang)
    x0, x1 = y[..., -R::2], y[..., -R + 1::2]
    y[..., -R::2], y[..., -R + 1::2] = x0 * c - x1 * s, x0 * s + x1 * c
    return _to_t(y, dtype)


# ---- checks ---------------------------------------------------------------------------------------


def _scale(ref, R):
    """|ref|, on rope channels the larger magnitude of the rotated pair."""
    s = np.abs(np.asarray(ref, np.float64))
    if R == 0:
        return s
    pair = np.maximum(s[..., -R::2], s[..., -R + 1::2])
    s[..., -R::2] = s[..., -R + 1::2] = pair
    return s


def _close(got, ref, R, dtype) -> bool:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    s = _scale(ref, R)
    diff = np.abs(got - ref)
    ok = bool((diff <= 3 * _ulp(s, dtype) + (ref.shape[-1] + 8) * U * s).all())
    return ok and (dtype == mx.float32 or (diff > 0).mean() <= 0.02)


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def _np(a):
    return np.array(a.astype(mx.float32))


def _data(B, L, H, D, R, seed, xdtype=mx.float32):
    rng = np.random.default_rng(seed)
    shape = (B, L, H, D) if H else (B, L, D)
    x = (rng.standard_normal(shape) * rng.uniform(0.1, 30, shape[:-1] + (1,))).astype(np.float32)
    x[..., :3] *= 1e-6  # tiny values: FP8 zeros of both signs, and e4m3 subnormals
    x[..., 4:6] *= 3e-5
    x[..., 3] = -0.0
    w = (1 + 0.5 * rng.standard_normal(D)).astype(np.float32)
    freqs = (1.0 / 10000.0 ** (np.arange(0, R, 2) / R)).astype(np.float32)
    return mx.array(x).astype(xdtype), mx.array(w), mx.array(freqs)


# (B, L, H or 0 for [B, L, D], D, R, T, norm: None / "plain" / "weighted", inverse, fp8, pos0, step)
CASES = {
    "q decode: weightless per-head norm, bf16, 8 heads": (2, 1, 8, 64, 16, mx.bfloat16, "plain", False, False, 599, 1),
    "kv prefill: weighted, FP8, bf16, ragged rows": (1, 7, 0, 96, 32, mx.bfloat16, "weighted", False, True, 0, 1),
    "kv: weighted, FP8, fp32, 15 rows": (3, 5, 0, 64, 16, mx.float32, "weighted", False, True, 40, 1),
    "output inverse rotation, fp32, 3 heads": (2, 3, 3, 96, 32, mx.float32, None, True, False, 123, 1),
    "output inverse rotation, bf16": (1, 2, 5, 64, 16, mx.bfloat16, None, True, False, 7, 1),
    "compressor: fp32 in, bf16 out, positions j*4, FP8": (2, 3, 0, 128, 32, mx.bfloat16, "weighted", False, True,
                                                          36, 4),
    "D = 40 (partial lanes), fp32, weightless": (1, 3, 2, 40, 8, mx.float32, "plain", False, True, 5, 4),
}


def _kw(norm, w, inverse, fp8, D, R, dtype):
    return dict(norm=norm is not None, weight=w if norm == "weighted" else None, eps=EPS, inverse=inverse,
                fp8_nope=D - R if fp8 else 0, dtype=dtype)


def _run(spec, x, w, freqs, pos0, step, kw, heads=None):
    """heads: x is [B, L, heads D] (a projection's rows as they come)."""
    B, L = x.shape[:2]
    H = x.shape[2] if x.ndim == 4 else heads or 1
    D, R = x.shape[-1] // (heads or 1), 2 * freqs.shape[0]
    T = kw["dtype"]
    grid, tg = rf.launch_geometry(B * L * H)
    tmpl = {"T": T, "D": D, "R": R, "NOPE": kw["fp8_nope"], "NORM": kw["norm"], "WEIGHT": kw["weight"] is not None,
            "INVERSE": kw["inverse"]}
    # x as the wrapper passes it: [B, L, D] rows (H = 0 cases) exercise the kernel's rank-3 path
    (out,) = run_metal_kernel_on_cpu(spec, [x, w, freqs, mx.array([pos0, step], mx.int32),
                                            mx.array(EPS, mx.float32)], tmpl, grid, tg, [x.shape], [T])
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_float64_oracle(name):
    B, L, H, D, R, T, norm, inverse, fp8, pos0, step = CASES[name]
    x, w, freqs = _data(B, L, H, D, R, seed=len(name))
    kw = _kw(norm, w, inverse, False, D, R, T)
    ref = _np(rf.rows_finish_reference(x, freqs, pos0, step, **kw))
    want = _oracle(np.array(x), None if kw["weight"] is None else np.array(w), np.array(freqs), pos0, step,
                   kw["norm"], inverse, T)
    assert _close(ref, want, R, T)
    # FP8 on the reference's own pre-FP8 values: bit for bit against the oracle's e4m3 rounding
    ref8 = _np(rf.rows_finish_reference(x, freqs, pos0, step, **{**kw, "fp8_nope": D - R}))
    np.testing.assert_array_equal(_bits(ref8), _bits(np.concatenate(
        [_fp8_oracle(ref[..., :D - R], D - R, T), ref[..., D - R:]], axis=-1)))


def test_oracle_catches_swapped_pairs_and_wrong_block():
    """The checks are not vacuous: a rotation with its pair swapped, and FP8 blocks shifted by one
    channel, fail them."""
    x, w, freqs = _data(1, 4, 2, 64, 16, seed=3)
    ref = _np(rf.rows_finish_reference(x, freqs, 9, 1, norm=True, eps=EPS))
    bad = ref.copy()
    bad[..., -16:] = ref[..., -16:].reshape(*ref.shape[:-1], 8, 2)[..., ::-1].reshape(*ref.shape[:-1], 16)
    assert not _close(bad, ref, 16, mx.float32)
    shifted = np.concatenate([ref[..., :1], _fp8_oracle(ref[..., 1:49], 48, mx.float32), ref[..., 49:]], axis=-1)
    assert not np.array_equal(shifted, _fp8_oracle(ref, 48, mx.float32))


@needs_cxx
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name):
    B, L, H, D, R, T, norm, inverse, fp8, pos0, step = CASES[name]
    x, w, freqs = _data(B, L, H, D, R, seed=len(name), xdtype=mx.float32 if "fp32 in" in name else T)
    kw = _kw(norm, w, inverse, False, D, R, T)
    ref = _np(rf.rows_finish_reference(x, freqs, pos0, step, **kw))
    got = _run(SPEC, x, w, freqs, pos0, step, kw)
    assert _close(got, ref, R, T)
    if not fp8:
        return
    kw8 = {**kw, "fp8_nope": D - R}
    got8 = _run(SPEC, x, w, freqs, pos0, step, kw8)
    own = _np(fp8_block_roundtrip(mx.array(got).astype(T), 64, D - R))
    np.testing.assert_array_equal(_bits(got8), _bits(own))  # bit-exact FP8 on the kernel's own values
    ref8 = _np(rf.rows_finish_reference(x, freqs, pos0, step, **kw8))
    same = (_bits(got[..., :D - R]) == _bits(ref[..., :D - R])).all(axis=-1)
    assert same.mean() >= 0.5  # most rows agree before FP8; there the results agree bit for bit
    np.testing.assert_array_equal(_bits(got8[same][..., :D - R]), _bits(ref8[same][..., :D - R]))


@pytest.fixture
def fake(monkeypatch):
    return fake_metal(monkeypatch, SPEC)


@needs_cxx
def test_dispatch_through_the_wrapper(fake, monkeypatch):
    x, w, freqs = _data(2, 3, 0, 64, 16, seed=5, xdtype=mx.bfloat16)
    kw = dict(norm=True, weight=w, eps=EPS, fp8_nope=48)
    got = rf.rows_finish(x, freqs, 12, **kw)
    assert fake.calls == 1 and got.dtype == mx.bfloat16 and got.shape == x.shape
    monkeypatch.setenv(registry.REFERENCE_ENV, "1")
    ref = rf.rows_finish(x, freqs, 12, **kw)
    assert fake.calls == 1
    np.testing.assert_array_equal(_bits(_np(ref)), _bits(_np(rf.rows_finish_reference(x, freqs, 12, **kw))))
    monkeypatch.delenv(registry.REFERENCE_ENV)
    # shape: the same elements in the consumer's shape (grouped_out's [B, L, G, 1, H D / G]), written by the kernel
    x4 = _data(1, 1, 4, 64, 16, seed=6, xdtype=mx.bfloat16)[0]
    grouped = rf.rows_finish(x4, freqs, 7, inverse=True, shape=(1, 1, 2, 1, 128))
    assert fake.calls == 2 and grouped.shape == (1, 1, 2, 1, 128)
    np.testing.assert_array_equal(_bits(_np(grouped)), _bits(_np(rf.rows_finish(x4, freqs, 7, inverse=True)
                                                                 .reshape(1, 1, 2, 1, 128))))
    monkeypatch.setenv(registry.REFERENCE_ENV, "1")
    assert rf.rows_finish(x4, freqs, 7, inverse=True, shape=(1, 1, 2, 1, 128)).shape == (1, 1, 2, 1, 128)
    monkeypatch.delenv(registry.REFERENCE_ENV)
    wide = mx.ones((1, 1, 2 * rf.MAX_D))  # rows wider than the registers hold go to the reference
    np.testing.assert_array_equal(_np(rf.rows_finish(wide, freqs, 3, norm=True)),
                                  _np(rf.rows_finish_reference(wide, freqs, 3, norm=True)))
    assert fake.calls == 3


BROKEN = {  # all on the FP8 case below (D = 128, NOPE = 96: a full and a partial block), bf16
    "rope pairs swapped": ("const float x0 = even ? v[k] : other, x1 = even ? other : v[k];",
                           "const float x0 = even ? other : v[k], x1 = even ? v[k] : other;"),
    "wrong rotation partner lane": ("simd_shuffle_xor(v[k], 1)", "simd_shuffle_xor(v[k], 2)"),
    "sum of squares not reduced over the SIMD group": ("ss = simd_sum(ss);", "ss = ss * 32.0f;"),
    "block amax over neighbouring lanes only": ("metal::max(simd_max(amax), 1e-4f)",
                                                "metal::max(metal::max(amax, simd_shuffle_xor(amax, 1)), 1e-4f)"),
    "block amax over half the block": ("for (int k = 2 * b; k < 2 * b + 2 && k < K; ++k) {\n      amax",
                                       "for (int k = 2 * b; k < 2 * b + 1 && k < K; ++k) {\n      amax"),
    "blocks off by one (32 channels)": ("int k = 2 * b; k < 2 * b + 2 && k < K; ++k) {\n      if",
                                        "int k = 2 * b + 1; k < 2 * b + 3 && k < K; ++k) {\n      if"),
    "inverse not negated": ("INVERSE ? -metal::precise::sin(a)", "INVERSE ? metal::precise::sin(a)"),
}


@needs_cxx
@pytest.mark.parametrize("what", list(BROKEN))
def test_broken_variants_are_caught(what):
    x, w, freqs = _data(2, 3, 3, 128, 32, seed=11, xdtype=mx.bfloat16)
    kw = dict(norm=True, weight=w, eps=EPS, inverse=True, fp8_nope=96, dtype=mx.bfloat16)
    ref = _np(rf.rows_finish_reference(x, freqs, 50, 1, **kw))

    def matches(out):
        return _close(out, ref, 32, mx.bfloat16) and np.array_equal(_bits(out[..., :96]), _bits(ref[..., :96]))

    assert matches(_run(SPEC, x, w, freqs, 50, 1, kw))  # the intact kernel passes the same check
    broken = variant(SPEC, *BROKEN[what])
    assert assert_caught(lambda: _run(broken, x, w, freqs, 50, 1, kw), matches)


@needs_cxx
def test_rank_3_rows_take_their_own_positions():
    """[B, L, D] rows go to the kernel unreshaped (H = 1 from the rank); reading H from the shape as for
    [B, L, H, D] would put every token of a row at pos0 (negative control)."""
    x, w, freqs = _data(2, 3, 0, 64, 16, seed=13)
    kw = dict(norm=True, weight=w, eps=EPS, inverse=False, fp8_nope=0, dtype=mx.float32)
    ref = _np(rf.rows_finish_reference(x, freqs, 9, 2, **kw))
    assert _close(_run(SPEC, x, w, freqs, 9, 2, kw), ref, 16, mx.float32)
    broken = variant(SPEC, "x_ndim == 4 ? x_shape[2] : x_shape[2] / D", "x_shape[2]")
    assert assert_caught(lambda: _run(broken, x, w, freqs, 9, 2, kw), lambda out: _close(out, ref, 16, mx.float32))


@needs_cxx
def test_a_projections_heads_are_rows_at_their_positions(fake):
    """q as its projection gives it, [B, L, H D] with heads=H (no reshape node before the launch): H rows of width
    D per position, through the wrapper against the reference on the [B, L, H, D] view. Broken variant: the rank-3
    rows read as one per position (H = 1), which puts heads at other tokens' positions."""
    x, _, freqs = _data(2, 3, 4, 64, 16, seed=17, xdtype=mx.bfloat16)
    flat = x.reshape(2, 3, 256)
    kw = dict(norm=True, weight=None, eps=EPS, inverse=False, fp8_nope=0, dtype=mx.bfloat16)
    ref = _np(rf.rows_finish_reference(x, freqs, 31, 1, **kw))
    got = rf.rows_finish(flat, freqs, 31, **kw, heads=4)
    assert fake.calls == 1 and got.shape == (2, 3, 4, 64) and _close(_np(got), ref, 16, mx.bfloat16)
    broken = variant(SPEC, "x_ndim == 4 ? x_shape[2] : x_shape[2] / D", "x_ndim == 4 ? x_shape[2] : 1")
    assert assert_caught(lambda: _run(broken, flat, freqs, freqs, 31, 1, kw, heads=4).reshape(2, 3, 4, 64),
                         lambda out: _close(out, ref, 16, mx.bfloat16))


def test_bad_input_is_refused():
    x, w, freqs = _data(1, 2, 0, 64, 16, seed=1)
    with pytest.raises(ValueError, match="x must be"):
        rf.rows_finish(x[0], freqs, 0)
    with pytest.raises(ValueError, match="freqs must be"):
        rf.rows_finish(x, mx.zeros((40,)), 0)
    with pytest.raises(ValueError, match="last axis must be even"):
        rf.rows_finish(x[..., :63], freqs, 0)
    with pytest.raises(ValueError, match="weight must be"):
        rf.rows_finish(x, freqs, 0, norm=True, weight=w[:10])
    with pytest.raises(ValueError, match="fp8_nope must be"):
        rf.rows_finish(x, freqs, 0, fp8_nope=65)
    with pytest.raises(ValueError, match="step must be"):
        rf.rows_finish(x, freqs, 0, 0)
    with pytest.raises(ValueError, match="heads must be a positive int dividing"):
        rf.rows_finish(x, freqs, 0, heads=3)
    with pytest.raises(ValueError, match="does not hold the 128 elements"):
        rf.rows_finish(x, freqs, 0, shape=(1, 2, 2, 32, 2))
    with pytest.raises(ValueError, match="dtype must be"):
        rf.rows_finish(x, freqs, 0, dtype=mx.int32)
    with pytest.raises(ValueError, match="positions within int32"):
        rf.rows_finish_kernel(x, freqs, 2**31)


@needs_cxx
@pytest.mark.parametrize("D,T", [(1536, mx.bfloat16), (72, mx.float32)])
def test_norm_only_rows(D, T):
    """freqs None: the weighted RMSNorm alone (q_norm over q_lora_rank, 1536 wide in Pro): equal to
    norm.rms_norm within the norm tolerance of _close (the rope channels, R = 0, do not exist)."""
    x, w, _ = _data(1, 3, 0, D, 2, seed=D, xdtype=T)
    kw = _kw("weighted", w, False, False, D, 0, T)
    ref = rf.rows_finish_reference(x, None, 0, **kw)
    np.testing.assert_array_equal(_np(ref), _np(rms_norm(x, w, EPS)))  # the reference is the model's norm
    grid, tg = rf.launch_geometry(3)
    tmpl = {"T": T, "D": D, "R": 0, "NOPE": 0, "NORM": True, "WEIGHT": True, "INVERSE": False}
    (got,) = run_metal_kernel_on_cpu(SPEC, [x.reshape(1, 3, 1, D), w, np.zeros(8, np.float32),
                                            mx.array([0, 1], mx.int32), mx.array(EPS, mx.float32)],
                                     tmpl, grid, tg, [(1, 3, 1, D)], [T])
    assert _close(got.reshape(x.shape), _np(ref), 0, T)
