// Indexer q / key finishing (spec §4.2, §7.4): per row of D channels, optional weighted RMSNorm, RoPE on
// the last 2 R2 channels at position pos[0] + t pos[1] (t the row's token), then, with QAT, the
// normalised Walsh-Hadamard transform, rounding to bf16 and FP4 e2m1 in 1x32 blocks with E8M0 scales.
//
// @kernel         index_finish
// @inputs         x: T[B, L, H, D] or [B, L, H D] (q as projected) or keys T[B, L, D] (H = 1); freqs: float[R2];
//                 weight: float[D];
//                 pos: int32[2]; consts: float[2]
// @outputs        out: T, x's shape
// @template       T: type; D: int; R2: int; NORM: bool; QAT: bool
// @include        formats
// @grid           (32 B L H, 1, 1): one SIMD group per row
// @threadgroup    (min(32 B L H, 128), 1, 1); rows never share anything, so any multiple of 32 works
// @reference      mlx_dsv4.kernels.index_finish.index_finish_reference
// @tolerance      bit-exact where cos / sin and (NORM) the row's mean square agree with MLX's: on a Mac
//                 precise::cos / sin are what MLX's Cos / Sin run; the harness's libm differs from
//                 MLX's CPU polynomial by an ulp, which can move a bf16 rounding and so one FP4 code
//                 by one step. NORM sums squares in a SIMD tree, not MLX's order (an ulp of the norm)
// @bytes          2 s B L H D (s = sizeof(T)) + 4 (R2 + D); Flash decode q: 64 rows x 128 bf16 = 32 KB
// @flops          ~(3 log2 D + 20) D per row (butterfly, scale, FP4 compares) + 2 R2 sin / cos
// @decode-share   Flash: q (64 heads) every token and 128-wide keys every 4th in each of 21 CSA layers,
//                 ~0.7 MB per token: ~1 us of a ~14 ms step. What counts is launches: the q finish
//                 was ~25 MLX ops (rope: slices, casts, stack, concatenate; Hadamard; bf16; FP4: abs,
//                 max, scale bits, clip, 7 compares, table, multiply, casts), the keys ~33 with
//                 the norm; now 1 each (est. 2-4 us, latency-bound; not measured: no Mac).
//
// Layout: lane l of a row's SIMD group holds channels l + 32 k, k < D / 32. So butterfly strides
// 1..16 are lane bits (simd_shuffle_xor), strides 32.. are register bits, and FP4 block k is
// register k across the 32 lanes (its amax is one simd_max). No threadgroup memory, no barriers.
// The butterfly runs strides in increasing order and scales once at the end, the summation tree
// of MLX's hadamard_transform, so the fp32 sums are the same.

// @header
// E2M1 magnitude of code c = 0..7: 0, .5, 1, 1.5, 2, 3, 4, 6.
inline float e2m1_magnitude(uint c) {
  return c < 4 ? 0.5f * float(c) : c < 7 ? float(c - 2) : 6.0f;
}

// FP4 round trip of the bf16 value r whose 32-value block has |max| amax: formats._block_quantize
// then _block_dequantize (scale 2^ceil(log2(amax / 6)) from the bits, exact reciprocal, clamp,
// nearest-even at the midpoints, sign of zero kept).
inline float fp4_roundtrip(float r, float amax) {
  const float am = metal::max(amax, as_type<float>(0x01C00000u));       // FP4_AMAX_FLOOR = 6 * 2^-126
  const uint bits = as_type<uint>(am * as_type<float>(0x3E2AAAABu));    // fp32(1 / 6)
  const uint e = metal::min(((bits >> 23) & 0xFFu) + uint((bits & 0x7FFFFFu) != 0), 255u);
  const float q = metal::clamp(r * e8m0((254u - e) & 0xFFu), -6.0f, 6.0f);
  const float a = metal::abs(q);
  const uint c = uint(a > 0.25f) + uint(a >= 0.75f) + uint(a > 1.25f) + uint(a >= 1.75f) + uint(a > 2.5f) +
                 uint(a >= 3.5f) + uint(a > 5.0f);
  const float m = e2m1_magnitude(c);
  return (as_type<uint>(q) >> 31 ? -m : m) * e8m0(e);
}

// @source
constexpr int V = D / 32;  // channels per lane
static_assert(D % 32 == 0 && (D & (D - 1)) == 0 && D <= 256, "D must be a power of two in 32..256");
static_assert(2 * R2 <= D, "the rope channels exceed the row");

const uint row = thread_position_in_grid.x / 32;
const uint lane = thread_index_in_simdgroup;
const uint t = (row / (x_ndim == 4 ? x_shape[2] : x_shape[2] / D)) % x_shape[1];  // the row's token
const device T* xr = x + size_t(row) * D;
device T* yr = out + size_t(row) * D;

float v[V];
for (int k = 0; k < V; ++k) {
  v[k] = float(xr[lane + 32 * k]);
}

if (NORM) {  // norm.rms_norm: fp32 statistics, weight in fp32, rounded to T
  float ss = 0.0f;
  for (int k = 0; k < V; ++k) {
    ss += v[k] * v[k];
  }
  const float inv = metal::precise::rsqrt(simd_sum(ss) * (1.0f / D) + consts[0]);
  for (int k = 0; k < V; ++k) {
    v[k] = float(T(v[k] * inv * weight[lane + 32 * k]));
  }
}

// rope.apply_rope on pairs (2i, 2i+1) of the last 2 R2 channels; the partner is the neighbouring lane.
const float p = float(pos[0] + int(t) * pos[1]);
for (int k = 0; k < V; ++k) {
  const float other = simd_shuffle_xor(v[k], 1);
  const int e = int(lane) + 32 * k - (D - 2 * R2);
  if (e >= 0) {
    const float ang = p * freqs[e / 2];
    const float c = metal::precise::cos(ang), s = metal::precise::sin(ang);
    v[k] = float(T(lane & 1 ? other * s + v[k] * c : v[k] * c - other * s));
  }
}

if (QAT) {
  for (uint h = 1; h < 32; h <<= 1) {  // strides 1..16: across lanes
    for (int k = 0; k < V; ++k) {
      const float u = simd_shuffle_xor(v[k], h);
      v[k] = lane & h ? u - v[k] : v[k] + u;
    }
  }
  for (int h = 1; h < V; h <<= 1) {  // strides 32..: across registers
    for (int k = 0; k < V; ++k) {
      if (!(k & h)) {
        const float a = v[k], b = v[k + h];
        v[k] = a + b;
        v[k + h] = a - b;
      }
    }
  }
  for (int k = 0; k < V; ++k) {
    const float r = float(bfloat16_t(v[k] * consts[1]));
    v[k] = float(bfloat16_t(fp4_roundtrip(r, simd_max(metal::abs(r)))));
  }
}

for (int k = 0; k < V; ++k) {
  yr[lane + 32 * k] = T(v[k]);
}
