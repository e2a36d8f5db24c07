// Group-level collectives and math helpers built on warp.cuh.
//
// A "group" is GROUP consecutive lanes of a warp (GROUP a power of two <= 32), so one warp can work
// on 32 / GROUP independent rows. Every helper here is still a *full-warp* collective: all 32 lanes
// call it (lanes of a group that has nothing to do pass neutral values); the butterfly simply stops
// at GROUP, so lanes only ever combine with lanes of their own group.
#pragma once

#include <cmath>
#include <limits>

#include "warp.cuh"

namespace mk {

// op over the GROUP lanes of the caller's group; every lane of the group receives the result.
template <int GROUP, class T, class Op> MK_DEVICE T group_reduce(T v, Op op) {
  static_assert(GROUP >= 1 && GROUP <= kWarpSize && (GROUP & (GROUP - 1)) == 0, "GROUP: power of two <= 32");
#pragma unroll
  for (int m = GROUP / 2; m > 0; m >>= 1) v = op(v, shfl_xor(v, m));
  return v;
}

// Arg-max over the group of (key, idx): larger key wins, equal keys -> smaller idx (deterministic).
// Every lane of the group receives the winning pair.
template <int GROUP, class K> MK_DEVICE void group_argmax(K& key, int& idx) {
#pragma unroll
  for (int m = GROUP / 2; m > 0; m >>= 1) {
    const K ok = shfl_xor(key, m);
    const int oi = shfl_xor(idx, m);
    if (ok > key || (ok == key && oi < idx)) {
      key = ok;
      idx = oi;
    }
  }
}

template <class A> MK_HOST_DEVICE A infinity() { return std::numeric_limits<A>::infinity(); }

// exp in the accumulation type (fp32 -> expf, fp64 -> exp), the same call on device and host.
MK_DEVICE float exp_acc(float x) {
#if defined(MOKERNELS_EMULATION)
  return std::exp(x);
#else
  return expf(x);
#endif
}
MK_DEVICE double exp_acc(double x) {
#if defined(MOKERNELS_EMULATION)
  return std::exp(x);
#else
  return ::exp(x);
#endif
}

MK_DEVICE float sqrt_acc(float x) {
#if defined(MOKERNELS_EMULATION)
  return std::sqrt(x);
#else
  return sqrtf(x);
#endif
}
MK_DEVICE double sqrt_acc(double x) {
#if defined(MOKERNELS_EMULATION)
  return std::sqrt(x);
#else
  return ::sqrt(x);
#endif
}

}  // namespace mk
