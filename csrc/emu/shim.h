// CPU emulation of the CUDA execution model, for running kernel source on machines without a GPU.
//
// Design (see ARCHITECTURE.md "Emulation"):
//  * a launch runs its blocks one after another on the calling OS thread;
//  * every CUDA thread of a block is a user-level fiber (ucontext) with its own stack, so a block of
//    1024 threads costs 1024 small stacks, not 1024 OS threads, and scheduling is deterministic;
//  * __syncthreads parks the fiber until every *live* thread of the block has arrived (a thread that
//    returned early is dropped from the barrier, like std::barrier::arrive_and_drop);
//  * warp collectives (shuffles, ballots, ldmatrix, mma) go through a per-warp exchange buffer:
//    write own value, warp barrier, read the source lane's value, warp barrier;
//  * static shared arrays (MK_SHARED_ARRAY) are per-block heap allocations of exactly their size, made
//    on the first request in each block and freed at its end; dynamic shared memory is one heap buffer
//    of exactly the requested size; both are filled with 0xFF bytes at block start (NaN as floats) and
//    ASan sees one-past-the-end accesses;
//  * every __syncthreads carries its call site (std::source_location): live threads parked at barriers
//    of different call sites are an error. A barrier inside a helper called from two places has one
//    call site (the helper's line): legal CUDA if all threads call it, and not flagged;
//  * misuse that is undefined behaviour on a GPU is an error here: a warp collective while a lane of
//    that warp has exited, waits at another kind of collective or does not exist; a barrier that not
//    all live threads reach (deadlock); launch limits (block dims; static + dynamic shared memory
//    against 48 KiB, or the kernel's MaxDynamicSharedMemorySize opt-in, see SmemLimits);
//    misaligned vector / ldmatrix addresses; a C++ exception escaping the kernel.
//    Errors abort the launch and surface as std::runtime_error from launch().
//  * warp-serial scheduling, to expose missing barriers: a phase is the interval between two block
//    barriers; in each phase every warp runs ALONE through all of its warp collectives until each of
//    its live lanes waits at the block barrier or has exited, then the next warp runs. So no warp sees
//    another warp's writes of the same phase, and a collective never stands in for __syncthreads.
//    Warp order alternates between phases and lane order inside a warp alternates at every pass,
//    both reverse-first (MOKERNELS_EMU_SCHEDULE=forward starts both forward);
//    MOKERNELS_EMU_BLOCK_ORDER=reverse runs the blocks of the grid last to first. The knobs are read
//    at every launch. Dynamic shared memory is filled with 0xFF bytes (NaN as floats) at every block start.
// Emulation proves logic, not speed or the memory model.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#include <cuda_runtime_api.h>  // dim3, uint3, cudaStream_t, cudaError_t (types only; no CUDA calls)

namespace mk::emu {

constexpr int kWarpSize = 32;
constexpr int kExchangeBytes = 64;  // per lane and exchange: enough for an mma fragment set

struct ThreadState;
struct BlockState;

// The fiber running now on this OS thread (null outside an emulated launch).
extern thread_local ThreadState* tls_thread;
extern thread_local BlockState* tls_block;

const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
int lane_id();

int64_t ceil_div_host(int64_t a, int64_t b);

// __syncthreads reached at source line file:line (the barrier's identity: live threads of a block
// parked at barriers with different call sites are an error).
void block_sync(const char* file, unsigned line);
// `kind` names the collective (a string literal); lanes meeting at different kinds are an error.
void warp_sync(const char* kind);
void* dynamic_shared();
// The running block's static shared array declared at the site identified by `tag` (MK_SHARED_ARRAY):
// allocated on the first request in each block, exactly `bytes`, filled with 0xFF, freed at block end.
void* static_shared(const void* tag, size_t bytes, size_t align);
[[noreturn]] void fail(const char* what);

// cp.async (kernels/common/async.cuh), per thread: record a copy of `cp_bytes` (4, 8, 16) into the
// thread's open group, reading `src_bytes` <= cp_bytes from src and zero-filling the rest, and fill
// dst with 0xFF now; commit closes the open group; wait(n) performs all committed groups but the
// newest n, oldest first. Copies still pending when the block ends are performed then.
void cp_async(void* dst, const void* src, unsigned cp_bytes, unsigned src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);

// Per-warp exchange (valid between the two warp_syncs of a collective): copy `n` <= kExchangeBytes
// bytes into this lane's slot / out of `lane`'s slot. Bookkeeping, invisible to the TSan pass.
void exchange_put(const void* src, size_t n);
void exchange_get(int lane, void* dst, size_t n);
bool lane_exists(int lane);

// Fails the launch unless `p` is aligned to `bytes` (what the GPU instruction would require).
inline void require_aligned(const void* p, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) fail(what);
}

// Mutation testing (MK_MUTABLE in platform.cuh): whether mutation `name` is switched on. One mutation at
// a time, set by set_mutation (the mokernels_emu::_set_mutation op) or MOKERNELS_EMU_MUTATION; "" = none.
bool mutation_on(const char* name);
void set_mutation(const char* name);

// Shared-memory limits of the emulated GPU, as the hardware applies them (read at every launch):
// MOKERNELS_EMU_ARCH=sm_80 (the default: the stricter of our targets; A100) or sm_90 (H100).
//  * static shared memory (MK_SHARED_ARRAY) of a block: <= 48 KiB (ptxas rejects more);
//  * without an opt-in: static + dynamic <= 48 KiB;
//  * with cudaFuncSetAttribute(kernel, MaxDynamicSharedMemorySize, A) (MK_SET_MAX_DYNAMIC_SMEM):
//    A <= opt-in limit - static (the driver checks at the attribute call; here at the first launch that
//    shows the static size), and dynamic <= A at every launch. Opt-in limit (sharedMemPerBlockOptin):
//    sm_80 163 KiB (166912 B), sm_90 227 KiB (232448 B).
struct SmemLimits {
  const char* arch;
  size_t static_max;   // 48 KiB
  size_t default_max;  // static + dynamic without an opt-in: 48 KiB
  size_t optin_max;    // static + MaxDynamicSharedMemorySize with an opt-in
};
SmemLimits smem_limits();
// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), emulated: records
// the kernel's opt-in (process-wide, per kernel, as the driver does); throws std::runtime_error when
// `bytes` exceeds the emulated GPU's opt-in limit (cudaErrorInvalidValue on a GPU).
void set_max_dynamic_smem(const void* kernel, size_t bytes);
// A kernel's identity for the attribute registry: the address of the kernel function.
template <class F>
inline const void* kernel_id(F* f) {
  return reinterpret_cast<const void*>(f);
}

// Runs `body` as a kernel over grid x block threads with `smem_bytes` of dynamic shared memory.
// `kernel` (kernel_id, or null) selects the kernel's MaxDynamicSharedMemorySize opt-in.
// Throws std::runtime_error when the emulated kernel misbehaves (see above).
void launch(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body,
            const void* kernel = nullptr);

// Warp collective `kind`: each lane contributes `v`; returns the value of lane `src_of(lane)`
// (own value when the source is outside [0, 32)).
template <class T, class F>
inline T warp_exchange(const char* kind, T v, F src_of) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= kExchangeBytes, "exchange type");
  const int lane = lane_id();
  exchange_put(&v, sizeof(T));
  warp_sync(kind);
  const int src = src_of(lane);
  T r = v;
  if (src >= 0 && src < kWarpSize) {
    if (!lane_exists(src)) fail("warp shuffle reads a lane that does not exist in this block");
    exchange_get(src, &r, sizeof(T));
  }
  warp_sync(kind);
  return r;
}

}  // namespace mk::emu

// CUDA's built-in index variables, read from the running fiber.
#define threadIdx (::mk::emu::thread_idx())
#define blockIdx (::mk::emu::block_idx())
#define blockDim (::mk::emu::block_dim())
#define gridDim (::mk::emu::grid_dim())
