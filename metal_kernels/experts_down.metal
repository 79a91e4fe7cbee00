// Routed experts, second half (spec §2.4): y[n] = sum_j w2[ids[n, j]] . round_T(h[n, j] * wt[n, j]),
// the mxfp4 w2 rows read packed, the routing weights applied (rounded to x's dtype first, as the
// reference does before w2) and the sum over the K selected experts fused: no [N, K, D] array. With
// SHARED, the shared expert's down projection is added in the same pass: h's slot K, rounded to T
// (no routing weight), against the mxfp8 w2s, its sum rounded to T (nn.QuantizedLinear's output
// dtype) before the float32 add, as the model's MoE adds routed + shared.
//
// @kernel         experts_down
// @include        formats; experts_common
// @inputs         h: float[N, K + SHARED, I]; ids: int32|uint32[N, K]; wt: float[N, K];
//                 w2: uint32[E, D, I/8]; s2: uint8[E, D, I/32]; w2s: uint32[D, I/4]; s2s: uint8[D, I/32]
//                 (without SHARED the wrapper passes w2, s2 again: never read)
// @outputs        y: float[N, D], or in T (the float32 sum rounded once: the model's next dtype), any
//                 leading axes of N rows
// @template       T: type; D: int; I: int; K: int; SHARED: bool
// @grid           (32 * ceil(D / 4), N, 1)
// @threadgroup    (min(32 * ceil(D / 4), 256), 1, 1)
// @reference      mlx_dsv4.kernels.experts.down_reference
// @tolerance      |kernel - reference| <= 2 (K I + 2) 2^-24 sum_j sum_i |w2_ji hT_ji| per element: the
//                 same K I fp32 products summed in different orders; hT = round_T(h wt) is bitwise the
//                 reference's (one fp32 multiply, then round to nearest even). The shared term: its
//                 own 2 (I + 2) 2^-24 sum_i |w2s_i hT_i| before rounding to T, + 2 u_T of that sum after
// @bytes          N K D (I/2 + I/32) for w2, with SHARED + N D (I + I/32), + 4 N (K + 1) (I + 2)
//                 + 4 N D; nothing shared across tokens
// @flops          2 N (K + SHARED) D I + N K I (the weight products)
// @decode-share   Flash decode, N = 1, K = 6, D = 4096, I = 2048: 26.7 MB per layer for the routed
//                 experts + 8.7 MB for the shared one, 1.5 GB over 43 layers, ~14% of the ~11 GB a
//                 step reads: ~43 us per call at 819 GB/s, ~1.9 ms of a ~14 ms step; 117 MFLOP per
//                 call: bandwidth-bound. Replaces a gather_qmm, the weight product and cast, the sum
//                 over experts, the shared expert's w2 quantized_matmul and the routed + shared add.
//
// Layout: one SIMD group per (token n, block of R = 4 output rows); lane l takes packed words
// l, l + 32, ... of each expert's rows and accumulates over all K experts in R partial sums (the
// shared expert in R more), so one simd_sum per row finishes both the dot product and the sum over
// experts. Rows past D (last block) are skipped by the whole SIMD group.

// @header
// Lane's partial sums over its words of rows row0 .. row0 + R - 1 (those below D) of a packed
// [D, I] matrix (q, s) against round_T(hr[0 .. I) * scale).
template <int BITS, int D, int I, int R, typename T>
inline void down_rows(const device float* hr, float scale, const device uint* q, const device uchar* s, uint row0,
                      uint lane, thread float* acc) {
  constexpr int C = 32 / BITS;  // codes per word
  constexpr int W = I / C;      // words per row
  constexpr int G = I / 32;     // scale groups per row
  for (uint w = lane; w < W; w += 32) {
    float v[C];
    for (int i = 0; i < C; ++i) {
      v[i] = float(T(hr[C * w + i] * scale));
    }
    for (int r = 0; r < R; ++r) {
      if (row0 + r < D) {  // the same for the whole SIMD group
        const size_t row = row0 + r;
        acc[r] += e8m0(s[row * G + w / BITS]) * mx_dot<BITS>(q[row * W + w], v);
      }
    }
  }
}

// @source
constexpr int R = 4;                       // output rows per SIMD group
constexpr int KS = K + (SHARED ? 1 : 0);   // h's slots per token; the shared expert is slot K
static_assert(I % 32 == 0 && D > 0 && K > 0, "mx rows come in groups of 32");

const uint n = thread_position_in_grid.y;
const uint row0 = (thread_position_in_grid.x / 32) * R;
const uint lane = thread_index_in_simdgroup;

float acc[R], accs[R];
for (int r = 0; r < R; ++r) {
  acc[r] = 0.0f;
  accs[r] = 0.0f;
}
for (int j = 0; j < K; ++j) {
  const uint p = n * K + j;
  const size_t e = uint(ids[p]);
  down_rows<4, D, I, R, T>(h + (size_t(n) * KS + j) * I, wt[p], w2 + e * D * (I / 8), s2 + e * D * (I / 32), row0,
                           lane, acc);
}
if (SHARED) {
  down_rows<8, D, I, R, T>(h + (size_t(n) * KS + K) * I, 1.0f, w2s, s2s, row0, lane, accs);
}
for (int r = 0; r < R; ++r) {
  float s = simd_sum(acc[r]);
  if (SHARED) {
    s += float(T(simd_sum(accs[r])));
  }
  if (lane == uint(r) && row0 + r < D) {
    y[size_t(n) * D + row0 + r] = s;
  }
}
