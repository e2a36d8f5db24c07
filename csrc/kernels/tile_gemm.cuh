// Minimal tensor-core GEMM that exercises the mma.sync / ldmatrix wrappers of common/mma.cuh:
// C[M, N] (fp32) = A[M, K] · Bᵀ with B stored [N, K] (B_KN = false) or C = A · B with B stored
// [K, N] (B_KN = true, loaded with ldmatrix.trans). One warp computes a 16x16 tile of C as two
// m16n8k16 MMAs per 16-wide K step; edges are zero-filled in shared memory. It proves fragment
// layouts (emulated in CI, against the hardware in the `cuda` test), not speed.
#pragma once

#include "common/mma.cuh"

namespace mk::tile_gemm {

constexpr int kTile = 16;
constexpr int kLd = 24;  // padded smem row (elements): 48 bytes keeps every ldmatrix row 16-byte aligned
static_assert((kLd * 2) % 16 == 0, "ldmatrix rows must be 16-byte aligned");
static_assert(kLd >= kTile, "padded row holds a tile row");

// sass-budget: mk::tile_gemm::* block=32 regs<=128 spill=0
template <class T, bool B_KN>
MK_GLOBAL void MK_LAUNCH_BOUNDS(32)
    tile_gemm_kernel(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ c, int M, int N, int K) {
  MK_SHARED_ARRAY_ALIGNED(16, T, sa, kTile * kLd);  // [m][k]
  MK_SHARED_ARRAY_ALIGNED(16, T, sb, kTile * kLd);  // [n][k], or [k][n] when B_KN
  const int lane = lane_id();
  const int m0 = blockIdx.y * kTile, n0 = blockIdx.x * kTile;
  float acc[2][4] = {};
  const T zero = from_acc<T>(0.f);
  for (int k0 = 0; k0 < K; k0 += kTile) {
    for (int e = lane; e < kTile * kTile; e += kWarpSize) {
      const int r = e / kTile, q = e % kTile;  // tile row, tile column
      sa[r * kLd + q] = (m0 + r < M && k0 + q < K) ? a[static_cast<int64_t>(m0 + r) * K + k0 + q] : zero;
      if constexpr (B_KN)  // r = k, q = n
        sb[r * kLd + q] = (k0 + r < K && n0 + q < N) ? b[static_cast<int64_t>(k0 + r) * N + n0 + q] : zero;
      else  // r = n, q = k
        sb[r * kLd + q] = (n0 + r < N && k0 + q < K) ? b[static_cast<int64_t>(n0 + r) * K + k0 + q] : zero;
    }
    if (MK_MUTABLE("tile_gemm.raw_barrier")) block_sync();
    uint32_t af[4], bf[4];
    // A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
    ldmatrix<4>(af, &sa[(lane % 16) * kLd + (lane / 16) * 8]);
    // B: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
    if constexpr (B_KN)
      ldmatrix_trans<4>(bf, &sb[(lane % 8 + ((lane / 8) % 2) * 8) * kLd + (lane / 16) * 8]);
    else
      ldmatrix<4>(bf, &sb[(lane % 8 + (lane / 16) * 8) * kLd + ((lane / 8) % 2) * 8]);
    const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
    mma_m16n8k16<T>(acc[0], af, b0, acc[0]);
    mma_m16n8k16<T>(acc[1], af, b1, acc[1]);
    if (MK_MUTABLE("tile_gemm.war_barrier")) block_sync();  // the next K step overwrites the tiles
  }
  for (int nt = 0; nt < 2; ++nt)
    for (int i = 0; i < 4; ++i) {
      const RowCol rc = mma_c_coord(lane, i);
      const int r = m0 + rc.row, col = n0 + nt * 8 + rc.col;
      if (r < M && col < N) c[static_cast<int64_t>(r) * N + col] = acc[nt][i];
    }
}

// M, N, K > 0; ceil(M / 16) <= 65535.
template <class T>
cudaError_t launch(const T* a, const T* b, float* c, int M, int N, int K, bool b_kn, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kTile)), static_cast<unsigned>(ceil_div(M, kTile)));
  auto kernel = b_kn ? tile_gemm_kernel<T, true> : tile_gemm_kernel<T, false>;
  MK_LAUNCH(kernel, grid, dim3(32), 0, stream, a, b, c, M, N, K);
  return last_launch_error();
}

}  // namespace mk::tile_gemm
