// The planted-bug catalogue (issue 7; the cp.async cases are selftest.h's pipeline modes): small kernels, each with one bug class a CUDA kernel can have,
// switched on by `bug` (0 = the correct twin, which every pass must find clean). Registered in every
// emulation build as mokernels_emu::_mutant(which, bug, x); tests/test_emu_mutants.py runs each one
// under every CI pass (plain emulator: error or wrong result; ASan/UBSan; TSan strict) and records
// which pass catches it. Mutants of the real kernels go through MK_MUTABLE and _set_mutation instead.
#pragma once

#include <string>

#include <ATen/ops/zeros.h>

#include "../torch_glue.h"
#include "../kernels/common/mma.cuh"
#include "../kernels/common/warp.cuh"

namespace mk::mutants {

// out[t] = sum of x over t's warp. part_warp: only lanes < 16 join the shuffle; exited_lane: lane 5
// returns first (both: undefined behaviour on a GPU, an error here).
MK_GLOBAL void warp_sum_kernel(const float* x, float* out, int bug) {
  const int t = threadIdx.x;
  if (bug == 2 && t == 5) return;
  float v = x[t];
  if (bug != 1 || lane_id() < 16) v = warp_reduce(v, SumOp{});
  out[t] = v;
}

// out[t] = x[t] + x[t + 1] (cyclic); bug: reads x[n] (one past the end of the global buffer).
MK_GLOBAL void oob_global_kernel(const float* x, float* out, int n, int bug) {
  const int t = threadIdx.x;
  out[t] = x[t] + x[bug ? t + 1 : (t + 1) % n];
}

// The same through dynamic shared memory of exactly n floats; bug: reads smem[n].
MK_GLOBAL void oob_dynamic_smem_kernel(const float* x, float* out, int n, int bug) {
  MK_DYNAMIC_SHARED(float, s);
  const int t = threadIdx.x;
  s[t] = x[t];
  block_sync();
  out[t] = s[t] + s[bug ? t + 1 : (t + 1) % n];
}

// The same through a static shared array of 32 floats (one block of 32 threads); bug: reads s[32].
MK_GLOBAL void oob_static_smem_kernel(const float* x, float* out, int bug) {
  MK_SHARED_ARRAY(float, s, 32);
  const int t = threadIdx.x;
  s[t] = x[t];
  block_sync();
  out[t] = s[t] + s[bug ? t + 1 : (t + 1) % 32];
}

// out[t] = x[t - 1] + x[t + 1] (cyclic) through shared memory; bug: no barrier between write and read.
MK_GLOBAL void neighbours_kernel(const float* x, float* out, int bug) {
  MK_DYNAMIC_SHARED(float, s);
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = x[t];
  if (!bug) block_sync();
  out[t] = s[(t + n - 1) % n] + s[(t + 1) % n];
}

// 64 threads: out[t] = x[t ^ 32] (the other warp's value) + the sum of t's warp. bug: no barrier
// between the write and the cross-warp read, only a warp_reduce (which orders nothing across warps).
MK_GLOBAL void cross_warp_kernel(const float* x, float* out, int bug) {
  MK_DYNAMIC_SHARED(float, s);
  const int t = threadIdx.x;
  s[t] = x[t];
  const float r = warp_reduce(x[t], SumOp{});
  if (!bug) block_sync();
  out[t] = s[t ^ 32] + r;
}

// out[0] = sum(x), one block. bug: every thread does a non-atomic `out[0] += x[t]` (global memory) or
// `acc += x[t]` on one shared word; correct: partial sums in shared memory, thread 0 adds them.
MK_GLOBAL void sum_kernel(const float* x, float* out, int bug) {
  MK_DYNAMIC_SHARED(float, s);
  const int t = threadIdx.x, n = blockDim.x;
  if (bug == 1) {  // global += race
    out[0] += x[t];
    return;
  }
  if (bug == 2) {  // shared += race
    if (t == 0) s[0] = 0.f;
    block_sync();
    s[0] += x[t];
    block_sync();
    if (t == 0) out[0] = s[0];
    return;
  }
  s[t] = x[t];
  block_sync();
  if (t == 0) {
    float acc = 0.f;
    for (int i = 0; i < n; ++i) acc += s[i];
    out[0] = acc;
  }
}

// Grid of 2 blocks, out[t] = x[t] + 1 written by the last block. bug: both blocks store to out[t]
// (conflicting stores from unordered blocks; the emulator's block order hides it).
MK_GLOBAL void last_block_kernel(const float* x, float* out, int bug) {
  const int t = threadIdx.x;
  if (bug || blockIdx.x == gridDim.x - 1) out[t] = x[t] + static_cast<float>(blockIdx.x);
}

// One block of 64: acc[t] = 0, acc[t] += x[t], out[t] = acc[t]. bug: the static shared array is never
// zeroed (reads whatever static __shared__ holds on the first launch: poison under emulation, where a
// function-local static used to read as zeros).
MK_GLOBAL void static_uninit_kernel(const float* x, float* out, int bug) {
  MK_SHARED_ARRAY(float, acc, 64);
  const int t = threadIdx.x;
  if (!bug) acc[t] = 0.f;
  block_sync();
  acc[t] += x[t];
  out[t] = acc[t];
}

// 64 threads: out[t] = x[t ^ 32] through shared memory. bug: the two warps meet at two different
// __syncthreads call sites (undefined on a GPU).
MK_GLOBAL void barrier_sites_kernel(const float* x, float* out, int bug) {
  MK_DYNAMIC_SHARED(float, s);
  const int t = threadIdx.x;
  s[t] = x[t];
  if (bug && t < 32) {
    block_sync();
  } else {
    block_sync();
  }
  out[t] = s[t ^ 32];
}

// out[t] = x[h(t) % n] with h a multiplicative hash. bug: the hash is computed in signed int32 and
// overflows (undefined; wraps in practice, so the result is right and only UBSan -fno-wrapv sees it).
MK_GLOBAL void hash_gather_kernel(const float* x, float* out, int n, int bug) {
  const int t = threadIdx.x;
  uint32_t h;
  if (bug) {
    const int s = (t + 1) * 1640531527;  // BUG: signed overflow for t >= 1
    h = static_cast<uint32_t>(s);
  } else {
    h = static_cast<uint32_t>(t + 1) * 1640531527u;
  }
  out[t] = x[h % static_cast<uint32_t>(n)];
}

// Two warps compute C[16, 16] = A[16, K] · B[16, K]ᵀ (bf16 in, fp32 out): both warps load the A and
// B tiles of a K step together, warp w then multiplies its 8 columns (ldmatrix + mma.sync).
// bug bit 0: no barrier after the loads (read-after-write); bit 1: no barrier before the next loads
// overwrite the tiles (write-after-read).
MK_GLOBAL void gemm2w_kernel(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c, int K, int bug) {
  constexpr int kLd = 24;
  MK_SHARED_ARRAY_ALIGNED(16, __nv_bfloat16, sa, 16 * kLd);
  MK_SHARED_ARRAY_ALIGNED(16, __nv_bfloat16, sb, 16 * kLd);
  const int t = threadIdx.x, lane = lane_id(), w = t / kWarpSize;
  float acc[4] = {};
  for (int k0 = 0; k0 < K; k0 += 16) {
    for (int e = t; e < 256; e += 64) {
      const int r = e / 16, q = e % 16;
      sa[r * kLd + q] = a[r * K + k0 + q];
      sb[r * kLd + q] = b[r * K + k0 + q];
    }
    if (!(bug & 1)) block_sync();
    uint32_t af[4], bf[2];
    ldmatrix<4>(af, &sa[(lane % 16) * kLd + (lane / 16) * 8]);
    ldmatrix<2>(bf, &sb[(w * 8 + lane % 8) * kLd + ((lane / 8) % 2) * 8]);
    mma_m16n8k16<__nv_bfloat16>(acc, af, bf, acc);
    if (!(bug & 2)) block_sync();
  }
  for (int i = 0; i < 4; ++i) {
    const RowCol rc = mma_c_coord(lane, i);
    c[rc.row * 16 + w * 8 + rc.col] = acc[i];
  }
}

inline at::Tensor run(const std::string& which, int64_t bug_in, const at::Tensor& x_in) {
  const int bug = static_cast<int>(bug_in);
  if (which == "gemm2w") {  // x: [32, K] (rows 0-15: A, 16-31: B), K a multiple of 16
    TORCH_CHECK_VALUE(x_in.dim() == 2 && x_in.size(0) == 32 && x_in.size(1) % 16 == 0 && x_in.size(1) > 0,
                      "_mutant gemm2w: x must be [32, 16k]");
    const at::Tensor x = x_in.contiguous().to(at::kBFloat16);
    const int K = static_cast<int>(x.size(1));
    at::Tensor out = at::zeros({16, 16}, x_in.options().dtype(at::kFloat));
    const auto* base = ptr<__nv_bfloat16>(x);
    auto k = gemm2w_kernel;
    MK_LAUNCH(k, dim3(1), dim3(64), 0, nullptr, base, base + 16 * K, ptr<float>(out), K, bug);
    return out;
  }
  const at::Tensor x = x_in.contiguous().to(at::kFloat);
  const int n = static_cast<int>(x.numel());
  TORCH_CHECK_VALUE(n >= 1 && n <= 1024, "_mutant: x must have 1..1024 elements");
  at::Tensor out = at::zeros({n}, x.options());
  const float* xp = ptr<float>(x);
  float* op = ptr<float>(out);
  const unsigned threads = static_cast<unsigned>(n);
  if (which == "part_warp_shuffle" || which == "exited_lane_shuffle" || which == "shuffle_48_threads") {
    // x: 64 elements; the 48-thread variant launches 48 threads (warp 1 is half a warp)
    const int code = which == "part_warp_shuffle" ? 1 : which == "exited_lane_shuffle" ? 2 : 0;
    const unsigned nt = which == "shuffle_48_threads" && bug ? 48u : threads;
    auto k = warp_sum_kernel;
    MK_LAUNCH(k, dim3(1), dim3(nt), 0, nullptr, xp, op, bug ? code : 0);
  } else if (which == "oob_global") {
    auto k = oob_global_kernel;
    MK_LAUNCH(k, dim3(1), dim3(threads), 0, nullptr, xp, op, n, bug);
  } else if (which == "oob_dynamic_smem") {
    auto k = oob_dynamic_smem_kernel;
    MK_LAUNCH(k, dim3(1), dim3(threads), n * sizeof(float), nullptr, xp, op, n, bug);
  } else if (which == "oob_static_smem") {
    TORCH_CHECK_VALUE(n == 32, "_mutant oob_static_smem: 32 elements");
    auto k = oob_static_smem_kernel;
    MK_LAUNCH(k, dim3(1), dim3(32), 0, nullptr, xp, op, bug);
  } else if (which == "missing_barrier") {
    auto k = neighbours_kernel;
    MK_LAUNCH(k, dim3(1), dim3(threads), n * sizeof(float), nullptr, xp, op, bug);
  } else if (which == "cross_warp_after_reduce") {
    TORCH_CHECK_VALUE(n == 64, "_mutant cross_warp_after_reduce: 64 elements");
    auto k = cross_warp_kernel;
    MK_LAUNCH(k, dim3(1), dim3(64), n * sizeof(float), nullptr, xp, op, bug);
  } else if (which == "global_add_race" || which == "shared_add_race") {
    auto k = sum_kernel;
    MK_LAUNCH(k, dim3(1), dim3(threads), n * sizeof(float), nullptr, xp, op,
              bug ? (which == "global_add_race" ? 1 : 2) : 0);
  } else if (which == "conflicting_stores") {
    auto k = last_block_kernel;
    MK_LAUNCH(k, dim3(2), dim3(threads), 0, nullptr, xp, op, bug);
  } else if (which == "static_smem_uninitialised") {
    TORCH_CHECK_VALUE(n == 64, "_mutant static_smem_uninitialised: 64 elements");
    auto k = static_uninit_kernel;
    MK_LAUNCH(k, dim3(1), dim3(64), 0, nullptr, xp, op, bug);
  } else if (which == "barrier_call_sites") {
    TORCH_CHECK_VALUE(n == 64, "_mutant barrier_call_sites: 64 elements");
    auto k = barrier_sites_kernel;
    MK_LAUNCH(k, dim3(1), dim3(64), n * sizeof(float), nullptr, xp, op, bug);
  } else if (which == "int32_overflow") {
    auto k = hash_gather_kernel;
    MK_LAUNCH(k, dim3(1), dim3(threads), 0, nullptr, xp, op, n, bug);
  } else {
    TORCH_CHECK_VALUE(false, "_mutant: unknown case ", which);
  }
  return out;
}

inline void set_mutation(const std::string& name) { ::mk::emu::set_mutation(name.c_str()); }

inline void define(torch::Library& m) {
  m.def("_mutant(str which, int bug, Tensor x) -> Tensor");
  m.impl("_mutant", c10::DispatchKey::CPU, TORCH_FN(run));
  // Switches one MK_MUTABLE point of the real kernels off ("" = none); emulation only.
  m.def("_set_mutation(str name) -> ()", TORCH_FN(set_mutation));
}

}  // namespace mk::mutants
