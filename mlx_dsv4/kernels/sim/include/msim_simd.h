// SIMD-group functions, barriers and atomics on top of the fiber runtime.
//
// Each SIMD-group function deposits the caller's value and blocks; the scheduler evaluates it once
// every live lane of the 32-lane group is blocked, over the lanes waiting at the same call site
// (source line and column). A lane that reads from a lane not taking part (exited, diverged, or
// beyond a partial group) gets 0xFF bytes: NaN for floats. Reductions combine lanes pairwise
// (lane i with i + 1, then i + 2, ...), every lane gets the same result.
#pragma once
#include <source_location>
#include <type_traits>

#include "msim_math.h"
#include "msim_runtime.h"

namespace metal {

enum class mem_flags : unsigned { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4,
                                  mem_threadgroup_imageblock = 8 };
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(unsigned(a) | unsigned(b)); }

using msim_loc = std::source_location;
inline msim::Site msim_site(const msim_loc& l) { return {unsigned(l.line()), unsigned(l.column())}; }

inline void threadgroup_barrier(mem_flags, msim_loc loc = msim_loc::current()) {
  msim::block(msim::kBarrier, msim_site(loc));
}

namespace msim_detail {
template <class T> T load(const msim::Lane* l) { T v; std::memcpy((void*)&v, l->in, sizeof(T)); return v; }
template <class T> void store(msim::Lane* l, const T& v) { std::memcpy(l->out, (const void*)&v, sizeof(T)); }
template <class T> void poison(msim::Lane* l) { std::memset(l->out, 0xFF, sizeof(T)); }

template <class T> T load_out(const msim::Lane* l) { T v; std::memcpy((void*)&v, l->out, sizeof(T)); return v; }

template <class T> T call(const T& x, int arg, msim::Resolver r, const msim_loc& loc) {
  static_assert(sizeof(T) <= sizeof(msim::Lane::in), "SIMD-group value too large");
  msim::Lane* l = msim::tw->cur;
  std::memcpy(l->in, (const void*)&x, sizeof(T));
  l->arg = arg;
  l->resolve = r;
  msim::block(msim::kSimd, msim_site(loc));
  return load_out<T>(l);
}

struct Sum { template <class T> T operator()(T a, T b) const { return T(a + b); } };
struct Prod { template <class T> T operator()(T a, T b) const { return T(a * b); } };
struct Max { template <class T> T operator()(T a, T b) const { return max(a, b); } };
struct Min { template <class T> T operator()(T a, T b) const { return min(a, b); } };
struct And { template <class T> T operator()(T a, T b) const { return T(a & b); } };
struct Or { template <class T> T operator()(T a, T b) const { return T(a | b); } };
struct Xor { template <class T> T operator()(T a, T b) const { return T(a ^ b); } };

template <class T, class Op> void reduce(msim::Lane** by) {
  T v[msim::kSimdWidth];
  bool p[msim::kSimdWidth];
  for (int i = 0; i < msim::kSimdWidth; ++i)
    if ((p[i] = by[i] != nullptr)) v[i] = load<T>(by[i]);
  for (int s = 1; s < msim::kSimdWidth; s *= 2)
    for (int i = 0; i < msim::kSimdWidth; i += 2 * s)
      if (p[i + s]) {
        v[i] = p[i] ? Op()(v[i], v[i + s]) : v[i + s];
        p[i] = true;
      }
  for (int i = 0; i < msim::kSimdWidth; ++i)
    if (by[i]) store(by[i], v[0]);
}

template <class T, class Op, bool Inclusive> void scan(msim::Lane** by) {
  bool have = false;
  T acc{};
  for (int i = 0; i < msim::kSimdWidth; ++i) {
    if (!by[i]) continue;
    T x = load<T>(by[i]), next = have ? Op()(acc, x) : x;
    if (Inclusive) store(by[i], next);
    else if (have) store(by[i], acc);
    else store(by[i], T(std::is_same_v<Op, Prod> ? 1 : 0));
    acc = next;
    have = true;
  }
}

enum Mode { kLane, kXor, kUp, kDown, kRotDown, kRotUp, kFirst };
template <class T, Mode M> void shuffle(msim::Lane** by) {
  int first = 0;
  while (first < msim::kSimdWidth && !by[first]) ++first;
  for (int i = 0; i < msim::kSimdWidth; ++i) {
    if (!by[i]) continue;
    const int a = by[i]->arg;
    int src = M == kLane ? a : M == kXor ? (a >= 0 && a < 32 ? i ^ a : -1) : M == kUp ? i - a : M == kDown ? i + a
            : M == kRotDown ? (i + a) & 31 : M == kRotUp ? (i - a) & 31 : first;
    if ((M == kUp && src < 0) || (M == kDown && src >= msim::kSimdWidth)) src = i;  // edge lanes keep their value
    if (src >= 0 && src < msim::kSimdWidth && by[src]) store(by[i], load<T>(by[src]));
    else poison<T>(by[i]);
  }
}

inline void vote(msim::Lane** by) {
  unsigned long mask = 0;
  for (int i = 0; i < msim::kSimdWidth; ++i)
    if (by[i] && load<bool>(by[i])) mask |= 1ul << i;
  for (int i = 0; i < msim::kSimdWidth; ++i)
    if (by[i]) store(by[i], mask);
}
inline void first_lane(msim::Lane** by) {
  bool seen = false;
  for (int i = 0; i < msim::kSimdWidth; ++i)
    if (by[i]) { store(by[i], !seen); seen = true; }
}
inline void nothing(msim::Lane**) {}
}  // namespace msim_detail

#define MSIM_REDUCE(name, Op)                                                                        \
  template <class T> T name(T x, msim_loc loc = msim_loc::current()) {                              \
    return msim_detail::call(x, 0, &msim_detail::reduce<T, msim_detail::Op>, loc); }
MSIM_REDUCE(simd_sum, Sum)
MSIM_REDUCE(simd_product, Prod)
MSIM_REDUCE(simd_max, Max)
MSIM_REDUCE(simd_min, Min)
MSIM_REDUCE(simd_and, And)
MSIM_REDUCE(simd_or, Or)
MSIM_REDUCE(simd_xor, Xor)

#define MSIM_SCAN(name, Op, inclusive)                                                               \
  template <class T> T name(T x, msim_loc loc = msim_loc::current()) {                              \
    return msim_detail::call(x, 0, &msim_detail::scan<T, msim_detail::Op, inclusive>, loc); }
MSIM_SCAN(simd_prefix_exclusive_sum, Sum, false)
MSIM_SCAN(simd_prefix_inclusive_sum, Sum, true)
MSIM_SCAN(simd_prefix_exclusive_product, Prod, false)
MSIM_SCAN(simd_prefix_inclusive_product, Prod, true)

#define MSIM_SHUFFLE(name, mode)                                                                     \
  template <class T> T name(T x, unsigned short a, msim_loc loc = msim_loc::current()) {            \
    return msim_detail::call(x, int(a), &msim_detail::shuffle<T, msim_detail::mode>, loc); }
MSIM_SHUFFLE(simd_shuffle, kLane)
MSIM_SHUFFLE(simd_broadcast, kLane)
MSIM_SHUFFLE(simd_shuffle_xor, kXor)
MSIM_SHUFFLE(simd_shuffle_up, kUp)
MSIM_SHUFFLE(simd_shuffle_down, kDown)
MSIM_SHUFFLE(simd_shuffle_rotate_down, kRotDown)
MSIM_SHUFFLE(simd_shuffle_rotate_up, kRotUp)
template <class T> T simd_broadcast_first(T x, msim_loc loc = msim_loc::current()) {
  return msim_detail::call(x, 0, &msim_detail::shuffle<T, msim_detail::kFirst>, loc);
}

struct simd_vote {
  using vote_t = unsigned long;
  vote_t v;
  explicit operator vote_t() const { return v; }
  bool all() const { return v == 0xfffffffful; }
  bool any() const { return v != 0; }
};
inline simd_vote simd_ballot(bool b, msim_loc loc = msim_loc::current()) {
  msim::Lane* l = msim::tw->cur;
  std::memcpy(l->in, &b, sizeof b);
  l->resolve = &msim_detail::vote;
  msim::block(msim::kSimd, msim_site(loc));
  return simd_vote{msim_detail::load_out<unsigned long>(l)};
}
inline bool simd_any(bool b, msim_loc loc = msim_loc::current()) {
  return simd_vote::vote_t(simd_ballot(b, loc)) != 0;
}
inline bool simd_all(bool b, msim_loc loc = msim_loc::current()) {  // over the lanes taking part
  return simd_vote::vote_t(simd_ballot(!b, loc)) == 0;
}
inline bool simd_is_first(msim_loc loc = msim_loc::current()) {
  return msim_detail::call(false, 0, &msim_detail::first_lane, loc);
}
inline void simdgroup_barrier(mem_flags, msim_loc loc = msim_loc::current()) {
  msim_detail::call(0, 0, &msim_detail::nothing, loc);
}

// ---- atomics: real atomics, because threadgroups run concurrently on several worker threads ----
enum memory_order { memory_order_relaxed = 0, memory_order_seq_cst = 5 };
template <class T> struct atomic { T value; };
typedef atomic<int> atomic_int;
typedef atomic<unsigned int> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;
template <class T> using msim_id = std::type_identity_t<T>;

template <class T> T atomic_load_explicit(const volatile atomic<T>* a, memory_order) {
  return __atomic_load_n(&a->value, __ATOMIC_SEQ_CST);
}
template <class T> void atomic_store_explicit(volatile atomic<T>* a, msim_id<T> v, memory_order) {
  __atomic_store_n(&a->value, v, __ATOMIC_SEQ_CST);
}
template <class T> T atomic_exchange_explicit(volatile atomic<T>* a, msim_id<T> v, memory_order) {
  return __atomic_exchange_n(&a->value, v, __ATOMIC_SEQ_CST);
}
template <class T> bool atomic_compare_exchange_weak_explicit(volatile atomic<T>* a, T* expected, msim_id<T> v,
                                                              memory_order, memory_order) {
  return __atomic_compare_exchange_n(&a->value, expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
// Read-modify-write through a compare-exchange loop on the bits (works for float too).
template <class T, class F> T msim_rmw(volatile atomic<T>* a, F f) {
  static_assert(sizeof(T) == 4, "32-bit atomics only");
  volatile unsigned* p = reinterpret_cast<volatile unsigned*>(&a->value);
  unsigned old = __atomic_load_n(p, __ATOMIC_SEQ_CST), next;
  do next = as_type<unsigned>(T(f(as_type<T>(old))));
  while (!__atomic_compare_exchange_n(p, &old, next, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  return as_type<T>(old);
}
#define MSIM_ATOMIC_RMW(name, expr)                                                                  \
  template <class T> T atomic_fetch_##name##_explicit(volatile atomic<T>* a, msim_id<T> v, memory_order) { \
    return msim_rmw(a, [v](T x) { return expr; }); }
MSIM_ATOMIC_RMW(add, x + v)
MSIM_ATOMIC_RMW(sub, x - v)
MSIM_ATOMIC_RMW(and, x & v)
MSIM_ATOMIC_RMW(or, x | v)
MSIM_ATOMIC_RMW(xor, x ^ v)
MSIM_ATOMIC_RMW(max, max(x, v))
MSIM_ATOMIC_RMW(min, min(x, v))

}  // namespace metal
