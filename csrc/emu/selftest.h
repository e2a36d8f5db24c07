// Kernels that test the emulator itself (tests/test_emu.py), registered only as
// mokernels_emu::_selftest. Each exercises one rule of the CUDA execution model that the shim must
// reproduce, or one misuse that it must report instead of silently running.
#pragma once

#include <stdexcept>
#include <string>

#include <ATen/ops/zeros.h>

#include "../torch_glue.h"
#include "../kernels/common/mma.cuh"
#include "../kernels/common/warp.cuh"
#include "selftest_kernels.cuh"

namespace mk::selftest {

// Per thread t (one block of x.numel() threads, x float): out[t] = {warp sum, warp max, value of
// lane 3, value of lane+1 (shfl_down), popcount(ballot(x > 0)), dynamic-smem neighbour x[t ^ 1]}.
MK_GLOBAL void warp_ops_kernel(const float* x, float* out) {
  MK_DYNAMIC_SHARED(float, smem);
  const int t = threadIdx.x;
  const float v = x[t];
  smem[t] = v;
  block_sync();
  float* o = out + 6 * t;
  o[0] = warp_reduce(v, SumOp{});
  o[1] = warp_reduce(v, MaxOp{});
  o[2] = shfl_idx(v, 3);
  o[3] = shfl_down(v, 1);
  o[4] = static_cast<float>(__builtin_popcount(ballot(v > 0.f)));
  o[5] = smem[t ^ 1];
}

// Threads t >= keep return at once; the rest meet at two barriers (exited threads are dropped) and
// read a neighbour through shared memory: out[t] = x[(t + 1) % keep] for t < keep.
MK_GLOBAL void early_exit_kernel(const float* x, float* out, int keep) {
  MK_SHARED_ARRAY(float, s, 1024);
  const int t = threadIdx.x;
  if (t >= keep) return;
  s[t] = x[t];
  block_sync();
  out[t] = s[(t + 1) % keep];
  block_sync();
}

// Misuse: half of warp 0 waits at __syncthreads while the other half starts a full-warp shuffle
// (a hang on a GPU). Note that threads which *exited* do not block a barrier (sm_70+ semantics).
MK_GLOBAL void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16)
    block_sync();
  else
    out[threadIdx.x] = warp_reduce(1.f, SumOp{});
}

// Misuse: lane 5 exits, the rest of its warp shuffles with a full mask.
MK_GLOBAL void exited_lane_shuffle_kernel(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = warp_reduce(1.f, SumOp{});
}

// Misuse: lanes < 16 shuffle with xor while the rest broadcast with shfl_idx (on a GPU the two halves
// would not exchange values with each other as the source suggests).
MK_GLOBAL void mismatched_collectives_kernel(float* out) {
  const float v = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = threadIdx.x % 32 < 16 ? shfl_xor(v, 1) : shfl_idx(v, 0);
}

// Misuse: no barrier between writing shared memory and reading the neighbours' slots.
// out[t] = x[t - 1] + x[t + 1] (cyclic) is only right if both neighbours happened to run first.
MK_GLOBAL void missing_barrier_kernel(const float* x, float* out) {
  MK_DYNAMIC_SHARED(float, smem);
  const int t = threadIdx.x, n = blockDim.x;
  smem[t] = x[t];
  // BUG (planted): block_sync() missing here
  out[t] = smem[(t + n - 1) % n] + smem[(t + 1) % n];
}

// Warp-serial scheduling: each warp writes its slots of shared memory, does a warp collective, then
// reads the slot of the thread 32 places on (the other warp). Without a block barrier between the write
// and the read (sync = false) that is a race a collective does not fix: the emulator must give a
// wrong (poisoned) answer. out[t] = x[(t + 32) % n] + 0 * (warp sum of x).
MK_GLOBAL void cross_warp_read_kernel(const float* x, float* out, bool sync) {
  MK_DYNAMIC_SHARED(float, smem);
  const int t = threadIdx.x, n = blockDim.x;
  smem[t] = x[t];
  const float sum = warp_reduce(x[t], SumOp{});
  if (sync) block_sync();
  out[t] = smem[(t + kWarpSize) % n] + 0.f * sum;
}

// Static shared memory is poisoned in every block: each of the grid's blocks reads its array before
// writing it, then writes it (a GPU gives garbage, the emulator NaN; with function-local statics the
// second block would read the first block's values). out[block, t] = s[t] before any write = NaN.
// (A 2-D array: float s[32][32], declared with an array element type.)
MK_GLOBAL void static_shared_uninit_kernel(const float* x, float* out) {
  MK_SHARED_ARRAY(float[32], s, 32);
  const int t = threadIdx.x;
  out[blockIdx.x * blockDim.x + t] = s[t / 32][t % 32];  // BUG (planted): read before written
  block_sync();
  s[t / 32][t % 32] = x[t];
}

// Barrier identity: even and odd threads wait at two different __syncthreads (undefined behaviour on a
// GPU; sm_70+ may even let it "work"). helper = true: both branches call one helper that holds the
// barrier (one call site: legal when every thread calls it). out[t] = x[t ^ 1] through shared memory.
MK_DEVICE void barrier_helper() { block_sync(); }
MK_GLOBAL void barrier_sites_kernel(const float* x, float* out, bool helper) {
  MK_SHARED_ARRAY(float, s, 1024);
  const int t = threadIdx.x;
  s[t] = x[t];
  if (t % 2 == 0) {
    if (helper) barrier_helper(); else block_sync();
  } else {
    if (helper) barrier_helper(); else block_sync();
  }
  out[t] = s[t ^ 1];
}

// Misuse: ldmatrix from a row address that is not 16-byte aligned.
MK_GLOBAL void misaligned_ldmatrix_kernel(float* out) {
  MK_SHARED_ARRAY_ALIGNED(16, __half, tile, 8 * 16 + 8);
  const int lane = lane_id();
  for (int i = lane; i < 8 * 16 + 8; i += 32) tile[i] = __float2half(static_cast<float>(i));
  block_sync();
  uint32_t r[1];
  ldmatrix<1>(r, &tile[1 + (lane % 8) * 16]);  // BUG (planted): +1 element = 2-byte alignment
  out[lane] = static_cast<float>(r[0] & 0xffff);
}

// Misuse: a C++ exception escaping the kernel (emulation-only code, e.g. a throwing helper).
MK_GLOBAL void throwing_kernel(float* out) {
  if (threadIdx.x == 7) throw std::runtime_error("thrown inside the kernel");
  out[threadIdx.x] = 1.f;
}

// x = A [32, K] then B [16, K] flattened (K = x.numel() / 48, a multiple of 16); returns C [32, 16].
inline at::Tensor run_two_warp_gemm(const at::Tensor& x, int mode) {
  const int64_t K = x.numel() / 48;
  TORCH_CHECK_VALUE(K >= 16 && K % 16 == 0 && K * 48 == x.numel(), "_selftest: gemm x must hold 48 * K, K % 16 == 0");
  at::Tensor c = at::zeros({32, 16}, x.options());
  auto k = two_warp_gemm_kernel;
  MK_LAUNCH(k, dim3(1), dim3(64), 0, nullptr, ptr<float>(x), ptr<float>(x) + 32 * K, ptr<float>(c),
            static_cast<int>(K), mode);
  return c;
}

// x: stages * 256 floats; which = "cp_async_<ca4|ca8|ca16|cg16>_<mode>".
inline at::Tensor run_cp_async(const at::Tensor& x, const std::string& which) {
  const int64_t stages = x.numel() / 256;
  TORCH_CHECK_VALUE(stages >= 1 && stages * 256 == x.numel(), "_selftest: cp_async x must hold 256 * stages");
  at::Tensor out = at::zeros_like(x);
  const std::string kind = which.substr(9, which.rfind('_') - 9);
  const int mode = std::stoi(which.substr(which.rfind('_') + 1));
  auto k = cp_async_pipeline_kernel<16, false>;
  if (kind == "ca4") k = cp_async_pipeline_kernel<4, false>;
  else if (kind == "ca8") k = cp_async_pipeline_kernel<8, false>;
  else if (kind == "cg16") k = cp_async_pipeline_kernel<16, true>;
  else TORCH_CHECK_VALUE(kind == "ca16", "_selftest: unknown cp.async kind ", kind);
  MK_LAUNCH(k, dim3(1), dim3(64), 0, nullptr, ptr<float>(x), ptr<float>(out), static_cast<int>(stages), mode);
  return out;
}

// Shared-memory limits (shim.h SmemLimits): kStatic floats of static and some dynamic shared memory; each
// thread writes x[t] into both and reads both back after a barrier: out[t] = 2 x[t]. kCase only makes
// each case its own kernel (the MaxDynamicSharedMemorySize opt-in is per kernel, process-wide).
template <int kStatic, int kCase>
MK_GLOBAL void smem_budget_kernel(const float* x, float* out) {
  MK_SHARED_ARRAY(float, s, kStatic);
  MK_DYNAMIC_SHARED(float, d);
  const int t = threadIdx.x;
  s[t] = x[t];
  d[t] = x[t];
  block_sync();
  out[t] = s[t] + d[t];
}

// smem_*: 40 KiB static +
//   static_plus_dynamic: 16 KiB dynamic, no opt-in (56 KiB > 48 KiB: error)
//   opt_in: opt in to 16 KiB, launch with 16 KiB (fine)
//   dynamic_above_opt_in: opt in to 16 KiB, launch with 20 KiB (error)
//   opt_in_large: opt in to 180 KiB, launch with 180 KiB (220 KiB: fine on sm_90, error on sm_80)
//   attribute_above_arch: opt in to 240 KiB (the attribute call fails on both)
//   static_above_48k: 50 KiB static alone (error: ptxas rejects it)
inline at::Tensor run_smem_budget(const at::Tensor& x, const std::string& which) {
  TORCH_CHECK_VALUE(x.numel() == 64, "_selftest: smem cases take 64 floats");
  at::Tensor out = at::zeros_like(x);
  constexpr size_t KiB = 1024;
  const dim3 g(1), b(64);
  if (which == "smem_static_plus_dynamic") {
    auto k = smem_budget_kernel<10240, 0>;
    MK_LAUNCH(k, g, b, 16 * KiB, nullptr, ptr<float>(x), ptr<float>(out));
  } else if (which == "smem_opt_in") {
    auto k = smem_budget_kernel<10240, 1>;
    TORCH_CHECK(MK_SET_MAX_DYNAMIC_SMEM(k, 16 * KiB) == cudaSuccess);
    MK_LAUNCH(k, g, b, 16 * KiB, nullptr, ptr<float>(x), ptr<float>(out));
  } else if (which == "smem_dynamic_above_opt_in") {
    auto k = smem_budget_kernel<10240, 2>;
    TORCH_CHECK(MK_SET_MAX_DYNAMIC_SMEM(k, 16 * KiB) == cudaSuccess);
    MK_LAUNCH(k, g, b, 20 * KiB, nullptr, ptr<float>(x), ptr<float>(out));
  } else if (which == "smem_opt_in_large") {
    auto k = smem_budget_kernel<10240, 3>;
    TORCH_CHECK(MK_SET_MAX_DYNAMIC_SMEM(k, 180 * KiB) == cudaSuccess);
    MK_LAUNCH(k, g, b, 180 * KiB, nullptr, ptr<float>(x), ptr<float>(out));
  } else if (which == "smem_attribute_above_arch") {
    auto k = smem_budget_kernel<10240, 4>;
    TORCH_CHECK(MK_SET_MAX_DYNAMIC_SMEM(k, 240 * KiB) == cudaSuccess);
  } else if (which == "smem_static_above_48k") {
    auto k = smem_budget_kernel<12800, 5>;
    MK_LAUNCH(k, g, b, 0, nullptr, ptr<float>(x), ptr<float>(out));
  } else {
    TORCH_CHECK_VALUE(false, "_selftest: unknown case ", which);
  }
  return out;
}

inline at::Tensor run(const std::string& which, const at::Tensor& x_in) {
  const at::Tensor x = x_in.contiguous().to(at::kFloat);
  if (which.rfind("cp_async_zfill", 0) == 0) {
    TORCH_CHECK_VALUE(x.numel() == 256, "_selftest: cp_async_zfill x must hold 256 floats");
    at::Tensor out = at::zeros_like(x);
    auto k = cp_async_zfill_kernel;
    MK_LAUNCH(k, dim3(1), dim3(64), 0, nullptr, ptr<float>(x), ptr<float>(out), which == "cp_async_zfill_misaligned");
    return out;
  }
  if (which.rfind("cp_async_", 0) == 0) return run_cp_async(x, which);
  if (which.rfind("smem_", 0) == 0) return run_smem_budget(x, which);
  if (which == "two_warp_gemm") return run_two_warp_gemm(x, 0);
  if (which == "two_warp_gemm_no_raw_barrier") return run_two_warp_gemm(x, 1);
  if (which == "two_warp_gemm_no_war_barrier") return run_two_warp_gemm(x, 2);
  const int64_t n = x.numel();
  TORCH_CHECK_VALUE(n >= 1 && n <= 1024, "_selftest: x must have 1..1024 elements");
  const unsigned threads = static_cast<unsigned>(n);
  if (which == "warp_ops") {
    at::Tensor out = at::zeros({n, 6}, x.options());
    auto k = warp_ops_kernel;
    MK_LAUNCH(k, dim3(1), dim3(threads), n * sizeof(float), nullptr, ptr<float>(x), ptr<float>(out));
    return out;
  }
  at::Tensor out = at::zeros({n}, x.options());
  if (which == "early_exit") {
    auto k = early_exit_kernel;
    MK_LAUNCH(k, dim3(1), dim3(threads), 0, nullptr, ptr<float>(x), ptr<float>(out), static_cast<int>(n / 2 + 1));
  } else if (which == "divergent_barrier") {
    auto k = divergent_barrier_kernel;
    MK_LAUNCH(k, dim3(1), dim3(threads), 0, nullptr, ptr<float>(out));
  } else if (which == "exited_lane_shuffle") {
    auto k = exited_lane_shuffle_kernel;
    MK_LAUNCH(k, dim3(1), dim3(threads), 0, nullptr, ptr<float>(out));
  } else if (which == "mismatched_collectives") {
    auto k = mismatched_collectives_kernel;
    MK_LAUNCH(k, dim3(1), dim3(threads), 0, nullptr, ptr<float>(out));
  } else if (which == "missing_barrier") {
    auto k = missing_barrier_kernel;
    MK_LAUNCH(k, dim3(1), dim3(threads), n * sizeof(float), nullptr, ptr<float>(x), ptr<float>(out));
  } else if (which == "cross_warp_read" || which == "cross_warp_read_synced") {
    auto k = cross_warp_read_kernel;
    MK_LAUNCH(k, dim3(1), dim3(threads), n * sizeof(float), nullptr, ptr<float>(x), ptr<float>(out),
              which == "cross_warp_read_synced");
  } else if (which == "static_shared_uninit") {
    out = at::zeros({2, n}, x.options());
    auto k = static_shared_uninit_kernel;
    MK_LAUNCH(k, dim3(2), dim3(threads), 0, nullptr, ptr<float>(x), ptr<float>(out));
  } else if (which == "barrier_sites" || which == "barrier_in_helper") {
    auto k = barrier_sites_kernel;
    MK_LAUNCH(k, dim3(1), dim3(threads), 0, nullptr, ptr<float>(x), ptr<float>(out), which == "barrier_in_helper");
  } else if (which == "misaligned_ldmatrix") {
    auto k = misaligned_ldmatrix_kernel;
    MK_LAUNCH(k, dim3(1), dim3(32), 0, nullptr, ptr<float>(out));
  } else if (which == "throws") {
    auto k = throwing_kernel;
    MK_LAUNCH(k, dim3(1), dim3(threads), 0, nullptr, ptr<float>(out));
  } else if (which == "too_much_shared_memory") {
    auto k = missing_barrier_kernel;
    MK_LAUNCH(k, dim3(1), dim3(threads), 64 * 1024, nullptr, ptr<float>(x), ptr<float>(out));
  } else {
    TORCH_CHECK_VALUE(false, "_selftest: unknown case ", which);
  }
  return out;
}

inline void define(torch::Library& m) {
  m.def("_selftest(str which, Tensor x) -> Tensor");
  m.impl("_selftest", c10::DispatchKey::CPU, TORCH_FN(run));
}

}  // namespace mk::selftest
