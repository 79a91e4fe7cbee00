// Metal scalar and vector types for the CPU harness.
//
// half and bfloat are 2-byte storage types (so `device half*` strides match Metal buffers); every
// operation computes in float and rounds the result to nearest-even, which for + - * / is exactly
// the IEEE result in the narrow format (float has more than 2p+2 bits). Mixed half/bfloat and float
// operands give float, like Metal. Vectors are vec<T, N> with Metal's sizes and alignments (a
// float3 takes 16 bytes), .xyzw/.rgba members, swizzles of 2-4 components, and elementwise operators.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

typedef unsigned int uint;  // Metal's names; glibc declares the same typedefs
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;

namespace metal {

constexpr float msim_bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }
constexpr uint32_t msim_float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

struct bfloat;
struct half {
  uint16_t bits;
  half() = default;
  constexpr half(float f) : bits(from_float(f)) {}
  template <class T, std::enable_if_t<std::is_same_v<T, bfloat>, int> = 0>
  constexpr half(T v) : half(float(v)) {}
  template <class T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
  constexpr half(T v) : half(float(v)) {}
  constexpr operator float() const { return to_float(bits); }
  static constexpr uint16_t from_float(float f) {
    uint32_t x = msim_float_to_bits(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));  // NaN stays NaN
    if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to infinity
    if (ax < 0x38800000u) {  // half subnormal: adding 0.5f puts the 2^-24 unit in the last place
      float t = msim_bits_to_float(ax) + 0.5f;
      return uint16_t(sign | (msim_float_to_bits(t) - 0x3f000000u));
    }
    uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u);  // round to nearest even at bit 13
    return uint16_t(sign | ((r - 0x38000000u) >> 13));
  }
  static constexpr float to_float(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) return msim_bits_to_float(sign) + (sign ? -1.0f : 1.0f) * float(m) * 0x1p-24f;
    if (e == 31) return msim_bits_to_float(sign | 0x7f800000u | (m << 13));
    return msim_bits_to_float(sign | ((e + 112u) << 23) | (m << 13));
  }
};

struct bfloat {
  uint16_t bits;
  bfloat() = default;
  constexpr bfloat(float f) : bits(from_float(f)) {}
  constexpr bfloat(half h) : bfloat(float(h)) {}
  template <class T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
  constexpr bfloat(T v) : bfloat(float(v)) {}
  constexpr operator float() const { return msim_bits_to_float(uint32_t(bits) << 16); }
  static constexpr uint16_t from_float(float f) {
    uint32_t u = msim_float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
};

template <class T> struct is_f16 : std::false_type {};
template <> struct is_f16<half> : std::true_type {};
template <> struct is_f16<bfloat> : std::true_type {};

// Narrow (op) narrow -> narrow; narrow (op) float -> float; narrow (op) integer -> narrow; half (op) bfloat -> float.
#define MSIM_F16_OPS(T)                                                                              \
  inline T operator-(T a) { a.bits ^= 0x8000u; return a; }                                         \
  inline T operator+(T a) { return a; }                                                            \
  MSIM_F16_BIN(T, +) MSIM_F16_BIN(T, -) MSIM_F16_BIN(T, *) MSIM_F16_BIN(T, /)
#define MSIM_F16_BIN(T, op)                                                                          \
  inline T operator op(T a, T b) { return T(float(a) op float(b)); }                               \
  inline float operator op(T a, float b) { return float(a) op b; }                                 \
  inline float operator op(float a, T b) { return a op float(b); }                                 \
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>                             \
  inline T operator op(T a, I b) { return T(float(a) op float(b)); }                               \
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>                             \
  inline T operator op(I a, T b) { return T(float(a) op float(b)); }                               \
  template <class U> inline T& operator op##=(T& a, U b) { a = T(a op b); return a; }
MSIM_F16_OPS(half)
MSIM_F16_OPS(bfloat)
#define MSIM_MIXED(op)                                                                               \
  inline float operator op(half a, bfloat b) { return float(a) op float(b); }                      \
  inline float operator op(bfloat a, half b) { return float(a) op float(b); }
MSIM_MIXED(+) MSIM_MIXED(-) MSIM_MIXED(*) MSIM_MIXED(/)
#define MSIM_F16_CMP(T, op)                                                                          \
  inline bool operator op(T a, T b) { return float(a) op float(b); }                               \
  inline bool operator op(T a, float b) { return float(a) op b; }                                  \
  inline bool operator op(float a, T b) { return a op float(b); }                                  \
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>                             \
  inline bool operator op(T a, I b) { return float(a) op float(b); }                               \
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>                             \
  inline bool operator op(I a, T b) { return float(a) op float(b); }
#define MSIM_F16_CMPS(T) MSIM_F16_CMP(T, <) MSIM_F16_CMP(T, >) MSIM_F16_CMP(T, <=) \
  MSIM_F16_CMP(T, >=) MSIM_F16_CMP(T, ==) MSIM_F16_CMP(T, !=)
MSIM_F16_CMPS(half)
MSIM_F16_CMPS(bfloat)

// ---- vectors ----------------------------------------------------------------------------------
template <class T, int N> struct vec;

// A view of K components (indices I...) of the M-slot storage of the vector that holds it.
template <class T, int M, int... I> struct swizzle {
  static constexpr int K = sizeof...(I);
  T d[M];
  operator vec<T, K>() const { return vec<T, K>(d[I]...); }
  swizzle& operator=(const vec<T, K>& v) { int k = 0; ((d[I] = v[k++]), ...); return *this; }
  swizzle& operator=(const swizzle& s) { return *this = vec<T, K>(s); }
  T operator[](int i) const { const int ix[] = {I...}; return d[ix[i]]; }
};

#define MSIM_S2(T, M, a, b, A, B) swizzle<T, M, A, B> a##b;
#define MSIM_S3(T, M, a, b, c, A, B, C) swizzle<T, M, A, B, C> a##b##c;
#define MSIM_SWZ2(T, M) MSIM_S2(T, M, x, y, 0, 1) MSIM_S2(T, M, y, x, 1, 0) MSIM_S2(T, M, x, x, 0, 0) \
  MSIM_S2(T, M, y, y, 1, 1)
#define MSIM_SWZ3(T, M) MSIM_SWZ2(T, M) MSIM_S2(T, M, x, z, 0, 2) MSIM_S2(T, M, y, z, 1, 2) \
  MSIM_S2(T, M, z, x, 2, 0) MSIM_S2(T, M, z, y, 2, 1) MSIM_S3(T, M, x, y, z, 0, 1, 2) MSIM_S3(T, M, z, y, x, 2, 1, 0)
#define MSIM_SWZ4(T, M) MSIM_SWZ3(T, M) MSIM_S2(T, M, z, w, 2, 3) MSIM_S2(T, M, x, w, 0, 3) \
  MSIM_S2(T, M, y, w, 1, 3) MSIM_S2(T, M, w, z, 3, 2) MSIM_S3(T, M, y, z, w, 1, 2, 3) \
  MSIM_S3(T, M, x, y, w, 0, 1, 3) swizzle<T, M, 0, 1, 2, 3> xyzw; swizzle<T, M, 3, 2, 1, 0> wzyx; \
  swizzle<T, M, 0, 1, 2, 3> rgba;

template <class T> struct msim_vlen { static constexpr int value = 1; };
template <class T, int N> struct msim_vlen<vec<T, N>> { static constexpr int value = N; };
template <class T, int M, int... I> struct msim_vlen<swizzle<T, M, I...>> { static constexpr int value = sizeof...(I); };

// Shared members of vec<T, 2|3|4>: constructors (broadcast, per component, composite like
// float4(a.xy, b.xy)), explicit conversion between element types, indexing and copy.
#define MSIM_VEC_BODY(N)                                                                             \
  vec() = default;                                                                                   \
  vec(const vec& o) { for (int i = 0; i < N; ++i) d[i] = o.d[i]; }                                   \
  vec& operator=(const vec& o) { for (int i = 0; i < N; ++i) d[i] = o.d[i]; return *this; }          \
  vec(T s) { for (int i = 0; i < N; ++i) d[i] = s; }                                                 \
  template <class... A, std::enable_if_t<(sizeof...(A) > 1) &&                                       \
                                         ((msim_vlen<std::decay_t<A>>::value + ...) == N), int> = 0> \
  vec(const A&... a) { int k = 0; (put(k, a), ...); }                                                \
  template <class U, std::enable_if_t<!std::is_same_v<U, T>, int> = 0>                               \
  explicit vec(const vec<U, N>& o) { for (int i = 0; i < N; ++i) d[i] = T(o[i]); }                   \
  T& operator[](int i) { return d[i]; }                                                              \
  const T& operator[](int i) const { return d[i]; }                                                  \
  template <class A> void put(int& k, const A& a) {                                                  \
    constexpr int L = msim_vlen<A>::value;                                                           \
    if constexpr (L == 1) d[k++] = T(a);                                                             \
    else { vec<T, L> v(a); for (int i = 0; i < L; ++i) d[k++] = v[i]; }                             \
  }

template <class T> struct alignas(2 * sizeof(T)) vec<T, 2> {
  union { T d[2]; struct { T x, y; }; struct { T r, g; }; MSIM_SWZ2(T, 2) };
  MSIM_VEC_BODY(2)
};
template <class T> struct alignas(4 * sizeof(T)) vec<T, 3> {
  union { T d[4]; struct { T x, y, z; }; struct { T r, g, b; }; MSIM_SWZ3(T, 4) };
  MSIM_VEC_BODY(3)
};
template <class T> struct alignas(4 * sizeof(T)) vec<T, 4> {
  union { T d[4]; struct { T x, y, z, w; }; struct { T r, g, b, a; }; MSIM_SWZ4(T, 4) };
  MSIM_VEC_BODY(4)
};

// Elementwise operators, non-template per element type so swizzles and scalars convert implicitly.
#define MSIM_VBIN(T, N, op)                                                                          \
  inline vec<T, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {                            \
    vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = T(a[i] op b[i]); return r; }                   \
  inline vec<T, N> operator op(const vec<T, N>& a, T b) { return a op vec<T, N>(b); }               \
  inline vec<T, N> operator op(T a, const vec<T, N>& b) { return vec<T, N>(a) op b; }               \
  inline vec<T, N>& operator op##=(vec<T, N>& a, const vec<T, N>& b) { return a = a op b; }
#define MSIM_VCMP(T, N, op)                                                                          \
  inline vec<bool, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {                         \
    vec<bool, N> r; for (int i = 0; i < N; ++i) r[i] = a[i] op b[i]; return r; }                   \
  inline vec<bool, N> operator op(const vec<T, N>& a, T b) { return a op vec<T, N>(b); }
#define MSIM_VOPS_N(T, N)                                                                            \
  MSIM_VBIN(T, N, +) MSIM_VBIN(T, N, -) MSIM_VBIN(T, N, *) MSIM_VBIN(T, N, /)                        \
  MSIM_VCMP(T, N, <) MSIM_VCMP(T, N, >) MSIM_VCMP(T, N, <=) MSIM_VCMP(T, N, >=)                      \
  MSIM_VCMP(T, N, ==) MSIM_VCMP(T, N, !=)                                                            \
  inline vec<T, N> operator-(const vec<T, N>& a) { vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = -a[i]; return r; }
#define MSIM_VOPS(T) MSIM_VOPS_N(T, 2) MSIM_VOPS_N(T, 3) MSIM_VOPS_N(T, 4)
#define MSIM_VIOPS_N(T, N) MSIM_VBIN(T, N, %) MSIM_VBIN(T, N, &) MSIM_VBIN(T, N, |) MSIM_VBIN(T, N, ^) \
  MSIM_VBIN(T, N, <<) MSIM_VBIN(T, N, >>)
#define MSIM_VIOPS(T) MSIM_VOPS(T) MSIM_VIOPS_N(T, 2) MSIM_VIOPS_N(T, 3) MSIM_VIOPS_N(T, 4)
MSIM_VOPS(float)
MSIM_VOPS(half)
MSIM_VOPS(bfloat)
MSIM_VIOPS(int)
MSIM_VIOPS(uint)
MSIM_VIOPS(short)
MSIM_VIOPS(ushort)

// Metal's scalar type names (uint & co. also live in the global namespace, see metal_sim.h).
typedef half float16_t;
typedef bfloat bfloat16_t;

#define MSIM_VTYPES(T, name) typedef vec<T, 2> name##2; typedef vec<T, 3> name##3; typedef vec<T, 4> name##4;
MSIM_VTYPES(float, float) MSIM_VTYPES(half, half) MSIM_VTYPES(bfloat, bfloat) MSIM_VTYPES(int, int)
MSIM_VTYPES(uint, uint) MSIM_VTYPES(short, short) MSIM_VTYPES(ushort, ushort)
MSIM_VTYPES(int8_t, char) MSIM_VTYPES(uchar, uchar) MSIM_VTYPES(bool, bool)
MSIM_VTYPES(long, long) MSIM_VTYPES(ulong, ulong)

inline bool all(bool b) { return b; }
inline bool any(bool b) { return b; }
template <int N> bool all(const vec<bool, N>& v) { for (int i = 0; i < N; ++i) if (!v[i]) return false; return true; }
template <int N> bool any(const vec<bool, N>& v) { for (int i = 0; i < N; ++i) if (v[i]) return true; return false; }

// Reinterpret the bits (same size only), like Metal's as_type<T>.
template <class To, class From> inline To as_type(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "as_type: sizes differ");
  To t; std::memcpy((void*)&t, (const void*)&f, sizeof(To)); return t;
}

}  // namespace metal
