// Lightning-indexer top-k (spec §4.2): ids[b, l, :] = the K highest scores[b, l, n] among the entries
// query l can see, n < V = min(N, (offset[b] + l + 1) / RATIO), in ascending id order; ties at the
// K-th value: lowest index first (+0 and -0 are equal); slots past V (V < K) hold -1.
//
// @kernel         indexer_topk
// @inputs         scores: float[B, L, N]; offset: int32[B]; topk: int32[] (K = min(k, N) >= 1)
// @outputs        ids: int32[B, L, K]
// @template       RATIO: int
// @grid           (TG, L, B)
// @threadgroup    (TG, 1, 1), TG = min(1024, 32 ceil(N / 32)): any multiple of 32
// @reference      mlx_dsv4.kernels.indexer_topk.top_k_visible_reference
// @tolerance      exact: the same id set as the reference for distinct scores; with ties at the K-th
//                 value the set of a stable descending sort (lowest index first). NaN scores are not
//                 expected (they would rank by bit pattern).
// @bytes          per query row: 4 V per radix pass (1-4 passes, fewer when a bucket is exactly used up)
//                 + 4 V for the compaction + 4 K written; rows with V <= K read nothing
// @flops          none to speak of: ~10 integer ops per entry per pass
// @decode-share   Flash decode, k = 512, one row per sequence, N = t/4 at context t, 21 CSA layers,
//                 5 reads of 4 N bytes: at 64K (N = 16K) 320 KB per layer, 6.7 MB per step: ~8 us at
//                 819 GB/s (<0.1% of the ~14 ms bandwidth floor of the ~11 GB step); at 1M (N = 256K)
//                 5 MB per layer, 105 MB per step: ~0.13 ms (~1%). One threadgroup per row runs on one
//                 GPU core, so at B = 1 it is latency-bound, not bandwidth-bound: guess 10-60 us per
//                 layer (~0.2-1.3 ms, 1.5-9% of a step at 64K-1M; the 1 MB score row is fresh in the
//                 system cache). Splitting long rows over several threadgroups is the next step if
//                 measured high. Replaces argpartition + mask: CSA decode step 48 -> 45 launches
//                 after mx.compile (60 -> 54 eager; benchmarks/launch_count.py).
//
// Layout: one threadgroup per query row. Scores map to order-preserving uint keys; a radix select
// over 4 digits of 8 bits (high first) narrows to the K-th largest key: each pass counts the digit
// of every entry matching the prefix decided so far in a 256-bin threadgroup histogram (atomics,
// added per run of equal digits: counts do not depend on order), and SIMD group 0 finds the
// bucket holding the rem-th largest (lane i owns digits 255 - 8 i .. 248 - 8 i, a SIMD prefix sum
// over the lanes). The compaction then walks the row in tiles of TG entries, so a prefix sum over
// thread-ordered flags (greater / tied, packed in one uint) gives each selected entry its slot:
// the output is deterministic and the tied entries taken are the lowest-indexed.

// @header
// Float order as uint order: negatives reversed (all bits flipped), positives above them (sign
// bit set); -0 first becomes +0 so that equal floats get equal keys.
inline uint order_key(float f) {
  uint u = as_type<uint>(f);
  u = (u << 1) == 0u ? 0u : u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// @source
threadgroup atomic_uint hist[256];
threadgroup uint pick[3];       // the chosen digit, the count above its bucket, the count in it
threadgroup uint sums[2 * 32];  // per-SIMD-group flag totals, double-buffered across tiles

const uint l = threadgroup_position_in_grid.y;
const uint b = threadgroup_position_in_grid.z;
const uint tid = thread_index_in_threadgroup;
const uint tg = threads_per_threadgroup.x;
const uint sg = simdgroup_index_in_threadgroup;
const uint nsg = simdgroups_per_threadgroup;
const uint lane = thread_index_in_simdgroup;
const uint L = scores_shape[1];
const uint N = scores_shape[2];
const uint K = uint(topk);
const uint V = uint(metal::clamp((offset[b] + int(l) + 1) / RATIO, 0, int(N)));
const device float* row = scores + (size_t(b) * L + l) * N;
device int* out = ids + (size_t(b) * L + l) * K;

if (V <= K) {  // everything visible is selected (uniform over the threadgroup: no barrier skipped)
  for (uint j = tid; j < K; j += tg) {
    out[j] = j < V ? int(j) : -1;
  }
  return;
}

for (uint d = tid; d < 256; d += tg) {
  atomic_store_explicit(&hist[d], 0u, memory_order_relaxed);
}
threadgroup_barrier(mem_flags::mem_threadgroup);  // histogram zeroed

uint prefix = 0;  // the K-th largest key's digits decided so far
uint rem = K;     // entries still to take among those matching the prefix
uint sh = 24;     // the current digit is key >> sh & 255
for (int pass = 0; pass < 4; ++pass) {
  sh = 24 - 8 * pass;
  const uint hmask = pass == 0 ? 0u : 0xFFFFFFFFu << (sh + 8);
  // Scores cluster in a few digits (pass 0 sees sign and exponent only): a thread adds runs of
  // one digit at once, so a dominant bin is not hammered by every entry.
  uint run_digit = 0, run = 0;
  for (uint i = tid; i < V; i += tg) {
    const uint key = order_key(row[i]);
    if ((key & hmask) == prefix) {
      const uint d = (key >> sh) & 255u;
      if (run != 0 && d != run_digit) {
        atomic_fetch_add_explicit(&hist[run_digit], run, memory_order_relaxed);
        run = 0;
      }
      run_digit = d;
      ++run;
    }
  }
  if (run != 0) {
    atomic_fetch_add_explicit(&hist[run_digit], run, memory_order_relaxed);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);  // histogram complete
  if (sg == 0) {
    uint c[8], s = 0;
    for (int j = 0; j < 8; ++j) {
      const uint d = 255 - 8 * lane - j;
      c[j] = atomic_load_explicit(&hist[d], memory_order_relaxed);
      atomic_store_explicit(&hist[d], 0u, memory_order_relaxed);  // ready for the next pass
      s += c[j];
    }
    uint above = simd_prefix_exclusive_sum(s);  // entries in higher digits than this lane's
    for (int j = 0; j < 8; ++j) {
      if (above < rem && above + c[j] >= rem) {  // exactly one (lane, j) holds the rem-th largest
        pick[0] = 255 - 8 * lane - j;
        pick[1] = above;
        pick[2] = c[j];
      }
      above += c[j];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);  // bucket chosen
  prefix |= pick[0] << sh;
  rem -= pick[1];
  if (pick[2] == rem) {  // the whole bucket is taken: no need to tell its entries apart
    break;
  }
}

// Entries with key >> sh above the threshold are all taken, those equal to it the first rem.
const uint thr = prefix >> sh;
uint gt_run = 0, eq_run = 0;  // taken-above and tied entries in earlier tiles
for (uint base = 0, t = 0; base < V; base += tg, ++t) {
  const uint i = base + tid;
  const uint hi = i < V ? order_key(row[i]) >> sh : 0u;
  const bool gt = i < V && hi > thr;
  const bool eq = i < V && hi == thr;
  const uint flag = uint(gt) | (uint(eq) << 16);  // a tile counts at most 1024 of each
  uint before = simd_prefix_exclusive_sum(flag);
  const uint total_sg = simd_sum(flag);
  threadgroup uint* s = sums + (t & 1) * 32;
  if (lane == 0) {
    s[sg] = total_sg;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);  // tile totals written
  uint total = 0;
  for (uint g = 0; g < nsg; ++g) {
    before += g < sg ? s[g] : 0u;
    total += s[g];
  }
  const uint gtb = gt_run + (before & 0xFFFFu);
  const uint eqb = eq_run + (before >> 16);
  if (gt || (eq && eqb < rem)) {
    out[gtb + metal::min(eqb, rem)] = int(i);
  }
  gt_run += total & 0xFFFFu;
  eq_run += total >> 16;
}
