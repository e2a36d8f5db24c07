// Platform layer: the only place where kernel source learns whether it is compiled by nvcc
// for a GPU or by g++ for the CPU emulator (csrc/emu/shim.h).
//
// Kernel code uses these macros instead of CUDA keywords:
//   MK_GLOBAL             a kernel entry point (__global__ / plain function)
//   MK_DEVICE             a device helper (__device__ __forceinline__ / inline)
//   MK_HOST_DEVICE        callable on both sides
//   MK_SHARED             a __shared__ variable (function-local static under emulation: blocks
//                         run one after another, so one copy per kernel is one copy per block)
//   MK_SHARED_ALIGNED(b)  the same, aligned to b bytes (ldmatrix rows, vector accesses)
//   MK_DYNAMIC_SHARED(T, name)   declares `T* name` pointing at the dynamic shared memory
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

#include "../../emu/shim.h"

#define MK_GLOBAL inline
#define MK_DEVICE inline
#define MK_HOST_DEVICE inline
#define MK_SHARED static
#define MK_SHARED_ALIGNED(bytes) alignas(bytes) static
#define MK_LAUNCH_BOUNDS(n)
#define MK_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::mk::emu::dynamic_shared())
#define MK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::mk::emu::launch((grid), (block), (smem), [&]() { kernel(__VA_ARGS__); })
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
#define MK_SHARED __shared__
#define MK_SHARED_ALIGNED(bytes) __shared__ __align__(bytes)
#define MK_LAUNCH_BOUNDS(n) __launch_bounds__(n)
#define MK_DYNAMIC_SHARED(T, name)                               \
  extern __shared__ __align__(16) unsigned char mk_dyn_smem_[]; \
  T* name = reinterpret_cast<T*>(mk_dyn_smem_)
#define MK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define MK_MUTABLE(name) true

namespace mk {
inline cudaError_t last_launch_error() { return cudaGetLastError(); }
}  // namespace mk

#endif

namespace mk {

// __syncthreads(): every live thread of the block. Threads that returned early are dropped
// from the barrier (as on sm_70+ hardware); the emulator checks that no thread waits at a
// different barrier (that is a deadlock on the GPU and an error under emulation).
MK_DEVICE void block_sync() {
#if defined(MOKERNELS_EMULATION)
  ::mk::emu::block_sync();
#else
  __syncthreads();
#endif
}

MK_HOST_DEVICE constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace mk
