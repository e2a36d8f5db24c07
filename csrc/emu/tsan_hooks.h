// ThreadSanitizer annotations of the fiber emulator (mokernels._emu_tsan; shim.cpp built with
// -DMK_EMU_TSAN but itself NOT instrumented, the kernel TU built with -fsanitize=thread).
//
// Every CUDA thread of every block is its own TSan fiber, and every switch between fibers is a
// no-sync switch, so TSan sees the CUDA threads as unordered threads. Ordering (happens-before) is
// added only where a GPU has it:
//   * launch start: host -> every thread (fiber creation, plus an explicit acquire of `start`);
//   * block barrier: each arriving thread releases the block's barrier object before it parks and
//     acquires it once the barrier opens;
//   * launch end: every thread -> host (released into `end` whenever a fiber parks or finishes,
//     acquired by the host after the last block, or after a failed one);
//   * warp collectives: by default release/acquire on a per-warp object (lanes of a warp that meet at
//     a shuffle are ordered); MOKERNELS_EMU_TSAN_STRICT=1 drops that (shuffles, ldmatrix and mma do
//     not order shared memory on a GPU), and CI runs strict.
// Blocks of one launch are never ordered with each other: each block gets fresh fibers, fresh sync
// objects, fresh stacks and fresh dynamic shared memory (released only after the launch), so two
// blocks writing one global word are a race, and block k+1 reusing block k's memory is not one.
// The per-warp exchange buffer is bookkeeping, not memory a kernel shares: exchange_put/get access
// it with the fiber's race checks switched off.
// Without MK_EMU_TSAN every hook is an empty inline function.
#pragma once

#include <cstdlib>
#include <string>

#if defined(MK_EMU_TSAN)
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_ignore_thread_begin(void);
extern "C" void __tsan_ignore_thread_end(void);
#endif

namespace mk::emu::tsan {

#if defined(MK_EMU_TSAN)
constexpr bool kEnabled = true;
inline void* current() { return __tsan_get_current_fiber(); }
inline void* create() { return __tsan_create_fiber(0); }
inline void destroy(void* f) {
  if (f) __tsan_destroy_fiber(f);
}
// Call immediately before the context switch into `f`; creates no happens-before edge.
inline void switch_to(void* f) { __tsan_switch_to_fiber(f, __tsan_switch_to_fiber_no_sync); }
inline void release(const void* obj) { __tsan_release(const_cast<void*>(obj)); }
inline void acquire(const void* obj) { __tsan_acquire(const_cast<void*>(obj)); }
inline void ignore_begin() { __tsan_ignore_thread_begin(); }
inline void ignore_end() { __tsan_ignore_thread_end(); }
// MOKERNELS_EMU_TSAN_STRICT=1: warp collectives create no ordering.
inline bool strict() {
  static const bool s = [] {
    const char* v = std::getenv("MOKERNELS_EMU_TSAN_STRICT");
    return v != nullptr && std::string(v) == "1";
  }();
  return s;
}
#else
constexpr bool kEnabled = false;
inline void* current() { return nullptr; }
inline void* create() { return nullptr; }
inline void destroy(void*) {}
inline void switch_to(void*) {}
inline void release(const void*) {}
inline void acquire(const void*) {}
inline void ignore_begin() {}
inline void ignore_end() {}
inline bool strict() { return false; }
#endif

// Per-block synchronisation objects: a fresh heap allocation per block (TSan drops the sync state
// of freed memory), two bytes for the block barrier and two per warp (alternate barriers use
// alternate objects, see block_sync in shim.cpp).
struct BlockSync {
  char* bytes = nullptr;
  const void* barrier(unsigned parity) const { return bytes + parity; }
  const void* warp(int w, unsigned parity) const { return bytes + 2 + 2 * w + parity; }
};

}  // namespace mk::emu::tsan
