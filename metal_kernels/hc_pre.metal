// mHC pre (spec §3 item 2), fused: RMS + the 24 projections of the flattened streams, the Sinkhorn
// split, and the branch input u = sum_k pre_k X_k, one threadgroup per token; POST: the previous
// sub-layer's mHC post first (hc_post.metal's X'), so a block's attention and MoE meet in one launch.
//
// @kernel         hc_pre
// @inputs         X: T[N, 4, D]; fn: float[24, 4 D]; scale: float[3]; base: float[24]; eps: float[];
//                 norm_eps: float[]; w: float[D] (NORM: the sub-layer norm's weight); out_eps: float[];
//                 y: T[N, D]; post_in: float[N, 4]; comb_in: float[N, 4, 4] (POST: the previous
//                 sub-layer's output and mHC post weights, X its input streams, else never read)
// @outputs        u: T[N, D]; post: float[N, 4]; comb: float[N, 4, 4]; Xn: T[N, 4, D] (POST: the
//                 streams X' this pre read, as hc_post stores them, else never written)
// @template       T: type; D: int; ITERS: int; NORM: bool; POST: bool
// @include        sinkhorn
// @grid           (TG * N, 1, 1), TG = min(512, 4 D rounded up to 32)
// @threadgroup    (TG, 1, 1)
// @reference      mlx_dsv4.kernels.hc.hc_pre_reference (POST: of hc_post_reference's X')
// @tolerance      mixes within 2 (4 D) 2^-24 rho sum_e |x_e fn_re| of the reference (the same fp32
//                 terms summed in another order), carried through sigmoid / Sinkhorn (gain <= 4
//                 scale), plus the Sinkhorn kernel's 2e-6; u within that plus 1 ulp of T; POST:
//                 Xn as hc_post.metal's, and the rest within the above of the reference on that Xn
// @bytes          384 D (fn, 1.5 MiB at D = 4096, read per token: from cache after the first)
//                 + N (5 D s + 80) + 112, s = sizeof(T) (X read twice, the second from cache)
// @flops          ~200 D + 2.7k per token (24 dots of 4 D, the sum of squares, the split)
// @decode-share   N = 1 per sequence at decode: one threadgroup reads fn's 1.5 MiB fp32 and does
//                 400 kFLOP: latency-bound on one GPU core (est. 10-20 us, not measured), 86 calls
//                 per Flash token. It replaces the RMS, the [24, 4D] matmul, the Sinkhorn kernel
//                 and the weighted sum (~7 launches per call after mx.compile) with 1; splitting
//                 the dots over threadgroups would need a second launch. POST folds the hc_post
//                 between a block's attention and its MoE into this launch (43 of the 86 hc_post
//                 launches per Flash token); its 4 D outputs then come from one threadgroup.
//
// NORM: u leaves already through the next sub-layer's RMSNorm (attn_norm / ffn_norm), as
// rms_norm(u) computes it: the u rounded to T, its fp32 sum of squares, times weight in fp32.
//
// Layout: thread i of TG takes elements i, i + TG, ... of the 4 D stream values (coalesced reads
// of X and of each fn row) and keeps 25 partial sums (24 dots + the sum of squares). simd_sum
// folds each over the SIMD group, SIMD group leaders park them in threadgroup memory, and threads
// 0..24 add the group partials in a fixed order. SIMD group 0 then runs the split exactly as
// sinkhorn_split.metal (16 lanes per token, lanes 16..31 a harmless duplicate so no shuffle is
// divergent); pre goes through threadgroup memory to the weighted sum. POST: the first loop makes
// each X' value, writes it and takes it as the stream value; the weighted sum makes again the X'
// values it reads (the same operations, so the same values) instead of reading other threads'
// writes, which would need a device-memory barrier.

// @header
// POST: element e = k D + j of X'_k = post_k y + sum_i comb[i, k] X_i in fp32 (hc_post.metal's
// terms in its order), stored as T. x, y, p, c: this token's X, y, post_in, comb_in.
template <typename T, int D, typename PX, typename PY, typename PP, typename PC>
inline T post_stream(PX x, PY y, PP p, PC c, uint e) {
  const uint k = e / D, j = e % D;
  const float mixed = ((c[k] * float(x[j]) + c[4 + k] * float(x[D + j])) + c[8 + k] * float(x[2 * D + j])) +
                      c[12 + k] * float(x[3 * D + j]);
  return T(p[k] * float(y[j]) + mixed);
}

// @source
constexpr int HC = 4, NMIX = (2 + HC) * HC, NR = NMIX + 1;  // 24 dots, then the sum of squares
constexpr uint W = HC * D;
threadgroup float part[32 * NR];  // one row of NR partials per SIMD group (<= 1024 threads)
threadgroup float sums[NR];
threadgroup float pre[HC];
threadgroup float sq[32];  // NORM: per-SIMD-group sums of squares of u

const uint tok = threadgroup_position_in_grid.x;
const uint tid = thread_index_in_threadgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const uint nt = threads_per_threadgroup.x;
const auto x = X + size_t(tok) * W;  // device, or constant for a tiny X
const auto yt = y + size_t(tok) * D;  // POST only, as the next two
const auto pt = post_in + size_t(tok) * 4;
const auto ct = comb_in + size_t(tok) * 16;

float acc[NR];
for (int r = 0; r < NR; ++r) {
  acc[r] = 0.0f;
}
for (uint i = tid; i < W; i += nt) {
  float v;
  if (POST) {
    const T s = post_stream<T, D>(x, yt, pt, ct, i);
    Xn[size_t(tok) * W + i] = s;
    v = float(s);
  } else {
    v = float(x[i]);
  }
  acc[NMIX] += v * v;
  for (int r = 0; r < NMIX; ++r) {
    acc[r] += v * fn[r * W + i];
  }
}
for (int r = 0; r < NR; ++r) {
  const float s = simd_sum(acc[r]);
  if (lane == 0) {
    part[sg * NR + r] = s;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (tid < NR) {
  float s = 0.0f;
  for (uint g = 0; g < (nt + 31) / 32; ++g) {
    s += part[g * NR + tid];
  }
  sums[tid] = s;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

if (sg == 0) {
  // The RMS has no weight and scales the projections after the matmul.
  const float rho = metal::rsqrt(sums[NMIX] / float(W) + norm_eps);
  const uint e = lane & 15;
  if (lane < 4) {
    const float p = 1.0f / (1.0f + metal::exp(-(sums[e] * rho * scale[0] + base[e]))) + eps;
    pre[e] = p;
  } else if (lane < 8) {
    post[tok * 4 + e - 4] = 2.0f / (1.0f + metal::exp(-(sums[e] * rho * scale[1] + base[e])));
  }
  const float c = sinkhorn_comb(sums[8 + e] * rho * scale[2] + base[8 + e], eps, ITERS);
  if (lane < 16) {
    comb[size_t(tok) * 16 + e] = c;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

float ss = 0.0f;  // NORM: sum of squares of u as rounded to T
for (uint j = tid; j < D; j += nt) {
  float s = pre[0] * float(POST ? post_stream<T, D>(x, yt, pt, ct, j) : x[j]);
  for (int k = 1; k < HC; ++k) {
    s += pre[k] * float(POST ? post_stream<T, D>(x, yt, pt, ct, k * D + j) : x[k * D + j]);
  }
  const T ut = T(s);
  u[size_t(tok) * D + j] = ut;
  ss += float(ut) * float(ut);
}
if (NORM) {
  // The sub-layer's RMSNorm of u (norm.rms_norm: fp32 statistics, weight in fp32, one rounding).
  // Each thread rereads only the elements it wrote itself, so u needs no device-memory barrier.
  ss = simd_sum(ss);
  if (lane == 0) {
    sq[sg] = ss;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float tot = 0.0f;
  for (uint g = 0; g < (nt + 31) / 32; ++g) {
    tot += sq[g];
  }
  const float r = metal::precise::rsqrt(tot * (1.0f / D) + out_eps);
  for (uint j = tid; j < D; j += nt) {
    const size_t o = size_t(tok) * D + j;
    u[o] = T(float(u[o]) * r * float(w[j]));
  }
}
