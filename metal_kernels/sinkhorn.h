// mHC's Sinkhorn normalisation on a 4 x 4 matrix held one entry per lane (lane e = 4 j + k, 16
// lanes per matrix), shared by sinkhorn_split.metal and hc_pre.metal.

// Sum over the four lanes of this lane's row (xor 1, 2) or column (xor 4, 8); every lane of the
// row / column gets the same value, (a + b) + (c + d).
inline float row_sum(float v) {
  v += simd_shuffle_xor(v, 1);
  return v + simd_shuffle_xor(v, 2);
}
inline float col_sum(float v) {
  v += simd_shuffle_xor(v, 4);
  return v + simd_shuffle_xor(v, 8);
}

// comb from its logits c: a row softmax (max-subtracted), + eps, a column normalisation, then
// iters - 1 rounds of rows then columns, each dividing by sum + eps (the last step: columns).
inline float sinkhorn_comb(float c, float eps, int iters) {
  float top = metal::max(c, simd_shuffle_xor(c, 1));
  top = metal::max(top, simd_shuffle_xor(top, 2));
  c = metal::exp(c - top);
  c = c / row_sum(c) + eps;
  c = c / (col_sum(c) + eps);
  for (int it = 1; it < iters; ++it) {
    c = c / (row_sum(c) + eps);
    c = c / (col_sum(c) + eps);
  }
  return c;
}
