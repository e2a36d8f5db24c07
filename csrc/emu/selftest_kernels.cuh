// Emulator self-test kernels that are also correct CUDA (in their correct modes): torch-free, so
// tests/cpp/selftest_gpu_check.cu runs the same source on a GPU (the `cuda` test in test_emu.py)
// that csrc/emu/selftest.h runs emulated. Their mutant modes are races or missing waits: undefined on
// a GPU, and reported as wrong (poisoned) results by the emulator.
#pragma once

#include "../kernels/common/async.cuh"
#include "../kernels/common/mma.cuh"

namespace mk::selftest {

// A 2-warp tile GEMM in the shape of the tensor-core kernels to come: C[32, 16] = A[32, K] · B[16, K]ᵀ
// (fp16 operands read from fp32, fp32 accumulation), warp w computes rows 16w..16w+15, both warps load
// both tiles cooperatively (each reads what the other wrote). mode 0: correct; mode 1: the
// read-after-write barrier (after the loads) deleted; mode 2: the overwrite barrier (before the next
// K step's loads) deleted. Both mutants must give a wrong result.
constexpr int kGemmLd = 24;  // padded smem row (halves): 48-byte rows keep ldmatrix rows 16-byte aligned
MK_GLOBAL void two_warp_gemm_kernel(const float* a, const float* b, float* c, int K, int mode) {
  MK_SHARED_ARRAY_ALIGNED(16, __half, sa, 32 * kGemmLd);
  MK_SHARED_ARRAY_ALIGNED(16, __half, sb, 16 * kGemmLd);
  const int t = threadIdx.x, lane = lane_id(), warp = t / kWarpSize;
  float acc[2][4] = {};
  for (int k0 = 0; k0 < K; k0 += 16) {
    for (int e = t; e < 48 * 16; e += 64) {
      const int r = e / 16, q = e % 16;
      if (r < 32)
        sa[r * kGemmLd + q] = __float2half(a[r * K + k0 + q]);
      else
        sb[(r - 32) * kGemmLd + q] = __float2half(b[(r - 32) * K + k0 + q]);
    }
    if (mode != 1) block_sync();  // read after write
    uint32_t af[4], bf[4];
    ldmatrix<4>(af, &sa[(warp * 16 + lane % 16) * kGemmLd + (lane / 16) * 8]);
    ldmatrix<4>(bf, &sb[(lane % 8 + (lane / 16) * 8) * kGemmLd + ((lane / 8) % 2) * 8]);
    const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
    mma_m16n8k16<__half>(acc[0], af, b0, acc[0]);
    mma_m16n8k16<__half>(acc[1], af, b1, acc[1]);
    if (mode != 2) block_sync();  // the next K step overwrites the tiles
  }
  for (int nt = 0; nt < 2; ++nt)
    for (int i = 0; i < 4; ++i) {
      const RowCol rc = mma_c_coord(lane, i);
      c[(warp * 16 + rc.row) * 16 + nt * 8 + rc.col] = acc[nt][i];
    }
}

// cp.async double-buffered pipeline (64 threads): stage s of x (256 floats) is copied into buffer s % 2,
// each thread 16 bytes as 16 / N copies of N bytes (.cg when CG), the copy of stage s + 1 overlapping the
// use of stage s; out[s * 256 + i] = stage s [(i + 4) % 256] (the neighbour thread's copy: needs the
// barrier after the wait). mode 0: correct (wait_group<1>, an empty group at the end); 1: no wait;
// 2: no empty group at the end, so wait_group<1> leaves the last stage pending (<0> is needed there);
// 3: the prologue's commit missing (stages 0 and 1 form one group, still pending at the first
// wait_group<1>); 4: correct without overlap (wait_all). Modes 1-3 must read poison.
template <int N, bool CG>
MK_GLOBAL void cp_async_pipeline_kernel(const float* x, float* out, int stages, int mode) {
  MK_SHARED_ARRAY_ALIGNED(16, float, buf, 2 * 256);
  const int t = threadIdx.x;
  auto issue = [&](int s) {
    auto* dst = reinterpret_cast<unsigned char*>(buf + (s % 2) * 256 + 4 * t);
    const auto* src = reinterpret_cast<const unsigned char*>(x + s * 256 + 4 * t);
    for (int b = 0; b < 16; b += N) {
      if constexpr (CG)
        cp_async_cg<16>(dst + b, src + b);
      else
        cp_async_ca<N>(dst + b, src + b);
    }
  };
  issue(0);
  if (mode != 3 && mode != 4) cp_async_commit_group();
  for (int s = 0; s < stages; ++s) {
    if (mode == 4) {
      cp_async_wait_all();
    } else {
      if (s + 1 < stages) issue(s + 1);
      if (mode != 2 || s + 1 < stages) cp_async_commit_group();
      if (mode != 1) cp_async_wait_group<1>();
    }
    block_sync();
    const float* b = buf + (s % 2) * 256;
    for (int i = 0; i < 4; ++i) out[s * 256 + 4 * t + i] = b[(4 * t + i + 4) % 256];
    block_sync();  // the next stage's copy overwrites this buffer
    if (mode == 4 && s + 1 < stages) issue(s + 1);
  }
}

// cp.async.cg with src-size: thread t copies 4 * (t % 5) bytes of x[4t..4t+3] and zero-fills the rest
// of its 16 bytes; out[4t + i] = i < t % 5 ? x[4t + i] : 0. misaligned = true: the destination is
// 4 bytes off a 16-byte boundary (must be reported).
MK_GLOBAL void cp_async_zfill_kernel(const float* x, float* out, bool misaligned) {
  MK_SHARED_ARRAY_ALIGNED(16, float, buf, 4 * 64 + 4);
  const int t = threadIdx.x;
  cp_async_cg_zfill<16>(buf + 4 * t + (misaligned ? 1 : 0), x + 4 * t, 4 * (t % 5));
  cp_async_commit_group();
  cp_async_wait_group<0>();
  for (int i = 0; i < 4; ++i) out[4 * t + i] = buf[4 * t + i];
}

}  // namespace mk::selftest
