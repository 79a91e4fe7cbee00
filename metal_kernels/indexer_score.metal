// Lightning-indexer scores (spec §4.2): score[b, l, n] = sum_h w[b, l, h] relu(q[b, l, h] . k[b, n])
// for n < (offset[b] + l + 1) / RATIO, and -inf for the entries query l cannot see yet.
//
// @kernel         indexer_score
// @inputs         q: T[B, L, H, DQ]; k: T[B, N, DQ]; w: float[B, L, H]; offset: int32[B]
// @outputs        score: float[B, L, N]
// @template       T: type; H: int; DQ: int; RATIO: int
// @grid           (128 * ceil(N / 32), L, B)
// @threadgroup    (128, 1, 1)
// @reference      mlx_dsv4.kernels.indexer_score.indexer_score_reference
// @tolerance      |kernel - reference| <= 2 (DQ + H + 2) 2^-24 sum_h |w_h| sum_d |q_hd k_nd| elementwise
//                 (both sum the same terms in fp32 in different orders); -inf entries exactly
// @bytes          B L N DQ s (keys, once per query row; decode L = 1) + B L H DQ s + 4 B L (H + N),
//                 s = sizeof(T)
// @flops          2 B L N H DQ
// @decode-share   Flash, context t: N = t/4 keys x 128 fp32 = 128 t bytes and 4096 t FLOP per CSA
//                 layer, 21 layers: at 64K ~0.2 ms (~1.5% of a ~14 ms step), at 1M ~3.4 ms of
//                 reads and ~3 ms of fp32 math (~28 TFLOP/s) - the case for reading the FP4 keys
//                 directly (8x fewer bytes) in a later kernel.
//
// Layout: one threadgroup (4 SIMD groups) scores KT = 32 keys for one query (b, l). The key tile
// is staged in threadgroup memory (coalesced loads, one barrier). SIMD group s takes keys
// 8 s .. 8 s + 7; lane i takes heads i, i + 32, ... and forms, for each of its 8 keys, the partial
// sum over its heads of w_h relu(q_h . k). reduce_8 then sums the 8 partials over the 32 lanes in
// 9 shuffles. Tiles that query l cannot see at all only write -inf.

// @header
// Sum v[0..7] over the 32 lanes, all eight at once: at each step a lane keeps half of its values
// and adds its partner's copy of them (partners differ in lane bit 4, then 3, then 2); the last
// two steps finish within groups of four. Lane i ends with the total of v[(i >> 2) & 7].
inline float reduce_8(thread float* v, uint lane) {
  const bool b4 = lane & 16, b3 = lane & 8, b2 = lane & 4;
  float a[4], c[2];
  for (int i = 0; i < 4; ++i) {
    a[i] = (b4 ? v[i + 4] : v[i]) + simd_shuffle_xor(b4 ? v[i] : v[i + 4], 16);
  }
  for (int i = 0; i < 2; ++i) {
    c[i] = (b3 ? a[i + 2] : a[i]) + simd_shuffle_xor(b3 ? a[i] : a[i + 2], 8);
  }
  float s = (b2 ? c[1] : c[0]) + simd_shuffle_xor(b2 ? c[0] : c[1], 4);
  s += simd_shuffle_xor(s, 2);
  return s + simd_shuffle_xor(s, 1);
}

// @source
constexpr int KT = 32;  // keys per threadgroup
constexpr int KS = 8;   // keys per SIMD group (reduce_8)
static_assert(KT * DQ * 4 <= 32768, "key tile exceeds 32 KiB of threadgroup memory");
threadgroup float ks[KT * DQ];

const uint tile = threadgroup_position_in_grid.x;
const uint l = threadgroup_position_in_grid.y;
const uint b = threadgroup_position_in_grid.z;
const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const uint L = q_shape[1];
const uint N = k_shape[1];
const uint n0 = tile * KT;
const int visible = (offset[b] + int(l) + 1) / RATIO;
device float* out = score + (size_t(b) * L + l) * N;

if (int(n0) >= visible) {  // the same for the whole threadgroup: no barrier is skipped by some only
  for (uint i = tid; i < KT && n0 + i < N; i += 128) {
    out[n0 + i] = -INFINITY;
  }
  return;
}

for (uint i = tid; i < KT * DQ; i += 128) {
  const uint r = i / DQ;
  ks[i] = n0 + r < N ? float(k[(size_t(b) * N + n0 + r) * DQ + i % DQ]) : 0.0f;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

const device T* qr = q + (size_t(b) * L + l) * H * DQ;
const device float* wr = w + (size_t(b) * L + l) * H;
const threadgroup float* kt = ks + sg * KS * DQ;
float part[KS];
for (int j = 0; j < KS; ++j) {
  part[j] = 0.0f;
}
for (uint h = lane; h < H; h += 32) {
  float acc[KS];
  for (int j = 0; j < KS; ++j) {
    acc[j] = 0.0f;
  }
  for (int d = 0; d < DQ; ++d) {
    const float qv = float(qr[h * DQ + d]);
    for (int j = 0; j < KS; ++j) {
      acc[j] += qv * kt[j * DQ + d];
    }
  }
  const float wh = wr[h];
  for (int j = 0; j < KS; ++j) {
    part[j] += wh * metal::max(acc[j], 0.0f);
  }
}
const float total = reduce_8(part, lane);
const uint n = n0 + sg * KS + ((lane >> 2) & 7);
if ((lane & 3) == 0 && n < N) {
  out[n] = int(n) < visible ? total : -INFINITY;
}
