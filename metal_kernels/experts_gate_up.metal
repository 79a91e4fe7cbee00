// Routed experts, first half (spec §2.4): for every (token n, selected slot j, row i) the gate and up
// dot products against expert e = ids[n, j]'s mxfp4 w1 / w3 rows, read packed, then the clamped
// SwiGLU h[n, j, i] = silu(min(g, limit)) * clip(u, -limit, limit), all in float32. With SHARED, slot
// K of every token is the always-on shared expert (mxfp8 w1s / w3s): its g and u are rounded to T
// first, as the model's nn.QuantizedLinear returns x's dtype.
//
// @kernel         experts_gate_up
// @include        formats; experts_common
// @inputs         x: T[N, D]; ids: int32|uint32[N, K]; w1: uint32[E, I, D/8]; s1: uint8[E, I, D/32];
//                 w3: uint32[E, I, D/8]; s3: uint8[E, I, D/32]; limit: float[];
//                 w1s: uint32[I, D/4]; s1s: uint8[I, D/32]; w3s: uint32[I, D/4]; s3s: uint8[I, D/32]
//                 (without SHARED the wrapper passes w1, s1, w3, s3 again: never read)
// @outputs        h: float[N, K + SHARED, I]
// @template       T: type; D: int; I: int; K: int; SHARED: bool
// @grid           (32 * ceil(I / 4), N (K + SHARED), 1)
// @threadgroup    (min(32 * ceil(I / 4), 256), 1, 1)
// @reference      mlx_dsv4.kernels.experts.gate_up_reference
// @tolerance      per element, from g and u each within 2 (D + 2) 2^-24 sum_d |w x| of the reference
//                 (both sum the same D fp32 products in different orders): |dh| <= 1.1 |u| dg + |g| du
//                 + 8 ulp(h) (silu's exp and divide); the shared slot's g and u, each rounded to T, may
//                 land on neighbouring T values: dg, du grow by 2 u_T |g|, 2 u_T |u| (u_T: T's unit
//                 roundoff) there
// @bytes          N K I (D + D/16) for w1 + w3 (4.25 bits per weight with the E8M0 scales), with SHARED
//                 + N I (2 D + D/16) (8.25 bits), + N D s + 4 N (K + 1) (1 + I), s = sizeof(T)
// @flops          4 N (K + SHARED) I D (two dot products) + ~10 N (K + SHARED) I (SwiGLU)
// @decode-share   Flash decode, N = 1, K = 6, D = 4096, I = 2048: 53.5 MB per layer for the routed
//                 experts (two 4.25 MB matrices each) + 17.3 MB for the shared one, 3.0 GB over 43
//                 layers, ~28% of the ~11 GB a step reads: ~86 us per call at 819 GB/s, ~3.7 ms of a
//                 ~14 ms step; 235 MFLOP per call is far below the fp32 rate: bandwidth-bound.
//                 Replaces two gather_qmm launches, two quantized_matmul launches and the elementwise
//                 launches of both clamped SwiGLUs per layer.
//
// Layout: one SIMD group per (pair p = n (K + SHARED) + j, block of R = 4 rows); the grid's y is the
// pair, so a threadgroup never mixes the mxfp4 and mxfp8 slots. Lane l reads packed words l, l + 32,
// ... of each row (coalesced 128-byte lines across the SIMD group), decodes their activations once
// for all R rows and both matrices, and keeps 2 R partial sums; simd_sum finishes each. A word lies
// in one 32-element scale group (word / BITS), so the scale multiplies the word's partial dot once.
// D need not be a multiple of 32 words: lanes past the last word add nothing; rows past I (last
// block) are skipped by the whole SIMD group.

// @header
// Lane's partial sums over its words of rows row0 .. row0 + R - 1 (those below I) of two packed
// [I, D] matrices (qa, sa) and (qb, sb) against the activations x[0 .. D).
template <int BITS, int D, int I, int R, typename X>
inline void gate_up_rows(const device X* x, const device uint* qa, const device uchar* sa, const device uint* qb,
                         const device uchar* sb, uint row0, uint lane, thread float* a, thread float* b) {
  constexpr int C = 32 / BITS;  // codes per word
  constexpr int W = D / C;      // words per row
  constexpr int G = D / 32;     // scale groups per row
  for (uint w = lane; w < W; w += 32) {
    float v[C];
    for (int i = 0; i < C; ++i) {
      v[i] = float(x[C * w + i]);
    }
    for (int r = 0; r < R; ++r) {
      if (row0 + r < I) {  // the same for the whole SIMD group
        const size_t row = row0 + r;
        a[r] += e8m0(sa[row * G + w / BITS]) * mx_dot<BITS>(qa[row * W + w], v);
        b[r] += e8m0(sb[row * G + w / BITS]) * mx_dot<BITS>(qb[row * W + w], v);
      }
    }
  }
}

// @source
constexpr int R = 4;                       // output rows per SIMD group
constexpr int KS = K + (SHARED ? 1 : 0);   // slots per token; the shared expert is slot K
static_assert(D % 32 == 0 && I > 0 && K > 0, "mx rows come in groups of 32");

const uint p = thread_position_in_grid.y;
const uint n = p / KS, j = p % KS;
const bool shared = SHARED && j == K;  // uniform over the threadgroup (one pair per grid row)
const uint row0 = (thread_position_in_grid.x / 32) * R;
const uint lane = thread_index_in_simdgroup;
const device T* xr = x + size_t(n) * D;

float g[R], u[R];
for (int r = 0; r < R; ++r) {
  g[r] = 0.0f;
  u[r] = 0.0f;
}
if (shared) {
  gate_up_rows<8, D, I, R>(xr, w1s, s1s, w3s, s3s, row0, lane, g, u);
} else {
  const size_t e = uint(ids[n * K + j]);
  const size_t wq = e * I * (D / 8), ws = e * I * (D / 32);  // expert e's matrices
  gate_up_rows<4, D, I, R>(xr, w1 + wq, s1 + ws, w3 + wq, s3 + ws, row0, lane, g, u);
}
for (int r = 0; r < R; ++r) {
  float gs = simd_sum(g[r]), us = simd_sum(u[r]);
  if (shared) {
    gs = float(T(gs));
    us = float(T(us));
  }
  gs = metal::min(gs, limit);
  us = metal::clamp(us, -limit, limit);
  if (lane == uint(r) && row0 + r < I) {
    h[size_t(p) * I + row0 + r] = gs / (1.0f + metal::exp(-gs)) * us;
  }
}
