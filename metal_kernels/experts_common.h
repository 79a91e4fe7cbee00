// Shared by experts_gate_up.metal and experts_down.metal (their `@include`): MLX's microscaling
// weights, as mx.quantize writes them with group size 32. A uint32 word packs 32 / BITS codes,
// element i of the word in bits BITS i .. BITS i + BITS - 1 (lowest first); every 32 elements of
// a row (BITS words) share one E8M0 scale byte. BITS 4: mxfp4 (e2m1), BITS 8: mxfp8 (e4m3).

template <int BITS> inline float mx_code(uint c);
template <> inline float mx_code<4>(uint c) { return E2M1[c]; }
template <> inline float mx_code<8>(uint c) { return e4m3(c); }

// Dot of one packed word's 32 / BITS codes with v (without the group's scale).
template <int BITS> inline float mx_dot(uint q, thread const float* v) {
  float s = 0.0f;
  for (int i = 0; i < 32 / BITS; ++i) {
    s += mx_code<BITS>((q >> (BITS * i)) & ((1u << BITS) - 1u)) * v[i];
  }
  return s;
}
