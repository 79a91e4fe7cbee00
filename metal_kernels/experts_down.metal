// Routed experts, second half (spec §2.4): y[n] = sum_j w2[ids[n, j]] . round_T(h[n, j] * wt[n, j]),
// the mxfp4 w2 rows read packed, the routing weights applied (rounded to x's dtype first, as the
// reference does before w2) and the sum over the K selected experts fused: no [N, K, D] array.
//
// @kernel         experts_down
// @inputs         h: float[N, K, I]; ids: int32|uint32[N, K]; wt: float[N, K];
//                 w2: uint32[E, D, I/8]; s2: uint8[E, D, I/32]
// @outputs        y: float[N, D]
// @template       T: type; D: int; I: int; K: int
// @grid           (32 * ceil(D / 4), N, 1)
// @threadgroup    (min(32 * ceil(D / 4), 256), 1, 1)
// @reference      mlx_dsv4.kernels.experts.down_reference
// @tolerance      |kernel - reference| <= 2 (K I + 2) 2^-24 sum_j sum_i |w2_ji hT_ji| per element: the
//                 same K I fp32 products summed in different orders; hT = round_T(h wt) is bitwise the
//                 reference's (one fp32 multiply, then round to nearest even)
// @bytes          N K D (I/2 + I/32) for w2 + 4 N K (I + 2) + 4 N D; nothing shared across tokens
// @flops          2 N K D I + N K I (the weight products)
// @decode-share   Flash decode, N = 1, K = 6, D = 4096, I = 2048: 26.7 MB per layer, 1.15 GB over
//                 43 layers, ~10% of the ~11 GB a step reads: ~33 us per call at 819 GB/s, ~1.4 ms
//                 of a ~14 ms step; 100 MFLOP per call: bandwidth-bound. Replaces a gather_qmm, the
//                 weight product and cast, and the sum over experts.
//
// Layout: one SIMD group per (token n, block of R = 4 output rows); lane l takes packed words
// l, l + 32, ... of each expert's rows and accumulates over all K experts in R partial sums,
// so one simd_sum per row finishes both the dot product and the sum over experts. Rows past D
// (last block) are skipped by the whole SIMD group.

// @header
// e2m1 codes: bit 3 sign, bits 0-2 index the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
constant float FP4_E2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// E8M0 byte b -> 2^(b - 127) via the float exponent field (b = 0, subnormal 2^-127, becomes 0).
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
constexpr int W = I / 8;   // packed words per row
constexpr int G = I / 32;  // scale groups per row
static_assert(I % 32 == 0 && D > 0 && K > 0, "mxfp4 rows come in groups of 32");

const uint n = thread_position_in_grid.y;
const uint row0 = (thread_position_in_grid.x / 32) * R;
const uint lane = thread_index_in_simdgroup;

float acc[R];
for (int r = 0; r < R; ++r) {
  acc[r] = 0.0f;
}
for (int j = 0; j < K; ++j) {
  const uint p = n * K + j;
  const uint e = uint(ids[p]);
  const float scale = wt[p];
  const device float* hr = h + size_t(p) * I;
  for (uint w = lane; w < W; w += 32) {
    float v[8];
    for (int i = 0; i < 8; ++i) {
      v[i] = float(T(hr[8 * w + i] * scale));
    }
    for (int r = 0; r < R; ++r) {
      if (row0 + r < D) {  // the same for the whole SIMD group
        const size_t row = size_t(e) * D + row0 + r;
        acc[r] += e8m0(s2[row * G + w / 4]) * dot8(w2[row * W + w], v);
      }
    }
  }
}
for (int r = 0; r < R; ++r) {
  const float s = simd_sum(acc[r]);
  if (lane == uint(r) && row0 + r < D) {
    y[size_t(n) * D + row0 + r] = s;
  }
}
