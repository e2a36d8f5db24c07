// Multi-adapter LoRA fused into the base linear layer, decode path (issue 10 item 2: "at decode the base
// GEMV is itself memory bound, so also build one pass over W that applies the adapters too"):
//
//   y[t, :] = x[t] Wᵀ + bias + Σ_j coef_j · B[id_j] (A[id_j] x[t])      coef_j = w_j · scale[id_j]
//
// for few tokens (T <= 32 per token tile; any T is correct, W is re-read per 32-token tile), fp16/bf16.
// Two launches, stream-ordered, no host sync:
//   1. lora::shrink_kernel (lora.cuh, shared with the split decode path): h[t, j, :] = coef_j ·
//      A[id_j] x[t] (fp32, coef folded in) and the resolved id (-1: no adapter / weight 0 / token
//      outside every segment) into a [T, k, r] + [T, k] workspace (2 KiB at T = 32, k = 1, r = 16: the
//      "one tiny round trip through L2"; keeping h on chip would need a grid-wide dependency, since
//      every output tile needs every token's full d_in reduction). One A row per 128 threads, each a
//      fixed batch of 4 16-byte loads: ~one HBM round trip deep, 512 blocks at the benchmark shape.
//   2. linear_kernel: y^T tile [32 rows of d_out, 32 tokens] = W_tile · x^T on tensor cores (mma.sync
//      m16n8k16 through the emulatable helpers), W and x tiles of 64 columns of d_in streamed through a
//      5-stage cp.async ring (4 steps = 16 KiB of W + 16 KiB of x in flight per block while one is
//      multiplied; one block_sync per step; 45 KiB static smem, the fp32 output tile reuses it). 4 warps: 2 along the 32 rows x 2 along each 64-column step (K split), the
//      two K halves summed through shared memory at the end. Epilogue (fp32): + bias + the expand
//      Σ_j Σ_q h[t, j, q] B[id_j, o, q] (B rows are r contiguous elements: 16-byte loads; h from the
//      2 KiB workspace through L1), one write of y in x's dtype, coalesced along d_out.
//      Grid: ceil(d_out / 32) x ceil(T / 32) = 128 blocks at d = 4096, T <= 32 (132 SMs: one wave, every
//      SM but 4 streams 256 KiB of W). W is read exactly once from HBM with 16-byte cp.async, x
//      (256 KiB) once per block from L2 (128 x 256 KiB = 32 MiB of L2 reads, ~3 µs of L2 bandwidth spread
//      over the pass), B's used rows once per block (each block its 32 rows: 3.3 MiB total).
// Floor at d = 4096, T = 32, bf16: W 32 MiB + adapters 6.5 MiB -> ~11.5 µs at 3.35 TB/s (H100), vs
// cuBLAS's GEMV-shaped GEMM alone measured at 18 µs (H200) / 22 µs (H100) plus the separate LoRA launch.
// FLOPs 2·32·4096² = 1.07 GFLOP: on CUDA cores ~17 µs (why this is mma, not SIMT), on tensor cores noise.
// Open risks, for the first GPU run (both this and cuBLAS + the split LoRA kernels are benchmark rows;
// mokernels.ops.lora.LINEAR_FUSED_MAX_TOKENS = 0 turns this path off):
//  * bytes in flight: 4 steps x 4 KiB of W per block, ~1 block per SM = 16 KiB per SM, vs ~25 KiB that
//    3.35 TB/s x ~1 µs of loaded latency wants (Little's law); the 48 KiB static-smem limit (the
//    emulator has no opt-in above it) caps the ring. If the pass runs at ~60 % of HBM bandwidth: a
//    split-K grid (row tiles of 128 x 4 K slices, fp32 partials, the last block per tile reducing and
//    running the epilogue) would quadruple the rows per block and quarter the x re-reads.
//  * x is re-read from L2 by every block: 128 x 256 KiB = 32 MiB, as much as W itself, over the same
//    L2 -> SM path (~2x HBM bandwidth): not the bottleneck at T = 32, it would be beyond.
// Inputs whose rows are not 16-byte aligned (d_in % 8 != 0, shifted pointers) take the same kernel with
// synchronous element loads into the tiles (ASYNC = false); B rows likewise (BVEC = 1).
// Status: compiled (nvcc sm_80/sm_90a), emulated in CI; NOT yet run on a GPU.
#pragma once

#include "common/async.cuh"
#include "common/mma.cuh"
#include "lora.cuh"

namespace mk::lora::fused {

constexpr int kBlock = 128;
constexpr int kBM = 32;                  // d_out rows per block (2 warps x 16)
constexpr int kTN = 32;                  // tokens per block (4 n8 tiles)
constexpr int kBK = 64;                  // d_in columns per pipeline step (2 warps x 32)
constexpr int kStages = 5;              // 45 KiB of static smem: 4 steps (16 KiB of W) in flight per block
constexpr int kLd = kBK + 8;             // padded smem rows: 144 bytes, conflict-free ldmatrix
constexpr int kStage = (kBM + kTN) * kLd;  // W tile then x tile
constexpr int kMaxTokensAuto = 32;       // the Python auto switch: T <= this takes the fused pass
static_assert((kLd * 2) % 16 == 0 && (kStage * 2) % 16 == 0, "16-byte smem rows");
static_assert(kBM * (kTN + 1) * 4 <= kStages * kStage * 2, "the fp32 output tile reuses the stages");

template <class T>
struct Args {
  lora::Workspace<T> ws;  // x, A, B, scale, routing, y, sizes + the shrink's workspace (h, hid)
  const T* W;             // [d_out, d_in]
  const T* bias;          // [d_out] or nullptr
};

#if defined(MOKERNELS_EMULATION)
#define MK_LORA_FUSED_BOUNDS(n)
#else
#define MK_LORA_FUSED_BOUNDS(n) __launch_bounds__(kBlock, n)
#endif

// sass-budget: mk::lora::fused::linear_kernel block=128 regs<=128 spill=0 hot
template <class T, bool ASYNC, int BVEC>
MK_GLOBAL void MK_LORA_FUSED_BOUNDS(4) linear_kernel(const Args<T> f) {
  const lora::Args<T>& a = f.ws.l;
  MK_SHARED_ARRAY_ALIGNED(16, T, st, kStages * kStage);
  const int lane = lane_id(), warp = threadIdx.x / kWarpSize, wm = warp & 1, wk = warp >> 1;
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * kBM, t0 = static_cast<int64_t>(blockIdx.y) * kTN;
  const int d_in = a.d_in, d_out = a.d_out;
  const int64_t T_ = a.tokens;
  const T zero = from_acc<T>(0.f);

  auto load = [&](int s, int64_t k0) {  // W rows [o0, o0+32) and x rows [t0, t0+32), columns [k0, k0+64)
    T* sw = st + s * kStage;
    if constexpr (ASYNC) {
      for (int c = threadIdx.x; c < (kBM + kTN) * (kBK / 8); c += kBlock) {
        const int row = c / (kBK / 8), col = (c % (kBK / 8)) * 8;
        const int64_t kg = k0 + col;
        if (row < kBM) {
          const bool ok = o0 + row < d_out && kg < d_in;
          cp_async_cg_zfill<16>(sw + row * kLd + col, ok ? f.W + (o0 + row) * d_in + kg : f.W, ok ? 16 : 0);
        } else {
          const bool ok = t0 + row - kBM < T_ && kg < d_in;
          cp_async_cg_zfill<16>(sw + row * kLd + col, ok ? a.x + (t0 + row - kBM) * d_in + kg : a.x, ok ? 16 : 0);
        }
      }
    } else {
      for (int e = threadIdx.x; e < (kBM + kTN) * kBK; e += kBlock) {
        const int row = e / kBK, col = e % kBK;
        const int64_t kg = k0 + col;
        if (row < kBM)
          sw[row * kLd + col] = (o0 + row < d_out && kg < d_in) ? f.W[(o0 + row) * d_in + kg] : zero;
        else
          sw[row * kLd + col] = (t0 + row - kBM < T_ && kg < d_in) ? a.x[(t0 + row - kBM) * d_in + kg] : zero;
      }
    }
  };

  float acc[kTN / 8][4] = {};
  const int nk = static_cast<int>(ceil_div(d_in, kBK));
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nk) load(s, static_cast<int64_t>(s) * kBK);
    cp_async_commit_group();
  }
  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait_group<kStages - 2>();  // step kt's tiles have landed (this thread's copies)
    block_sync();                        // ... every thread's; and step kt-1's stage is free again
    if (kt + kStages - 1 < nk) load((kt + kStages - 1) % kStages, static_cast<int64_t>(kt + kStages - 1) * kBK);
    cp_async_commit_group();
    const T* sw = st + (kt % kStages) * kStage;
    const T* sx = sw + kBM * kLd;
#pragma unroll
    for (int kk = wk * (kBK / 2); kk < (wk + 1) * (kBK / 2); kk += 16) {
      uint32_t af[4];
      ldmatrix<4>(af, &sw[(wm * 16 + lane % 16) * kLd + kk + (lane / 16) * 8]);
#pragma unroll
      for (int np = 0; np < kTN / 16; ++np) {
        uint32_t bf[4];
        ldmatrix<4>(bf, &sx[(np * 16 + lane % 8 + (lane / 16) * 8) * kLd + kk + ((lane / 8) % 2) * 8]);
        const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
        mma_m16n8k16<T>(acc[2 * np], af, b0, acc[2 * np]);
        mma_m16n8k16<T>(acc[2 * np + 1], af, b1, acc[2 * np + 1]);
      }
    }
  }
  cp_async_wait_group<0>();  // only empty groups are left; no copy lands after this
  block_sync();              // every warp is done with the stages: yt reuses them

  // the two K halves -> yt [32 rows of d_out][32 tokens] (fp32)
  auto yt = reinterpret_cast<float(*)[kTN + 1]>(st);
  if (wk == 1) {
#pragma unroll
    for (int nt = 0; nt < kTN / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const RowCol rc = mma_c_coord(lane, i);
        yt[wm * 16 + rc.row][nt * 8 + rc.col] = acc[nt][i];
      }
  }
  block_sync();
  if (wk == 0) {
#pragma unroll
    for (int nt = 0; nt < kTN / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const RowCol rc = mma_c_coord(lane, i);
        yt[wm * 16 + rc.row][nt * 8 + rc.col] += acc[nt][i];
      }
  }
  block_sync();

  // epilogue: thread -> column o (coalesced along d_out), tokens strided by 4
  const int ol = threadIdx.x % kBM;
  const int64_t o = o0 + ol;
  if (o >= d_out) return;
  const float bias = f.bias != nullptr ? to_acc(f.bias[o]) : 0.f;
  for (int tl = threadIdx.x / kBM; tl < kTN && t0 + tl < T_; tl += kBlock / kBM) {
    const int64_t t = t0 + tl;
    float v = yt[ol][tl] + bias;
    for (int j = 0; j < a.k; ++j) {
      const int id = f.ws.hid[t * a.k + j];
      if (id < 0) continue;
      const float* h = f.ws.h + (t * a.k + j) * a.r;
      const T* brow = a.B + (static_cast<int64_t>(id) * d_out + o) * a.r;
      float d = 0.f;
      for (int q = 0; q < a.r; q += BVEC) {
        const Vec<T, BVEC> bv = load_vec<BVEC>(brow + q);
#pragma unroll
        for (int i = 0; i < BVEC; ++i) d += to_acc(bv.v[i]) * h[q + i];
      }
      v += d;
    }
    a.y[t * d_out + o] = from_acc<T>(v);
  }
}

// Launcher: a.tokens > 0, a.d_out > 0, 1 <= r <= kMaxRank, fp16/bf16, contiguous arrays, !shared_a;
// f.ws's workspace set (lora::set_workspace).
template <class T>
cudaError_t launch(Args<T>& f, int num_sms, cudaStream_t stream) {
  if (const cudaError_t e = lora::launch_shrink(f.ws, num_sms, stream); e != cudaSuccess) return e;
  const lora::Args<T>& a = f.ws.l;
  const bool async = pick_vec<T>(a.d_in, {a.x, f.W}) * sizeof(T) == 16;
  const bool bvec = pick_vec<T>(a.r, {a.B}) * sizeof(T) == 16;
  const dim3 grid(static_cast<unsigned>(ceil_div(a.d_out, kBM)), static_cast<unsigned>(ceil_div(a.tokens, kTN)));
  if constexpr (sizeof(T) == 2) {
    auto kernel = async ? (bvec ? linear_kernel<T, true, 8> : linear_kernel<T, true, 1>)
                        : (bvec ? linear_kernel<T, false, 8> : linear_kernel<T, false, 1>);
    MK_LAUNCH(kernel, grid, dim3(kBlock), 0, stream, f);
  }
  return last_launch_error();
}

}  // namespace mk::lora::fused
