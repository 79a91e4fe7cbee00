// mHC pre (spec §3 item 2), fused: RMS + the 24 projections of the flattened streams, the Sinkhorn
// split, and the branch input u = sum_k pre_k X_k, one threadgroup per token.
//
// @kernel         hc_pre
// @inputs         X: T[N, 4, D]; fn: float[24, 4 D]; scale: float[3]; base: float[24]; eps: float[];
//                 norm_eps: float[]; w: float[D] (NORM: the sub-layer norm's weight); out_eps: float[]
// @outputs        u: T[N, D]; post: float[N, 4]; comb: float[N, 4, 4]
// @template       T: type; D: int; ITERS: int; NORM: bool
// @include        sinkhorn
// @grid           (TG * N, 1, 1), TG = min(512, 4 D rounded up to 32)
// @threadgroup    (TG, 1, 1)
// @reference      mlx_dsv4.kernels.hc.hc_pre_reference
// @tolerance      mixes within 2 (4 D) 2^-24 rho sum_e |x_e fn_re| of the reference (the same fp32
//                 terms summed in another order), carried through sigmoid / Sinkhorn (gain <= 4
//                 scale), plus the Sinkhorn kernel's 2e-6; u within that plus 1 ulp of T
// @bytes          384 D (fn, 1.5 MiB at D = 4096, read per token: from cache after the first)
//                 + N (5 D s + 80) + 112, s = sizeof(T) (X read twice, the second from cache)
// @flops          ~200 D + 2.7k per token (24 dots of 4 D, the sum of squares, the split)
// @decode-share   N = 1 per sequence at decode: one threadgroup reads fn's 1.5 MiB fp32 and does
//                 400 kFLOP: latency-bound on one GPU core (est. 10-20 us, not measured), 86 calls
//                 per Flash token. It replaces the RMS, the [24, 4D] matmul, the Sinkhorn kernel
//                 and the weighted sum (~7 launches per call after mx.compile) with 1; splitting
//                 the dots over threadgroups would need a second launch.
//
// NORM: u leaves already through the next sub-layer's RMSNorm (attn_norm / ffn_norm), as
// rms_norm(u) computes it: the u rounded to T, its fp32 sum of squares, times weight in fp32.
//
// Layout: thread i of TG takes elements i, i + TG, ... of the 4 D stream values (coalesced reads
// of X and of each fn row) and keeps 25 partial sums (24 dots + the sum of squares). simd_sum
// folds each over the SIMD group, SIMD group leaders park them in threadgroup memory, and threads
// 0..24 add the group partials in a fixed order. SIMD group 0 then runs the split exactly as
// sinkhorn_split.metal (16 lanes per token, lanes 16..31 a harmless duplicate so no shuffle is
// divergent); pre goes through threadgroup memory to the weighted sum.

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

float acc[NR];
for (int r = 0; r < NR; ++r) {
  acc[r] = 0.0f;
}
for (uint i = tid; i < W; i += nt) {
  const float v = float(x[i]);
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
  float s = pre[0] * float(x[j]);
  for (int k = 1; k < HC; ++k) {
    s += pre[k] * float(x[k * D + j]);
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
