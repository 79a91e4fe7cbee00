// mHC post (spec §3 item 2): X'_k = post_k y + sum_j comb[j, k] X_j in fp32, stored as T.
//
// @kernel         hc_post
// @inputs         y: T[N, D]; X: T[N, 4, D]; post: float[N, 4]; comb: float[N, 4, 4]
// @outputs        out: T[N, 4, D]
// @template       T: type; D: int
// @grid           (D, N, 1)
// @threadgroup    (min(D, 256), 1, 1)
// @reference      mlx_dsv4.kernels.hc.hc_post_reference
// @tolerance      fp32 value within 4 2^-24 (|post_k y| + sum_j |comb[j, k] X_j|) of the
//                 reference (5 terms, another order), then 1 ulp of T from the final rounding
// @bytes          N (10 D s + 80), s = sizeof(T)
// @flops          18 N D
// @decode-share   N = 1 per sequence: 40 KiB in bf16 at D = 4096, bandwidth-trivial; one launch
//                 instead of the matmul, multiply-add and cast (~3 after mx.compile), 43 calls
//                 per Flash token (a block's last: the one between its attention and MoE runs
//                 inside hc_pre's launch, POST).
//
// Layout: thread (j, tok) reads y[tok, j] and the four X[tok, :, j] once and writes all four
// outputs. comb is applied transposed: the sum runs over its row index j (traps.md item 6).

// @source
const uint j = thread_position_in_grid.x;
const uint tok = thread_position_in_grid.y;
const auto x = X + size_t(tok) * 4 * D + j;  // auto: constant space for a tiny X
const auto c = comb + size_t(tok) * 16;
const float yv = float(y[size_t(tok) * D + j]);
float xs[4];
for (int i = 0; i < 4; ++i) {
  xs[i] = float(x[i * D]);
}
for (int k = 0; k < 4; ++k) {
  const float mixed = ((c[k] * xs[0] + c[4 + k] * xs[1]) + c[8 + k] * xs[2]) + c[12 + k] * xs[3];
  out[(size_t(tok) * 4 + k) * D + j] = T(post[tok * 4 + k] * yv + mixed);
}
