// Vectorised global-memory access: N elements of T moved as one aligned 4/8/16-byte transaction.
#pragma once

#include <initializer_list>
#include <type_traits>

#include "platform.cuh"

namespace mk {

template <class T, int N>
struct alignas(sizeof(T) * N) Vec {
  static_assert(N >= 1 && (N & (N - 1)) == 0, "vector width must be a power of two");
  static_assert(sizeof(T) * N <= 16, "at most 16 bytes per vector access");
  T v[N];
};

// Elements of T per 16-byte access.
template <class T> constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// Caller guarantees `p` is aligned to sizeof(Vec<T, N>) (launchers: pick_vec); the emulator checks it.
template <int N, class T> MK_DEVICE Vec<T, N> load_vec(const T* p) {
#if defined(MOKERNELS_EMULATION)
  ::mk::emu::require_aligned(p, sizeof(Vec<T, N>), "misaligned vector load");
#endif
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <int N, class T> MK_DEVICE void store_vec(T* p, const Vec<T, N>& v) {
#if defined(MOKERNELS_EMULATION)
  ::mk::emu::require_aligned(p, sizeof(Vec<T, N>), "misaligned vector store");
#endif
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// Host side (launchers): the widest vector width (elements, <= 16 bytes) that divides `n` and to
// which every pointer in `ptrs` is aligned. Rows of length n then start aligned too.
template <class T>
inline int pick_vec(int64_t n, std::initializer_list<const void*> ptrs) {
  int v = kVec16<T>;
  for (; v > 1; v /= 2) {
    bool ok = n % v == 0;
    for (const void* p : ptrs)
      ok = ok && reinterpret_cast<uintptr_t>(p) % (static_cast<uintptr_t>(v) * sizeof(T)) == 0;
    if (ok) break;
  }
  return v;
}

// Host side: calls f(std::integral_constant<int, V>{}) for V = vec (a power of two <= kVec16<T>),
// instantiating only the widths valid for T.
template <class T, class F>
inline void dispatch_vec(int vec, F&& f) {
  switch (vec) {
    case 8: if constexpr (kVec16<T> >= 8) { f(std::integral_constant<int, 8>{}); return; } break;
    case 4: if constexpr (kVec16<T> >= 4) { f(std::integral_constant<int, 4>{}); return; } break;
    case 2: if constexpr (kVec16<T> >= 2) { f(std::integral_constant<int, 2>{}); return; } break;
    default: break;
  }
  f(std::integral_constant<int, 1>{});
}

}  // namespace mk
