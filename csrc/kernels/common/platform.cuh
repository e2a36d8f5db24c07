// Platform layer: the only place where kernel source learns whether it is compiled by nvcc
// for a GPU or by g++ for the CPU emulator (csrc/emu/shim.h).
//
// Kernel code uses these macros instead of CUDA keywords:
//   MK_GLOBAL             a kernel entry point (__global__ / plain function)
//   MK_DEVICE             a device helper (__device__ __forceinline__ / inline)
//   MK_HOST_DEVICE        callable on both sides
//   MK_SHARED_ARRAY(T, name, N)             __shared__ T name[N]
//   MK_SHARED_ARRAY_ALIGNED(A, T, name, N)  __shared__ __align__(A) T name[N] (ldmatrix rows, vectors)
//                         the ONLY way to declare static shared memory (plain __shared__ does not
//                         compile under emulation). Emulated, `name` is a reference to a T[N] in a
//                         per-block allocation of exactly N * sizeof(T) bytes, filled with 0xFF (NaN)
//                         at the first request in each block, freed at block end; each declaration
//                         site and template instantiation has its own. T may be an array type
//                         (MK_SHARED_ARRAY(float[33], tile, 32) declares float tile[32][33]); a
//                         scalar is an array of 1. T must not contain a comma (use an alias).
//   MK_DYNAMIC_SHARED(T, name)   declares `T* name` pointing at the dynamic shared memory
//   MK_SET_MAX_DYNAMIC_SMEM(kernel, bytes)  cudaFuncSetAttribute(kernel, MaxDynamicSharedMemorySize,
//                         bytes): the opt-in above 48 KiB of static + dynamic shared memory (returns
//                         cudaError_t; the emulator models the limits, csrc/emu/shim.h SmemLimits)
//   MK_LAUNCH(kernel, grid, block, smem, stream, args...)
//                         launches a kernel (a function or function pointer, not a template-id:
//                         bind `auto k = kern<T, N>;` first, commas would split the macro)
//   MK_MUTABLE("family.point")  true; under emulation false while that mutation is switched on
//                         (tests/test_emu_mutants.py plants bugs in the real kernels through it:
//                         `if (MK_MUTABLE("x.barrier")) block_sync();` deletes that barrier)
// and the helpers of warp.cuh / mma.cuh for everything a warp does together.
//
// MOKERNELS_EMULATION is an explicit build macro, never derived from __CUDA_ARCH__ (nvcc's host
// pass does not define __CUDA_ARCH__ and would otherwise pick the emulation branch).
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(MOKERNELS_EMULATION)

#include <source_location>

#include "../../emu/shim.h"

#define MK_GLOBAL inline
#define MK_DEVICE inline
#define MK_HOST_DEVICE inline
// The function-local static is only a tag: its address identifies the declaration (per instantiation).
// The alias lets T be an array type (MK_SHARED_ARRAY(float[33], tile, 32) is float tile[32][33]).
#define MK_SHARED_ARRAY_ALIGNED(A, T, name, N)                                                       \
  using mk_shared_t_##name = T;                                                                     \
  static char mk_shared_tag_##name;                                                                 \
  mk_shared_t_##name(&name)[N] = *static_cast<mk_shared_t_##name(*)[N]>(::mk::emu::static_shared(   \
      &mk_shared_tag_##name, sizeof(mk_shared_t_##name) * (N),                                      \
      (A) > alignof(mk_shared_t_##name) ? (A) : alignof(mk_shared_t_##name)))
#define MK_SHARED_ARRAY(T, name, N) MK_SHARED_ARRAY_ALIGNED(alignof(T), T, name, N)
// A plain __shared__ would be a function-local static under g++: one copy for all blocks, never poisoned.
#undef __shared__
#define __shared__ mk_plain_shared_is_not_emulated_use_MK_SHARED_ARRAY
#define MK_LAUNCH_BOUNDS(n)
#define MK_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::mk::emu::dynamic_shared())
#define MK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::mk::emu::launch((grid), (block), (smem), [&]() { kernel(__VA_ARGS__); }, ::mk::emu::kernel_id(kernel))
#define MK_SET_MAX_DYNAMIC_SMEM(kernel, bytes) \
  (::mk::emu::set_max_dynamic_smem(::mk::emu::kernel_id(kernel), (bytes)), cudaSuccess)
#define MK_MUTABLE(name) (!::mk::emu::mutation_on(name))

namespace mk {
// Emulated launches are synchronous and cannot fail asynchronously; errors inside the emulated
// kernel (divergent barriers, shuffles reading exited lanes) are thrown by launch() itself.
inline cudaError_t last_launch_error() { return cudaSuccess; }
}  // namespace mk

#else  // real CUDA

#include <cuda_runtime.h>

#define MK_GLOBAL __global__
#define MK_DEVICE __device__ __forceinline__
#define MK_HOST_DEVICE __host__ __device__ __forceinline__
#define MK_SHARED_ARRAY_ALIGNED(A, T, name, N) \
  using mk_shared_t_##name = T;                \
  __shared__ __align__(A) mk_shared_t_##name name[N]
#define MK_SHARED_ARRAY(T, name, N) \
  using mk_shared_t_##name = T;     \
  __shared__ mk_shared_t_##name name[N]
#define MK_LAUNCH_BOUNDS(n) __launch_bounds__(n)
#define MK_DYNAMIC_SHARED(T, name)                               \
  extern __shared__ __align__(16) unsigned char mk_dyn_smem_[]; \
  T* name = reinterpret_cast<T*>(mk_dyn_smem_)
#define MK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define MK_SET_MAX_DYNAMIC_SMEM(kernel, bytes) \
  cudaFuncSetAttribute((kernel), cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes))
#define MK_MUTABLE(name) true

namespace mk {
inline cudaError_t last_launch_error() { return cudaGetLastError(); }
// The 32-bit shared-state-space address of a generic pointer into shared memory (PTX operands).
MK_DEVICE uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
}  // namespace mk

#endif

namespace mk {

// __syncthreads(): every live thread of the block. Threads that returned early are dropped
// from the barrier (as on sm_70+ hardware); the emulator checks that no thread waits at a
// different barrier (a deadlock or undefined behaviour on the GPU, an error under emulation):
// a warp collective, or a __syncthreads at another call site (std::source_location of the caller).
// A block_sync inside a helper called from two places has ONE call site, the helper's: legal CUDA
// when all threads call the helper, and not flagged; two helpers' calls from divergent branches are not seen.
#if defined(MOKERNELS_EMULATION)
inline void block_sync(std::source_location where = std::source_location::current()) {
  ::mk::emu::block_sync(where.file_name(), where.line());
}
#else
MK_DEVICE void block_sync() { __syncthreads(); }
#endif

MK_HOST_DEVICE constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace mk
