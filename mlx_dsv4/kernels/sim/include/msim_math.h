// Metal math functions for the CPU harness: float via the C library builtins (correctly rounded or
// within ~1 ulp; Metal's safe math is within a few ulp and its fast:: variants within more, so
// tolerances must allow for that), half/bfloat through float, vectors elementwise. precise:: and
// fast:: name the same functions.
#pragma once
#include <cfloat>
#include <type_traits>

#include "msim_types.h"

#ifndef INFINITY
#define INFINITY __builtin_inff()
#endif
#ifndef NAN
#define NAN __builtin_nanf("")
#endif
#ifndef HUGE_VALF
#define HUGE_VALF __builtin_huge_valf()
#endif
#ifndef MAXFLOAT
#define MAXFLOAT FLT_MAX
#endif
#define HALF_MAX 65504.0f
#define M_PI_F 3.14159265358979323846f
#define M_LN2_F 0.693147180559945309417f
#define M_LOG2E_F 1.44269504088896340736f
#define M_SQRT2_F 1.41421356237309504880f

namespace metal {

// Swizzles (v.xy) reach the function templates below as the vectors they denote.
template <class T> struct msim_swz : std::false_type {};
template <class T, int M, int... I> struct msim_swz<swizzle<T, M, I...>> : std::true_type {
  using vec_type = vec<T, int(sizeof...(I))>;
};
template <class A> inline decltype(auto) msim_arg(const A& a) {
  if constexpr (msim_swz<A>::value) return typename msim_swz<A>::vec_type(a);
  else return (a);
}
template <class... A> constexpr bool msim_any_swz = (msim_swz<A>::value || ...);

#define MSIM_UNARY(name, expr)                                                                       \
  inline float name(float x) { return expr; }                                                      \
  template <class T, std::enable_if_t<is_f16<T>::value, int> = 0> inline T name(T x) {            \
    return T(name(float(x))); }                                                                      \
  template <class T, int N> inline vec<T, N> name(const vec<T, N>& v) {                            \
    vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = name(v[i]); return r; }                  \
  template <class A, std::enable_if_t<msim_any_swz<A>, int> = 0> inline auto name(const A& a) {    \
    return name(msim_arg(a)); }
MSIM_UNARY(exp, __builtin_expf(x))
MSIM_UNARY(exp2, __builtin_exp2f(x))
MSIM_UNARY(exp10, __builtin_powf(10.0f, x))
MSIM_UNARY(log, __builtin_logf(x))
MSIM_UNARY(log2, __builtin_log2f(x))
MSIM_UNARY(log10, __builtin_log10f(x))
MSIM_UNARY(sqrt, __builtin_sqrtf(x))
MSIM_UNARY(rsqrt, 1.0f / __builtin_sqrtf(x))
MSIM_UNARY(sin, __builtin_sinf(x))
MSIM_UNARY(cos, __builtin_cosf(x))
MSIM_UNARY(tan, __builtin_tanf(x))
MSIM_UNARY(asin, __builtin_asinf(x))
MSIM_UNARY(acos, __builtin_acosf(x))
MSIM_UNARY(atan, __builtin_atanf(x))
MSIM_UNARY(sinh, __builtin_sinhf(x))
MSIM_UNARY(cosh, __builtin_coshf(x))
MSIM_UNARY(tanh, __builtin_tanhf(x))
MSIM_UNARY(floor, __builtin_floorf(x))
MSIM_UNARY(ceil, __builtin_ceilf(x))
MSIM_UNARY(round, __builtin_roundf(x))
MSIM_UNARY(rint, __builtin_rintf(x))
MSIM_UNARY(trunc, __builtin_truncf(x))
MSIM_UNARY(fabs, __builtin_fabsf(x))
MSIM_UNARY(fract, __builtin_fminf(x - __builtin_floorf(x), 0x1.fffffep-1f))
MSIM_UNARY(saturate, __builtin_fminf(__builtin_fmaxf(x, 0.0f), 1.0f))
MSIM_UNARY(sign, x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (x == x ? x : 0.0f)))

#define MSIM_BINARY(name, expr)                                                                      \
  inline float name(float x, float y) { return expr; }                                             \
  template <class T, std::enable_if_t<is_f16<T>::value, int> = 0> inline T name(T x, T y) {       \
    return T(name(float(x), float(y))); }                                                            \
  template <class T, int N> inline vec<T, N> name(const vec<T, N>& a, const vec<T, N>& b) {        \
    vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = name(a[i], b[i]); return r; }                  \
  template <class T, int N> inline vec<T, N> name(const vec<T, N>& a, T b) {                       \
    return name(a, vec<T, N>(b)); }                                                                  \
  template <class A, class B, std::enable_if_t<msim_any_swz<A, B>, int> = 0>                       \
  inline auto name(const A& a, const B& b) { return name(msim_arg(a), msim_arg(b)); }
MSIM_BINARY(pow, __builtin_powf(x, y))
MSIM_BINARY(powr, __builtin_powf(x, y))
MSIM_BINARY(atan2, __builtin_atan2f(x, y))
MSIM_BINARY(fmod, __builtin_fmodf(x, y))
MSIM_BINARY(fmin, __builtin_fminf(x, y))
MSIM_BINARY(fmax, __builtin_fmaxf(x, y))
MSIM_BINARY(copysign, __builtin_copysignf(x, y))
MSIM_BINARY(step, y < x ? 0.0f : 1.0f)
MSIM_BINARY(divide, x / y)
// min/max on floats: the non-NaN operand, like fmin/fmax.
MSIM_BINARY(min, __builtin_fminf(x, y))
MSIM_BINARY(max, __builtin_fmaxf(x, y))

template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0> inline I min(I a, I b) { return b < a ? b : a; }
template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0> inline I max(I a, I b) { return a < b ? b : a; }
template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0> inline I abs(I a) { return a < 0 ? I(-a) : a; }
inline float abs(float x) { return __builtin_fabsf(x); }
template <class T, std::enable_if_t<is_f16<T>::value, int> = 0> inline T abs(T x) { x.bits &= 0x7fffu; return x; }
template <class T, int N> inline vec<T, N> abs(const vec<T, N>& v) {
  vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = abs(v[i]); return r;
}
template <class T> inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T, int N> inline vec<T, N> clamp(const vec<T, N>& x, T lo, T hi) {
  return min(max(x, vec<T, N>(lo)), vec<T, N>(hi));
}
template <class A, class L, std::enable_if_t<msim_any_swz<A>, int> = 0>
inline auto clamp(const A& x, const L& lo, const L& hi) { return clamp(msim_arg(x), lo, hi); }

inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
template <class T, std::enable_if_t<is_f16<T>::value, int> = 0> inline T fma(T a, T b, T c) {
  return T(__builtin_fmaf(float(a), float(b), float(c)));
}
template <class T, int N> inline vec<T, N> fma(const vec<T, N>& a, const vec<T, N>& b, const vec<T, N>& c) {
  vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = fma(a[i], b[i], c[i]); return r;
}
template <class T> inline T mix(T a, T b, T t) { return a + (b - a) * t; }
inline float ldexp(float x, int e) { return __builtin_ldexpf(x, e); }

// select(a, b, c): b where c is true, else a.
template <class T> inline T select(T a, T b, bool c) { return c ? b : a; }
template <class T, int N> inline vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, const vec<bool, N>& c) {
  vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = c[i] ? b[i] : a[i]; return r;
}

inline bool isnan(float x) { return __builtin_isnan(x); }
inline bool isinf(float x) { return __builtin_isinf(x); }
inline bool isfinite(float x) { return __builtin_isfinite(x); }
inline bool signbit(float x) { return __builtin_signbit(x); }
template <class T, std::enable_if_t<is_f16<T>::value, int> = 0> inline bool isnan(T x) { return isnan(float(x)); }
template <class T, std::enable_if_t<is_f16<T>::value, int> = 0> inline bool isinf(T x) { return isinf(float(x)); }
template <class T, std::enable_if_t<is_f16<T>::value, int> = 0> inline bool isfinite(T x) { return isfinite(float(x)); }

template <class T, int N> inline T dot(const vec<T, N>& a, const vec<T, N>& b) {
  float s = 0.0f;  // products summed in component order, in float
  for (int i = 0; i < N; ++i) s += float(a[i]) * float(b[i]);
  return T(s);
}
template <class A, class B, std::enable_if_t<msim_any_swz<A, B>, int> = 0>
inline auto dot(const A& a, const B& b) { return dot(msim_arg(a), msim_arg(b)); }
template <class T, int N> inline T length(const vec<T, N>& a) { return T(sqrt(float(dot(a, a)))); }
template <class T, int N> inline vec<T, N> normalize(const vec<T, N>& a) { return a * T(rsqrt(float(dot(a, a)))); }

inline unsigned popcount(unsigned x) { return unsigned(__builtin_popcount(x)); }
inline unsigned clz(unsigned x) { return x ? unsigned(__builtin_clz(x)) : 32u; }
inline unsigned ctz(unsigned x) { return x ? unsigned(__builtin_ctz(x)) : 32u; }

namespace precise {
using metal::exp, metal::exp2, metal::exp10, metal::log, metal::log2, metal::log10, metal::sqrt, metal::rsqrt,
    metal::sin, metal::cos, metal::tan, metal::tanh, metal::pow, metal::powr, metal::divide, metal::fmin,
    metal::fmax, metal::atan2;
}
namespace fast {
using metal::exp, metal::exp2, metal::exp10, metal::log, metal::log2, metal::log10, metal::sqrt, metal::rsqrt,
    metal::sin, metal::cos, metal::tan, metal::tanh, metal::pow, metal::powr, metal::divide, metal::fmin,
    metal::fmax, metal::atan2;
}

template <class T> struct numeric_limits;
template <> struct numeric_limits<float> {
  static constexpr float min() { return FLT_MIN; }
  static constexpr float max() { return FLT_MAX; }
  static constexpr float lowest() { return -FLT_MAX; }
  static constexpr float epsilon() { return FLT_EPSILON; }
  static constexpr float infinity() { return __builtin_inff(); }
  static constexpr float quiet_NaN() { return __builtin_nanf(""); }
};
template <> struct numeric_limits<half> {
  static constexpr half min() { return half(0x1p-14f); }
  static constexpr half max() { return half(65504.0f); }
  static constexpr half lowest() { return half(-65504.0f); }
  static constexpr half epsilon() { return half(0x1p-10f); }
  static constexpr half infinity() { return half(__builtin_inff()); }
  static constexpr half quiet_NaN() { return half(__builtin_nanf("")); }
};
constexpr bfloat msim_bf_bits(uint16_t b) { bfloat r{}; r.bits = b; return r; }
template <> struct numeric_limits<bfloat> {
  static constexpr bfloat min() { return bfloat(FLT_MIN); }
  static constexpr bfloat max() { return msim_bf_bits(0x7f7f); }
  static constexpr bfloat lowest() { return msim_bf_bits(0xff7f); }
  static constexpr bfloat epsilon() { return bfloat(0x1p-7f); }
  static constexpr bfloat infinity() { return bfloat(__builtin_inff()); }
  static constexpr bfloat quiet_NaN() { return bfloat(__builtin_nanf("")); }
};
#define MSIM_ILIMITS(T, lo, hi)                                                                      \
  template <> struct numeric_limits<T> {                                                           \
    static constexpr T min() { return lo; }                                                        \
    static constexpr T max() { return hi; }                                                        \
    static constexpr T lowest() { return lo; }                                                     \
  };
MSIM_ILIMITS(int, -2147483647 - 1, 2147483647)
MSIM_ILIMITS(uint, 0u, 0xffffffffu)
MSIM_ILIMITS(short, -32768, 32767)
MSIM_ILIMITS(ushort, 0, 65535)
MSIM_ILIMITS(long, -9223372036854775807L - 1, 9223372036854775807L)
MSIM_ILIMITS(ulong, 0ul, 0xfffffffffffffffful)

// MLX's utils.h helper for strided inputs (ensure_row_contiguous=False).
template <typename IdxT = long>
inline IdxT elem_to_loc(IdxT elem, const int* shape, const long* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}

}  // namespace metal
