// Warp collectives over the full warp (mask 0xffffffff; every lane of the warp must take part —
// the emulator reports a collective reached by part of a warp as an error).
#pragma once

#include <cuda_fp16.h>

#include "platform.cuh"

namespace mk {

constexpr int kWarpSize = 32;

MK_DEVICE int lane_id() {
#if defined(MOKERNELS_EMULATION)
  return ::mk::emu::lane_id();
#else
  unsigned lane;
  asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
  return static_cast<int>(lane);
#endif
}

// Value of lane (lane ^ mask).
template <class T> MK_DEVICE T shfl_xor(T v, int mask) {
#if defined(MOKERNELS_EMULATION)
  return ::mk::emu::warp_exchange("shfl_xor", v, [mask](int lane) { return lane ^ mask; });
#else
  return __shfl_xor_sync(0xffffffffu, v, mask);
#endif
}

// Value of lane `src` (0..31).
template <class T> MK_DEVICE T shfl_idx(T v, int src) {
#if defined(MOKERNELS_EMULATION)
  return ::mk::emu::warp_exchange("shfl_idx", v, [src](int) { return src & (kWarpSize - 1); });
#else
  return __shfl_sync(0xffffffffu, v, src);
#endif
}

// Value of lane (lane + delta); lanes whose source is past 31 keep their own value.
template <class T> MK_DEVICE T shfl_down(T v, int delta) {
#if defined(MOKERNELS_EMULATION)
  return ::mk::emu::warp_exchange("shfl_down", v,
                                  [delta](int lane) { return lane + delta < kWarpSize ? lane + delta : lane; });
#else
  return __shfl_down_sync(0xffffffffu, v, delta);
#endif
}

// Bit i set iff lane i passed `pred`.
MK_DEVICE uint32_t ballot(bool pred) {
#if defined(MOKERNELS_EMULATION)
  namespace e = ::mk::emu;
  const unsigned char mine = pred ? 1 : 0;
  e::exchange_put(&mine, 1);
  e::warp_sync("ballot");
  uint32_t m = 0;
  for (int l = 0; l < kWarpSize; ++l) {
    if (!e::lane_exists(l)) e::fail("ballot with a full mask in a warp with fewer than 32 threads");
    unsigned char bit = 0;
    e::exchange_get(l, &bit, 1);
    if (bit) m |= 1u << l;
  }
  e::warp_sync("ballot");
  return m;
#else
  return __ballot_sync(0xffffffffu, pred);
#endif
}

// Index of the lowest set bit of a non-zero mask (a ballot's first lane).
MK_DEVICE int lowest_lane(uint32_t mask) {
#if defined(MOKERNELS_EMULATION)
  return __builtin_ctz(mask);
#else
  return __ffs(mask) - 1;
#endif
}

struct SumOp { template <class T> MK_DEVICE T operator()(T a, T b) const { return a + b; } };
struct MaxOp { template <class T> MK_DEVICE T operator()(T a, T b) const { return a > b ? a : b; } };

// Butterfly reduction: every lane receives op over the whole warp.
template <class T, class Op> MK_DEVICE T warp_reduce(T v, Op op) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v = op(v, shfl_xor(v, m));
  return v;
}

}  // namespace mk
