// Sparse attention with a sink, decode form (few queries): out[b, l, h] = sum_j p_j v_j over query l's
// window rows and compressed entries (HCA: all complete ones; CSA: its index list), K = V shared by heads.
//
// @kernel         sparse_attention_decode
// @inputs         q: T[B, L, H, D]; win: T[B, W, D]; ck: C[B, cap, D] dense rows or uint8[B, cap, NOPE] e4m3;
//                 ce: uint8[B, cap, ceil(NOPE / 64)] E8M0 (FP8) or a dummy; cr: T[B, cap, D - NOPE] rope (FP8) or a
//                 dummy; idx: int32[B, L, K] (CSA, -1 = none) or a dummy; sink: float[H];
//                 pos: int32[4] (start, win_start (< 0: the rows before position 0 are padding), n valid
//                 entries, row base: position p is window row (p - base) mod W: win_start for rows in position
//                 order, 0 for a compiled step's ring, position p in row p mod W); scale: float[]
// @outputs        out: T[B, L, H, D]
// @template       T: type; D: int; NOPE: int; HT: int; FP8: bool; CSA: bool; WINDOW: int; RATIO: int
// @include        formats; sparse_attention_common
// @grid           (32 * 4, ceil(H / HT), B * L)
// @threadgroup    (128, 1, 1): 4 SIMD groups, one query (b, l) and a tile of HT heads
// @reference      mlx_dsv4.kernels.sparse_attention.sparse_attention_reference
// @tolerance      |out - ref| <= (4 e_T + 2 dz + (keys + D + 8) 2^-24) sum_j p_j |v_j| + 2 e_T |ref|, e_T the
//                 unit roundoff of T, dz the fp32 logit error bound (D + 2) 2^-24 scale max_j sum_d |q_d k_jd|:
//                 same fp32 terms in another order, and the probability / output roundings to T may land on
//                 neighbouring values of T
// @bytes          per (query, head tile): keys x (D sizeof(T) dense | NOPE + NOPE/64 + (D - NOPE) sizeof(T) FP8),
//                 read twice (statistics, then PV; the second read and the other head tiles hit the cache),
//                 + 4 K (CSA ids) + 2 HT D sizeof(T) (q, out)
// @flops          6 B L H D keys (q.k in both passes, p v in the second)
// @decode-share   Flash, B = 1 (H 64 in 32 tiles of 2 heads, D 512, window 128 bf16 rows of 1 KB, FP8 entries
//                 583 B): DRAM reads ~0.43 MB per CSA layer (128 + 512 rows), 0.13 + 583 t/128 B per HCA
//                 layer, 0.13 MB per sliding layer. 64K (HCA 512 entries): ~18 MB (~22 us at 819 GB/s)
//                 and ~5.2 GFLOP (~0.19 ms at ~28 TFLOP/s): ~1.5% of a ~14 ms step. 1M (HCA 8192
//                 entries): ~107 MB (~0.13 ms) and ~35 GFLOP (~1.3 ms): ~9%, compute-bound (a third is
//                 the recomputed q.k) and on 32 threadgroups with 64x the DRAM bytes in cache traffic:
//                 long HCA ranges are the case for splitting keys across threadgroups.
//
// Layout: SIMD group s takes keys s, s + 4, ...; lane i holds channels i, i + 32, ... of the key row and
// of the HT query heads, so each loaded row serves every head of the tile and a logit is one simd_sum.
// Pass 0 keeps an online max / sum per head; the four groups' statistics meet in threadgroup memory
// and give the final max M and denominator (plus the sink). Pass 1 recomputes each logit and adds
// T(exp(z - M) / den) v, the probability rounded to T as the reference does; the groups' partial
// outputs are summed in group order through threadgroup memory.

// @source
constexpr int S = 4;  // SIMD groups splitting the keys
constexpr int DL = D / 32;  // channels per lane
static_assert(D % 32 == 0 && NOPE <= D, "D must be a multiple of 32, NOPE <= D");
static_assert(HT * D * 4 <= 24576, "head tile x D exceeds the threadgroup reduction buffer");
threadgroup float stat_m[S * HT];
threadgroup float stat_s[S * HT];
threadgroup float red[HT * D];

const uint sg = simdgroup_index_in_threadgroup, lane = thread_index_in_simdgroup;
const int H = q_shape[2], L = q_shape[1], W = win_shape[1], cap = ck_shape[1], K = idx_shape[2];
const int h0 = threadgroup_position_in_grid.y * HT;
const int b = threadgroup_position_in_grid.z / L, l = threadgroup_position_in_grid.z % L;
const int t = pos[0] + l, ws = pos[1], n = pos[2], base = pos[3];
const int wlo = metal::max(metal::max(ws, t - WINDOW + 1), 0);  // visible window positions [wlo, whi): rows
                                                               // before position 0 are padding
const int nw = metal::max(metal::min(ws + W, t + 1) - wlo, 0);
const int nc = CSA ? K : metal::max(metal::min(n, (t + 1) / RATIO), 0);
const device T* wrow = win + size_t(b) * W * D;
const device int* ids = idx + (size_t(b) * L + l) * K;
const size_t crow = size_t(b) * cap;

float qv[HT * DL], m[HT], sm[HT], acc[HT * DL];
for (int i = 0; i < HT; ++i) {
  const device T* qh = q + ((size_t(b) * L + l) * H + metal::min(h0 + i, H - 1)) * D;  // a partial tile
  for (int c = 0; c < DL; ++c) {                                                       // repeats a head
    qv[i * DL + c] = float(qh[lane + 32 * c]);
    acc[i * DL + c] = 0.0f;
  }
  m[i] = -INFINITY;
  sm[i] = 0.0f;
}

for (int pass = 0; pass < 2; ++pass) {
  for (int j = sg; j < nw + nc; j += S) {  // uniform within the SIMD group: simd_sum sees all lanes
    float kv[DL];
    if (j < nw) {
      for (int c = 0; c < DL; ++c) {
        kv[c] = float(wrow[size_t((wlo + j - base) % W) * D + lane + 32 * c]);  // wlo - base >= 0
      }
    } else {
      const int e = CSA ? ids[j - nw] : j - nw;
      if (e < 0 || e >= n) {
        continue;
      }
      for (int c = 0; c < DL; ++c) {
        kv[c] = Comp<FP8>::at(ck, ce, cr, crow + e, lane + 32 * c, D, NOPE);
      }
    }
    attend<T, HT, DL>(pass, kv, qv, scale, m, sm, acc);
  }
  if (pass == 0) {  // combine the groups' statistics: final max, denominator with the sink
    if (lane == 0) {
      for (int i = 0; i < HT; ++i) {
        stat_m[sg * HT + i] = m[i];
        stat_s[sg * HT + i] = sm[i];
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int i = 0; i < HT; ++i) {
      float mg = -INFINITY, den = 0.0f;
      for (int g = 0; g < S; ++g) {
        mg = metal::max(mg, stat_m[g * HT + i]);
      }
      for (int g = 0; g < S; ++g) {  // a group without keys has sum 0 (and max -inf: skip the NaN)
        den += stat_s[g * HT + i] > 0.0f ? stat_s[g * HT + i] * metal::exp(stat_m[g * HT + i] - mg) : 0.0f;
      }
      m[i] = mg;
      sm[i] = den + metal::exp(sink[metal::min(h0 + i, H - 1)] - mg);
    }
  }
}

// Sum the groups' partial outputs in group order; the last group writes the heads that exist.
for (int g = 0; g < S; ++g) {
  if (int(sg) == g) {
    for (int i = 0; i < HT; ++i) {
      for (int c = 0; c < DL; ++c) {
        const int r = i * D + lane + 32 * c;
        const float v = (g ? red[r] : 0.0f) + acc[i * DL + c];
        if (g < S - 1) {
          red[r] = v;
        } else if (h0 + i < H) {
          out[((size_t(b) * L + l) * H + h0 + i) * D + lane + 32 * c] = T(v);
        }
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
