// mHC split + Sinkhorn (spec §3 item 2): mixes -> pre, post and the doubly-stochastic comb.
//
// @kernel         sinkhorn_split
// @inputs         mixes: float[N, 24]; scale: float[3]; base: float[24]; eps: float[]
// @outputs        pre: float[N, 4]; post: float[N, 4]; comb: float[N, 4, 4]
// @template       ITERS: int
// @include        sinkhorn
// @grid           (16 * N, 1, 1)
// @threadgroup    (min(16 * N, 256), 1, 1)
// @reference      mlx_dsv4.kernels.sinkhorn_split.sinkhorn_split_reference
// @tolerance      2e-6 absolute against the reference (fp32; values in [0, 2]; row/column sums
//                 are butterflies (a+b)+(c+d) where MLX sums in another order, a few ulp after 20 rounds)
// @bytes          192 N + 112 (reads 96 N + 112, writes 96 N)
// @flops          ~2.7k per token (16 lanes x (softmax + 39 normalisations)) + 24 exp
// @decode-share   N = 1 per sequence: 304 B, latency-bound (a chain of ~40 divides and 84
//                 shuffles, est. 2-4 us with dispatch on an M3 Ultra). 88 calls per Flash token
//                 (2 per layer x 43 + MTP) ~ 0.3 ms of a ~14 ms step (~2%). The compiled
//                 reference launches 89 non-view primitives per call (39 reductions, 39 fused
//                 divides, glue; mx.export_to_dot), ~7,800 per token; the kernel is 1 per call.
//
// Layout: 16 lanes per token. Lane e = 4 j + k holds comb[j][k]; lanes of one row differ in bits
// 0-1 of the lane index, lanes of one column in bits 2-3, so row sums are shuffles with xor 1, 2
// and column sums with xor 4, 8. A 16-lane group never talks to another, so the partial SIMD
// group at the end of an odd-N grid is harmless. Lanes 0-7 also produce pre and post.

// @source
const uint gid = thread_position_in_grid.x;
const uint tok = gid / 16;
const uint e = gid % 16;
const device float* m = mixes + size_t(tok) * 24;

if (e < 4) {
  pre[tok * 4 + e] = 1.0f / (1.0f + metal::exp(-(m[e] * scale[0] + base[e]))) + eps;
} else if (e < 8) {
  post[tok * 4 + e - 4] = 2.0f / (1.0f + metal::exp(-(m[e] * scale[1] + base[e])));
}

const float c = sinkhorn_comb(m[8 + e] * scale[2] + base[8 + e], eps, ITERS);
comb[size_t(tok) * 16 + e] = c;
