// Segment lookup shared by the segment-routed kernels (lora.cuh, lora_bwd.cuh).
#pragma once

#include <cstdint>

#include "platform.cuh"

namespace mk {

// Routing row of token t: itself (offsets == nullptr), or the first segment s with offsets[s + 1] > t
// (binary search, in bounds whatever the offsets); covered = the token lies inside that segment.
// Non-monotone offsets (only possible with validate=False) are NOT routed as the prefill path routes them
// (lora_prefill.cuh's prefill_tile clamps them into [0, T] and takes running maxima, so every token lies in
// the piece of the *prefix-max* ends): e.g. offsets [0, 25, 12, 40] put tokens 12..24 in segment 2 here and in
// segment 0 there. Both stay in bounds; the split decode forward, the backward kernels (lora_bwd.cuh) and the
// prefill forward then disagree on such rows (the backward of a prefill forward differentiates another routing).
// Review R1: noted, not changed (garbage in; validate=True rejects such offsets).
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
