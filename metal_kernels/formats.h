// The trained formats' codecs (mlx_dsv4/formats.py), exact, shared through `@include formats`.

// e2m1 code -> value: bit 3 sign, bits 0-2 index the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
constant float E2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                           -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// E8M0 byte b -> 2^(b - 127) from the bits, as formats.e8m0_to_float: 0 is the subnormal 2^-127, 255 NaN.
inline float e8m0(uint b) {
  b &= 0xFFu;
  return b == 255u ? NAN : as_type<float>(b ? b << 23 : 0x00400000u);
}

// 2^e for e in the normal range [-126, 127], from the bits.
inline float pow2i(int e) {
  return as_type<float>(uint(e + 127) << 23);
}

// e4m3fn code -> value: bit 7 sign, exponent bits 3-6 (bias 7), mantissa bits 0-2; normal values
// (8 + m) 2^(e - 10) built from the bits, subnormals m 2^-9, 0x7f / 0xff NaN.
inline float e4m3(uint c) {
  const uint e = (c >> 3) & 15u, m = c & 7u;
  float v = e ? as_type<float>(((e + 120u) << 23) | (m << 20)) : float(m) * 0.001953125f;
  v = (c & 0x7fu) == 0x7fu ? NAN : v;
  return (c & 0x80u) ? -v : v;
}
