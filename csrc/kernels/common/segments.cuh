// Segment lookup shared by the segment-routed kernels (lora.cuh, lora_bwd.cuh).
#pragma once

#include <cstdint>

#include "platform.cuh"

namespace mk {

// Routing row of token t: itself (offsets == nullptr), or the first segment s with offsets[s + 1] > t
// (binary search, in bounds whatever the offsets); covered = the token lies inside that segment.
MK_DEVICE int64_t routing_row(const int32_t* offsets, int segs, int64_t t, bool& covered) {
  covered = true;
  if (offsets == nullptr) return t;
  int lo = 0, hi = segs;
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (static_cast<int64_t>(offsets[mid + 1]) > t) hi = mid; else lo = mid + 1;
  }
  covered = lo < segs && t >= static_cast<int64_t>(offsets[lo]);
  return lo;
}

}  // namespace mk
