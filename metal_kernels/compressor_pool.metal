// Compressor gated pooling (spec §4.1): entry[b, j, f] = sum_s softmax_s(g[s, f]) a[s, f] in float32 over the
// slots of window j. OVERLAP (ratio 4): 2 RATIO slots, window j-1's rows on features [0, D) (the previous
// call's window from prev_* for j = 0, none before the first window) then window j's rows on [D, 2D).
// RING (a compiled decode step, ring_cache.py): wa / wg are one layer's ring [B, 2 RATIO, 2D], window
// pos / RATIO in the half (pos / RATIO) % 2 and the window before it in the other; that one window is pooled.
//
// @kernel         compressor_pool
// @inputs         wa: float[B, n, RATIO, COFF D] or [B, RATIO, COFF D] (n = 1) or, RING, [B, 2 RATIO, 2 D];
//                 wg: as wa; prev_a: float[B, RATIO, D]; prev_g: float[B, RATIO, D]; pos: int[1] (RING)
// @outputs        entries: float[B, n, D]
// @template       RATIO: int; OVERLAP: bool; HAS_PREV: bool; RING: bool
// @grid           (D, n, B): one thread per output feature
// @threadgroup    (min(D, 256), 1, 1); the kernel uses no threadgroup memory or SIMD functions, any
//                 shape works
// @reference      mlx_dsv4.kernels.compressor_pool.compressor_pool_reference
// @tolerance      |kernel - reference| <= 4 (S + 4) 2^-24 sum_s w_s |a_s| elementwise, S slots (2 RATIO
//                 with overlap), w the softmax weights: both take the same max and exp (<= 4 ulp each)
//                 but divide and sum in other orders (kernel: sum e a / sum e; MLX: sum (e / sum e) a)
// @bytes          8 B n RATIO COFF D (a and g, each row once) + 4 B n D written (+ 8 B RATIO D of prev);
//                 per entry 64 D bytes at ratio 4, 1024 D at ratio 128
// @flops          ~6 B n S D (max, subtract, exp, add, multiply-add per slot and feature)
// @decode-share   Flash decode: a CSA layer completes a window every 4th token (main D = 512: 32 KB,
//                 indexer D = 128: 8 KB), an HCA layer every 128th (D = 512: 512 KB); amortized
//                 21 x 10 KB + 20 x 4 KB = ~0.3 MB per token, ~0.4 us at 819 GB/s against the
//                 ~14 ms floor of a ~11 GB step (~0.003%). What counts is launches: each pool was
//                 ~7-9 MLX ops at ratio 4 (slot concatenates, softmax, multiply, sum), 3 at ratio
//                 128; now one (est. 2-4 us, latency-bound): 42 launches every 4th token instead
//                 of ~300-380 (not measured: no Mac was available).
//
// Without HAS_PREV, prev_a / prev_g are never read; the wrapper passes wa / wg (device buffers, so
// the pointer selection below has one address space); pos is read only with RING. A ring's halves are
// read in place: a decode step slices no window out of it (four graph nodes per CSA compressor).
// Each thread walks its slots twice, strided by the row width (coalesced over f within a SIMD group):
// a max pass, then exp and the two sums.
// Two passes rather than an online softmax, so the exponents are the reference's, exp(g - max).

// @header
inline float slots_max(const device float* g, uint stride, int count, float top) {
  for (int s = 0; s < count; ++s) {
    top = metal::max(top, g[s * stride]);
  }
  return top;
}

// Adds e_s = exp(g_s - top) to sum and e_s a_s to acc; precise exp, as mx.softmax(precise=True).
inline void slots_sum(const device float* a, const device float* g, uint stride, int count, float top,
                      thread float& sum, thread float& acc) {
  for (int s = 0; s < count; ++s) {
    const float e = metal::precise::exp(g[s * stride] - top);
    sum += e;
    acc += e * a[s * stride];
  }
}

// @source
const uint f = thread_position_in_grid.x;
const uint j = thread_position_in_grid.y;
const uint b = thread_position_in_grid.z;
const uint n = wa_ndim == 4 && !RING ? wa_shape[1] : 1;  // rank 3: one window (a decode step's)
const uint W = wa_shape[wa_ndim - 1];           // COFF * D
const uint D = OVERLAP ? W / 2 : W;
if (f >= D) {
  return;
}
const uint lo = 0, hi = OVERLAP ? D : 0;  // feature offsets of the previous / current window's half

// RING: this window's half of the ring, and the previous window's (the other half)
const uint half = RING ? ((uint(pos[0]) / RATIO) % 2) * RATIO : 0;
const size_t cur = RING ? (size_t(b) * 2 * RATIO + half) * W : (size_t(b) * n + j) * RATIO * W;
const device float* ca = wa + cur + hi + f;
const device float* cg = wg + cur + hi + f;

// The previous window's first half: the row before in this call, or the carried state, or none
// (a = 0, g = -inf: weight exactly 0, so its slots are skipped).
const bool has_prev = OVERLAP && (j > 0 || HAS_PREV || RING);
const device float* pa = ca;
const device float* pg = cg;
uint pstride = W;
if (RING) {
  pa = wa + (size_t(b) * 2 * RATIO + RATIO - half) * W + lo + f;
  pg = wg + (size_t(b) * 2 * RATIO + RATIO - half) * W + lo + f;
} else if (has_prev && j > 0) {
  pa = wa + cur - RATIO * W + lo + f;
  pg = wg + cur - RATIO * W + lo + f;
} else if (has_prev) {
  pa = prev_a + size_t(b) * RATIO * D + f;
  pg = prev_g + size_t(b) * RATIO * D + f;
  pstride = D;
}
const int np = has_prev ? RATIO : 0;

float top = slots_max(pg, pstride, np, -INFINITY);
top = slots_max(cg, W, RATIO, top);
float sum = 0.0f, acc = 0.0f;
slots_sum(pa, pg, pstride, np, top, sum, acc);
slots_sum(ca, cg, W, RATIO, top, sum, acc);
entries[(size_t(b) * n + j) * D + f] = acc / sum;
