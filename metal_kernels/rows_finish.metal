// Finishes attention rows of width D: optional RMSNorm (fp32 statistics, optional weight), interleaved RoPE
// (forward or inverse) on the last R channels, optional FP8 e4m3 1x64 block rounding of the first NOPE.
//
// @kernel         rows_finish
// @inputs         x: any float[B, L, H, D] or [B, L, H D] (a projection's H rows per position, H = 1: [B, L, D]);
//                 weight: float[D] (read only with WEIGHT); inv_freq: float[R / 2];
//                 pos: int32[2] (pos0, step: the token at index l along L is at pos0 + l step); eps: float[]
// @outputs        out: T, x's shape
// @template       T: type; D: int; R: int; NOPE: int; NORM: bool; WEIGHT: bool; INVERSE: bool
// @include        formats
// @grid           (32, B L H, 1): one SIMD group per row, lane l holding channels l + 32 k
// @threadgroup    (32, min(rows, 8), 1); no threadgroup memory or barriers: rows are independent
// @reference      mlx_dsv4.kernels.rows_finish.rows_finish_reference (rms_norm, cos_sin + apply_rope,
//                 TrainedFormats.kv), with the same rounding points: x to T, norm output to T, rope output
//                 to T, then the FP8 round trip of those T values, output T
// @tolerance      FP8 rounding: bit-exact for finite input on the kernel's own pre-FP8 values (same amax,
//                 E8M0 byte from the bits, exact reciprocal, round-to-nearest-even). Norm + rope vs the
//                 reference: |diff| <= 3 ulp_T(s) + (D + 8) 2^-24 s, s = |ref| (max of the pair on rope
//                 channels): the sum of squares is reduced in another order (<= D u relative), rsqrt,
//                 cos and sin differ by a few fp32 ulps (precise:: here, MLX's own there), and one ulp of
//                 T moved at the norm's rounding moves the rotated pair by <= sqrt(2) ulp before its own
//                 rounding. Metal may fuse multiply-adds in the rotation: within the same bound.
// @bytes          (2 sizeof(T) + 4 [fp32 input]) per channel: each row read once and written once, + D sizeof
//                 (weight) + 2 R bytes of tables (cached); q at decode: 64 heads x 512 x 4 B = 128 KB
// @flops          ~6 D (square-sum, scale, weight) + ~12 R (angle, cos, sin, rotation) + ~8 NOPE (FP8)
// @decode-share   Flash decode, per layer: q (64 rows), kv (1 row), the output's inverse rotation (64 rows)
//                 and a finished compressed entry every ratio-th token: ~0.4 MB per layer, ~0.5 us at
//                 819 GB/s against the ~14 ms floor of a step. What counts is launches: each finish was
//                 ~5-20 MLX ops (norm ~3, rope ~6, FP8 ~8), now one (est. 2-4 us, latency-bound; not
//                 measured: no Mac was available).
//
// The row's values stay in registers (K = ceil(D / 32) per lane): the rotation's partner channel c ^ 1 sits
// in lane ^ 1 at the same k (the rope region starts at an even channel), and a 64-channel FP8 block is
// k = 2b, 2b + 1 over all 32 lanes, so the block amax is one simd_max.

// @header
// e4m3fn round-to-nearest-even of |y| <= 448: in the binade 2^e the step is 2^(e-3), and 2^-9 below
// 2^-6 (subnormals); y 2^(3-e) is exact, so rint (ties to even) picks the code. Keeps the sign of zero.
inline float e4m3_round(float y) {
  const int e = metal::max(int((as_type<uint>(y) >> 23) & 0xFFu) - 127, -6);
  return metal::rint(y * pow2i(3 - e)) * pow2i(e - 3);
}

// @source
constexpr int K = (D + 31) / 32;
constexpr int ROPE0 = D - R;              // first rotated channel (even)
const uint lane = thread_position_in_grid.x;
const uint row = thread_position_in_grid.y;
const uint L = x_shape[1], H = x_ndim == 4 ? x_shape[2] : x_shape[2] / D;  // the grid is exact (32 x rows)
const size_t base = size_t(row) * D;

float v[K];
for (int k = 0; k < K; ++k) {
  const uint c = lane + 32 * k;
  v[k] = c < D ? float(static_cast<T>(x[base + c])) : 0.0f;  // the reference casts to T first
}

if (NORM) {
  float ss = 0.0f;
  for (int k = 0; k < K; ++k) {
    ss += v[k] * v[k];
  }
  ss = simd_sum(ss);
  const float r = metal::precise::rsqrt(ss * (1.0f / D) + eps);  // mean as sum * fp32(1/D), as MLX
  for (int k = 0; k < K; ++k) {
    const uint c = lane + 32 * k;
    float y = v[k] * r;
    if (WEIGHT && c < D) {
      y = y * float(weight[c]);
    }
    v[k] = float(static_cast<T>(y));
  }
}

// RoPE: every lane takes part in the shuffles (uniform trip count); only rope channels change.
const float p = float(pos[0] + int((row / H) % L) * pos[1]);
for (int k = ROPE0 / 32; k < K; ++k) {
  const uint c = lane + 32 * k;
  const float other = simd_shuffle_xor(v[k], 1);
  if (c >= uint(ROPE0) && c < D) {
    const float a = p * inv_freq[(c - ROPE0) / 2];
    const float cs = metal::precise::cos(a);
    const float sn = INVERSE ? -metal::precise::sin(a) : metal::precise::sin(a);
    const bool even = (c & 1) == 0;
    const float x0 = even ? v[k] : other, x1 = even ? other : v[k];
    v[k] = float(static_cast<T>(even ? x0 * cs - x1 * sn : x0 * sn + x1 * cs));
  }
}

if (NOPE > 0) {
  for (int b = 0; b < (NOPE + 63) / 64; ++b) {
    float amax = 0.0f;
    for (int k = 2 * b; k < 2 * b + 2 && k < K; ++k) {
      amax = lane + 32 * k < uint(NOPE) ? metal::max(amax, metal::abs(v[k])) : amax;
    }
    amax = metal::max(simd_max(amax), 1e-4f);
    // E8M0 byte of 2^ceil(log2(amax fp32(1/448))) from the bits; finite input keeps it in 1..253.
    const uint bits = as_type<uint>(amax * as_type<float>(0x3B124925u));
    const int eb = int((bits >> 23) & 0xFFu) + ((bits & 0x7FFFFFu) != 0 ? 1 : 0);
    const float inv = pow2i(127 - eb), scale = pow2i(eb - 127);
    for (int k = 2 * b; k < 2 * b + 2 && k < K; ++k) {
      if (lane + 32 * k < uint(NOPE)) {
        v[k] = float(static_cast<T>(e4m3_round(metal::clamp(v[k] * inv, -448.0f, 448.0f)) * scale));
      }
    }
  }
}

for (int k = 0; k < K; ++k) {
  const uint c = lane + 32 * k;
  if (c < D) {
    out[base + c] = static_cast<T>(v[k]);
  }
}
