// MoE router (spec §5): s = sqrt(softplus(weight . x)) in float32; ids = tid2eid[token] (HASHED) or the
// top-K of s + bias (lowest index first among ties); weights = s[ids] / sum(s[ids]) * route_scale.
//
// @kernel         moe_router
// @inputs         x: T[N, D]; weight: W[E, D]; sel: float[E] (bias) | int[V, K] (tid2eid, HASHED);
//                 tokens: int[N] (read only if HASHED); route_scale: float[]
// @outputs        ids: int32[N, K]; weights: float[N, K]
// @template       D: int; E: int; K: int; HASHED: bool
// @grid           (32 G N, 1, 1), G = min(32, HASHED ? K : E) SIMD groups per token
// @threadgroup    (32 G, 1, 1)
// @reference      mlx_dsv4.kernels.moe_router.moe_router_reference
// @tolerance      ids: the same set (where the reference's K-th and K+1-th s + bias differ by more than
//                 the logit error); weights: relative 2 (D + 2) 2^-24 max_e sum_d |x_d w_ed| + 32 2^-24
//                 (fp32 logits summed in another order; |d s / s| <= |d z| / 2, and the weights are a
//                 ratio of two such terms; plus a few ulp of log, exp, sqrt and the K-term sum)
// @bytes          N (E D sizeof(W) + D sizeof(T)) + 8 N K (+ 4 E); hashed: N K D sizeof(W) for the rows
// @flops          2 N E D (hashed: 2 N K D)
// @decode-share   Flash, one token: 256 x 4096 bf16 = 2 MB per biased layer (40 of 43), 48 KB per hashed
//                 layer (only the K selected rows are read): ~80 MB, ~0.1 ms at full bandwidth (<1% of
//                 a ~14 ms step), one launch instead of ~10. One threadgroup per token reads the whole
//                 matrix, so the dispatcher uses it for small N only; prefill keeps the GEMM.
//
// Layout: one threadgroup per token. SIMD group g computes the logits of rows g, g + G, ... (lanes
// stride over D, simd_sum) into threadgroup memory. After one barrier SIMD group 0 selects: lane i
// owns experts [i C, i C + C), C = ceil(E / 32), so lower lanes own lower indices; each of K rounds
// takes simd_max of the lanes' best unused value, then simd_min of the indices that reach it.

// @header
// log(1 + exp(z)) without overflow, and accurate for very negative z: log1p(t) = t log(u) / (u - 1),
// u = 1 + t rounded, cancels the rounding of u (Metal has no log1p).
inline float softplus(float z) {
  const float t = metal::exp(-metal::abs(z));
  const float u = 1.0f + t;
  const float l = u == 1.0f ? t : t * (metal::log(u) / (u - 1.0f));
  return metal::max(z, 0.0f) + l;
}

// @source
constexpr uint C = (E + 31) / 32;  // candidates per lane in the selection
static_assert(E <= 1024 && K >= 1 && K <= 32 && K <= E, "moe_router: E <= 1024, 1 <= K <= min(E, 32)");
threadgroup float score[E];   // s by expert (HASHED: by slot 0..K-1)
threadgroup float biased[E];  // s + bias, the selection key

const uint n = threadgroup_position_in_grid.x;
const uint sg = simdgroup_index_in_threadgroup;
const uint nsg = simdgroups_per_threadgroup;
const uint lane = thread_index_in_simdgroup;
const size_t table_row = HASHED ? size_t(tokens[n]) * K : 0;

for (uint r = sg; r < (HASHED ? K : E); r += nsg) {
  const size_t e = HASHED ? size_t(sel[table_row + r]) : r;
  float acc = 0.0f;
  for (uint i = lane; i < D; i += 32) {
    acc += float(x[size_t(n) * D + i]) * float(weight[e * D + i]);
  }
  acc = simd_sum(acc);
  if (lane == 0) {
    const float s = metal::sqrt(softplus(acc));
    score[r] = s;
    biased[r] = HASHED ? s : s + float(sel[r]);
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (sg != 0) {
  return;
}

uint slot = lane;  // this lane's pick (lanes < K): its index into score
uint used = 0;     // bit c: candidate lane * C + c already picked
float total = 0.0f;
for (uint j = 0; j < K; ++j) {
  uint win = j;
  if (!HASHED) {
    float best = -INFINITY;
    uint bi = E;  // none yet
    for (uint c = 0; c < C; ++c) {
      const uint e = lane * C + c;
      if (e < E && !((used >> c) & 1u) && (bi == E || biased[e] > best)) {
        best = biased[e];
        bi = e;
      }
    }
    const float m = simd_max(bi < E ? best : -INFINITY);
    // !(best < m): a NaN still yields a valid, unused id
    win = simd_min(bi < E && !(best < m) ? bi : uint(E));
    if (lane == win / C) {
      used |= 1u << (win % C);
    }
    if (lane == j) {
      slot = win;
    }
  }
  total += score[win];
}
if (lane < K) {
  const size_t o = size_t(n) * K + lane;
  ids[o] = HASHED ? int(sel[table_row + lane]) : int(slot);
  weights[o] = score[slot] / total * route_scale;
}
