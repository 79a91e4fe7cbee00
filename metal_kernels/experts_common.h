// Shared by experts_gate_up.metal and experts_down.metal (their `@include`): MLX's microscaling
// weights, as mx.quantize writes them with group size 32. A uint32 word packs 32 / BITS codes,
// element i of the word in bits BITS i .. BITS i + BITS - 1 (lowest first); every 32 elements of
// a row (BITS words) share one E8M0 scale byte. BITS 4: mxfp4 (e2m1), BITS 8: mxfp8 (e4m3).

// e2m1 codes: bit 3 sign, bits 0-2 index the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
constant float FP4_E2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// E8M0 byte b -> 2^(b - 127), written straight into a float's exponent field (b = 0 would be the
// subnormal 2^-127 and becomes 0; quantization never picks it for weights of any useful size).
inline float e8m0(uchar b) { return as_type<float>(uint(b) << 23); }

template <int BITS> inline float mx_code(uint c);
template <> inline float mx_code<4>(uint c) { return FP4_E2M1[c]; }
// e4m3fn: bit 7 sign, exponent bits 3-6 (bias 7), mantissa bits 0-2. Normal: the 7 magnitude bits
// moved to a float's exponent / mantissa top with the bias raised to 127; exponent 0: m 2^-9. The
// NaN codes 0x7f / 0xff read as +-480: mx.quantize saturates at 448 and never writes them.
template <> inline float mx_code<8>(uint c) {
  const uint em = c & 0x7fu;
  const float mag = em < 8u ? float(em) * 0.001953125f : as_type<float>((em + (120u << 3)) << 20);
  return (c & 0x80u) ? -mag : mag;
}

// Dot of one packed word's 32 / BITS codes with v (without the group's scale).
template <int BITS> inline float mx_dot(uint q, thread const float* v) {
  float s = 0.0f;
  for (int i = 0; i < 32 / BITS; ++i) {
    s += mx_code<BITS>((q >> (BITS * i)) & ((1u << BITS) - 1u)) * v[i];
  }
  return s;
}
