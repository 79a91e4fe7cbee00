// Encodes rows for the compact cache: FP8 e4m3fn codes + E8M0 bytes per 64 of the first N channels
// (compressed entries), or FP4 e2m1 codes per 32 channels packed two per byte (indexer keys).
//
// @kernel         store_encode
// @inputs         x: any float[R, D]
// @outputs        codes: uint8[R, N] (FP8) or [R, N / 2] (FP4, element 2j low nibble); exps: uint8[R, NB];
//                 rest: x's type [R, D - N], channels N.. as they are (FP8's RoPE part, stored unencoded: no
//                 slice node before the store's write), or with FP4 / N = D a placeholder never written
// @template       D: int; N: int; FP4: bool
// @include        formats
// @grid           (32, R, 1): one SIMD group per row; lane l holds channels 64 k + 2 l, + 1 of chunk k
// @threadgroup    (32, min(R, 8), 1); no threadgroup memory or barriers: rows are independent
// @reference      mlx_dsv4.kernels.store_encode.fp8_encode_reference (formats.fp8_block_quantize) and
//                 fp4_encode_reference (formats.fp4_block_quantize + pack_fp4)
// @tolerance      bit-exact for finite input: same fp32 amax (max is exact), floor, product with fp32(1 / qmax),
//                 E8M0 byte from the bits, exact power-of-two reciprocal, clamp, round-to-nearest-even
//                 (e4m3 through rint of an exactly scaled value, e2m1 through the reference's midpoints)
// @bytes          s D + N + NB per row (s = sizeof(x)), FP4 N / 2 + NB: a Flash decode entry 512 x 2 B in, 455 B
//                 out; an indexer key 128 x 2 B in, 68 B out
// @flops          ~12 N (abs, max, scale, clamp, rounding or 7 compares, packing)
// @decode-share   Flash decode: one entry per compressed layer per window (every 4th token in 21 CSA layers, every
//                 128th in 20 HCA) and one key per CSA window: ~10 KB per token, nothing against the ~14 ms floor.
//                 What counts is launches: each append's encode was ~20-40 MLX ops (pad, abs, max, floor, scale
//                 bits, reciprocal, clip, to_fp8 or 7 compares, packing), now one (est. 2-4 us, latency-bound;
//                 not measured: no Mac was available).
//
// Channel pairs per lane make FP4 packing lane-local (one byte per lane per chunk); an FP8 block is a whole
// 64-channel chunk (one simd_max over the SIMD group), an FP4 block half of one (lanes 0-15, 16-31).

// @header
// E8M0 byte of 2^ceil(log2(y)), y > 0: biased exponent + (mantissa != 0), at most 255 (NaN) as the reference clips.
inline uint e8m0_ceil(float y) {
  const uint bits = as_type<uint>(y);
  return metal::min(((bits >> 23) & 0xFFu) + uint((bits & 0x7FFFFFu) != 0), 255u);
}

// e4m3fn code of y, |y| clamped to 448, round-to-nearest-even, sign of zero kept. In the binade 2^e
// (e >= -6; below it the subnormal step 2^-9 continues binade -6) the step is 2^(e-3), so q = rint(|y| 2^(3-e))
// in 8..16 is exact and the code is (e + 6) * 8 + q: a carry to 16 lands on the next binade's first code.
inline uint e4m3_code(float y) {
  const float a = metal::min(metal::abs(y), 448.0f);
  const int e = metal::max(int(as_type<uint>(a) >> 23) - 127, -6);
  return (uint(e + 6) << 3) + uint(metal::rint(a * pow2i(3 - e))) + ((as_type<uint>(y) >> 31) << 7);
}

// e2m1 code of y (magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6): one step per midpoint passed, ties to the even code
// (>= where the lower code is odd), saturating at 6; bit 3 the sign.
inline uint e2m1_code(float y) {
  const float a = metal::abs(y);
  return uint(a > 0.25f) + uint(a >= 0.75f) + uint(a > 1.25f) + uint(a >= 1.75f) + uint(a > 2.5f) + uint(a >= 3.5f) +
         uint(a > 5.0f) + ((as_type<uint>(y) >> 31) << 3);
}

// @source
constexpr int BLOCK = FP4 ? 32 : 64;
constexpr int NB = (N + BLOCK - 1) / BLOCK;
constexpr float QMAX = FP4 ? 6.0f : 448.0f;
static_assert(!FP4 || N % 2 == 0, "FP4 packs channel pairs");
static_assert(0 < N && N <= D, "N encoded channels of a row of D");
const float floor_ = FP4 ? as_type<float>(0x01C00000u) : 1e-4f;        // 6 * 2^-126 ; fp32(1e-4)
const float inv_qmax = as_type<float>(FP4 ? 0x3E2AAAABu : 0x3B124925u);  // fp32(1 / 6) ; fp32(1 / 448)
const uint lane = thread_position_in_grid.x;                            // the grid is exactly 32 x R
const size_t row = thread_position_in_grid.y;

for (int k = 0; k < (N + 63) / 64; ++k) {
  const uint c = 64 * k + 2 * lane;
  const float v0 = c < uint(N) ? float(x[row * D + c]) : 0.0f;  // zeros never raise a block's amax
  const float v1 = c + 1 < uint(N) ? float(x[row * D + c + 1]) : 0.0f;
  const float a = metal::max(metal::abs(v0), metal::abs(v1));
  float amax;
  if (FP4) {  // every lane takes part in both reductions; each half keeps its own
    const float lo = simd_max(lane < 16 ? a : 0.0f), hi = simd_max(lane < 16 ? 0.0f : a);
    amax = lane < 16 ? lo : hi;
  } else {
    amax = simd_max(a);
  }
  const uint e = e8m0_ceil(metal::max(amax, floor_) * inv_qmax);
  const float inv = e8m0((254u - e) & 0xFFu);  // 2^(127 - e): the exact reciprocal of the scale
  const float y0 = metal::clamp(v0 * inv, -QMAX, QMAX), y1 = metal::clamp(v1 * inv, -QMAX, QMAX);
  if (FP4) {
    if (c < uint(N)) {
      codes[row * (N / 2) + c / 2] = uint8_t(e2m1_code(y0) | (e2m1_code(y1) << 4));
    }
    const uint b = 2 * k + lane / 16;
    if ((lane & 15) == 0 && b < uint(NB)) {
      exps[row * NB + b] = uint8_t(e);
    }
  } else {
    if (c < uint(N)) {
      codes[row * N + c] = uint8_t(e4m3_code(y0));
    }
    if (c + 1 < uint(N)) {
      codes[row * N + c + 1] = uint8_t(e4m3_code(y1));
    }
    if (lane == 0) {
      exps[row * NB + k] = uint8_t(e);
    }
  }
}
if (!FP4) {
  for (int c = N + int(lane); c < D; c += 32) {
    rest[row * (D - N) + (c - N)] = x[row * D + c];
  }
}
