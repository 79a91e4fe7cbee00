// Shared by sparse_attention_decode.metal and sparse_attention_prefill.metal (their `@include`):
// reading compressed entries (dense or FP8 in place) and the SIMD-group reductions both forms use.

// Channel d of compressed row `row` (a flat batch * cap index): dense rows, or FP8 codes times their
// 64-channel block scale (the last block may be partial) for d < nope and the rope channels (in T) after.
template <bool FP8> struct Comp;
template <> struct Comp<false> {
  template <typename C, typename R>
  static float at(const device C* ck, const device uint8_t*, const device R*, size_t row, int d, int D, int) {
    return float(ck[row * D + d]);
  }
};
template <> struct Comp<true> {
  template <typename C, typename R>
  static float at(const device C* ck, const device uint8_t* ce, const device R* cr, size_t row, int d, int D,
                  int nope) {
    return d < nope ? e4m3(ck[row * nope + d]) * e8m0(ce[row * ((nope + 63) / 64) + d / 64])
                    : float(cr[row * (D - nope) + d - nope]);
  }
};

// One key for the HT heads of a lane (qv, acc: [HT][DL] channels i + 32 c): pass 0 folds the scaled
// logit into the running max m / sum s; pass 1 (m = final max, s = denominator) adds T(p) * row.
template <typename T, int HT, int DL>
inline void attend(int pass, thread const float* kv, thread const float* qv, float scale, thread float* m,
                   thread float* s, thread float* acc) {
  for (int i = 0; i < HT; ++i) {
    float d = 0.0f;
    for (int c = 0; c < DL; ++c) {
      d += qv[i * DL + c] * kv[c];
    }
    const float z = simd_sum(d) * scale;
    if (pass == 0) {
      const float mn = metal::max(m[i], z);
      s[i] = s[i] * metal::exp(m[i] - mn) + metal::exp(z - mn);
      m[i] = mn;
    } else {
      const float p = float(T(metal::exp(z - m[i]) / s[i]));
      for (int c = 0; c < DL; ++c) {
        acc[i * DL + c] += p * kv[c];
      }
    }
  }
}
