// Sparse attention with a sink, prefill form (many queries): as sparse_attention_decode, with a
// threadgroup serving a tile of 4 consecutive queries (one per SIMD group) that share staged window rows.
//
// @kernel         sparse_attention_prefill
// @inputs         q: T[B, L, H, D]; win: T[B, W, D]; ck: C[B, cap, D] dense rows or uint8[B, cap, NOPE] e4m3;
//                 ce: uint8[B, cap, ceil(NOPE / 64)] E8M0 (FP8) or a dummy; cr: T[B, cap, D - NOPE] rope (FP8)
//                 or a dummy; idx: int32[B, L, K] (CSA, -1 = none) or a dummy; sink: float[H];
//                 pos: int32[3] (start, win_start (< 0: the rows before position 0 are padding), n valid
//                 entries); scale: float[]
// @outputs        out: T[B, L, H, D]
// @template       T: type; D: int; NOPE: int; HT: int; FP8: bool; CSA: bool; WINDOW: int; RATIO: int
// @include        formats; sparse_attention_common
// @grid           (32 * 4, ceil(H / HT), B * ceil(L / 4))
// @threadgroup    (128, 1, 1): 4 SIMD groups, one query each, and a tile of HT heads
// @reference      mlx_dsv4.kernels.sparse_attention.sparse_attention_reference
// @tolerance      as sparse_attention_decode: |out - ref| <= (4 e_T + 2 dz + (keys + D + 8) 2^-24) sum_j p_j |v_j|
//                 + 2 e_T |ref| (same fp32 terms in another order; T roundings may land on neighbours)
// @bytes          window: (WINDOW + 3) D sizeof(T) per (4-query tile, head tile), twice (one read per pass);
//                 compressed: per query and head tile, its own keys (K for CSA, (t + 1) / RATIO for HCA) x
//                 (D sizeof(T) | NOPE + NOPE / 64 + (D - NOPE) sizeof(T)), twice; + 4 K per query
// @flops          6 B L H D keys (q.k in both passes, p v in the second)
// @decode-share   none: decode steps (L <= 4) take sparse_attention_decode. Prefill of a 64K prompt on
//                 Flash: 6 H D = 196,608 FLOP per (query, key); 640 keys per query in the 21 CSA layers,
//                 ~384 on average in the 20 HCA layers (128 + t/128): ~0.27 PFLOP, ~10 s at ~28 TFLOP/s
//                 of scalar fp32 - compute-bound; the reads (window rows once per 4-query tile, entries
//                 mostly cache hits among neighbouring queries) are secondary. Matrix units are next.
//
// Layout: the tile's visible window positions are staged in chunks of WC rows (fp32, threadgroup
// memory); each SIMD group attends to the rows of a chunk its query can see, then reads its own
// compressed entries (its index list, or the causal prefix) straight from the store. Lane i holds
// channels i, i + 32, ... of the row and of the HT heads, so a logit is one simd_sum. Pass 0 keeps an
// online max / sum per head; pass 1 recomputes the logits and adds T(exp(z - M) / den) v with the
// sink in den, as the reference rounds the probabilities to T. A SIMD group owns its query: no
// cross-group combine.

// @source
constexpr int QT = 4;  // queries per threadgroup, one per SIMD group
constexpr int DL = D / 32;  // channels per lane
constexpr int WC = 4096 / D < 8 ? (4096 / D > 0 ? 4096 / D : 1) : 8;  // window rows per staged chunk
static_assert(D % 32 == 0 && NOPE <= D, "D must be a multiple of 32, NOPE <= D");
threadgroup float wt[WC * D];

const uint sg = simdgroup_index_in_threadgroup, lane = thread_index_in_simdgroup;
const uint tid = thread_index_in_threadgroup;
const int H = q_shape[2], L = q_shape[1], W = win_shape[1], cap = ck_shape[1], K = idx_shape[2];
const int h0 = threadgroup_position_in_grid.y * HT;
const int ntiles = (L + QT - 1) / QT;
const int b = threadgroup_position_in_grid.z / ntiles, l0 = threadgroup_position_in_grid.z % ntiles * QT;
const int l = l0 + sg;
const bool live = l < L;  // a partial tile's spare groups still meet every barrier
const int ws = pos[1], n = pos[2], t = pos[0] + l;
const int t_last = pos[0] + metal::min(l0 + QT, L) - 1;
const int tlo = metal::max(ws, pos[0] + l0 - WINDOW + 1), thi = metal::min(ws + W, t_last + 1);  // tile's rows
// this query's visible rows (none before position 0: padding)
const int wlo = metal::max(metal::max(ws, t - WINDOW + 1), 0), whi = live ? metal::min(ws + W, t + 1) : wlo;
const int nc = !live ? 0 : CSA ? K : metal::max(metal::min(n, (t + 1) / RATIO), 0);
const device int* ids = idx + (size_t(b) * L + metal::min(l, L - 1)) * K;
const size_t crow = size_t(b) * cap;

float qv[HT * DL], m[HT], sm[HT], acc[HT * DL];
for (int i = 0; i < HT; ++i) {
  const device T* qh = q + ((size_t(b) * L + metal::min(l, L - 1)) * H + metal::min(h0 + i, H - 1)) * D;
  for (int c = 0; c < DL; ++c) {
    qv[i * DL + c] = float(qh[lane + 32 * c]);
    acc[i * DL + c] = 0.0f;
  }
  m[i] = -INFINITY;
  sm[i] = 0.0f;
}

for (int pass = 0; pass < 2; ++pass) {
  for (int p0 = tlo; p0 < thi; p0 += WC) {  // the same chunks for every group: barriers are uniform
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous chunk's readers are done
    const int rows = metal::min(WC, thi - p0);
    for (int i = tid; i < rows * D; i += 32 * QT) {
      wt[i] = float(win[(size_t(b) * W + (p0 - ws)) * D + i]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int p = metal::max(p0, wlo); p < metal::min(p0 + rows, whi); ++p) {
      float kv[DL];
      for (int c = 0; c < DL; ++c) {
        kv[c] = wt[(p - p0) * D + lane + 32 * c];
      }
      attend<T, HT, DL>(pass, kv, qv, scale, m, sm, acc);
    }
  }
  for (int j = 0; j < nc; ++j) {
    const int e = CSA ? ids[j] : j;
    if (e < 0 || e >= n) {
      continue;
    }
    float kv[DL];
    for (int c = 0; c < DL; ++c) {
      kv[c] = Comp<FP8>::at(ck, ce, cr, crow + e, lane + 32 * c, D, NOPE);
    }
    attend<T, HT, DL>(pass, kv, qv, scale, m, sm, acc);
  }
  for (int i = 0; pass == 0 && i < HT; ++i) {  // the denominator gets the sink
    sm[i] += metal::exp(sink[metal::min(h0 + i, H - 1)] - m[i]);
  }
}

for (int i = 0; live && i < HT && h0 + i < H; ++i) {
  for (int c = 0; c < DL; ++c) {
    out[((size_t(b) * L + l) * H + h0 + i) * D + lane + 32 * c] = T(acc[i * DL + c]);
  }
}
