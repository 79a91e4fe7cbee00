// Routed experts, first half (spec §2.4): for every (token n, selected slot j, row i) the gate and up
// dot products against expert e = ids[n, j]'s mxfp4 w1 / w3 rows, read packed, then the clamped
// SwiGLU h[n, j, i] = silu(min(g, limit)) * clip(u, -limit, limit), all in float32.
//
// @kernel         experts_gate_up
// @inputs         x: T[N, D]; ids: int32|uint32[N, K]; w1: uint32[E, I, D/8]; s1: uint8[E, I, D/32];
//                 w3: uint32[E, I, D/8]; s3: uint8[E, I, D/32]; limit: float[]
// @outputs        h: float[N, K, I]
// @template       T: type; D: int; I: int; K: int
// @grid           (32 * ceil(I / 4), N * K, 1)
// @threadgroup    (min(32 * ceil(I / 4), 256), 1, 1)
// @reference      mlx_dsv4.kernels.experts.gate_up_reference
// @tolerance      per element, from g and u each within 2 (D + 2) 2^-24 sum_d |w x| of the reference
//                 (both sum the same D fp32 products in different orders): |dh| <= 1.1 |u| dg + |g| du
//                 + 8 ulp(h) (silu's exp and divide)
// @bytes          N K I (D + D/16) for w1 + w3 (4.25 bits per weight with the E8M0 scales)
//                 + N D s + 4 N K (1 + I), s = sizeof(T); nothing is shared across (n, j) pairs
// @flops          4 N K I D (two dot products) + ~10 N K I (SwiGLU)
// @decode-share   Flash decode, N = 1, K = 6, D = 4096, I = 2048: 53.5 MB per layer (two 4.25 MB
//                 matrices per expert), 2.3 GB over 43 layers, ~21% of the ~11 GB a step reads:
//                 ~65 us per call at 819 GB/s, ~2.8 ms of a ~14 ms step. 201 MFLOP per call is
//                 far below the fp32 rate: bandwidth-bound. Replaces two gather_qmm launches and
//                 the ~6 elementwise launches of the clamp / silu / product per layer.
//
// Layout: one SIMD group per (pair p = n K + j, block of R = 4 rows); the grid's y is the pair.
// Lane l reads packed words l, l + 32, ... of each row (coalesced 128-byte lines across the SIMD
// group), decodes its 8 activations once for all R rows and both matrices, and keeps 2 R partial
// sums; simd_sum finishes each. A word's 8 elements lie in one 32-element scale group (word / 4),
// so the scale multiplies the word's partial dot once. D need not be a multiple of 256: lanes past
// the last word add nothing; rows past I (last block) are skipped by the whole SIMD group.

// @header
// e2m1 codes: bit 3 sign, bits 0-2 index the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
constant float FP4_E2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// E8M0 byte b -> 2^(b - 127), written straight into a float's exponent field (b = 0 would be the
// subnormal 2^-127 and becomes 0; quantization never picks it for weights of any useful size).
inline float e8m0(uchar b) { return as_type<float>(uint(b) << 23); }

// Dot of one packed word (8 codes, element 8 w + i in bits 4 i .. 4 i + 3, lowest first) with v.
inline float dot8(uint q, thread const float* v) {
  float s = 0.0f;
  for (int i = 0; i < 8; ++i) {
    s += FP4_E2M1[(q >> (4 * i)) & 15u] * v[i];
  }
  return s;
}

// @source
constexpr int R = 4;       // output rows per SIMD group
constexpr int W = D / 8;   // packed words per row
constexpr int G = D / 32;  // scale groups per row
static_assert(D % 32 == 0 && I > 0 && K > 0, "mxfp4 rows come in groups of 32");

const uint p = thread_position_in_grid.y;
const uint row0 = (thread_position_in_grid.x / 32) * R;
const uint lane = thread_index_in_simdgroup;
const uint e = uint(ids[p]);
const device T* xr = x + size_t(p / K) * D;

float g[R], u[R];
for (int r = 0; r < R; ++r) {
  g[r] = 0.0f;
  u[r] = 0.0f;
}
for (uint w = lane; w < W; w += 32) {
  float v[8];
  for (int i = 0; i < 8; ++i) {
    v[i] = float(xr[8 * w + i]);
  }
  for (int r = 0; r < R; ++r) {
    if (row0 + r < I) {  // the same for the whole SIMD group
      const size_t row = size_t(e) * I + row0 + r;
      g[r] += e8m0(s1[row * G + w / 4]) * dot8(w1[row * W + w], v);
      u[r] += e8m0(s3[row * G + w / 4]) * dot8(w3[row * W + w], v);
    }
  }
}
for (int r = 0; r < R; ++r) {
  const float gs = metal::min(simd_sum(g[r]), limit);
  const float us = metal::clamp(simd_sum(u[r]), -limit, limit);
  if (lane == uint(r) && row0 + r < I) {
    h[size_t(p) * I + row0 + r] = gs / (1.0f + metal::exp(-gs)) * us;
  }
}
